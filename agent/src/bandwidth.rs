//! The uplink's bandwidth cap: a token bucket in bytes per second over request bodies, for
//! metered links (cellular). Pure: the caller passes the time and sleeps what it is told.
//!
//! A batch reserves its bytes before it is sent; if the bucket is short, the bucket goes into
//! debt and the batch waits until the debt is paid at the configured rate. So a batch of any
//! size can go (no deadlock on a batch larger than the burst), and over any long window the
//! bytes sent stay at the rate plus one burst. Critical batches may borrow: they go at once,
//! and the debt they leave slows the batches after them, so the long-run rate still holds.

use std::time::{Duration, Instant};

/// A token bucket of `rate` bytes per second holding at most `burst` bytes.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket of `bytes_per_second`, holding one second's worth (at least 1 byte).
    pub fn new(bytes_per_second: u64, now: Instant) -> TokenBucket {
        let rate = bytes_per_second.max(1) as f64;
        TokenBucket {
            rate,
            burst: rate,
            tokens: rate,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.last = now;
    }

    /// Takes `bytes` at `now` and says how long to wait before sending them: zero when the
    /// bucket had them or `borrow` is set, otherwise the time the debt takes to pay off.
    pub fn reserve(&mut self, bytes: usize, now: Instant, borrow: bool) -> Duration {
        self.refill(now);
        self.tokens -= bytes as f64;
        if self.tokens >= 0.0 || borrow {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_table_of_reservations() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let mut b = TokenBucket::new(1000, t0);
        // (at ms, bytes, borrow, expected wait in ms)
        let steps = [
            (0, 600, false, 0),       // from the full bucket: 400 left
            (0, 600, false, 200),     // 200 short: 0.2 s at 1000 B/s
            (200, 100, false, 100),   // the debt was just paid; 100 more wait 0.1 s
            (300, 5000, false, 5000), // larger than the burst: goes, after 5 s
            (5300, 100, true, 0),     // critical borrows: at once...
            (5300, 100, false, 200),  // ...and the next one pays for both
            (60_000, 100, false, 0),  // a long pause refills only up to the burst
            (60_000, 1000, false, 100),
        ];
        for (i, (at, bytes, borrow, want)) in steps.into_iter().enumerate() {
            let wait = b.reserve(bytes, ms(at), borrow);
            assert_eq!(
                (wait.as_secs_f64() * 1000.0).round() as u64,
                want,
                "step {i}"
            );
        }
    }

    #[test]
    fn the_long_run_rate_is_the_cap_plus_one_burst() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10_000, t0);
        let mut now = t0;
        let mut sent = 0usize;
        // Send 3 KB batches back to back for 10 s of bucket time, waiting as told.
        while now < t0 + Duration::from_secs(10) {
            now += b.reserve(3000, now, false);
            sent += 3000;
        }
        let seconds = now.duration_since(t0).as_secs_f64();
        let rate = (sent as f64 - 10_000.0) / seconds;
        assert!((rate - 10_000.0).abs() < 400.0, "{rate} B/s");
    }
}
