//! Source-IP affinity, health checks, failover, draining and reload, with real clients from
//! many addresses through the namespace lab. Needs root.

mod common;

use std::{collections::HashMap, net::Ipv4Addr, time::Duration};

use balancer_lab::{Lab, ServiceOptions, BACKEND_COUNT};
use common::*;

/// Health checks every 0.5 s, 0.5 s timeout, down after 2 failures, up after 2 successes:
/// a dead backend is marked down within fall × interval + timeout = 1.5 s.
const CHECK_INTERVAL: f64 = 0.5;
const CHECK_TIMEOUT: f64 = 0.5;
const FALL: u32 = 2;
const DRAIN_TIMEOUT_S: u64 = 6;

fn sticky_options(prefix: u8) -> ServiceOptions {
    ServiceOptions {
        web_settings: format!(
            "affinity = \"source-ip\"\nsource_prefix = {prefix}\ndrain_timeout = {DRAIN_TIMEOUT_S}\n\
             [service.health_check]\nkind = \"http\"\ninterval = {CHECK_INTERVAL}\ntimeout = {CHECK_TIMEOUT}\nrise = 2\nfall = {FALL}\n"
        ),
        ..ServiceOptions::default()
    }
}

/// Each client's sticky backend, checked over `requests` new connections.
fn sticky_backends(lab: &Lab, clients: &[Ipv4Addr], requests: usize) -> HashMap<Ipv4Addr, String> {
    let seen = backends_seen(lab, clients, requests);
    assert_eq!(seen.len(), clients.len(), "every client got answers");
    seen.iter()
        .map(|(client, seen)| (*client, sticky_backend(seen, *client)))
        .collect()
}

fn clients_per_backend(sticky: &HashMap<Ipv4Addr, String>) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for backend in sticky.values() {
        *counts.entry(backend.clone()).or_default() += 1;
    }
    counts
}

#[test]
fn two_hundred_clients_stick_to_one_backend_each_and_spread_evenly() {
    let lab = lab_with(&sticky_options(32));
    let clients = add_clients(&lab, 1, 200);
    let sticky = sticky_backends(&lab, &clients, 10);
    let counts = clients_per_backend(&sticky);
    let share = clients.len() as f64 / BACKEND_COUNT as f64;
    for index in 0..BACKEND_COUNT {
        let name = Lab::backend_name(index);
        let got = counts.get(&name).copied().unwrap_or(0) as f64;
        assert!(
            (got - share).abs() <= share * 0.25,
            "{name} has {got} of 200 clients: {counts:?}"
        );
    }
    assert_eq!(
        counters(&lab)["new_session"],
        200,
        "one session per client address"
    );
}

#[test]
fn prefix_24_keeps_each_nat_pool_on_one_backend() {
    let lab = lab_with(&sticky_options(24));
    let mut pools = Vec::new();
    for third in 1..=12 {
        pools.push(add_clients(&lab, third, 5));
    }
    let all: Vec<Ipv4Addr> = pools.iter().flatten().copied().collect();
    let sticky = sticky_backends(&lab, &all, 3);
    for pool in &pools {
        let backend = &sticky[&pool[0]];
        assert!(
            pool.iter().all(|client| &sticky[client] == backend),
            "the /24 of {} is split: {:?}",
            pool[0],
            pool.iter().map(|c| &sticky[c]).collect::<Vec<_>>()
        );
    }
    assert_eq!(counters(&lab)["new_session"], 12, "one session per /24");
}

