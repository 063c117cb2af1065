//! The agent ↔ cloud-ingest contract, version 1. No I/O, no async.
//!
//! ```text
//! agent: Batch ─prost─▶ bytes ─zstd─▶ POST /v1/batches ─▶ ingest: bounded unzstd ─▶ decode ─▶ validate
//! ```
//!
//! Guarantees kept here:
//! - payloads are opaque bytes, carried exactly (protobuf `bytes`);
//! - every record carries its idempotency key (device, stream, sequence);
//! - decompression is bounded: a body never expands past [`Limits::max_decompressed_bytes`].
//!
//! The schemas are `batch.proto` and `batch_v2.proto` beside this file; a third party generates
//! a client from them. Three body formats are accepted: the protobuf [`Batch`] (body version 1,
//! [`CONTENT_TYPE_BATCH`]), the same records as columns ([`v2::Batch`], body version 2,
//! [`CONTENT_TYPE_BATCH_V2`], `columnar`: what the agent sends to an ingest that advertises it
//! in [`HEADER_ACCEPT_POST`]), and a plain JSON batch ([`JsonBatch`], `application/json`) for
//! curl and non-Rust devices.

mod batch;
mod codec;
mod columnar;
mod json;
mod loss;
mod ranges;
mod status;

pub use batch::{Attribute, Batch, Record, v2};
pub use codec::{
    DecodeError, Limits, MAX_WINDOW_LOG, body_version, compress, compress_with_dictionary,
    decode_body, decode_body_with, decoded_size_bound, dictionary_id, encode_batch,
    frame_dictionary_id, train_dictionary,
};
pub use columnar::{SHARED_BYTES_PER_RECORD, encode_columnar, encode_columnar_within_limits};
pub use json::{BatchAck, JsonBatch, JsonRecord};
pub use loss::{LOSS_STREAM, LossReason, LossReport};
pub use ranges::SeqRanges;
pub use status::{Action, Answer};

/// Wall-clock now, Unix milliseconds (0 if the clock is before 1970, e.g. no RTC at boot): the
/// one clock reading both sides stamp records and batches with.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Version of this contract; it is part of the path ([`BATCHES_PATH`]).
pub const WIRE_VERSION: u32 = 1;
/// Where batches are POSTed.
pub const BATCHES_PATH: &str = "/v1/batches";

/// Where a zstd dictionary is registered: `PUT {DICTIONARIES_PATH}/{id}` with the dictionary
/// as the body (same authentication as batches; at most [`MAX_DICTIONARY_BYTES`]). A batch whose
/// zstd frame header names a dictionary the ingest does not have is answered 428: register it,
/// then resend.
pub const DICTIONARIES_PATH: &str = "/v1/dictionaries";
/// Largest dictionary the ingest registers, in bytes.
pub const MAX_DICTIONARY_BYTES: usize = 64 * 1024;

/// Readiness: 200 when the ingest can append to its log now, 503 otherwise. The agent probes
/// it while the ingest fails, instead of sending data into a dead link.
pub const READYZ_PATH: &str = "/readyz";
/// Content type of the compact protobuf batch.
pub const CONTENT_TYPE_BATCH: &str = "application/x-protobuf; proto=edgegw.v1.Batch";
/// Content type of the columnar protobuf batch, body version 2 (`batch_v2.proto`).
pub const CONTENT_TYPE_BATCH_V2: &str = "application/x-protobuf; proto=edgegw.v2.Batch";
/// Response header (RFC 9110's list syntax, the name from the Linked Data Platform's
/// `Accept-Post`) in which the ingest lists the body types `POST /v1/batches` takes, on every
/// answer to a batch and to `/readyz`: a client sends body version 2 only to an ingest that
/// lists it ([`accepts_v2`]).
pub const HEADER_ACCEPT_POST: &str = "accept-post";
/// What this ingest lists in [`HEADER_ACCEPT_POST`].
pub const ACCEPTED_BODIES: &str = "application/x-protobuf; proto=edgegw.v2.Batch, application/x-protobuf; proto=edgegw.v1.Batch, application/json";

/// Whether an [`HEADER_ACCEPT_POST`] value lists body version 2.
pub fn accepts_v2(accept_post: &str) -> bool {
    accept_post
        .split(',')
        .any(|t| BodyVersion::of(Some(t.trim())) == Some(BodyVersion::V2))
}

