//! Where the agent's CPU time per new connection goes, by `perf record -g` on the agent
//! during one more new-connection run. On veth, a packet the agent sends is received by the
//! other namespace's stack in the softirq the kernel runs as the send returns, on the
//! agent's thread: the backend's handshake, XDP on its SYN-ACK, its receipt of the replay.
//! The process's CPU time counts that work as the agent's, where on a real network another
//! machine would do it; the samples tell it apart.

use std::{path::Path, time::Duration};

use anyhow::{Context, Result};
use balancer_lab::Lab;

use super::{agent_cpu_seconds, new_connections_rps, System};

/// Samples a second per CPU: light on the agent, thousands of samples in a run.
const SAMPLE_HZ: &str = "1999";

/// Where a sample of the agent was.
#[derive(Default)]
struct Split {
    samples: u64,
    /// In a softirq run inline: other stacks' packets.
    softirq: u64,
    /// In `bpf()`, outside any softirq.
    bpf: u64,
    /// In `sendmmsg()`, outside any softirq.
    sendmmsg: u64,
    /// Elsewhere in the kernel: the ring's wakeups, epoll, the scheduler.
    other_kernel: u64,
    /// In the agent's own code and its libraries.
    user: u64,
}

impl Split {
    fn count(&mut self, frames: &[(&str, &str)]) {
        self.samples += 1;
        let has = |name: &str| frames.iter().any(|(symbol, _)| *symbol == name);
        let in_kernel = frames
            .first()
            .is_some_and(|(_, dso)| *dso == "[kernel.kallsyms]");
        let bucket = if has("handle_softirqs") || has("__do_softirq") {
            &mut self.softirq
        } else if has("__sys_bpf") {
            &mut self.bpf
        } else if has("__sys_sendmmsg") {
            &mut self.sendmmsg
        } else if in_kernel {
            &mut self.other_kernel
        } else {
            &mut self.user
        };
        *bucket += 1;
    }

    fn share(&self, part: u64) -> f64 {
        part as f64 / self.samples.max(1) as f64
    }
}

/// Whether `perf` runs here (Debian: `linux-perf`).
pub fn available() -> bool {
    std::process::Command::new("perf")
        .arg("--version")
        .output()
        .is_ok_and(|output| output.status.success())
}

/// The split of the agent's CPU time per new connection on each cookie path among
/// `systems`, as a Markdown table.
pub fn split_agent_cpu(
    lab: &mut Lab,
    balancer: &Path,
    config: &Path,
    systems: &[System],
    seconds: u32,
) -> Result<String> {
    let mut out = String::from(
        "\nThe agent's CPU time per new connection, split by `perf record -g` on the agent during one more new-connection run: in softirqs the kernel ran on the agent's thread as its sends returned (the backend's and XDP's work on the packets the agent sent, which another machine does on a real network), in `bpf()`, in `sendmmsg()` (its own part), elsewhere in the kernel, in user space. The agent's own time is the total less the softirqs.\n\n| system | agent µs/connection | softirq of other stacks | bpf() | sendmmsg() | other kernel | user space | agent's own µs/connection |\n|---|---|---|---|---|---|---|---|\n",
    );
    if !available() {
        out += "| (perf is not installed: apt-get install linux-perf) | | | | | | | |\n";
        println!("{out}");
        return Ok(out);
    }
    for &system in systems.iter().filter(|s| s.binds_in_agent()) {
        if lab.balancer_pid().is_none() {
            lab.start_balancer(balancer, config)?;
        }
        let pid = lab.balancer_pid().context("the agent is not running")?;
        let data = lab.dir().join(format!("perf-{}.data", system.key()));
        let ns = lab.balancer_ns().to_owned();
        let perf = lab.spawn(
            &ns,
            &[
                "perf",
                "record",
                "-q",
                "-F",
                SAMPLE_HZ,
                "-g",
                "-p",
                &pid.to_string(),
                "-o",
                &data.to_string_lossy(),
            ],
        )?;
        // perf says nothing when it is attached.
        std::thread::sleep(Duration::from_millis(500));
        let before = agent_cpu_seconds(lab);
        let measured = new_connections_rps(lab, system, seconds);
        let after = agent_cpu_seconds(lab);
        lab.stop(perf)?;
        let connections = measured?.rate * f64::from(seconds);
        let agent_us = after
            .zip(before)
            .map_or(f64::NAN, |(a, b)| (a - b) * 1e6 / connections);
        let split = read_samples(&data)?;
        let percent = |part: u64| format!("{:.0}%", split.share(part) * 100.0);
        out += &format!(
            "| {} | {agent_us:.1} | {} | {} | {} | {} | {} | {:.1} |\n",
            system.title(),
            percent(split.softirq),
            percent(split.bpf),
            percent(split.sendmmsg),
            percent(split.other_kernel),
            percent(split.user),
            agent_us * (1.0 - split.share(split.softirq)),
        );
    }
    println!("{out}");
    Ok(out)
}

/// The samples `perf record` wrote to `data`, by where they were.
fn read_samples(data: &Path) -> Result<Split> {
    let output = std::process::Command::new("perf")
        .args(["script", "-F", "ip,sym,dso", "-i"])
        .arg(data)
        .output()
        .context("running perf script")?;
    let text = String::from_utf8_lossy(&output.stdout);
    let mut split = Split::default();
    // A sample is its frames, innermost first, one a line ("ip symbol (dso)"), then a blank
    // line.
    for sample in text.split("\n\n") {
        let frames: Vec<(&str, &str)> = sample
            .lines()
            .filter_map(|line| {
                let mut fields = line.split_whitespace();
                let _ip = fields.next()?;
                let symbol = fields.next()?;
                let dso = fields.last()?.trim_start_matches('(').trim_end_matches(')');
                Some((symbol.split('+').next().unwrap_or(symbol), dso))
            })
            .collect();
        if !frames.is_empty() {
            split.count(&frames);
        }
    }
    Ok(split)
}
