//! The per-CPU packet counters of the XDP program, summed and shown to the operator.

use std::{fmt::Write as _, time::Duration};

use anyhow::{Context, Result};
use aya::maps::{Map, MapData, PerCpuArray};
use balancer_common::{map_name, Counter, Reason};

use crate::dataplane::pin_dir;

/// Counters summed over all CPUs, indexed by [`Reason`].
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Snapshot(pub [Counter; Reason::COUNT as usize]);

impl Default for Snapshot {
    fn default() -> Self {
        Snapshot([Counter::default(); Reason::COUNT as usize])
    }
}

impl Snapshot {
    /// Reads the counters of a running (or pinned) instance.
    pub fn read(instance: &str) -> Result<Self> {
        let path = pin_dir(instance).join(map_name::STATS);
        let data = MapData::from_pin(&path)
            .with_context(|| format!("opening {} (is the balancer running?)", path.display()))?;
        let stats: PerCpuArray<MapData, Counter> = PerCpuArray::try_from(Map::PerCpuArray(data))?;
        let mut snapshot = Snapshot::default();
        for reason in Reason::ALL {
            let per_cpu = stats
                .get(&(reason as u32), 0)
                .with_context(|| format!("reading counter {}", reason.name()))?;
            let total = &mut snapshot.0[reason as usize];
            for counter in per_cpu.iter() {
                total.packets += counter.packets;
                total.bytes += counter.bytes;
            }
        }
        Ok(snapshot)
    }

    pub fn get(&self, reason: Reason) -> Counter {
        self.0[reason as usize]
    }

    /// One line with rates since `before` and totals of every non-zero pass/drop reason.
    pub fn line_since(&self, before: &Snapshot, elapsed: Duration) -> String {
        let seconds = elapsed.as_secs_f64().max(1e-3);
        let rate = |reason: Reason| {
            (self
                .get(reason)
                .packets
                .saturating_sub(before.get(reason).packets)) as f64
                / seconds
        };
        let mbits = |reason: Reason| {
            (self
                .get(reason)
                .bytes
                .saturating_sub(before.get(reason).bytes)) as f64
                * 8.0
                / seconds
                / 1e6
        };
        let mut line = format!(
            "stats: forwarded {:.0} pkt/s {:.1} Mbit/s | replied {:.0} pkt/s {:.1} Mbit/s | new flows {:.0}/s",
            rate(Reason::Forwarded),
            mbits(Reason::Forwarded),
            rate(Reason::Replied),
            mbits(Reason::Replied),
            rate(Reason::NewFlow),
        );
        let _ = write!(line, " | total flows {}", self.get(Reason::NewFlow).packets);
        for reason in Reason::ALL {
            let name = reason.name();
            let packets = self.get(reason).packets;
            if packets > 0 && (name.starts_with("pass_") || name.starts_with("drop_")) {
                let _ = write!(line, " {name}={packets}");
            }
        }
        line
    }

    /// Every counter as `{"reason": {"packets": n, "bytes": n}, ...}`.
    pub fn json(&self) -> serde_json::Value {
        Reason::ALL
            .iter()
            .map(|r| {
                let counter = self.get(*r);
                let value = serde_json::json!({"packets": counter.packets, "bytes": counter.bytes});
                (r.name().to_owned(), value)
            })
            .collect::<serde_json::Map<_, _>>()
            .into()
    }

    /// Every counter, one `name packets bytes` line each.
    pub fn table(&self) -> String {
        Reason::ALL
            .iter()
            .map(|r| {
                format!(
                    "{} {} {}\n",
                    r.name(),
                    self.get(*r).packets,
                    self.get(*r).bytes
                )
            })
            .collect()
    }
}
