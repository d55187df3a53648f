//! Full NAT: the backends see one of the balancer's own addresses and need no route back
//! through it (here they have none but their own network), on L4 services (XDP claims the
//! source) and cookie services (the agent does); the client's address reaches them in a
//! PROXY protocol v2 header, read by a real nginx. Both families. Needs root.

mod common;

use std::{net::IpAddr, time::Duration};

use balancer_lab::{
    Lab, ServiceOptions, BACKEND_COUNT, BALANCER_BACKEND_ADDR, BALANCER_BACKEND_ADDR6, CLIENT_ADDR,
    CLIENT_ADDR6, VIP, VIP6,
};
use common::*;

const NAT_PORTS: &str = "nat_ports = \"20000-29999\"\n";
const SOURCE_NETWORKS: &str =
    "[[source_network]]\nnetwork = \"198.19.0.0/24\"\naddresses = [\"198.19.0.1\"]\n\
    [[source_network]]\nnetwork = \"2001:db8:b::/64\"\naddresses = [\"2001:db8:b::1\"]\n";

const FULL_NAT_LB_COOKIE: &str = "affinity = \"lb-cookie\"\nnat = \"full\"\n\
    [service.health_check]\nkind = \"http\"\ninterval = 0.5\ntimeout = 0.5\nfall = 2\nrise = 2\n";

/// A lab whose `web` and `web-v6` are full-NAT lb-cookie services and whose backends reach
/// nothing beyond their own network.
fn full_nat_lab(extra_tables: &str) -> Lab {
    full_nat_lab_with(FULL_NAT_LB_COOKIE, extra_tables)
}

/// [`full_nat_lab`] with other settings for `web` and `web-v6`.
fn full_nat_lab_with(web_settings: &str, extra_tables: &str) -> Lab {
    let lab = lab_with_settings(
        NAT_PORTS,
        &ServiceOptions {
            web_settings: web_settings.to_owned(),
            web6_settings: web_settings.to_owned(),
            extra_tables: format!("{SOURCE_NETWORKS}{extra_tables}"),
            ..ServiceOptions::default()
        },
    );
    lab.route_backends_away()
        .expect("taking the backends' routes away");
    for target in [CLIENT_ADDR.to_string(), CLIENT_ADDR6.to_string()] {
        let route = lab
            .exec(lab.backend_ns(0), &["ip", "route", "get", &target])
            .expect("ip");
        assert!(
            !route.status.success(),
            "a backend still has a route to the client {target}"
        );
    }
    lab
}

#[test]
fn full_nat_l4_flows_reach_backends_without_a_route_back_over_ipv4_and_ipv6() {
    let udp = |name: &str, vip: String, backends: [String; 3]| {
        let mut toml = format!(
            "\n[[service]]\nname = \"{name}\"\nvip = \"{vip}\"\nport = 9007\nprotocol = \"udp\"\nnat = \"full\"\n"
        );
        for (index, addr) in backends.iter().enumerate() {
            toml += &format!(
                "  [[service.backend]]\n  name = \"{}\"\n  address = \"{addr}\"\n  port = 7\n",
                Lab::backend_name(index)
            );
        }
        toml
    };
    let services = udp(
        "udp-full",
        VIP.to_string(),
        [0, 1, 2].map(|i| Lab::backend_addr(i).to_string()),
    ) + &udp(
        "udp-full-v6",
        VIP6.to_string(),
        [0, 1, 2].map(|i| Lab::backend_addr6(i).to_string()),
    );
    let lab = full_nat_lab_with("nat = \"full\"\n", &services);
    for (vip, url, source) in [
        (
            IpAddr::from(VIP),
            vip_url(""),
            BALANCER_BACKEND_ADDR.to_string(),
        ),
        (
            IpAddr::from(VIP6),
            vip6_url(""),
            BALANCER_BACKEND_ADDR6.to_string(),
        ),
    ] {
        let before = counters(&lab);
        let peer = get_at(&lab, &format!("{url}/peer"), &[]);
        let (addr, port) = peer.split_once(' ').expect("<ip> <port>");
        assert_eq!(addr, source, "{vip}: the backend saw {peer}");
        let port: u16 = port.parse().expect("a port");
        assert!(
            (20000..=29999).contains(&port),
            "{vip}: source port {port} outside nat_ports"
        );
        assert!(
            counters(&lab)["forwarded"] > before["forwarded"],
            "{vip}: not forwarded by XDP"
        );
        new_connections_spread(&lab, vip);
        download_of_100_mb_is_intact(&lab, &url);
        upload_of_100_mb_is_intact(&lab, &url);
        udp_echo_through_port(&lab, vip, 9007);
    }
    assert_eq!(counters(&lab)["refused_no_nat_port"], 0);
}

