//! L4 forwarding through the XDP balancer, with real clients and servers in the namespace lab.
//! Each test builds its own lab and tears it down, also when it fails. Needs root.

mod common;

use std::net::IpAddr;

use balancer_lab::{Lab, BACKEND_COUNT, VIP};
use common::{
    counters, download_of_100_mb_is_intact, get, lab_with_balancer, new_connections_spread, python,
    run, udp_echo_through, upload_of_100_mb_is_intact, vip_url,
};

#[test]
fn curl_to_the_vip_is_answered_by_a_backend() {
    let lab = lab_with_balancer();
    let body = get(&lab, &[], "/");
    let names: Vec<String> = (0..BACKEND_COUNT).map(Lab::backend_name).collect();
    assert!(
        names.iter().any(|n| body.trim() == n),
        "unexpected answer {body:?}"
    );
    assert!(
        counters(&lab)["forwarded"] > 0,
        "the answer did not go through XDP"
    );
}

#[test]
fn new_connections_spread_over_all_backends() {
    new_connections_spread(&lab_with_balancer(), IpAddr::from(VIP));
}

#[test]
fn download_of_100_mb_arrives_intact() {
    download_of_100_mb_is_intact(&lab_with_balancer(), &vip_url(""));
}

#[test]
fn upload_of_100_mb_arrives_intact() {
    upload_of_100_mb_is_intact(&lab_with_balancer(), &vip_url(""));
}

#[test]
fn udp_echo_through_the_vip() {
    let lab = lab_with_balancer();
    udp_echo_through(&lab, IpAddr::from(VIP));
    assert!(counters(&lab)["replied"] >= 20);
}

#[test]
fn balancer_host_keeps_answering_ping_and_tcp() {
    let mut lab = lab_with_balancer();
    let lb = lab.balancer_ns().to_owned();
    lab.spawn(&lb, &[
        "python3", "-c",
        "import socket\ns=socket.create_server(('198.18.0.1',2222))\nwhile True:\n c,_=s.accept(); c.sendall(b'balancer host\\n'); c.close()",
    ])
    .expect("starting a listener on the balancer host");
    run(
        &lab,
        lab.client_ns(),
        &["ping", "-c", "3", "-i", "0.2", "-W", "2", "198.18.0.1"],
    );
    let script = r#"
import socket, time
for attempt in range(50):
    try:
        s = socket.create_connection(("198.18.0.1", 2222), timeout=2)
        break
    except OSError:
        time.sleep(0.1)
print(s.recv(100).decode().strip())
"#;
    assert_eq!(
        python(&lab, lab.client_ns(), script).trim(),
        "balancer host"
    );
    let counters = counters(&lab);
    assert!(
        counters["pass_not_tcp_udp"] >= 3,
        "ping went through the program as ICMP"
    );
    assert!(
        counters["pass_not_service"] >= 1,
        "the TCP connection went through the program"
    );
}

#[test]
fn malformed_packets_are_counted_and_forwarding_continues() {
    let lab = lab_with_balancer();
    let before = counters(&lab);
    // Crafted with scapy on the client's link: each kind five times.
    let script = format!(
        r#"
from scapy.all import Ether, IP, TCP, UDP, Dot1Q, Raw, sendp, get_if_hwaddr, getmacbyip, conf
conf.verb = 0
gw = getmacbyip("198.18.0.1")
eth = Ether(dst=gw, src=get_if_hwaddr("eth0"), type=0x0800)
syn = IP(src="198.18.0.2", dst="{VIP}") / TCP(sport=31337, dport=80, flags="S")
frames = [
    Ether(dst=gw, src=get_if_hwaddr("eth0")) / Dot1Q(vlan=5) / syn,  # VLAN tag
    eth / IP(src="198.18.0.2", dst="{VIP}", options=b"\x01\x01\x01\x00") / TCP(dport=80, flags="S"),  # IP options
    eth / IP(src="198.18.0.2", dst="{VIP}", flags="MF", frag=0) / UDP(dport=7) / Raw(b"x" * 64),       # fragment
    eth / Raw(bytes(syn)[:12]),                                   # truncated IPv4 header
    eth / Raw(bytes(IP(src="198.18.0.2", dst="{VIP}", ihl=4, proto=6) / Raw(b"y" * 40))),             # IHL < 5
    eth / Raw(bytes(IP(src="198.18.0.2", dst="{VIP}", len=1400, proto=6) / Raw(b"z" * 20))),          # length beyond frame
    eth / Raw(bytes(IP(src="198.18.0.2", dst="{VIP}", proto=6, len=30) / Raw(b"t" * 10))),            # truncated TCP header
]
for f in frames:
    sendp(f, iface="eth0", count=5)
"#
    );
    // Debian's python3 carries scapy (python3-scapy).
    run(&lab, lab.client_ns(), &["/usr/bin/python3", "-c", &script]);
    // Counters are read right after the frames were sent on a veth: they are already counted.
    let after = counters(&lab);
    for (reason, sent, what) in [
        ("pass_vlan", 5, "VLAN-tagged frames"),
        ("pass_ip_options", 5, "IP options"),
        ("pass_fragment", 5, "fragments"),
        ("drop_truncated", 10, "truncated headers"),
        ("drop_bad_ip_header", 10, "bad IPv4 headers"),
    ] {
        let counted = after[reason] - before[reason];
        assert!(
            counted >= sent,
            "{what}: {counted} counted under {reason}, {sent} sent"
        );
    }

    let body = get(&lab, &[], "/");
    assert!(
        body.starts_with("backend-"),
        "forwarding after malformed input: {body:?}"
    );
}

#[test]
fn a_direct_connection_that_reuses_an_old_vip_flows_port_is_not_rewritten() {
    let lab = lab_with_balancer();
    // Both connections from port 40003: first through the VIP, then straight to the backend
    // that answered, which sees the same 4-tuple twice. SO_REUSEADDR lets the second bind
    // while the first waits in TIME_WAIT.
    let script = format!(
        r#"
import socket
def get(host):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", 40003))
    s.settimeout(10)
    s.connect((host, 80))
    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    data = b""
    while True:
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    s.close()
    return data.split(b"\r\n\r\n", 1)[1].decode().strip()
via_vip = get("{VIP}")
backends = {{{backends}}}
print(via_vip, get(backends[via_vip]))
"#,
        backends = (0..BACKEND_COUNT)
            .map(|i| format!("\"{}\": \"{}\"", Lab::backend_name(i), Lab::backend_addr(i)))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let answer = python(&lab, lab.client_ns(), &script);
    let words: Vec<&str> = answer.split_whitespace().collect();
    assert_eq!(words.len(), 2, "{answer}");
    assert_eq!(
        words[0], words[1],
        "the direct connection reached another backend"
    );
}
