//! The local control socket: `balancer reload`, `balancer backend drain ...` and
//! `balancer status` talk to a running agent through `/run/balancer/<instance>.sock`.
//!
//! The protocol is one request line per connection; the answer is text whose first line is
//! `ok` or `error: <why>`.

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{bail, Context, Result};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt},
    net::UnixListener,
    sync::{mpsc, oneshot},
};

use crate::throttle::throttled;

const SOCKET_DIR: &str = "/run/balancer";
const MAX_REQUEST: usize = 4096;

pub fn socket_path(instance: &str) -> PathBuf {
    Path::new(SOCKET_DIR).join(format!("{instance}.sock"))
}

/// What an operator asks of the running agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Reload,
    Drain {
        service: String,
        backend: String,
    },
    Undrain {
        service: String,
        backend: String,
    },
    Status,
    /// The agent exits; with `detach` it removes its data plane first.
    Stop {
        detach: bool,
    },
    /// The agent's own counters (binding, refusals by reason), one `name value` a line.
    Counters,
    /// Everything the Prometheus endpoint shows, as OpenMetrics text.
    Metrics,
    /// What still holds a backend (see `Agent::pinned`).
    Pinned {
        service: String,
        backend: String,
    },
    /// What `balancer top` shows, as JSON (see `metrics::snapshot_json`).
    Top,
    /// Sets a group's weight (see `Agent::set_group_weight`).
    GroupWeight {
        service: String,
        group: String,
        weight: u32,
    },
    /// A service's sessions as JSON (see `Agent::sessions`).
    Sessions {
        service: String,
        backend: Option<String>,
        limit: usize,
    },
}

impl Request {
    pub fn to_line(&self) -> String {
        match self {
            Request::Reload => "reload".to_owned(),
            Request::Drain { service, backend } => format!("drain {service} {backend}"),
            Request::Undrain { service, backend } => format!("undrain {service} {backend}"),
            Request::Status => "status".to_owned(),
            Request::Stop { detach: false } => "stop".to_owned(),
            Request::Stop { detach: true } => "stop detach".to_owned(),
            Request::Counters => "counters".to_owned(),
            Request::Metrics => "metrics".to_owned(),
            Request::Top => "top".to_owned(),
            Request::Pinned { service, backend } => format!("pinned {service} {backend}"),
            Request::GroupWeight {
                service,
                group,
                weight,
            } => format!("group-weight {service} {group} {weight}"),
            Request::Sessions {
                service,
                backend,
                limit,
            } => format!(
                "sessions {service} {limit} {}",
                backend.as_deref().unwrap_or_default()
            )
            .trim_end()
            .to_owned(),
        }
    }

    pub fn parse(line: &str) -> Result<Self, String> {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["reload"] => Ok(Request::Reload),
            ["status"] => Ok(Request::Status),
            ["stop"] => Ok(Request::Stop { detach: false }),
            ["counters"] => Ok(Request::Counters),
            ["metrics"] => Ok(Request::Metrics),
            ["top"] => Ok(Request::Top),
            ["pinned", service, backend] => Ok(Request::Pinned {
                service: (*service).into(),
                backend: (*backend).into(),
            }),
            ["sessions", service, limit, rest @ ..] if rest.len() <= 1 => Ok(Request::Sessions {
                service: (*service).into(),
                backend: rest.first().map(|b| (*b).to_owned()),
                limit: limit
                    .parse()
                    .map_err(|_| format!("bad limit in {line:?}"))?,
            }),
            ["stop", "detach"] => Ok(Request::Stop { detach: true }),
            ["drain", service, backend] => Ok(Request::Drain {
                service: (*service).into(),
                backend: (*backend).into(),
            }),
            ["undrain", service, backend] => Ok(Request::Undrain {
                service: (*service).into(),
                backend: (*backend).into(),
            }),
            ["group-weight", service, group, weight] => Ok(Request::GroupWeight {
                service: (*service).into(),
                group: (*group).into(),
                weight: weight
                    .parse()
                    .map_err(|_| format!("weight {weight:?} is not a number"))?,
            }),
            _ => Err(format!("unknown request {line:?}")),
        }
    }
}

