//! The client sources that opened the most new flows over the last minute, in constant
//! memory: the Space-Saving algorithm (Metwally et al.) over per-second buckets. Any source
//! with more than a [`SourceTally::CAPACITY`]th of the minute's new flows is among the
//! entries whatever the others do, so a NAT gateway or a flooder shows up under a flood of
//! one-time sources; with no more sources than entries every count is exact.

use std::net::IpAddr;

use super::counters::RecentCounts;

pub struct SourceTally {
    entries: Vec<Entry>,
}

struct Entry {
    source: IpAddr,
    /// The service of the source's latest new flow.
    service: u32,
    flows: RecentCounts,
    /// The minute's total as of the last add or refresh; the eviction order.
    total: u64,
    /// Flows the entry inherited when it took over the least-counted one: its count is high
    /// by at most this much.
    overcount: u64,
}

/// One source of [`SourceTally::top`].
#[derive(Debug, PartialEq, Eq)]
pub struct TopSource {
    pub source: IpAddr,
    pub service: u32,
    /// New flows over the last minute, high by at most `overcount`.
    pub new_flows: u64,
    pub overcount: u64,
    /// New flows over the last [`SourceTally::RECENT_SECONDS`]: the source's rate now.
    pub recent_flows: u64,
}

impl Default for SourceTally {
    fn default() -> Self {
        SourceTally {
            entries: Vec::with_capacity(Self::CAPACITY),
        }
    }
}

impl SourceTally {
    pub const CAPACITY: usize = 128;
    pub const RECENT_SECONDS: u64 = 10;

    /// Counts a new flow of `source` to `service` at second `now`.
    pub fn add(&mut self, source: IpAddr, service: u32, now: u64) {
        let index = match self.entries.iter().position(|e| e.source == source) {
            Some(index) => index,
            None if self.entries.len() < Self::CAPACITY => {
                self.entries.push(Entry {
                    source,
                    service,
                    flows: RecentCounts::default(),
                    total: 0,
                    overcount: 0,
                });
                self.entries.len() - 1
            }
            None => {
                // Take over the least-counted entry, keeping its count: the newcomer may have
                // had that many flows while it was not tracked.
                let (index, least) = self
                    .entries
                    .iter_mut()
                    .enumerate()
                    .min_by_key(|(_, e)| e.total)
                    .expect("the tally is full");
                least.source = source;
                least.overcount = least.total;
                index
            }
        };
        let entry = &mut self.entries[index];
        entry.service = service;
        entry.flows.add(now);
        entry.total = entry.flows.total(now);
    }

    /// Brings every entry's total to second `now`, so that sources whose flows aged out of
    /// the minute are the ones taken over.
    pub fn refresh(&mut self, now: u64) {
        for entry in &mut self.entries {
            entry.total = entry.flows.total(now);
            entry.overcount = entry.overcount.min(entry.total);
        }
        self.entries.retain(|e| e.total > 0);
    }

    /// The `limit` sources with the most new flows over the minute up to `now`, most first.
    pub fn top(&self, limit: usize, now: u64) -> Vec<TopSource> {
        let mut top: Vec<TopSource> = self
            .entries
            .iter()
            .map(|e| {
                let new_flows = e.flows.total(now);
                TopSource {
                    source: e.source,
                    service: e.service,
                    new_flows,
                    overcount: e.overcount.min(new_flows),
                    recent_flows: e.flows.total_over(Self::RECENT_SECONDS, now),
                }
            })
            .filter(|s| s.new_flows > 0)
            .collect();
        top.sort_by(|a, b| b.new_flows.cmp(&a.new_flows).then(a.source.cmp(&b.source)));
        top.truncate(limit);
        top
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(n: u32) -> IpAddr {
        IpAddr::from(std::net::Ipv4Addr::from(0xc612_0000 + n))
    }

    #[test]
    fn counts_are_exact_while_the_sources_fit() {
        let mut tally = SourceTally::default();
        for (n, flows) in [(1, 30), (2, 12), (3, 5)] {
            for _ in 0..flows {
                tally.add(source(n), 7, 100);
            }
        }
        let top = tally.top(2, 100);
        assert_eq!(
            top,
            vec![
                TopSource {
                    source: source(1),
                    service: 7,
                    new_flows: 30,
                    overcount: 0,
                    recent_flows: 30
                },
                TopSource {
                    source: source(2),
                    service: 7,
                    new_flows: 12,
                    overcount: 0,
                    recent_flows: 12
                },
            ]
        );
    }

    #[test]
    fn a_heavy_source_stays_on_top_under_a_flood_of_one_time_sources() {
        let mut tally = SourceTally::default();
        for round in 0..10_000u32 {
            tally.add(source(1_000_000 + round), 1, 5);
            if round % 20 == 0 {
                tally.add(source(1), 2, 5);
            }
        }
        let top = tally.top(1, 5);
        assert_eq!(top[0].source, source(1));
        assert_eq!(top[0].service, 2);
        assert!(top[0].new_flows - top[0].overcount <= 500);
        assert!(top[0].new_flows >= 500);
    }

    #[test]
    fn flows_age_out_after_a_minute() {
        let mut tally = SourceTally::default();
        tally.add(source(1), 1, 10);
        tally.add(source(2), 1, 50);
        tally.refresh(75);
        let top = tally.top(10, 75);
        assert_eq!(top.len(), 1);
        assert_eq!(top[0].source, source(2));
        assert_eq!((top[0].new_flows, top[0].recent_flows), (1, 0));
    }
}
