//! The systems users would pick instead of the balancer, set up in the lab's balancer
//! namespace for one measurement and removed after it: nftables DNAT (as kube-proxy's
//! nftables mode balances), HAProxy inserting a session cookie, nginx with `ip_hash`. Each
//! serves [`PEER_ADDR`] port 80 (nftables also UDP) from backend-1, the one server the other
//! paths end at, so every system is measured against the same backend capacity. Also the
//! trivial XDP router, attached for its runs.

use std::{net::Ipv4Addr, time::Duration};

use anyhow::{bail, Context, Result};
use balancer_lab::Lab;

use super::DISCARD_PORT;
use crate::toolchain;

/// The address every peer serves on, routed to the balancer host like the VIP. It is not the
/// VIP so that nothing of the balancer's own state (its flows, XDP) touches the peers.
pub const PEER_ADDR: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 20);
/// The client's address towards the peers. nftables DNAT keeps the client's address and
/// port, so from the client's usual address its connections would meet, at backend-1, the
/// TIME_WAIT sockets of the VIP path's connections from the same ports; and the client's
/// TCP timestamps, offset per address pair, would not tell the two apart.
pub const PEER_SOURCE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 4);
/// nftables table the DNAT peers use; deleted after each run, so conntrack stops tracking
/// the namespace's other traffic.
const NFT_TABLE: &str = "bench_peer";
/// HAProxy 2.6 here refuses more (the file limit is 20,000).
const HAPROXY_MAXCONN: u32 = 8000;
const READY_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Peer {
    /// `dnat to numgen random mod N map {...}`: each new connection to a random backend.
    NftNumgen,
    /// `dnat to jhash ip saddr mod N map {...}`: by client address (source affinity).
    NftJhash,
    /// HTTP mode, `cookie SERVERID insert indirect nocache`.
    Haproxy,
    /// `upstream { ip_hash; keepalive }` proxying HTTP/1.1.
    Nginx,
}

const ALL: [Peer; 4] = [Peer::NftNumgen, Peer::NftJhash, Peer::Haproxy, Peer::Nginx];
/// Tells Debian's maintainer scripts not to start the services they install: the peers run
/// in the lab's namespace only, never as the host's daemons.
const POLICY_RC_D: &str = "/usr/sbin/policy-rc.d";

/// Installs the peers' packages (and bpftool) that are missing; returns the peers that cannot
/// run, and why.
pub fn ensure_installed() -> Vec<(Peer, String)> {
    // bpftool reads the XDP programs' run time (see `XdpRuns`).
    let missing: Vec<&str> = ALL
        .iter()
        .map(|p| p.package())
        .chain([("bpftool", "bpftool")])
        .filter(|(_, command)| toolchain::which(command).is_none())
        .map(|(package, _)| package)
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    if !missing.is_empty() && toolchain::can_install() {
        println!(
            "==> installing the peers to compare with: {}",
            missing.join(" ")
        );
        let placed = !std::path::Path::new(POLICY_RC_D).exists()
            && std::fs::write(POLICY_RC_D, "#!/bin/sh\nexit 101\n").is_ok()
            && std::process::Command::new("chmod")
                .args(["+x", POLICY_RC_D])
                .status()
                .is_ok_and(|s| s.success());
        if let Err(error) = toolchain::apt_install(&missing) {
            println!("  {error:#}");
        }
        if placed {
            let _ = std::fs::remove_file(POLICY_RC_D);
        }
    }
    ALL.iter()
        .filter(|p| toolchain::which(p.package().1).is_none())
        .map(|p| {
            (
                *p,
                format!(
                    "{} is not installed (Debian package {})",
                    p.package().1,
                    p.package().0
                ),
            )
        })
        .collect()
}

/// A running peer, removed by [`Running::stop`]: a process, or nftables rules.
pub struct Running {
    pid: Option<u32>,
}

