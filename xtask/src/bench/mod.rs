//! `cargo xtask bench`: the same workloads over the plain routed path, through the balancer
//! and through the peers users would pick instead (nftables DNAT, HAProxy, nginx), all
//! interleaved round by round in one lab, with medians, spread, latency percentiles, CPU time
//! per unit of work and the CPU steal seen. `docs/benchmarks.md` describes the method.
//!
//! Systems from the client to one backend each (the VIP's `web` service has only backend-1
//! here, so every L4 path ends at the same server and the ratio measures the path):
//! - routed, no XDP: to 198.19.0.11 while the agent is stopped (it detaches on exit), i.e.
//!   plain kernel forwarding in the balancer namespace;
//! - through the VIP: to 203.0.113.10 with the agent running (XDP NAT + redirect);
//! - routed, XDP attached: to 198.19.0.11 with the agent running (the cost the program adds
//!   to traffic that is not for a VIP and passes to the kernel);
//! - through the cookie VIP: to 203.0.113.10:8080, the `web-cookie` service (app-cookie
//!   affinity: XDP answers the handshake, the agent binds each new connection from its
//!   cookie, XDP splices it), with the cookie of a returning session on every request; it
//!   ends at backend-3, the same server program on the same kind of link, because the
//!   TIME_WAIT sockets its connections leave on a backend (without TCP timestamps) would stall
//!   the VIP path's new connections from the same client ports;
//! - through the lb-cookie VIP: to 203.0.113.10:8081, the `web-lb-cookie` service on
//!   backend-2, with no cookie: every connection is a new session, so the agent also reads the
//!   first response head and adds the balancer's Set-Cookie, and XDP splices the rest with the
//!   added bytes as a second offset (the costliest cookie path);
//! - through the full-NAT lb-cookie VIP: to 203.0.113.10:8082, the `web-lb-cookie-full-nat`
//!   service on backend-1, as the lb-cookie VIP but with the backend side opened from the
//!   balancer's own 198.19.0.1 and a port of `nat_ports`: the backend sees no client address,
//!   so its TIME_WAIT sockets cannot meet the L4 paths' connections;
//! - routed IPv6, no XDP: to 2001:db8:b::11, backend-1's IPv6 address, while the agent is
//!   stopped;
//! - through the IPv6 VIP: to 2001:db8:f::10 with the agent running, the `web-v6` service
//!   over backend-1 alone (its ratios are to routed IPv6).
//!
//! - trivial XDP router: to 198.19.0.11 with the agent stopped and a program that only does a
//!   FIB lookup and redirects attached on both of the balancer host's interfaces;
//! - the peers ([`peers`]): on 203.0.113.20, to backend-1, while the agent is stopped.
//!
//! The routed paths and the peers use client addresses of their own (see [`ROUTED_SOURCE`],
//! [`ROUTED_SOURCE6`] and [`peers::PEER_SOURCE`]).

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    process::Command,
    time::Duration,
};

use anyhow::{bail, Context, Result};
use balancer_lab::{
    Lab, ServiceOptions, BALANCER_BACKEND_ADDR, BALANCER_CLIENT_ADDR, BALANCER_CLIENT_ADDR6,
    COOKIE_PORT, HTTP_PORT, LB_COOKIE_PORT, VIP, VIP6,
};

use crate::{build, run, toolchain};

mod agent_profile;
mod peers;
mod report;
pub mod workers;

use peers::{Peer, PEER_ADDR};

/// Runs above this much CPU steal are flagged: the host took the CPUs away.
const STEAL_WARNING_PERCENT: f64 = 10.0;
/// How long a client command may run past its own duration before it is killed.
const OVERRUN_SECONDS: u64 = 10;
/// The client's source address towards the backend network on the routed paths, apart from
/// the one it uses for the VIP: otherwise a routed connection from a port that an earlier VIP
/// flow used meets that flow's reverse entry, and the program rewrites the backend's reply
/// to come from the VIP (the client then resets it).
const ROUTED_SOURCE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 3);
/// [`ROUTED_SOURCE`] for routed IPv6, apart from the client's address for the IPv6 VIP.
const ROUTED_SOURCE6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xc, 0, 0, 0, 0, 3);

#[derive(Clone, Copy, PartialEq, Debug)]
enum System {
    Routed,
    Vip,
    /// [`System::Vip`] while a scraper fetches the agent's metrics every second.
    VipScraped,
    RoutedWithXdp,
    CookieVip,
    LbCookieVip,
    /// [`System::LbCookieVip`] while a scraper fetches the agent's metrics every second.
    LbCookieVipScraped,
    FullNatCookieVip,
    /// Kernel forwarding to backend-1's IPv6 address, the IPv6 VIP's baseline.
    Routed6,
    Vip6,
    /// The trivial XDP router on the routed path, the ceiling of XDP forwarding here.
    XdpRouter,
    Peer(Peer),
}

