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
/// one request without a cookie, and holds them all open; then sends each session's cookie
/// once more on a connection of its own. Prints `backend replayed-backend` a session.
const HELD: &str = r#"
import http.client, sys
vip = sys.argv[1]
held = []
for source in sys.argv[2:]:
    c = http.client.HTTPConnection(vip, 80, timeout=10, source_address=(source, 0))
    c.request("GET", "/")
    r = c.getresponse()
    r.read()
    cookie = next(v for n, v in r.getheaders() if n.lower() == "set-cookie" and v.startswith("LBSESSION="))
    held.append((c, r.getheader("x-backend"), cookie.split(";")[0], source))
for _, backend, cookie, source in held:
    c = http.client.HTTPConnection(vip, 80, timeout=10, source_address=(source, 0))
    c.request("GET", "/", headers={"Cookie": cookie, "Connection": "close"})
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
    let of = |backend: &str| -> Vec<String> {
        by_address
            .iter()
            .filter(|(_, b)| b == backend)
            .map(|(a, _)| a.clone())
            .collect()
    };
    // 60 sessions, 36 of them from addresses that go to backend-1 and 12 from each other's,
    // arriving mixed: three for backend-1, then one for each of the others, over again.
    let mut from: Vec<std::iter::Cycle<std::vec::IntoIter<String>>> = (0..BACKEND_COUNT)
        .map(|index| {
            let here = of(&Lab::backend_name(index));
            assert!(
                !here.is_empty(),
                "no address of 30 goes to backend-{}",
                index + 1
            );
            here.into_iter().cycle()
        })
        .collect();
    let pattern = [0, 0, 0, 1, 2];
    let workload: Vec<String> = (0..60)
        .map(|i| from[pattern[i % pattern.len()]].next().expect("endless"))
        .collect();
    let bound = (1.25 * workload.len() as f64 / BACKEND_COUNT as f64).ceil() as usize + 1;

    // Without the bound, the skew shows.
    let unbounded = counts(&held_sessions(&lab, &workload));
    assert_eq!(unbounded.get("backend-1"), Some(&36), "{unbounded:?}");
    no_active_flows(&lab);

    // With it, no backend goes past 1.25 × the average (plus one).
    let config = config_path(&lab);
    let text = std::fs::read_to_string(&config).expect("reading the config");
    let bounded_config = text.replacen(
        "affinity = \"lb-cookie\"",
        "affinity = \"lb-cookie\"\nbalance_factor = 125",
        1,
    );
    std::fs::write(&config, bounded_config).expect("writing the config");
    balancer(&lab, &["reload"]);
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

/// [`HELD`] for a service without cookies: each source's second connection is its session's.
const HELD_L4: &str = r#"
import http.client, sys
vip = sys.argv[1]
held = []
for source in sys.argv[2:]:
    c = http.client.HTTPConnection(vip, 80, timeout=10, source_address=(source, 0))
    c.request("GET", "/")
    r = c.getresponse()
    r.read()
    held.append((c, r.getheader("x-backend"), source))
for _, backend, source in held:
    c = http.client.HTTPConnection(vip, 80, timeout=10, source_address=(source, 0))
    c.request("GET", "/", headers={"Connection": "close"})
    r = c.getresponse()
    r.read()
    print(backend, r.getheader("x-backend"))
    c.close()
for c, _, _ in held:
    c.close()
"#;

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
    let placed: Vec<String> = sources
        .iter()
        .map(|source| get(&lab, &["--interface", source], "/"))
        .collect();
    let of = |backend: String| -> Vec<String> {
        sources
            .iter()
            .zip(&placed)
            .filter(|(_, b)| **b == backend)
            .map(|(s, _)| s.clone())
            .collect()
    };
    // 60 sessions, each its own address: 36 that go to backend-1, 12 to each other, mixed.
    let mut from: Vec<std::vec::IntoIter<String>> = (0..BACKEND_COUNT)
        .map(|i| of(Lab::backend_name(i)).into_iter())
        .collect();
    let pattern = [0, 0, 0, 1, 2];
    let workload: Vec<String> = (0..60)
        .map(|i| {
            from[pattern[i % pattern.len()]]
                .next()
                .expect("enough addresses of 150")
        })
        .collect();
    let bound = (1.25 * workload.len() as f64 / BACKEND_COUNT as f64).ceil() as usize + 1;
    nothing_held(&lab);

    let vip = VIP.to_string();
    let held = |lab: &Lab| -> HashMap<String, usize> {
        let mut argv = vec!["python3", "-c", HELD_L4, &vip];
        argv.extend(workload.iter().map(String::as_str));
        let pairs: Vec<(String, String)> = run(lab, lab.client_ns(), &argv)
            .lines()
            .filter_map(|l| l.split_once(' '))
            .map(|(a, b)| (a.to_owned(), b.to_owned()))
            .collect();
        assert_eq!(pairs.len(), workload.len());
        for (first, second) in &pairs {
            assert_eq!(
                first, second,
                "a session's second connection went elsewhere"
            );
        }
        counts(&pairs.into_iter().map(|(b, _)| b).collect::<Vec<_>>())
    };
    let unbounded = held(&lab);
    assert_eq!(unbounded.get("backend-1"), Some(&36), "{unbounded:?}");
    nothing_held(&lab);

    let config = config_path(&lab);
    let text = std::fs::read_to_string(&config).expect("reading the config");
    let with_factor = text.replacen(
        "affinity = \"source-ip\"",
        "affinity = \"source-ip\"\nbalance_factor = 125",
        1,
    );
    std::fs::write(&config, with_factor).expect("writing the config");
    balancer(&lab, &["reload"]);
    let bounded = held(&lab);
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
