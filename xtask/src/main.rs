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
    /// Throughput and requests per second through the balancer and the direct path.
    Bench {
        /// Short runs, for a smoke test.
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
