//! The plain JSON batch (for curl and non-Rust devices) and the JSON acknowledgement.
//!
//! ```json
//! {"device_id": "dev-1", "stream": "telemetry",
//!  "records": [{"seq": 1, "topic": "plant/1/temp", "payload": "21.5"},
//!              {"seq": 2, "topic": "plant/1/raw", "payload_base64": "AP8="}]}
//! ```

use base64::Engine;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::{Attribute, Batch, DecodeError, MAX_ATTRIBUTES, Record};

/// A batch in JSON. `sent_at_ms` defaults to 0 (unknown).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JsonBatch {
    /// Must equal the device the bearer token belongs to.
    pub device_id: String,
    /// Stream name.
    pub stream: String,
    /// Sender's wall-clock time, Unix milliseconds.
    #[serde(default)]
    pub sent_at_ms: i64,
    /// Incarnation of the sender's sequence counters (default 0).
    #[serde(default)]
    pub epoch: u64,
    /// The records.
    #[serde(deserialize_with = "bounded_records")]
    pub records: Vec<JsonRecord>,
}

std::thread_local! {
    /// The record limit [`parse_bounded`] applies while it parses on this thread.
    static MAX_RECORDS: std::cell::Cell<usize> = const { std::cell::Cell::new(usize::MAX) };
}

/// The error message that tells [`parse_bounded`] the limit was passed.
const OVER_LIMIT: &str = "more records than the limit per batch";

/// Parses a JSON batch, stopping at the record past `max_records` (before it is built):
/// [`DecodeError::TooManyRecords`].
pub fn parse_bounded(raw: &[u8], max_records: usize) -> Result<JsonBatch, DecodeError> {
    MAX_RECORDS.with(|m| m.set(max_records));
    let parsed = serde_json::from_slice::<JsonBatch>(raw);
    MAX_RECORDS.with(|m| m.set(usize::MAX));
    parsed.map_err(|e| {
        if e.to_string().starts_with(OVER_LIMIT) {
            DecodeError::TooManyRecords {
                count: max_records.saturating_add(1),
                limit: max_records,
            }
        } else {
            DecodeError::Json(e)
        }
    })
}

fn bounded_records<'de, D>(deserializer: D) -> Result<Vec<JsonRecord>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    struct Bounded(usize);
    impl<'de> serde::de::Visitor<'de> for Bounded {
        type Value = Vec<JsonRecord>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("an array of records")
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> Result<Self::Value, A::Error> {
            let mut records =
                Vec::with_capacity(seq.size_hint().unwrap_or(0).min(self.0).min(4096));
            while let Some(r) = seq.next_element::<JsonRecord>()? {
                if records.len() == self.0 {
                    return Err(serde::de::Error::custom(OVER_LIMIT));
                }
                records.push(r);
            }
            Ok(records)
        }
    }
    deserializer.deserialize_seq(Bounded(MAX_RECORDS.with(|m| m.get())))
}

/// A record in JSON: the payload is given either as UTF-8 text or as base64, exactly one.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JsonRecord {
    /// Sequence number, unique per (device, stream); the idempotency key.
    pub seq: u64,
    /// MQTT-style topic.
    pub topic: String,
    /// Payload as UTF-8 text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<String>,
    /// Payload as standard base64, for binary data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload_base64: Option<String>,
    /// MQTT QoS, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qos: Option<u32>,
    /// When the reading was taken, Unix milliseconds; default 0 (unknown).
    #[serde(default)]
    pub received_at_ms: i64,
    /// The sender's boot id when it was taken; default empty (unknown).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub boot_id: String,
    /// Milliseconds since that boot; default 0.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub monotonic_ms: u64,
    /// Attributes, a JSON object of strings (at most [`MAX_ATTRIBUTES`]; parsing stops past
    /// that), kept in the order given.
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        serialize_with = "attributes_object",
        deserialize_with = "bounded_attributes"
    )]
    pub attributes: Vec<Attribute>,
}

fn attributes_object<S: serde::Serializer>(
    attributes: &[Attribute],
    serializer: S,
) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap;
    let mut map = serializer.serialize_map(Some(attributes.len()))?;
    for a in attributes {
        map.serialize_entry(&a.key, &a.value)?;
    }
    map.end()
}

/// Straight into the list the protobuf form holds (one small entry each), stopping at the
/// entry past [`MAX_ATTRIBUTES`] and at a name given twice (without case).
fn bounded_attributes<'de, D>(deserializer: D) -> Result<Vec<Attribute>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    struct Bounded;
    impl<'de> serde::de::Visitor<'de> for Bounded {
        type Value = Vec<Attribute>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("an object of string attributes")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut map: A,
        ) -> Result<Self::Value, A::Error> {
            let mut out: Vec<Attribute> = Vec::new();
            while let Some((key, value)) = map.next_entry::<String, String>()? {
                if out.len() == MAX_ATTRIBUTES {
                    return Err(serde::de::Error::custom(format!(
                        "more than {MAX_ATTRIBUTES} attributes"
                    )));
                }
                if out.iter().any(|a| a.key.eq_ignore_ascii_case(&key)) {
                    return Err(serde::de::Error::custom("an attribute named twice"));
                }
                out.push(Attribute { key, value });
            }
            Ok(out)
        }
    }
    deserializer.deserialize_map(Bounded)
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

