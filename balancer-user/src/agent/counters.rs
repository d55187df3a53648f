//! What the binding stage counts: outcomes, refused cookies, events over the last minute.

use std::collections::HashMap;

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

/// What the binding stage did, for the stats line and `balancer status`.
#[derive(Default, Clone, Copy, Debug)]
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
        self.advance(now);
        self.buckets[(now % Self::SECONDS) as usize] += 1;
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
}
