//! Where accepted batches go: the central stream log. One trait, one implementation per log.
//!
//! Invariant: `publish` resolves `Ok` only once every record of the batch is durably in the log
//! (or was already there: a duplicate). The HTTP layer answers 2xx on that and nothing else.

use std::future::Future;
use std::pin::Pin;

use ingest_wire::{Batch, BatchAck, Record};

pub mod dedup;
pub mod embedded;
pub mod kafka;
pub mod nats;

/// Idempotency scopes a stateless sink's replica remembers (about 100 bytes each).
pub const DEDUP_CACHE_SCOPES: usize = 100_000;

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
    /// Set when the agent's clock is off by more than the threshold: ingest time minus the
    /// batch's send time, added to each record's receive time to correct it.
    pub clock_offset_ms: Option<i64>,
}

impl Delivery {
    /// `record`'s receive time on the ingest's clock, when the agent's clock was off.
    /// The original `received_at_ms` is always kept beside it.
    pub fn corrected_at_ms(&self, record: &Record) -> Option<i64> {
        self.clock_offset_ms
            .map(|offset| record.received_at_ms.saturating_add(offset))
    }

    /// The batch's idempotency scope: (device, stream, epoch).
    pub fn scope(&self) -> dedup::DedupScope {
        let b = &self.batch;
        (b.device_id.clone(), b.stream.clone(), b.epoch)
    }

    /// Names the batch in logs and headers: `device/stream/epoch/first-last`.
    pub fn batch_id(&self) -> String {
        let b = &self.batch;
        let seq = |r: Option<&Record>| r.map_or(0, |r| r.seq);
        format!(
            "{}/{}/{}/{}-{}",
            b.device_id,
            b.stream,
            b.epoch,
            seq(b.records.first()),
            seq(b.records.last())
        )
    }

    /// The idempotency key of `record`: `device/stream/epoch/seq` (NATS `Nats-Msg-Id`).
    pub fn record_key(&self, record: &Record) -> String {
        let b = &self.batch;
        format!("{}/{}/{}/{}", b.device_id, b.stream, b.epoch, record.seq)
    }
}

/// The correction for a batch sent at `sent_at_ms` (agent clock) and received at
/// `ingested_at_ms` (ingest clock): `Some(offset)` when they differ by more than
/// `threshold_ms`, `None` when the agent's clock is fine or the batch has no send time.
/// The offset includes the transit time, which is small next to any threshold worth setting.
pub fn clock_offset(sent_at_ms: i64, ingested_at_ms: i64, threshold_ms: i64) -> Option<i64> {
    let offset = ingested_at_ms.saturating_sub(sent_at_ms);
    (sent_at_ms > 0 && offset.saturating_abs() > threshold_ms).then_some(offset)
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

#[cfg(test)]
mod tests {
    #[test]
    fn clock_offsets() {
        let hour = 3_600_000;
        for (sent, ingested, want) in [
            (1_000_000, 1_000_050, None),
            (1_000_000, 1_000_000 + hour, Some(hour)),
            (1_000_000 + hour, 1_000_000, Some(-hour)),
            (1_000_000, 1_060_000, None),
            (1_000_000, 1_060_001, Some(60_001)),
            (0, 1_000_000, None),
        ] {
            assert_eq!(
                super::clock_offset(sent, ingested, 60_000),
                want,
                "{sent} {ingested}"
            );
        }
    }
}