impl JsonBatch {
    /// Converts to the protobuf form, decoding base64 payloads.
    pub fn into_batch(self) -> Result<Batch, DecodeError> {
        let records = self
            .records
            .into_iter()
            .enumerate()
            .map(|(i, r)| {
                let payload = match (r.payload, r.payload_base64) {
                    (Some(text), None) => Bytes::from(text.into_bytes()),
                    (None, Some(b64)) => base64::engine::general_purpose::STANDARD
                        .decode(b64.as_bytes())
                        .map(Bytes::from)
                        .map_err(|e| {
                            DecodeError::Invalid(format!(
                                "records[{i}].payload_base64 is not base64: {e}"
                            ))
                        })?,
                    _ => {
                        return Err(DecodeError::Invalid(format!(
                            "records[{i}] needs exactly one of payload or payload_base64"
                        )));
                    }
                };
                Ok(Record {
                    seq: r.seq,
                    topic: r.topic,
                    payload,
                    qos: r.qos,
                    received_at_ms: r.received_at_ms,
                    boot_id: r.boot_id,
                    monotonic_ms: r.monotonic_ms,
                    attributes: r.attributes,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Batch {
            device_id: self.device_id,
            stream: self.stream,
            sent_at_ms: self.sent_at_ms,
            records,
            epoch: self.epoch,
        })
    }
}

/// The ingest's 2xx answer: how many records were newly appended, how many were duplicates of
/// records the log already had, and how many the log refused for good and the ingest
/// dead-lettered (all are safe to delete at the sender).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchAck {
    /// Records appended to the log by this request.
    pub accepted: u64,
    /// Records the log already had (a retry); not appended again.
    pub duplicates: u64,
    /// Poison records (the log refuses them for good, e.g. too large): each is replaced by a
    /// dead letter in the tenant's `_dead_letters` stream. Absent when 0.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub dead_lettered: u64,
}

#[cfg(test)]
mod tests {
    use crate::{CONTENT_TYPE_JSON, Limits, decode_body};

    #[test]
    fn json_text_and_base64() {
        let body = br#"{"device_id":"d","stream":"s","records":[
            {"seq":1,"topic":"t","payload":"21.5"},
            {"seq":2,"topic":"t","payload_base64":"AP8="}]}"#;
        let limits = Limits {
            max_decompressed_bytes: 1 << 20,
            max_records: 10,
        };
        let b = decode_body(body, Some(CONTENT_TYPE_JSON), None, limits).expect("valid");
        assert_eq!(b.records[0].payload.as_ref(), b"21.5");
        assert_eq!(b.records[1].payload.as_ref(), b"\x00\xff");
        assert_eq!(b.records[1].qos, None);

        let both = br#"{"device_id":"d","stream":"s","records":[{"seq":1,"topic":"t","payload":"a","payload_base64":"AP8="}]}"#;
        let err = decode_body(both, Some(CONTENT_TYPE_JSON), None, limits).unwrap_err();
        assert!(err.to_string().contains("exactly one"), "{err}");
    }
    #[test]
    fn json_attributes_are_bounded_named_once_and_not_reserved() {
        let limits = Limits {
            max_decompressed_bytes: 1 << 20,
            max_records: 10,
        };
        let with = |attributes: &str| {
            format!(
                r#"{{"device_id":"d","stream":"s","records":[{{"seq":1,"topic":"t","payload":"x","attributes":{attributes}}}]}}"#
            )
        };
        let b = decode_body(
            with(r#"{"site":"a","device_location":"floor 1"}"#).as_bytes(),
            Some(CONTENT_TYPE_JSON),
            None,
            limits,
        )
        .expect("valid");
        assert_eq!(b.records[0].attributes.len(), 2);
        assert_eq!(b.records[0].attributes[1].key, "device_location");
        assert_eq!(b.records[0].attributes[1].value, "floor 1");
        let many = (0..17)
            .map(|i| format!(r#""a{i}":"""#))
            .collect::<Vec<_>>()
            .join(",");
        for (attributes, why) in [
            (format!("{{{many}}}"), "more than 16 attributes"),
            (r#"{"a":"1","a":"2"}"#.to_owned(), "named twice"),
            (r#"{"a":"1","A":"2"}"#.to_owned(), "named twice"),
            (r#"{"seq":"1"}"#.to_owned(), "metadata"),
            (r#"{"a b":"1"}"#.to_owned(), "[A-Za-z0-9_.-]"),
            (r#"{"a":1}"#.to_owned(), "invalid type"),
        ] {
            let err = decode_body(
                with(&attributes).as_bytes(),
                Some(CONTENT_TYPE_JSON),
                None,
                limits,
            )
            .unwrap_err();
            assert!(err.to_string().contains(why), "{attributes}: {err}");
        }
    }
}
