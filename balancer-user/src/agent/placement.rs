//! Where a new session goes when a service has groups of backends (blue/green, canary): a
//! group by the groups' weights, then a backend by the group's own Maglev table. XDP, which
//! places the flows of L4 services and a cookie service's connections while no agent runs,
//! reads one table over all the backends, each weighted by its share of its group times its
//! group's share of the service.

use std::collections::{BTreeSet, HashMap};

use balancer_common::mix;

use crate::cookie::backend_token;

/// A group of a service's backends as the agent places sessions in it.
pub struct GroupRuntime {
    pub name: String,
    /// The group's name as cookies carry it.
    pub token: u32,
    /// Share of new sessions; set by the configuration or `balancer group weight`.
    pub weight: u32,
    /// Backend ids by slot, over the group's backends that take new sessions.
    pub lookup: Vec<u32>,
    /// The backends of `lookup`, once each.
    pub members: Vec<u32>,
}

impl GroupRuntime {
    pub fn new(name: &str, weight: u32) -> GroupRuntime {
        GroupRuntime {
            name: name.to_owned(),
            token: backend_token(name),
            weight,
            lookup: Vec::new(),
            members: Vec::new(),
        }
    }
}

/// What a backend weighs in its service's whole table, in parts of [`WEIGHT_SCALE`]: its
/// weight's share of its group's times the group's share of all groups' weights. Positive
/// wherever both weights are, so a light backend of a light group still takes some slots.
pub fn weight_in_service(
    backend_weight: u32,
    group_backends_weight: u32,
    group_weight: u32,
    groups_weight: u32,
) -> u32 {
    if backend_weight == 0 || group_weight == 0 {
        return 0;
    }
    let share = f64::from(backend_weight) / f64::from(group_backends_weight)
        * f64::from(group_weight)
        / f64::from(groups_weight);
    ((share * f64::from(WEIGHT_SCALE)).round() as u32).max(1)
}

/// The resolution of [`weight_in_service`]: the Maglev tables weigh relative to the heaviest.
const WEIGHT_SCALE: u32 = 10_000;

/// The group a new session of `hash` goes to: by weight among the groups with a backend
/// taking new sessions; none when no such group has weight.
pub fn pick_group(groups: &[GroupRuntime], hash: u32) -> Option<usize> {
    let open = |g: &GroupRuntime| g.weight > 0 && !g.lookup.is_empty();
    let total: u64 = groups
        .iter()
        .filter(|g| open(g))
        .map(|g| u64::from(g.weight))
        .sum();
    if total == 0 {
        return None;
    }
    // Mixed again: the backend's slot in the group's table comes from `hash` itself.
    let mut point = u64::from(mix(hash ^ 0x2545_f491)) % total;
    for (index, group) in groups.iter().enumerate().filter(|(_, g)| open(g)) {
        let weight = u64::from(group.weight);
        if point < weight {
            return Some(index);
        }
        point -= weight;
    }
    None
}

/// The first backend id of `lookup` from `hash`'s slot on that `usable` accepts; the walk is
/// bounded, so a table whose backends were all tried gives none quickly.
pub fn walk(lookup: &[u32], hash: u32, usable: impl Fn(u32) -> bool) -> Option<u32> {
    let len = lookup.len();
    if len == 0 {
        return None;
    }
    let start = hash as usize % len;
    (0..len.min(4096))
        .map(|step| lookup[(start + step) % len])
        .find(|id| usable(*id))
}

/// The backends a lookup table holds, once each.
pub fn members(lookup: &[u32]) -> Vec<u32> {
    let members: BTreeSet<u32> = lookup.iter().copied().collect();
    members.into_iter().collect()
}

/// The most active connections one of `members` (a table's backends) may hold for a new
/// session to be placed on it: `factor` percent of their average with one more connection
/// than now, rounded up (consistent hashing with bounded loads, Mirrokni et al.), so some
/// backend is always under it.
pub fn load_limit(members: &[u32], loads: &HashMap<u32, u64>, factor: u32) -> u64 {
    if members.is_empty() {
        return 0;
    }
    let total: u64 = members
        .iter()
        .map(|id| loads.get(id).copied().unwrap_or(0))
        .sum();
    (u64::from(factor) * (total + 1)).div_ceil(100 * members.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(name: &str, weight: u32, backend: u32) -> GroupRuntime {
        GroupRuntime {
            lookup: vec![backend; 7],
            ..GroupRuntime::new(name, weight)
        }
    }

    #[test]
    fn groups_take_new_sessions_in_proportion_to_their_weights() {
        let groups = [group("blue", 90, 1), group("green", 10, 2)];
        let mut green = 0;
        for hash in 0..100_000u32 {
            if pick_group(&groups, mix(hash)) == Some(1) {
                green += 1;
            }
        }
        assert!(
            (9_500..10_500).contains(&green),
            "green took {green} of 100000"
        );
    }

    #[test]
    fn a_group_without_weight_or_serving_backends_takes_none() {
        let mut groups = [group("blue", 0, 1), group("green", 10, 2)];
        assert!((0..1000).all(|h| pick_group(&groups, h) == Some(1)));
        groups[1].lookup.clear();
        assert_eq!(pick_group(&groups, 5), None);
    }

    #[test]
    fn the_load_limit_is_the_factor_of_the_average_with_the_next_connection() {
        let members = members(&[1, 2, 3, 1, 2, 3]);
        assert_eq!(members, [1, 2, 3]);
        let loads = HashMap::from([(1, 10), (2, 5), (3, 0)]);
        // (10 + 5 + 0 + 1) / 3 * 1.25 = 6.67, rounded up.
        assert_eq!(load_limit(&members, &loads, 125), 7);
        assert_eq!(load_limit(&members, &HashMap::new(), 125), 1);
        assert_eq!(load_limit(&[], &loads, 125), 0);
    }

    #[test]
    fn weights_in_the_service_table_are_the_product_of_the_shares() {
        // Blue 90 over two equal backends, green 10 over one.
        assert_eq!(weight_in_service(1, 2, 90, 100), 4500);
        assert_eq!(weight_in_service(1, 1, 10, 100), 1000);
        assert_eq!(weight_in_service(1, 1000, 1, 10_000), 1);
        assert_eq!(weight_in_service(1, 1, 0, 100), 0);
        assert_eq!(weight_in_service(0, 1, 50, 100), 0);
    }
}