#[test]
fn failed_backend_is_marked_down_in_time_its_clients_move_and_stay_moved() {
    let mut lab = lab_with(&sticky_options(32));
    let clients = add_clients(&lab, 1, 60);
    let before = sticky_backends(&lab, &clients, 2);
    let victim = Lab::backend_name(0);
    let orphans: Vec<Ipv4Addr> = clients
        .iter()
        .copied()
        .filter(|c| before[c] == victim)
        .collect();
    assert!(
        !orphans.is_empty(),
        "some of 60 clients use {victim}: {before:?}"
    );

    lab.stop_backend(0).expect("stopping backend-1's server");
    let bound = Duration::from_secs_f64(f64::from(FALL) * CHECK_INTERVAL + CHECK_TIMEOUT);
    // The status is polled every 50 ms; allow half a second for polling and scheduling.
    let took = wait_until(
        bound + Duration::from_millis(500),
        "backend-1 marked down",
        || status_of(&lab, &victim).contains("state=down"),
    );
    println!("backend-1 marked down {took:?} after its server stopped (bound {bound:?})");

    let moved = sticky_backends(&lab, &orphans, 3);
    for (client, backend) in &moved {
        assert_ne!(backend, &victim, "{client} still reaches the dead backend");
    }
    let others: Vec<Ipv4Addr> = clients
        .iter()
        .copied()
        .filter(|c| before[c] != victim)
        .collect();
    let undisturbed = sticky_backends(&lab, &others, 1);
    assert!(
        others.iter().all(|c| undisturbed[c] == before[c]),
        "clients of healthy backends moved"
    );
    assert!(counters(&lab)["session_moved"] >= orphans.len() as u64);

    lab.start_backend(backend_bin(), 0)
        .expect("restarting backend-1's server");
    wait_until(Duration::from_secs(10), "backend-1 back up", || {
        status_of(&lab, &victim).contains("state=up")
    });
    let after = sticky_backends(&lab, &orphans, 3);
    assert_eq!(
        after, moved,
        "moved clients went back to the recovered backend"
    );
    let newcomers = add_clients(&lab, 2, 60);
    let fresh = sticky_backends(&lab, &newcomers, 1);
    assert!(
        fresh.values().any(|b| b == &victim),
        "no new client reaches the recovered backend"
    );
}

/// Starts a download of `size` bytes from `client` in the background, limited to 4 MB/s so it
/// outlasts what the test does meanwhile; its output goes to `<dir>/<name>.bin` and its
/// response headers to `<name>.headers`.
fn start_download(lab: &mut Lab, client: Ipv4Addr, size: u64, name: &str) {
    let out = lab.dir().join(format!("{name}.bin"));
    let headers = lab.dir().join(format!("{name}.headers"));
    let ns = lab.client_ns().to_owned();
    let url = vip_url(&format!("/bytes/{size}"));
    lab.spawn(
        &ns,
        &[
            "curl",
            "-sS",
            "--fail",
            "--max-time",
            "120",
            "--limit-rate",
            "4M",
            "--interface",
            &client.to_string(),
            "-D",
            headers.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            &url,
        ],
    )
    .expect("starting a download");
}

/// Waits for a download started by [`start_download`] and checks its bytes and backend.
fn finish_download(lab: &Lab, name: &str, size: u64, backend: &str) {
    let out = lab.dir().join(format!("{name}.bin"));
    let headers = lab.dir().join(format!("{name}.headers"));
    wait_until(
        Duration::from_secs(120),
        &format!("download {name} to end"),
        || curl_done(lab, &out),
    );
    let got = std::fs::metadata(&out).map(|m| m.len()).unwrap_or(0);
    assert_eq!(got, size, "download {name} was cut short");
    let header_text = std::fs::read_to_string(&headers)
        .unwrap_or_default()
        .to_ascii_lowercase();
    assert!(
        header_text.contains(&format!("x-backend: {backend}")),
        "download {name} came from elsewhere:\n{header_text}"
    );
    assert_eq!(
        sha256_of_file(&out),
        balancer_lab::test_data_sha256(size),
        "download {name} was corrupted"
    );
}

/// Whether no curl writes to `out` any more.
fn curl_done(lab: &Lab, out: &std::path::Path) -> bool {
    let target = out.to_string_lossy();
    !lab.pids().iter().any(|pid| {
        std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|c| String::from_utf8_lossy(&c).contains(target.as_ref()))
            .unwrap_or(false)
    })
}

/// A client address (from `198.18.<third>.0/24`) whose sticky backend is `backend`.
fn client_of(lab: &Lab, third: u8, backend: &str) -> Ipv4Addr {
    let clients = add_clients(lab, third, 30);
    let sticky = sticky_backends(lab, &clients, 1);
    *clients
        .iter()
        .find(|c| sticky[c] == backend)
        .unwrap_or_else(|| panic!("no client of {backend}: {sticky:?}"))
}

