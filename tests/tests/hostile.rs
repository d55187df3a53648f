//! Cookie VIPs under odd and hostile clients: every SYN a real stack may send is answered, and
//! one client cannot take the VIP from the others.

mod common;

use balancer_lab::{ServiceOptions, LB_COOKIE_PORT, VIP};
use common::*;

/// SYNs sent per shape of options.
const SYNS_PER_SHAPE: u32 = 100;

fn lb_cookie_vip() -> ServiceOptions {
    ServiceOptions {
        lb_cookie_backend: Some(0),
        ..ServiceOptions::default()
    }
}

fn counter(lab: &balancer_lab::Lab, name: &str) -> u64 {
    counters(lab).get(name).copied().unwrap_or(0)
}

#[test]
fn syns_with_0_to_40_bytes_of_options_are_answered_and_their_handshakes_complete() {
    let lab = lab_with(&lb_cookie_vip());
    let cookies_before = counter(&lab, "syn_cookie_sent");
    let handshakes_before = counter(&lab, "handshake_done");
    // scapy: 100 SYNs of each options length, then the ACK of each SYN-ACK.
    let script = format!(
        r#"
from scapy.all import IP, TCP, sr, send, conf
conf.verb = 0
shapes = {{
    0: [],
    4: [("MSS", 1460)],
    8: [("MSS", 1460), ("NOP", None), ("NOP", None), ("SAckOK", b"")],
    20: [("MSS", 1460), ("SAckOK", b""), ("Timestamp", (1, 0)), ("NOP", None), ("WScale", 7)],
    40: [("MSS", 1460), ("SAckOK", b""), ("Timestamp", (1, 0)), ("NOP", None), ("WScale", 7)]
        + [("NOP", None)] * 20,
}}
answered = {{}}
port = 20000
for length, options in shapes.items():
    syns = []
    for _ in range({SYNS_PER_SHAPE}):
        port += 1
        syn = IP(dst="{VIP}") / TCP(sport=port, dport={LB_COOKIE_PORT}, flags="S", seq=1000, options=options)
        assert len(syn[TCP]) == 20 + length, (length, len(syn[TCP]))
        syns.append(syn)
    ans, _ = sr(syns, timeout=3, retry=0)
    synacks = [r for _, r in ans if r.haslayer(TCP) and r[TCP].flags == "SA"]
    answered[length] = len(synacks)
    send([IP(dst="{VIP}") / TCP(sport=r[TCP].dport, dport={LB_COOKIE_PORT}, flags="A", seq=1001, ack=r[TCP].seq + 1)
          for r in synacks])
print(" ".join(f"{{k}}={{v}}" for k, v in answered.items()))
"#
    );
    // The client's kernel would reset SYN-ACKs it has no socket for.
    run(&lab, lab.client_ns(), &["nft", "add table ip hostile; add chain ip hostile out { type filter hook output priority 0; tcp flags & rst == rst drop; }"]);
    let answered = run(&lab, lab.client_ns(), &["/usr/bin/python3", "-c", &script]);
    assert_eq!(
        answered.trim(),
        "0=100 4=100 8=100 20=100 40=100",
        "SYN-ACKs per options length"
    );
    let shapes = 5 * u64::from(SYNS_PER_SHAPE);
    assert_eq!(counter(&lab, "syn_cookie_sent") - cookies_before, shapes);
    wait_until(
        std::time::Duration::from_secs(5),
        "every handshake completes",
        || counter(&lab, "handshake_done") - handshakes_before == shapes,
    );

    run(&lab, lab.client_ns(), &["nft", "delete table ip hostile"]);

    // hping3: bare SYNs, as small as a SYN can be (54-byte frames), then with an MSS, a
    // timestamp, and both.
    let port = LB_COOKIE_PORT.to_string();
    let count = SYNS_PER_SHAPE.to_string();
    let vip = VIP.to_string();
    for options in [
        &[][..],
        &["--tcp-mss", "1460"][..],
        &["--tcp-timestamp"][..],
        &["--tcp-mss", "1460", "--tcp-timestamp"][..],
    ] {
        let before = counter(&lab, "syn_cookie_sent");
        let mut args = vec!["hping3", "-S", "-p", &port, "-c", &count, "-i", "u2000"];
        args.extend_from_slice(options);
        args.push(&vip);
        let hping = lab.exec(lab.client_ns(), &args).expect("running hping3");
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&hping.stdout),
            String::from_utf8_lossy(&hping.stderr)
        );
        assert!(
            said.contains(&format!(
                "{SYNS_PER_SHAPE} packets transmitted, {SYNS_PER_SHAPE} packets received"
            )),
            "hping3 {options:?}:\n{said}"
        );
        assert_eq!(
            counter(&lab, "syn_cookie_sent") - before,
            u64::from(SYNS_PER_SHAPE),
            "hping3 {options:?}"
        );
    }

    // The kernel's own stack.
    let before = counter(&lab, "handshake_done");
    for _ in 0..SYNS_PER_SHAPE {
        lab.curl(
            lab.client_ns(),
            &[
                "--fail",
                "-o",
                "/dev/null",
                &format!("http://{VIP}:{LB_COOKIE_PORT}/"),
            ],
        )
        .expect("a curl through the cookie VIP");
    }
    assert_eq!(
        counter(&lab, "handshake_done") - before,
        u64::from(SYNS_PER_SHAPE)
    );
    assert_eq!(counter(&lab, "drop_truncated"), 0, "no SYN was given up");
}

