//! Where accepted batches go: the central stream log. One trait, one implementation per log.
//!
//! Invariant: `publish` resolves `Ok` only once every record of the batch is durably in the log
//! (or was already there: a duplicate). The HTTP layer answers 2xx on that and nothing else.

use std::future::Future;
use std::pin::Pin;

use ingest_wire::{Batch, BatchAck};

pub mod embedded;

/// A validated batch from an authenticated device, with the log topic it goes to.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// Tenant of the device.
    pub tenant: String,
    /// Log topic, from the topic template.
    pub topic: String,
    /// The batch; `batch.device_id` is the authenticated device.
    pub batch: Batch,
    /// Ingest wall-clock time at receipt, Unix milliseconds.
    pub ingested_at_ms: i64,
}

/// The log could not take the batch. Answered with 503 + Retry-After; the sender keeps it.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The log is unavailable or failed to commit; nothing of the batch was acknowledged.
    #[error("stream log unavailable: {reason}")]
    Unavailable {
        /// What failed, for the ingest's own log.
        reason: String,
    },
}

/// A boxed future, as trait objects need.
pub type PublishFuture<'a> =
    Pin<Box<dyn Future<Output = Result<BatchAck, PublishError>> + Send + 'a>>;

/// A stream log the ingest appends to.
pub trait Publisher: Send + Sync {
    /// Appends the records of `delivery` not already in the log, in order, durably.
    fn publish(&self, delivery: Delivery) -> PublishFuture<'_>;
    /// Whether the log can take writes now (drives `/readyz`).
    fn is_ready(&self) -> bool;
}

/// The log topic for `tenant` and `stream` from `template` (`{tenant}`, `{stream}`).
pub fn topic_name(template: &str, tenant: &str, stream: &str) -> String {
    template
        .replace("{tenant}", tenant)
        .replace("{stream}", stream)
}

#[cfg(test)]
mod tests {
    #[test]
    fn topic_names() {
        for (template, want) in [
            ("iot.{tenant}.{stream}", "iot.acme.telemetry"),
            ("{stream}-{tenant}", "telemetry-acme"),
        ] {
            assert_eq!(super::topic_name(template, "acme", "telemetry"), want);
        }
    }
}
