//! `cargo xtask bench`: the same workloads over the plain routed path and through the balancer,
//! interleaved round by round in one lab, with medians, spread, CPU time per unit of work and
//! the CPU steal seen.
//!
//! Paths from the client to one backend each (the VIP's `web` service has only backend-1
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
//!   added bytes as a second offset (the costliest cookie path).
//!
//! The routed paths use their own client address (see [`ROUTED_SOURCE`]).

use std::{
    fmt::Write as _,
    net::Ipv4Addr,
    path::PathBuf,
    process::Command,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{bail, Context, Result};
use balancer_lab::{Lab, ServiceOptions, BALANCER_CLIENT_ADDR, COOKIE_PORT, LB_COOKIE_PORT, VIP};

use crate::{build, run, toolchain};

/// Runs above this much CPU steal are flagged: the host took the CPUs away.
const STEAL_WARNING_PERCENT: f64 = 10.0;
/// How long a client command may run past its own duration before it is killed.
const OVERRUN_SECONDS: u64 = 10;
/// The client's source address towards the backend network on the routed paths, apart from
/// the one it uses for the VIP: otherwise a routed connection from a port that an earlier VIP
/// flow used meets that flow's reverse entry, and the program rewrites the backend's reply
/// to come from the VIP (the client then resets it).
const ROUTED_SOURCE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 3);

#[derive(Clone, Copy, PartialEq)]
enum Path {
    Routed,
    Vip,
    RoutedWithXdp,
    CookieVip,
    LbCookieVip,
}

const PATHS: [Path; 5] = [
    Path::Routed,
    Path::Vip,
    Path::RoutedWithXdp,
    Path::CookieVip,
    Path::LbCookieVip,
];
/// The cookie a returning session sends on the cookie path.
const SESSION_COOKIE: &str = "Cookie: SID=bench-session";

