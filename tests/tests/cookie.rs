//! HTTP cookie affinity: XDP completes the handshake, the agent reads the request's cookie and
//! opens the backend side, XDP splices the connection. Real clients through the namespace lab.
//! Needs root.

mod common;

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
};

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
    get(lab, &["-H", &format!("Cookie: SID={value}")], "/")
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
    let without_cookie: HashSet<String> = (0..30).map(|_| get(&lab, &[], "/")).collect();
    assert_eq!(
        without_cookie.len(),
        BACKEND_COUNT,
        "requests without a cookie spread by the flow fallback: {without_cookie:?}"
    );
    let stats = counters(&lab);
    assert!(stats["syn_cookie_sent"] >= 150, "{stats:?}");
    assert!(stats["spliced_to_client"] > 0, "{stats:?}");
}

#[test]
fn a_curl_cookie_jar_keeps_its_session_on_one_backend() {
    let lab = lab_with(&cookie_options());
    let mut backends = HashSet::new();
    for session in 0..20 {
        let answers = jar_answers(&lab, session, 8);
        // The first request has no cookie yet (the fallback places it, the backend sets one);
        // every request that carries it lands where its value hashes.
        let sticky = &answers[1];
        assert!(
            answers[1..].iter().all(|b| b == sticky),
            "session {session} moved: {answers:?}"
        );
        backends.insert(sticky.clone());
    }
    assert_eq!(
        backends.len(),
        BACKEND_COUNT,
        "20 sessions should use every backend"
    );
}

#[test]
fn python_sessions_stick_and_a_down_backends_sessions_move_to_healthy_ones() {
    let mut options = cookie_options();
    options.web_settings += "[service.health_check]\nkind = \"http\"\ninterval = 0.5\ntimeout = 0.5\nfall = 2\nrise = 2\n";
    let mut lab = lab_with(&options);
    let script = format!(
        r#"
import requests, sys
sessions = [requests.Session() for _ in range(30)]
# The first request carries no cookie and its connection stays on the backend the fallback
# chose (connection-level stickiness), so it closes; the session's later connections carry
# the cookie the backend set.
for s in sessions:
    s.get("{url}", headers={{"Connection": "close"}}, timeout=10)
for i, s in enumerate(sessions):
    seen = {{s.get("{url}", timeout=10).text.strip() for _ in range(5)}}
    print(i, s.cookies.get("SID"), " ".join(sorted(seen)))
"#,
        url = vip_url("/")
    );
    let output = python(&lab, lab.client_ns(), &script);
    let mut cookies = Vec::new();
    for line in output.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(
            words.len(),
            3,
            "session {} saw several backends: {line}",
            words[0]
        );
        cookies.push((words[1].to_owned(), words[2].to_owned()));
    }
    assert_eq!(cookies.len(), 30);

    let victim = Lab::backend_name(2);
    let orphaned: Vec<&(String, String)> = cookies.iter().filter(|(_, b)| *b == victim).collect();
    assert!(!orphaned.is_empty(), "some of 30 sessions use {victim}");
    lab.stop_backend(2).expect("stopping backend-3's server");
    wait_until(
        std::time::Duration::from_secs(5),
        "backend-3 marked down",
        || status_of(&lab, &victim).contains("state=down"),
    );
    for (cookie, _) in &orphaned {
        let moved = backend_for_cookie(&lab, cookie);
        assert_ne!(
            moved, victim,
            "session {cookie} still goes to the dead backend"
        );
        assert_eq!(
            backend_for_cookie(&lab, cookie),
            moved,
            "session {cookie} did not settle"
        );
    }
    for (cookie, backend) in cookies.iter().filter(|(_, b)| *b != victim) {
        assert_eq!(
            &backend_for_cookie(&lab, cookie),
            backend,
            "a healthy backend's session moved"
        );
    }
}

#[test]
fn a_thousand_downloads_and_uploads_arrive_intact_on_keep_alive_and_new_connections() {
    let lab = lab_with(&cookie_options());
    integrity_run(&lab, &SIZES, 500, true, "SID=integrity");
    integrity_run(&lab, &SIZES, 500, false, "SID=integrity");
    let stats = counters(&lab);
    assert!(stats["spliced_to_client"] > 100_000, "{stats:?}");
}

