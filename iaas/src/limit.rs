//! The pacing of calls: a token bucket under the account's API rate, and the bounded
//! exponential backoff with jitter between retries. Pure: times and random numbers come in
//! as arguments.

use std::time::Duration;

use tokio::time::Instant;

/// The API's documented rate for a new account: 2,000 calls per 3,600 s.
pub const DEFAULT_CALLS_PER_HOUR: u32 = 2_000;

/// A token bucket: `capacity` calls at once, refilled at `calls_per_hour`.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    capacity: f64,
    tokens: f64,
    per_second: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket of `burst` tokens (at least 1) refilled at `calls_per_hour` (at least 1).
    pub fn new(calls_per_hour: u32, burst: u32, now: Instant) -> Self {
        let capacity = f64::from(burst.max(1));
        Self {
            capacity,
            tokens: capacity,
            per_second: f64::from(calls_per_hour.max(1)) / 3600.0,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.per_second).min(self.capacity);
        self.last = now;
    }

    /// Takes a token if there is one; otherwise says how long until there is.
    pub fn take(&mut self, now: Instant) -> Result<(), Duration> {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            let missing = 1.0 - self.tokens;
            Err(Duration::from_secs_f64(missing / self.per_second).max(Duration::from_millis(1)))
        }
    }
}

/// How often and how long to retry a retryable failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (at least 1).
    pub max_attempts: u32,
    /// The wait after the first failure, before jitter.
    pub base_delay: Duration,
    /// The longest wait, before jitter.
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    /// 4 attempts (the SDK's `connection_retries: 3` plus the first), 1 s doubling to 16 s.
    fn default() -> Self {
        Self {
            max_attempts: 4,
            base_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(16),
        }
    }
}

impl RetryPolicy {
    /// The wait after failed attempt number `attempt` (1-based): `base · 2^(attempt-1)`
    /// capped at `max_delay`, of which the upper half is scaled by `unit` in `[0, 1)`
    /// ("equal jitter": never less than half, so retries still back off).
    pub fn delay(&self, attempt: u32, unit: f64) -> Duration {
        let exp = attempt.saturating_sub(1).min(20);
        let full = self
            .base_delay
            .saturating_mul(1u32 << exp)
            .min(self.max_delay);
        let half = full / 2;
        half + half.mul_f64(unit.clamp(0.0, 1.0))
    }
}

/// A number in `[0, 1)` that differs between calls and processes (for jitter only).
pub fn jitter_unit() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    // 53 random bits as a fraction.
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bucket_allows_its_burst_then_the_rate() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new(3600, 3, t0);
        for _ in 0..3 {
            assert_eq!(bucket.take(t0), Ok(()));
        }
        let wait = bucket.take(t0).expect_err("empty");
        assert!(
            wait > Duration::from_millis(990) && wait <= Duration::from_secs(1),
            "{wait:?}"
        );
        assert!(bucket.take(t0 + Duration::from_millis(500)).is_err());
        assert_eq!(bucket.take(t0 + Duration::from_millis(1001)), Ok(()));
        // An idle hour refills only up to the burst.
        let later = t0 + Duration::from_secs(3600);
        for _ in 0..3 {
            assert_eq!(bucket.take(later), Ok(()));
        }
        assert!(bucket.take(later).is_err());
    }

    #[test]
    fn the_default_rate_is_one_call_per_1_8_seconds_after_the_burst() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new(DEFAULT_CALLS_PER_HOUR, 1, t0);
        assert_eq!(bucket.take(t0), Ok(()));
        let wait = bucket.take(t0).expect_err("empty");
        assert!((wait.as_secs_f64() - 1.8).abs() < 0.001, "{wait:?}");
    }

    #[test]
    fn backoff_doubles_is_capped_and_keeps_half() {
        let p = RetryPolicy {
            max_attempts: 10,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_millis(1000),
        };
        assert_eq!(p.delay(1, 0.0), Duration::from_millis(50));
        assert!(p.delay(1, 0.999_999) < Duration::from_millis(100));
        assert_eq!(p.delay(2, 0.0), Duration::from_millis(100));
        assert_eq!(p.delay(3, 0.5), Duration::from_millis(300));
        assert_eq!(p.delay(9, 0.0), Duration::from_millis(500));
        assert_eq!(p.delay(u32::MAX, 1.0), Duration::from_millis(1000));
    }

    #[test]
    fn jitter_is_in_range_and_varies() {
        let values: Vec<f64> = (0..100).map(|_| jitter_unit()).collect();
        assert!(values.iter().all(|v| (0.0..1.0).contains(v)));
        assert!(values.windows(2).any(|w| w[0] != w[1]));
    }
}
