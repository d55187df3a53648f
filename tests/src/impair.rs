//! The lab's impairment stage: what `lab-impair` does to the frames crossing the client link,
//! and the counters it keeps of what it did.
//!
//! This kernel has no netem, so the lab puts a relay of its own on the client link: a
//! namespace between the client and the balancer host whose two ports are bridged by
//! `lab-impair`, a process reading and writing whole frames on AF_PACKET sockets. Each frame,
//! in either direction, is dropped with probability `loss`, otherwise sent once more with
//! probability `duplicate`, held back behind the next frame with probability `reorder`, and
//! delayed by `delay`.

use std::{collections::HashMap, fs, path::Path, time::Duration};

use anyhow::{ensure, Context, Result};

/// Rates in percent of frames, per direction.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Impairment {
    pub loss: f64,
    pub reorder: f64,
    pub duplicate: f64,
    pub delay: Duration,
}

impl Impairment {
    /// Checks that every rate is a percentage.
    pub fn validate(&self) -> Result<()> {
        for (name, rate) in [
            ("loss", self.loss),
            ("reorder", self.reorder),
            ("duplicate", self.duplicate),
        ] {
            ensure!(
                (0.0..=100.0).contains(&rate),
                "{name} must be a percentage between 0 and 100, not {rate}"
            );
        }
        Ok(())
    }

    /// The `lab-impair` options that apply it.
    pub fn args(&self) -> Vec<String> {
        vec![
            "--loss".into(),
            self.loss.to_string(),
            "--reorder".into(),
            self.reorder.to_string(),
            "--duplicate".into(),
            self.duplicate.to_string(),
            "--delay-us".into(),
            self.delay.as_micros().to_string(),
        ]
    }

    /// Whether it changes anything at all.
    pub fn is_none(&self) -> bool {
        *self == Impairment::default()
    }
}

/// The two directions across the impaired link.
pub const DIRECTIONS: [&str; 2] = ["to_balancer", "to_client"];

/// What the relay counts per direction: frames read, and what it did to them. `socket_drops`
/// (frames the kernel dropped before the relay could read them) and `send_errors` (frames the
/// other port refused) are losses it did not choose; `oversized` frames (longer than a
/// 1500-byte MTU allows, i.e. merged segments) would make its rates lie.
pub const COUNTERS: [&str; 7] = [
    "frames",
    "dropped",
    "duplicated",
    "reordered",
    "socket_drops",
    "send_errors",
    "oversized",
];

/// The longest Ethernet frame a 1500-byte MTU allows, without the FCS.
pub const MAX_WIRE_FRAME: usize = 1514;

/// The counters the relay writes to its counters file: `<direction>_<counter> <value>` lines.
pub fn read_counters(path: &Path) -> Result<HashMap<String, u64>> {
    let text = fs::read_to_string(path)
        .with_context(|| format!("reading the impairment counters {}", path.display()))?;
    Ok(text
        .lines()
        .filter_map(|line| {
            let (name, value) = line.split_once(' ')?;
            Some((name.to_owned(), value.trim().parse().ok()?))
        })
        .collect())
}
