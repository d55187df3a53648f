//! What the agent tells its operators' tools: the Prometheus endpoint, scraped by a real
//! Prometheus (Debian's) that the test starts in the balancer's namespace with a 1 s scrape
//! interval and queries through its HTTP API as a dashboard would; JSON logs for log
//! collectors. Needs root.

mod common;

use std::{collections::HashMap, time::Duration};

use balancer_lab::{Lab, Launch, ServiceOptions, BACKEND_COUNT, LB_COOKIE_PORT};
use common::*;

const METRICS: &str = "metrics = \"127.0.0.1:9469\"\n";
const PROMETHEUS: &str = "127.0.0.1:9090";

#[test]
fn a_real_prometheus_sees_each_backends_connections_the_cookies_issued_and_health() {
    let mut lab = lab_with_settings(
        &format!("{METRICS}binding_capacity = 5000\n"),
        &ServiceOptions {
            web_settings: "affinity = \"lb-cookie\"\n\
                [service.health_check]\nkind = \"http\"\ninterval = 0.5\ntimeout = 0.5\n\
                fall = 2\nrise = 2\n"
                .to_owned(),
            ..ServiceOptions::default()
        },
    );
    start_prometheus(&mut lab);
    wait_until(
        Duration::from_secs(30),
        "Prometheus scraping the agent",
        || query(&lab, "up{job=\"balancer\"}", "job").get("balancer") == Some(&1.0),
    );
    let bound = "balancer_backend_connections_bound_total{service=\"web\"}";
    let issued_per_backend = "balancer_backend_cookies_issued_total{service=\"web\"}";
    let issued_per_backend_before = query(&lab, issued_per_backend, "backend");
    let issued = "balancer_cookies_issued_total";
    let bound_before = query(&lab, bound, "backend");
    let outcomes = "balancer_bindings_total{service=\"web\"}";
    let outcomes_before = query(&lab, outcomes, "outcome");
    let issued_now = |lab: &Lab| query(lab, issued, "job").get("balancer").copied();
    let issued_before = issued_now(&lab).expect("the cookies issued, scraped");
    let latencies = "balancer_binding_latency_seconds_count";
    let latencies_before = query(&lab, latencies, "job")["balancer"];
    let by_xdp = "balancer_xdp_packets_total{reason=\"bound_by_xdp\"}";
    let by_xdp_now = |lab: &Lab| {
        query(lab, by_xdp, "reason")
            .get("bound_by_xdp")
            .copied()
            .unwrap_or(0.0)
    };
    let by_xdp_before = by_xdp_now(&lab);

    // New sessions, one connection each: every answer sets the balancer's cookie, and the
    // test counts which backend gave it.
    let connections = 30;
    let script = format!(
        r#"
import http.client
for _ in range({connections}):
    c = http.client.HTTPConnection("{vip}", 80, timeout=10)
    c.request("GET", "/", headers={{"Connection": "close"}})
    r = c.getresponse()
    assert "LBSESSION=" in (r.getheader("Set-Cookie") or ""), r.getheaders()
    print(r.read().decode().strip())
    c.close()
"#,
        vip = balancer_lab::VIP
    );
    let mut sent: HashMap<String, f64> = HashMap::new();
    for backend in python(&lab, lab.client_ns(), &script).lines() {
        *sent.entry(backend.to_owned()).or_default() += 1.0;
    }
    assert_eq!(sent.values().sum::<f64>(), connections as f64);
    wait_until(
        Duration::from_secs(10),
        "Prometheus scraping the cookies issued",
        || issued_now(&lab) == Some(issued_before + connections as f64),
    );
    // The scrape that saw the cookies saw the bindings too: the agent and XDP count both
    // before the client has its answer. Each session was started by the agent
    // (`by_fallback`) or, once XDP had the cookie lines of its backend, by XDP.
    let bound_after = query(&lab, bound, "backend");
    let outcomes_after = query(&lab, outcomes, "outcome");
    let started_by_xdp = by_xdp_now(&lab) - by_xdp_before;
    assert!(
        started_by_xdp > 0.0,
        "XDP started none of {connections} sessions"
    );
    for (outcome, expected) in [
        ("by_fallback", connections as f64 - started_by_xdp),
        ("with_cookie", 0.0),
        ("failed", 0.0),
    ] {
        let count = |values: &HashMap<String, f64>| values.get(outcome).copied().unwrap_or(0.0);
        assert_eq!(
            count(&outcomes_after) - count(&outcomes_before),
            expected,
            "web's bindings {outcome}: {outcomes_before:?} then {outcomes_after:?}"
        );
    }
    let issued_per_backend_after = query(&lab, issued_per_backend, "backend");
    assert_eq!(
        query(&lab, latencies, "job")["balancer"] - latencies_before,
        connections as f64 - started_by_xdp,
        "one binding latency per connection the agent bound"
    );
    let checks = query(
        &lab,
        "balancer_health_check_latency_seconds_count{service=\"web\"}",
        "backend",
    );
    for index in 0..BACKEND_COUNT {
        let name = Lab::backend_name(index);
        assert!(
            checks.get(&name).is_some_and(|n| *n > 0.0),
            "{name}'s checks timed: {checks:?}"
        );
    }
    for index in 0..BACKEND_COUNT {
        let name = Lab::backend_name(index);
        let before = bound_before.get(&name).copied().unwrap_or(0.0);
        assert_eq!(
            bound_after.get(&name).copied().unwrap_or(0.0) - before,
            sent.get(&name).copied().unwrap_or(0.0),
            "{name}: connections bound, as Prometheus saw them ({bound_after:?}), against what the test was answered ({sent:?})"
        );
        let count = |values: &HashMap<String, f64>| values.get(&name).copied().unwrap_or(0.0);
        assert_eq!(
            count(&issued_per_backend_after) - count(&issued_per_backend_before),
            sent.get(&name).copied().unwrap_or(0.0),
            "{name}: cookies issued, as Prometheus saw them ({issued_per_backend_after:?}), against the answers ({sent:?})"
        );
    }
    // Every record XDP punted (or copied for the agent with a replay it sent, but for the
    // connections it bound itself, or with a client's acknowledgement of the cookie lines),
    // the agent read; each table reports its capacity.
    let handed = "balancer_xdp_packets_total{reason=~\"punted|replayed_by_xdp|head_delivered|bound_by_xdp\"}";
    let read = "balancer_punts_read_total";
    wait_until(Duration::from_secs(10), "every punt read", || {
        let handed = query(&lab, handed, "reason");
        let count = |reason: &str| handed.get(reason).copied().unwrap_or(0.0);
        let total = count("punted") + count("replayed_by_xdp") + count("head_delivered")
            - count("bound_by_xdp");
        handed.contains_key("punted")
            && Some(total) == query(&lab, read, "job").get("balancer").copied()
    });
    let capacities = query(&lab, "balancer_table_capacity", "table");
    let expected: HashMap<String, f64> = [
        ("flows", f64::from(1u32 << 20)),
        ("affinity", f64::from(1u32 << 20)),
        ("bindings", 5000.0),
    ]
    .into_iter()
    .map(|(table, capacity)| (table.to_owned(), capacity))
    .collect();
    assert_eq!(capacities, expected);
    let flow_entries = query(&lab, "balancer_table_entries{table=\"flows\"}", "table")["flows"];
    assert!(
        flow_entries >= 1.0,
        "the spliced connections' flows are in the table"
    );

    // A tampered cookie counts as absent, once, under its service and reason.
    let tampered = "balancer_cookies_rejected_total{service=\"web\",reason=\"bad_signature\"}";
    let rejected_now = |lab: &Lab| query(lab, tampered, "reason").get("bad_signature").copied();
    let rejected_before = rejected_now(&lab).expect("the rejections, scraped");
    let genuine = std::process::Command::new(balancer_bin())
        .args(["cookie", "--config"])
        .arg(config_path(&lab))
        .args(["web", "backend-2"])
        .output()
        .expect("running balancer cookie");
    let genuine = String::from_utf8_lossy(&genuine.stdout).trim().to_owned();
    let (name, value) = genuine.split_once('=').expect("NAME=VALUE");
    // One character of the MAC flipped, as in the cookie tests.
    let mut forged: Vec<char> = value.chars().collect();
    let at = forged.len() - 3;
    forged[at] = if forged[at] == 'A' { 'B' } else { 'A' };
    let forged = format!("{name}={}", forged.into_iter().collect::<String>());
    get(&lab, &["-H", &format!("Cookie: {forged}")], "/");
    wait_until(
        Duration::from_secs(10),
        "Prometheus scraping the rejection",
        || rejected_now(&lab) == Some(rejected_before + 1.0),
    );

    // L4 flows (web-v6): each connection is a new flow, counted by XDP for the backend that
    // answered it, and that backend's replies are counted on their way back.
    let new_flows = "balancer_backend_new_flows_total{service=\"web-v6\"}";
    let replies = "balancer_backend_packets_total{service=\"web-v6\",direction=\"to_client\"}";
    let flows_before = query(&lab, new_flows, "backend");
    let replies_before = query(&lab, replies, "backend");
    let script = format!(
        r#"
import http.client
for _ in range({connections}):
    c = http.client.HTTPConnection("{vip}", 80, timeout=10)
    c.request("GET", "/", headers={{"Connection": "close"}})
    print(c.getresponse().read().decode().strip())
    c.close()
"#,
        vip = balancer_lab::VIP6
    );
    let mut placed: HashMap<String, f64> = HashMap::new();
    for backend in python(&lab, lab.client_ns(), &script).lines() {
        *placed.entry(backend.to_owned()).or_default() += 1.0;
    }
    let total = |values: &HashMap<String, f64>| values.values().sum::<f64>();
    wait_until(
        Duration::from_secs(10),
        "Prometheus scraping the new flows",
        || total(&query(&lab, new_flows, "backend")) == total(&flows_before) + connections as f64,
    );
    let flows_after = query(&lab, new_flows, "backend");
    let replies_after = query(&lab, replies, "backend");
    for index in 0..BACKEND_COUNT {
        let name = Lab::backend_name(index);
        let count = |values: &HashMap<String, f64>| values.get(&name).copied().unwrap_or(0.0);
        let answered = placed.get(&name).copied().unwrap_or(0.0);
        assert_eq!(
            count(&flows_after) - count(&flows_before),
            answered,
            "{name}: new flows, as Prometheus saw them ({flows_after:?}), against the answers ({placed:?})"
        );
        // At least a SYN-ACK and the answer per connection.
        assert!(
            count(&replies_after) - count(&replies_before) >= 2.0 * answered,
            "{name}: replies counted {replies_after:?} (before {replies_before:?}) for {answered} connections"
        );
    }

    let syn_cookies = query(
        &lab,
        "balancer_xdp_packets_total{reason=\"syn_cookie_sent\"}",
        "reason",
    );
    assert!(syn_cookies["syn_cookie_sent"] >= connections as f64);

    // A backend that stops answering its checks turns unhealthy in Prometheus, and healthy
    // again once it is back.
    let healthy = "balancer_backend_healthy{service=\"web\"}";
    assert_eq!(query(&lab, healthy, "backend")["backend-1"], 1.0);
    lab.stop_backend(0).expect("stopping backend-1");
    wait_until(
        Duration::from_secs(10),
        "backend-1 unhealthy in Prometheus",
        || query(&lab, healthy, "backend").get("backend-1") == Some(&0.0),
    );
    let states = query(&lab, healthy, "backend");
    assert_eq!(states.get("backend-2"), Some(&1.0), "{states:?}");
    lab.start_backend(backend_bin(), 0)
        .expect("starting backend-1 again");
    wait_until(
        Duration::from_secs(10),
        "backend-1 healthy in Prometheus",
        || query(&lab, healthy, "backend").get("backend-1") == Some(&1.0),
    );
}

