//! Fair shares of the binding table. Every connection the agent holds (a head being read, a
//! backend being opened, an edited head waiting for the client's acknowledgement) counts
//! against its client (an IPv4 address, an IPv6 /64: one host's addresses) and the client's
//! prefix (an IPv4 /24, an IPv6 /48: a site). A source at its budget pays for a new
//! connection with its own oldest one, and a full table sheds the oldest connection of the
//! prefix holding the most, so a greedy source only ever crowds out itself and a new client of
//! a quiet source always gets a place.

use std::collections::VecDeque;

use balancer_common::{Addr, FlowKey};
use foldhash::HashMap;

/// Prefix lengths of one client and of the prefix whose clients share a budget (a NAT pool, a
/// hosting subnet, a site), for IPv4 and IPv6.
const CLIENT_BITS: (u32, u32) = (32, 64);
/// XDP hands each such prefix to one binding worker, so its budget is counted in one place.
const PREFIX_BITS: (u32, u32) = balancer_common::CLIENT_PREFIX_BITS;

/// Why a connection was shed to make room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shed {
    /// Its client address was at its budget.
    ClientBudget,
    /// Its client's prefix was at its budget.
    PrefixBudget,
    /// The table was full and its prefix held the most.
    TableFull,
}

pub struct Budgets {
    per_client: usize,
    per_prefix: usize,
    /// Connections by client, oldest first.
    by_client: HashMap<Addr, VecDeque<FlowKey>>,
    /// Connections by client prefix, oldest first.
    by_prefix: HashMap<Addr, VecDeque<FlowKey>>,
}

fn masked(addr: &Addr, (v4_bits, v6_bits): (u32, u32)) -> Addr {
    let v4 = addr.is_v4();
    addr.masked(&Addr::prefix_mask(v4, if v4 { v4_bits } else { v6_bits }))
}

fn client_of(addr: &Addr) -> Addr {
    masked(addr, CLIENT_BITS)
}

fn prefix_of(addr: &Addr) -> Addr {
    masked(addr, PREFIX_BITS)
}

impl Budgets {
    pub fn new(per_client: usize, per_prefix: usize) -> Self {
        Self {
            per_client: per_client.max(1),
            per_prefix: per_prefix.max(1),
            by_client: HashMap::default(),
            by_prefix: HashMap::default(),
        }
    }

    pub fn set_limits(&mut self, per_client: usize, per_prefix: usize) {
        self.per_client = per_client.max(1);
        self.per_prefix = per_prefix.max(1);
    }

    /// Records a connection of the client in `key.src`.
    pub fn add(&mut self, key: FlowKey) {
        self.by_client
            .entry(client_of(&key.src))
            .or_default()
            .push_back(key);
        self.by_prefix
            .entry(prefix_of(&key.src))
            .or_default()
            .push_back(key);
    }

    /// Forgets a connection.
    pub fn remove(&mut self, key: &FlowKey) {
        for (map, group) in [
            (&mut self.by_client, client_of(&key.src)),
            (&mut self.by_prefix, prefix_of(&key.src)),
        ] {
            if let Some(keys) = map.get_mut(&group) {
                // Connections go as their oldest (shed, or long done) or soon after they
                // came (their head delivered): look at the front, then from the back.
                if keys.front() == Some(key) {
                    keys.pop_front();
                } else if let Some(at) = keys.iter().rposition(|k| k == key) {
                    keys.remove(at);
                }
                if keys.is_empty() {
                    map.remove(&group);
                }
            }
        }
    }

    /// The connection to shed before `client` may add one: its own oldest when it is at its
    /// budget, else its prefix's oldest when the prefix is at its budget.
    pub fn over_budget(&self, client: &Addr) -> Option<(FlowKey, Shed)> {
        if let Some(keys) = self.by_client.get(&client_of(client)) {
            if keys.len() >= self.per_client {
                return keys.front().map(|k| (*k, Shed::ClientBudget));
            }
        }
        let keys = self.by_prefix.get(&prefix_of(client))?;
        (keys.len() >= self.per_prefix)
            .then(|| keys.front().map(|k| (*k, Shed::PrefixBudget)))
            .flatten()
    }

    /// What a full table sheds: the oldest connection of the prefix holding the most.
    pub fn greediest_oldest(&self) -> Option<FlowKey> {
        self.by_prefix
            .values()
            .max_by_key(|keys| keys.len())
            .and_then(|keys| keys.front().copied())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(client: [u8; 4]) -> Addr {
        Addr::v4(u32::from_ne_bytes(client))
    }

    fn key(client: [u8; 4], port: u16) -> FlowKey {
        FlowKey {
            src: addr(client),
            sport: port,
            ..FlowKey::default()
        }
    }

    fn key_v6(client: &str, port: u16) -> FlowKey {
        FlowKey {
            src: Addr::from(client.parse::<std::net::IpAddr>().unwrap()),
            sport: port,
            ..FlowKey::default()
        }
    }

    #[test]
    fn an_ipv6_host_is_one_client_whatever_its_addresses_and_a_site_one_prefix() {
        let mut budgets = Budgets::new(2, 3);
        budgets.add(key_v6("2001:db8:0:1::a", 1));
        budgets.add(key_v6("2001:db8:0:1::b", 1));
        assert_eq!(
            budgets.over_budget(&key_v6("2001:db8:0:1::c", 1).src),
            Some((key_v6("2001:db8:0:1::a", 1), Shed::ClientBudget)),
            "a /64 is one client"
        );
        budgets.add(key_v6("2001:db8:0:2::a", 1));
        assert_eq!(
            budgets.over_budget(&key_v6("2001:db8:0:3::a", 1).src),
            Some((key_v6("2001:db8:0:1::a", 1), Shed::PrefixBudget)),
            "a /48 is one prefix"
        );
        assert_eq!(budgets.over_budget(&key_v6("2001:db8:1::a", 1).src), None);
    }

    #[test]
    fn a_source_at_its_budget_pays_with_its_own_oldest_connection() {
        let mut budgets = Budgets::new(2, 10);
        budgets.add(key([198, 18, 0, 2], 1));
        budgets.add(key([198, 18, 0, 2], 2));
        budgets.add(key([198, 18, 0, 3], 1));
        assert_eq!(
            budgets.over_budget(&addr([198, 18, 0, 2])),
            Some((key([198, 18, 0, 2], 1), Shed::ClientBudget))
        );
        assert_eq!(budgets.over_budget(&addr([198, 18, 0, 3])), None);
        budgets.remove(&key([198, 18, 0, 2], 1));
        assert_eq!(budgets.over_budget(&addr([198, 18, 0, 2])), None);
    }

    #[test]
    fn a_prefix_at_its_budget_pays_with_its_oldest_and_other_prefixes_are_untouched() {
        let mut budgets = Budgets::new(10, 3);
        for host in 1..=3 {
            budgets.add(key([198, 18, 1, host], 1));
        }
        budgets.add(key([198, 18, 2, 1], 1));
        assert_eq!(
            budgets.over_budget(&addr([198, 18, 1, 200])),
            Some((key([198, 18, 1, 1], 1), Shed::PrefixBudget))
        );
        assert_eq!(budgets.over_budget(&addr([198, 18, 2, 9])), None);
        assert_eq!(budgets.greediest_oldest(), Some(key([198, 18, 1, 1], 1)));
    }
}