/// In the order of a round: the agent is stopped for the routed path and the peers, then
/// started for the balancer's paths.
const SYSTEMS: [System; 15] = [
    System::Routed,
    System::Routed6,
    System::XdpRouter,
    System::Peer(Peer::NftNumgen),
    System::Peer(Peer::NftJhash),
    System::Peer(Peer::Haproxy),
    System::Peer(Peer::Nginx),
    System::Vip,
    System::VipScraped,
    System::Vip6,
    System::RoutedWithXdp,
    System::CookieVip,
    System::LbCookieVip,
    System::LbCookieVipScraped,
    System::FullNatCookieVip,
];
/// Where the benchmark's agent serves its metrics, in the balancer's namespace.
const METRICS_ADDR: &str = "127.0.0.1:9469";
/// The UDP port of the packet-rate workload: the `discard-udp` service on the VIP, and
/// nothing listening at the backend (which answers with rate-limited ICMP).
const DISCARD_PORT: u16 = 9;
/// The service the packet-rate workload sends through on a VIP, over backend-1 alone.
fn discard_service(name: &str, vip: IpAddr, backend: IpAddr) -> String {
    format!(
        "\n[[service]]\nname = \"{name}\"\nvip = \"{vip}\"\nport = {DISCARD_PORT}\nprotocol = \"udp\"\n  [[service.backend]]\n  name = \"{}\"\n  address = \"{backend}\"\n",
        Lab::backend_name(0),
    )
}
/// The VIP port of the full-NAT lb-cookie service.
const FULL_NAT_PORT: u16 = 8082;
/// An lb-cookie service with full NAT over backend-1, with the balancer's backend-side
/// address as the source its connections come from (the default `nat_ports`, below the
/// ephemeral ports of the peers' own backend connections from that address).
fn full_nat_service() -> String {
    format!(
        "\n[[source_network]]\nnetwork = \"{BALANCER_BACKEND_ADDR}/24\"\naddresses = [\"{BALANCER_BACKEND_ADDR}\"]\n\
         \n[[service]]\nname = \"web-lb-cookie-full-nat\"\nvip = \"{VIP}\"\nport = {FULL_NAT_PORT}\nprotocol = \"tcp\"\naffinity = \"lb-cookie\"\nnat = \"full\"\n  [[service.backend]]\n  name = \"{}\"\n  address = \"{}\"\n  port = {HTTP_PORT}\n",
        Lab::backend_name(0),
        Lab::backend_addr(0)
    )
}
/// The cookie a returning session sends on the cookie path.
const SESSION_COOKIE: &str = "Cookie: SID=bench-session";

/// What `cargo xtask bench` is asked to do.
pub struct Options {
    pub quick: bool,
    /// Short names of the systems to measure ([`System::key`]); empty: all of them.
    pub only: Vec<String>,
    /// Count the agent's system calls per new connection on the cookie paths.
    pub syscalls: bool,
}

