//! The Prometheus endpoint (`metrics = "ADDR:PORT"` in the config): `GET /metrics` answers
//! with the OpenMetrics text of what the agent and its data plane count. Each scrape asks the
//! agent's loop for a [`Snapshot`] through the control channel, so the numbers are the ones
//! `balancer status` and `balancer stats` show.

use std::{net::SocketAddr, time::Duration};

use anyhow::{Context, Result};
use balancer_common::Reason;
use prometheus_client::{
    encoding::text::encode,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{exponential_buckets, Histogram},
    },
    registry::{Registry, Unit},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::{mpsc, oneshot},
};
use tracing::info;

use crate::{
    control::{Command, Request},
    stats,
    throttle::throttled,
};

/// The most a scrape's request head may take, and how long it may take to arrive.
const MAX_REQUEST_HEAD: usize = 8192;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// What one scrape reports, gathered by the agent.
#[derive(Default)]
pub struct Snapshot {
    /// The XDP program's counters by exit reason.
    pub xdp: stats::Snapshot,
    /// Cookie connections bound to a backend, by service and how it was chosen, and binding
    /// failures.
    pub bindings: Vec<(String, &'static str, u64)>,
    /// Cookie connections the agent reset, by why.
    pub resets: Vec<(&'static str, u64)>,
    pub cookies_issued: u64,
    /// Balancer cookies that counted as absent, by service and why.
    pub cookies_rejected: Vec<(String, &'static str, u64)>,
    /// What the agent sent again: edited response heads, replayed requests.
    pub resent: Vec<(&'static str, u64)>,
    pub syn_cookie_rotations: u64,
    /// Each group's weight: (service, group, weight).
    pub groups: Vec<(String, String, u32)>,
    /// The flow, affinity and binding tables' fill.
    pub tables: Vec<Table>,
    /// Punt ring records the agent read.
    pub punts_read: u64,
    pub backends: Vec<BackendSnapshot>,
    /// From a client's first segment the agent sees to its connection spliced, in seconds.
    pub binding_latency: Option<Histogram>,
    pub check_latency: Option<CheckLatencies>,
    /// The sources that opened the most new flows over the last minute, most first (for
    /// `balancer top` and the JSON; as labels they would be unbounded).
    pub top_sources: Vec<SourceSnapshot>,
}

/// A table of [`Snapshot::tables`]: how many entries it holds and may hold.
pub struct Table {
    pub name: &'static str,
    pub entries: u64,
    pub capacity: u64,
}

/// A client source of [`Snapshot::top_sources`].
pub struct SourceSnapshot {
    pub source: std::net::IpAddr,
    /// The service of its latest new flow.
    pub service: String,
    /// New flows over the last minute, high by at most `overcount` (when the tally had more
    /// sources than room).
    pub new_flows: u64,
    pub overcount: u64,
    /// New flows per second over the last few seconds.
    pub rate: f64,
}

/// One backend of one service.
pub struct BackendSnapshot {
    pub service: String,
    pub backend: String,
    /// The health checks' verdict (always true without checks).
    pub healthy: bool,
    /// `up`, `draining` or `down`, as the data plane sees it.
    pub state: &'static str,
    pub weight: u32,
    /// Its group, when the service has groups.
    pub group: Option<String>,
    /// `source-ip` clients whose affinity names the backend.
    pub sessions: u64,
    /// Flows with a packet in the last minute.
    pub active_flows: u64,
    /// Cookie connections the agent bound to it.
    pub bound: u64,
    /// Its responses the agent gave the balancer's cookie.
    pub cookies_issued: u64,
    /// What XDP forwarded to it and back, and the new flows it placed there.
    pub xdp: balancer_common::BackendCounters,
}

type Labels = Vec<(&'static str, String)>;

/// Health check latencies by service and backend, kept by the agent across scrapes.
pub type CheckLatencies = Family<Labels, Histogram, fn() -> Histogram>;

/// A histogram of binding latencies: 50 µs to about 0.8 s, doubling.
pub fn binding_latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.000_05, 2.0, 15))
}

/// A histogram of health check latencies: 0.5 ms to about 4 s, doubling.
pub fn check_latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.000_5, 2.0, 14))
}

/// The family the health checkers' histograms come from.
pub fn check_latencies() -> CheckLatencies {
    Family::new_with_constructor(check_latency_histogram)
}

/// The labels of one backend of one service.
pub fn backend_labels(service: &str, backend: &str) -> Labels {
    vec![
        ("service", service.to_owned()),
        ("backend", backend.to_owned()),
    ]
}

