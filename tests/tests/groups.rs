//! Groups of backends on an lb-cookie service (blue/green, canary): new sessions split by the
//! groups' weights, a session stays in its group for `group_stickiness` whatever the weights
//! do and moves within it when its backend fails, and a group of weight 0 takes no new
//! session. Python sessions, each a cookie jar of one; curl from addresses of their own for
//! the source-ip sessions XDP keeps in their groups. Needs root.

mod common;

use std::{collections::HashMap, net::Ipv4Addr, time::Duration};

use balancer_lab::{Lab, ServiceOptions, VIP};
use common::*;

const CANARY_PORT: u16 = 8090;
/// Long enough for the phases before the test waits it out, on a slow machine too.
const STICKINESS_S: u32 = 15;

/// The lab's backend `index` as a backend of a group.
fn group_backend(index: usize) -> String {
    format!(
        "    [[service.group.backend]]\n    name = \"{}\"\n    address = \"{}\"\n    port = 80\n",
        Lab::backend_name(index),
        Lab::backend_addr(index)
    )
}

/// A service `canary` with group `blue` (backend-1, backend-2) at weight 90 and `green`
/// (backend-3) at 10.
fn canary() -> String {
    format!(
        "[[service]]\nname = \"canary\"\nvip = \"{VIP}\"\nport = {CANARY_PORT}\nprotocol = \"tcp\"\n\
         affinity = \"lb-cookie\"\ngroup_stickiness = {STICKINESS_S}\n\
         [[service.group]]\n  name = \"blue\"\n  weight = 90\n{}{}\
         [[service.group]]\n  name = \"green\"\n  weight = 10\n{}",
        group_backend(0),
        group_backend(1),
        group_backend(2)
    )
}

/// Sessions through the canary VIP, one connection each: `new N` opens N new ones, `replay`
/// sends each cookie of a file again; both print one `backend cookie` line a session (its
/// cookie as the answer set it, or as it was). `wait-out` returns once every cookie's time in
/// its group is over.
const SESSIONS: &str = r#"
import base64, http.client, struct, sys, time
vip, port, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]

def request(cookie):
    c = http.client.HTTPConnection(vip, port, timeout=10)
    headers = {"Connection": "close"}
    if cookie:
        headers["Cookie"] = "LBSESSION=" + cookie
    c.request("GET", "/", headers=headers)
    r = c.getresponse()
    backend = r.read().decode().strip()
    for name, value in r.getheaders():
        if name.lower() == "set-cookie" and value.startswith("LBSESSION="):
            cookie = value.split(";")[0].split("=", 1)[1]
    c.close()
    return backend, cookie

if mode == "new":
    for _ in range(int(sys.argv[4])):
        print(*request(None))
elif mode == "replay":
    for line in open(sys.argv[4]):
        print(*request(line.split()[1]))
elif mode == "wait-out":
    until = 0
    for line in open(sys.argv[4]):
        value = line.split()[1]
        raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
        until = max(until, struct.unpack(">I", raw[14:18])[0])
    while time.time() < until + 1.5:
        time.sleep(0.1)
"#;

/// Runs [`SESSIONS`] from the client, with the files of sessions it reads.
#[derive(Default)]
struct Sessions {
    files: usize,
}

impl Sessions {
    fn run(&mut self, lab: &Lab, args: &[&str]) -> Vec<(String, String)> {
        let port = CANARY_PORT.to_string();
        let vip = VIP.to_string();
        let mut argv = vec!["python3", "-c", SESSIONS, &vip, &port];
        argv.extend_from_slice(args);
        run(lab, lab.client_ns(), &argv)
            .lines()
            .map(|line| {
                let (backend, cookie) = line.split_once(' ').expect("backend cookie");
                (backend.to_owned(), cookie.to_owned())
            })
            .collect()
    }