fn lb_cookie_options() -> ServiceOptions {
    ServiceOptions {
        web_settings: "affinity = \"lb-cookie\"\ncookie_fallback = \"flow\"\n".to_owned(),
        ..ServiceOptions::default()
    }
}

/// `LBSESSION=<value>` for a backend of `web`, made by `balancer cookie` from the lab's config.
fn lb_cookie_for(lab: &Lab, backend: &str, expires_in: u32) -> String {
    cookie_signed_by(&config_path(lab), backend, expires_in)
}

/// `LBSESSION=<value>` for a backend of `web`, signed with the first key of `config`.
fn cookie_signed_by(config: &std::path::Path, backend: &str, expires_in: u32) -> String {
    let output = std::process::Command::new(balancer_bin())
        .args(["cookie", "--config"])
        .arg(config)
        .args(["web", backend, "--expires-in", &expires_in.to_string()])
        .output()
        .expect("running balancer cookie");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

/// The `cookies_rejected` counts of `balancer status`, by reason.
fn cookies_rejected(lab: &Lab) -> HashMap<String, u64> {
    let status = balancer(lab, &["status"]);
    let line = status
        .lines()
        .find(|l| l.starts_with("cookies_rejected"))
        .unwrap_or_else(|| panic!("no cookies_rejected line in:\n{status}"));
    line.split_whitespace()
        .skip(1)
        .filter_map(|pair| {
            let (reason, count) = pair.split_once('=')?;
            Some((reason.to_owned(), count.parse().ok()?))
        })
        .collect()
}

#[test]
fn a_signed_lb_cookie_routes_to_its_backend_and_a_tampered_expired_or_foreign_one_counts_as_absent()
{
    let lab = lab_with(&lb_cookie_options());
    for index in 0..BACKEND_COUNT {
        let backend = Lab::backend_name(index);
        let cookie = lb_cookie_for(&lab, &backend, 3600);
        for _ in 0..10 {
            assert_eq!(
                get(&lab, &["-H", &format!("Cookie: other=1; {cookie}")], "/").trim(),
                backend,
                "{cookie} names {backend}"
            );
        }
    }

    let cookie = lb_cookie_for(&lab, &Lab::backend_name(1), 3600);
    let (name, value) = cookie.split_once('=').expect("name=value");
    // Flip one character in the MAC part; truncate; expire.
    let mut flipped: Vec<char> = value.chars().collect();
    let last = flipped.len() - 3;
    flipped[last] = if flipped[last] == 'A' { 'B' } else { 'A' };
    let flipped: String = flipped.into_iter().collect();
    let expiring = lb_cookie_for(&lab, &Lab::backend_name(1), 1);
    std::thread::sleep(std::time::Duration::from_secs(2));
    // Signed by a key this balancer does not have (another deployment's, or one retired).
    let foreign = lab.dir().join("foreign.toml");
    let config = std::fs::read_to_string(config_path(&lab)).expect("reading the config");
    std::fs::write(&foreign, config.replace("{ id = 1,", "{ id = 9,")).expect("writing");
    let foreign = cookie_signed_by(&foreign, &Lab::backend_name(1), 3600);
    let cases = [
        (format!("{name}={flipped}"), "bad_signature"),
        (format!("{name}={}", &value[..value.len() - 4]), "malformed"),
        (expiring, "expired"),
        (foreign, "unknown_key"),
    ];
    for (cookie, reason) in cases {
        let before = cookies_rejected(&lab)[reason];
        let mut backends = HashSet::new();
        for _ in 0..12 {
            backends.insert(get(&lab, &["-H", &format!("Cookie: {cookie}")], "/"));
        }
        assert_eq!(
            cookies_rejected(&lab)[reason] - before,
            12,
            "{cookie} must be counted as {reason}"
        );
        assert!(
            backends.len() > 1,
            "{reason}: requests must be placed by the fallback (spread), got {backends:?}"
        );
    }
}

#[test]
fn downloads_and_uploads_arrive_intact_through_loss_and_reordering_on_the_client_link() {
    let lab = lab_with_impairment(&cookie_options(), &lossy());
    // New connections through loss are run with a cookie inserted (issued_cookies.rs).
    integrity_run(&lab, &SIZES, 500, true, "SID=integrity");
    assert_relay_was_lossy(&lab);
    let stats = counters(&lab);
    assert!(stats["spliced_to_client"] > 10_000, "{stats:?}");
}

#[test]
fn established_connections_are_forwarded_by_xdp_alone() {
    let lab = lab_with(&cookie_options());
    let warm_up = format!(
        r#"
import requests, sys
s = requests.Session()
s.get("{url}", headers={{"Cookie": "SID=long"}}, timeout=10)
sys.stdout.write("ready\n"); sys.stdout.flush()
sys.stdin.readline()
for _ in range(2000):
    assert s.get("{url}", headers={{"Cookie": "SID=long"}}, timeout=10).ok
"#,
        url = vip_url("/")
    );
    // One process: warm up, report the counters, then 2000 requests on the same connection.
    let mut child = std::process::Command::new("ip")
        .args(["netns", "exec", lab.client_ns(), "python3", "-c", &warm_up])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("starting the client");
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.as_mut().expect("stdout")),
        &mut line,
    )
    .expect("reading");
    assert_eq!(line.trim(), "ready");
    let before = counters(&lab);
    std::io::Write::write_all(child.stdin.as_mut().expect("stdin"), b"go\n").expect("writing");
    assert!(
        child.wait().expect("waiting").success(),
        "the keep-alive run failed"
    );
    let after = counters(&lab);
    assert_eq!(
        after["punted"], before["punted"],
        "established traffic went to the agent"
    );
    assert!(after["spliced_to_backend"] - before["spliced_to_backend"] >= 2000);
    assert!(after["spliced_to_client"] - before["spliced_to_client"] >= 2000);
}

