//! `lab-drop`: makes a link of the lab lossy where the relay cannot sit, by attaching an XDP
//! program that drops a share of the frames an interface receives. Runs until it is killed;
//! the program goes with it.

use anyhow::{Context, Result};
use balancer_lab::xdp;
use clap::Parser;

#[derive(Parser)]
#[command(about = "Drops a share of the frames an interface receives, until killed")]
struct Args {
    /// The interface, in this namespace.
    #[arg(long)]
    interface: String,
    /// Percent of received frames dropped (0-50).
    #[arg(long)]
    percent: f64,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let index = xdp::interface_index(&args.interface)?;
    let _link = xdp::attach(index, args.percent)
        .with_context(|| format!("attaching the drop program to {}", args.interface))?;
    eprintln!(
        "dropping {}% of the frames {} receives",
        args.percent, args.interface
    );
    loop {
        std::thread::park();
    }
}
