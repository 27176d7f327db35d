//! Capped exponential backoff with jitter: every retry loop of the agent (the hub link, the
//! telemetry drain, module restarts, store and outbox recovery) waits by this one rule.

use std::time::Duration;

/// The delay before attempt `attempt` (1 for the first retry): `base`, doubling with each
/// attempt, never above `cap`. Attempt 0 is `base` too. Milliseconds, so that deadlines on the
/// monotonic clock (which the agent keeps in milliseconds) can use it as it is.
pub fn exponential_ms(base_ms: u64, attempt: u32, cap_ms: u64) -> u64 {
    base_ms
        .saturating_mul(1u64 << attempt.saturating_sub(1).min(30))
        .min(cap_ms)
}

/// [`exponential_ms`] for [`Duration`]s.
pub fn exponential(base: Duration, attempt: u32, cap: Duration) -> Duration {
    let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    Duration::from_millis(exponential_ms(ms(base), attempt, ms(cap)))
}

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
        self.attempt = self.attempt.saturating_add(1);
        let ceiling = exponential(self.min, self.attempt, self.max);
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
    fn exponential_doubles_from_base_to_cap() {
        let got: Vec<u64> = (0..=6).map(|a| exponential_ms(1_000, a, 10_000)).collect();
        assert_eq!(got, [1_000, 1_000, 2_000, 4_000, 8_000, 10_000, 10_000]);
        assert_eq!(exponential_ms(1_000, u32::MAX, u64::MAX), 1_000 << 30);
        assert_eq!(
            exponential(Duration::from_millis(100), 3, Duration::from_secs(1)),
            Duration::from_millis(400)
        );
    }

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