/// A request on its way to the agent, with where the answer goes.
pub struct Command {
    pub request: Request,
    pub reply: oneshot::Sender<Result<String, String>>,
    /// Fires once the answer is written to the operator: an agent that exits on this request
    /// waits for it, or the answer would die with the process.
    pub written: oneshot::Receiver<()>,
}

/// Listens on the instance's socket and hands each request to `commands`.
pub fn serve(instance: &str, commands: mpsc::Sender<Command>) -> Result<PathBuf> {
    let path = socket_path(instance);
    std::fs::create_dir_all(SOCKET_DIR).with_context(|| format!("creating {SOCKET_DIR}"))?;
    if UnixStream::connect(&path).is_ok() {
        bail!(
            "another agent of instance {instance} is running (it answers on {})",
            path.display()
        );
    }
    let _ = std::fs::remove_file(&path);
    let listener =
        UnixListener::bind(&path).with_context(|| format!("listening on {}", path.display()))?;
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    tokio::spawn(answer(stream, commands.clone()));
                }
                Err(error) => throttled!(warn, "control socket: {error}"),
            }
        }
    });
    Ok(path)
}

async fn answer(stream: tokio::net::UnixStream, commands: mpsc::Sender<Command>) {
    let (read, mut write) = stream.into_split();
    let mut written_tx = None;
    let mut line = String::new();
    let mut reader = tokio::io::BufReader::new(read.take(MAX_REQUEST as u64));
    let answer = match reader.read_line(&mut line).await {
        Err(error) => Err(format!("reading the request: {error}")),
        Ok(_) => match Request::parse(&line) {
            Err(error) => Err(error),
            Ok(request) => {
                let (reply, answer) = oneshot::channel();
                let (done, written) = oneshot::channel();
                written_tx = Some(done);
                if commands
                    .send(Command {
                        request,
                        reply,
                        written,
                    })
                    .await
                    .is_err()
                {
                    Err("the agent is shutting down".to_owned())
                } else {
                    answer
                        .await
                        .unwrap_or_else(|_| Err("the agent dropped the request".to_owned()))
                }
            }
        },
    };
    let text = match answer {
        Ok(text) if text.is_empty() => "ok\n".to_owned(),
        Ok(text) => format!("ok\n{text}"),
        Err(error) => format!("error: {error}\n"),
    };
    let _ = write.write_all(text.as_bytes()).await;
    let _ = write.shutdown().await;
    if let Some(written) = written_tx {
        let _ = written.send(());
    }
}

/// Sends a request to the running agent of `instance` and returns its answer, failing when
/// the agent answers with an error.
pub fn send(instance: &str, request: &Request) -> Result<String> {
    let path = socket_path(instance);
    let mut stream = UnixStream::connect(&path).with_context(|| {
        format!(
            "connecting to {} (is `balancer run` running for instance {instance}?)",
            path.display()
        )
    })?;
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    stream.write_all(format!("{}\n", request.to_line()).as_bytes())?;
    let mut lines = BufReader::new(stream).lines();
    let first = lines
        .next()
        .context("the agent closed the connection without answering")??;
    let rest: Vec<String> = lines.collect::<Result<_, _>>()?;
    if let Some(error) = first.strip_prefix("error: ") {
        bail!("{error}\n{}", rest.join("\n"));
    }
    Ok(rest.join("\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_through_their_line() {
        for request in [
            Request::Reload,
            Request::Status,
            Request::Drain {
                service: "web".into(),
                backend: "b-1".into(),
            },
            Request::Undrain {
                service: "web".into(),
                backend: "b_2".into(),
            },
            Request::Stop { detach: false },
            Request::Stop { detach: true },
            Request::Counters,
            Request::Metrics,
            Request::Top,
            Request::Pinned {
                service: "web".into(),
                backend: "b-1".into(),
            },
            Request::Sessions {
                service: "web".into(),
                backend: None,
                limit: 1000,
            },
            Request::Sessions {
                service: "web".into(),
                backend: Some("b-1".into()),
                limit: 5,
            },
        ] {
            assert_eq!(Request::parse(&request.to_line()), Ok(request));
        }
        assert!(Request::parse("drain web").is_err());
        assert!(Request::parse("explode").is_err());
    }
}