#[test]
fn full_nat_cookie_sessions_reach_backends_without_a_route_back_over_ipv4_and_ipv6() {
    let mut lab = full_nat_lab("");
    for (url, source, service) in [
        (vip_url(""), BALANCER_BACKEND_ADDR.to_string(), "web"),
        (vip6_url(""), BALANCER_BACKEND_ADDR6.to_string(), "web-v6"),
    ] {
        // What the backend sees on the wire: the balancer's address, a port of nat_ports.
        let peer = get_at(&lab, &format!("{url}/peer"), &[]);
        let (addr, port) = peer.split_once(' ').expect("<ip> <port>");
        assert_eq!(addr, source, "{service}: the backend saw {peer}");
        let port: u16 = port.parse().expect("a port");
        assert!(
            (20000..=29999).contains(&port),
            "{service}: source port {port} outside nat_ports"
        );

        let backends = lb_cookie_jars_stick(&lab, &format!("{url}/"), 30);
        assert_eq!(
            backends.len(),
            BACKEND_COUNT,
            "{service}: 30 sessions over every backend"
        );
        integrity_run_at(&lab, &url, &SIZES, 200, true, "LBSESSION=absent");
        integrity_run_at(&lab, &url, &SIZES, 100, false, "LBSESSION=absent");
    }
    // The failover runs last: it stops backend-3.
    sessions_stick_and_move_with_a_new_cookie(&mut lab, &vip6_url("/"), "web-v6");
}

#[test]
fn an_nginx_backend_reads_the_clients_address_from_the_proxy_protocol_header() {
    // On 8090 a cookie service (the agent writes the header), on 8092 an L4 one (XDP does).
    let proxied = |name: &str, port: u16, affinity: &str, vip: String, backend: String| {
        format!(
            "\n[[service]]\nname = \"{name}\"\nvip = \"{vip}\"\nport = {port}\nprotocol = \"tcp\"\n\
             affinity = \"{affinity}\"\nnat = \"full\"\nproxy_protocol = true\n\
             [[service.backend]]\nname = \"nginx\"\naddress = \"{backend}\"\nport = 8090\n"
        )
    };
    let mut services = String::new();
    for (port, affinity) in [(8090, "lb-cookie"), (8092, "flow")] {
        let v4 = (VIP.to_string(), Lab::backend_addr(0).to_string());
        let v6 = (VIP6.to_string(), Lab::backend_addr6(0).to_string());
        services += &proxied(&format!("proxied-{port}"), port, affinity, v4.0, v4.1);
        services += &proxied(&format!("proxied-{port}-v6"), port, affinity, v6.0, v6.1);
    }
    let mut lab = full_nat_lab(&services);
    let dir = lab.dir().to_owned();
    let log = dir.join("nginx-access.log");
    let conf = dir.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "user root;\nworker_processes 1;\ndaemon off;\npid {dir}/nginx.pid;\n\
             error_log {dir}/nginx-error.log;\nevents {{}}\nhttp {{\n\
             log_format proxied '$proxy_protocol_addr $proxy_protocol_port $remote_addr';\n\
             access_log {log} proxied;\n\
             server {{\n listen 8090 proxy_protocol;\n listen [::]:8090 proxy_protocol;\n\
             location / {{ return 200 \"nginx\\n\"; }}\n}}\n}}\n",
            dir = dir.display(),
            log = log.display()
        ),
    )
    .expect("writing nginx.conf");
    let backend = lab.backend_ns(0).to_owned();
    let conf = conf.to_str().expect("utf-8").to_owned();
    let prefix = format!("{}/", dir.display());
    lab.spawn(&backend, &["nginx", "-c", &conf, "-p", &prefix])
        .expect("starting nginx");
    wait_until(Duration::from_secs(10), "nginx listening on 8090", || {
        lab.exec(&backend, &["nc", "-z", "127.0.0.1", "8090"])
            .is_ok_and(|o| o.status.success())
    });

    let cases = [8090, 8092].into_iter().flat_map(|port| {
        [
            (
                format!("http://{VIP}:{port}/"),
                CLIENT_ADDR.to_string(),
                BALANCER_BACKEND_ADDR.to_string(),
            ),
            (
                format!("http://[{VIP6}]:{port}/"),
                CLIENT_ADDR6.to_string(),
                BALANCER_BACKEND_ADDR6.to_string(),
            ),
        ]
    });
    for (url, client, source) in cases {
        let lines_before = std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .count();
        let script = format!(
            r#"
import urllib.request
r = urllib.request.urlopen("{url}", timeout=10)
print(r.read().decode().strip())
"#
        );
        assert_eq!(
            python(&lab, lab.client_ns(), &script).trim(),
            "nginx",
            "{url}"
        );
        wait_until(Duration::from_secs(5), "nginx's access log line", || {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .lines()
                .count()
                > lines_before
        });
        let text = std::fs::read_to_string(&log).expect("reading nginx's log");
        let line = text.lines().last().expect("a line");
        let words: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(words.len(), 3, "{line}");
        assert_eq!(words[0], client, "nginx's $proxy_protocol_addr: {line}");
        let client_port: u16 = words[1].parse().expect("$proxy_protocol_port");
        assert!(
            client_port >= 10000,
            "the client's ephemeral port, got {line}"
        );
        assert_eq!(
            words[2], source,
            "nginx's $remote_addr, the balancer: {line}"
        );
    }
}

