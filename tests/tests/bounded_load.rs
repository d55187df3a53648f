//! Bounded-load placement (`balance_factor`), by the agent on an lb-cookie service whose new
//! sessions are placed by client address and by XDP on a `source-ip` service: a workload
//! whose addresses send 60% of the sessions to one backend shows that skew without the
//! bound; with `balance_factor = 125` no backend holds more than 1.25 × the average of the
//! held connections (plus one), and sessions already placed keep their backend while it is
//! at the bound. Python clients on their own addresses. Needs root.

mod common;

use std::{collections::HashMap, time::Duration};

use balancer_lab::{Lab, ServiceOptions, BACKEND_COUNT, VIP};
use common::*;

const SETTINGS: &str = "affinity = \"lb-cookie\"\ncookie_fallback = \"source-ip\"\n";

/// Opens one keep-alive connection per source address of its arguments, in order, each with
/// one request without a cookie, and holds them all open; then sends each session's request
/// once more on a connection of its own, with its balancer cookie if the answer set one.
/// Prints `backend replayed-backend` a session.
const HELD: &str = r#"
import http.client, sys
vip = sys.argv[1]
held = []
for source in sys.argv[2:]:
    c = http.client.HTTPConnection(vip, 80, timeout=10, source_address=(source, 0))
    c.request("GET", "/")
    r = c.getresponse()
    r.read()
    cookie = next((v.split(";")[0] for n, v in r.getheaders() if n.lower() == "set-cookie" and v.startswith("LBSESSION=")), None)
    held.append((c, r.getheader("x-backend"), cookie, source))
for _, backend, cookie, source in held:
    c = http.client.HTTPConnection(vip, 80, timeout=10, source_address=(source, 0))
    headers = {"Connection": "close"}
    if cookie:
        headers["Cookie"] = cookie
    c.request("GET", "/", headers=headers)
    r = c.getresponse()
    r.read()
    print(backend, r.getheader("x-backend"))
    c.close()
for c, _, _, _ in held:
    c.close()
"#;

/// The backend of each session of `sources`, checking that every one kept it when its
/// cookie came back while all were held.
fn held_sessions(lab: &Lab, sources: &[String]) -> Vec<String> {
    let vip = VIP.to_string();
    let mut argv = vec!["python3", "-c", HELD, &vip];
    argv.extend(sources.iter().map(String::as_str));
    let output = run(lab, lab.client_ns(), &argv);
    let sessions: Vec<(String, String)> = output
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(a, b)| (a.to_owned(), b.to_owned()))
        .collect();
    assert_eq!(sessions.len(), sources.len());
    for (placed, replayed) in &sessions {
        assert_eq!(
            placed, replayed,
            "a placed session moved while its backend was loaded"
        );
    }
    sessions.into_iter().map(|(placed, _)| placed).collect()
}

/// 60 sessions from the addresses of `by_address` (address, the backend its new sessions go
/// to): 36 from addresses that go to backend-1 and 12 from each other's, arriving mixed
/// (three for backend-1, then one for each other, over again); `reuse` lets an address
/// open several.
fn skewed_workload(by_address: &[(String, String)], reuse: bool) -> Vec<String> {
    let mut from: Vec<Box<dyn Iterator<Item = String>>> = (0..BACKEND_COUNT)
        .map(|index| {
            let backend = Lab::backend_name(index);
            let here: Vec<String> = by_address
                .iter()
                .filter(|(_, b)| *b == backend)
                .map(|(a, _)| a.clone())
                .collect();
            assert!(!here.is_empty(), "no address goes to {backend}");
            let here = here.into_iter();
            let iter: Box<dyn Iterator<Item = String>> = if reuse {
                Box::new(here.cycle())
            } else {
                Box::new(here)
            };
            iter
        })
        .collect();
    let pattern = [0, 0, 0, 1, 2];
    (0..60)
        .map(|i| {
            from[pattern[i % pattern.len()]]
                .next()
                .expect("enough addresses")
        })
        .collect()
}

/// 1.25 × the average number of `workload`'s sessions per backend, rounded up, plus one.
fn bound_of(workload: &[String]) -> usize {
    (1.25 * workload.len() as f64 / BACKEND_COUNT as f64).ceil() as usize + 1
}

