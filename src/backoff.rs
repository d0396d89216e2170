//! Capped exponential backoff with full jitter, for the broker reconnect
//! loop and the spool drainer. Reconnect attempts are cheap (a refused TCP
//! connect) and the spool waits for the broker: a short ceiling keeps
//! recovery after an outage prompt.

use std::time::Duration;

use rand::Rng;

const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Capped exponential backoff with full jitter.
#[derive(Debug, Default)]
pub struct Backoff {
    attempt: u32,
}

impl Backoff {
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    pub fn next_delay(&mut self) -> Duration {
        let ceiling = BACKOFF_MIN
            .saturating_mul(1u32 << self.attempt.min(16))
            .min(BACKOFF_MAX);
        self.attempt = self.attempt.saturating_add(1);
        let jittered = rand::rng().random_range(
            BACKOFF_MIN.as_millis()..=ceiling.as_millis().max(BACKOFF_MIN.as_millis()),
        );
        Duration::from_millis(u64::try_from(jittered).unwrap_or(u64::MAX))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_capped_and_jittered() {
        let mut b = Backoff::default();
        for _ in 0..40 {
            let d = b.next_delay();
            assert!(d >= BACKOFF_MIN && d <= BACKOFF_MAX, "{d:?}");
        }
        b.reset();
        assert!(b.next_delay() <= BACKOFF_MIN);
    }
}