#[test]
fn a_request_head_over_many_small_segments_and_pipelined_requests_are_served() {
    let lab = lab_with(&cookie_options());
    // The client advertises a 536-byte MSS, so the balancer offers no more: the 8 KB of
    // cookies below cross about 16 segments.
    run(
        &lab,
        lab.client_ns(),
        &[
            "ip",
            "route",
            "change",
            "default",
            "via",
            "198.18.0.1",
            "advmss",
            "536",
        ],
    );
    let filler: String = (0..80)
        .map(|i| format!("pad{i}={}; ", "x".repeat(90)))
        .collect();
    let cookie = format!("{filler}SID=split-session");
    let first = get(&lab, &["-H", &format!("Cookie: {cookie}")], "/");
    let again = backend_for_cookie(&lab, "split-session");
    assert_eq!(
        first.trim(),
        again,
        "the split head was routed by another cookie"
    );

    let script = format!(
        r#"
import socket
s = socket.create_connection(("{vip}", 80), timeout=10)
req = b"GET / HTTP/1.1\r\nHost: x\r\nCookie: SID=pipelined\r\n\r\n"
s.sendall(req * 3)
data = b""
while data.count(b"HTTP/1.1 200") < 3:
    chunk = s.recv(65536)
    if not chunk:
        break
    data += chunk
print(data.count(b"HTTP/1.1 200"))
"#,
        vip = balancer_lab::VIP
    );
    assert_eq!(
        python(&lab, lab.client_ns(), &script).trim(),
        "3",
        "three pipelined requests, three responses"
    );
}

#[test]
fn requests_arrive_when_the_link_to_the_backends_loses_frames() {
    let mut lab = lab_with(&cookie_options());
    // The agent's SYN and its replay of the request cross this link too: the client has had
    // its bytes acknowledged by the agent, so only the agent can send them again. Heads of
    // several segments: a lost first one the backend asks for again (its SYN-ACK comes
    // again), a lost later one only the agent can notice.
    lab.drop_at_backends(drop_bin(), 10.0)
        .expect("making the backend link lossy");
    let script = format!(
        r#"
import http.client, time
failed = 0
started = time.time()
for i in range(200):
    try:
        c = http.client.HTTPConnection("{vip}", 80, timeout=5)
        c.request("GET", "/", headers={{"Cookie": "pad=%s; SID=lossy-%d" % ("x" * 4000, i), "Connection": "close"}})
        if not c.getresponse().read().startswith(b"backend-"):
            failed += 1
        c.close()
    except Exception:
        failed += 1
print(failed, round(time.time() - started, 1))
"#,
        vip = balancer_lab::VIP
    );
    let output = python(&lab, lab.client_ns(), &script);
    let failed: usize = output
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(usize::MAX);
    assert_eq!(
        failed, 0,
        "requests lost on the backend link (failed, seconds): {output}"
    );
    assert!(
        binding_count(&lab, "replays_resent") > 0,
        "the agent never had to send a request again: the loss never hit a replay"
    );
}