impl System {
    /// The short name `--only` takes.
    fn key(self) -> &'static str {
        match self {
            System::Routed => "routed",
            System::Vip => "vip",
            System::VipScraped => "vip-scraped",
            System::RoutedWithXdp => "routed-xdp",
            System::CookieVip => "cookie",
            System::LbCookieVip => "lb-cookie",
            System::LbCookieVipScraped => "lb-cookie-scraped",
            System::FullNatCookieVip => "full-nat",
            System::Routed6 => "routed6",
            System::Vip6 => "vip6",
            System::XdpRouter => "xdp-router",
            System::Peer(Peer::NftNumgen) => "nft-numgen",
            System::Peer(Peer::NftJhash) => "nft-jhash",
            System::Peer(Peer::Haproxy) => "haproxy",
            System::Peer(Peer::Nginx) => "nginx",
        }
    }

    /// Whether new connections on this path are bound by the agent.
    fn binds_in_agent(self) -> bool {
        matches!(
            self,
            System::CookieVip
                | System::LbCookieVip
                | System::LbCookieVipScraped
                | System::FullNatCookieVip
        )
    }

    fn title(self) -> &'static str {
        match self {
            System::Routed => "routed, no XDP",
            System::Vip => "through the VIP",
            System::VipScraped => "through the VIP, metrics scraped 1/s",
            System::RoutedWithXdp => "routed, XDP attached",
            System::CookieVip => "cookie VIP, returning sessions",
            System::LbCookieVip => "lb-cookie VIP, new sessions",
            System::LbCookieVipScraped => "lb-cookie VIP, new, scraped 1/s",
            System::FullNatCookieVip => "full-NAT lb-cookie VIP, new sessions",
            System::Routed6 => "routed IPv6, no XDP",
            System::Vip6 => "through the IPv6 VIP",
            System::XdpRouter => "trivial XDP router (FIB + redirect)",
            System::Peer(peer) => peer.title(),
        }
    }

    fn address(self) -> String {
        match self {
            System::Vip | System::VipScraped => VIP.to_string(),
            System::CookieVip => format!("{VIP}:{COOKIE_PORT}"),
            System::LbCookieVip | System::LbCookieVipScraped => format!("{VIP}:{LB_COOKIE_PORT}"),
            System::FullNatCookieVip => format!("{VIP}:{FULL_NAT_PORT}"),
            System::Routed | System::RoutedWithXdp | System::XdpRouter => {
                Lab::backend_addr(0).to_string()
            }
            System::Routed6 => format!("[{}]", Lab::backend_addr6(0)),
            System::Vip6 => format!("[{VIP6}]"),
            System::Peer(_) => PEER_ADDR.to_string(),
        }
    }

    /// Headers every request on this path carries.
    fn headers(self) -> &'static [&'static str] {
        match self {
            System::CookieVip => &["-H", SESSION_COOKIE],
            _ => &[],
        }
    }

    /// Where the packet-rate workload sends: a port nothing listens on at backend-1, through
    /// this system. The HTTP proxies have no UDP path.
    fn udp_address(self) -> Option<SocketAddr> {
        let host = match self {
            System::Routed | System::RoutedWithXdp | System::XdpRouter => {
                IpAddr::from(Lab::backend_addr(0))
            }
            System::Vip | System::VipScraped => IpAddr::from(VIP),
            System::Routed6 => IpAddr::from(Lab::backend_addr6(0)),
            System::Vip6 => IpAddr::from(VIP6),
            System::Peer(Peer::NftNumgen | Peer::NftJhash) => IpAddr::from(PEER_ADDR),
            _ => return None,
        };
        Some(SocketAddr::new(host, DISCARD_PORT))
    }

    /// Whether a scraper fetches the agent's metrics every second during the measurement.
    fn scraped(self) -> bool {
        matches!(self, System::VipScraped | System::LbCookieVipScraped)
    }

    /// Whether the balancer's agent (and so its XDP program) runs during the measurement.
    fn with_agent(self) -> bool {
        matches!(
            self,
            System::Vip
                | System::VipScraped
                | System::Vip6
                | System::RoutedWithXdp
                | System::CookieVip
                | System::LbCookieVip
                | System::LbCookieVipScraped
                | System::FullNatCookieVip
        )
    }

    /// The routed path its ratios are to: kernel forwarding in its own address family.
    fn routed_baseline(self) -> System {
        match self {
            System::Routed6 | System::Vip6 => System::Routed6,
            _ => System::Routed,
        }
    }
}

struct Workload {
    name: &'static str,
    /// Unit of the rate.
    unit: &'static str,
    /// What one unit of work is, for the CPU cost column.
    work: &'static str,
    /// Units of work per unit of rate and second (1 for req/s; 1/8 MB per Mbit/s).
    work_per_rate_second: f64,
    /// Measures a system for a number of seconds.
    measure: fn(&Lab, System, u32) -> Result<Measured>,
    /// Whether the workload means something for a system.
    applies: fn(System) -> bool,
}

const WORKLOADS: [Workload; 4] = [
    Workload {
        name: "HTTP keep-alive (wrk, 32 connections)",
        unit: "req/s",
        work: "request",
        work_per_rate_second: 1.0,
        measure: keepalive_rps,
        applies: |_| true,
    },
    Workload {
        name: "HTTP, new connection per request (wrk)",
        unit: "conn/s",
        work: "connection",
        work_per_rate_second: 1.0,
        measure: new_connections_rps,
        applies: |_| true,
    },
    Workload {
        name: "TCP bulk download (curl, 1 stream)",
        unit: "Mbit/s",
        work: "MB",
        work_per_rate_second: 1.0 / 8.0,
        measure: bulk_mbits,
        applies: |_| true,
    },
    Workload {
        name: "UDP 64-byte frames (lab-flood, 2 flows)",
        unit: "pkt/s",
        work: "packet",
        work_per_rate_second: 1.0,
        measure: udp_pps,
        applies: |system| system.udp_address().is_some(),
    },
];

/// What a load tool reports: the rate, and latency percentiles when it measures them.
struct Measured {
    rate: f64,
    /// Median and 99th percentile request latency, in microseconds (NaN: not measured).
    p50_us: f64,
    p99_us: f64,
}

impl Measured {
    fn rate(rate: f64) -> Self {
        Self {
            rate,
            p50_us: f64::NAN,
            p99_us: f64::NAN,
        }
    }
}

