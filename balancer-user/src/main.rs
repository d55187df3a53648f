//! `balancer`: the agent of the XDP load balancer.
//!
//! It loads and attaches the XDP program, programs services and backends into its maps and
//! reports what the data plane does.

mod agent;
mod bpf;
mod config;
mod connections;
mod control;
mod cookie;
mod dataplane;
mod health;
mod http;
mod maglev;
mod metrics;
mod mounts;
mod rewrite;
mod segment;
mod stats;
mod throttle;
mod top;

use std::{
    io::IsTerminal,
    path::{Path, PathBuf},
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use tokio::{
    signal::unix::{signal, SignalKind},
    sync::mpsc,
};
use tracing::{error, info, warn};

use crate::{
    agent::Agent,
    config::Config,
    control::Request,
    dataplane::{Dataplane, StartOptions},
    stats::Snapshot,
};

/// XDP load balancer for virtual IPs: forwards client flows to backends in the kernel.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// How log lines are written to standard error: `text` for people, `json` (one object a
    /// line, with the fields of each event) for log collectors. RUST_LOG sets the level.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Attach to the interfaces in the config and run the agent until Ctrl-C or SIGTERM.
    ///
    /// The XDP program stays attached when the agent exits, for any reason: L4 VIPs and
    /// spliced cookie connections keep flowing, and the next `balancer run` of the instance
    /// takes over the program, its maps and the connections being bound, swapping in its own
    /// program in one step. `balancer stop --detach` removes the data plane.
    Run {
        /// The configuration file (TOML); see balancer.example.toml.
        #[arg(short, long)]
        config: PathBuf,
        /// Replace the pinned maps with empty ones: needed when they have another layout
        /// (another version of the program) or shape (another capacity); their flows,
        /// sessions and connections being bound are lost.
        #[arg(long)]
        cold: bool,
        /// Load this XDP object instead of the one built into this binary (an upgrade of the
        /// program alone).
        #[arg(long, value_name = "FILE")]
        program: Option<PathBuf>,
        /// Threads that bind cookie connections (1 to 8), each owning the client prefixes XDP
        /// hashes to it; overrides the config's `agent_workers` (default: one per CPU).
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=8))]
        agent_workers: Option<u32>,
    },
    /// Stop the agent of an instance; the data plane keeps forwarding unless --detach.
    Stop {
        #[arg(short, long, default_value = config::DEFAULT_INSTANCE)]
        instance: String,
        /// Also detach the XDP program and remove the pinned maps: all traffic to the VIPs
        /// stops being balanced, and every flow and session is forgotten.
        #[arg(long)]
        detach: bool,
    },
    /// Check a configuration file and exit: prints what is wrong, naming the field.
    Check {
        /// The configuration file (TOML).
        config: PathBuf,
    },
    /// Make a running agent read its configuration file again (like SIGHUP); a bad file is
    /// rejected and the running configuration stays in force.
    Reload {
        #[arg(short, long, default_value = config::DEFAULT_INSTANCE)]
        instance: String,
    },
    /// Show each backend of a running agent: state, health, clients with a session, flows;
    /// without an agent, whether the instance's data plane is still attached.
    Status {
        #[arg(short, long, default_value = config::DEFAULT_INSTANCE)]
        instance: String,
        /// Print JSON: per backend its state, health, weight, sessions, flows and traffic,
        /// the agent's table, the top sources by new flows over the last minute and every
        /// XDP counter (`{"agent_running": false, "data_plane": ...}` without an agent).
        #[arg(long)]
        json: bool,
    },
    /// Show a service's sessions per backend (live source-ip sessions, spliced cookie
    /// connections, connections that came by a backend's cookie in the last minute), then
    /// its live source-ip sessions one a line: client, backend, seconds idle and, with
    /// groups, the session's group and its seconds left in it.
    Sessions {
        service: String,
        /// Only this backend's.
        #[arg(long)]
        backend: Option<String>,
        /// Source-ip sessions to list at most (the counts cover them all).
        #[arg(long, default_value_t = 1000)]
        limit: usize,
        /// Print the agent's JSON instead of text.
        #[arg(long)]
        json: bool,
        #[arg(short, long, default_value = config::DEFAULT_INSTANCE)]
        instance: String,
    },
    /// A live view of a running agent, refreshed every second: per service and backend its
    /// state, health, sessions, active flows, new flows and cookie connections per second
    /// and traffic each way; q, Esc or Ctrl-C quits.
    Top {
        #[arg(short, long, default_value = config::DEFAULT_INSTANCE)]
        instance: String,
    },
    /// Drain or restore a backend of a running agent.
    Backend {
        #[command(subcommand)]
        action: BackendAction,
        #[arg(short, long, default_value = config::DEFAULT_INSTANCE, global = true)]
        instance: String,
    },
    /// Steer a running agent's groups of backends (blue/green, canary).
    Group {
        #[command(subcommand)]
        action: GroupAction,
        #[arg(short, long, default_value = config::DEFAULT_INSTANCE, global = true)]
        instance: String,
    },
    /// Build a lookup table for a number of equal backends and report how long it took, how
    /// evenly it spreads keys and how many move when one backend fails: helps choose
    /// `table_size`.
    TablePlan {
        #[arg(long, default_value_t = 1000)]
        backends: usize,
        #[arg(long, default_value_t = balancer_common::DEFAULT_TABLE_SIZE)]
        table_size: u32,
    },
    /// Print the `lb-cookie` value that sends a browser to a backend, signed with the
    /// config's first key, e.g. to pin a test client or to check another host's key.
    Cookie {
        /// The configuration file (TOML) with the service and its keys.
        #[arg(short, long)]
        config: PathBuf,
        /// A service with `affinity = "lb-cookie"`.
        service: String,
        /// One of its backends, by name.
        backend: String,
        /// Seconds until the cookie expires; the service's `cookie_duration` when absent.
        #[arg(long)]
        expires_in: Option<u32>,
    },
    /// Print the packet counters of an instance, one `reason packets bytes` per line, then
    /// (when its agent runs) the agent's counters, one `name count` per line.
    Stats {
        /// The instance name from the config.
        #[arg(short, long, default_value = config::DEFAULT_INSTANCE)]
        instance: String,
        /// Print JSON: `{"xdp": {reason: {"packets", "bytes"}}, "agent": {name: count}}`
        /// (`"agent": null` when none runs).
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum GroupAction {
    /// Set the share of new sessions a group takes, relative to the service's other groups
    /// (0: none, the group drains). Sessions already in a group stay there for the service's
    /// group_stickiness. Until the next reload, which applies the configuration's weights.
    Weight {
        /// The service, by name.
        service: String,
        /// One of its `[[service.group]]`s, by name.
        group: String,
        /// 0 to 10000, relative to the other groups' weights.
        weight: u32,
    },
}

#[derive(Subcommand)]
enum BackendAction {
    /// Stop sending new sessions to the backend; its flows continue and its sessions stay
    /// until the service's drain_timeout, then move.
    ///
    /// With --wait, follows what still holds the backend once a second (flows that are not
    /// closing and saw a packet in the last minute, live source-ip sessions, connections that
    /// came by its cookie) and exits 0 once nothing does, or 1 at --timeout saying what
    /// remained.
    Drain {
        service: String,
        backend: String,
        /// Follow the drain until the backend holds nothing.
        #[arg(long)]
        wait: bool,
        /// With --wait: seconds to follow it before giving up.
        #[arg(long, default_value_t = 300, value_name = "SECONDS")]
        timeout: u64,
        /// With --wait: cookie sessions count as gone after this many seconds without a
        /// connection coming by its cookie.
        #[arg(long, default_value_t = 60, value_name = "SECONDS")]
        cookie_quiet: u64,
    },
    /// Let a draining backend take new sessions again.
    Undrain { service: String, backend: String },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let logs = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => logs.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => logs.json().init(),
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        match mounts::join_parent_mounts() {
            Ok(Some(joined)) => info!(
                parent = joined.parent,
                "started in a private mount namespace (as `ip netns exec` makes): joined the mount namespace of the process that started it, so the pinned maps and links are where other shells and later agents find them"
            ),
            Ok(None) => {}
            Err(error) => {
                eprintln!("error: {error:#}");
                return ExitCode::FAILURE;
            }
        }
    }
    match execute(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn execute(command: Command) -> Result<()> {
    match command {
        Command::Run {
            config,
            cold,
            program,
            agent_workers,
        } => run(config, StartOptions { cold, program }, agent_workers),
        Command::Stop { instance, detach } => stop(&instance, detach),
        Command::Check { config } => {
            let config = Config::load(&config)?;
            println!(
                "configuration is valid: {} services, {} backends",
                config.services.len(),
                config
                    .services
                    .iter()
                    .map(|s| s.backends.len())
                    .sum::<usize>()
            );
            Ok(())
        }
        Command::Cookie {
            config,
            service,
            backend,
            expires_in,
        } => {
            println!("{}", cookie_for(&config, &service, &backend, expires_in)?);
            Ok(())
        }
        Command::Reload { instance } => {
            println!("{}", control::send(&instance, &Request::Reload)?);
            Ok(())
        }
        Command::Status { instance, json } => {
            let request = if json { Request::Top } else { Request::Status };
            match control::send(&instance, &request) {
                Ok(status) => println!("{status}"),
                Err(error) => match dataplane::describe_pinned(&instance) {
                    Some(pinned) if json => println!(
                        "{}",
                        serde_json::json!({"agent_running": false, "data_plane": pinned})
                    ),
                    Some(pinned) => print!("{pinned}"),
                    None => return Err(error),
                },
            }
            Ok(())
        }
        Command::Top { instance } => top::run(&instance),
        Command::Sessions {
            service,
            backend,
            limit,
            json,
            instance,
        } => {
            let request = Request::Sessions {
                service,
                backend,
                limit,
            };
            let answer = control::send(&instance, &request)?;
            if json {
                println!("{answer}");
            } else {
                print!("{}", sessions_text(&answer)?);
            }
            Ok(())
        }
        Command::Backend { action, instance } => {
            match action {
                BackendAction::Drain {
                    service,
                    backend,
                    wait,
                    timeout,
                    cookie_quiet,
                } => {
                    let request = Request::Drain {
                        service: service.clone(),
                        backend: backend.clone(),
                    };
                    println!("{}", control::send(&instance, &request)?);
                    if wait {
                        let request = Request::Pinned { service, backend };
                        let limits = (Duration::from_secs(timeout), cookie_quiet);
                        wait_for_drain(&instance, &request, limits)?;
                    }
                }
                BackendAction::Undrain { service, backend } => {
                    let request = Request::Undrain { service, backend };
                    println!("{}", control::send(&instance, &request)?);
                }
            }
            Ok(())
        }
        Command::Group {
            action:
                GroupAction::Weight {
                    service,
                    group,
                    weight,
                },
            instance,
        } => {
            let request = Request::GroupWeight {
                service,
                group,
                weight,
            };
            println!("{}", control::send(&instance, &request)?);
            Ok(())
        }
        Command::TablePlan {
            backends,
            table_size,
        } => {
            print!("{}", maglev::plan(backends, table_size)?);
            Ok(())
        }
        Command::Stats { instance, json } => {
            let xdp = Snapshot::read(&instance)?;
            // The agent's own refusals and bindings, when one runs.
            let agent = control::send(&instance, &Request::Counters).ok();
            if json {
                let agent = agent.map(|counters| {
                    counters
                        .lines()
                        .filter_map(|line| line.split_once(' '))
                        .filter_map(|(name, count)| {
                            Some((name.to_owned(), count.parse::<u64>().ok()?.into()))
                        })
                        .collect::<serde_json::Map<_, _>>()
                });
                println!("{}", serde_json::json!({"xdp": xdp.json(), "agent": agent}));
            } else {
                print!("{}", xdp.table());
                if let Some(counters) = agent {
                    println!("{counters}");
                }
            }
            Ok(())
        }
    }
}

fn run(config_path: PathBuf, options: StartOptions, workers: Option<u32>) -> Result<()> {
    let mut config = Config::load(&config_path)?;
    if workers.is_some() {
        config.agent_workers = workers;
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(serve(config, config_path, options))
}

/// `balancer stop`: the running agent exits (detaching first with `detach`); with no agent,
/// `detach` removes what the instance left pinned.
fn stop(instance: &str, detach: bool) -> Result<()> {
    match control::send(instance, &Request::Stop { detach }) {
        Ok(answer) => {
            println!("{answer}");
            Ok(())
        }
        Err(_) if detach => {
            let interfaces = dataplane::remove_instance(instance)?;
            println!(
                "no agent was running; detached instance {instance} from {} and removed its maps",
                if interfaces.is_empty() { "no interface".to_owned() } else { interfaces.join(", ") }
            );
            Ok(())
        }
        Err(error) => Err(error.context(format!(
            "no agent of instance {instance} answers; its data plane, if attached, stays (add --detach to remove it)"
        ))),
    }
}

/// Runs the agent until SIGINT or SIGTERM: health reports, operator commands and SIGHUP
/// reloads change the data plane; a stats line goes out every `stats_interval` seconds.
async fn serve(config: Config, config_path: PathBuf, options: StartOptions) -> Result<()> {
    let mut interrupt = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut terminate =
        signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut hangup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let (report_tx, mut reports) = mpsc::channel(64);
    let (command_tx, mut commands) = mpsc::channel(16);
    // Before the data plane: a taken address fails the start with nothing changed.
    if let Some(address) = config.metrics {
        metrics::serve(address, command_tx.clone())?;
    }

    let dataplane = Dataplane::start(&config, &options)?;
    let attached: Vec<String> = dataplane
        .attachments
        .iter()
        .map(|(i, how)| format!("{i} ({how})"))
        .collect();
    let program_id = dataplane.program_id;
    let workers = dataplane.workers;
    let instructions = dataplane
        .verified_instructions
        .map_or_else(|| "unknown".to_owned(), |n| n.to_string());
    let instance = config.instance.clone();
    let stats_interval = config.stats_interval;
    let services = config.services.len();
    let mut agent = Agent::new(config, dataplane, report_tx)?;
    let mut new_flow_sources = agent.take_new_flow_sources()?;
    let mut source_ticker = tokio::time::interval(NEW_FLOW_SOURCE_DRAIN);
    let mut heartbeat = tokio::time::interval(HEARTBEAT_INTERVAL);
    let rotation = agent.cookie_rotation();
    let mut cookie_rotation =
        tokio::time::interval_at(tokio::time::Instant::now() + rotation, rotation);
    let socket = control::serve(&instance, command_tx)?;
    println!(
        "ready: attached to {}; program {program_id}; {services} services; {workers} binding workers; verifier processed {instructions} instructions; maps pinned in {}; control socket {}",
        attached.join(", "),
        dataplane::pin_dir(&instance).display(),
        socket.display(),
    );
    notify_systemd(&[sd_notify::NotifyState::Ready]);
    let mut detach = false;
    let mut stopped_worker = None;

    let mut ticker = tokio::time::interval(Duration::from_secs(stats_interval.max(1)));
    let mut last = (Instant::now(), Snapshot::read(&instance)?);
    loop {
        tokio::select! {
            _ = interrupt.recv() => { info!("SIGINT received, stopping"); break; }
            _ = terminate.recv() => { info!("SIGTERM received, stopping"); break; }
            _ = hangup.recv() => {
                notify_systemd(&[sd_notify::NotifyState::Reloading]);
                if let Err(error) = agent.reload(&config_path) {
                    error!("reload rejected, the running configuration stays in force: {error:#}");
                }
                notify_systemd(&[sd_notify::NotifyState::Ready]);
            }
            _ = cookie_rotation.tick() => {
                if let Err(error) = agent.rotate_cookie_secret() {
                    warn!("rotating the SYN cookie secret: {error:#}");
                }
            }
            _ = heartbeat.tick() => {
                if let Some(worker) = agent.stopped_worker() {
                    error!(worker, "a binding worker stopped: the agent stops, so cookie services answer without it (the data plane keeps forwarding)");
                    stopped_worker = Some(worker);
                    break;
                }
                if let Err(error) = agent.heartbeat() {
                    warn!("{error:#}");
                }
                notify_systemd(&[sd_notify::NotifyState::Watchdog]);
            }
            Some(report) = reports.recv() => {
                if let Err(error) = agent.health_changed(report) {
                    error!("applying a health change: {error:#}");
                }
            }
            _ = source_ticker.tick() => {
                agent.refresh_top_sources();
                for _ in 0..NEW_FLOW_SOURCE_BATCH {
                    let Some(item) = new_flow_sources.next() else { break };
                    agent.tally_new_flow(&item);
                }
            }
            Some(command) = commands.recv() => {
                if let Request::Stop { detach: and_detach } = command.request {
                    info!(detach = and_detach, "stop requested");
                    detach = and_detach;
                    let _ = command.reply.send(Ok(if detach {
                        format!("agent of instance {instance} stopping; detaching its data plane")
                    } else {
                        format!("agent of instance {instance} stopping; its data plane keeps forwarding")
                    }));
                    let _ = tokio::time::timeout(Duration::from_secs(1), command.written).await;
                    break;
                }
                let answer = execute_request(&mut agent, &config_path, command.request);
                let _ = command.reply.send(answer.map_err(|e| format!("{e:#}")));
            }
            _ = ticker.tick() => {
                if let Err(error) = agent.expire_drains() {
                    error!("ending a drain: {error:#}");
                }
                if stats_interval > 0 {
                    match Snapshot::read(&instance) {
                        Ok(now) => {
                            let b = agent.binding_counters();
                            let bindings = if b.bound + b.failed > 0 {
                                format!(" | bindings: bound {} (cookie {}, fallback {}), cookies issued {}, retried {}, failed {}, head too large {}", b.bound, b.with_cookie, b.without_cookie, b.cookies_issued, b.retried, b.failed, b.head_too_large)
                            } else {
                                String::new()
                            };
                            println!("{}{bindings}", now.line_since(&last.1, last.0.elapsed()));
                            last = (Instant::now(), now);
                        }
                        Err(error) => warn!("reading stats: {error:#}"),
                    }
                }
            }
        }
    }
    notify_systemd(&[sd_notify::NotifyState::Stopping]);
    let _ = std::fs::remove_file(&socket);
    agent.shutdown();
    if detach {
        let interfaces = dataplane::remove_instance(&instance)?;
        info!(interfaces = %interfaces.join(", "), "detached and removed the pinned maps");
    } else {
        info!("stopped; the data plane stays attached: L4 VIPs and spliced connections keep flowing, the next `balancer run` takes over, `balancer stop --detach` removes it");
    }
    match stopped_worker {
        Some(worker) => bail!("binding worker {worker} stopped"),
        None => Ok(()),
    }
}

/// How often the agent drains the ring of new flows' clients, and the most it takes at once:
/// twice what the ring holds, so it keeps up with some 80,000 new flows a second.
const NEW_FLOW_SOURCE_DRAIN: Duration = Duration::from_millis(100);
const NEW_FLOW_SOURCE_BATCH: usize = 16_384;

/// How often the agent tells the data plane (and systemd's watchdog) it is alive: well inside
/// the program's agent timeout.
const HEARTBEAT_INTERVAL: Duration = Duration::from_millis(500);

/// Tells systemd (under `Type=notify`) what the agent is doing; a no-op elsewhere.
fn notify_systemd(state: &[sd_notify::NotifyState]) {
    if let Err(error) = sd_notify::notify(false, state) {
        warn!("notifying systemd: {error}");
    }
}

fn cookie_for(
    config: &Path,
    service: &str,
    backend: &str,
    expires_in: Option<u32>,
) -> Result<String> {
    let config = Config::load(config)?;
    let service = config
        .services
        .iter()
        .find(|s| s.name == service)
        .with_context(|| format!("no service {service} in the configuration"))?;
    anyhow::ensure!(
        service.affinity == config::AffinityMode::LbCookie,
        "service {} uses affinity \"{}\", not \"lb-cookie\"",
        service.name,
        service.affinity
    );
    let named = service
        .backends
        .iter()
        .find(|b| b.name == backend)
        .with_context(|| format!("service {} has no backend {backend}", service.name))?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .context("the clock is before 1970")?
        .as_secs() as u32;
    let expires = now.saturating_add(expires_in.unwrap_or(service.cookie_duration));
    // A session of a grouped service starts its time in the backend's group.
    let group = named.group.map(|g| cookie::GroupPin {
        token: cookie::backend_token(&service.groups[g].name),
        until: now.saturating_add(service.group_stickiness()),
    });
    let value = config
        .signing_keys
        .seal(
            &service.name,
            cookie::backend_token(backend),
            expires,
            group,
        )
        .context("the configuration has no cookie key")?;
    Ok(format!(
        "{}={value}",
        service.cookie_name().unwrap_or_default()
    ))
}

/// `balancer sessions`' text from the agent's JSON.
fn sessions_text(answer: &str) -> Result<String> {
    use std::fmt::Write as _;
    let value: serde_json::Value =
        serde_json::from_str(answer).context("reading the agent's sessions")?;
    let mut text = String::new();
    let _ = writeln!(
        text,
        "service {} affinity={}",
        value["service"].as_str().unwrap_or("?"),
        value["affinity"].as_str().unwrap_or("?")
    );
    for backend in value["backends"].as_array().into_iter().flatten() {
        let _ = writeln!(
            text,
            "  backend {} state={} source_ip_sessions={} spliced_connections={} cookie_connections_last_minute={}",
            backend["backend"].as_str().unwrap_or("?"),
            backend["state"].as_str().unwrap_or("?"),
            backend["source_ip_sessions"],
            backend["spliced_connections"],
            backend["cookie_connections_last_minute"],
        );
    }
    for session in value["source_ip_sessions"].as_array().into_iter().flatten() {
        let _ = write!(
            text,
            "  session {} -> {} idle {} s",
            session["client"].as_str().unwrap_or("?"),
            session["backend"].as_str().unwrap_or("?"),
            session["idle_s"],
        );
        if let Some(group) = session["group"].as_str() {
            let _ = write!(text, " in group {group} for {} s", session["group_s"]);
        }
        text.push('\n');
    }
    let more = value["source_ip_sessions_not_listed"].as_u64().unwrap_or(0);
    if more > 0 {
        let _ = writeln!(text, "  ... and {more} more source-ip sessions (--limit)");
    }
    Ok(text)
}

/// Follows a drain once a second until nothing holds the backend, or fails at the timeout
/// saying what remained.
fn wait_for_drain(
    instance: &str,
    request: &Request,
    (timeout, cookie_quiet): (Duration, u64),
) -> Result<()> {
    let Request::Pinned { service, backend } = request else {
        bail!("not a drain's request");
    };
    let started = Instant::now();
    loop {
        let answer = control::send(instance, request)?;
        let remaining = still_holding(&answer, cookie_quiet)
            .with_context(|| format!("reading the agent's answer {answer:?}"))?;
        let waited = started.elapsed().as_secs();
        if remaining.is_empty() {
            println!("{service}/{backend} drained after {waited} s: no flows, sessions or cookie connections left");
            return Ok(());
        }
        let remaining = remaining.join(", ");
        if started.elapsed() >= timeout {
            bail!("{service}/{backend} still holds {remaining} after {waited} s");
        }
        println!("{waited:>4} s: {remaining}");
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// What an agent's `pinned` answer says still holds the backend, each as "<n> <what>".
fn still_holding(answer: &str, cookie_quiet: u64) -> Option<Vec<String>> {
    let fields: std::collections::HashMap<&str, &str> = answer
        .split_whitespace()
        .filter_map(|word| word.split_once('='))
        .collect();
    let count = |name: &str| fields.get(name)?.parse::<u64>().ok();
    let mut remaining = Vec::new();
    let flows = count("flows")?;
    if flows > 0 {
        remaining.push(format!("{flows} flows"));
    }
    let sessions = count("sessions")?;
    if sessions > 0 {
        remaining.push(format!("{sessions} source-ip sessions"));
    }
    match *fields.get("cookie_quiet_s")? {
        "never" => {}
        quiet => {
            let quiet: u64 = quiet.parse().ok()?;
            if quiet < cookie_quiet {
                remaining.push(format!("a cookie connection {quiet} s ago"));
            }
        }
    }
    Some(remaining)
}

fn execute_request(agent: &mut Agent, config_path: &Path, request: Request) -> Result<String> {
    match request {
        Request::Reload => agent.reload(config_path).map_err(|error| {
            error!("reload rejected, the running configuration stays in force: {error:#}");
            error.context("reload rejected, the running configuration stays in force")
        }),
        Request::Drain { service, backend } => agent.set_draining(&service, &backend, true),
        Request::Undrain { service, backend } => agent.set_draining(&service, &backend, false),
        Request::Status => agent.status(),
        Request::Counters => Ok(agent.counters()),
        Request::Metrics => agent.metrics().map(|s| metrics::encode_snapshot(&s)),
        Request::Top => agent
            .metrics()
            .map(|s| metrics::snapshot_json(&s).to_string()),
        Request::Pinned { service, backend } => agent.pinned(&service, &backend),
        Request::GroupWeight {
            service,
            group,
            weight,
        } => agent.set_group_weight(&service, &group, weight),
        Request::Sessions {
            service,
            backend,
            limit,
        } => agent.sessions(&service, backend.as_deref(), limit),
        Request::Stop { .. } => bail!("stop is answered by the serve loop"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pinned_answer_reads_as_what_still_holds_the_backend() {
        let held = still_holding("state=draining flows=2 sessions=1 cookie_quiet_s=5", 60);
        assert_eq!(
            held,
            Some(vec![
                "2 flows".to_owned(),
                "1 source-ip sessions".to_owned(),
                "a cookie connection 5 s ago".to_owned(),
            ])
        );
        let quiet = "state=draining flows=0 sessions=0 cookie_quiet_s=61";
        assert_eq!(still_holding(quiet, 60), Some(vec![]));
        let never = "state=down flows=0 sessions=0 cookie_quiet_s=never";
        assert_eq!(still_holding(never, 60), Some(vec![]));
        assert_eq!(still_holding("state=up flows=x", 60), None);
    }
}