#[test]
fn a_client_port_reused_right_after_a_cookie_connection_closed_meets_no_reset_and_no_delay() {
    // The app-cookie and lb-cookie services on the last backend alone: each connection from
    // one client port leaves the backend's TIME_WAIT for the next, which comes through the
    // other VIP port. The client's ISN and (Linux 6.x) its timestamps are of another 4-tuple,
    // unrelated to the last connection's; only the balancer's clock on the backend leg tells
    // the backend that the new connection is newer.
    let last = BACKEND_COUNT - 1;
    let lab = lab_with(&ServiceOptions {
        web_backend_count: Some(1),
        cookie_service: true,
        lb_cookie_backend: Some(last),
        ..ServiceOptions::default()
    });
    let script = format!(
        r#"
import socket, time

def tcp_counters():
    rows = [line.split() for line in open("/proc/net/snmp") if line.startswith("Tcp:")]
    return dict(zip(rows[0][1:], map(int, rows[1][1:])))

before = tcp_counters()
answers = []
for port in range(41000, 41008):
    for vip_port in ({lb_cookie_port}, {app_cookie_port}, {lb_cookie_port}):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", port))
        s.settimeout(10)
        s.connect(("{vip}", vip_port))
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        s.close()
        answers.append(data.split(b"\r\n\r\n", 1)[-1].decode().strip())
        # The next connection comes a few milliseconds later: timestamps count milliseconds.
        time.sleep(0.005)
after = tcp_counters()
print(len(answers), len(set(answers)), answers[0])
print(after["OutRsts"] - before["OutRsts"], after["RetransSegs"] - before["RetransSegs"])
"#,
        vip = balancer_lab::VIP,
        lb_cookie_port = balancer_lab::LB_COOKIE_PORT,
        app_cookie_port = balancer_lab::COOKIE_PORT,
    );
    let output = python(&lab, lab.client_ns(), &script);
    let lines: Vec<&str> = output.lines().collect();
    assert_eq!(
        lines[0],
        format!("24 1 {}", Lab::backend_name(last)),
        "every connection served by the one backend"
    );
    assert_eq!(
        lines[1], "0 0",
        "resets and retransmissions the client sent"
    );
    assert_eq!(
        binding_count(&lab, "time_wait"),
        0,
        "backend SYNs the agent had to reset and send again"
    );
    assert_eq!(binding_count(&lab, "bound"), 24);
}

