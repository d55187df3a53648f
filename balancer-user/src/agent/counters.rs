//! What the binding stage counts: outcomes, refused cookies, events over the last minute.

use std::{collections::HashMap, hash::Hash, time::Instant};

use bytemuck::{Pod, Zeroable};

use crate::cookie::Rejection;

/// Why a balancer cookie counted as absent: the codec's reasons, then the backend's.
pub const REJECTION_REASONS: [&str; 5] = [
    Rejection::ALL[0].name(),
    Rejection::ALL[1].name(),
    Rejection::ALL[2].name(),
    Rejection::ALL[3].name(),
    "backend_unusable",
];
pub(super) const BACKEND_UNUSABLE: usize = 4;

/// What the binding stage did, for the stats line and `balancer status`. Every field is a
/// count, so the workers' counters sum field by field.
#[repr(C)]
#[derive(Default, Clone, Copy, Debug, Pod, Zeroable)]
pub struct BindingCounters {
    /// Records read from the punt ring.
    pub punts_read: u64,
    pub bound: u64,
    /// Connections placed by an application cookie's value or a genuine balancer cookie.
    pub with_cookie: u64,
    /// Connections placed by the fallback: no cookie, or one that counted as absent.
    pub without_cookie: u64,
    /// Balancer cookies that counted as absent, by [`Rejection`] (then one more slot: the
    /// backend it names is gone, down or drained).
    pub cookies_rejected: [u64; REJECTION_REASONS.len()],
    pub head_too_large: u64,
    /// Responses given the balancer's cookie(s).
    pub cookies_issued: u64,
    /// Edited response heads sent again, for head bytes the backend sent again (the client
    /// had not acknowledged them).
    pub heads_resent: u64,
    /// Requests replayed to the backend again, for want of its acknowledgement.
    pub replays_resent: u64,
    pub retried: u64,
    pub failed: u64,
    /// Requests answered 404: no route matched.
    pub no_route: u64,
    /// Requests answered 503: their session's backend is down and held for.
    pub backend_down: u64,
    /// Connections reset to make room for a new one, by [`Shed`].
    pub shed_client_budget: u64,
    pub shed_prefix_budget: u64,
    pub shed_table_full: u64,
    /// Connections reset because their client did not acknowledge the edited response head
    /// in time.
    pub head_unacknowledged: u64,
    /// Client resets inside the window but not at the next sequence number, answered with a
    /// challenge ACK (RFC 5961).
    pub challenge_acks: u64,
    /// Resets and FINs outside the window or out of order (a client's, or a backend reset
    /// that does not answer the agent's SYN), ignored.
    pub out_of_window: u64,
    /// Backend SYNs answered from TIME_WAIT with a bare ACK (a reused client port the backend
    /// could not tell from its old connection, for want of newer timestamps): reset and sent
    /// again.
    pub time_wait_resets: u64,
}

impl BindingCounters {
    /// Adds another worker's counters.
    pub fn add(&mut self, other: &BindingCounters) {
        let sums: &mut [u64] = bytemuck::cast_slice_mut(std::slice::from_mut(self));
        let more: &[u64] = bytemuck::cast_slice(std::slice::from_ref(other));
        for (sum, more) in sums.iter_mut().zip(more) {
            *sum += more;
        }
    }

    /// Counts a binding's outcome, in all and in `by_service` for its service (when it still
    /// has one).
    pub(super) fn count(
        &mut self,
        outcome: Outcome,
        service: Option<u32>,
        by_service: &mut HashMap<(u32, Outcome), u64>,
    ) {
        *match outcome {
            Outcome::WithCookie => &mut self.with_cookie,
            Outcome::ByFallback => &mut self.without_cookie,
            Outcome::Retried => &mut self.retried,
            Outcome::Failed => &mut self.failed,
            Outcome::HeadTooLarge => &mut self.head_too_large,
            Outcome::NoRoute => &mut self.no_route,
            Outcome::BackendDown => &mut self.backend_down,
        } += 1;
        if let Some(service) = service {
            *by_service.entry((service, outcome)).or_default() += 1;
        }
    }
}

/// What a worker's binding stage counted, for `balancer status`, the stats line and the
/// metrics; the agent sums them over its workers.
#[derive(Clone, Default)]
pub struct Tallies {
    pub counters: BindingCounters,
    /// Connections held.
    pub held: usize,
    /// Connections bound to each backend (by id).
    pub bound_by_backend: HashMap<u32, u64>,
    /// When a connection last came to each backend (by id) by its cookie: a drain is done
    /// once its cookie sessions have gone quiet.
    pub last_cookie_choice: HashMap<u32, Instant>,
    /// Connections that came to each backend (by id) by its cookie, over the last minute.
    pub recent_cookie_choices: HashMap<u32, RecentCounts>,
    /// Balancer cookies that counted as absent, by service id and [`REJECTION_REASONS`]
    /// index, and responses given the cookie, by backend id: the metrics' labels.
    pub rejected_by_service: HashMap<(u32, usize), u64>,
    pub issued_by_backend: HashMap<u32, u64>,
    /// Bindings by service id and outcome, for the metrics.
    pub outcomes_by_service: HashMap<(u32, Outcome), u64>,
}

