//! `cargo xtask`: builds, runs, tests and benchmarks the balancer, installing what it needs.

mod bench;
mod build;
mod run;
mod test;
mod toolchain;

use std::process::ExitCode;

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
    /// prints commands to try and shows live stats until Ctrl-C. With arguments: runs the
    /// agent, e.g. `cargo xtask run -- --config balancer.toml`.
    Run {
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
        /// One round of 2-second runs instead of three of 5 seconds.
        #[arg(long)]
        quick: bool,
    },
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Task::Build => build::all().map(|_| ()),
        Task::Run { args } => run::run(&args),
        Task::Test { args } => test::run(&args),
        Task::Bench { quick } => bench::run(quick),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
