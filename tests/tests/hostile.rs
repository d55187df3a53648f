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
