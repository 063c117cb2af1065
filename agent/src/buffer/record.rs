//! A record as it comes to the writer ([`NewRecord`], with the [`Receipt`] its acknowledgement
//! waits on) and as it is stored ([`StoredRecord`], with its [`checksum`] and attributes).

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;

use super::{RECORD_OVERHEAD_BYTES, WriterCommand};

/// A record received from the broker, not yet in the buffer.
#[derive(Debug, Clone)]
pub struct NewRecord {
    /// Index of its stream.
    pub stream: usize,
    /// MQTT topic.
    pub topic: String,
    /// Exact payload.
    pub payload: Bytes,
    /// Receive time, Unix ms.
    pub received_at_ms: i64,
    /// Receive time, milliseconds since this host booted ([`crate::clock::monotonic_ms`]).
    pub monotonic_ms: u64,
    /// Attributes (`enrich` of a payload that is not a JSON object); usually none.
    pub attributes: Attributes,
    /// Who waits for its commit to acknowledge it (a QoS 1/2 publisher's connection).
    pub receipt: Option<Receipt>,
}

/// Where the writer tells a publisher's connection that its record is committed, or refused
/// (a full disk could not take it): the record's place in that connection's order.
#[derive(Clone)]
pub struct Receipt {
    /// The connection's receipts.
    pub to: Arc<Receipts>,
    /// Its number on that connection (increasing).
    pub ticket: u64,
}

impl std::fmt::Debug for Receipt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Receipt({})", self.ticket)
    }
}

/// One connection's receipts: every ticket up to `done` is committed or refused.
#[derive(Default)]
pub struct Receipts {
    /// (every ticket up to this one is settled, the refused ones not yet taken).
    state: std::sync::Mutex<(u64, Vec<u64>)>,
    notify: tokio::sync::Notify,
}

impl Receipts {
    /// (every ticket up to this one is settled, the refused ones among them since last time),
    /// read together.
    pub fn take(&self) -> (u64, Vec<u64>) {
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        (state.0, std::mem::take(&mut state.1))
    }

    /// Waits until something was settled since the last call.
    pub async fn changed(&self) {
        self.notify.notified().await;
    }

    fn settle(&self, ticket: u64, refused: bool) {
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if refused {
            state.1.push(ticket);
        }
        state.0 = state.0.max(ticket);
    }

    fn wake(&self) {
        self.notify.notify_one();
    }
}

/// Tells the connections waiting on `commands`' records that they are settled.
pub fn settle(commands: &[WriterCommand], refused: bool) {
    let mut woken: Vec<&Arc<Receipts>> = Vec::new();
    for c in commands {
        if let WriterCommand::Append(NewRecord {
            receipt: Some(r), ..
        })
        | WriterCommand::Filtered {
            receipt: Some(r), ..
        } = c
        {
            r.to.settle(r.ticket, refused);
            if !woken.iter().any(|w| Arc::ptr_eq(w, &r.to)) {
                woken.push(&r.to);
            }
        }
    }
    for w in woken {
        w.wake();
    }
}

impl NewRecord {
    /// What it costs against the quota.
    pub fn cost(&self) -> u64 {
        let attributes = stored_attributes(&self.attributes).map_or(0, |a| a.len());
        (self.topic.len() + self.payload.len() + attributes) as u64 + RECORD_OVERHEAD_BYTES
    }
}

/// A record's attributes, by name: what `enrich` adds to a payload that is not a JSON object.
/// They travel to the ingest beside the payload and become Kafka and NATS headers.
pub type Attributes = BTreeMap<String, String>;

/// Attributes as the `attributes` column holds them: a JSON object, or NULL when there are
/// none (most records).
pub(super) fn stored_attributes(attributes: &Attributes) -> Option<Vec<u8>> {
    (!attributes.is_empty())
        .then(|| serde_json::to_vec(attributes).expect("invariant: a map of strings serialises"))
}

/// The checksum stored with a record: CRC-32 of its seq, receive time, topic, payload and
/// stored attributes (when it has any), so a record that changed on disk (a torn page, a
/// flipped bit) is told from a good one.
pub fn checksum(
    seq: u64,
    received_at_ms: i64,
    topic: &str,
    payload: &[u8],
    attributes: Option<&[u8]>,
) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&seq.to_le_bytes());
    h.update(&received_at_ms.to_le_bytes());
    h.update(&(topic.len() as u64).to_le_bytes());
    h.update(topic.as_bytes());
    h.update(payload);
    if let Some(a) = attributes {
        h.update(b"\0attributes");
        h.update(&(a.len() as u64).to_le_bytes());
        h.update(a);
    }
    h.finalize()
}

/// A record read back for a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRecord {
    /// Sequence number within its stream.
    pub seq: u64,
    /// MQTT topic.
    pub topic: String,
    /// Exact payload.
    pub payload: Vec<u8>,
    /// Receive time, Unix ms.
    pub received_at_ms: i64,
    /// Boot id of the host when it was received; empty if unknown (older buffer, salvage).
    pub boot_id: String,
    /// Milliseconds since that boot when it was received; 0 if unknown.
    pub monotonic_ms: u64,
    /// Its attributes.
    pub attributes: Attributes,
}