impl Tallies {
    /// The workers' tallies summed.
    pub fn sum(each: impl IntoIterator<Item = Tallies>) -> Tallies {
        let mut sum = Tallies::default();
        for tallies in each {
            sum.add(tallies);
        }
        sum
    }

    /// Adds another worker's tallies.
    fn add(&mut self, other: Tallies) {
        self.counters.add(&other.counters);
        self.held += other.held;
        add_counts(&mut self.bound_by_backend, other.bound_by_backend);
        add_counts(&mut self.rejected_by_service, other.rejected_by_service);
        add_counts(&mut self.issued_by_backend, other.issued_by_backend);
        add_counts(&mut self.outcomes_by_service, other.outcomes_by_service);
        for (backend, at) in other.last_cookie_choice {
            let last = self.last_cookie_choice.entry(backend).or_insert(at);
            *last = (*last).max(at);
        }
        for (backend, recent) in other.recent_cookie_choices {
            self.recent_cookie_choices
                .entry(backend)
                .or_default()
                .add_counts(&recent);
        }
    }
}

/// The cookie connections XDP binds without the agent, tallied from XDP's count per backend
/// as the workers tally their own: by the last minute, and when the last came (a drain waits
/// for a backend's cookie sessions to go quiet).
#[derive(Default)]
pub struct XdpBindings {
    /// XDP's count per backend id at the last look.
    seen: HashMap<u32, u64>,
    /// `recent_cookie_choices` and `last_cookie_choice` alone.
    tallies: Tallies,
}

impl XdpBindings {
    /// Takes XDP's counts per backend id (since the maps were made) at second `now`: what
    /// they grew by since the last look came now. The first look only learns them.
    pub fn note(&mut self, counts: impl IntoIterator<Item = (u32, u64)>, now: u64) {
        for (backend, count) in counts {
            let Some(seen) = self.seen.insert(backend, count) else {
                continue;
            };
            let new = count.saturating_sub(seen);
            if new > 0 {
                let recent = self.tallies.recent_cookie_choices.entry(backend);
                recent.or_default().add_many(now, new);
                self.tallies
                    .last_cookie_choice
                    .insert(backend, Instant::now());
            }
        }
    }

    /// The workers' tallies with XDP's connections added.
    pub fn with(&self, workers: Tallies) -> Tallies {
        Tallies::sum([workers, self.tallies.clone()])
    }
}

fn add_counts<K: Eq + Hash>(sums: &mut HashMap<K, u64>, more: HashMap<K, u64>) {
    for (key, count) in more {
        *sums.entry(key).or_default() += count;
    }
}

/// What a cookie connection's binding came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// Placed by an application cookie's value or a genuine balancer cookie.
    WithCookie,
    /// Placed by the fallback: no cookie, or one that counted as absent.
    ByFallback,
    /// Sent to another backend after one refused or did not answer.
    Retried,
    /// Reset: no backend took it, no source port was free, or its head came too slowly.
    Failed,
    /// Placed on a head that did not fit the agent's buffer (without its cookie, if it came
    /// later).
    HeadTooLarge,
    /// Answered 404 by the agent: no route of the service matched the request.
    NoRoute,
    /// Answered 503 by the agent: its session's backend is down and the service holds its
    /// sessions for it.
    BackendDown,
}

impl Outcome {
    pub const ALL: [Outcome; 7] = [
        Outcome::WithCookie,
        Outcome::ByFallback,
        Outcome::Retried,
        Outcome::Failed,
        Outcome::HeadTooLarge,
        Outcome::NoRoute,
        Outcome::BackendDown,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Outcome::WithCookie => "with_cookie",
            Outcome::ByFallback => "by_fallback",
            Outcome::Retried => "retried",
            Outcome::Failed => "failed",
            Outcome::HeadTooLarge => "head_too_large",
            Outcome::NoRoute => "no_route",
            Outcome::BackendDown => "backend_down",
        }
    }
}

/// Events per second over the last [`RecentCounts::SECONDS`] seconds, in constant memory.
#[derive(Clone)]
pub struct RecentCounts {
    /// Per second (of `since`), modulo the window.
    buckets: [u64; RecentCounts::SECONDS as usize],
    /// The second the newest bucket holds.
    newest: u64,
}

