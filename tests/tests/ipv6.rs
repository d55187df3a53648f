//! IPv6 through the XDP balancer: the foundation tests of forwarding.rs on the lab's IPv6 VIP
//! (`web-v6`, `echo-tcp-v6`, `echo-udp-v6` over the backends' IPv6 addresses), malformed
//! IPv6 frames, the host's own IPv6 (neighbour discovery, ping) beside it, source-ip
//! sessions by /64, and cookie affinity with its delayed binding over IPv6. Needs root.

mod common;

use std::{
    collections::HashSet,
    net::{IpAddr, Ipv6Addr},
};

use balancer_lab::{Lab, ServiceOptions, BACKEND_COUNT, BALANCER_CLIENT_ADDR6, CLIENT_ADDR6, VIP6};
use common::*;

/// The body of `GET <path>` on the IPv6 VIP, on a new connection, with curl's extra `args`.
fn get6(lab: &Lab, args: &[&str], path: &str) -> String {
    get_at(lab, &vip6_url(path), args)
}

#[test]
fn curl_to_the_ipv6_vip_is_answered_by_a_backend() {
    let lab = lab_with_balancer();
    let before = counters(&lab);
    let body = get6(&lab, &[], "/");
    let names: Vec<String> = (0..BACKEND_COUNT).map(Lab::backend_name).collect();
    assert!(names.contains(&body), "unexpected answer {body:?}");
    let after = counters(&lab);
    assert!(
        after["forwarded"] > before["forwarded"] && after["replied"] > before["replied"],
        "the answer did not go through XDP both ways"
    );
}

#[test]
fn new_ipv6_connections_spread_over_all_backends() {
    new_connections_spread(&lab_with_balancer(), IpAddr::from(VIP6));
}

#[test]
fn ipv6_download_and_upload_of_100_mb_arrive_intact() {
    let lab = lab_with_balancer();
    download_of_100_mb_is_intact(&lab, &vip6_url(""));
    upload_of_100_mb_is_intact(&lab, &vip6_url(""));
}

#[test]
fn udp_echo_through_the_ipv6_vip() {
    udp_echo_through(&lab_with_balancer(), IpAddr::from(VIP6));
}

#[test]
fn malformed_ipv6_frames_are_counted_by_reason_and_the_hosts_ipv6_keeps_working() {
    let lab = lab_with_balancer();
    // The host's own IPv6 first: neighbour discovery and ping to the balancer host, and
    // through it to a backend (ICMPv6 is the host's, XDP passes it).
    let before = counters(&lab);
    let gateway = BALANCER_CLIENT_ADDR6.to_string();
    let backend = Lab::backend_addr6(0).to_string();
    for target in [gateway.as_str(), backend.as_str()] {
        run(
            &lab,
            lab.client_ns(),
            &["ping", "-6", "-c", "3", "-i", "0.2", "-W", "2", target],
        );
    }
    let after_ping = counters(&lab);
    assert!(
        after_ping["pass_not_tcp_udp"] - before["pass_not_tcp_udp"] >= 6,
        "ping and neighbour discovery went through the program as ICMPv6"
    );

    // Crafted with scapy on the client's link, each kind five times. A SYN behind a
    // hop-by-hop and a destination options header is forwarded and answered; the rest are
    // passed or dropped by rule.
    let script = format!(
        r#"
from scapy.all import (Ether, IPv6, TCP, UDP, Raw, IPv6ExtHdrHopByHop, IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment, AsyncSniffer, sendp, get_if_hwaddr, conf)
import threading
from scapy.layers.inet6 import getmacbyip6
conf.verb = 0
gw = getmacbyip6("{gateway}")
eth = Ether(dst=gw, src=get_if_hwaddr("eth0"), type=0x86dd)
ip = IPv6(src="{CLIENT_ADDR6}", dst="{VIP6}")
syn = TCP(sport=31337, dport=80, flags="S", seq=1000)
frames = [
    eth / ip / IPv6ExtHdrFragment(m=1, id=7) / UDP(dport=7) / Raw(b"x" * 64),       # fragment
    eth / IPv6(src="{CLIENT_ADDR6}", dst="{VIP6}", nh=135) / Raw(b"m" * 16),       # mobility header
    eth / IPv6(src="{CLIENT_ADDR6}", dst="{VIP6}", nh=51) / Raw(b"a" * 24),        # authentication header
    eth / Raw(bytes(ip / syn)[:30]),                                             # truncated IPv6 header
    eth / Raw(bytes(IPv6(src="{CLIENT_ADDR6}", dst="{VIP6}", plen=10, nh=6) / Raw(b"t" * 10))),   # truncated TCP header
    eth / Raw(bytes(IPv6(src="{CLIENT_ADDR6}", dst="{VIP6}", plen=1400, nh=6) / Raw(b"z" * 20))),  # length beyond frame
    eth / Raw(bytes(IPv6(src="{CLIENT_ADDR6}", dst="{VIP6}", nh=6, version=4) / syn)),           # version 4 in an IPv6 frame
    eth / ip / IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt() / syn,  # five extension headers
]
for f in frames:
    sendp(f, iface="eth0", count=5)
# The answers are caught by a sniffer: scapy's own matching does not look past extension
# headers to pair a SYN-ACK with its SYN.
listening = threading.Event()
sniffer = AsyncSniffer(iface="eth0", count=5, filter="ip6 and tcp and src host {VIP6}",
    lfilter=lambda p: p.haslayer(TCP) and p[TCP].flags == "SA" and 31400 <= p[TCP].dport < 31405,
    started_callback=listening.set)
sniffer.start()
listening.wait(5)
for i in range(5):
    sendp(eth / ip / IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt() / TCP(sport=31400 + i, dport=80, flags="S", seq=1000), iface="eth0")
sniffer.join(timeout=10)
answered = len(sniffer.results or [])
print(answered)
"#
    );
    let answered = run(&lab, lab.client_ns(), &["/usr/bin/python3", "-c", &script]);
    let after = counters(&lab);
    assert_eq!(
        answered.trim(),
        "5",
        "SYNs behind hop-by-hop and destination options answered"
    );
    for (reason, sent, what) in [
        ("pass_fragment", 5, "fragments"),
        (
            "pass_ipv6_extension",
            15,
            "mobility, authentication and too many extension headers",
        ),
        ("drop_truncated", 10, "truncated IPv6 and TCP headers"),
        (
            "drop_bad_ip_header",
            10,
            "a payload length beyond the frame, a wrong version",
        ),
    ] {
        assert_eq!(
            after[reason] - after_ping[reason],
            sent,
            "{what}: counted under {reason}"
        );
    }
    assert_eq!(
        get6(&lab, &[], "/").len(),
        "backend-1".len(),
        "forwarding after malformed input"
    );
}