#[test]
fn draining_backend_finishes_its_download_keeps_sessions_until_the_timeout_then_lets_go() {
    let mut lab = lab_with(&sticky_options(32));
    let victim = Lab::backend_name(1);
    let downloader = client_of(&lab, 1, &victim);
    let regular = client_of(&lab, 2, &victim);
    // 15 s at 4 MB/s: it outlasts the drain timeout.
    let size = 60_000_000;
    start_download(&mut lab, downloader, size, "long");
    std::thread::sleep(Duration::from_millis(500));

    let answer = balancer(&lab, &["backend", "drain", "web", &victim]);
    assert!(answer.contains("draining"), "{answer}");
    let newcomers = add_clients(&lab, 3, 40);
    let fresh = sticky_backends(&lab, &newcomers, 1);
    assert!(
        fresh.values().all(|b| b != &victim),
        "a new client was sent to the draining backend: {fresh:?}"
    );
    let kept = sticky_backends(&lab, &[regular], 2);
    assert_eq!(
        kept[&regular], victim,
        "an existing session left before the drain timeout"
    );
    assert!(status_of(&lab, &victim).contains("state=draining"));

    std::thread::sleep(Duration::from_secs(DRAIN_TIMEOUT_S) + Duration::from_millis(500));
    let moved = sticky_backends(&lab, &[regular], 2);
    assert_ne!(
        moved[&regular], victim,
        "the session stayed past the drain timeout"
    );
    assert!(
        status_of(&lab, &victim).contains("(drained, flows continue)"),
        "{}",
        status_of(&lab, &victim)
    );

    finish_download(&lab, "long", size, &victim);
    wait_until(
        Duration::from_secs(5),
        "drained backend reported without flows",
        || status_of(&lab, &victim).contains("(drained, no flows left)"),
    );
}

#[test]
fn reload_that_removes_a_backend_does_not_interrupt_downloads_through_the_others() {
    let mut lab = lab_with(&sticky_options(32));
    let size = 24_000_000;
    let kept: Vec<String> = (1..BACKEND_COUNT).map(Lab::backend_name).collect();
    for (index, backend) in kept.iter().enumerate() {
        let client = client_of(&lab, 1 + index as u8, backend);
        start_download(&mut lab, client, size, backend);
    }
    std::thread::sleep(Duration::from_millis(500));

    let smaller = ServiceOptions {
        web_backend_count: None,
        ..sticky_options(32)
    };
    let config = lab.balancer_config_with(&smaller).replace(
        &format!(
            "  [[service.backend]]\n  name = \"{}\"\n  address = \"{}\"\n  port = 80\n",
            Lab::backend_name(0),
            Lab::backend_addr(0)
        ),
        "",
    );
    assert!(
        !config.contains("198.19.0.11\"\n  port = 80"),
        "backend-1 left the web service"
    );
    std::fs::write(config_path(&lab), config).expect("writing the new config");
    let answer = balancer(&lab, &["reload"]);
    assert!(answer.contains("reloaded"), "{answer}");

    let clients = add_clients(&lab, 9, 30);
    let sticky = sticky_backends(&lab, &clients, 1);
    assert!(
        sticky.values().all(|b| b != &Lab::backend_name(0)),
        "a client reached the removed backend"
    );
    for backend in &kept {
        finish_download(&lab, backend, size, backend);
    }
}

#[test]
fn rejected_reload_keeps_the_running_configuration() {
    let lab = lab_with(&sticky_options(32));
    std::fs::write(
        config_path(&lab),
        "instance = \"x\"\nclient_interface = 7\n",
    )
    .expect("writing a bad config");
    let output = std::process::Command::new(balancer_bin())
        .args(["reload", "--instance", lab.instance()])
        .output()
        .expect("running balancer reload");
    assert!(!output.status.success(), "a bad config was accepted");
    let error = String::from_utf8_lossy(&output.stderr);
    assert!(
        error.contains("client_interface"),
        "the error does not name the field: {error}"
    );
    let body = get(&lab, &[], "/");
    assert!(
        body.starts_with("backend-"),
        "the balancer stopped forwarding: {body:?}"
    );
}