#[test]
fn new_sessions_from_one_address_spread_over_the_backends_by_default() {
    let lab = lab_with(&ServiceOptions {
        web_settings: "affinity = \"lb-cookie\"".to_owned(),
        ..ServiceOptions::default()
    });
    // New browsers behind one NAT address: no cookie yet, each its own connection.
    let mut per_backend = std::collections::BTreeMap::new();
    for _ in 0..30 {
        *per_backend.entry(get(&lab, &[], "/")).or_insert(0) += 1;
    }
    assert_eq!(
        per_backend.len(),
        balancer_lab::BACKEND_COUNT,
        "30 new sessions from one address: {per_backend:?}"
    );
}

/// Connections of the attack: more than the binding table holds (10,000 by default).
const ATTACK_CONNECTIONS: usize = 11_000;
/// How long the attacker keeps its connections open once every head is sent.
const ATTACK_HOLD_S: u32 = 10;

/// Opens `connections` connections to the lb-cookie VIP from `sources` (round robin), sends a
/// complete request on each, holds them `hold` seconds without taking a byte of the answers
/// (the lab's firewall drops them), then closes them all. Prints `sent N` once every head is
/// out. The requests carry a forged cookie, which makes the agent read each one: without a
/// cookie XDP would start their sessions itself, and they would hold nothing of the agent's.
const ATTACKER: &str = r#"
import resource, selectors, socket, sys, time
vip, port, sources, n, hold = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(","), int(sys.argv[4]), float(sys.argv[5])
resource.setrlimit(resource.RLIMIT_NOFILE, (n + 1000, n + 1000))
request = b"GET / HTTP/1.1\r\nHost: vip\r\nCookie: LBSESSION=forged\r\n\r\n"
selector = selectors.DefaultSelector()
sockets, sent = [], 0
def pump(timeout):
    global sent
    for key, _ in selector.select(timeout):
        try:
            key.fileobj.send(request)
            sent += 1
        except OSError:
            pass
        selector.unregister(key.fileobj)
for i in range(n):
    s = socket.socket()
    s.setblocking(False)
    s.bind((sources[i % len(sources)], 0))
    try:
        s.connect((vip, port))
    except BlockingIOError:
        pass
    selector.register(s, selectors.EVENT_WRITE)
    sockets.append(s)
    if i % 100 == 99:
        pump(0)
deadline = time.time() + 60
while selector.get_map() and time.time() < deadline:
    pump(0.5)
print("sent", sent, flush=True)
time.sleep(hold)
for s in sockets:
    s.close()
print("closed", flush=True)
"#;

/// 20 new connections from the lab's usual client, each a request through the lb-cookie
/// VIP; how many were answered.
fn answered_of_20(lab: &balancer_lab::Lab) -> usize {
    (0..20)
        .filter(|_| {
            let answer = lab.curl(
                lab.client_ns(),
                &[
                    "--fail",
                    "--max-time",
                    "5",
                    "-o",
                    "/dev/null",
                    &format!("http://{VIP}:{LB_COOKIE_PORT}/"),
                ],
            );
            if let Err(error) = &answer {
                eprintln!("{error:#}");
            }
            answer.is_ok()
        })
        .count()
}