/// One measurement: the rate and what the machine did meanwhile.
#[derive(Clone, Copy)]
struct Sample {
    rate: f64,
    p50_us: f64,
    p99_us: f64,
    /// Run time of the XDP program per packet it ran on, in nanoseconds (NaN without one).
    xdp_ns_per_packet: f64,
    /// Machine-wide busy CPU time per unit of work, in microseconds.
    cpu_us_per_work: f64,
    /// The agent's own CPU time per unit of work, in microseconds (NaN when it is stopped).
    agent_us_per_work: f64,
    steal_percent: f64,
}

/// The systems `only` names, in the order of a round (all of them when it is empty).
fn chosen_systems(only: &[String]) -> Result<Vec<System>> {
    if let Some(unknown) = only
        .iter()
        .find(|name| !SYSTEMS.iter().any(|s| s.key() == name.as_str()))
    {
        let known: Vec<&str> = SYSTEMS.iter().map(|s| s.key()).collect();
        bail!(
            "--only: no system {unknown:?} (known: {})",
            known.join(", ")
        );
    }
    Ok(SYSTEMS
        .into_iter()
        .filter(|s| only.is_empty() || only.iter().any(|name| name == s.key()))
        .collect())
}

pub fn run(asked: &Options) -> Result<()> {
    if !toolchain::is_root() {
        bail!("the benchmark builds network namespaces and attaches XDP programs: run it as root");
    }
    let systems = chosen_systems(&asked.only)?;
    let quick = asked.quick;
    let artifacts = build::all()?;
    toolchain::ensure_lab()?;
    let (seconds, rounds) = if quick { (2, 1) } else { (3, 5) };
    let skipped = peers::ensure_installed();
    let _stats = BpfStats::enable();
    let router = artifacts.ebpf_object.with_file_name("xdp-router");

    println!("==> lookup table build for 1,000 backends (balancer table-plan)");
    match Command::new(&artifacts.balancer)
        .args(["table-plan", "--backends", "1000"])
        .output()
    {
        Ok(plan) if plan.status.success() => print!("{}", String::from_utf8_lossy(&plan.stdout)),
        _ => println!("  (table-plan failed; skipped)"),
    }

    println!(
        "==> building the lab; the VIP's web service gets backend-1 only, like the routed path"
    );
    // Ctrl-C ends the run after the current measurement, and the lab is removed.
    run::catch_stop_signals();
    let mut lab = Lab::new()?;
    lab.add_client_addresses(&[ROUTED_SOURCE, peers::PEER_SOURCE])?;
    lab.add_client_addresses6(&[ROUTED_SOURCE6])?;
    let routes: [(IpAddr, IpAddr); 3] = [
        (Lab::backend_addr(0).into(), ROUTED_SOURCE.into()),
        (PEER_ADDR.into(), peers::PEER_SOURCE.into()),
        (Lab::backend_addr6(0).into(), ROUTED_SOURCE6.into()),
    ];
    for (destination, source) in routes {
        let (prefix, gateway) = match destination {
            IpAddr::V4(_) => (32, IpAddr::from(BALANCER_CLIENT_ADDR)),
            IpAddr::V6(_) => (128, IpAddr::from(BALANCER_CLIENT_ADDR6)),
        };
        lab.exec_checked(
            lab.client_ns(),
            &[
                "ip",
                "route",
                "add",
                &format!("{destination}/{prefix}"),
                "via",
                &gateway.to_string(),
                "src",
                &source.to_string(),
            ],
        )?;
    }
    lab.start_backends(&artifacts.lab_backend)?;
    let config = lab.dir().join("balancer.toml");
    let discard_services = discard_service("discard-udp", VIP.into(), Lab::backend_addr(0).into())
        + &discard_service("discard-udp-v6", VIP6.into(), Lab::backend_addr6(0).into());
    let options = ServiceOptions {
        web_backend_count: Some(1),
        web6_backend_count: Some(1),
        cookie_service: true,
        lb_cookie_backend: Some(1),
        extra_tables: discard_services + &full_nat_service(),
        ..ServiceOptions::default()
    };
    // Metrics on for every balancer system; only the scraped ones are asked for them.
    let text = format!(
        "metrics = \"{METRICS_ADDR}\"\n{}",
        lab.balancer_config_with(&options)
    );
    std::fs::write(&config, text).context("writing the benchmark's balancer config")?;

    lab.exec_checked(
        lab.balancer_ns(),
        &["ip", "addr", "add", &format!("{PEER_ADDR}/32"), "dev", "lo"],
    )?;

    // samples[workload][system]
    let mut samples = vec![vec![Vec::<Sample>::new(); SYSTEMS.len()]; WORKLOADS.len()];
    let mut agent_running = true;
    for round in 1..=rounds {
        println!("==> round {round}/{rounds} ({seconds} s per run)");
        for &system in &systems {
            if run::stop_requested() {
                drop(lab);
                bail!("stopped by a signal; the lab is removed");
            }
            if let System::Peer(peer) = system {
                if skipped.iter().any(|(p, _)| *p == peer) {
                    continue;
                }
            }
            if system.with_agent() != agent_running {
                if system.with_agent() {
                    lab.start_balancer(&artifacts.balancer, &config)?;
                } else {
                    // The peers run without the balancer's program on the interfaces.
                    lab.detach_balancer(&artifacts.balancer)?;
                }
                agent_running = system.with_agent();
            }
            let started = match system {
                System::Peer(peer) => peer.start(&mut lab).map(Some),
                System::XdpRouter => peers::attach_router(&lab, &router).map(|()| None),
                _ => Ok(None),
            };
            let running = match started {
                Ok(running) => running,
                Err(error) => {
                    println!("  {}: {error:#}", system.title());
                    continue;
                }
            };
            let scraper = if system.scraped() {
                Some(start_scraper(&mut lab, seconds)?)
            } else {
                None
            };
            measure_system(&lab, system, seconds, &mut samples)?;
            if let Some(pid) = scraper {
                lab.stop(pid)?;
            }
            if let Some(running) = running {
                running.stop(&mut lab);
            }
            if system == System::XdpRouter {
                peers::detach_router(&lab);
            }
        }
    }
    let syscalls = if asked.syscalls {
        count_syscalls(&mut lab, &artifacts.balancer, &config, &systems, seconds)?
            + &agent_profile::split_agent_cpu(
                &mut lab,
                &artifacts.balancer,
                &config,
                &systems,
                seconds,
            )?
    } else {
        String::new()
    };
    lab.stop_balancer()?;
    drop(lab);

    let report = report::tables(&samples, seconds, rounds, &skipped) + &syscalls;
    println!("\n{report}");
    match report::save(&report, &samples) {
        Ok(path) => println!("saved to {} (with plots beside it)", path.display()),
        Err(error) => println!("(not saved: {error:#})"),
    }
    let failed = samples
        .iter()
        .flatten()
        .flatten()
        .filter(|s| s.rate.is_nan())
        .count();
    if failed > 0 {
        bail!("{failed} run(s) failed (marked FAILED above): a path or a peer does not work");
    }
    Ok(())
}

