//! The benchmark's results: markdown tables (rates with spread and ratios, latency, CPU per
//! unit of work, the balancer against each peer, steal) and SVG bar charts, saved with the
//! machine's details.

use std::{fmt::Write as _, path::PathBuf, process::Command};

use anyhow::{Context, Result};

use super::{peers::Peer, Sample, System, STEAL_WARNING_PERCENT, SYSTEMS, WORKLOADS};
use crate::build;

/// samples[workload][system], as the rounds collected them.
pub type Samples = [Vec<Vec<Sample>>];

pub fn tables(samples: &Samples, seconds: u32, rounds: u32, skipped: &[(Peer, String)]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{}\n", machine());
    let _ = writeln!(
        out,
        "Rates: median of {rounds} interleaved round(s) of {seconds} s, [min-max], and the ratio to the routed path without XDP of the same address family (the IPv6 systems to routed IPv6). Every system ends at one backend server (the L4 paths, the full-NAT lb-cookie VIP and the peers at backend-1, the cookie VIP at backend-3, the lb-cookie VIP at backend-2: the same server program)."
    );
    let mut header = "| system |".to_owned();
    for workload in &WORKLOADS {
        let _ = write!(header, " {} ({}) | ratio |", workload.name, workload.unit);
    }
    let _ = writeln!(
        out,
        "\n{header}\n|---|{}",
        "---|---|".repeat(WORKLOADS.len())
    );
    for (index, system) in measured(samples) {
        let mut row = format!("| {} |", system.title());
        let routed_index = index_of(system.routed_baseline());
        for per_system in samples {
            let rates = field(&per_system[index], |s| s.rate);
            let routed = median(&field(&per_system[routed_index], |s| s.rate));
            let _ = write!(
                row,
                " {} | {} |",
                spread(&rates),
                ratio(median(&rates), routed)
            );
        }
        let _ = writeln!(out, "{row}");
    }

    let _ = writeln!(
        out,
        "\nLatency of {} (wrk --latency), median over the rounds of each run's percentile, in µs:",
        WORKLOADS[0].name
    );
    let _ = writeln!(out, "\n| system | p50 | p99 |\n|---|---|---|");
    for (index, system) in measured(samples) {
        let runs = &samples[0][index];
        let _ = writeln!(
            out,
            "| {} | {} | {} |",
            system.title(),
            spread(&field(runs, |s| s.p50_us)),
            spread(&field(runs, |s| s.p99_us))
        );
    }

    let _ = writeln!(
        out,
        "\nThe balancer against each peer: ratio of medians ({}), above 1 where the balancer is ahead:",
        WORKLOADS
            .iter()
            .map(|w| w.unit)
            .collect::<Vec<_>>()
            .join(" / ")
    );
    let peers: Vec<(usize, System)> = measured(samples)
        .filter(|(_, s)| matches!(s, System::Peer(_) | System::XdpRouter))
        .collect();
    let mut header = "| balancer |".to_owned();
    for (_, peer) in &peers {
        let _ = write!(header, " vs {} |", peer.title());
    }
    let _ = writeln!(out, "\n{header}\n|---|{}", "---|".repeat(peers.len()));
    // The peers serve IPv4 alone, so the IPv6 VIP is left out.
    for (index, system) in measured(samples) {
        if !matches!(
            system,
            System::Vip | System::CookieVip | System::LbCookieVip | System::FullNatCookieVip
        ) {
            continue;
        }
        let mut row = format!("| {} |", system.title());
        for (peer_index, _) in &peers {
            let ratios: Vec<String> = samples
                .iter()
                .map(|per_system| {
                    let ours = median(&field(&per_system[index], |s| s.rate));
                    let theirs = median(&field(&per_system[*peer_index], |s| s.rate));
                    ratio(ours, theirs)
                })
                .collect();
            let _ = write!(row, " {} |", ratios.join(" / "));
        }
        let _ = writeln!(out, "{row}");
    }

    let _ = writeln!(
        out,
        "\nMetrics scraped every second against not scraped (enabled in both): ratio of medians ({}), 1 where scraping costs nothing:\n",
        WORKLOADS
            .iter()
            .map(|w| w.unit)
            .collect::<Vec<_>>()
            .join(" / ")
    );
    for (plain, scraped) in [
        (System::Vip, System::VipScraped),
        (System::LbCookieVip, System::LbCookieVipScraped),
    ] {
        let both = [plain, scraped]
            .iter()
            .all(|system| measured(samples).any(|(_, s)| s == *system));
        if !both {
            continue;
        }
        let ratios: Vec<String> = samples
            .iter()
            .map(|per_system| {
                let with = median(&field(&per_system[index_of(scraped)], |s| s.rate));
                let without = median(&field(&per_system[index_of(plain)], |s| s.rate));
                ratio(with, without)
            })
            .collect();
        let _ = writeln!(out, "- {}: {}", scraped.title(), ratios.join(" / "));
    }

    let _ = writeln!(
        out,
        "\nCPU time per unit of work, median, lower is better: machine-wide busy time over the run / work done (the client, the balancer and the backend share the CPUs); in brackets the agent's own share."
    );
    let mut header = "| system |".to_owned();
    for workload in &WORKLOADS {
        let _ = write!(header, " µs/{} |", workload.work);
    }
    let _ = writeln!(out, "\n{header}\n|---|{}", "---|".repeat(WORKLOADS.len()));
    for (index, system) in measured(samples) {
        let mut row = format!("| {} |", system.title());
        for per_system in samples {
            let runs = &per_system[index];
            let cost = median(&field(runs, |s| s.cpu_us_per_work));
            let agent = median(&field(runs, |s| s.agent_us_per_work));
            if cost.is_nan() {
                row.push_str(" - |");
                continue;
            }
            let _ = write!(row, " {cost:.1}");
            if !agent.is_nan() {
                let _ = write!(row, " (agent {agent:.2})");
            }
            row.push_str(" |");
        }
        let _ = writeln!(out, "{row}");
    }

    let _ = writeln!(
        out,
        "\nXDP program run time per packet, median, in ns (run_time_ns / run_cnt with kernel.bpf_stats_enabled; the balancer's program, or the trivial router's):"
    );
    let mut header = "| system |".to_owned();
    for workload in &WORKLOADS {
        let _ = write!(header, " {} |", workload.name);
    }
    let _ = writeln!(out, "\n{header}\n|---|{}", "---|".repeat(WORKLOADS.len()));
    for (index, system) in measured(samples) {
        let costs: Vec<f64> = samples
            .iter()
            .map(|per_system| median(&field(&per_system[index], |s| s.xdp_ns_per_packet)))
            .collect();
        if costs.iter().all(|c| c.is_nan()) {
            continue;
        }
        let mut row = format!("| {} |", system.title());
        for cost in costs {
            if cost.is_nan() {
                row.push_str(" - |");
            } else {
                let _ = write!(row, " {cost:.0} |");
            }
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
    for (peer, why) in skipped {
        let _ = writeln!(out, "Not measured: {}: {why}", peer.title());
    }
    if !std::path::Path::new("/proc/net/ip_vs").exists() {
        let _ = writeln!(
            out,
            "Not measured: IPVS: this kernel has no IPVS (CONFIG_IP_VS off)."
        );
    }
    let _ = writeln!(
        out,
        "The client, the balancer host and the backends share this machine's CPUs (and with anything else running on it)."
    );
    out
}

/// Writes the report to `bench-results/bench-<unix time>.md` in the workspace, and a bar
/// chart per workload and one of latency beside it (`bench-<unix time>-<name>.svg`).
pub fn save(report: &str, samples: &Samples) -> Result<PathBuf> {
    let dir = build::workspace_root().join("bench-results");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    let path = dir.join(format!("bench-{stamp}.md"));
    std::fs::write(&path, report).with_context(|| format!("writing {}", path.display()))?;
    for (name, chart) in charts(samples) {
        let file = dir.join(format!("bench-{stamp}-{name}.svg"));
        std::fs::write(&file, chart).with_context(|| format!("writing {}", file.display()))?;
    }
    Ok(path)
}

/// One chart per workload (its rate) and one of the keep-alive latency percentiles.
fn charts(samples: &Samples) -> Vec<(String, String)> {
    let mut charts = Vec::new();
    for (workload, per_system) in WORKLOADS.iter().zip(samples) {
        let bars: Vec<Bar> = measured(samples)
            .map(|(index, system)| Bar::of(system.title(), &field(&per_system[index], |s| s.rate)))
            .collect();
        let name = workload.unit.replace('/', "-per-");
        let title = format!(
            "{} ({}, median of the rounds, min-max)",
            workload.name, workload.unit
        );
        charts.push((name, bar_chart(&title, &bars)));
    }
    let mut bars = Vec::new();
    for (index, system) in measured(samples) {
        let runs = &samples[0][index];
        bars.push(Bar::of(
            &format!("{} p50", system.title()),
            &field(runs, |s| s.p50_us),
        ));
        bars.push(Bar::of(
            &format!("{} p99", system.title()),
            &field(runs, |s| s.p99_us),
        ));
    }
    let title = format!("{} latency (µs, lower is better)", WORKLOADS[0].name);
    charts.push(("latency".to_owned(), bar_chart(&title, &bars)));
    charts
}

struct Bar {
    label: String,
    median: f64,
    min: f64,
    max: f64,
}

impl Bar {
    fn of(label: &str, values: &[f64]) -> Bar {
        let numbers: Vec<f64> = values.iter().copied().filter(|v| !v.is_nan()).collect();
        Bar {
            label: label.to_owned(),
            median: median(&numbers),
            min: numbers.iter().copied().fold(f64::INFINITY, f64::min),
            max: numbers.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        }
    }
}

/// A horizontal bar chart: one bar per row at its median, a line over its min-max.
fn bar_chart(title: &str, bars: &[Bar]) -> String {
    const LABEL_WIDTH: f64 = 290.0;
    const PLOT_WIDTH: f64 = 460.0;
    const ROW: f64 = 22.0;
    const TOP: f64 = 40.0;
    let scale_max = bars
        .iter()
        .map(|b| if b.max.is_finite() { b.max } else { b.median })
        .filter(|v| v.is_finite())
        .fold(0.0, f64::max)
        .max(f64::MIN_POSITIVE);
    let height = TOP + ROW * bars.len() as f64 + 20.0;
    let width = LABEL_WIDTH + PLOT_WIDTH + 90.0;
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"10\" y=\"22\" font-size=\"14\" font-weight=\"bold\">{}</text>\n",
        escape(title)
    );
    for (row, bar) in bars.iter().enumerate() {
        let y = TOP + ROW * row as f64;
        let _ = writeln!(
            svg,
            "<text x=\"{:.0}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            LABEL_WIDTH - 8.0,
            y + 14.0,
            escape(&bar.label)
        );
        if !bar.median.is_finite() {
            let _ = writeln!(
                svg,
                "<text x=\"{LABEL_WIDTH}\" y=\"{:.1}\" fill=\"#a00\">failed</text>",
                y + 14.0
            );
            continue;
        }
        let length = bar.median / scale_max * PLOT_WIDTH;
        let ours = bar.label.contains("VIP");
        let colour = if ours { "#2b6cb0" } else { "#a0aec0" };
        let _ = writeln!(
            svg,
            "<rect x=\"{LABEL_WIDTH}\" y=\"{:.1}\" width=\"{length:.1}\" height=\"16\" fill=\"{colour}\"/>",
            y + 2.0
        );
        if bar.min.is_finite() && bar.max.is_finite() && bar.max > bar.min {
            let _ = writeln!(
                svg,
                "<line x1=\"{:.1}\" x2=\"{:.1}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"black\"/>",
                LABEL_WIDTH + bar.min / scale_max * PLOT_WIDTH,
                LABEL_WIDTH + bar.max / scale_max * PLOT_WIDTH,
                y + 10.0,
                y + 10.0
            );
        }
        let _ = writeln!(
            svg,
            "<text x=\"{:.1}\" y=\"{:.1}\">{:.0}</text>",
            LABEL_WIDTH + length.max(bar.max / scale_max * PLOT_WIDTH) + 6.0,
            y + 14.0,
            bar.median
        );
    }
    svg.push_str("</svg>\n");
    svg
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Kernel, CPUs and date of the run, for the report's first line.
fn machine() -> String {
    let run = |args: &[&str]| {
        Command::new(args[0])
            .args(&args[1..])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default()
    };
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_default();
    format!(
        "Machine: Linux {}, {} CPUs ({cpu}), {}",
        run(&["uname", "-r"]),
        run(&["nproc"]),
        run(&["date", "-u", "+%Y-%m-%d %H:%M UTC"])
    )
}

/// `a / b` to two places, or `-` where either was not measured.
fn ratio(a: f64, b: f64) -> String {
    let ratio = a / b;
    if ratio.is_finite() {
        format!("{ratio:.2}")
    } else {
        "-".to_owned()
    }
}

/// The systems with a sample in any workload (`--only` leaves the others out), with their
/// index in [`SYSTEMS`].
fn measured(samples: &Samples) -> impl Iterator<Item = (usize, System)> + '_ {
    SYSTEMS.into_iter().enumerate().filter(|(index, _)| {
        samples
            .iter()
            .any(|per_system| !per_system[*index].is_empty())
    })
}

/// Where `system` is in [`SYSTEMS`], and so in each workload's samples.
pub fn index_of(system: System) -> usize {
    SYSTEMS.iter().position(|s| *s == system).unwrap_or(0)
}

fn field(samples: &[Sample], of: impl Fn(&Sample) -> f64) -> Vec<f64> {
    samples.iter().map(of).collect()
}

/// The median of the values that are numbers (failed runs are NaN); NaN if there are none.
pub fn median(values: &[f64]) -> f64 {
    let mut sorted: Vec<f64> = values.iter().copied().filter(|v| !v.is_nan()).collect();
    sorted.sort_by(f64::total_cmp);
    sorted.get(sorted.len() / 2).copied().unwrap_or(f64::NAN)
}

/// `median [min-max]` of the runs that gave a number, with how many failed; `-` when the
/// system was not measured.
pub fn spread(values: &[f64]) -> String {
    if values.is_empty() {
        return "-".to_owned();
    }
    let failed = values.iter().filter(|v| v.is_nan()).count();
    let numbers: Vec<f64> = values.iter().copied().filter(|v| !v.is_nan()).collect();
    if numbers.is_empty() {
        return "failed".to_owned();
    }
    let min = numbers.iter().copied().fold(f64::INFINITY, f64::min);
    let max = numbers.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let text = if numbers.len() > 1 {
        format!("{:.0} [{min:.0}-{max:.0}]", median(&numbers))
    } else {
        format!("{:.0}", median(&numbers))
    };
    if failed > 0 {
        format!("{text} ({failed} failed)")
    } else {
        text
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
        assert_eq!(spread(&[]), "-");
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn a_chart_has_a_bar_per_system_and_marks_failures() {
        let bars = [
            Bar::of("through the VIP", &[2.0, 4.0, 3.0]),
            Bar::of("nginx (ip_hash)", &[f64::NAN]),
        ];
        let svg = bar_chart("req/s", &bars);
        assert_eq!(
            svg.matches("<rect").count(),
            2,
            "the background and one bar"
        );
        assert!(svg.contains(">failed</text>"));
        assert!(
            svg.contains(">3</text>"),
            "the median is written beside its bar"
        );
    }
}