fn binding_resets(lab: &balancer_lab::Lab) -> u64 {
    [
        "shed_client_budget",
        "shed_prefix_budget",
        "shed_table_full",
        "head_unacknowledged",
    ]
    .iter()
    .map(|name| binding_count(lab, name))
    .sum()
}

/// Runs the attack from `sources` and checks the lab's usual client (198.18.0.2, another
/// /24) is served during it and right after.
fn attack_from(lab: &mut balancer_lab::Lab, sources: &[std::net::Ipv4Addr], name: &str) {
    let sources: Vec<String> = sources.iter().map(ToString::to_string).collect();
    let log = lab
        .dir()
        .join(format!("attack-{}.log", name.replace([' ', '/'], "-")));
    let client = lab.client_ns().to_owned();
    let resets_before = binding_resets(lab);
    let attacker = lab
        .spawn_logged(
            &client,
            &[
                "/usr/bin/python3",
                "-c",
                ATTACKER,
                &VIP.to_string(),
                &LB_COOKIE_PORT.to_string(),
                &sources.join(","),
                &ATTACK_CONNECTIONS.to_string(),
                &ATTACK_HOLD_S.to_string(),
            ],
            &log,
        )
        .expect("starting the attacker");
    let said = || std::fs::read_to_string(&log).unwrap_or_default();
    wait_until(
        std::time::Duration::from_secs(90),
        "the attacker sends every head",
        || said().contains("sent "),
    );
    let answered = answered_of_20(lab);
    assert_eq!(
        answered,
        20,
        "{name}: requests from another address during the attack\n{}\n{}",
        balancer(lab, &["stats"]),
        balancer(lab, &["status"])
    );
    lab.wait_for(attacker, std::time::Duration::from_secs(60))
        .expect("the attacker ends");
    assert!(said().contains("closed"), "{name}: {}", said());
    assert_eq!(
        answered_of_20(lab),
        20,
        "{name}: requests right after the attack"
    );
    let resets = binding_resets(lab) - resets_before;
    let table = 10_000;
    assert!(
        resets >= (ATTACK_CONNECTIONS - table) as u64,
        "{name}: {resets} of the attacker's connections were reset to make room"
    );
}

#[test]
fn thousands_of_connections_holding_unacknowledged_heads_do_not_lock_other_clients_out() {
    let mut lab = lab_with(&lb_cookie_vip());
    let one = add_clients(&lab, 5, 1);
    let pool = add_clients(&lab, 6, 254);
    // The attacker's hosts take the SYN-ACKs and nothing else the VIP sends them.
    let rule = format!(
        "add table ip attack; add chain ip attack in {{ type filter hook input priority 0; }}; \
         add rule ip attack in ip saddr {VIP} tcp sport {LB_COOKIE_PORT} ip daddr {{ 198.18.5.0/24, 198.18.6.0/24 }} tcp flags & syn == 0 drop"
    );
    run(&lab, lab.client_ns(), &["nft", &rule]);
    attack_from(&mut lab, &one, "one address");
    attack_from(&mut lab, &pool, "a /24");
    // `balancer stats` lists the agent's refusals by reason beside the data plane's counters.
    let stats = counters(&lab);
    assert!(
        stats["shed_client_budget"] > 0 && stats["shed_prefix_budget"] > 0,
        "{stats:?}"
    );
}

/// Drops the client kernel's own resets, so that scapy's hand-made connections (sent at layer
/// 2, past netfilter) are not reset by a kernel that knows nothing of them.
fn quiet_client_kernel(lab: &balancer_lab::Lab) {
    run(
        lab,
        lab.client_ns(),
        &["nft", "add table ip quiet; add chain ip quiet out { type filter hook output priority 0; tcp flags & rst == rst drop; }"],
    );
}