/// The protobuf body versions a client chooses between.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyVersion {
    /// [`Batch`], one protobuf message per record: every ingest takes it.
    V1,
    /// [`v2::Batch`], columns: only an ingest that lists it in [`HEADER_ACCEPT_POST`].
    V2,
}

impl BodyVersion {
    /// Its `Content-Type`.
    pub const fn content_type(self) -> &'static str {
        match self {
            BodyVersion::V1 => CONTENT_TYPE_BATCH,
            BodyVersion::V2 => CONTENT_TYPE_BATCH_V2,
        }
    }

    /// `batch` in this version, uncompressed, and the version it is in: version 1 when a
    /// version 2 body would be refused ([`encode_columnar_within_limits`]).
    pub fn encode(self, batch: &Batch) -> (Vec<u8>, BodyVersion) {
        match self {
            BodyVersion::V2 => match encode_columnar_within_limits(batch) {
                Some(body) => (body, BodyVersion::V2),
                None => (encode_batch(batch), BodyVersion::V1),
            },
            BodyVersion::V1 => (encode_batch(batch), BodyVersion::V1),
        }
    }

    /// The version a protobuf `Content-Type` names (see [`body_version`]); `None` for JSON
    /// and anything else.
    pub fn of(content_type: Option<&str>) -> Option<BodyVersion> {
        let protobuf = content_type.is_some_and(|t| {
            t.split(';')
                .next()
                .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/x-protobuf"))
        });
        match body_version(content_type) {
            Some(1) if protobuf => Some(BodyVersion::V1),
            Some(2) if protobuf => Some(BodyVersion::V2),
            _ => None,
        }
    }

    /// What decoding a record of a body in this version may cost the receiver beyond the
    /// bytes copied out of the body ([`DECODED_RECORD_BYTES`], or
    /// [`DECODED_RECORD_BYTES_V2`]).
    pub const fn decoded_record_bytes(self) -> usize {
        match self {
            BodyVersion::V1 => DECODED_RECORD_BYTES,
            BodyVersion::V2 => DECODED_RECORD_BYTES_V2,
        }
    }
}

/// Content type of the plain JSON batch.
pub const CONTENT_TYPE_JSON: &str = "application/json";
/// `Content-Encoding` value for a zstd-compressed body (one or more concatenated zstd frames).
pub const ENCODING_ZSTD: &str = "zstd";
/// Request header naming the device; the bearer token must be that device's.
pub const HEADER_DEVICE_ID: &str = "x-device-id";
/// Response header on 429 and 503: seconds to wait before retrying.
pub const HEADER_RETRY_AFTER: &str = "retry-after";
/// Longest device id, stream name and MQTT topic, in bytes.
pub const MAX_NAME_BYTES: usize = 256;
/// Longest MQTT topic carried in a record, in bytes.
pub const MAX_TOPIC_BYTES: usize = 65_535;

/// Most attributes one record carries.
pub const MAX_ATTRIBUTES: usize = 16;
/// Longest attribute name, in bytes.
pub const MAX_ATTRIBUTE_NAME_BYTES: usize = 64;
/// Longest attribute value, in bytes (as long as a topic: a topic's segment always fits).
pub const MAX_ATTRIBUTE_VALUE_BYTES: usize = MAX_TOPIC_BYTES;
/// What one decoded record may cost the receiver beyond the bytes copied out of the body: the
/// [`Record`], and its [`MAX_ATTRIBUTES`] attribute entries with the two allocations of each
/// (counted at 32 bytes apiece, the allocator's smallest block with its header): 1,928 bytes.
pub const DECODED_RECORD_BYTES: usize =
    size_of::<Record>() + MAX_ATTRIBUTES * (size_of::<Attribute>() + 2 * 32);
/// [`DECODED_RECORD_BYTES`] for a record of a version 2 body, plus what its columns cost
/// decoded (seven 8-byte values, in vectors that may have doubled: 112 bytes), the allocations
/// of its own copies of a topic and a boot id (64), and the bytes it may copy of the entries
/// records share ([`SHARED_BYTES_PER_RECORD`]): 2,616 bytes.
pub const DECODED_RECORD_BYTES_V2: usize =
    DECODED_RECORD_BYTES + 112 + 64 + SHARED_BYTES_PER_RECORD;
