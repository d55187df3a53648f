//! Warnings that a flood can repeat once a packet (a client refused, a map write failing) are
//! let through a few at a time: the log keeps saying what happens and why without one client
//! filling the disk or drowning the others' events.

use std::time::{Duration, Instant};

/// How many of one warning pass in a window.
const BURST: u32 = 5;
/// How long a window lasts.
const WINDOW: Duration = Duration::from_secs(10);

/// Counts one call site's warnings in windows of [`WINDOW`], letting the first [`BURST`] of
/// each through.
pub struct LogGate {
    window_start: Option<Instant>,
    passed: u32,
    held_back: u64,
}

impl LogGate {
    pub const fn new() -> LogGate {
        LogGate {
            window_start: None,
            passed: 0,
            held_back: 0,
        }
    }

    /// Whether a warning at `now` may be logged, and then how many were held back before it.
    pub fn admit(&mut self, now: Instant) -> Option<u64> {
        let window_over = self
            .window_start
            .is_none_or(|start| now.duration_since(start) >= WINDOW);
        if window_over {
            self.window_start = Some(now);
            self.passed = 0;
        }
        if self.passed == BURST {
            self.held_back += 1;
            return None;
        }
        self.passed += 1;
        Some(std::mem::take(&mut self.held_back))
    }
}

/// A `tracing` event at `$level` (`warn`, `info`) through a [`LogGate`] of its own call site;
/// one let through after some were held back carries their count as `suppressed`.
macro_rules! throttled {
    ($level:ident, $($event:tt)+) => {{
        static GATE: std::sync::Mutex<$crate::throttle::LogGate> =
            std::sync::Mutex::new($crate::throttle::LogGate::new());
        let admitted = GATE
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .admit(std::time::Instant::now());
        match admitted {
            Some(0) => tracing::$level!($($event)+),
            Some(suppressed) => tracing::$level!(suppressed, $($event)+),
            None => {}
        }
    }};
}
pub(crate) use throttled;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_passes_then_the_rest_of_the_window_is_counted_for_the_next_one_logged() {
        let mut gate = LogGate::new();
        let start = Instant::now();
        for _ in 0..BURST {
            assert_eq!(gate.admit(start), Some(0));
        }
        for second in 0..7 {
            assert_eq!(gate.admit(start + Duration::from_secs(second)), None);
        }
        assert_eq!(gate.admit(start + WINDOW), Some(7));
        assert_eq!(gate.admit(start + WINDOW), Some(0));
    }

    #[test]
    fn a_quiet_site_logs_every_warning() {
        let mut gate = LogGate::new();
        let start = Instant::now();
        for window in 0..4 {
            assert_eq!(gate.admit(start + WINDOW * window), Some(0));
        }
    }
}
