//! The ingest's config file as written: serde structs whose durations, sizes and counts are
//! typed while the YAML is read ([`config_types`]), with the default of every optional key.
//! [`super::validate`] then checks what serde cannot and builds the domain types.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::path::PathBuf;

use config_types::{ByteRate, Duration, MemorySize, Size, count};
use serde::Deserialize;

use super::TlsFiles;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub version: u32,
    pub listen: SocketAddr,
    #[serde(default = "default_topic_template")]
    pub topic_template: String,
    pub devices: Vec<RawDevice>,
    pub sink: RawSink,
    #[serde(default)]
    pub limits: RawLimits,
    #[serde(default)]
    pub read_api: RawReadApi,
    #[serde(default = "default_clock_skew_threshold")]
    pub clock_skew_threshold: Duration,
    #[serde(default)]
    pub tls: Option<TlsFiles>,
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
}

fn default_topic_template() -> String {
    "iot.{tenant}.{stream}".into()
}

fn default_clock_skew_threshold() -> Duration {
    Duration::from_secs(60)
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawReadApi {
    pub enabled: bool,
    pub token_sha256: Option<String>,
    pub tenant_tokens: Vec<RawTenantToken>,
    pub allow_without_token: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTenantToken {
    pub tenant: String,
    pub token_sha256: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDevice {
    pub id: String,
    pub tenant: String,
    #[serde(default)]
    pub token_sha256: Option<String>,
    #[serde(default)]
    pub records_per_second: Option<NonZeroU32>,
    #[serde(default)]
    pub bytes_per_second: Option<ByteRate>,
}

#[derive(Debug, Deserialize)]
#[serde(
    tag = "type",
    content = "options",
    rename_all = "snake_case",
    deny_unknown_fields
)]
pub enum RawSink {
    Embedded(RawEmbedded),
    Kafka(RawKafka),
    Nats(RawNats),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawEmbedded {
    pub path: PathBuf,
    /// A duration, or "forever" (the default: an upgrade never starts deleting).
    #[serde(default = "default_retention_max_age")]
    pub max_age: String,
    #[serde(default)]
    pub max_bytes_per_topic: Option<Size>,
    #[serde(default = "default_max_topics_per_tenant")]
    pub max_topics_per_tenant: u64,
}

fn default_max_topics_per_tenant() -> u64 {
    1_000
}

fn default_retention_max_age() -> String {
    "forever".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawKafka {
    pub brokers: String,
    #[serde(default = "default_kafka_compression")]
    pub compression: String,
    #[serde(default = "default_kafka_linger")]
    pub linger: Duration,
    #[serde(default = "default_delivery_timeout")]
    pub delivery_timeout: Duration,
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
}

fn default_kafka_compression() -> String {
    "zstd".into()
}

fn default_kafka_linger() -> Duration {
    Duration::from_millis(5)
}

fn default_delivery_timeout() -> Duration {
    Duration::from_secs(10)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawNats {
    pub url: String,
    #[serde(default = "default_nats_stream")]
    pub stream: String,
    #[serde(default)]
    pub subjects: Option<Vec<String>>,
    #[serde(default = "default_true")]
    pub create_stream: bool,
    #[serde(default = "default_duplicate_window")]
    pub duplicate_window: Duration,
    #[serde(default = "default_nats_replicas")]
    pub replicas: NonZeroUsize,
    #[serde(default = "default_delivery_timeout")]
    pub ack_timeout: Duration,
}

fn default_nats_stream() -> String {
    "IOT".into()
}

fn default_true() -> bool {
    true
}

fn default_duplicate_window() -> Duration {
    Duration::from_secs(120)
}

fn default_nats_replicas() -> NonZeroUsize {
    NonZeroUsize::MIN
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawLimits {
    pub max_body_bytes: MemorySize,
    pub max_decompressed_bytes: MemorySize,
    pub max_records_per_batch: NonZeroUsize,
    pub max_concurrent_requests: NonZeroUsize,
    pub header_timeout: Duration,
    pub body_timeout: Duration,
    pub max_decoding_bytes: MemorySize,
    pub device_records_per_second: Option<NonZeroU32>,
    pub device_bytes_per_second: Option<ByteRate>,
}

impl Default for RawLimits {
    fn default() -> Self {
        RawLimits {
            max_body_bytes: MemorySize::bytes(8 << 20),
            max_decompressed_bytes: MemorySize::bytes(64 << 20),
            max_records_per_batch: count(10_000),
            max_concurrent_requests: count(64),
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            max_decoding_bytes: MemorySize::bytes(512 << 20),
            device_records_per_second: None,
            device_bytes_per_second: None,
        }
    }
}
