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

    // hping3: bare SYNs, as small as a SYN can be (54-byte frames).
    let before = counter(&lab, "syn_cookie_sent");
    let hping = lab
        .exec(
            lab.client_ns(),
            &[
                "hping3",
                "-S",
                "-p",
                &LB_COOKIE_PORT.to_string(),
                "-c",
                &SYNS_PER_SHAPE.to_string(),
                "-i",
                "u2000",
                &VIP.to_string(),
            ],
        )
        .expect("running hping3");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&hping.stdout),
        String::from_utf8_lossy(&hping.stderr)
    );
    assert!(
        said.contains(&format!(
            "{SYNS_PER_SHAPE} packets transmitted, {SYNS_PER_SHAPE} packets received"
        )),
        "hping3:\n{said}"
    );
    assert_eq!(
        counter(&lab, "syn_cookie_sent") - before,
        u64::from(SYNS_PER_SHAPE)
    );

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
/// out.
const ATTACKER: &str = r#"
import resource, selectors, socket, sys, time
vip, port, sources, n, hold = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(","), int(sys.argv[4]), float(sys.argv[5])
resource.setrlimit(resource.RLIMIT_NOFILE, (n + 1000, n + 1000))
request = b"GET / HTTP/1.1\r\nHost: vip\r\n\r\n"
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
    let status = balancer(&lab, &["status"]);
    assert!(status.contains("shed_client_budget="), "{status}");
}
