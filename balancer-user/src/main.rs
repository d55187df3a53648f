//! `balancer`: the agent of the XDP load balancer.
//!
//! It loads and attaches the XDP program, programs services and backends into its maps and
//! reports what the data plane does.

mod config;
mod dataplane;
mod maglev;

mod stats;

use std::{io::IsTerminal, path::PathBuf, process::ExitCode, time::Instant};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use tokio::signal::unix::{signal, SignalKind};
use tracing::{info, warn};

use crate::{config::Config, dataplane::Dataplane, stats::Snapshot};

/// XDP load balancer for virtual IPs: forwards client flows to backends in the kernel.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Attach to the interfaces in the config and balance until Ctrl-C or SIGTERM.
    Run {
        /// The configuration file (TOML); see balancer.example.toml.
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Check a configuration file and exit: prints what is wrong, naming the field.
    Check {
        /// The configuration file (TOML).
        config: PathBuf,
    },
    /// Print the packet counters of a running instance, one `reason packets bytes` per line.
    Stats {
        /// The instance name from the config.
        #[arg(short, long, default_value = config::DEFAULT_INSTANCE)]
        instance: String,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match execute(Cli::parse().command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn execute(command: Command) -> Result<()> {
    match command {
        Command::Run { config } => run(config),
        Command::Check { config } => {
            let config = Config::load(&config)?;
            println!(
                "configuration is valid: {} services, {} backends",
                config.services.len(),
                config
                    .services
                    .iter()
                    .map(|s| s.backends.len())
                    .sum::<usize>()
            );
            Ok(())
        }
        Command::Stats { instance } => {
            print!("{}", Snapshot::read(&instance)?.table());
            Ok(())
        }
    }
}

fn run(config_path: PathBuf) -> Result<()> {
    let config = Config::load(&config_path)?;
    let mut dataplane = Dataplane::start(&config)?;
    dataplane.apply(&config)?;
    let attached: Vec<String> = dataplane
        .attachments
        .iter()
        .map(|(i, mode)| format!("{i} ({mode})"))
        .collect();
    let instructions = dataplane
        .verified_instructions
        .map_or_else(|| "unknown".to_owned(), |n| n.to_string());
    println!(
        "ready: attached to {}; {} services; verifier processed {instructions} instructions; maps pinned in {}",
        attached.join(", "),
        config.services.len(),
        dataplane::pin_dir(&config.instance).display(),
    );

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(report_until_stopped(&config))?;
    dataplane.detach()?;
    info!("stopped");
    Ok(())
}

/// Prints a stats line every `stats_interval` seconds until SIGINT or SIGTERM.
async fn report_until_stopped(config: &Config) -> Result<()> {
    let mut interrupt = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut terminate =
        signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let period = std::time::Duration::from_secs(config.stats_interval.max(1));
    let mut ticker = tokio::time::interval(period);
    let mut last = (Instant::now(), Snapshot::read(&config.instance)?);
    loop {
        tokio::select! {
            _ = interrupt.recv() => { info!("SIGINT received, detaching"); return Ok(()); }
            _ = terminate.recv() => { info!("SIGTERM received, detaching"); return Ok(()); }
            _ = ticker.tick(), if config.stats_interval > 0 => {
                match Snapshot::read(&config.instance) {
                    Ok(now) => {
                        println!("{}", now.line_since(&last.1, last.0.elapsed()));
                        last = (Instant::now(), now);
                    }
                    Err(error) => warn!("reading stats: {error:#}"),
                }
            }
        }
    }
}