/// Gives the lab's `web` service (of `affinity`) `balance_factor = 125` by a reload.
fn reload_with_factor(lab: &Lab, affinity: &str) {
    let config = config_path(lab);
    let text = std::fs::read_to_string(&config).expect("reading the config");
    let line = format!("affinity = \"{affinity}\"");
    let with_factor = text.replacen(&line, &format!("{line}\nbalance_factor = 125"), 1);
    std::fs::write(&config, with_factor).expect("writing the config");
    balancer(lab, &["reload"]);
}

fn counts(backends: &[String]) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for backend in backends {
        *counts.entry(backend.clone()).or_insert(0) += 1;
    }
    counts
}

/// Waits for the held connections of a run to be closed in XDP's eyes.
fn no_active_flows(lab: &Lab) {
    wait_until(
        Duration::from_secs(10),
        "the held connections closed",
        || (0..BACKEND_COUNT).all(|i| status_of(lab, &Lab::backend_name(i)).ends_with("flows=0")),
    );
}

#[test]
fn a_balance_factor_bounds_each_backends_connections_and_placed_sessions_stay() {
    let lab = lab_with(&ServiceOptions {
        web_settings: SETTINGS.to_owned(),
        ..ServiceOptions::default()
    });
    // Where each address's new sessions go: one connection from each.
    let addresses = add_clients(&lab, 60, 30);
    let sources: Vec<String> = addresses.iter().map(|a| a.to_string()).collect();
    let by_address: Vec<(String, String)> = sources
        .iter()
        .map(|source| {
            let body = get(&lab, &["--interface", source], "/");
            (source.clone(), body)
        })
        .collect();
    let workload = skewed_workload(&by_address, true);
    let bound = bound_of(&workload);

    // Without the bound, the skew shows.
    let unbounded = counts(&held_sessions(&lab, &workload));
    assert_eq!(unbounded.get("backend-1"), Some(&36), "{unbounded:?}");
    no_active_flows(&lab);

    // With it, no backend goes past 1.25 × the average (plus one).
    reload_with_factor(&lab, "lb-cookie");
    let status = balancer(&lab, &["status"]);
    assert!(
        status.contains("affinity=lb-cookie balance_factor=125"),
        "{status}"
    );
    let bounded = counts(&held_sessions(&lab, &workload));
    println!("held connections per backend: without the bound {unbounded:?}, with it {bounded:?}");
    assert_eq!(bounded.values().sum::<usize>(), workload.len());
    assert!(
        bounded.values().all(|&n| n <= bound),
        "a backend above {bound} held connections: {bounded:?} (without the bound {unbounded:?})"
    );
    // The loaded backend still takes more than an even share, up to the bound.
    assert!(
        bounded.get("backend-1").is_some_and(|&n| n > 20),
        "{bounded:?}"
    );
}

/// Waits until no `web` backend holds a live session or an active flow.
fn nothing_held(lab: &Lab) {
    wait_until(Duration::from_secs(15), "sessions and flows gone", || {
        (0..BACKEND_COUNT).all(|i| {
            let line = status_of(lab, &Lab::backend_name(i));
            line.contains("sessions=0") && line.ends_with("flows=0")
        })
    });
}

#[test]
fn a_balance_factor_bounds_xdps_new_source_ip_sessions_and_placed_ones_stay() {
    let lab = lab_with(&ServiceOptions {
        web_settings: "affinity = \"source-ip\"\naffinity_timeout = 2\n".to_owned(),
        ..ServiceOptions::default()
    });
    // Where each address's session goes, from 150 addresses; the sessions then expire.
    let sources: Vec<String> = add_clients(&lab, 61, 150)
        .iter()
        .map(|a| a.to_string())
        .collect();
    let by_address: Vec<(String, String)> = sources
        .iter()
        .map(|source| (source.clone(), get(&lab, &["--interface", source], "/")))
        .collect();
    // Each session from an address of its own.
    let workload = skewed_workload(&by_address, false);
    let bound = bound_of(&workload);
    nothing_held(&lab);

    let unbounded = counts(&held_sessions(&lab, &workload));
    assert_eq!(unbounded.get("backend-1"), Some(&36), "{unbounded:?}");
    nothing_held(&lab);

    reload_with_factor(&lab, "source-ip");
    let bounded = counts(&held_sessions(&lab, &workload));
    println!("held sessions per backend: without the bound {unbounded:?}, with it {bounded:?}");
    assert!(
        bounded.values().all(|&n| n <= bound),
        "a backend above {bound} held sessions: {bounded:?}"
    );
    assert!(
        bounded.get("backend-1").is_some_and(|&n| n > 20),
        "{bounded:?}"
    );
}