    fn new_sessions(&mut self, lab: &Lab, count: usize) -> Vec<(String, String)> {
        let sessions = self.run(lab, &["new", &count.to_string()]);
        assert_eq!(sessions.len(), count);
        assert!(
            sessions.iter().all(|(_, cookie)| cookie != "None"),
            "every answer sets a cookie"
        );
        sessions
    }

    /// Saves `sessions` and sends each one's cookie again.
    fn replay(&mut self, lab: &Lab, sessions: &[(String, String)]) -> Vec<(String, String)> {
        let path = self.save(lab, sessions);
        let replayed = self.run(lab, &["replay", &path]);
        assert_eq!(replayed.len(), sessions.len());
        replayed
    }

    fn save(&mut self, lab: &Lab, sessions: &[(String, String)]) -> String {
        self.files += 1;
        let path = lab.dir().join(format!("sessions-{}", self.files));
        let text: String = sessions.iter().map(|(b, c)| format!("{b} {c}\n")).collect();
        std::fs::write(&path, text).expect("writing the sessions");
        path.to_str().expect("utf-8 path").to_owned()
    }
}

fn green(backend: &str) -> bool {
    backend == Lab::backend_name(2)
}

fn greens(sessions: &[(String, String)]) -> usize {
    sessions.iter().filter(|(b, _)| green(b)).count()
}

/// Whether `count` of `n` is within four standard deviations of a binomial share `p`.
fn binomial(count: usize, n: usize, p: f64) -> bool {
    let mean = n as f64 * p;
    let spread = 4.0 * (n as f64 * p * (1.0 - p)).sqrt();
    (count as f64 - mean).abs() <= spread
}

fn set_weight(lab: &Lab, group: &str, weight: u32) {
    balancer(
        lab,
        &["group", "weight", "canary", group, &weight.to_string()],
    );
}