#[test]
fn l4_flows_carry_the_clients_address_to_the_backends_in_a_proxy_header() {
    let lab = full_nat_lab(&proxied_l4_services());
    let connections = 30;
    for (vip, base) in proxied_l4_vips() {
        let before = counters(&lab);
        proxy_headers_name_their_clients(&lab, vip, connections);
        let after = counters(&lab);
        assert_eq!(
            after["proxy_header_inserted"] - before["proxy_header_inserted"],
            connections as u64,
            "one header per connection ({vip})"
        );
        download_of_100_mb_is_intact(&lab, &base);
        upload_of_100_mb_is_intact(&lab, &base);
    }
    assert_eq!(counters(&lab)["drop_proxy_header"], 0);
}

#[test]
fn l4_proxy_headers_and_bytes_survive_loss_and_reordering_on_the_client_link() {
    let lab = impaired_lab_with_settings(
        NAT_PORTS,
        &ServiceOptions {
            extra_tables: format!("{SOURCE_NETWORKS}{}", proxied_l4_services()),
            ..ServiceOptions::default()
        },
        &lossy(),
    );
    lab.route_backends_away()
        .expect("taking the backends' routes away");
    for (vip, base) in proxied_l4_vips() {
        // A lost first segment comes again and gets the header again; a lost header-bearing
        // one is never half there.
        proxy_headers_name_their_clients(&lab, vip, 200);
        integrity_run_at(&lab, &base, &SIZES, 60, false, "");
    }
    assert_relay_was_lossy(&lab);
    assert_eq!(counters(&lab)["drop_proxy_header"], 0);
}

/// L4 TCP services on port 8091 of both VIPs, full NAT with the PROXY header, to the lab
/// backends' PROXY port.
fn proxied_l4_services() -> String {
    let proxied = |name: &str, vip: String, backends: [String; 3]| {
        let mut toml = format!(
            "\n[[service]]\nname = \"{name}\"\nvip = \"{vip}\"\nport = 8091\nprotocol = \"tcp\"\n\
             nat = \"full\"\nproxy_protocol = true\n"
        );
        for (i, address) in backends.iter().enumerate() {
            toml += &format!(
                "[[service.backend]]\nname = \"backend-{}\"\naddress = \"{address}\"\nport = 8091\n",
                i + 1
            );
        }
        toml
    };
    proxied(
        "proxied",
        VIP.to_string(),
        std::array::from_fn(|i| Lab::backend_addr(i).to_string()),
    ) + &proxied(
        "proxied-v6",
        VIP6.to_string(),
        std::array::from_fn(|i| Lab::backend_addr6(i).to_string()),
    )
}

/// The VIPs of [`proxied_l4_services`], each with its base URL.
fn proxied_l4_vips() -> [(IpAddr, String); 2] {
    [
        (IpAddr::from(VIP), format!("http://{VIP}:8091")),
        (IpAddr::from(VIP6), format!("http://[{VIP6}]:8091")),
    ]
}

/// `connections` connections to port 8091 of `vip`, each answered by a backend that read
/// the client's own address and port from the PROXY header, and saw the connection come from
/// the balancer's address and a port of `nat_ports`. The last asks with a head of 6,000
/// bytes, so its first segment is a full one (the backend's SYN-ACK offered an MSS with room
/// for the header).
fn proxy_headers_name_their_clients(lab: &Lab, vip: IpAddr, connections: usize) {
    let (client, source) = if vip.is_ipv4() {
        (CLIENT_ADDR.to_string(), BALANCER_BACKEND_ADDR.to_string())
    } else {
        (CLIENT_ADDR6.to_string(), BALANCER_BACKEND_ADDR6.to_string())
    };
    let script = format!(
        r#"
import http.client
for i in range({connections}):
    c = http.client.HTTPConnection("{vip}", 8091, timeout=10)
    c.connect()
    port = c.sock.getsockname()[1]
    headers = {{"Connection": "close"}}
    if i == {connections} - 1:
        headers["X-Fill"] = "f" * 6000
    c.request("GET", "/peer", headers=headers)
    print(c.getresponse().read().decode().strip(), port)
    c.close()
"#
    );
    let answers = python(lab, lab.client_ns(), &script);
    let lines: Vec<&str> = answers.lines().collect();
    assert_eq!(lines.len(), connections, "{answers}");
    for line in lines {
        let words: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(
            words.len(),
            6,
            "<client> <port> via <wire> <port> <own port>: {line}"
        );
        assert_eq!(words[0], client, "the header's client address: {line}");
        assert_eq!(words[1], words[5], "the header's client port: {line}");
        assert_eq!(
            words[3], source,
            "the balancer's address on the wire: {line}"
        );
        let wire_port: u16 = words[4].parse().expect("a port");
        assert!(
            (20000..=29999).contains(&wire_port),
            "a port of nat_ports on the wire: {line}"
        );
    }
}