impl Path {
    fn title(self) -> &'static str {
        match self {
            Path::Routed => "routed, no XDP",
            Path::Vip => "through the VIP",
            Path::RoutedWithXdp => "routed, XDP attached",
            Path::CookieVip => "through the cookie VIP",
            Path::LbCookieVip => "lb-cookie VIP, new sessions",
        }
    }

    fn address(self) -> String {
        match self {
            Path::Vip => VIP.to_string(),
            Path::CookieVip => format!("{VIP}:{COOKIE_PORT}"),
            Path::LbCookieVip => format!("{VIP}:{LB_COOKIE_PORT}"),
            Path::Routed | Path::RoutedWithXdp => Lab::backend_addr(0).to_string(),
        }
    }

    /// Headers every request on this path carries.
    fn headers(self) -> &'static [&'static str] {
        match self {
            Path::CookieVip => &["-H", SESSION_COOKIE],
            _ => &[],
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
    /// Measures the rate on a path for a number of seconds.
    measure: fn(&Lab, Path, u32) -> Result<f64>,
}

const WORKLOADS: [Workload; 3] = [
    Workload {
        name: "HTTP keep-alive (wrk, 32 connections)",
        unit: "req/s",
        work: "request",
        work_per_rate_second: 1.0,
        measure: keepalive_rps,
    },
    Workload {
        name: "HTTP, new connection per request (wrk)",
        unit: "conn/s",
        work: "connection",
        work_per_rate_second: 1.0,
        measure: new_connections_rps,
    },
    Workload {
        name: "TCP bulk download (curl, 1 stream)",
        unit: "Mbit/s",
        work: "MB",
        work_per_rate_second: 1.0 / 8.0,
        measure: bulk_mbits,
    },
];

/// One measurement: the rate and what the machine did meanwhile.
#[derive(Clone, Copy)]
struct Sample {
    rate: f64,
    /// Machine-wide busy CPU time per unit of work, in microseconds.
    cpu_us_per_work: f64,
    /// The agent's own CPU time per unit of work, in microseconds (NaN when it is stopped).
    agent_us_per_work: f64,
    steal_percent: f64,
}

pub fn run(quick: bool) -> Result<()> {
    if !toolchain::is_root() {
        bail!("the benchmark builds network namespaces and attaches XDP programs: run it as root");
    }
    let artifacts = build::all()?;
    toolchain::ensure_lab()?;
    let (seconds, rounds) = if quick { (2, 1) } else { (5, 3) };

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
    lab.add_client_addresses(&[ROUTED_SOURCE])?;
    lab.exec_checked(
        lab.client_ns(),
        &[
            "ip",
            "route",
            "add",
            &format!("{}/32", Lab::backend_addr(0)),
            "via",
            &BALANCER_CLIENT_ADDR.to_string(),
            "src",
            &ROUTED_SOURCE.to_string(),
        ],
    )?;
    lab.start_backends(&artifacts.lab_backend)?;
    let config = lab.dir().join("balancer.toml");
    let options = ServiceOptions {
        web_backend_count: Some(1),
        cookie_service: true,
        lb_cookie_backend: Some(1),
        ..ServiceOptions::default()
    };
    std::fs::write(&config, lab.balancer_config_with(&options))
        .context("writing the benchmark's balancer config")?;

    // samples[workload][path]
    let mut samples = vec![vec![Vec::<Sample>::new(); PATHS.len()]; WORKLOADS.len()];
    for round in 1..=rounds {
        println!("==> round {round}/{rounds} ({seconds} s per run)");
        for path in PATHS {
            if run::stop_requested() {
                drop(lab);
                bail!("stopped by a signal; the lab is removed");
            }
            match path {
                Path::Routed => lab.stop_balancer()?,
                Path::Vip => lab.start_balancer(&artifacts.balancer, &config)?,
                _ => {}
            }
            measure_path(&lab, path, seconds, &mut samples)?;
        }
    }
    lab.stop_balancer()?;
    drop(lab);

    let report = report(&samples, seconds, rounds);
    println!("\n{report}");
    match save(&report) {
        Ok(path) => println!("saved to {}", path.display()),
        Err(error) => println!("(not saved: {error:#})"),
    }
    Ok(())
}

fn measure_path(
    lab: &Lab,
    path: Path,
    seconds: u32,
    samples: &mut [Vec<Vec<Sample>>],
) -> Result<()> {
    let index = PATHS.iter().position(|p| *p == path).unwrap_or(0);
    for (workload, per_path) in WORKLOADS.iter().zip(samples.iter_mut()) {
        let before = CpuTimes::read()?;
        let agent_before = agent_cpu_seconds(lab);
        let rate = match (workload.measure)(lab, path, seconds) {
            Ok(rate) => rate,
            Err(error) => {
                // One broken run must not cost the others: report it and go on.
                println!(
                    "  {:<42} {:<22} FAILED: {error:#}",
                    workload.name,
                    path.title()
                );
                f64::NAN
            }
        };
        let after = CpuTimes::read()?;
        let agent = agent_cpu_seconds(lab).zip(agent_before).map(|(a, b)| a - b);
        let work = rate * workload.work_per_rate_second * f64::from(seconds);
        let sample = Sample {
            rate,
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
            println!(
                "  {:<42} {:<22} {:>10.0} {:<7} {:>8.1} µs CPU/{}  steal {:.0}%",
                workload.name,
                path.title(),
                sample.rate,
                workload.unit,
                sample.cpu_us_per_work,
                workload.work,
                sample.steal_percent
            );
        }
        per_path[index].push(sample);
    }
    Ok(())
}

fn report(samples: &[Vec<Vec<Sample>>], seconds: u32, rounds: u32) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Rates: median of {rounds} interleaved round(s) of {seconds} s, [min-max]; the L4 paths end at backend-1, the cookie VIP at backend-3 and the lb-cookie VIP at backend-2 (the same server program); ratios against the routed path without XDP."
    );
    let others = &PATHS[1..];
    let mut header = format!("| workload | unit | {} |", PATHS[0].title());
    for path in others {
        let _ = write!(header, " {} | ratio |", path.title());
    }
    let _ = writeln!(
        out,
        "{header}\n|{}",
        "---|".repeat(2 + 1 + 2 * others.len())
    );
    for (workload, per_path) in WORKLOADS.iter().zip(samples) {
        let rates: Vec<Vec<f64>> = per_path
            .iter()
            .map(|s| s.iter().map(|s| s.rate).collect())
            .collect();
        let routed = median(&rates[0]);
        let mut row = format!(
            "| {} | {} | {} |",
            workload.name,
            workload.unit,
            spread(&rates[0])
        );
        for rates in &rates[1..] {
            let _ = write!(row, " {} | {:.2} |", spread(rates), median(rates) / routed);
        }
        let _ = writeln!(out, "{row}");
    }
    let _ = writeln!(
        out,
        "\nCPU time per unit of work, median, lower is better: machine-wide busy time over the run / work done (the client, the balancer and the backend share the CPUs), and in brackets the agent's own share."
    );
    let mut header = "| workload |".to_owned();
    for path in &PATHS {
        let _ = write!(header, " {} |", path.title());
    }
    let _ = writeln!(out, "{header}\n|{}", "---|".repeat(1 + PATHS.len()));
    for (workload, per_path) in WORKLOADS.iter().zip(samples) {
        let mut row = format!("| {} |", workload.name);
        for samples in per_path {
            let cost = median(
                &samples
                    .iter()
                    .map(|s| s.cpu_us_per_work)
                    .collect::<Vec<_>>(),
            );
            let agent = median(
                &samples
                    .iter()
                    .map(|s| s.agent_us_per_work)
                    .collect::<Vec<_>>(),
            );
            let _ = write!(row, " {cost:.1} µs/{}", workload.work);
            if !agent.is_nan() {
                let _ = write!(row, " (agent {agent:.2})");
            }
            row.push_str(" |");
        }
        let _ = writeln!(out, "{row}");
    }
    let steal: Vec<f64> = samples
        .iter()
        .flatten()
        .flatten()
        .map(|s| s.steal_percent)
        .collect();
    let max_steal = steal.iter().copied().fold(0.0, f64::max);
    let flagged = steal.iter().filter(|s| **s > STEAL_WARNING_PERCENT).count();
    let _ = writeln!(
        out,
        "\nCPU steal per run: median {:.1}%, max {max_steal:.1}%{}",
        median(&steal),
        if flagged > 0 {
            format!(
                "; WARNING: {flagged} of {} runs above {STEAL_WARNING_PERCENT}% steal, their numbers are unreliable",
                steal.len()
            )
        } else {
            String::new()
        }
    );
    let _ = writeln!(
        out,
        "The client, the balancer host and the backend share this machine's CPUs (and with anything else running on it)."
    );
    out
}

