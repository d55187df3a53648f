//! Session ids in the URL (`affinity = "url-param"`): a request whose query string or path
//! parameter carries `sessionID` goes to the backend the value hashes to, on every new
//! connection; a request without it is placed by the fallback (a new connection's flow).
//! Python clients, the backend read from each answer's `x-backend`. Needs root.

mod common;

use std::collections::{HashMap, HashSet};

use balancer_lab::{Lab, ServiceOptions, BACKEND_COUNT, VIP};
use common::*;

const URL_PORT: u16 = 8083;

fn url_service() -> String {
    let mut toml = format!(
        "[[service]]\nname = \"web-url\"\nvip = \"{VIP}\"\nport = {URL_PORT}\nprotocol = \"tcp\"\n\
         affinity = \"url-param\"\nparam = \"sessionID\"\n"
    );
    for index in 0..BACKEND_COUNT {
        toml += &format!(
            "  [[service.backend]]\n  name = \"{}\"\n  address = \"{}\"\n  port = 80\n",
            Lab::backend_name(index),
            Lab::backend_addr(index)
        );
    }
    toml
}

/// Each line of `paths` requested `times` times, each on a new connection; prints the path
/// and the backend of each answer.
const REQUESTS: &str = r#"
import http.client, sys
vip, port, times = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for path in sys.argv[4].split():
    for _ in range(times):
        c = http.client.HTTPConnection(vip, port, timeout=10)
        c.request("GET", path, headers={"Connection": "close"})
        r = c.getresponse()
        r.read()
        print(path, r.getheader("x-backend"))
        c.close()
"#;

fn backends_by_path(lab: &Lab, paths: &[String], times: usize) -> HashMap<String, Vec<String>> {
    let (vip, port, times) = (VIP.to_string(), URL_PORT.to_string(), times.to_string());
    let paths = paths.join(" ");
    let mut seen: HashMap<String, Vec<String>> = HashMap::new();
    let output = run(
        lab,
        lab.client_ns(),
        &["python3", "-c", REQUESTS, &vip, &port, &times, &paths],
    );
    for line in output.lines() {
        let (path, backend) = line.split_once(' ').expect("path backend");
        seen.entry(path.to_owned())
            .or_default()
            .push(backend.to_owned());
    }
    seen
}

#[test]
fn sessions_named_in_the_query_or_a_path_parameter_stick_and_others_follow_the_fallback() {
    let lab = lab_with(&ServiceOptions {
        extra_tables: url_service(),
        ..ServiceOptions::default()
    });
    // 100 sessions, half naming theirs in the query string, half as a path parameter; each
    // sends four requests on four connections.
    let paths: Vec<String> = (0..100)
        .map(|i| match i % 2 {
            0 => format!("/?sessionID=s{i}&page=1"),
            _ => format!("/cart;sessionID=s{i}"),
        })
        .collect();
    let seen = backends_by_path(&lab, &paths, 4);
    assert_eq!(seen.len(), 100, "every session answered");
    let mut used = HashSet::new();
    for (path, backends) in &seen {
        assert_eq!(backends.len(), 4, "{path}");
        assert!(
            backends.iter().all(|b| *b == backends[0]),
            "{path} moved: {backends:?}"
        );
        used.insert(backends[0].clone());
    }
    assert_eq!(
        used.len(),
        BACKEND_COUNT,
        "sessions over every backend: {used:?}"
    );
    // The same id in either place is one session.
    let same = backends_by_path(
        &lab,
        &["/a;sessionID=s7".into(), "/?sessionID=s7".into()],
        2,
    );
    assert_eq!(same["/a;sessionID=s7"][0], seen["/cart;sessionID=s7"][0]);
    assert_eq!(same["/?sessionID=s7"][0], seen["/cart;sessionID=s7"][0]);
    // Without it, each new connection is placed by its flow: 30 requests of one path spread.
    let without = backends_by_path(&lab, &["/?page=1".into()], 30);
    let spread: HashSet<&String> = without["/?page=1"].iter().collect();
    assert!(
        spread.len() > 1,
        "requests without a session id all went to {spread:?}"
    );
    let status = balancer(&lab, &["status"]);
    assert!(
        status.contains("affinity=url-param param=sessionID"),
        "{status}"
    );
}
