//! Where accepted batches go: the central stream log. One trait, one implementation per log.
//!
//! Invariant: `publish` resolves `Ok` only once every record of the batch is durably in the log
//! (or was already there: a duplicate), or, for a record the log refuses for a reason no retry
//! can fix (a *poison* record: bigger than the log takes), once its dead letter is. The HTTP
//! layer answers 2xx on that and nothing else.
//!
//! Dead letters: a poison record would otherwise be answered 503 for ever, and its FIFO stream
//! would never move again. Instead it is replaced by a dead letter in the tenant's reserved
//! stream [`DEAD_LETTER_STREAM`] (topic `iot.{tenant}._dead_letters` by default): the record's
//! metadata headers, `dead_letter_reason`, `dead_letter_topic` (where it was going),
//! `dead_letter_payload_bytes` and `dead_letter_payload_sha256` (of the whole payload), and the
//! first [`DEAD_LETTER_SAMPLE_BYTES`] of its payload. A per-record refusal is not an outage:
//! it neither marks the replica unready nor replaces a shared producer.
//!
//! Header values (Kafka and NATS) are encoded by [`header_value`], so no byte of a topic or boot
//! id can break a header.

use std::future::Future;
use std::pin::Pin;

use std::borrow::Cow;

use bytes::Bytes;
use ingest_wire::{Batch, BatchAck, Record};
use sha2::Digest;

pub mod dedup;
pub mod embedded;
pub mod kafka;
pub mod nats;

/// Idempotency scopes a stateless sink's replica remembers (about 100 bytes each).
pub const DEDUP_CACHE_SCOPES: usize = 100_000;

/// The reserved stream of each tenant that takes the dead letters of poison records.
pub const DEAD_LETTER_STREAM: &str = "_dead_letters";

/// How much of a poison record's payload its dead letter keeps.
pub const DEAD_LETTER_SAMPLE_BYTES: usize = 4096;

/// How much of each header value a dead letter keeps.
pub const DEAD_LETTER_HEADER_BYTES: usize = 1024;

/// A validated batch from an authenticated device, with the log topic it goes to.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// Tenant of the device.
    pub tenant: String,
    /// Log topic, from the topic template.
    pub topic: String,
    /// The tenant's dead-letter topic (stream [`DEAD_LETTER_STREAM`]).
    pub dead_letter_topic: String,
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

impl Delivery {
    /// `record`'s metadata as header name and value (names and meaning in `wire/SPEC.md`),
    /// then its attributes (whose names the contract keeps apart from the metadata's), each
    /// value encoded by [`header_value`].
    pub fn headers<'a>(&'a self, r: &'a Record, batch_id: &str) -> Vec<(&'a str, String)> {
        let b = &self.batch;
        let mut fields = vec![
            ("device", header_value(&b.device_id).into_owned()),
            ("tenant", header_value(&self.tenant).into_owned()),
            ("stream", header_value(&b.stream).into_owned()),
            ("epoch", b.epoch.to_string()),
            ("seq", r.seq.to_string()),
            ("mqtt_topic", header_value(&r.topic).into_owned()),
            ("received_at_ms", r.received_at_ms.to_string()),
            ("sent_at_ms", b.sent_at_ms.to_string()),
            ("ingested_at_ms", self.ingested_at_ms.to_string()),
            ("batch_id", header_value(batch_id).into_owned()),
        ];
        if let Some(qos) = r.qos {
            fields.push(("qos", qos.to_string()));
        }
        if !r.boot_id.is_empty() {
            fields.push(("boot_id", header_value(&r.boot_id).into_owned()));
            fields.push(("monotonic_ms", r.monotonic_ms.to_string()));
        }
        if let Some(corrected) = self.corrected_at_ms(r) {
            fields.push(("corrected_at_ms", corrected.to_string()));
            fields.push(("clock_corrected", "true".into()));
        }
        for a in &r.attributes {
            fields.push((a.key.as_str(), header_value(&a.value).into_owned()));
        }
        fields
    }

    /// The dead letter standing for `record`, which the log refused for good with `reason`:
    /// its headers (the record's, plus where it was going and why it is here) and payload (the
    /// first [`DEAD_LETTER_SAMPLE_BYTES`] of the record's).
    pub fn dead_letter<'a>(
        &'a self,
        r: &'a Record,
        batch_id: &str,
        reason: &str,
    ) -> (Vec<(&'a str, String)>, Bytes) {
        let mut headers = self.headers(r, batch_id);
        // A record may be refused for its headers (a topic near 64 KiB): its dead letter keeps
        // the first KiB of each long one, and names them.
        let mut cut = Vec::new();
        for (name, value) in &mut headers {
            if value.len() > DEAD_LETTER_HEADER_BYTES {
                let mut end = DEAD_LETTER_HEADER_BYTES;
                while !value.is_char_boundary(end) {
                    end -= 1;
                }
                value.truncate(end);
                cut.push(*name);
            }
        }
        if !cut.is_empty() {
            headers.push(("dead_letter_cut_headers", cut.join(",")));
        }
        headers.push(("dead_letter_reason", header_value(reason).into_owned()));
        headers.push(("dead_letter_topic", header_value(&self.topic).into_owned()));
        headers.push(("dead_letter_payload_bytes", r.payload.len().to_string()));
        headers.push((
            "dead_letter_payload_sha256",
            hex::encode(sha2::Sha256::digest(&r.payload)),
        ));
        let sample = r
            .payload
            .slice(..r.payload.len().min(DEAD_LETTER_SAMPLE_BYTES));
        (headers, sample)
    }
}

