//! `cargo xtask bench --workers`: new cookie connections per second with one binding worker
//! and with two, interleaved round by round in one lab. The connections are new `lb-cookie`
//! sessions of a service whose cookie name (`lb`) is too short for XDP to search requests
//! for, so the agent binds them one by one (XDP starts the new sessions of an `lb-cookie`
//! service with a longer name itself, and binds a returning session's connections after its
//! first).
//!
//! On a machine of two CPUs the client, the backends and XDP leave the agent less than one
//! CPU, so more workers cannot show there by themselves. The comparison makes the agent the
//! bound instead: each worker thread gets the same fixed share of a CPU (a cgroup v1 `cpu`
//! quota of its own, as if each had a slow core to itself), well below what the rest of the
//! path could drive. The rate with two workers over the rate with one then says how much of
//! the binding work parallelizes. XDP hands each client /24 to one worker, so the client's
//! connections come from eight /24s, four of each worker's (nftables SNAT in the client's
//! namespace, round robin): the workers get equal loads, as a large client population
//! gives them.

use std::{
    fs,
    net::{IpAddr, Ipv4Addr},
    path::PathBuf,
};

use anyhow::{bail, Context, Result};
use balancer_common::{worker_of, Addr};
use balancer_lab::{Lab, ServiceOptions, LB_COOKIE_PORT, VIP};

use super::{
    new_connections_rps,
    report::{median, spread},
    CpuTimes, System,
};
use crate::{build, run, toolchain};

/// The share of a CPU each worker thread may use. At 15% two workers bound about 9,600
/// connections a second, where the rest of the path (the client, the backends, XDP) began to
/// hold them back on this 2-CPU machine: 1.57x one worker, with all their periods throttled
/// and the machine 1.0 to 1.3 CPUs busy.
const WORKER_CPU_SHARE: f64 = 0.10;
/// The quota's period. With the usual 100 ms, a worker that spent its quota stopped for up to
/// 85 ms, the client's connections piled up on it and the other worker went idle.
const CPU_PERIOD_US: u64 = 10_000;
/// The cgroup v1 `cpu` hierarchy the quotas are made in.
const CPU_CGROUPS: &str = "/sys/fs/cgroup/cpu";
/// The backend of the `lb-cookie` service, as in the main benchmark.
const LB_COOKIE_BACKEND: usize = 1;
/// The /24s the client's connections come from, 198.18.<n>.2.
const CLIENT_PREFIXES: usize = 8;
const WORKER_COUNTS: [u32; 2] = [1, 2];

pub fn run(quick: bool) -> Result<()> {
    if !toolchain::is_root() {
        bail!("the benchmark builds network namespaces and attaches XDP programs: run it as root");
    }
    if !PathBuf::from(CPU_CGROUPS).join("tasks").exists() {
        bail!("no cgroup v1 cpu hierarchy at {CPU_CGROUPS}: the workers' quotas cannot be set");
    }
    let (seconds, rounds) = if quick { (2, 1) } else { (3, 5) };
    let artifacts = build::all()?;
    toolchain::ensure_lab()?;
    run::catch_stop_signals();
    let mut lab = Lab::new()?;
    spread_client_prefixes(&lab)?;
    lab.start_backends(&artifacts.lab_backend)?;
    let config = lab.dir().join("balancer.toml");
    let options = ServiceOptions {
        lb_cookie_backend: Some(LB_COOKIE_BACKEND),
        ..ServiceOptions::default()
    };
    // Sessions with the cross-origin cookie too: XDP leaves their start to the agent.
    let toml = lab.balancer_config_with(&options).replacen(
        "affinity = \"lb-cookie\"",
        "affinity = \"lb-cookie\"\ncors = true",
        1,
    );
    fs::write(&config, toml).context("writing the benchmark's balancer config")?;
    let config = config.to_string_lossy().into_owned();

    println!(
        "==> new connections through the lb-cookie VIP (new sessions, cookie `lb`: bound by the agent), each worker held to {:.0}% of a CPU; {rounds} round(s) of {seconds} s",
        WORKER_CPU_SHARE * 100.0
    );
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); WORKER_COUNTS.len()];
    for round in 1..=rounds {
        for (index, workers) in WORKER_COUNTS.into_iter().enumerate() {
            if run::stop_requested() {
                bail!("stopped by a signal; the lab is removed");
            }
            let count = workers.to_string();
            lab.start_balancer_with(
                &artifacts.balancer,
                &["run", "--config", &config, "--agent-workers", &count],
                balancer_lab::Launch::Nsenter,
            )?;
            let quotas = WorkerQuotas::apply(lab.balancer_pid().context("no agent")?, workers)?;
            let before = CpuTimes::read()?;
            let measured = new_connections_rps(&lab, System::LbCookieVip, seconds)?;
            let busy = CpuTimes::read()?.busy_seconds_since(&before) / f64::from(seconds);
            let throttled = quotas.throttled_periods();
            drop(quotas);
            lab.stop_balancer()?;
            println!(
                "  round {round}: {workers} worker(s) {:>8.0} conn/s  machine busy {busy:.2} CPUs  periods throttled {throttled}",
                measured.rate
            );
            rates[index].push(measured.rate);
        }
    }
    drop(lab);
    println!(
        "\n| binding workers | new conn/s, median [min-max] of {rounds} |\n|---|---|\n| 1 | {} |\n| 2 | {} |\n\n2 workers / 1 worker: {:.2}",
        spread(&rates[0]),
        spread(&rates[1]),
        median(&rates[1]) / median(&rates[0])
    );
    Ok(())
}