/// Starts the lab's balancer on `config` with JSON logs.
fn start_with_json_logs(lab: &mut Lab, config: &str) {
    let path = config_path(lab);
    std::fs::write(&path, config).expect("writing the balancer config");
    let path = path.to_str().expect("utf-8 path").to_owned();
    lab.start_balancer_with(
        &balancer_bin(),
        &["--log-format", "json", "run", "--config", &path],
        Launch::Nsenter,
    )
    .expect("starting the balancer");
}

#[test]
fn json_logs_are_one_object_a_line_with_each_events_level_and_fields() {
    require_root();
    let mut lab = Lab::new().expect("building the lab");
    lab.start_backends(backend_bin())
        .expect("starting the backends");
    let config = config_path(&lab);
    let text = lab.balancer_config();
    start_with_json_logs(&mut lab, &text);
    // A reload of a bad file: refused, logged as an error naming the field.
    std::fs::write(
        &config,
        format!("{}\nbogus_setting = 1\n", lab.balancer_config()),
    )
    .expect("writing a bad config");
    let refused = std::process::Command::new(balancer_bin())
        .args(["reload", "--instance", lab.instance()])
        .output()
        .expect("running balancer reload");
    assert!(!refused.status.success(), "the bad reload is refused");
    let log = lab.balancer_log();
    let script = r#"
import json, sys
for line in open(sys.argv[1]):
    if line.startswith("{"):
        event = json.loads(line)
        print(event["level"], " ".join(event["fields"]["message"].split()))
"#;
    let mut events = String::new();
    wait_until(Duration::from_secs(5), "the refusal in the log", || {
        events = run(
            &lab,
            lab.balancer_ns(),
            &["python3", "-c", script, log.to_str().expect("utf-8")],
        );
        events
            .lines()
            .any(|l| l.starts_with("ERROR reload rejected") && l.contains("bogus_setting"))
    });
    assert!(
        events.lines().any(|l| l.starts_with("INFO ")),
        "the start's info events: {events}"
    );
}