/// `value` made safe for any header: each byte below 0x20, 0x7F and `%` becomes `%XX`
/// (upper-case hex), and so does each byte of whitespace at either end (NATS trims header
/// values) and the first letter of each `Nats-` in any case (the NATS server finds a header by the first place its
/// name appears in the header block: a value holding `Nats-Msg-Id` written before the real
/// one would hide it, and JetStream's deduplication with it); everything else is kept. Undo
/// with percent-decoding.
pub fn header_value(value: &str) -> Cow<'_, str> {
    let unsafe_byte = |b: u8| b < 0x20 || b == 0x7f || b == b'%';
    let edge_space = value.starts_with(char::is_whitespace) || value.ends_with(char::is_whitespace);
    let nats_at = |i: usize| {
        value
            .as_bytes()
            .get(i..i + 5)
            .is_some_and(|w| w.eq_ignore_ascii_case(b"nats-"))
    };
    let any_nats = value
        .bytes()
        .enumerate()
        .any(|(i, b)| b.eq_ignore_ascii_case(&b'n') && nats_at(i));
    if !edge_space && !value.bytes().any(unsafe_byte) && !any_nats {
        return Cow::Borrowed(value);
    }
    let lead = value.len() - value.trim_start().len();
    let trail = value.trim_end().len();
    let mut out = String::with_capacity(value.len() + 8);
    for (i, c) in value.char_indices() {
        let at_edge = (i < lead || i >= trail) && c.is_whitespace();
        let nats = c.eq_ignore_ascii_case(&'n') && nats_at(i);
        if at_edge || nats || u8::try_from(c).is_ok_and(unsafe_byte) {
            let mut utf8 = [0u8; 4];
            for b in c.encode_utf8(&mut utf8).bytes() {
                out.push_str(&format!("%{b:02X}"));
            }
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// The correction for a batch sent at `sent_at_ms` (agent clock) and received at
/// `ingested_at_ms` (ingest clock): `Some(offset)` when they differ by more than
/// `threshold_ms`, `None` when the agent's clock is fine or the batch has no send time.
/// The offset includes the transit time, which is small next to any threshold worth setting.
pub fn clock_offset(sent_at_ms: i64, ingested_at_ms: i64, threshold_ms: i64) -> Option<i64> {
    let offset = ingested_at_ms.saturating_sub(sent_at_ms);
    (sent_at_ms > 0 && offset.saturating_abs() > threshold_ms).then_some(offset)
}

/// How the log answered one record of a batch.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Settled {
    /// In the log; `duplicate`: the log already had it (JetStream's deduplication).
    Appended { duplicate: bool },
    /// Refused for good (see the module's dead letters).
    Poison(String),
    /// Not acknowledged: the batch fails here.
    Failed(String),
}

/// Keeps the acknowledged prefix of a batch, from its records' answers in batch order: each
/// record appended, or poison and then dead-lettered by `dead_letter`, goes into `seen` and is
/// counted in `ack`, up to the first that failed (or whose dead letter failed), whose reason is
/// returned. Nothing after it is remembered, so a retry resends the rest of the batch in order.
pub(crate) async fn keep_acknowledged_prefix<'r, F, Fut>(
    settled: impl IntoIterator<Item = (&'r Record, Settled)>,
    seen: &mut ingest_wire::SeqRanges,
    ack: &mut BatchAck,
    mut dead_letter: F,
) -> Option<String>
where
    F: FnMut(&'r Record, String) -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    for (r, result) in settled {
        match result {
            Settled::Appended { duplicate } => {
                if duplicate {
                    ack.duplicates += 1;
                } else {
                    ack.accepted += 1;
                }
            }
            Settled::Poison(reason) => match dead_letter(r, reason).await {
                Ok(()) => ack.dead_lettered += 1,
                Err(e) => return Some(e),
            },
            Settled::Failed(reason) => return Some(reason),
        }
        seen.insert(r.seq);
    }
    None
}