#[test]
fn only_a_reset_at_the_next_sequence_number_ends_a_binding_and_other_resets_and_fins_do_not() {
    let lab = lab_with(&lb_cookie_vip());
    quiet_client_kernel(&lab);
    let script = format!(
        r#"
import time
from scapy.all import AsyncSniffer, Ether, IP, TCP, Raw, srp1, sendp, getmacbyip, conf
conf.verb = 0
eth = Ether(dst=getmacbyip("198.18.0.1"))
def segment(flags, seq, ack=0, payload=b""):
    return eth / IP(dst="{VIP}") / TCP(sport=41000, dport={LB_COOKIE_PORT}, flags=flags, seq=seq, ack=ack) / Raw(payload)
synack = srp1(eth / IP(dst="{VIP}") / TCP(sport=41000, dport={LB_COOKIE_PORT}, flags="S", seq=1000, options=[("MSS", 1460)]), timeout=3)
ack = synack[TCP].seq + 1
head = b"GET / HTTP/1.1\r\nHost: vip\r\n"
partial = srp1(segment("PA", 1001, ack, head), timeout=3)
after = 1001 + len(head)
print("acknowledged", partial[TCP].ack == after)
sendp(segment("R", after + 200000))
sendp(segment("FA", after + 5, ack))
sniffer = AsyncSniffer(iface="eth0", filter="tcp and src port {LB_COOKIE_PORT}")
sniffer.start()
time.sleep(0.5)
sendp(segment("R", after + 10))
time.sleep(1)
answers = sniffer.stop()
print("challenge", any(p[TCP].flags == "A" and p[TCP].ack == after for p in answers))
sendp(segment("R", after))
"#
    );
    let bad_before = counter(&lab, "drop_bad_cookie");
    let said = run(&lab, lab.client_ns(), &["/usr/bin/python3", "-c", &script]);
    assert!(said.contains("acknowledged True"), "{said}");
    assert!(
        said.contains("challenge True"),
        "a reset inside the window gets a challenge ACK: {said}"
    );
    // A reset far past the window is no segment of the connection to XDP, which drops it
    // for want of a cookie; the FIN out of order reaches the agent, which ignores it.
    assert_eq!(
        counter(&lab, "drop_bad_cookie"),
        bad_before + 1,
        "the reset past the window"
    );
    assert_eq!(
        binding_count(&lab, "out_of_window"),
        1,
        "the FIN out of order"
    );
    assert_eq!(binding_count(&lab, "challenge_acks"), 1);
    wait_until(
        std::time::Duration::from_secs(5),
        "the reset at the next sequence number ends the binding",
        || binding_count(&lab, "held") == 0,
    );
    assert_eq!(binding_count(&lab, "bound"), 0);

    // A request followed at once by the client's FIN (`nc -N`) is served.
    let answer = run(
        &lab,
        lab.client_ns(),
        &[
            "sh",
            "-c",
            &format!("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -N -w 5 {VIP} {LB_COOKIE_PORT}"),
        ],
    );
    assert!(answer.starts_with("HTTP/1.0 200"), "nc -N: {answer}");
}

#[test]
fn a_backends_reply_forged_on_the_client_side_is_dropped() {
    let lab = lab_with(&lb_cookie_vip());
    // A spliced keep-alive connection from a known port, held open while the forgery comes.
    let script = format!(
        r#"
import socket, time
from scapy.all import Ether, IP, TCP, sendp, getmacbyip, conf
conf.verb = 0
s = socket.create_connection(("{VIP}", {LB_COOKIE_PORT}), source_address=("198.18.0.2", 45000))
s.sendall(b"GET / HTTP/1.1\r\nHost: vip\r\n\r\n")
print(s.recv(65536).split(b"\r\n")[0].decode())
forged = Ether(dst=getmacbyip("198.18.0.1")) / IP(src="198.19.0.11", dst="198.18.0.2") / TCP(sport=80, dport=45000, flags="SA", seq=1, ack=1)
sendp(forged)
time.sleep(0.5)
s.sendall(b"GET / HTTP/1.1\r\nHost: vip\r\n\r\n")
print(s.recv(65536).split(b"\r\n")[0].decode())
"#
    );
    let replays_before = binding_count(&lab, "replays_resent");
    let said = run(&lab, lab.client_ns(), &["/usr/bin/python3", "-c", &script]);
    assert_eq!(
        said.matches("HTTP/1.1 200").count(),
        2,
        "the connection keeps working: {said}"
    );
    assert_eq!(counter(&lab, "drop_reply_from_client_side"), 1);
    assert_eq!(
        binding_count(&lab, "replays_resent"),
        replays_before,
        "no replay for a forgery"
    );
}