/// The JSON log events whose message starts with `message`, as `(suppressed, line)`.
fn logged(lab: &Lab, message: &str) -> Vec<u64> {
    let script = r#"
import json, sys
for line in open(sys.argv[1]):
    if line.startswith("{"):
        fields = json.loads(line)["fields"]
        if fields["message"].startswith(sys.argv[2]):
            print(fields.get("suppressed", 0))
"#;
    let log = lab.balancer_log();
    run(
        lab,
        lab.balancer_ns(),
        &[
            "python3",
            "-c",
            script,
            log.to_str().expect("utf-8"),
            message,
        ],
    )
    .lines()
    .map(|n| n.parse().expect("a count"))
    .collect()
}

#[test]
fn a_flood_of_refused_connections_logs_five_warnings_a_window_and_counts_the_rest() {
    let mut lab = Lab::new().expect("building the lab");
    lab.start_backends(backend_bin())
        .expect("starting the backends");
    // The lb-cookie service's one backend is gone (and unchecked): every connection to it is
    // refused after its request head, with a warning.
    lab.stop_backend(0).expect("stopping backend-1");
    let options = ServiceOptions {
        lb_cookie_backend: Some(0),
        ..ServiceOptions::default()
    };
    let text = lab.balancer_config_with(&options);
    start_with_json_logs(&mut lab, &text);
    let refused = "no backend took the connection";
    let url = format!("http://{}:{}/", balancer_lab::VIP, LB_COOKIE_PORT);
    let connect = || {
        let output = lab
            .exec(lab.client_ns(), &["curl", "-s", "-m", "5", &url])
            .expect("running curl");
        assert!(!output.status.success(), "the connection is refused");
    };
    let flood = 40;
    for _ in 0..flood {
        connect();
    }
    let mut sent = flood;
    wait_until(Duration::from_secs(5), "every refusal counted", || {
        binding_count(&lab, "failed") == sent
    });
    assert_eq!(
        logged(&lab, refused),
        vec![0; 5],
        "five warnings in the window"
    );
    // After the window, the next refusal is logged with the count of those held back.
    wait_until(
        Duration::from_secs(20),
        "a warning after the window",
        || {
            connect();
            sent += 1;
            logged(&lab, refused).len() > 5
        },
    );
    let warnings = logged(&lab, refused);
    assert_eq!(warnings.len(), 6, "{warnings:?}");
    assert_eq!(
        warnings.len() as u64 + warnings.iter().sum::<u64>(),
        sent,
        "each refusal logged or counted as suppressed"
    );
    assert_eq!(binding_count(&lab, "failed"), sent);
}