/// Gives the client addresses in [`CLIENT_PREFIXES`] /24s, as many of each worker's, and sends
/// its lb-cookie VIP connections from them in turn.
fn spread_client_prefixes(lab: &Lab) -> Result<()> {
    let workers = WORKER_COUNTS[WORKER_COUNTS.len() - 1];
    let mut sources: Vec<Ipv4Addr> = Vec::new();
    for worker in 0..workers {
        let theirs = (1..=255)
            .map(|third| Ipv4Addr::new(198, 18, third, 2))
            .filter(|addr| worker_of(&Addr::from(IpAddr::V4(*addr)), workers) == worker);
        sources.extend(theirs.take(CLIENT_PREFIXES / workers as usize));
    }
    lab.add_client_addresses(&sources)?;
    let map: Vec<String> = sources
        .iter()
        .enumerate()
        .map(|(i, addr)| format!("{i} : {addr}"))
        .collect();
    let rules = format!(
        "table ip spread {{\n  chain out {{\n    type nat hook postrouting priority srcnat;\n    ip daddr {VIP} tcp dport {LB_COOKIE_PORT} snat to numgen inc mod {CLIENT_PREFIXES} map {{ {} }}\n  }}\n}}\n",
        map.join(", ")
    );
    let path = lab.dir().join("spread.nft");
    fs::write(&path, rules).context("writing the client's SNAT rules")?;
    lab.exec_checked(lab.client_ns(), &["nft", "-f", &path.to_string_lossy()])?;
    Ok(())
}

/// A cgroup of its own for each binding worker thread of an agent, with the CPU quota of
/// [`WORKER_CPU_SHARE`]; removed on drop (the threads go back to the root group).
struct WorkerQuotas {
    groups: Vec<PathBuf>,
}

impl WorkerQuotas {
    fn apply(agent: u32, workers: u32) -> Result<WorkerQuotas> {
        let threads = binder_threads(agent)?;
        if threads.len() != workers as usize {
            bail!(
                "the agent runs {} binding workers, not {workers}",
                threads.len()
            );
        }
        let mut quotas = WorkerQuotas { groups: Vec::new() };
        let quota = (WORKER_CPU_SHARE * CPU_PERIOD_US as f64) as u64;
        for (index, tid) in threads.into_iter().enumerate() {
            let group = PathBuf::from(CPU_CGROUPS).join(format!("balancer-bench-worker-{index}"));
            fs::create_dir_all(&group).with_context(|| format!("creating {}", group.display()))?;
            quotas.groups.push(group.clone());
            fs::write(group.join("cpu.cfs_period_us"), CPU_PERIOD_US.to_string())?;
            fs::write(group.join("cpu.cfs_quota_us"), quota.to_string())?;
            fs::write(group.join("tasks"), tid.to_string())
                .with_context(|| format!("moving thread {tid} into {}", group.display()))?;
        }
        Ok(quotas)
    }

    /// Quota periods in which a worker was held back, summed over the workers.
    fn throttled_periods(&self) -> u64 {
        self.groups
            .iter()
            .filter_map(|group| fs::read_to_string(group.join("cpu.stat")).ok())
            .filter_map(|stat| {
                stat.lines()
                    .find_map(|line| line.strip_prefix("nr_throttled "))
                    .and_then(|n| n.trim().parse::<u64>().ok())
            })
            .sum()
    }
}

impl Drop for WorkerQuotas {
    fn drop(&mut self) {
        let root_tasks = PathBuf::from(CPU_CGROUPS).join("tasks");
        for group in &self.groups {
            if let Ok(tasks) = fs::read_to_string(group.join("tasks")) {
                for tid in tasks.lines() {
                    let _ = fs::write(&root_tasks, tid);
                }
            }
            let _ = fs::remove_dir(group);
        }
    }
}

/// The thread ids of an agent's binding workers (threads named `binder-<n>`), in order.
fn binder_threads(agent: u32) -> Result<Vec<u32>> {
    let mut threads = Vec::new();
    let tasks = PathBuf::from(format!("/proc/{agent}/task"));
    for entry in fs::read_dir(&tasks).with_context(|| format!("listing {}", tasks.display()))? {
        let path = entry?.path();
        let name = fs::read_to_string(path.join("comm")).unwrap_or_default();
        let Some(index) = name.trim().strip_prefix("binder-") else {
            continue;
        };
        let tid = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.parse().ok());
        if let (Ok(index), Some(tid)) = (index.parse::<u32>(), tid) {
            threads.push((index, tid));
        }
    }
    threads.sort();
    Ok(threads.into_iter().map(|(_, tid)| tid).collect())
}