impl Peer {
    pub fn title(self) -> &'static str {
        match self {
            Peer::NftNumgen => "nftables DNAT (numgen)",
            Peer::NftJhash => "nftables DNAT (jhash saddr)",
            Peer::Haproxy => "HAProxy (cookie insert)",
            Peer::Nginx => "nginx (ip_hash)",
        }
    }

    /// The Debian package the peer comes from, and the command that tells it is there.
    fn package(self) -> (&'static str, &'static str) {
        match self {
            Peer::NftNumgen | Peer::NftJhash => ("nftables", "nft"),
            Peer::Haproxy => ("haproxy", "haproxy"),
            Peer::Nginx => ("nginx-light", "nginx"),
        }
    }

    /// Sets the peer up in the balancer namespace and waits until it answers.
    pub fn start(self, lab: &mut Lab) -> Result<Running> {
        let ns = lab.balancer_ns().to_owned();
        let backend = Lab::backend_addr(0);
        let pid = match self {
            Peer::NftNumgen | Peer::NftJhash => {
                let selector = if self == Peer::NftNumgen {
                    "numgen random"
                } else {
                    "jhash ip saddr"
                };
                let rules = format!(
                    "table ip {NFT_TABLE} {{\n  chain prerouting {{\n    type nat hook prerouting priority dstnat; policy accept;\n    ip daddr {PEER_ADDR} tcp dport 80 dnat to {selector} mod 1 map {{ 0 : {backend} }}\n    ip daddr {PEER_ADDR} udp dport {DISCARD_PORT} dnat to {selector} mod 1 map {{ 0 : {backend} }}\n  }}\n}}\n"
                );
                let file = lab.dir().join("peer.nft");
                std::fs::write(&file, rules).context("writing the nftables rules")?;
                lab.exec_checked(&ns, &["nft", "-f", &file.to_string_lossy()])?;
                // Connections closed by the client leave TIME_WAIT entries for 120 s; at
                // 15,000 new connections a second they would fill the conntrack table
                // (262,144 entries) within a run, and the kernel would drop new ones.
                let _ = lab.exec(
                    &ns,
                    &[
                        "sysctl",
                        "-qw",
                        "net.netfilter.nf_conntrack_tcp_timeout_time_wait=1",
                    ],
                );
                None
            }
            Peer::Haproxy => {
                let config = format!(
                    "global\n  maxconn {HAPROXY_MAXCONN}\n  nbthread 2\n\
                     defaults\n  mode http\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n\
                     frontend web\n  bind {PEER_ADDR}:80\n  default_backend servers\n\
                     backend servers\n  cookie SERVERID insert indirect nocache\n  server backend-1 {backend}:80 cookie b1\n"
                );
                let file = lab.dir().join("haproxy.cfg");
                std::fs::write(&file, config).context("writing the HAProxy config")?;
                Some(lab.spawn(&ns, &["haproxy", "-db", "-f", &file.to_string_lossy()])?)
            }
            Peer::Nginx => {
                let dir = lab.dir().join("nginx");
                std::fs::create_dir_all(&dir).context("creating nginx's directory")?;
                let d = dir.display();
                let config = format!(
                    "worker_processes 2;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
                     events {{ worker_connections 8192; }}\n\
                     http {{\n  access_log off;\n\
                       client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
                       upstream servers {{ ip_hash; server {backend}:80; keepalive 64; }}\n\
                       server {{\n    listen {PEER_ADDR}:80;\n    location / {{\n\
                           proxy_pass http://servers;\n      proxy_http_version 1.1;\n\
                           proxy_set_header Connection \"\";\n      proxy_buffering off;\n    }}\n  }}\n}}\n"
                );
                let file = dir.join("nginx.conf");
                std::fs::write(&file, config).context("writing the nginx config")?;
                Some(lab.spawn(
                    &ns,
                    &[
                        "nginx",
                        "-p",
                        &dir.to_string_lossy(),
                        "-e",
                        &format!("{d}/error.log"),
                        "-c",
                        &file.to_string_lossy(),
                    ],
                )?)
            }
        };
        let running = Running { pid };
        if let Err(error) = wait_until_serving(lab) {
            running.stop(lab);
            return Err(error.context(format!("{} did not start", self.title())));
        }
        Ok(running)
    }
}

impl Running {
    pub fn stop(self, lab: &mut Lab) {
        match self.pid {
            Some(pid) => {
                let _ = lab.stop(pid);
            }
            None => {
                let ns = lab.balancer_ns().to_owned();
                let _ = lab.exec(&ns, &["nft", "delete", "table", "ip", NFT_TABLE]);
            }
        }
    }
}

/// The balancer host's interfaces, where the trivial XDP router is attached.
const ROUTER_INTERFACES: [&str; 2] = ["lb-client", "lb-backend"];

/// Attaches the trivial XDP router (`object`, built with the balancer's program) to the
/// balancer host's interfaces, in native mode like the balancer.
pub fn attach_router(lab: &Lab, object: &std::path::Path) -> Result<()> {
    let object = object.to_string_lossy();
    for interface in ROUTER_INTERFACES {
        let attached = lab.exec_checked(
            lab.balancer_ns(),
            &[
                "ip", "link", "set", "dev", interface, "xdpdrv", "obj", &object, "sec", "xdp",
            ],
        );
        if let Err(error) = attached {
            detach_router(lab);
            return Err(error.context(format!("attaching the trivial XDP router to {interface}")));
        }
    }
    Ok(())
}

pub fn detach_router(lab: &Lab) {
    for interface in ROUTER_INTERFACES {
        let _ = lab.exec(
            lab.balancer_ns(),
            &["ip", "link", "set", "dev", interface, "xdpdrv", "off"],
        );
    }
}

/// Polls the peer's address from the client until an HTTP request through it succeeds.
fn wait_until_serving(lab: &Lab) -> Result<()> {
    let url = format!("http://{PEER_ADDR}/");
    let started = std::time::Instant::now();
    while started.elapsed() < READY_TIMEOUT {
        if lab
            .curl(lab.client_ns(), &["--fail", "--max-time", "1", &url])
            .is_ok()
        {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("no answer from {url} within {READY_TIMEOUT:?}")
}