/// The agent's system calls per new connection on each cookie path among `systems`: the
/// new-connection workload once more, with `strace -c -f` attached to the agent (all its
/// threads) for the run, its counts divided by the connections wrk made. As a Markdown
/// table.
fn count_syscalls(
    lab: &mut Lab,
    balancer: &std::path::Path,
    config: &std::path::Path,
    systems: &[System],
    seconds: u32,
) -> Result<String> {
    let mut rows = Vec::new();
    for &system in systems.iter().filter(|s| s.binds_in_agent()) {
        if lab.balancer_pid().is_none() {
            lab.start_balancer(balancer, config)?;
        }
        let pid = lab.balancer_pid().context("the agent is not running")?;
        let counts = lab.dir().join(format!("strace-{}.txt", system.key()));
        let ns = lab.balancer_ns().to_owned();
        let strace = lab.spawn(
            &ns,
            &[
                "strace",
                "-c",
                "-f",
                "-o",
                &counts.to_string_lossy(),
                "-p",
                &pid.to_string(),
            ],
        )?;
        // strace says nothing when it is attached; give it the time of a few punts' worth.
        std::thread::sleep(Duration::from_millis(500));
        let measured = new_connections_rps(lab, system, seconds);
        lab.stop(strace)?;
        let connections = measured?.rate * f64::from(seconds);
        let text = std::fs::read_to_string(&counts)
            .with_context(|| format!("reading strace's counts {}", counts.display()))?;
        rows.push((system, connections, parse_strace_counts(&text)));
    }
    let mut out = String::from(
        "\nThe agent's system calls per new connection (`strace -c -f` on the agent during one more new-connection run; strace slows the agent, so the rates of that run are not the ones above):\n\n| system | connections | calls per connection | of which |\n|---|---|---|---|\n",
    );
    for (system, connections, calls) in rows {
        let total: u64 = calls.iter().map(|(_, n)| n).sum();
        let by_name: Vec<String> = calls
            .iter()
            .filter(|(_, n)| *n as f64 / connections >= 0.05)
            .map(|(name, n)| format!("{name} {:.2}", *n as f64 / connections))
            .collect();
        out += &format!(
            "| {} | {connections:.0} | {:.2} | {} |\n",
            system.title(),
            total as f64 / connections,
            by_name.join(", ")
        );
    }
    println!("{out}");
    Ok(out)
}