#[test]
fn connections_trickling_single_bytes_cost_their_own_punts_and_others_are_served() {
    let mut lab = lab_with(&lb_cookie_vip());
    let log = lab.dir().join("trickle.log");
    let client = lab.client_ns().to_owned();
    // 200 connections, each sending one byte of a head that never ends every 50 ms for 20 s.
    let script = format!(
        r#"
import socket, time
socks = []
for _ in range(200):
    s = socket.create_connection(("{VIP}", {LB_COOKIE_PORT}))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.setblocking(False)
    socks.append(s)
print("connected", flush=True)
end = time.time() + 20
while time.time() < end:
    for s in socks:
        try:
            s.send(b"x")
        except OSError:
            pass
    time.sleep(0.05)
print("done", flush=True)
"#
    );
    let stats_lines = |lab: &balancer_lab::Lab| {
        std::fs::read_to_string(lab.balancer_log())
            .unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with("stats:"))
            .count()
    };
    let trickler = lab
        .spawn_logged(&client, &["/usr/bin/python3", "-c", &script], &log)
        .expect("starting the trickle");
    wait_until(
        std::time::Duration::from_secs(30),
        "the trickle connects",
        || {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains("connected")
        },
    );
    let ticks_before = stats_lines(&lab);
    assert_eq!(
        answered_of_20(&lab),
        20,
        "requests from the same address during the trickle"
    );
    lab.wait_for(trickler, std::time::Duration::from_secs(60))
        .expect("the trickle ends");
    assert!(
        counter(&lab, "drop_punt_budget") > 0,
        "segments past each connection's punt budget are dropped and counted"
    );
    assert!(
        stats_lines(&lab) >= ticks_before + 10,
        "the agent's stats line kept ticking through the 20 s trickle"
    );
    assert_eq!(answered_of_20(&lab), 20, "requests right after the trickle");
}

/// Handshakes the flood completes: more than the flow table holds in this test.
const FLOOD_HANDSHAKES: usize = 10_000;
/// The flow table's size in this test (the smallest a config may ask for is 1024).
const SMALL_FLOW_TABLE: u32 = 4096;

#[test]
fn a_flood_of_handshakes_without_requests_leaves_established_connections_alone() {
    let mut lab = lab_with_settings(
        &format!("flow_capacity = {SMALL_FLOW_TABLE}"),
        &lb_cookie_vip(),
    );
    let client = lab.client_ns().to_owned();
    let mut runs = Vec::new();
    for port in [80, LB_COOKIE_PORT] {
        let log = lab.dir().join(format!("wrk-{port}.log"));
        let url = format!("http://{VIP}:{port}/");
        let pid = lab
            .spawn_logged(&client, &["wrk", "-t1", "-c16", "-d", "15s", &url], &log)
            .expect("starting wrk");
        runs.push((port, pid, log));
    }
    let flood = format!(
        r#"
import resource, socket, time
resource.setrlimit(resource.RLIMIT_NOFILE, ({FLOOD_HANDSHAKES} + 1000, {FLOOD_HANDSHAKES} + 1000))
socks = []
for _ in range({FLOOD_HANDSHAKES}):
    s = socket.socket()
    s.setblocking(False)
    try:
        s.connect(("{VIP}", {LB_COOKIE_PORT}))
    except BlockingIOError:
        pass
    socks.append(s)
time.sleep(3)
print("connected", sum(1 for s in socks if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0), flush=True)
"#
    );
    let handshakes_before = counter(&lab, "handshake_done");
    let said = run(&lab, &client, &["/usr/bin/python3", "-c", &flood]);
    assert!(
        said.contains(&format!("connected {FLOOD_HANDSHAKES}")),
        "{said}"
    );
    assert!(
        counter(&lab, "handshake_done") - handshakes_before >= FLOOD_HANDSHAKES as u64,
        "the flood completed its handshakes"
    );
    for (port, pid, log) in runs {
        lab.wait_for(pid, std::time::Duration::from_secs(60))
            .expect("wrk finishes");
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(
            text.contains(" requests in "),
            "wrk on port {port}:\n{text}"
        );
        assert!(
            !text.contains("Socket errors") && !text.contains("Non-2xx"),
            "wrk's connections on port {port} survived the flood:\n{text}"
        );
    }
}

