//! `cargo xtask`: builds, runs, tests and benchmarks the balancer, installing what it needs.

mod bench;
mod build;
mod fuzz;
mod run;
mod test;
mod toolchain;

use std::{process::ExitCode, time::Duration};

use balancer_lab::Impairment;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Build, run, test and benchmark the XDP balancer", long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Find or install the eBPF toolchain, then build the XDP program and the binaries.
    Build,
    /// Without arguments: a demo in a namespace lab (client, balancer, three backends) that
    /// prints commands to try and shows live stats until Ctrl-C; `--loss`, `--reorder`,
    /// `--duplicate` and `--delay` impair the client's link. With arguments after `--`: runs
    /// the agent, e.g. `cargo xtask run -- --config balancer.toml`.
    Run {
        /// Demo only: percent of frames the lab drops on the client link, each way.
        #[arg(long, value_name = "PERCENT")]
        loss: Option<f64>,
        /// Demo only: percent of frames the lab holds back behind the next one, each way.
        #[arg(long, value_name = "PERCENT")]
        reorder: Option<f64>,
        /// Demo only: percent of frames the lab sends twice, each way.
        #[arg(long, value_name = "PERCENT")]
        duplicate: Option<f64>,
        /// Demo only: milliseconds the lab adds to every frame on the client link, each way.
        #[arg(long, value_name = "MS")]
        delay: Option<u64>,
        /// Arguments for `balancer run`, e.g. `--config balancer.toml`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Unit tests, then the XDP fixtures and the namespace integration tests (needs root).
    /// Arguments after `--` go to the integration test binaries, e.g.
    /// `cargo xtask test -- udp --nocapture`.
    Test {
        /// A test name filter and other libtest options for the integration tests.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Requests, new connections and download throughput through the VIP against plain
    /// kernel routing, interleaved in one lab (needs root; about 2.5 minutes).
    Bench {
        /// One round of 2-second runs instead of five of 3 seconds.
        #[arg(long)]
        quick: bool,
        /// Only these systems, by short name, comma-separated (routed, routed6, xdp-router,
        /// nft-numgen, nft-jhash, haproxy, nginx, vip, vip-scraped, vip6, routed-xdp,
        /// cookie, lb-cookie, lb-cookie-scraped, full-nat); the ratios need `routed`.
        #[arg(long, value_delimiter = ',', value_name = "SYSTEMS")]
        only: Vec<String>,
        /// After the rounds, count the agent's system calls per new connection on each
        /// cookie path with `strace -c` (a run of its own: strace slows the agent), and
        /// split its CPU time per new connection with `perf record -g` (another run; needs
        /// linux-perf).
        #[arg(long)]
        syscalls: bool,
        /// Instead of the systems: new cookie connections with one binding worker against
        /// two, each worker held to the same share of a CPU (needs cgroup v1's cpu
        /// controller).
        #[arg(long)]
        workers: bool,
    },
    /// Fuzzing (needs root): the agent's parsers with random and mutated inputs, and random
    /// and mutated frames through the XDP program, each counted under exactly one reason.
    Fuzz {
        /// Cases per target.
        #[arg(long, default_value_t = 1_000_000)]
        cases: u64,
    },
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Task::Build => build::all().map(|_| ()),
        Task::Run {
            loss,
            reorder,
            duplicate,
            delay,
            args,
        } => {
            let impairment = Impairment {
                loss: loss.unwrap_or_default(),
                reorder: reorder.unwrap_or_default(),
                duplicate: duplicate.unwrap_or_default(),
                delay: Duration::from_millis(delay.unwrap_or_default()),
            };
            run::run(&args, &impairment)
        }
        Task::Test { args } => test::run(&args),
        Task::Bench { quick, workers, .. } if workers => bench::workers::run(quick),
        Task::Bench {
            quick,
            only,
            syscalls,
            ..
        } => bench::run(&bench::Options {
            quick,
            only,
            syscalls,
        }),
        Task::Fuzz { cases } => fuzz::run(cases),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
