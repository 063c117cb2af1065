//! The protobuf messages of `batch.proto`, written as prost structs (no build script, no protoc).
//! Field tags here and in `batch.proto` must agree; `tests::tags_match_proto` checks it.

use bytes::Bytes;

/// One batch: records of one stream of one device.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Batch {
    /// Must equal the device the bearer token belongs to.
    #[prost(string, tag = "1")]
    pub device_id: String,
    /// Stream name (see [`crate::valid_name`]).
    #[prost(string, tag = "2")]
    pub stream: String,
    /// Agent wall-clock time when the batch was sent, Unix milliseconds.
    #[prost(int64, tag = "3")]
    pub sent_at_ms: i64,
    /// The records, at least one.
    #[prost(message, repeated, tag = "4")]
    pub records: Vec<Record>,
    /// Incarnation of the sender's sequence counters (part of the idempotency key).
    #[prost(uint64, tag = "5")]
    pub epoch: u64,
}

/// One sensor message.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Record {
    /// Sequence number: the idempotency key with device, stream and epoch.
    #[prost(uint64, tag = "1")]
    pub seq: u64,
    /// MQTT topic it was published on.
    #[prost(string, tag = "2")]
    pub topic: String,
    /// Exact payload bytes.
    #[prost(bytes = "bytes", tag = "3")]
    pub payload: Bytes,
    /// MQTT QoS it was published with, when the sender knows it.
    #[prost(uint32, optional, tag = "4")]
    pub qos: Option<u32>,
    /// Agent wall-clock time when the broker received it, Unix milliseconds.
    #[prost(int64, tag = "5")]
    pub received_at_ms: i64,
    /// The agent host's boot id when it was received; empty if unknown.
    #[prost(string, tag = "6")]
    pub boot_id: String,
    /// Milliseconds since that boot when it was received.
    #[prost(uint64, tag = "7")]
    pub monotonic_ms: u64,
    /// Attributes the sender attached (see [`crate::attribute_name_problem`]); the proto's
    /// `map<string, string> attributes = 8`, whose entries are exactly [`Attribute`] on the
    /// wire. Kept as a list so that decoding costs one small entry per attribute, and a name
    /// given twice is seen (and refused) rather than silently merged.
    #[prost(message, repeated, tag = "8")]
    pub attributes: Vec<Attribute>,
}

/// One entry of [`Record::attributes`].
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, prost::Message)]
pub struct Attribute {
    /// The name: the header's name in Kafka and NATS.
    #[prost(string, tag = "1")]
    pub key: String,
    /// The value, UTF-8.
    #[prost(string, tag = "2")]
    pub value: String,
}

#[cfg(test)]
mod tests {
    const PROTO: &str = include_str!("batch.proto");

    /// Every `name = tag;` line of the .proto matches the prost attributes above.
    #[test]
    fn tags_match_proto() {
        let src = include_str!("batch.rs");
        for (field, tag) in [
            ("device_id", 1),
            ("stream", 2),
            ("sent_at_ms", 3),
            ("records", 4),
            ("epoch", 5),
            ("seq", 1),
            ("topic", 2),
            ("payload", 3),
            ("qos", 4),
            ("received_at_ms", 5),
            ("boot_id", 6),
            ("monotonic_ms", 7),
            ("attributes", 8),
        ] {
            assert!(
                PROTO.contains(&format!(" {field} = {tag};")),
                "{field} in proto"
            );
            let attr = src
                .split(&format!("pub {field}:"))
                .next()
                .and_then(|before| before.rsplit("#[prost(").next())
                .expect("field present");
            assert!(
                attr.contains(&format!("tag = \"{tag}\"")),
                "{field} in rust"
            );
        }
    }
}
