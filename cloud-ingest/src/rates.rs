//! Per-device rate limits: records and decompressed bytes per second, answered 429 with
//! Retry-After (the agent waits that long, then resends the same batch); and zstd dictionary
//! registrations, at most [`REGISTRATIONS_BURST`] at once and one per
//! [`REGISTRATION_INTERVAL`] after that, for every device.
//!
//! Invariant: one device over its rate never slows another (each has its own buckets, made
//! when the config loads: no state grows with requests); a bucket holds a second's worth or
//! one largest batch, whichever is more, so a batch within the request limits always fits an
//! idle bucket and is never refused for ever.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

use crate::config::DeviceRate;

/// Dictionary registrations a device may make at once (the agent makes one per stream that
/// uses a dictionary, and again after a 428).
pub const REGISTRATIONS_BURST: u32 = 16;

/// The steady pace of a device's dictionary registrations past the burst.
pub const REGISTRATION_INTERVAL: Duration = Duration::from_secs(4);

/// One device's buckets.
struct Buckets {
    records: Option<DefaultDirectRateLimiter>,
    bytes: Option<DefaultDirectRateLimiter>,
}

/// Every limited device's buckets.
pub struct DeviceRates {
    devices: HashMap<String, Buckets>,
    /// Keyed by authenticated device id: at most one bucket per registered device.
    registrations: governor::DefaultKeyedRateLimiter<String>,
    clock: DefaultClock,
}

impl DeviceRates {
    /// Buckets for `rates`, each holding at least a batch of `max_records` records and
    /// `max_bytes` bytes.
    pub fn new(rates: &HashMap<String, DeviceRate>, max_records: usize, max_bytes: usize) -> Self {
        let bucket = |rate: NonZeroU32, largest: usize| {
            let largest = NonZeroU32::new(u32::try_from(largest).unwrap_or(u32::MAX).max(1))
                .unwrap_or(NonZeroU32::MIN);
            RateLimiter::direct(Quota::per_second(rate).allow_burst(rate.max(largest)))
        };
        DeviceRates {
            devices: rates
                .iter()
                .map(|(id, r)| {
                    (
                        id.clone(),
                        Buckets {
                            records: r.records_per_second.map(|n| bucket(n, max_records)),
                            bytes: r.bytes_per_second.map(|n| bucket(n, max_bytes)),
                        },
                    )
                })
                .collect(),
            registrations: RateLimiter::keyed(
                Quota::with_period(REGISTRATION_INTERVAL)
                    .expect("invariant: non-zero period")
                    .allow_burst(NonZeroU32::new(REGISTRATIONS_BURST).expect("invariant: > 0")),
            ),
            clock: DefaultClock::default(),
        }
    }

    /// Takes one dictionary registration from `device`'s (authenticated) bucket, or says how
    /// long until one would fit.
    pub fn admit_registration(&self, device: &str) -> Result<(), Duration> {
        self.registrations
            .check_key(&device.to_owned())
            .map_err(|not_until| not_until.wait_time_from(self.clock.now()))
    }

    /// Takes `records` records and `bytes` bytes from `device`'s buckets, or says how long
    /// until they would fit (nothing taken then).
    pub fn admit(&self, device: &str, records: usize, bytes: usize) -> Result<(), Duration> {
        let Some(b) = self.devices.get(device) else {
            return Ok(());
        };
        let now = self.clock.now();
        let wait = |bucket: &Option<DefaultDirectRateLimiter>, n: usize| -> Duration {
            let Some(bucket) = bucket else {
                return Duration::ZERO;
            };
            let Some(n) = NonZeroU32::new(u32::try_from(n).unwrap_or(u32::MAX)) else {
                return Duration::ZERO;
            };
            match bucket.check_n(n) {
                Ok(Ok(())) => Duration::ZERO,
                Ok(Err(not_until)) => not_until.wait_time_from(now),
                // Larger than the bucket can ever hold: the request limits refuse it anyway.
                Err(_) => Duration::ZERO,
            }
        };
        let records_wait = wait(&b.records, records);
        if !records_wait.is_zero() {
            return Err(records_wait);
        }
        match wait(&b.bytes, bytes) {
            w if w.is_zero() => Ok(()),
            w => Err(w),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dictionary_registrations_are_limited_per_device() {
        let rates = DeviceRates::new(&HashMap::new(), 10, 10);
        for _ in 0..REGISTRATIONS_BURST {
            assert!(rates.admit_registration("a").is_ok());
        }
        let wait = rates.admit_registration("a").expect_err("over the burst");
        assert!(
            wait > Duration::ZERO && wait <= REGISTRATION_INTERVAL,
            "{wait:?}"
        );
        assert!(
            rates.admit_registration("b").is_ok(),
            "another device's own bucket"
        );
    }

    #[test]
    fn a_device_over_its_rate_waits_and_others_do_not() {
        let rates = HashMap::from([(
            "slow".to_owned(),
            DeviceRate {
                records_per_second: NonZeroU32::new(100),
                bytes_per_second: None,
            },
        )]);
        let r = DeviceRates::new(&rates, 150, 1 << 20);
        assert_eq!(r.admit("slow", 150, 10), Ok(()), "a largest batch fits");
        let wait = r.admit("slow", 100, 10).expect_err("then it waits");
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_secs(2),
            "{wait:?}"
        );
        for _ in 0..1000 {
            assert_eq!(r.admit("other", 10_000, 1 << 20), Ok(()));
        }
    }
}
