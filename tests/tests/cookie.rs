//! HTTP cookie affinity: XDP completes the handshake, the agent reads the request's cookie and
//! opens the backend side, XDP splices the connection. Real clients through the namespace lab.
//! Needs root.

mod common;

use std::collections::{HashMap, HashSet};

use balancer_lab::{Lab, ServiceOptions, BACKEND_COUNT};
use common::*;

fn cookie_options() -> ServiceOptions {
    ServiceOptions {
        web_settings: "affinity = \"app-cookie\"\ncookie = \"SID\"\ncookie_fallback = \"flow\"\n"
            .to_owned(),
        ..ServiceOptions::default()
    }
}

/// The backend that answers `GET /` with `Cookie: SID=<value>` on a new connection.
fn backend_for_cookie(lab: &Lab, value: &str) -> String {
    run(
        lab,
        lab.client_ns(),
        &[
            "curl",
            "-sS",
            "--fail",
            "--max-time",
            "10",
            "-H",
            &format!("Cookie: SID={value}"),
            &vip_url("/"),
        ],
    )
    .trim()
    .to_owned()
}

#[test]
fn requests_with_the_same_cookie_reach_the_same_backend_and_cookies_spread() {
    let lab = lab_with(&cookie_options());
    let mut by_cookie = HashMap::new();
    for session in 0..30 {
        let value = format!("session-{session}");
        let first = backend_for_cookie(&lab, &value);
        assert!(first.starts_with("backend-"), "answer {first:?}");
        for _ in 0..3 {
            assert_eq!(
                backend_for_cookie(&lab, &value),
                first,
                "cookie {value} moved"
            );
        }
        by_cookie.insert(value, first);
    }
    let used: HashSet<&String> = by_cookie.values().collect();
    assert_eq!(
        used.len(),
        BACKEND_COUNT,
        "30 sessions should use every backend: {by_cookie:?}"
    );
    let stats = counters(&lab);
    assert!(stats["syn_cookie_sent"] >= 120, "{stats:?}");
    assert!(stats["spliced_to_client"] > 0, "{stats:?}");
}