/// The log did not take the batch; nothing of it was acknowledged. Answered 503 +
/// Retry-After (the sender keeps it and retries), or 400 for [`PublishError::Refused`] (the
/// sender dead-letters it).
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The log is unavailable or failed to commit; nothing of the batch was acknowledged.
    #[error("stream log unavailable: {reason}")]
    Unavailable {
        /// What failed, for the ingest's own log.
        reason: String,
    },
    /// The log has no room for the batch's topic until an operator acts (a limit of the
    /// whole embedded log); nothing of the batch was written. Answered 503 with the reason (the
    /// agent logs it), so the gateway's operator sees which limit and what to do.
    #[error("stream log full: {reason}")]
    Full {
        /// Which limit, and what to do.
        reason: String,
    },
    /// The log will not take the batch's stream from this sender (a new topic past its
    /// tenant's `max_topics_per_tenant`); nothing of the batch was written. Answered 400 with
    /// the reason: the agent keeps the batch in its dead-letter table and its other streams go
    /// on (a 503 would hold them all).
    #[error("stream refused: {reason}")]
    Refused {
        /// Which limit, and what to do.
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
    use super::header_value;

    #[test]
    fn a_dead_letter_cuts_long_headers() {
        let mut d = super::Delivery {
            tenant: "acme".into(),
            topic: "iot.acme.t".into(),
            dead_letter_topic: "iot.acme._dead_letters".into(),
            batch: ingest_wire::Batch::default(),
            ingested_at_ms: 1,
            clock_offset_ms: None,
        };
        d.batch.device_id = "d".into();
        let r = ingest_wire::Record {
            topic: "é".repeat(40_000),
            payload: bytes::Bytes::from(vec![1u8; 10]),
            ..Default::default()
        };
        let (headers, sample) = d.dead_letter(&r, "b", "too big");
        let get = |n: &str| &headers.iter().find(|(k, _)| *k == n).expect(n).1;
        assert!(get("mqtt_topic").len() <= super::DEAD_LETTER_HEADER_BYTES);
        assert_eq!(get("dead_letter_cut_headers"), "mqtt_topic");
        assert_eq!(sample.len(), 10);
    }

    #[test]
    fn attributes_follow_the_metadata_headers_with_encoded_values() {
        let d = super::Delivery {
            tenant: "acme".into(),
            topic: "iot.acme.t".into(),
            dead_letter_topic: "iot.acme._dead_letters".into(),
            batch: ingest_wire::Batch::default(),
            ingested_at_ms: 1,
            clock_offset_ms: None,
        };
        let r = ingest_wire::Record {
            topic: "plant/7/line".into(),
            attributes: vec![
                ingest_wire::Attribute {
                    key: "device_location".into(),
                    value: "factory-floor-1".into(),
                },
                ingest_wire::Attribute {
                    key: "site".into(),
                    value: "a\nb ".into(),
                },
            ],
            ..Default::default()
        };
        let headers = d.headers(&r, "b");
        let n = headers.len();
        assert_eq!(
            headers[n - 2],
            ("device_location", "factory-floor-1".into())
        );
        assert_eq!(headers[n - 1], ("site", "a%0Ab%20".into()));
        assert_eq!(
            headers.iter().filter(|(k, _)| *k == "mqtt_topic").count(),
            1
        );
    }

    #[test]
    fn header_values_keep_no_control_byte() {
        assert_eq!(header_value("plant/1/temp"), "plant/1/temp");
        assert_eq!(header_value("a\r\nb"), "a%0D%0Ab");
        assert_eq!(header_value("100%\u{7f}"), "100%25%7F");
        assert_eq!(header_value("température/ü"), "température/ü");
        assert_eq!(header_value(" a b\u{a0}"), "%20a b%C2%A0");
        assert_eq!(
            header_value("plant/Nats-Msg-Id/x: Nats-"),
            "plant/%4Eats-Msg-Id/x: %4Eats-"
        );
        assert_eq!(header_value("nats-msg-id"), "%6Eats-msg-id");
        assert_eq!(header_value("nats"), "nats");
    }

    proptest::proptest! {
        #[test]
        fn header_values_round_trip_and_are_safe(s in ".*") {
            let encoded = header_value(&s);
            proptest::prop_assert!(!encoded.bytes().any(|b| b < 0x20 || b == 0x7f));
            proptest::prop_assert_eq!(encoded.trim(), encoded.as_ref(), "nothing to trim");
            let mut decoded = Vec::new();
            let bytes = encoded.as_bytes();
            let mut i = 0;
            while i < bytes.len() {
                if bytes[i] == b'%' {
                    let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).expect("ascii");
                    decoded.push(u8::from_str_radix(hex, 16).expect("hex"));
                    i += 3;
                } else {
                    decoded.push(bytes[i]);
                    i += 1;
                }
            }
            proptest::prop_assert_eq!(decoded, s.as_bytes());
        }
    }

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