/// Writes the report to `bench-results/bench-<unix time>.md` in the workspace.
fn save(report: &str) -> Result<PathBuf> {
    let dir = build::workspace_root().join("bench-results");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    let path = dir.join(format!("bench-{stamp}.md"));
    std::fs::write(&path, report).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// The median of the values that are numbers (failed runs are NaN); NaN if there are none.
fn median(values: &[f64]) -> f64 {
    let mut sorted: Vec<f64> = values.iter().copied().filter(|v| !v.is_nan()).collect();
    sorted.sort_by(f64::total_cmp);
    sorted.get(sorted.len() / 2).copied().unwrap_or(f64::NAN)
}

fn spread(values: &[f64]) -> String {
    let failed = values.iter().filter(|v| v.is_nan()).count();
    let values: Vec<f64> = values.iter().copied().filter(|v| !v.is_nan()).collect();
    let text = if values.is_empty() {
        "failed".to_owned()
    } else {
        spread_of(&values)
    };
    if failed > 0 && !values.is_empty() {
        format!("{text} ({failed} failed)")
    } else {
        text
    }
}

fn spread_of(values: &[f64]) -> String {
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if values.len() > 1 {
        format!("{:.0} [{min:.0}-{max:.0}]", median(values))
    } else {
        format!("{:.0}", median(values))
    }
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

fn wrk(lab: &Lab, path: Path, seconds: u32, extra: &[&str]) -> Result<f64> {
    let duration = format!("-d{seconds}s");
    let addr = path.address();
    let url = format!("http://{addr}/");
    let mut args = vec!["wrk", "-t2", "-c32", &duration, "--timeout", "2s"];
    args.extend_from_slice(path.headers());
    args.extend_from_slice(extra);
    args.push(&url);
    let output = client(lab, seconds, &args)?;
    if let Some(errors) = output.lines().find(|l| l.contains("Socket errors")) {
        println!("    wrk to {addr}: {}", errors.trim());
    }
    parse_after(&output, "Requests/sec:")
}

/// Requests per second over 32 keep-alive connections.
fn keepalive_rps(lab: &Lab, path: Path, seconds: u32) -> Result<f64> {
    wrk(lab, path, seconds, &[])
}

/// `Connection: close`: the server closes after each response and wrk reconnects, so each
/// request is a new TCP connection (a new flow for the balancer).
fn new_connections_rps(lab: &Lab, path: Path, seconds: u32) -> Result<f64> {
    wrk(lab, path, seconds, &["-H", "Connection: close"])
}

/// One download of far more than fits in `seconds`, cut off after `seconds`.
fn bulk_mbits(lab: &Lab, path: Path, seconds: u32) -> Result<f64> {
    let addr = path.address();
    let mut args = vec!["curl"];
    args.extend_from_slice(path.headers());
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
    Ok(bytes_per_second * 8.0 / 1e6)
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
    fn failed_runs_are_left_out_of_the_median_and_counted_in_the_spread() {
        let values = [3.0, f64::NAN, 1.0, 2.0];
        assert_eq!(median(&values), 2.0);
        assert_eq!(spread(&values), "2 [1-3] (1 failed)");
        assert_eq!(spread(&[f64::NAN]), "failed");
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn the_request_rate_is_read_from_wrk_output() {
        let output = "Running 2s test @ http://198.19.0.11/\n  148235 requests in 2.02s, 18.94MB read\nRequests/sec:  73295.16\nTransfer/sec:      9.37MB\n";
        assert_eq!(parse_after(output, "Requests/sec:").ok(), Some(73295.16));
        assert!(parse_after("no numbers", "Requests/sec:").is_err());
    }
}