#[test]
fn sixty_thousand_connections_to_one_backend_each_come_from_a_source_of_their_own() {
    // XDP's own flows (claimed in XDP), then a cookie service's (claimed by the agent).
    for affinity in ["flow", "lb-cookie"] {
        sixty_thousand_connections(affinity);
    }
}

fn sixty_thousand_connections(affinity: &str) {
    // Two addresses × 50,000 ports: every connection can get a source no other has had,
    // however the new flows fall on the CPUs (they share one cursor). The
    // addresses are the balancer's alone: the host's own connections leave from its first
    // address on the link, and the lab's readiness check left a connection from there in
    // TIME_WAIT at the backend, from a port of the range, before the range was reserved.
    let lab = lab_with_settings(
        "nat_ports = \"10000-59999\"\n",
        &ServiceOptions {
            web_settings: format!("affinity = \"{affinity}\"\nnat = \"full\"\n"),
            web_backend_count: Some(1),
            extra_tables: "[[source_network]]\nnetwork = \"198.19.0.0/24\"\n\
                           addresses = [\"198.19.0.2\", \"198.19.0.3\"]\n"
                .to_owned(),
            ..ServiceOptions::default()
        },
    );
    for address in ["198.19.0.2/24", "198.19.0.3/24"] {
        run(
            &lab,
            lab.balancer_ns(),
            &["ip", "addr", "add", address, "dev", "lb-backend"],
        );
    }
    lab.route_backends_away()
        .expect("taking the backends' routes away");
    let connections = 60_000;
    let before = backend_peers(&lab, 50001);
    let urls = lab.dir().join("urls.txt");
    let list: String = (0..connections)
        .map(|_| format!("url = \"{}\"\n", vip_url("/")))
        .collect();
    std::fs::write(&urls, list).expect("writing the URL list");
    // curl in parallel, a new connection each (the backend closes after its answer).
    let codes = run(
        &lab,
        lab.client_ns(),
        &[
            "curl",
            "-sS",
            "--no-progress-meter",
            "--parallel",
            "--parallel-max",
            "32",
            // Per connection: a total limit would count the queue's wait too.
            "--connect-timeout",
            "10",
            "-H",
            "Connection: close",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}\n",
            "--config",
            urls.to_str().expect("utf-8 path"),
        ],
    );
    let answered = codes.lines().filter(|code| *code == "200").count() as u64;
    assert_eq!(
        answered, connections,
        "{affinity}: connections answered 200"
    );
    let after = backend_peers(&lab, 50002);
    // Each query is a connection too, from a source of its own; `before`'s came earlier.
    assert_eq!(
        after.1 - before.1,
        connections + 1,
        "connections the backend accepted"
    );
    assert_eq!(
        after.0 - before.0,
        connections + 1,
        "{affinity}: sources that came more than once (ms since the backend started):\n{}",
        after.2
    );
}

/// Backend-1's count of distinct sources and of HTTP connections so far, and its lines
/// naming the sources that came more than once, asked straight from
/// the balancer host over IPv6 from `port` (the query is a connection too, from a source
/// the full-NAT connections, all IPv4, never have).
fn backend_peers(lab: &Lab, port: u16) -> (u64, u64, String) {
    let url = format!("http://[{}]/peers", Lab::backend_addr6(0));
    let port = port.to_string();
    let args = [
        "curl",
        "-sS",
        "--max-time",
        "10",
        "--local-port",
        &port,
        &url,
    ];
    let peers = run(lab, lab.balancer_ns(), &args);
    let (counts, repeated) = peers.split_once('\n').expect("a line of counts");
    let (distinct, seen) = counts.split_once(' ').expect("<distinct> <connections>");
    (
        distinct.parse().expect("a count"),
        seen.parse().expect("a count"),
        repeated.to_owned(),
    )
}