/// The snapshot as OpenMetrics text (HELP, TYPE and, where it has one, UNIT for each family).
pub fn encode_snapshot(snapshot: &Snapshot) -> String {
    let mut registry = Registry::with_prefix("balancer");
    let by = |label: &'static str, values: &[(&'static str, u64)]| {
        let family = Family::<Labels, Counter>::default();
        for (name, value) in values {
            family
                .get_or_create(&vec![(label, (*name).to_owned())])
                .inc_by(*value);
        }
        family
    };
    let by_service = |label: &'static str, values: &[(String, &'static str, u64)]| {
        let family = Family::<Labels, Counter>::default();
        for (service, name, value) in values {
            family
                .get_or_create(&vec![
                    ("service", service.clone()),
                    (label, (*name).to_owned()),
                ])
                .inc_by(*value);
        }
        family
    };
    let xdp = |field: fn(&balancer_common::Counter) -> u64| {
        let family = Family::<Labels, Counter>::default();
        for reason in Reason::ALL {
            let value = field(&snapshot.xdp.get(reason));
            family
                .get_or_create(&vec![("reason", reason.name().to_owned())])
                .inc_by(value);
        }
        family
    };
    registry.register(
        "xdp_packets",
        "Packets the XDP program handled, by the reason it gave (events such as new_flow count in addition to the packet's exit)",
        xdp(|c| c.packets),
    );
    registry.register_with_unit(
        "xdp",
        "Bytes of the packets the XDP program handled, by reason",
        Unit::Bytes,
        xdp(|c| c.bytes),
    );
    registry.register(
        "bindings",
        "Cookie service connections the agent bound to a backend (by a cookie or by the fallback), retried elsewhere, or failed to bind, by service and outcome",
        by_service("outcome", &snapshot.bindings),
    );
    registry.register(
        "connections_reset",
        "Cookie service connections the agent reset, by why",
        by("reason", &snapshot.resets),
    );
    let issued = Counter::<u64>::default();
    issued.inc_by(snapshot.cookies_issued);
    registry.register(
        "cookies_issued",
        "Responses the agent gave the balancer's cookie",
        issued,
    );
    registry.register(
        "cookies_rejected",
        "Balancer cookies that counted as absent (the connection was placed as without one), by service and why",
        by_service("reason", &snapshot.cookies_rejected),
    );
    registry.register(
        "resent",
        "What the agent sent again for lack of an acknowledgement: edited response heads, replayed requests",
        by("what", &snapshot.resent),
    );
    let rotations = Counter::<u64>::default();
    rotations.inc_by(snapshot.syn_cookie_rotations);
    registry.register(
        "syn_cookie_rotations",
        "Rotations of the SYN cookies' secret",
        rotations,
    );
    let punts_read = Counter::<u64>::default();
    punts_read.inc_by(snapshot.punts_read);
    registry.register(
        "punts_read",
        "Records the agent read from the punt ring (XDP counts those it wrote in xdp_packets_total{reason=\"punted\"}, those the full ring refused as drop_punt_ring_full)",
        punts_read,
    );
    let (entries, capacity) = (
        Family::<Labels, Gauge>::default(),
        Family::<Labels, Gauge>::default(),
    );
    for table in &snapshot.tables {
        let label = vec![("table", table.name.to_owned())];
        entries.get_or_create(&label).set(table.entries as i64);
        capacity.get_or_create(&label).set(table.capacity as i64);
    }
    registry.register(
        "table_entries",
        "Entries in a table: flows (XDP's per-flow state, closing and idle ones included until the LRU reclaims them), affinity (source-ip sessions, expired ones included), bindings (cookie connections the agent is binding)",
        entries,
    );
    registry.register(
        "table_capacity",
        "The most entries a table holds (flow_capacity, affinity_capacity, binding_capacity); a full LRU table evicts its least recent entry",
        capacity,
    );

    let per_backend = || Family::<Labels, Gauge>::default();
    let (up, serving, weight, sessions, flows) = (
        per_backend(),
        per_backend(),
        per_backend(),
        per_backend(),
        per_backend(),
    );
    let bound = Family::<Labels, Counter>::default();
    let issued_here = Family::<Labels, Counter>::default();
    let (packets, bytes, new_flows) = (
        Family::<Labels, Counter>::default(),
        Family::<Labels, Counter>::default(),
        Family::<Labels, Counter>::default(),
    );
    for b in &snapshot.backends {
        let labels = vec![
            ("service", b.service.clone()),
            ("backend", b.backend.clone()),
        ];
        new_flows.get_or_create(&labels).inc_by(b.xdp.new_flows);
        issued_here.get_or_create(&labels).inc_by(b.cookies_issued);
        for (direction, counter) in [
            ("to_backend", b.xdp.to_backend),
            ("to_client", b.xdp.to_client),
        ] {
            let mut labels = labels.clone();
            labels.push(("direction", direction.to_owned()));
            packets.get_or_create(&labels).inc_by(counter.packets);
            bytes.get_or_create(&labels).inc_by(counter.bytes);
        }
        up.get_or_create(&labels).set(i64::from(b.healthy));
        weight.get_or_create(&labels).set(i64::from(b.weight));
        sessions.get_or_create(&labels).set(b.sessions as i64);
        flows.get_or_create(&labels).set(b.active_flows as i64);
        bound.get_or_create(&labels).inc_by(b.bound);
        for state in ["up", "draining", "down"] {
            let mut labels = labels.clone();
            labels.push(("state", state.to_owned()));
            serving
                .get_or_create(&labels)
                .set(i64::from(b.state == state));
        }
    }
    registry.register(
        "backend_healthy",
        "1 while the backend passes its health checks (always, without checks)",
        up,
    );
    registry.register(
        "backend_state",
        "1 for the state the data plane gives the backend: up, draining (its sessions stay, new ones go elsewhere) or down",
        serving,
    );
    registry.register("backend_weight", "The backend's configured weight", weight);
    let group_weights = Family::<Labels, Gauge>::default();
    for (service, group, weight) in &snapshot.groups {
        group_weights
            .get_or_create(&vec![
                ("service", service.clone()),
                ("group", group.clone()),
            ])
            .set(i64::from(*weight));
    }
    registry.register(
        "group_weight",
        "A group's share of its service's new sessions, as the configuration or balancer group weight set it",
        group_weights,
    );
    registry.register(
        "backend_sessions",
        "source-ip clients whose affinity names the backend",
        sessions,
    );
    registry.register(
        "backend_active_flows",
        "Flows to the backend with a packet in the last minute",
        flows,
    );
    registry.register(
        "backend_packets",
        "Packets XDP forwarded to the backend (to_backend) and from it back to clients (to_client)",
        packets,
    );
    registry.register_with_unit(
        "backend",
        "Bytes of the packets XDP forwarded to the backend and back from it, by direction",
        Unit::Bytes,
        bytes,
    );
    registry.register(
        "backend_new_flows",
        "New flows XDP placed on the backend (a cookie service's connections are bound by the agent instead)",
        new_flows,
    );
    registry.register(
        "backend_cookies_issued",
        "The backend's responses the agent gave the balancer's cookie (a session started or renewed there)",
        issued_here,
    );
    registry.register(
        "backend_connections_bound",
        "Cookie service connections the agent bound to the backend",
        bound,
    );
    if let Some(histogram) = &snapshot.binding_latency {
        registry.register_with_unit(
            "binding_latency",
            "Cookie service connections from the first segment the agent saw to the connection spliced to its backend",
            Unit::Seconds,
            histogram.clone(),
        );
    }
    if let Some(family) = &snapshot.check_latency {
        registry.register_with_unit(
            "health_check_latency",
            "Health checks from their start to their verdict (an answer, an error or the timeout), by service and backend",
            Unit::Seconds,
            family.clone(),
        );
    }
    let mut text = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut text, &registry);
    text
}

