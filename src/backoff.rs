//! Capped exponential backoff with jitter, for the broker reconnect loop and
//! the spool drainer: backon's `ExponentialBuilder` (already compiled in for
//! lapin), behind a `next_delay`/`reset` pair because both loops decide for
//! themselves when to sleep and when to start over. Reconnect attempts are
//! cheap (a refused TCP connect) and the spool waits for the broker: a short
//! ceiling keeps recovery after an outage prompt.
//!
//! backon's jitter adds up to the step itself (a step of `d` waits between
//! `d` and `2d`): the first wait is 100-200 ms, each step doubles, and the
//! steps stop at half of `BACKOFF_MAX`, so no wait exceeds it. Relays that
//! lost the broker together do not all come back in the same instant. It is
//! not "full" jitter (0 to the step) as the hand-written loop this replaced
//! had: at the cap the waits spread over 2.5-5 s instead of 0-5 s, enough to
//! part the reconnects and never a busy retry.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};

const FIRST_STEP: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

fn builder() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(FIRST_STEP)
        .with_max_delay(BACKOFF_MAX / 2)
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
}

/// Capped exponential backoff with jitter; see the module documentation.
#[derive(Debug)]
pub struct Backoff(ExponentialBackoff);

impl Default for Backoff {
    fn default() -> Self {
        Self(builder().build())
    }
}

impl Backoff {
    /// Starts over from the shortest wait.
    pub fn reset(&mut self) {
        self.0 = builder().build();
    }

    pub fn next_delay(&mut self) -> Duration {
        // Without a maximum number of attempts the iterator never ends.
        self.0.next().unwrap_or(BACKOFF_MAX).min(BACKOFF_MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_is_capped_jittered_and_starts_over() {
        let mut b = Backoff::default();
        let delays: Vec<Duration> = (0..40).map(|_| b.next_delay()).collect();
        for d in &delays {
            assert!(*d >= FIRST_STEP && *d <= BACKOFF_MAX, "{d:?}");
        }
        assert!(delays[0] <= FIRST_STEP * 2, "{:?}", delays[0]);
        // Capped: the late waits lie in the top half, and are not all equal.
        let late = &delays[20..];
        assert!(late.iter().all(|d| *d >= BACKOFF_MAX / 2), "{late:?}");
        assert!(late.iter().any(|d| *d != late[0]), "no jitter: {late:?}");
        b.reset();
        assert!(b.next_delay() <= FIRST_STEP * 2);
    }
}