#[test]
fn fifty_cookie_sessions_stay_sticky_and_unharmed_through_a_syn_flood() {
    let mut lab = lab_with(&ServiceOptions {
        web_settings: "affinity = \"lb-cookie\"".to_owned(),
        ..ServiceOptions::default()
    });
    let client = lab.client_ns().to_owned();
    let flood_log = lab.dir().join("hping3.log");
    let cookies_before = counter(&lab, "syn_cookie_sent");
    // Bounded in time: timeout ends the flood after 10 s.
    let flood = lab
        .spawn_logged(
            &client,
            &[
                "timeout",
                "10",
                "hping3",
                "--flood",
                "-S",
                "-p",
                "80",
                &VIP.to_string(),
            ],
            &flood_log,
        )
        .expect("starting hping3");
    wait_until(
        std::time::Duration::from_secs(5),
        "the flood reaches the VIP",
        || counter(&lab, "syn_cookie_sent") > cookies_before + 10_000,
    );
    let script = format!(
        r#"
import requests
sessions = [requests.Session() for _ in range(50)]
for i, s in enumerate(sessions):
    seen = {{s.get("{url}", timeout=10).text.strip() for _ in range(10)}}
    print(i, " ".join(sorted(seen)), flush=True)
"#,
        url = vip_url("/")
    );
    let output = python(&lab, &client, &script);
    let flooded = balancer_lab::process::running(flood);
    lab.wait_for(flood, std::time::Duration::from_secs(30))
        .expect("the flood ends");
    let lines: Vec<&str> = output.lines().collect();
    assert_eq!(
        lines.len(),
        50,
        "every session made its 10 requests:\n{output}"
    );
    for line in lines {
        assert_eq!(
            line.split_whitespace().count(),
            2,
            "one backend per session: {line}"
        );
    }
    assert!(flooded, "the sessions ran while the flood did");
    let flood_syns = counter(&lab, "syn_cookie_sent") - cookies_before;
    eprintln!("{flood_syns} SYNs answered with a cookie during the flood and the sessions");
}

/// The SYN-ACK's cookie for a SYN from `port` with a fixed ISN (scapy, at layer 2).
fn cookie_for_syn(lab: &balancer_lab::Lab, port: u16) -> u32 {
    let script = format!(
        r#"
from scapy.all import Ether, IP, TCP, srp1, getmacbyip, conf
conf.verb = 0
syn = Ether(dst=getmacbyip("198.18.0.1")) / IP(dst="{VIP}") / TCP(sport={port}, dport={LB_COOKIE_PORT}, flags="S", seq=1000, options=[("MSS", 1460)])
print(srp1(syn, timeout=3)[TCP].seq)
"#
    );
    run(lab, lab.client_ns(), &["/usr/bin/python3", "-c", &script])
        .trim()
        .parse()
        .expect("a SYN-ACK")
}

/// The handshake's ACK for `cookie` from `port` (scapy, at layer 2).
fn ack_cookie(lab: &balancer_lab::Lab, port: u16, cookie: u32) {
    let script = format!(
        r#"
from scapy.all import Ether, IP, TCP, sendp, getmacbyip, conf
conf.verb = 0
sendp(Ether(dst=getmacbyip("198.18.0.1")) / IP(dst="{VIP}") / TCP(sport={port}, dport={LB_COOKIE_PORT}, flags="A", seq=1001, ack={cookie} + 1))
"#
    );
    run(lab, lab.client_ns(), &["/usr/bin/python3", "-c", &script]);
}

#[test]
fn the_agent_rotates_the_syn_cookie_secret_and_the_previous_one_stays_valid_once() {
    let lab = lab_with_settings("syn_cookie_rotation = 10", &lb_cookie_vip());
    quiet_client_kernel(&lab);
    let rotations = |lab: &balancer_lab::Lab| binding_count(lab, "rotations");
    let first = cookie_for_syn(&lab, 41100);
    let second = cookie_for_syn(&lab, 41200);
    let limit = std::time::Duration::from_secs(15);
    let start = rotations(&lab);
    wait_until(limit, "a rotation", || rotations(&lab) > start);
    assert_ne!(
        cookie_for_syn(&lab, 41100),
        first,
        "a new secret, a new cookie"
    );
    let handshakes = counter(&lab, "handshake_done");
    ack_cookie(&lab, 41100, first);
    wait_until(
        limit,
        "a cookie of the previous secret completes its handshake",
        || counter(&lab, "handshake_done") == handshakes + 1,
    );
    wait_until(limit * 2, "two more rotations", || {
        rotations(&lab) >= start + 3
    });
    let refused = counter(&lab, "drop_bad_cookie");
    ack_cookie(&lab, 41200, second);
    wait_until(
        limit,
        "a cookie of a secret three rotations old is refused",
        || counter(&lab, "drop_bad_cookie") == refused + 1,
    );
    assert_eq!(counter(&lab, "handshake_done"), handshakes + 1);
}