/// The snapshot as JSON, for `balancer top` and `balancer status --json`: totals of XDP's
/// exits by kind, the agent's table, each backend with its counters, the top sources by new
/// flows and every XDP counter.
pub fn snapshot_json(snapshot: &Snapshot) -> serde_json::Value {
    let total = |prefixes: &[&str]| -> u64 {
        Reason::ALL
            .iter()
            .filter(|r| prefixes.iter().any(|p| r.name().starts_with(p)))
            .map(|r| snapshot.xdp.get(*r).packets)
            .sum()
    };
    let backends: Vec<serde_json::Value> = snapshot
        .backends
        .iter()
        .map(|b| {
            serde_json::json!({
                "service": b.service,
                "backend": b.backend,
                "healthy": b.healthy,
                "state": b.state,
                "weight": b.weight,
                "group": b.group,
                "sessions": b.sessions,
                "active_flows": b.active_flows,
                "bound": b.bound,
                "new_flows": b.xdp.new_flows,
                "to_backend_packets": b.xdp.to_backend.packets,
                "to_backend_bytes": b.xdp.to_backend.bytes,
                "to_client_packets": b.xdp.to_client.packets,
                "to_client_bytes": b.xdp.to_client.bytes,
            })
        })
        .collect();
    serde_json::json!({
        "forwarded": total(&["forwarded", "replied", "spliced_"]),
        "dropped": total(&["drop_"]),
        "refused": total(&["refused_", "reset_"]),
        "passed": total(&["pass_"]),
        "cookies_issued": snapshot.cookies_issued,
        "tables": snapshot.tables.iter().map(|t| (t.name.to_owned(), serde_json::json!({
            "entries": t.entries,
            "capacity": t.capacity,
        }))).collect::<serde_json::Map<_, _>>(),
        "backends": backends,
        "groups": snapshot.groups.iter().map(|(service, group, weight)| serde_json::json!({
            "service": service,
            "group": group,
            "weight": weight,
        })).collect::<Vec<_>>(),
        "top_sources": snapshot.top_sources.iter().map(|s| serde_json::json!({
            "source": s.source.to_string(),
            "service": s.service,
            "new_flows_last_minute": s.new_flows,
            "overcount": s.overcount,
            "new_flows_per_second": s.rate,
        })).collect::<Vec<_>>(),
        "xdp": snapshot.xdp.json(),
    })
}

