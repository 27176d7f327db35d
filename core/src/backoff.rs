//! Capped exponential backoff with jitter: every retry loop of the agent (the hub link, the
//! telemetry drain, module restarts, store and outbox recovery) waits by this one rule.

use std::time::Duration;

/// Capped exponential backoff with jitter: each delay is drawn from `[d/2, d]` where `d`
/// doubles from `min` up to `max`, so a fleet that lost its broker does not come back in step.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Backoff {
        Backoff {
            min,
            max: max.max(min),
            attempt: 0,
        }
    }

    /// The next delay; `random` supplies the jitter (any `u64`).
    pub fn next_with(&mut self, random: u64) -> Duration {
        let factor = 1u32 << self.attempt.min(16);
        self.attempt = self.attempt.saturating_add(1);
        let ceiling = self.min.saturating_mul(factor).min(self.max);
        let half = ceiling / 2;
        let span = (ceiling - half).as_millis() as u64;
        half + Duration::from_millis(if span == 0 { 0 } else { random % (span + 1) })
    }

    pub fn next_delay(&mut self) -> Duration {
        // Without randomness the delay is the ceiling: still capped, merely not jittered.
        self.next_with(getrandom::u64().unwrap_or(u64::MAX))
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_is_capped_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let ceilings: Vec<_> = (0..6).map(|_| b.next_with(u64::MAX)).collect();
        // u64::MAX % (span + 1) is not always span; check the bounds instead of exact values.
        let expected = [100, 200, 400, 800, 1000, 1000];
        for (got, ceiling) in ceilings.iter().zip(expected) {
            let ceiling = Duration::from_millis(ceiling);
            assert!(
                *got <= ceiling && *got >= ceiling / 2,
                "{got:?} vs {ceiling:?}"
            );
        }
        b.reset();
        assert!(b.next_with(0) <= Duration::from_millis(100));
    }

    #[test]
    fn jitter_spreads_delays() {
        let mut low = Backoff::new(Duration::from_secs(1), Duration::from_secs(1));
        let mut high = low.clone();
        assert_eq!(low.next_with(0), Duration::from_millis(500));
        assert_eq!(high.next_with(500), Duration::from_secs(1));
    }
}