/// The (system call, calls) lines of `strace -c`'s summary, most called first.
fn parse_strace_counts(text: &str) -> Vec<(String, u64)> {
    // % time     seconds  usecs/call     calls    errors syscall
    let mut counts: Vec<(String, u64)> = text
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let name = *fields.last()?;
            let calls = fields.get(3)?.parse().ok()?;
            (fields.len() >= 5 && name != "total").then(|| (name.to_owned(), calls))
        })
        .collect();
    counts.sort_by_key(|(_, calls)| std::cmp::Reverse(*calls));
    counts
}

/// Fetches the agent's metrics once a second in the balancer's namespace, as Prometheus
/// would, for at most as long as a system's workloads take; returns its PID.
fn start_scraper(lab: &mut Lab, seconds: u32) -> Result<u32> {
    let scrapes = (u64::from(seconds) + OVERRUN_SECONDS) * WORKLOADS.len() as u64;
    let script = format!(
        "i=0; while [ $i -lt {scrapes} ]; do curl -sS -o /dev/null --max-time 2 http://{METRICS_ADDR}/metrics; i=$((i+1)); sleep 1; done"
    );
    let ns = lab.balancer_ns().to_owned();
    lab.spawn(&ns, &["sh", "-c", &script])
}

fn measure_system(
    lab: &Lab,
    system: System,
    seconds: u32,
    samples: &mut [Vec<Vec<Sample>>],
) -> Result<()> {
    let index = report::index_of(system);
    for (workload, per_system) in WORKLOADS.iter().zip(samples.iter_mut()) {
        if !(workload.applies)(system) {
            continue;
        }
        let before = CpuTimes::read()?;
        let agent_before = agent_cpu_seconds(lab);
        let xdp_before = XdpRuns::read();
        let measured = (workload.measure)(lab, system, seconds).unwrap_or_else(|error| {
            // One broken run must not cost the others: report it and go on.
            println!(
                "  {:<40} {:<30} FAILED: {error:#}",
                workload.name,
                system.title()
            );
            Measured::rate(f64::NAN)
        });
        let after = CpuTimes::read()?;
        let xdp_ns_per_packet = XdpRuns::read().ns_per_run_since(&xdp_before);
        let agent = agent_cpu_seconds(lab).zip(agent_before).map(|(a, b)| a - b);
        let rate = measured.rate;
        let work = rate * workload.work_per_rate_second * f64::from(seconds);
        let sample = Sample {
            rate,
            p50_us: measured.p50_us,
            p99_us: measured.p99_us,
            xdp_ns_per_packet,
            cpu_us_per_work: if work > 0.0 {
                after.busy_seconds_since(&before) * 1e6 / work
            } else {
                f64::NAN
            },
            steal_percent: after.steal_percent_since(&before),
            agent_us_per_work: match agent {
                Some(seconds) if work > 0.0 => seconds * 1e6 / work,
                _ => f64::NAN,
            },
        };
        if !rate.is_nan() {
            let latency = if sample.p99_us.is_nan() {
                String::new()
            } else {
                format!("  p50 {:.0} µs p99 {:.0} µs", sample.p50_us, sample.p99_us)
            };
            println!(
                "  {:<40} {:<30} {:>8.0} {:<6} {:>7.1} µs CPU/{}  steal {:.0}%{latency}",
                workload.name,
                system.title(),
                sample.rate,
                workload.unit,
                sample.cpu_us_per_work,
                workload.work,
                sample.steal_percent
            );
        }
        per_system[index].push(sample);
    }
    Ok(())
}