/// Listens on `address` and answers each scrape with a snapshot asked of the agent through
/// `commands`. Binding happens here, so a taken or foreign address fails the start.
pub fn serve(address: SocketAddr, commands: mpsc::Sender<Command>) -> Result<()> {
    let listener = std::net::TcpListener::bind(address)
        .with_context(|| format!("listening for Prometheus on {address} (metrics)"))?;
    listener.set_nonblocking(true)?;
    let listener = TcpListener::from_std(listener)?;
    info!(%address, "Prometheus metrics at http://{address}/metrics");
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    tokio::spawn(answer(stream, commands.clone()));
                }
                Err(error) => throttled!(warn, "metrics endpoint: {error}"),
            }
        }
    });
    Ok(())
}

async fn answer(mut stream: TcpStream, commands: mpsc::Sender<Command>) {
    let response = match tokio::time::timeout(REQUEST_TIMEOUT, request_path(&mut stream)).await {
        Ok(Some(path)) if path == "/metrics" => match snapshot_text(&commands).await {
            Ok(text) => http(
                "200 OK",
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                &text,
            ),
            Err(error) => http(
                "503 Service Unavailable",
                "text/plain",
                &format!("{error}\n"),
            ),
        },
        Ok(Some(_)) => http("404 Not Found", "text/plain", "metrics are at /metrics\n"),
        _ => http("400 Bad Request", "text/plain", "expected GET /metrics\n"),
    };
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// The path of a `GET` request head, read up to its end (bounded in size).
async fn request_path(stream: &mut TcpStream) -> Option<String> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf).await.ok()?;
        if n == 0 || head.len() + n > MAX_REQUEST_HEAD {
            return None;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = std::str::from_utf8(&head).ok()?.lines().next()?;
    let mut words = line.split_whitespace();
    (words.next()? == "GET").then_some(())?;
    let target = words.next()?;
    Some(target.split('?').next().unwrap_or(target).to_owned())
}

async fn snapshot_text(commands: &mpsc::Sender<Command>) -> Result<String, String> {
    let (reply, answer) = oneshot::channel();
    let (_written_tx, written) = oneshot::channel();
    commands
        .send(Command {
            request: Request::Metrics,
            reply,
            written,
        })
        .await
        .map_err(|_| "the agent is shutting down".to_owned())?;
    answer
        .await
        .unwrap_or_else(|_| Err("the agent dropped the request".to_owned()))
}

