//! Health checks: one task per backend probes it from the balancer host (a TCP connect or an
//! HTTP GET) and reports each change of state after `rise` or `fall` consecutive results.

use std::{net::SocketAddr, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::mpsc,
    task::JoinHandle,
    time::{interval, timeout, MissedTickBehavior},
};

use crate::config::{CheckKind, HealthCheckConfig};

/// What a checker watches.
#[derive(Clone, Debug)]
pub struct Target {
    pub service: String,
    pub backend: String,
    pub addr: SocketAddr,
    pub check: HealthCheckConfig,
    /// Each check's time to its verdict (an answer, an error or the timeout), in seconds.
    pub latency: prometheus_client::metrics::histogram::Histogram,
}

/// A backend changed state.
#[derive(Debug)]
pub struct Report {
    pub service: String,
    pub backend: String,
    pub healthy: bool,
    pub reason: String,
}

/// Starts checking `target`, which is currently `healthy` or not.
pub fn spawn(target: Target, healthy: bool, reports: mpsc::Sender<Report>) -> JoinHandle<()> {
    tokio::spawn(watch(target, healthy, reports))
}

async fn watch(target: Target, mut healthy: bool, reports: mpsc::Sender<Report>) {
    let mut ticker = interval(Duration::from_secs_f64(target.check.interval));
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    // Consecutive results that disagree with the current state.
    let mut streak = 0;
    loop {
        ticker.tick().await;
        let started = std::time::Instant::now();
        let result = probe(&target).await;
        target.latency.observe(started.elapsed().as_secs_f64());
        if result.is_ok() == healthy {
            streak = 0;
            continue;
        }
        streak += 1;
        let needed = if healthy {
            target.check.fall
        } else {
            target.check.rise
        };
        if streak < needed {
            continue;
        }
        healthy = !healthy;
        streak = 0;
        let reason = match result {
            Ok(()) => format!("{needed} consecutive checks passed"),
            Err(error) => format!("{needed} consecutive checks failed, last: {error}"),
        };
        let report = Report {
            service: target.service.clone(),
            backend: target.backend.clone(),
            healthy,
            reason,
        };
        if reports.send(report).await.is_err() {
            return;
        }
    }
}

/// One check, bounded by the check's timeout.
async fn probe(target: &Target) -> Result<(), String> {
    let limit = Duration::from_secs_f64(target.check.timeout);
    match timeout(limit, probe_unbounded(target)).await {
        Ok(result) => result,
        Err(_) => Err(format!("no answer within {:.2} s", limit.as_secs_f64())),
    }
}

async fn probe_unbounded(target: &Target) -> Result<(), String> {
    let mut stream = TcpStream::connect(target.addr)
        .await
        .map_err(|e| format!("connect to {}: {e}", target.addr))?;
    if target.check.kind == CheckKind::Tcp {
        return Ok(());
    }
    let host = target
        .check
        .host
        .clone()
        .unwrap_or_else(|| target.addr.ip().to_string());
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: balancer-health-check\r\nConnection: close\r\n\r\n",
        target.check.path
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("sending the request: {e}"))?;
    let status = read_status(&mut stream).await?;
    let (low, high) = target.check.status_range().unwrap_or((200, 399));
    if (low..=high).contains(&status) {
        Ok(())
    } else {
        Err(format!("HTTP status {status}, expected {low}-{high}"))
    }
}

/// Reads the status code from an HTTP/1.x status line.
async fn read_status(stream: &mut TcpStream) -> Result<u16, String> {
    let mut head = Vec::with_capacity(256);
    let mut buf = [0u8; 256];
    while !head.windows(2).any(|w| w == b"\r\n") {
        if head.len() > 1024 {
            return Err("status line longer than 1 KiB".to_owned());
        }
        let n = stream
            .read(&mut buf)
            .await
            .map_err(|e| format!("reading the response: {e}"))?;
        if n == 0 {
            return Err("connection closed before a status line".to_owned());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&head);
    let mut parts = line.split_whitespace();
    match (
        parts.next(),
        parts.next().and_then(|c| c.parse::<u16>().ok()),
    ) {
        (Some(version), Some(code)) if version.starts_with("HTTP/1.") => Ok(code),
        _ => Err(format!(
            "not an HTTP status line: {:?}",
            line.lines().next().unwrap_or("")
        )),
    }
}

#[cfg(test)]
mod tests {
    use tokio::net::TcpListener;

    use super::*;

    fn target(addr: SocketAddr, kind: CheckKind, expected_status: &str) -> Target {
        Target {
            service: "web".into(),
            backend: "b1".into(),
            addr,
            latency: crate::metrics::check_latency_histogram(),
            check: HealthCheckConfig {
                kind,
                interval: 0.05,
                timeout: 0.5,
                rise: 2,
                fall: 2,
                path: "/health".into(),
                host: None,
                expected_status: expected_status.into(),
                port: None,
            },
        }
    }

    /// A one-shot HTTP server on loopback answering every connection with `status`.
    async fn http_server(status: u16) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let mut buf = [0u8; 1024];
                let _ = stream.read(&mut buf).await;
                let response = format!("HTTP/1.1 {status} X\r\nContent-Length: 0\r\n\r\n");
                let _ = stream.write_all(response.as_bytes()).await;
            }
        });
        addr
    }

    #[tokio::test]
    async fn http_check_accepts_expected_statuses_only() {
        let ok = http_server(204).await;
        let bad = http_server(503).await;
        assert_eq!(probe(&target(ok, CheckKind::Http, "200-299")).await, Ok(()));
        let error = probe(&target(bad, CheckKind::Http, "200-299"))
            .await
            .unwrap_err();
        assert!(error.contains("503"), "{error}");
    }

    #[tokio::test]
    async fn tcp_check_fails_on_a_closed_port() {
        let closed = {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            listener.local_addr().expect("addr")
        };
        assert!(probe(&target(closed, CheckKind::Tcp, "200")).await.is_err());
        let open = http_server(200).await;
        assert_eq!(probe(&target(open, CheckKind::Tcp, "200")).await, Ok(()));
    }

    #[tokio::test]
    async fn state_changes_after_fall_failures_and_rise_successes() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        drop(listener);
        let (tx, mut rx) = mpsc::channel(4);
        let task = spawn(target(addr, CheckKind::Tcp, "200"), true, tx);
        let report = timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("a report")
            .expect("open");
        assert!(!report.healthy, "{report:?}");
        assert!(
            report.reason.contains("2 consecutive checks failed"),
            "{report:?}"
        );
        let listener = TcpListener::bind(addr).await.expect("rebind");
        let report = timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("a report")
            .expect("open");
        assert!(report.healthy, "{report:?}");
        drop(listener);
        task.abort();
    }
}