/// A command in the client namespace, killed if it overruns its own time limit.
fn client(lab: &Lab, seconds: u32, args: &[&str]) -> Result<String> {
    let output = lab.exec_timeout(
        lab.client_ns(),
        args,
        Duration::from_secs(u64::from(seconds) + OVERRUN_SECONDS),
    )?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    if !output.status.success() {
        bail!(
            "{args:?} failed ({}): {}{}",
            output.status,
            stdout.trim(),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(stdout)
}

fn wrk(lab: &Lab, system: System, seconds: u32, extra: &[&str]) -> Result<Measured> {
    let duration = format!("-d{seconds}s");
    let addr = system.address();
    let url = format!("http://{addr}/");
    let mut args = vec![
        "wrk",
        "-t2",
        "-c32",
        &duration,
        "--timeout",
        "2s",
        "--latency",
    ];
    args.extend_from_slice(system.headers());
    args.extend_from_slice(extra);
    args.push(&url);
    let output = client(lab, seconds, &args)?;
    if let Some(errors) = output.lines().find(|l| l.contains("Socket errors")) {
        println!("    wrk to {addr}: {}", errors.trim());
    }
    Ok(Measured {
        rate: parse_after(&output, "Requests/sec:")?,
        p50_us: latency_percentile(&output, "50%")?,
        p99_us: latency_percentile(&output, "99%")?,
    })
}

/// A percentile of wrk's `--latency` distribution (`50%  245.00us`), in microseconds.
fn latency_percentile(output: &str, label: &str) -> Result<f64> {
    let value = output
        .lines()
        .find_map(|l| l.trim().strip_prefix(label))
        .map(str::trim)
        .with_context(|| format!("no {label} latency in:\n{output}"))?;
    let split = value
        .find(|c: char| c.is_ascii_alphabetic())
        .with_context(|| format!("no unit in {value:?}"))?;
    let number: f64 = value[..split].parse().context("parsing a latency")?;
    let scale = match &value[split..] {
        "us" => 1.0,
        "ms" => 1e3,
        "s" => 1e6,
        "m" => 60e6,
        unit => bail!("unknown latency unit {unit:?}"),
    };
    Ok(number * scale)
}

/// Requests per second over 32 keep-alive connections.
fn keepalive_rps(lab: &Lab, system: System, seconds: u32) -> Result<Measured> {
    wrk(lab, system, seconds, &[])
}

/// `Connection: close`: the server closes after each response and wrk reconnects, so each
/// request is a new TCP connection (a new flow for the balancer).
fn new_connections_rps(lab: &Lab, system: System, seconds: u32) -> Result<Measured> {
    wrk(lab, system, seconds, &["-H", "Connection: close"])
}

/// One download of far more than fits in `seconds`, cut off after `seconds`.
fn bulk_mbits(lab: &Lab, system: System, seconds: u32) -> Result<Measured> {
    let addr = system.address();
    let mut args = vec!["curl"];
    args.extend_from_slice(system.headers());
    let url = format!("http://{addr}/bytes/1000000000000");
    let max_time = seconds.to_string();
    args.extend_from_slice(&[
        "-s",
        "-o",
        "/dev/null",
        "--max-time",
        &max_time,
        "-w",
        "%{speed_download}",
        &url,
    ]);
    let output = lab.exec_timeout(
        lab.client_ns(),
        &args,
        Duration::from_secs(u64::from(seconds) + OVERRUN_SECONDS),
    )?;
    // curl exits 28 when --max-time cuts the download, as intended; it still prints the speed.
    let bytes_per_second: f64 = String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .with_context(|| format!("parsing curl's download speed ({})", output.status))?;
    if bytes_per_second <= 0.0 {
        bail!(
            "no data downloaded from {addr} ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(Measured::rate(bytes_per_second * 8.0 / 1e6))
}

/// Datagrams per second that reach backend-1 (its interface's receive counter) while
/// `lab-flood` sends from the client for `seconds`.
fn udp_pps(lab: &Lab, system: System, seconds: u32) -> Result<Measured> {
    let to = system.udp_address().context("no UDP path")?.to_string();
    let flood = build::workspace_root().join("target/release/lab-flood");
    let received = || -> Result<u64> {
        let count = lab.exec_checked(
            lab.backend_ns(0),
            &["cat", "/sys/class/net/eth0/statistics/rx_packets"],
        )?;
        count.trim().parse().context("parsing rx_packets")
    };
    let before = received()?;
    let started = std::time::Instant::now();
    let output = client(
        lab,
        seconds,
        &[
            &flood.to_string_lossy(),
            "--to",
            &to,
            "--seconds",
            &seconds.to_string(),
        ],
    )?;
    let elapsed = started.elapsed().as_secs_f64();
    let delivered = received()?.saturating_sub(before);
    if delivered == 0 {
        bail!("nothing reached backend-1 ({})", output.trim());
    }
    Ok(Measured::rate(delivered as f64 / elapsed))
}

/// The agent's user and system CPU time so far, while it runs.
fn agent_cpu_seconds(lab: &Lab) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", lab.balancer_pid()?)).ok()?;
    // Fields after the command name (which may hold spaces) : utime is the 14th field, stime
    // the 15th, counted from the pid.
    let after_name = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Some(ticks / per_second)
}

fn parse_after(text: &str, label: &str) -> Result<f64> {
    text.lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix(label)
                .and_then(|v| v.trim().parse().ok())
        })
        .with_context(|| format!("no {label:?} in:\n{text}"))
}

/// `kernel.bpf_stats_enabled` on while the bench runs (the kernel then accounts each BPF
/// program's run time), back to what it was when dropped.
struct BpfStats {
    before: Option<String>,
}

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl BpfStats {
    fn enable() -> BpfStats {
        let before = std::fs::read_to_string(BPF_STATS).ok();
        let _ = std::fs::write(BPF_STATS, "1");
        BpfStats { before }
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        if let Some(before) = &self.before {
            let _ = std::fs::write(BPF_STATS, before.trim());
        }
    }
}

/// Run time and runs, summed, of the XDP programs the bench measures: the balancer's and the
/// trivial router (`bpftool prog show`, with [`BpfStats`] on).
#[derive(Default)]
struct XdpRuns {
    nanos: u64,
    runs: u64,
}

impl XdpRuns {
    fn read() -> XdpRuns {
        Command::new("bpftool")
            .args(["prog", "show"])
            .output()
            .map(|o| XdpRuns::parse(&String::from_utf8_lossy(&o.stdout)))
            .unwrap_or_default()
    }

    /// From lines like `12: xdp  name balancer  tag 5a..  gpl run_time_ns 8120 run_cnt 31`.
    fn parse(text: &str) -> XdpRuns {
        let mut total = XdpRuns::default();
        for line in text.lines() {
            let words: Vec<&str> = line.split_whitespace().collect();
            let after = |key: &str| {
                words
                    .iter()
                    .position(|w| *w == key)
                    .and_then(|at| words.get(at + 1))
                    .and_then(|v| v.parse::<u64>().ok())
            };
            let ours = words.get(1) == Some(&"xdp")
                && matches!(
                    words
                        .iter()
                        .position(|w| *w == "name")
                        .and_then(|at| words.get(at + 1)),
                    Some(&"balancer" | &"router")
                );
            if let (true, Some(nanos), Some(runs)) = (ours, after("run_time_ns"), after("run_cnt"))
            {
                total.nanos += nanos;
                total.runs += runs;
            }
        }
        total
    }

    fn ns_per_run_since(&self, earlier: &XdpRuns) -> f64 {
        let runs = self.runs.saturating_sub(earlier.runs);
        if runs == 0 {
            return f64::NAN;
        }
        self.nanos.saturating_sub(earlier.nanos) as f64 / runs as f64
    }
}

/// The machine's CPU time counters from the first line of /proc/stat, in clock ticks.
struct CpuTimes {
    busy: u64,
    steal: u64,
    total: u64,
}

impl CpuTimes {
    fn read() -> Result<CpuTimes> {
        let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
        let fields: Vec<u64> = stat
            .lines()
            .next()
            .context("/proc/stat is empty")?
            .split_whitespace()
            .skip(1)
            .take(8)
            .map(|v| v.parse().context("parsing /proc/stat"))
            .collect::<Result<_>>()?;
        let [user, nice, system, idle, iowait, irq, softirq, steal] = fields[..] else {
            bail!("/proc/stat has fewer than 8 CPU fields");
        };
        Ok(CpuTimes {
            busy: user + nice + system + irq + softirq,
            steal,
            total: user + nice + system + idle + iowait + irq + softirq + steal,
        })
    }

    fn busy_seconds_since(&self, earlier: &CpuTimes) -> f64 {
        // SAFETY: sysconf has no preconditions.
        let ticks_per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1);
        self.busy.saturating_sub(earlier.busy) as f64 / ticks_per_second as f64
    }

    fn steal_percent_since(&self, earlier: &CpuTimes) -> f64 {
        let total = self.total.saturating_sub(earlier.total);
        if total == 0 {
            return 0.0;
        }
        self.steal.saturating_sub(earlier.steal) as f64 * 100.0 / total as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_rate_is_read_from_wrk_output() {
        let output = "Running 2s test @ http://198.19.0.11/\n  148235 requests in 2.02s, 18.94MB read\nRequests/sec:  73295.16\nTransfer/sec:      9.37MB\n";
        assert_eq!(parse_after(output, "Requests/sec:").ok(), Some(73295.16));
        assert!(parse_after("no numbers", "Requests/sec:").is_err());
    }

    #[test]
    fn latency_percentiles_are_read_in_microseconds() {
        let output =
            "  Latency Distribution\n     50%  245.00us\n     75%    1.50ms\n     99%    2.00s\n";
        assert_eq!(latency_percentile(output, "50%").ok(), Some(245.0));
        assert_eq!(latency_percentile(output, "75%").ok(), Some(1500.0));
        assert_eq!(latency_percentile(output, "99%").ok(), Some(2e6));
        assert!(latency_percentile(output, "90%").is_err());
    }

    #[test]
    fn xdp_run_time_is_summed_over_the_measured_programs() {
        let text = "12: xdp  name balancer  tag 5a  gpl run_time_ns 8000 run_cnt 40\n\tloaded_at 2026\n13: xdp  name router  tag 6b  gpl run_time_ns 1000 run_cnt 10\n14: xdp  name lab_pass  tag 7c  gpl run_time_ns 5 run_cnt 5\n15: kprobe  name balancer  run_time_ns 9 run_cnt 9\n";
        let runs = XdpRuns::parse(text);
        assert_eq!((runs.nanos, runs.runs), (9000, 50));
        assert_eq!(runs.ns_per_run_since(&XdpRuns::default()), 180.0);
        assert!(runs.ns_per_run_since(&runs).is_nan());
    }
}