fn http(status: &str, content_type: &str, body: &str) -> String {
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A snapshot with something in every family.
    fn example() -> Snapshot {
        let mut snapshot = Snapshot {
            bindings: vec![
                ("web".into(), "with_cookie", 7),
                ("web".into(), "failed", 1),
            ],
            cookies_issued: 5,
            cookies_rejected: vec![("web".into(), "bad_signature", 2)],
            resets: vec![("client_budget", 1)],
            resent: vec![("request", 1)],
            tables: vec![Table {
                name: "flows",
                entries: 3,
                capacity: 1024,
            }],
            punts_read: 12,
            groups: vec![("web".into(), "blue".into(), 90)],
            binding_latency: Some(binding_latency_histogram()),
            check_latency: Some(check_latencies()),
            backends: vec![BackendSnapshot {
                service: "web".into(),
                backend: "web-1".into(),
                healthy: true,
                state: "draining",
                weight: 3,
                group: Some("blue".into()),
                sessions: 4,
                active_flows: 9,
                bound: 7,
                cookies_issued: 5,
                xdp: balancer_common::BackendCounters {
                    new_flows: 2,
                    ..Default::default()
                },
            }],
            ..Snapshot::default()
        };
        snapshot.xdp.0[Reason::Forwarded as usize].packets = 11;
        snapshot.xdp.0[Reason::Forwarded as usize].bytes = 1100;
        if let Some(histogram) = &snapshot.binding_latency {
            histogram.observe(0.000_2);
        }
        if let Some(family) = &snapshot.check_latency {
            family
                .get_or_create(&backend_labels("web", "web-1"))
                .observe(0.003);
        }
        snapshot
    }

    fn parse(text: &str) -> prometheus_parse::Scrape {
        let lines = text.lines().map(|l| Ok(l.to_owned()));
        prometheus_parse::Scrape::parse(lines).expect("Prometheus text")
    }

    #[test]
    fn the_text_parses_and_every_family_has_help_and_a_type() {
        let text = encode_snapshot(&example());
        let scrape = parse(&text);
        let value = |name: &str, label: (&str, &str)| {
            scrape
                .samples
                .iter()
                .find(|s| s.metric == name && s.labels.get(label.0) == Some(label.1))
                .map(|s| match s.value {
                    prometheus_parse::Value::Counter(v)
                    | prometheus_parse::Value::Gauge(v)
                    | prometheus_parse::Value::Untyped(v) => v,
                    _ => f64::NAN,
                })
        };
        assert_eq!(
            value("balancer_xdp_packets_total", ("reason", "forwarded")),
            Some(11.0)
        );
        assert_eq!(
            value("balancer_xdp_bytes_total", ("reason", "forwarded")),
            Some(1100.0)
        );
        assert_eq!(
            value("balancer_bindings_total", ("outcome", "with_cookie")),
            Some(7.0)
        );
        assert_eq!(
            value("balancer_group_weight", ("group", "blue")),
            Some(90.0)
        );
        assert_eq!(
            value("balancer_backend_state", ("state", "draining")),
            Some(1.0)
        );
        assert_eq!(value("balancer_backend_state", ("state", "up")), Some(0.0));
        assert_eq!(
            value(
                "balancer_backend_connections_bound_total",
                ("backend", "web-1")
            ),
            Some(7.0)
        );
        assert_eq!(
            value("balancer_backend_new_flows_total", ("backend", "web-1")),
            Some(2.0)
        );
        assert_eq!(
            value("balancer_backend_bytes_total", ("direction", "to_client")),
            Some(0.0)
        );
        // Every sample's family is described by both a HELP and a TYPE line.
        let described = |kind: &str, family: &str| {
            text.lines()
                .any(|l| l.starts_with(&format!("# {kind} {family} ")))
        };
        for sample in &scrape.samples {
            let family = ["_total", "_sum", "_count", "_bucket"]
                .iter()
                .fold(sample.metric.as_str(), |name, suffix| {
                    name.strip_suffix(suffix).unwrap_or(name)
                });
            assert!(described("HELP", family), "HELP for {}", sample.metric);
            assert!(described("TYPE", family), "TYPE for {}", sample.metric);
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn every_expression_of_the_grafana_dashboard_names_a_metric_the_agent_serves() {
        let dashboard: serde_json::Value =
            serde_json::from_str(include_str!("../../grafana/balancer-dashboard.json"))
                .expect("the dashboard is JSON");
        let served: std::collections::HashSet<String> = parse(&encode_snapshot(&example()))
            .samples
            .into_iter()
            .map(|s| s.metric)
            .collect();
        let mut expressions: Vec<&str> = dashboard["panels"]
            .as_array()
            .expect("panels")
            .iter()
            .flat_map(|panel| panel["targets"].as_array().expect("targets"))
            .map(|target| target["expr"].as_str().expect("an expression"))
            .collect();
        expressions.extend(
            dashboard["templating"]["list"]
                .as_array()
                .expect("variables")
                .iter()
                .filter(|variable| variable["type"] == "query")
                .filter_map(|variable| variable["query"].as_str()),
        );
        let mut checked = 0;
        for expression in &expressions {
            let mut rest = *expression;
            while let Some(at) = rest.find("balancer_") {
                let name: String = rest[at..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                assert!(
                    served.contains(&name),
                    "{name} in {expression:?} is not served"
                );
                checked += 1;
                rest = &rest[at + name.len()..];
            }
        }
        assert!(
            checked >= expressions.len(),
            "every expression names a metric"
        );
    }
}