impl Default for RecentCounts {
    fn default() -> Self {
        RecentCounts {
            buckets: [0; RecentCounts::SECONDS as usize],
            newest: 0,
        }
    }
}

impl RecentCounts {
    pub const SECONDS: u64 = 60;

    /// Counts one event at second `now` (of any monotonic origin).
    pub fn add(&mut self, now: u64) {
        self.add_many(now, 1);
    }

    /// Counts `count` events at second `now`.
    pub fn add_many(&mut self, now: u64, count: u64) {
        self.advance(now);
        self.buckets[(now % Self::SECONDS) as usize] += count;
    }

    /// Adds the events of `other` (another worker's count of the same events).
    pub fn add_counts(&mut self, other: &RecentCounts) {
        self.advance(other.newest);
        let from = other.newest.saturating_sub(Self::SECONDS - 1);
        for second in from.max(self.newest.saturating_sub(Self::SECONDS - 1))..=other.newest {
            let bucket = (second % Self::SECONDS) as usize;
            self.buckets[bucket] += other.buckets[bucket];
        }
    }

    /// The events of the last minute, at second `now`.
    pub fn total(&self, now: u64) -> u64 {
        self.total_over(Self::SECONDS, now)
    }

    /// The events of the last `seconds` (at most a minute), at second `now`.
    pub fn total_over(&self, seconds: u64, now: u64) -> u64 {
        // The buckets hold the minute up to `newest`; the window is the seconds up to `now`.
        let window = seconds.clamp(1, Self::SECONDS) - 1;
        let from = now
            .saturating_sub(window)
            .max(self.newest.saturating_sub(window));
        (from..=now.min(self.newest))
            .map(|second| self.buckets[(second % Self::SECONDS) as usize])
            .sum()
    }

    /// Empties the buckets of the seconds between the newest and `now`.
    fn advance(&mut self, now: u64) {
        if now <= self.newest {
            return;
        }
        for second in (self.newest + 1)..=now.min(self.newest + Self::SECONDS) {
            self.buckets[(second % Self::SECONDS) as usize] = 0;
        }
        self.newest = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recent_counts_keep_the_last_minute() {
        let mut counts = RecentCounts::default();
        counts.add(100);
        counts.add(100);
        counts.add(130);
        assert_eq!(counts.total(130), 3);
        assert_eq!(counts.total(159), 3, "the oldest still inside the minute");
        assert_eq!(counts.total(160), 1, "100 has left the window");
        counts.add(175);
        assert_eq!(counts.total(175), 2);
        counts.add(400);
        assert_eq!(counts.total(400), 1, "a long pause empties the window");
    }

    #[test]
    fn xdp_bindings_count_what_xdp_bound_since_the_first_look_with_the_workers() {
        let mut xdp = XdpBindings::default();
        // What the maps held when the agent started is not this minute's.
        xdp.note([(3, 500), (4, 0)], 100);
        xdp.note([(3, 502), (4, 0)], 101);
        xdp.note([(3, 507), (4, 1)], 130);
        let mut workers = Tallies::default();
        workers.recent_cookie_choices.entry(3).or_default().add(130);
        let tallies = xdp.with(workers);
        let recent = |backend| tallies.recent_cookie_choices[&backend].total(130);
        assert_eq!((recent(3), recent(4)), (8, 1));
        assert_eq!(tallies.recent_cookie_choices[&3].total_over(10, 130), 6);
        assert!(tallies.last_cookie_choice.contains_key(&3));
    }

    #[test]
    fn recent_counts_of_two_workers_add_up_within_the_minute() {
        let (mut one, mut other) = (RecentCounts::default(), RecentCounts::default());
        one.add(100);
        one.add(150);
        other.add(120);
        other.add(170);
        one.add_counts(&other);
        assert_eq!(
            one.total(170),
            3,
            "120, 150 and 170; 100 is outside the minute"
        );
        assert_eq!(one.total_over(30, 170), 2, "150 and 170");
        let mut behind = RecentCounts::default();
        behind.add(50);
        one.add_counts(&behind);
        assert_eq!(
            one.total(170),
            3,
            "an older worker's count adds nothing to the minute"
        );
    }

    #[test]
    fn binding_counters_sum_field_by_field() {
        let mut sum = BindingCounters {
            bound: 2,
            cookies_rejected: [1, 0, 0, 0, 3],
            time_wait_resets: 1,
            ..BindingCounters::default()
        };
        sum.add(&BindingCounters {
            bound: 5,
            cookies_rejected: [0, 0, 0, 0, 1],
            ..BindingCounters::default()
        });
        assert_eq!(
            (sum.bound, sum.cookies_rejected, sum.time_wait_resets),
            (7, [1, 0, 0, 0, 4], 1)
        );
    }
}
