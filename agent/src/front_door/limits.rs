//! What one client may cost the door: its publish rate, and what the embedded broker retains.
//!
//! Invariants:
//! - a QoS 1/2 publisher over `mqtt.rate_limit` is slowed, never refused: its next packet is
//!   read (and so its next acknowledgement sent) once its bucket has room again; a QoS 0
//!   publish over it is shed (not stored), counted in `agent_mqtt_shed_total`, and logged per
//!   client at most every [`SHED_LOG_EVERY`] and when the connection ends;
//! - rumqttd retains at most `mqtt.retained.max_messages` topics and `max_bytes` of topics and
//!   payloads: a retained publish beyond that reaches live local subscribers without its
//!   retain flag (counted); clearing a retained topic (empty payload) always passes. The
//!   durable path is not affected: every publish is kept either way.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::time::{Duration, Instant};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

use crate::config::{RateLimit, RetainedLimits};

/// Shortest time between two "shed" log lines of one client.
pub const SHED_LOG_EVERY: Duration = Duration::from_secs(10);

/// One connection's publish buckets (a second's worth of burst).
pub struct PublishRate {
    messages: DefaultDirectRateLimiter,
    bytes: Option<DefaultDirectRateLimiter>,
}

impl PublishRate {
    /// Buckets for `limit`; the byte bucket holds at least one largest publish.
    pub fn new(limit: RateLimit, max_payload: usize) -> PublishRate {
        let largest = NonZeroU32::new(u32::try_from(max_payload).unwrap_or(u32::MAX).max(1))
            .unwrap_or(NonZeroU32::MIN);
        PublishRate {
            messages: RateLimiter::direct(Quota::per_second(limit.messages_per_second)),
            bytes: limit
                .bytes_per_second
                .map(|b| RateLimiter::direct(Quota::per_second(b).allow_burst(b.max(largest)))),
        }
    }

    /// For QoS 0: whether a publish of `bytes` payload fits now (and takes its room).
    pub fn admit(&self, bytes: usize) -> bool {
        if self.messages.check().is_err() {
            return false;
        }
        match (&self.bytes, NonZeroU32::new(bytes as u32)) {
            (Some(b), Some(n)) => b.check_n(n).is_ok_and(|fits| fits.is_ok()),
            _ => true,
        }
    }

    /// For QoS 1/2: waits until a publish of `bytes` payload fits, and takes its room.
    pub async fn wait(&self, bytes: usize) {
        self.messages.until_ready().await;
        if let (Some(b), Some(n)) = (&self.bytes, NonZeroU32::new(bytes as u32)) {
            // At most the largest publish, which the bucket holds: never insufficient.
            let _ = b.until_n_ready(n).await;
        }
    }
}

/// QoS 0 publishes one connection shed, for its log lines.
#[derive(Debug, Default)]
pub struct Shed {
    /// Over the connection's life.
    pub total: u64,
    /// Since the last log line.
    unlogged: u64,
    logged_at: Option<Instant>,
}

impl Shed {
    /// Counts one; `Some(n)` when it is time to log the `n` shed since the last line.
    pub fn count(&mut self, now: Instant) -> Option<u64> {
        self.total += 1;
        self.unlogged += 1;
        if self
            .logged_at
            .is_some_and(|at| now.duration_since(at) < SHED_LOG_EVERY)
        {
            return None;
        }
        self.logged_at = Some(now);
        Some(std::mem::take(&mut self.unlogged))
    }
}

/// What rumqttd retains, as the door let it through.
#[derive(Debug, Default)]
pub struct Retained {
    /// Bytes (topic and payload) per retained topic.
    topics: HashMap<String, usize>,
    bytes: usize,
}

impl Retained {
    /// Whether a retained publish of `payload` bytes on `topic` may be retained. An empty
    /// payload clears the topic and always passes.
    pub fn fits(&self, topic: &str, payload: usize, limits: RetainedLimits) -> bool {
        if payload == 0 {
            return true;
        }
        let old = self.topics.get(topic).copied();
        let bytes = self.bytes - old.unwrap_or(0) + topic.len() + payload;
        !((old.is_none() && self.topics.len() >= limits.max_messages) || bytes > limits.max_bytes)
    }

    /// Accounts a retained publish rumqttd took (once it is on its way: a copy that was
    /// dropped changes nothing there, so nothing here).
    pub fn set(&mut self, topic: &str, payload: usize) {
        if let Some(old) = self.topics.remove(topic) {
            self.bytes -= old;
        }
        if payload > 0 {
            let size = topic.len() + payload;
            self.topics.insert(topic.to_owned(), size);
            self.bytes += size;
        }
    }

    /// [`Retained::fits`] then [`Retained::set`], for tests.
    #[cfg(test)]
    fn admit(&mut self, topic: &str, payload: usize, limits: RetainedLimits) -> bool {
        let fits = self.fits(topic, payload, limits);
        if fits {
            self.set(topic, payload);
        }
        fits
    }

    /// Bytes retained now.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: RetainedLimits = RetainedLimits {
        max_messages: 3,
        max_bytes: 100,
    };

    #[test]
    fn retained_topics_and_bytes_are_bounded_and_clearing_frees_them() {
        let mut r = Retained::default();
        assert!(r.admit("a", 10, LIMITS));
        assert!(r.admit("b", 10, LIMITS));
        assert!(r.admit("c", 10, LIMITS));
        assert!(!r.admit("d", 1, LIMITS), "a fourth topic");
        assert!(r.admit("a", 20, LIMITS), "replacing one is no new topic");
        assert_eq!(r.bytes(), 21 + 11 + 11);
        assert!(!r.admit("b", 80, LIMITS), "over the bytes");
        assert_eq!(r.bytes(), 43, "a refusal changes nothing");
        assert!(r.admit("c", 0, LIMITS), "clearing passes");
        assert!(r.admit("d", 1, LIMITS), "and makes room");
        assert!(r.admit("nothing-there", 0, LIMITS));
        assert_eq!(r.bytes(), 21 + 11 + 2);
    }

    #[test]
    fn shed_lines_come_at_most_every_ten_seconds_with_what_they_missed() {
        let mut s = Shed::default();
        let t = Instant::now();
        assert_eq!(s.count(t), Some(1));
        assert_eq!(s.count(t + Duration::from_secs(1)), None);
        assert_eq!(s.count(t + Duration::from_secs(2)), None);
        assert_eq!(s.count(t + Duration::from_secs(11)), Some(3));
        assert_eq!(s.total, 4);
    }

    #[tokio::test]
    async fn a_bucket_admits_a_seconds_worth_then_sheds_and_waits() {
        let rate = PublishRate::new(
            RateLimit {
                messages_per_second: NonZeroU32::new(5).expect("5"),
                bytes_per_second: None,
            },
            1000,
        );
        let admitted = (0..20).filter(|_| rate.admit(10)).count();
        assert_eq!(admitted, 5, "the burst");
        // Waiting always ends with room taken (no timing asserted).
        rate.wait(10).await;
        let bytes = PublishRate::new(
            RateLimit {
                messages_per_second: NonZeroU32::new(1000).expect("n"),
                bytes_per_second: NonZeroU32::new(100),
            },
            250,
        );
        assert!(bytes.admit(250), "one largest publish fits the byte bucket");
        assert!(!bytes.admit(10), "then the bytes are spent");
    }
}