#[test]
fn balancer_top_shows_each_backends_rates_in_a_terminal_and_quits_on_q() {
    let lab = lab_with(&ServiceOptions::default());
    // Traffic for the view: new connections to `web` for 10 s at most.
    let traffic = format!(
        r#"
import time, http.client
end = time.time() + 10
while time.time() < end:
    c = http.client.HTTPConnection("{vip}", 80, timeout=5)
    c.request("GET", "/", headers={{"Connection": "close"}})
    c.getresponse().read()
    c.close()
"#,
        vip = balancer_lab::VIP
    );
    let _traffic = Stopped(
        std::process::Command::new("ip")
            .args(["netns", "exec", lab.client_ns(), "python3", "-c", &traffic])
            .spawn()
            .expect("starting the traffic"),
    );
    // `script` gives `balancer top` a pseudo-terminal of 160 × 30 and records what it draws.
    let typescript = lab.dir().join("top.typescript");
    let command = format!(
        "stty cols 160 rows 30; exec {} top --instance {}",
        balancer_bin().display(),
        lab.instance()
    );
    let mut top = Stopped(
        std::process::Command::new("script")
            .args(["-q", "-f", "-e", "-c", &command])
            .arg(&typescript)
            .env("TERM", "xterm-256color")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("starting balancer top under script"),
    );
    // The screen as a terminal shows it: pyte replays the recording.
    let screen = || {
        let script = r#"
import sys, pyte
screen = pyte.Screen(160, 30)
stream = pyte.ByteStream(screen)
stream.feed(open(sys.argv[1], "rb").read())
print(chr(10).join(line.rstrip() for line in screen.display))
"#;
        run(
            &lab,
            lab.balancer_ns(),
            &["python3", "-c", script, typescript.to_str().expect("utf-8")],
        )
    };
    let mut shown = String::new();
    wait_until(
        Duration::from_secs(8),
        "every backend with new flows per second",
        || {
            shown = screen();
            (0..BACKEND_COUNT).all(|i| {
                shown.lines().any(|line| {
                    let cells: Vec<&str> = line
                        .split(|c: char| c == '│' || c.is_whitespace())
                        .filter(|c| !c.is_empty())
                        .collect();
                    // SERVICE BACKEND STATE HEALTH WEIGHT SESSIONS FLOWS NEW/s ...
                    cells.len() >= 12
                        && cells[0] == "web"
                        && cells[1] == Lab::backend_name(i)
                        && cells[3] == "ok"
                        && cells[7].parse::<f64>().is_ok_and(|rate| rate > 0.0)
                })
            }) && shown.lines().any(|line| {
                // The sources panel: SOURCE NEW-FLOWS/min NEW/s COUNT LATEST-SERVICE.
                let cells: Vec<&str> = line
                    .split(|c: char| c == '│' || c.is_whitespace())
                    .filter(|c| !c.is_empty())
                    .collect();
                cells.len() == 5
                    && cells[0] == balancer_lab::CLIENT_ADDR.to_string()
                    && cells[1].parse::<u64>().is_ok_and(|flows| flows > 0)
                    && cells[2].parse::<f64>().is_ok_and(|rate| rate > 0.0)
                    && cells[3] == "exact"
                    && cells[4] == "web"
            })
        },
    );
    assert!(shown.contains("q quits"), "{shown}");
    std::io::Write::write_all(top.0.stdin.as_mut().expect("top's terminal"), b"q")
        .expect("typing q");
    let mut status = None;
    wait_until(Duration::from_secs(5), "top quitting on q", || {
        status = top.0.try_wait().expect("waiting for top");
        status.is_some()
    });
    let status = status.expect("top's exit");
    assert!(status.success(), "top exited with {status}:\n{shown}");
    // With --nocapture: the screen the README's image is drawn from.
    println!("{shown}");
}