#[test]
fn with_every_backend_down_new_connections_are_refused_with_a_reset() {
    let mut lab = lab_with(&sticky_options(32));
    for index in 0..BACKEND_COUNT {
        lab.stop_backend(index)
            .expect("stopping a backend's server");
    }
    for index in 0..BACKEND_COUNT {
        let name = Lab::backend_name(index);
        wait_until(
            Duration::from_secs(5),
            &format!("{name} marked down"),
            || status_of(&lab, &name).contains("state=down"),
        );
    }
    let output = lab
        .exec(
            lab.client_ns(),
            &["curl", "-sS", "--max-time", "5", &vip_url("/")],
        )
        .expect("running curl");
    let error = String::from_utf8_lossy(&output.stderr);
    // curl's exit 7 is "connection refused": the reset, not a time-out (exit 28).
    assert_eq!(
        output.status.code(),
        Some(7),
        "expected a refused connection: {error}"
    );
    assert!(counters(&lab)["refused_no_backend"] >= 1);
    let log = std::fs::read_to_string(lab.balancer_log()).unwrap_or_default();
    assert!(
        log.contains("no backend can take new connections"),
        "the log does not say so"
    );
}

#[test]
fn drain_wait_follows_source_ip_and_cookie_sessions_until_they_are_gone_or_the_timeout() {
    let lab = lab_with(&ServiceOptions {
        web_settings: "affinity = \"source-ip\"\naffinity_timeout = 3\ndrain_timeout = 60\n"
            .to_owned(),
        web6_settings: "affinity = \"lb-cookie\"\ndrain_timeout = 60\n".to_owned(),
        ..ServiceOptions::default()
    });
    let drain = |service: &str, backend: &str, limits: &[&str]| {
        let mut args = vec!["backend", "drain", service, backend, "--wait"];
        args.extend(limits);
        args.extend(["--instance", lab.instance()]);
        std::process::Command::new(balancer_bin())
            .args(&args)
            .output()
            .expect("running balancer backend drain")
    };
    let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();

    // source-ip: the client's session (3 s without a new flow) holds the backend, then goes.
    let backend = get(&lab, &[], "/").trim().to_owned();
    let waited = drain("web", &backend, &["--timeout", "20"]);
    let out = text(&waited.stdout);
    assert!(waited.status.success(), "{out}{}", text(&waited.stderr));
    assert!(
        out.lines().any(|l| l.contains("1 source-ip sessions")),
        "it waited for the session: {out}"
    );
    assert!(
        out.lines()
            .last()
            .is_some_and(|l| l.contains("drained after")),
        "{out}"
    );

    // lb-cookie: a client that keeps coming by its cookie holds the backend past the
    // timeout; once it stops, the drain completes.
    let url = vip6_url("/");
    let script = format!(
        r#"
import time, requests
s = requests.Session()
r = s.get("{url}", headers={{"Connection": "close"}}, timeout=10)
print(r.text.strip(), flush=True)
end = time.time() + 8
while time.time() < end:
    assert s.get("{url}", headers={{"Connection": "close"}}, timeout=10).text.strip() == r.text.strip()
    time.sleep(0.3)
"#
    );
    let (mut client, backend) = cookie_client(&lab, &script);
    let held = drain(
        "web-v6",
        &backend,
        &["--timeout", "4", "--cookie-quiet", "2"],
    );
    let err = text(&held.stderr);
    assert!(
        !held.status.success(),
        "the drain timed out: {}",
        text(&held.stdout)
    );
    assert!(err.contains("still holds a cookie connection"), "{err}");
    // Its 8 s of requests all stuck to the draining backend.
    assert!(client.wait().expect("the cookie client").success());
    let done = drain(
        "web-v6",
        &backend,
        &["--timeout", "20", "--cookie-quiet", "2"],
    );
    let out = text(&done.stdout);
    assert!(done.status.success(), "{out}{}", text(&done.stderr));
    assert!(
        out.lines()
            .last()
            .is_some_and(|l| l.contains("drained after")),
        "{out}"
    );
}

