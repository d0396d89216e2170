//! Rate-limited log lines. A flood (403s from a scanner, a drainer failing
//! in a loop) must not turn into a flood of log lines: per key, at most
//! `burst` lines pass in each `period`; the rest are counted, and the next
//! line that passes says how many were left out.
//!
//! Use one `LogThrottle` per call site, keyed by a closed set (a `Reason`
//! index, say), never by anything a client controls:
//!
//! ```ignore
//! if let Some(suppressed) = throttle.admit(reason as usize) {
//!     warn!(suppressed, "…");
//! }
//! ```

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Per-key windows of `period`, each letting `burst` lines through.
#[derive(Debug)]
pub struct LogThrottle {
    period: Duration,
    burst: u32,
    windows: Mutex<Vec<Window>>,
}

#[derive(Debug, Clone, Copy)]
struct Window {
    start: Option<Instant>,
    passed: u32,
    suppressed: u64,
}

impl LogThrottle {
    /// `keys` distinct keys (0..keys); a larger key shares the last one.
    pub fn new(keys: usize, burst: u32, period: Duration) -> Self {
        let empty = Window {
            start: None,
            passed: 0,
            suppressed: 0,
        };
        Self {
            period,
            burst: burst.max(1),
            windows: Mutex::new(vec![empty; keys.max(1)]),
        }
    }

    /// `Some(n)` if a line for `key` may be written now, `n` being the lines
    /// left out for it since the last one written; `None` to leave it out.
    pub fn admit(&self, key: usize) -> Option<u64> {
        self.admit_at(key, Instant::now())
    }

    fn admit_at(&self, key: usize, now: Instant) -> Option<u64> {
        // A poisoned lock only means another thread panicked mid-update of
        // a few counters: logging goes on with them as they are.
        let mut windows = self
            .windows
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let last = windows.len() - 1;
        let window = &mut windows[key.min(last)];
        let expired = window
            .start
            .is_none_or(|start| now.saturating_duration_since(start) >= self.period);
        if expired {
            window.start = Some(now);
            window.passed = 0;
        }
        if window.passed < self.burst {
            window.passed += 1;
            Some(std::mem::take(&mut window.suppressed))
        } else {
            window.suppressed = window.suppressed.saturating_add(1);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_passes_burst_lines_per_period_and_reports_the_rest() {
        let t = LogThrottle::new(2, 3, Duration::from_secs(1));
        let start = Instant::now();
        let passed: Vec<Option<u64>> = (0..10).map(|_| t.admit_at(0, start)).collect();
        assert_eq!(passed.iter().filter(|p| p.is_some()).count(), 3);
        assert_eq!(passed[0], Some(0));
        // Another key has its own window.
        assert_eq!(t.admit_at(1, start), Some(0));
        // The next period: the first line says how many were left out.
        let later = start + Duration::from_secs(1);
        assert_eq!(t.admit_at(0, later), Some(7));
        assert_eq!(t.admit_at(0, later), Some(0));
    }

    #[test]
    fn keys_beyond_the_set_share_the_last_window() {
        let t = LogThrottle::new(1, 1, Duration::from_secs(60));
        let now = Instant::now();
        assert_eq!(t.admit_at(5, now), Some(0));
        assert_eq!(t.admit_at(0, now), None);
    }
}