/// The record metadata names of `SPEC.md` ("Where records land"): no attribute takes one
/// (compared without case), nor starts with `dead_letter_`, nor contains `nats-` anywhere.
pub const RESERVED_ATTRIBUTE_NAMES: &[&str] = &[
    "device",
    "tenant",
    "stream",
    "epoch",
    "seq",
    "mqtt_topic",
    "qos",
    "received_at_ms",
    "sent_at_ms",
    "ingested_at_ms",
    "boot_id",
    "monotonic_ms",
    "corrected_at_ms",
    "clock_corrected",
    "batch_id",
];

/// Why `name` cannot name a record attribute, or `None` when it can: 1-64 characters of
/// `[A-Za-z0-9_.-]` (a header name in Kafka and NATS alike), and not a metadata name
/// ([`RESERVED_ATTRIBUTE_NAMES`], or starting with `dead_letter_`), so an attribute never
/// forges the record's own headers; and without `nats-` anywhere (without case): the NATS
/// server finds a header by the first place its name appears in the header block, so a header
/// `x-Nats-Msg-Id` written first would hide the real `Nats-Msg-Id` and its deduplication.
pub fn attribute_name_problem(name: &str) -> Option<String> {
    let lower = name.to_ascii_lowercase();
    if name.is_empty()
        || name.len() > MAX_ATTRIBUTE_NAME_BYTES
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
    {
        Some(format!(
            "attribute name {} must be 1-{MAX_ATTRIBUTE_NAME_BYTES} characters of [A-Za-z0-9_.-]",
            codec::shown(name)
        ))
    } else if RESERVED_ATTRIBUTE_NAMES.contains(&lower.as_str())
        || lower.starts_with("dead_letter_")
        || lower.contains("nats-")
    {
        Some(format!(
            "attribute name {name:?} is taken by the record's metadata (SPEC.md, \"Where records land\")"
        ))
    } else {
        None
    }
}

/// Whether `name` is a valid device id or stream name: 1..=256 bytes of `[A-Za-z0-9_.-]`.
/// Names end up in log topic names, so they are kept to characters every log accepts.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_BYTES
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for (name, ok) in [
            ("telemetry", true),
            ("plant-1.line_2", true),
            ("", false),
            ("a/b", false),
            ("é", false),
            (&"x".repeat(257), false),
            (&"x".repeat(256), true),
        ] {
            assert_eq!(valid_name(name), ok, "{name}");
        }
    }

    #[test]
    fn body_versions_by_content_type() {
        for (content_type, version) in [
            (Some(CONTENT_TYPE_BATCH), Some(1)),
            (Some(CONTENT_TYPE_BATCH_V2), Some(2)),
            (Some("application/x-protobuf"), Some(1)),
            (
                Some("application/x-protobuf;PROTO=\"edgegw.v2.Batch\""),
                Some(2),
            ),
            (Some("application/x-protobuf; proto=edgegw.v3.Batch"), None),
            (None, None),
        ] {
            assert_eq!(body_version(content_type), version, "{content_type:?}");
        }
        assert!(accepts_v2(ACCEPTED_BODIES));
        assert_eq!(
            BodyVersion::of(Some(CONTENT_TYPE_BATCH_V2)),
            Some(BodyVersion::V2)
        );
        assert_eq!(
            BodyVersion::of(Some("application/x-protobuf")),
            Some(BodyVersion::V1)
        );
        assert_eq!(BodyVersion::of(Some(CONTENT_TYPE_JSON)), None);
        assert!(!accepts_v2(
            "application/x-protobuf; proto=edgegw.v1.Batch, application/json"
        ));
        assert!(!accepts_v2("text/plain; proto=edgegw.v2.Batch"));
    }

    #[test]
    fn a_decoded_record_costs_what_the_spec_says() {
        assert_eq!(
            DECODED_RECORD_BYTES, 1_928,
            "update SPEC.md and the ingest's docs"
        );
        assert_eq!(DECODED_RECORD_BYTES_V2, 2_616, "update SPEC.md");
    }

    #[test]
    fn attribute_names() {
        for (name, ok) in [
            ("device_location", true),
            ("site.1-a", true),
            ("", false),
            ("a b", false),
            ("a:b", false),
            (&"x".repeat(65), false),
            (&"x".repeat(64), true),
            ("device", false),
            ("Device", false),
            ("SEQ", false),
            ("Nats-Msg-Id", false),
            ("nats-expected-stream", false),
            ("x-Nats-Msg-Id", false),
            ("a.nats-b", false),
            ("dead_letter_reason", false),
            ("device_id", true),
            ("hostname", true),
        ] {
            assert_eq!(attribute_name_problem(name).is_none(), ok, "{name}");
        }
    }
}