#[test]
fn sessions_show_each_clients_backend_spliced_connections_and_cookie_connections() {
    let lab = lab_with(&ServiceOptions {
        web_settings: "affinity = \"source-ip\"\naffinity_timeout = 60\n".to_owned(),
        web6_settings: "affinity = \"lb-cookie\"\n".to_owned(),
        ..ServiceOptions::default()
    });
    let sessions = |args: &[&str]| -> serde_json::Value {
        let mut all = vec!["sessions"];
        all.extend(args);
        all.push("--json");
        serde_json::from_str(&balancer(&lab, &all)).expect("balancer sessions --json")
    };

    // source-ip: five clients, each listed with the backend that answers it.
    let clients = add_clients(&lab, 7, 5);
    let seen = backends_seen(&lab, &clients, 2);
    let web = sessions(&["web"]);
    let listed: HashMap<String, String> = web["source_ip_sessions"]
        .as_array()
        .expect("sessions")
        .iter()
        .map(|s| {
            let text = |field: &str| s[field].as_str().expect("a string").to_owned();
            (text("client"), text("backend"))
        })
        .collect();
    for client in &clients {
        assert_eq!(
            listed.get(&client.to_string()),
            Some(&sticky_backend(&seen[client], client)),
            "{client}: {web}"
        );
    }
    let per_backend: u64 = web["backends"]
        .as_array()
        .expect("backends")
        .iter()
        .map(|b| b["source_ip_sessions"].as_u64().expect("a count"))
        .sum();
    assert_eq!(per_backend, listed.len() as u64, "{web}");
    let one = sessions(&[
        "web",
        "--backend",
        &listed[&clients[0].to_string()],
        "--limit",
        "0",
    ]);
    assert_eq!(one["backends"].as_array().map(Vec::len), Some(1), "{one}");
    assert_eq!(
        one["source_ip_sessions"].as_array().map(Vec::len),
        Some(0),
        "{one}"
    );

    // lb-cookie: one client keeps a connection open and comes back three times by its cookie.
    let url = vip6_url("/");
    let script = format!(
        r#"
import sys, http.client, requests
s = requests.Session()
first = s.get("{url}", headers={{"Connection": "close"}}, timeout=10).text.strip()
for _ in range(3):
    assert s.get("{url}", headers={{"Connection": "close"}}, timeout=10).text.strip() == first
held = http.client.HTTPConnection("{vip}", 80, timeout=10)
held.request("GET", "/", headers={{"Cookie": "; ".join(f"{{k}}={{v}}" for k, v in s.cookies.items())}})
assert held.getresponse().read().decode().strip() == first
print(first, flush=True)
sys.stdin.read()
"#,
        vip = balancer_lab::VIP6
    );
    let (mut client, backend) = cookie_client(&lab, &script);
    let web6 = sessions(&["web-v6"]);
    for entry in web6["backends"].as_array().expect("backends") {
        let (spliced, by_cookie) = if entry["backend"] == backend.as_str() {
            (1, 4)
        } else {
            (0, 0)
        };
        assert_eq!(entry["spliced_connections"], spliced, "{web6}");
        assert_eq!(entry["cookie_connections_last_minute"], by_cookie, "{web6}");
    }
    drop(client.stdin.take());
    assert!(client.wait().expect("the cookie client").success());
}

/// Starts a Python cookie client in the client namespace (its standard input piped, for a
/// client that waits on it) and returns it with the backend it printed first.
fn cookie_client(lab: &Lab, script: &str) -> (std::process::Child, String) {
    let mut client = std::process::Command::new("ip")
        .args(["netns", "exec", lab.client_ns(), "python3", "-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("starting the cookie client");
    let mut stdout = std::io::BufReader::new(client.stdout.take().expect("its output"));
    let mut backend = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut backend).expect("the client's backend");
    (client, backend.trim().to_owned())
}
