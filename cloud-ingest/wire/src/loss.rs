//! Loss reports: how a sender accounts for records it had to drop.
//!
//! A loss report travels as an ordinary record of the reserved stream [`LOSS_STREAM`], with the
//! report as JSON payload; so it is buffered, retried and deduplicated like data, and lands in
//! the log topic of that stream (`iot.{tenant}._losses` by default). Summing `count` over a
//! device's reports gives exactly what it dropped.

use serde::{Deserialize, Serialize};

/// The reserved stream carrying loss reports. Names starting with `_` are reserved.
pub const LOSS_STREAM: &str = "_losses";

/// Why records were dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossReason {
    /// The buffer reached its byte quota: the lowest priority, oldest records were evicted.
    Quota,
    /// Records outlived their stream's TTL before they could be delivered.
    Ttl,
    /// The embedded broker skipped records because the buffer writer lagged behind it.
    BrokerOverflow,
    /// The buffer's disk was full: records were evicted to make room.
    DiskFull,
    /// The buffer file was damaged (a torn write, a bad flash page): these records could not
    /// be read back intact, so they are not sent.
    CorruptBuffer,
}

impl LossReason {
    /// The name used in payloads, topics and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            LossReason::Quota => "quota",
            LossReason::Ttl => "ttl",
            LossReason::BrokerOverflow => "broker_overflow",
            LossReason::DiskFull => "disk_full",
            LossReason::CorruptBuffer => "corrupt_buffer",
        }
    }
}

/// One loss report (the JSON payload of a [`LOSS_STREAM`] record).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LossReport {
    /// Stream of the dropped records; absent when unknown (broker overflow: they never arrived).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<String>,
    /// Lowest sequence dropped, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_seq: Option<u64>,
    /// Highest sequence dropped, when known. Sequences between first and last that are not
    /// dropped were delivered before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seq: Option<u64>,
    /// Records dropped: exact.
    pub count: u64,
    /// Why.
    pub reason: LossReason,
    /// Sender wall-clock time of the drop, Unix milliseconds.
    pub detected_at_ms: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_shape() {
        let r = LossReport {
            stream: Some("logs".into()),
            first_seq: Some(1),
            last_seq: Some(512),
            count: 512,
            reason: LossReason::Quota,
            detected_at_ms: 7,
        };
        let text = serde_json::to_string(&r).expect("json");
        assert_eq!(
            text,
            r#"{"stream":"logs","first_seq":1,"last_seq":512,"count":512,"reason":"quota","detected_at_ms":7}"#
        );
        assert_eq!(serde_json::from_str::<LossReport>(&text).expect("parse"), r);
        let overflow = r#"{"count":3,"reason":"broker_overflow","detected_at_ms":1}"#;
        assert_eq!(
            serde_json::from_str::<LossReport>(overflow)
                .expect("parse")
                .stream,
            None
        );
    }
}