#[test]
fn the_sources_opening_the_most_new_flows_are_counted_exactly_by_l4_and_cookie_flows() {
    let lab = lab_with(&ServiceOptions {
        cookie_service: true,
        ..ServiceOptions::default()
    });
    let clients = add_clients(&lab, 77, 3);
    let lost = |lab: &Lab| counters(lab)["new_flow_source_lost"];
    let lost_before = lost(&lab);
    // Each client opens its own number of connections: to `web` (XDP places them) or to
    // `web-cookie` (the agent binds them).
    let plan = [
        (clients[0], balancer_lab::HTTP_PORT, 30, "web"),
        (clients[1], balancer_lab::COOKIE_PORT, 12, "web-cookie"),
        (clients[2], balancer_lab::HTTP_PORT, 5, "web"),
    ];
    for (client, port, connections, _) in plan {
        let script = format!(
            r#"
import http.client
for _ in range({connections}):
    c = http.client.HTTPConnection("{vip}", {port}, timeout=10, source_address=("{client}", 0))
    c.request("GET", "/", headers={{"Connection": "close"}})
    assert c.getresponse().status == 200
    c.close()
"#,
            vip = balancer_lab::VIP
        );
        python(&lab, lab.client_ns(), &script);
    }
    let expected: Vec<(String, u64, String)> = plan
        .iter()
        .map(|(client, _, n, service)| (client.to_string(), *n, (*service).to_owned()))
        .collect();
    let mut shown = Vec::new();
    wait_until(
        Duration::from_secs(5),
        "the agent's top sources to hold every connection",
        || {
            let status: serde_json::Value =
                serde_json::from_str(&balancer(&lab, &["status", "--json"]))
                    .expect("status --json is JSON");
            let top = status["top_sources"]
                .as_array()
                .expect("top_sources")
                .clone();
            shown = top
                .iter()
                .filter(|s| expected.iter().any(|(c, _, _)| s["source"] == c.as_str()))
                .map(|s| {
                    assert_eq!(s["overcount"], 0, "{s}");
                    (
                        s["source"].as_str().expect("source").to_owned(),
                        s["new_flows_last_minute"].as_u64().expect("count"),
                        s["service"].as_str().expect("service").to_owned(),
                    )
                })
                .collect();
            shown == expected
        },
    );
    assert_eq!(lost(&lab), lost_before, "no new flow missed the tally");
    let stats: serde_json::Value =
        serde_json::from_str(&balancer(&lab, &["stats", "--json"])).expect("stats --json is JSON");
    assert_eq!(
        stats["xdp"]["new_flow_source_lost"]["packets"].as_u64(),
        Some(lost_before),
        "{stats}"
    );
    assert!(
        stats["agent"]["bound"].as_u64() >= Some(12),
        "the agent's counters: {stats}"
    );
}