#[test]
fn cookie_sessions_from_many_client_prefixes_stick_whichever_worker_binds_them() {
    // Eight /24s: each one's connections are bound by the worker XDP hands the prefix to.
    let lab = lab_with(&lb_cookie_options());
    let clients: Vec<_> = (1..=8)
        .flat_map(|third| add_clients(&lab, third, 1))
        .collect();
    let list: Vec<String> = clients.iter().map(|a| format!("\"{a}\"")).collect();
    let script = format!(
        r#"
import http.client
for addr in [{list}]:
    cookie, seen = None, []
    for _ in range(6):
        c = http.client.HTTPConnection("{vip}", 80, timeout=10, source_address=(addr, 0))
        headers = {{"Connection": "close"}}
        if cookie:
            headers["Cookie"] = cookie
        c.request("GET", "/", headers=headers)
        response = c.getresponse()
        if cookie is None:
            set = [c.split(";")[0] for c in response.msg.get_all("Set-Cookie") or []]
            cookie = next((c for c in set if c.startswith("LBSESSION=")), "")
        seen.append(response.read().decode().strip())
        c.close()
    print(addr, cookie != "", " ".join(seen))
"#,
        list = list.join(", "),
        vip = balancer_lab::VIP,
    );
    let answers = python(&lab, lab.client_ns(), &script);
    let sessions: Vec<&str> = answers.lines().collect();
    assert_eq!(sessions.len(), clients.len(), "{answers}");
    for session in &sessions {
        let words: Vec<&str> = session.split_whitespace().collect();
        assert_eq!(words[1], "True", "no balancer cookie: {session}");
        sticky_backend(
            &words[2..].iter().map(|w| w.to_string()).collect::<Vec<_>>(),
            words[0],
        );
    }
    // Every connection bound once. A client's first (a new session) by the worker of its
    // prefix, or by XDP once it has the cookie lines of the session's backend (XDP put the
    // lines into every head, and told the agent of their delivery for the agent's own
    // sessions alone). Its second (its first with the cookie) by that worker, which leaves
    // XDP the session for the other four, unless it has yet to see XDP record that
    // backend's SYN-ACK (a session XDP started): then the third too.
    let workers = agent_workers(&lab);
    let mut clients_of = vec![0u64; workers as usize];
    for client in &clients {
        let owner = balancer_common::worker_of(&IpAddr::V4(*client).into(), workers);
        clients_of[owner as usize] += 1;
    }
    let counters = counters(&lab);
    assert_eq!(counters["cookie_inserted"], 8);
    let started_by_agent = binding_count(&lab, "fallback");
    assert_eq!(counters["head_delivered"], started_by_agent);
    let started_by_xdp = 8 - started_by_agent;
    let returning_by_xdp = binding_count(&lab, "by_xdp") - started_by_xdp;
    assert_eq!(returning_by_xdp + binding_count(&lab, "cookie"), 40);
    assert!(returning_by_xdp >= 24, "XDP bound {returning_by_xdp} of 40");
    let bound_each = per_worker(&lab, "bound_each");
    for (bound, clients) in bound_each.iter().zip(&clients_of) {
        assert!(
            (*clients..=3 * clients).contains(bound),
            "a worker bound {bound} connections of {clients} clients: {bound_each:?}"
        );
    }
    assert_eq!(
        bound_each.iter().sum::<u64>() + binding_count(&lab, "by_xdp"),
        48
    );
    assert_eq!(binding_count(&lab, "bound"), 48);
}

#[test]
fn a_client_over_its_budget_on_a_lossy_backend_link_is_answered_or_reset_never_left_hanging() {
    // Two connections per client: a client with four in flight gives up its oldest for each
    // new one. A spliced connection whose replayed request the backend has not acknowledged
    // still needs the agent (only it can send the request again), so it is reset, not
    // forgotten: forgotten, its client would wait for an answer that never comes.
    let mut lab = lab_with_settings("bindings_per_client = 2", &cookie_options());
    lab.drop_at_backends(drop_bin(), 10.0)
        .expect("making the backend link lossy");
    let script = format!(
        r#"
import http.client, threading
counts = {{"answered": 0, "reset": 0, "hung": 0}}
lock = threading.Lock()
def client(t):
    for i in range(40):
        try:
            c = http.client.HTTPConnection("{vip}", 80, timeout=5)
            c.request("GET", "/", headers={{"Cookie": "pad=%s; SID=budget-%d-%d" % ("x" * 4000, t, i), "Connection": "close"}})
            outcome = "answered" if c.getresponse().read().startswith(b"backend-") else "reset"
            c.close()
        except TimeoutError:
            outcome = "hung"
        except Exception:
            outcome = "reset"
        with lock:
            counts[outcome] += 1
threads = [threading.Thread(target=client, args=(t,)) for t in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(counts["answered"], counts["reset"], counts["hung"])
"#,
        vip = balancer_lab::VIP
    );
    let output = python(&lab, lab.client_ns(), &script);
    let counts: Vec<u64> = output
        .split_whitespace()
        .filter_map(|n| n.parse().ok())
        .collect();
    assert_eq!(counts.len(), 3, "{output}");
    let (answered, hung) = (counts[0], counts[2]);
    assert_eq!(
        hung, 0,
        "requests left hanging (answered, reset, hung): {output}"
    );
    assert!(answered > 0, "{output}");
    assert!(
        binding_count(&lab, "shed_client_budget") > 0,
        "the client never went over its budget"
    );
}