#[test]
fn ipv6_source_ip_sessions_hold_a_whole_64_together_and_64s_spread() {
    let lab = lab_with(&ServiceOptions {
        web6_settings: "affinity = \"source-ip\"\n".to_owned(),
        ..ServiceOptions::default()
    });
    // Two addresses in each of twelve /64s, as hosts with privacy addresses have.
    let pairs: Vec<[Ipv6Addr; 2]> = (0..12u16)
        .map(|net| {
            [0x10, 0x20].map(|host| Ipv6Addr::new(0x2001, 0xdb8, 0xc, net + 1, 0, 0, 0, host))
        })
        .collect();
    let addrs: Vec<Ipv6Addr> = pairs.iter().flatten().copied().collect();
    lab.add_client_addresses6(&addrs)
        .expect("adding client addresses");
    let clients: Vec<IpAddr> = addrs.iter().map(|&a| a.into()).collect();
    let seen = backends_seen_via(&lab, IpAddr::from(VIP6), &clients, 4);
    let mut used = HashSet::new();
    for [a, b] in &pairs {
        let first = sticky_backend(&seen[&IpAddr::from(*a)], a);
        let second = sticky_backend(&seen[&IpAddr::from(*b)], b);
        assert_eq!(first, second, "{a} and {b} share a /64 but not a backend");
        used.insert(first);
    }
    assert_eq!(
        used.len(),
        BACKEND_COUNT,
        "twelve /64s should use every backend: {seen:?}"
    );
}

fn lb_cookie_v6(extra: &str) -> ServiceOptions {
    ServiceOptions {
        web6_settings: format!("affinity = \"lb-cookie\"\ncookie_fallback = \"flow\"\n{extra}"),
        ..ServiceOptions::default()
    }
}

const HEALTH_CHECK: &str =
    "[service.health_check]\nkind = \"http\"\ninterval = 0.5\ntimeout = 0.5\nfall = 2\nrise = 2\n";

#[test]
fn ipv6_cookie_sessions_stick_in_curl_jars_and_python_and_move_with_a_new_cookie_when_their_backend_dies(
) {
    let mut lab = lab_with(&lb_cookie_v6(HEALTH_CHECK));
    let jar_backends = lb_cookie_jars_stick(&lab, &vip6_url("/"), 30);
    assert_eq!(
        jar_backends.len(),
        BACKEND_COUNT,
        "30 new sessions spread over every backend"
    );
    sessions_stick_and_move_with_a_new_cookie(&mut lab, &vip6_url("/"), "web-v6");
}

#[test]
fn ipv6_application_cookies_keep_their_backend_in_hash_and_companion_mode() {
    for mode in ["hash", "companion"] {
        let lab = lab_with(&ServiceOptions {
            web6_settings: format!(
                "affinity = \"app-cookie\"\ncookie = \"SID\"\napp_cookie = \"{mode}\"\n"
            ),
            ..ServiceOptions::default()
        });
        let mut used = HashSet::new();
        for jar in 0..15 {
            let path = lab.dir().join(format!("jar6-{jar}"));
            let path = path.to_str().expect("utf-8 path");
            let answers: Vec<String> = (0..6)
                .map(|_| get6(&lab, &["-c", path, "-b", path], "/"))
                .collect();
            // The first request carries no cookie yet; the backend's SID (and in companion
            // mode the balancer's cookie beside it) keeps the rest together.
            assert!(
                answers[1..].iter().all(|a| *a == answers[1]),
                "{mode}: jar {jar} moved: {answers:?}"
            );
            used.insert(answers[1].clone());
        }
        assert_eq!(
            used.len(),
            BACKEND_COUNT,
            "{mode}: 15 sessions spread over every backend"
        );
    }
}

#[test]
fn a_thousand_ipv6_cookie_transfers_arrive_intact_through_loss_and_reordering() {
    let lab = lab_with_impairment(&lb_cookie_v6(""), &lossy());
    let cookie = "LBSESSION=absent";
    integrity_run_at(&lab, &vip6_url(""), &SIZES, 1000, true, cookie);
    assert_relay_was_lossy(&lab);
    assert!(counters(&lab)["spliced_to_client"] > 10_000);
}