/// A process the test started, stopped (by its PID) when the test ends, passed or not.
struct Stopped(std::process::Child);

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts Prometheus in the balancer's namespace, scraping the agent every second.
fn start_prometheus(lab: &mut Lab) {
    let dir = lab.dir().join("prometheus");
    std::fs::create_dir_all(&dir).expect("creating Prometheus's directory");
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
         scrape_configs:\n  - job_name: balancer\n    static_configs:\n\
         \x20     - targets: [\"127.0.0.1:9469\"]\n",
    )
    .expect("writing prometheus.yml");
    let args = [
        "prometheus".to_owned(),
        format!("--config.file={}", config.display()),
        format!("--storage.tsdb.path={}", dir.join("data").display()),
        format!("--web.listen-address={PROMETHEUS}"),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let ns = lab.balancer_ns().to_owned();
    lab.spawn_logged(&ns, &args, &dir.join("prometheus.log"))
        .expect("starting Prometheus");
}

/// The current values of `expr` in Prometheus, by the value of each result's `label`.
fn query(lab: &Lab, expr: &str, label: &str) -> HashMap<String, f64> {
    let script = format!(
        r#"
import json, sys, urllib.parse, urllib.request
url = "http://{PROMETHEUS}/api/v1/query?" + urllib.parse.urlencode({{"query": sys.argv[1]}})
try:
    answer = json.load(urllib.request.urlopen(url, timeout=5))
except OSError:
    sys.exit(0)
for result in answer["data"]["result"]:
    print(result["metric"].get(sys.argv[2], ""), result["value"][1])
"#
    );
    let output = run(
        lab,
        lab.balancer_ns(),
        &["python3", "-c", &script, expr, label],
    );
    output
        .lines()
        .filter_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            Some((name.to_owned(), value.parse().ok()?))
        })
        .collect()
}