#[test]
fn blue_green_sessions_split_by_weight_stay_in_their_group_and_follow_new_weights_after_it() {
    let mut lab = lab_with(&ServiceOptions {
        extra_tables: canary(),
        ..ServiceOptions::default()
    });
    let status = balancer(&lab, &["status"]);
    assert!(
        status.contains("group blue weight=90") && status.contains("group green weight=10"),
        "{status}"
    );
    let mut sessions = Sessions::default();

    // 90/10: about a tenth of new sessions in green.
    let first = sessions.new_sessions(&lab, 300);
    let first_green = greens(&first);
    assert!(
        binomial(first_green, 300, 0.1),
        "{first_green} of 300 in green at 90/10"
    );

    // 50/50: every existing session stays where it was; new ones split evenly.
    set_weight(&lab, "blue", 50);
    set_weight(&lab, "green", 50);
    let status: serde_json::Value =
        serde_json::from_str(&balancer(&lab, &["status", "--json"])).expect("JSON");
    let weights: Vec<(String, u64)> = status["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .filter(|g| g["service"] == "canary")
        .map(|g| {
            (
                g["group"].as_str().unwrap_or("").to_owned(),
                g["weight"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    assert_eq!(weights, [("blue".to_owned(), 50), ("green".to_owned(), 50)]);
    let backend_3 = status["backends"]
        .as_array()
        .expect("backends")
        .iter()
        .find(|b| b["service"] == "canary" && b["backend"] == "backend-3")
        .expect("backend-3 of canary");
    assert_eq!(backend_3["group"], "green");
    let replayed = sessions.replay(&lab, &first);
    let moved: Vec<_> = first
        .iter()
        .zip(&replayed)
        .filter(|(before, after)| before.0 != after.0)
        .collect();
    assert!(
        moved.is_empty(),
        "sessions moved when the weights changed: {moved:?}"
    );
    let second = sessions.new_sessions(&lab, 300);
    let second_green = greens(&second);
    assert!(
        binomial(second_green, 300, 0.5),
        "{second_green} of 300 in green at 50/50"
    );

    // backend-1 fails: its sessions move within blue, to backend-2, none to green.
    lab.stop_backend(0).expect("stopping backend-1");
    let on_first: Vec<(String, String)> = first
        .iter()
        .filter(|(b, _)| *b == Lab::backend_name(0))
        .cloned()
        .collect();
    assert!(!on_first.is_empty());
    let failed_over = sessions.replay(&lab, &on_first);
    let elsewhere: Vec<_> = failed_over
        .iter()
        .filter(|(b, _)| *b != Lab::backend_name(1))
        .collect();
    assert!(
        elsewhere.is_empty(),
        "left blue when its backend failed: {elsewhere:?}"
    );
    lab.start_backend(backend_bin(), 0)
        .expect("starting backend-1 again");

    // Once their time in the group is over, the first sessions follow the weights of now,
    // and those that stay in their group stay on their backend.
    let mut first = first;
    let failed_over: HashMap<&str, &str> = on_first
        .iter()
        .zip(&failed_over)
        .map(|(before, after)| (before.1.as_str(), after.1.as_str()))
        .collect();
    for session in &mut first {
        if let Some(cookie) = failed_over.get(session.1.as_str()) {
            *session = (Lab::backend_name(1), (*cookie).to_owned());
        }
    }
    let path = sessions.save(&lab, &first);
    sessions.run(&lab, &["wait-out", &path]);
    let regrouped = sessions.replay(&lab, &first);
    let regrouped_green = greens(&regrouped);
    assert!(
        binomial(regrouped_green, 300, 0.5),
        "{regrouped_green} of 300 in green after their stickiness, at 50/50"
    );
    let unsettled: Vec<_> = first
        .iter()
        .zip(&regrouped)
        .filter(|(before, after)| green(&before.0) == green(&after.0) && before.0 != after.0)
        .collect();
    assert!(
        unsettled.is_empty(),
        "moved within their group: {unsettled:?}"
    );

    // Blue at 0: no new session there.
    set_weight(&lab, "blue", 0);
    let third = sessions.new_sessions(&lab, 100);
    assert_eq!(greens(&third), 100, "new sessions with blue at weight 0");
}

/// A `source-ip` service `canary` with groups `blue` (backend-1, backend-2) and `green`
/// (backend-3) at 50 each, health-checked so XDP learns of a stopped backend.
fn source_ip_canary() -> String {
    format!(
        "[[service]]\nname = \"canary\"\nvip = \"{VIP}\"\nport = {CANARY_PORT}\nprotocol = \"tcp\"\n\
         affinity = \"source-ip\"\naffinity_timeout = 600\ngroup_stickiness = {STICKINESS_S}\n\
         [service.health_check]\nkind = \"http\"\ninterval = 0.5\ntimeout = 0.5\nfall = 2\nrise = 2\n\
         [[service.group]]\n  name = \"blue\"\n  weight = 50\n{}{}\
         [[service.group]]\n  name = \"green\"\n  weight = 50\n{}",
        group_backend(0),
        group_backend(1),
        group_backend(2)
    )
}

/// The backend of one new connection through the canary VIP from each of `sources`.
fn source_ip_backends(lab: &Lab, sources: &[Ipv4Addr]) -> Vec<String> {
    sources
        .iter()
        .map(|source| {
            let url = format!("http://{VIP}:{CANARY_PORT}/");
            get_at(lab, &url, &["--interface", &source.to_string()])
        })
        .collect()
}

/// The canary's source-ip sessions as `balancer sessions --json` lists them: client, group
/// and seconds left in it.
fn groups_of_sessions(lab: &Lab) -> Vec<(String, String, u64)> {
    let answer: serde_json::Value =
        serde_json::from_str(&balancer(lab, &["sessions", "canary", "--json"])).expect("JSON");
    answer["source_ip_sessions"]
        .as_array()
        .expect("sessions")
        .iter()
        .map(|s| {
            (
                s["client"].as_str().unwrap_or("").to_owned(),
                s["group"].as_str().unwrap_or("-").to_owned(),
                s["group_s"].as_u64().unwrap_or(0),
            )
        })
        .collect()
}

#[test]
fn source_ip_sessions_stay_in_their_group_move_within_it_and_follow_new_weights_after_it() {
    let mut lab = lab_with(&ServiceOptions {
        extra_tables: source_ip_canary(),
        ..ServiceOptions::default()
    });
    let clients = add_clients(&lab, 70, 60);
    let first = source_ip_backends(&lab, &clients);
    let first_green = first.iter().filter(|b| green(b)).count();
    assert!(
        binomial(first_green, 60, 0.5),
        "{first_green} of 60 in green at 50/50"
    );
    let listed = groups_of_sessions(&lab);
    assert_eq!(listed.len(), 60, "{listed:?}");
    for (client, group, left) in &listed {
        let index = clients
            .iter()
            .position(|c| c.to_string() == *client)
            .expect("a client of the test");
        let expected = if green(&first[index]) {
            "green"
        } else {
            "blue"
        };
        assert_eq!(group, expected, "{client}'s group");
        assert!(*left > 0 && *left <= u64::from(STICKINESS_S), "{left}");
    }

    // Blue at 0: every session stays on its backend; new ones all go to green.
    set_weight(&lab, "blue", 0);
    assert_eq!(source_ip_backends(&lab, &clients), first, "sessions moved");
    let newcomers = add_clients(&lab, 71, 20);
    let new_backends = source_ip_backends(&lab, &newcomers);
    assert!(
        new_backends.iter().all(|b| green(b)),
        "new sessions with blue at weight 0: {new_backends:?}"
    );

    // backend-1 fails: its sessions move within blue, to backend-2, although blue takes no
    // new session; the others stay.
    lab.stop_backend(0).expect("stopping backend-1");
    wait_until(
        Duration::from_secs(10),
        "backend-1 failing its checks",
        || service_status_of(&lab, "canary", &Lab::backend_name(0)).contains("health=failing"),
    );
    let failed_over = source_ip_backends(&lab, &clients);
    for (before, after) in first.iter().zip(&failed_over) {
        let expected = if *before == Lab::backend_name(0) {
            Lab::backend_name(1)
        } else {
            before.clone()
        };
        assert_eq!(*after, expected, "a session of {before}");
    }
    assert!(first.contains(&Lab::backend_name(0)));

    // Their time in blue over, the blue sessions go where the weights send them: green.
    wait_until(
        Duration::from_secs(u64::from(STICKINESS_S) + 10),
        "every session's time in its group over",
        || {
            groups_of_sessions(&lab)
                .iter()
                .all(|(_, _, left)| *left == 0)
        },
    );
    let regrouped = source_ip_backends(&lab, &clients);
    assert!(
        regrouped.iter().all(|b| green(b)),
        "sessions after their time in blue, at weight 0: {regrouped:?}"
    );
    let renewed: Vec<_> = groups_of_sessions(&lab)
        .into_iter()
        .filter(|(client, _, _)| clients.iter().any(|c| c.to_string() == *client))
        .collect();
    assert_eq!(renewed.len(), clients.len());
    assert!(
        renewed.iter().all(|(_, g, left)| g == "green" && *left > 0),
        "each session in green for another stickiness: {renewed:?}"
    );
}

/// A service `apps` with two applications on one VIP and port: `shop.example` on group
/// `shop` (backend-1, backend-2) except its `/blog` path, and `blog.example` on group `blog`
/// (backend-3); no default group. The shop is also `api.example`, whose sessions are read
/// from a URL parameter, and `own.example`, whose cookie has a name of its own.
fn two_applications() -> String {
    format!(
        "[[service]]\nname = \"apps\"\nvip = \"{VIP}\"\nport = {CANARY_PORT}\nprotocol = \"tcp\"\n\
         affinity = \"lb-cookie\"\n\
         [[service.group]]\n  name = \"shop\"\n{}{}\
         [[service.group]]\n  name = \"blog\"\n{}\
         [[service.route]]\n  host = \"shop.example\"\n  path = \"/blog\"\n  group = \"blog\"\n\
         [[service.route]]\n  host = \"shop.example\"\n  group = \"shop\"\n\
         [[service.route]]\n  host = \"blog.example\"\n  group = \"blog\"\n\
         [[service.route]]\n  host = \"api.example\"\n  group = \"shop\"\n  affinity = \"url-param\"\n  param = \"sessionID\"\n\
         [[service.route]]\n  host = \"own.example\"\n  group = \"shop\"\n  cookie = \"OWN\"\n",
        group_backend(0),
        group_backend(1),
        group_backend(2)
    )
}

/// For each `host path` of its arguments, a new session and three requests more with its
/// cookie, each on a new connection; prints `host path status backend...` and the cookie's
/// Path attribute.
const ROUTED: &str = r#"
import http.client, sys
vip, port = sys.argv[1], int(sys.argv[2])
def get(host, path, cookie):
    c = http.client.HTTPConnection(vip, port, timeout=10)
    headers = {"Host": host, "Connection": "close"}
    if cookie:
        headers["Cookie"] = cookie
    c.request("GET", path, headers=headers)
    r = c.getresponse()
    body = r.read().decode().strip()
    set_cookie = next((v for n, v in r.getheaders() if n.lower() == "set-cookie" and v.startswith("LBSESSION=")), "")
    c.close()
    return r.status, r.getheader("x-backend") or body.replace(" ", "_"), set_cookie
for target in sys.argv[3:]:
    host, path = target.split(",")
    status, backend, set_cookie = get(host, path, None)
    cookie = set_cookie.split(";")[0]
    attributes = dict(a.strip().split("=", 1) for a in set_cookie.split(";")[1:] if "=" in a)
    seen = [backend] + [get(host, path, cookie)[1] for _ in range(3 if cookie else 0)]
    print(host, path, status, attributes.get("Path", "-"), *seen)
"#;

#[test]
fn two_applications_on_one_vip_reach_their_own_backends_by_host_and_path_and_stick() {
    let lab = lab_with(&ServiceOptions {
        extra_tables: two_applications(),
        ..ServiceOptions::default()
    });
    let mut targets: Vec<String> = (0..100)
        .map(|i| format!("shop.example,/item/{i}"))
        .collect();
    targets.extend((0..100).map(|i| format!("blog.example,/post/{i}")));
    targets.extend((0..20).map(|i| format!("shop.example,/blog/{i}")));
    targets.push("other.example,/".to_owned());
    let (vip, port) = (VIP.to_string(), CANARY_PORT.to_string());
    let mut argv = vec!["python3", "-c", ROUTED, &vip, &port];
    argv.extend(targets.iter().map(String::as_str));
    let output = run(&lab, lab.client_ns(), &argv);
    let mut shop_backends = HashMap::new();
    let mut answered = 0;
    for line in output.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let (host, path, cookie_path, seen) = (fields[0], fields[1], fields[3], &fields[4..]);
        answered += 1;
        if host == "other.example" {
            assert_eq!((fields[2], seen), ("404", &["404_Not_Found"][..]), "{line}");
            continue;
        }
        // The backend's own answer (a 404 for paths it does not serve), with its name.
        assert!(
            seen[0].starts_with("backend-"),
            "answered by a backend: {line}"
        );
        assert_eq!(
            seen.len(),
            4,
            "a session and three requests with its cookie: {line}"
        );
        assert!(
            seen.iter().all(|b| *b == seen[0]),
            "the session moved: {line}"
        );
        let blog = host == "blog.example" || path.starts_with("/blog/");
        if blog {
            assert_eq!(
                seen[0],
                Lab::backend_name(2),
                "the blog on its own backend: {line}"
            );
        } else {
            assert_ne!(
                seen[0],
                Lab::backend_name(2),
                "the shop on its own backends: {line}"
            );
            *shop_backends.entry(seen[0].to_owned()).or_insert(0) += 1;
        }
        let expected_path = if path.starts_with("/blog/") {
            "/blog"
        } else {
            "/"
        };
        assert_eq!(cookie_path, expected_path, "the cookie's Path: {line}");
    }
    assert_eq!(answered, targets.len());
    let status = balancer(&lab, &["status"]);
    assert!(
        status.contains("route host=shop.example path=/blog group=blog")
            && status.contains("route host=blog.example path=/ group=blog"),
        "{status}"
    );
    assert_eq!(
        shop_backends.len(),
        2,
        "shop sessions over both its backends: {shop_backends:?}"
    );
    let counters = balancer(&lab, &["stats"]);
    assert!(counters.contains("no_route 1"), "{counters}");
}

/// 50 sessions on `api.example` that send `?sessionID=` four times each without cookies,
/// then 20 on `own.example` that send back the cookie their first answer set, three times;
/// one line a session: `host backend... balancer-cookies-set`.
const ROUTE_SETTINGS: &str = r#"
import http.client, sys
vip, port = sys.argv[1], int(sys.argv[2])
def get(host, path, cookie=None):
    c = http.client.HTTPConnection(vip, port, timeout=10)
    headers = {"Host": host, "Connection": "close"}
    if cookie:
        headers["Cookie"] = cookie
    c.request("GET", path, headers=headers)
    r = c.getresponse()
    r.read()
    set = [v.split(";")[0] for n, v in r.getheaders() if n.lower() == "set-cookie"]
    ours = [v for v in set if v.split("=")[0] in ("LBSESSION", "OWN")]
    c.close()
    return r.getheader("x-backend"), ours
for i in range(50):
    seen = [get("api.example", f"/item?sessionID=s{i}") for _ in range(4)]
    issued = sorted({v.split("=")[0] for _, ours in seen for v in ours})
    print("api", *[b for b, _ in seen], ",".join(issued) or "-")
for i in range(20):
    backend, ours = get("own.example", "/")
    seen = [backend] + [get("own.example", "/", ours[0] if ours else None)[0] for _ in range(3)]
    print("own", *seen, ",".join(v.split("=")[0] for v in ours) or "-")
"#;

#[test]
fn each_route_reads_its_sessions_by_its_own_settings() {
    let lab = lab_with(&ServiceOptions {
        extra_tables: two_applications(),
        ..ServiceOptions::default()
    });
    let (vip, port) = (VIP.to_string(), CANARY_PORT.to_string());
    let output = run(
        &lab,
        lab.client_ns(),
        &["python3", "-c", ROUTE_SETTINGS, &vip, &port],
    );
    let mut spread: HashMap<&str, HashMap<String, usize>> = HashMap::new();
    let mut lines = 0;
    for line in output.lines() {
        lines += 1;
        let fields: Vec<&str> = line.split(' ').collect();
        let (host, seen, issued) = (fields[0], &fields[1..5], fields[5]);
        assert!(
            seen.iter().all(|b| *b == seen[0]),
            "the session moved: {line}"
        );
        assert!(
            seen[0] == Lab::backend_name(0) || seen[0] == Lab::backend_name(1),
            "the shop on its own backends: {line}"
        );
        // url-param: no cookie is issued; own.example: its cookie, not the service's.
        let expected = if host == "api" { "-" } else { "OWN" };
        assert_eq!(issued, expected, "{line}");
        *spread
            .entry(host)
            .or_default()
            .entry(seen[0].to_owned())
            .or_insert(0) += 1;
    }
    assert_eq!(lines, 70, "{output}");
    for (host, backends) in &spread {
        assert_eq!(
            backends.len(),
            2,
            "{host} sessions over both shop backends: {backends:?}"
        );
    }
    let status = balancer(&lab, &["status"]);
    assert!(
        status.contains(
            "route host=api.example path=/ group=shop affinity=url-param param=sessionID"
        ) && status.contains("route host=own.example path=/ group=shop cookie=OWN"),
        "{status}"
    );
}
