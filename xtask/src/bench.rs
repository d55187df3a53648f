//! `cargo xtask bench`: the same workloads through the direct routed path and through the
//! balancer, interleaved in one run, with raw numbers and ratios. Both paths reach one
//! backend, so the ratio measures the path, not the backends' capacity.

use std::process::Command;

use anyhow::{bail, Context, Result};
use balancer_lab::{Lab, ServiceOptions, VIP};

use crate::{build, toolchain};

struct Workload {
    name: &'static str,
    unit: &'static str,
    measure: fn(&Lab, &str, u32) -> Result<f64>,
}

const WORKLOADS: [Workload; 3] = [
    Workload {
        name: "HTTP keep-alive (wrk -c32)",
        unit: "req/s",
        measure: keepalive_rps,
    },
    Workload {
        name: "HTTP new connections",
        unit: "conn/s",
        measure: new_connections_rps,
    },
    Workload {
        name: "TCP bulk download",
        unit: "Mbit/s",
        measure: bulk_mbits,
    },
];

pub fn run(quick: bool) -> Result<()> {
    if !toolchain::is_root() {
        bail!("the benchmark builds network namespaces: run it as root");
    }
    let artifacts = build::all()?;
    toolchain::ensure_lab()?;
    let (seconds, rounds) = if quick { (2, 1) } else { (5, 3) };

    println!("==> lookup table build for 1,000 backends");
    let plan = Command::new(&artifacts.balancer)
        .args(["table-plan", "--backends", "1000"])
        .output()?;
    print!("{}", String::from_utf8_lossy(&plan.stdout));

    println!("==> building the lab (one backend behind the VIP, as on the direct path)");
    let mut lab = Lab::new()?;
    lab.start_backends(&artifacts.lab_backend)?;
    let config = lab.dir().join("balancer.toml");
    let options = ServiceOptions {
        web_backend_count: Some(1),
        ..ServiceOptions::default()
    };
    std::fs::write(&config, lab.balancer_config_with(&options))?;
    lab.start_balancer(&artifacts.balancer, &config)?;
    let direct = Lab::backend_addr(0).to_string();
    let vip = VIP.to_string();

    let mut rows = Vec::new();
    for workload in &WORKLOADS {
        let (mut via_direct, mut via_balancer) = (Vec::new(), Vec::new());
        for round in 0..rounds {
            println!("  {} round {}/{rounds}", workload.name, round + 1);
            via_direct.push((workload.measure)(&lab, &direct, seconds)?);
            via_balancer.push((workload.measure)(&lab, &vip, seconds)?);
        }
        rows.push((
            workload,
            median(&mut via_direct),
            median(&mut via_balancer),
            via_direct,
            via_balancer,
        ));
    }

    println!("\n| workload | unit | direct path | balancer | balancer / direct | runs (direct; balancer) |");
    println!("|---|---|---|---|---|---|");
    for (workload, direct, balancer, runs_direct, runs_balancer) in &rows {
        println!(
            "| {} | {} | {direct:.0} | {balancer:.0} | {:.2} | {:?}; {:?} |",
            workload.name,
            workload.unit,
            balancer / direct,
            runs_direct.iter().map(|v| v.round()).collect::<Vec<_>>(),
            runs_balancer.iter().map(|v| v.round()).collect::<Vec<_>>(),
        );
    }
    println!(
        "\nmedians of {rounds} interleaved rounds of {seconds} s; CPU steal during the run: {:.1}%",
        steal_percent_since_boot()
    );
    Ok(())
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// wrk against `/`, 32 keep-alive connections.
fn keepalive_rps(lab: &Lab, addr: &str, seconds: u32) -> Result<f64> {
    let output = lab.exec_checked(
        &lab.client_ns(),
        &[
            "wrk",
            "-t2",
            "-c32",
            &format!("-d{seconds}s"),
            &format!("http://{addr}/"),
        ],
    )?;
    parse_after(&output, "Requests/sec:")
}

/// Python opens a new connection per request for `seconds` (bounded in time and count).
fn new_connections_rps(lab: &Lab, addr: &str, seconds: u32) -> Result<f64> {
    let script = format!(
        r#"
import socket, time
end = time.time() + {seconds}
n = 0
while time.time() < end and n < 1000000:
    s = socket.create_connection(("{addr}", 80), timeout=5)
    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    while s.recv(4096):
        pass
    s.close()
    n += 1
print(n / {seconds})
"#
    );
    let output = lab.exec_checked(&lab.client_ns(), &["python3", "-c", &script])?;
    output.trim().parse().context("parsing the connection rate")
}

/// One download of far more than fits in `seconds`, cut off at `seconds`.
fn bulk_mbits(lab: &Lab, addr: &str, seconds: u32) -> Result<f64> {
    let output = lab.exec(
        &lab.client_ns(),
        &[
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "--max-time",
            &seconds.to_string(),
            "-w",
            "%{speed_download}",
            &format!("http://{addr}/bytes/100000000000"),
        ],
    )?;
    let bytes_per_second: f64 = String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .context("parsing curl's speed")?;
    Ok(bytes_per_second * 8.0 / 1e6)
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

/// Steal time as a share of all CPU time since boot, from /proc/stat.
fn steal_percent_since_boot() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let fields: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let total: f64 = fields.iter().sum();
    let steal = fields.get(7).copied().unwrap_or(0.0);
    if total > 0.0 {
        steal / total * 100.0
    } else {
        0.0
    }
}
