//! The agent's config file as written: serde structs whose durations, sizes and counts are
//! typed while the YAML is read ([`config_types`]), with the default of every optional key.
//! A struct whose keys are all optional takes its defaults from its `Default`, one table per
//! section. [`super::validate`] then checks what serde cannot (names, topic filters, rules
//! across keys) and builds the domain types.

use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::path::PathBuf;

use config_types::{ByteRate, Duration, MemorySize, Size, count};
use serde::Deserialize;
use serde::de::IgnoredAny;

use crate::batcher::Order;
use crate::routing::Priority;
use crate::transform::OnError;

/// Default `batch.drain_max_records`: half the ingest's default `max_records_per_batch`.
pub const DRAIN_MAX_RECORDS: usize = 5000;
/// Default `batch.drain_max_bytes`.
pub const DRAIN_MAX_BYTES: usize = 4 << 20;
/// Default `batch.max_records`.
pub const MAX_RECORDS: usize = 1000;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub version: u32,
    pub device_id: String,
    pub ingest: RawIngest,
    pub mqtt: RawMqtt,
    pub buffer: RawBuffer,
    pub streams: Vec<RawStream>,
    #[serde(default = "default_stream_name")]
    pub default_stream: String,
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
    #[serde(default)]
    pub scheduling: RawScheduling,
    #[serde(default)]
    pub sources: Vec<RawSource>,
}

fn default_stream_name() -> String {
    "default".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawIngest {
    pub url: Option<String>,
    pub urls: Option<Vec<String>>,
    pub token_file: Option<PathBuf>,
    pub token_env: Option<String>,
    /// Accepted only to refuse it with a clear message.
    pub token: Option<IgnoredAny>,
    pub request_timeout: Duration,
    pub connect_timeout: Duration,
    pub retry_initial: Duration,
    pub retry_max: Duration,
    pub zstd_level: i32,
    pub max_upload_rate: Option<Size>,
    pub critical_may_exceed_rate: bool,
    pub max_in_flight: NonZeroUsize,
    pub ca_file: Option<PathBuf>,
    pub client_cert_file: Option<PathBuf>,
    pub client_key_file: Option<PathBuf>,
    pub allow_insecure_http: bool,
    pub degraded_after: Duration,
}

impl Default for RawIngest {
    fn default() -> Self {
        RawIngest {
            url: None,
            urls: None,
            token_file: None,
            token_env: None,
            token: None,
            request_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            retry_initial: Duration::from_millis(200),
            retry_max: Duration::from_secs(30),
            zstd_level: 1,
            max_upload_rate: None,
            critical_may_exceed_rate: true,
            max_in_flight: count(4),
            ca_file: None,
            client_cert_file: None,
            client_key_file: None,
            allow_insecure_http: false,
            degraded_after: Duration::from_secs(5 * 60),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawMqtt {
    pub enabled: bool,
    pub listen: Option<SocketAddr>,
    pub listen_v5: Option<SocketAddr>,
    pub max_payload_bytes: MemorySize,
    pub max_connections: NonZeroUsize,
    pub router_segment_bytes: MemorySize,
    pub router_segments: NonZeroUsize,
    pub auth: RawAuth,
    pub acl: Option<Vec<RawRule>>,
    pub tls: Option<RawTls>,
    pub rate_limit: Option<RawRateLimit>,
    pub retained: RawRetained,
}

impl Default for RawMqtt {
    fn default() -> Self {
        RawMqtt {
            enabled: true,
            listen: None,
            listen_v5: None,
            max_payload_bytes: MemorySize::bytes(256 << 10),
            max_connections: count(1000),
            router_segment_bytes: MemorySize::bytes(4 << 20),
            router_segments: count(4),
            auth: RawAuth::default(),
            acl: None,
            tls: None,
            rate_limit: None,
            retained: RawRetained::default(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRateLimit {
    pub messages_per_second: NonZeroU32,
    #[serde(default)]
    pub bytes_per_second: Option<ByteRate>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawRetained {
    pub max_messages: usize,
    pub max_bytes: MemorySize,
}

impl Default for RawRetained {
    fn default() -> Self {
        RawRetained {
            max_messages: 10_000,
            max_bytes: MemorySize::bytes(16 << 20),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    pub listen: SocketAddr,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    #[serde(default)]
    pub client_ca_file: Option<PathBuf>,
    #[serde(default)]
    pub require_client_cert: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawAuth {
    pub allow_anonymous: bool,
    pub users_file: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawRule {
    pub users: Vec<String>,
    pub groups: Vec<String>,
    pub anonymous: bool,
    pub publish: Vec<String>,
    pub subscribe: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBuffer {
    pub path: PathBuf,
    pub quota_bytes: Size,
    /// [`DEFAULT_COMMIT`] when neither is set; a window set alone is waited whole.
    #[serde(default)]
    pub commit_window: Option<Duration>,
    #[serde(default)]
    pub commit_gap: Option<Duration>,
    #[serde(default = "default_queue_records")]
    pub queue_records: NonZeroUsize,
    #[serde(default = "default_queue_bytes")]
    pub queue_bytes: Size,
    #[serde(default)]
    pub reserve_bytes: Option<Size>,
}

/// `buffer.commit_window` and `buffer.commit_gap` when neither is set.
pub const DEFAULT_COMMIT: (Duration, Duration) = (
    Duration(std::time::Duration::from_millis(5)),
    Duration(std::time::Duration::from_micros(150)),
);

fn default_queue_records() -> NonZeroUsize {
    count(20_000)
}

fn default_queue_bytes() -> Size {
    Size::bytes(32 << 20)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStream {
    pub name: String,
    pub topics: Vec<String>,
    pub priority: Priority,
    #[serde(default)]
    pub batch: RawBatch,
    #[serde(default)]
    pub ttl: Option<Duration>,
    #[serde(default)]
    pub order: Order,
    #[serde(default)]
    pub zstd_level: Option<i32>,
    #[serde(default)]
    pub zstd_dictionary: bool,
    #[serde(default)]
    pub transforms: Vec<RawTransform>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawBatch {
    pub max_records: NonZeroUsize,
    pub max_bytes: MemorySize,
    pub linger: Duration,
    pub drain_max_records: NonZeroUsize,
    pub drain_max_bytes: MemorySize,
}

impl Default for RawBatch {
    fn default() -> Self {
        RawBatch {
            max_records: count(MAX_RECORDS),
            max_bytes: MemorySize::bytes(1 << 20),
            linger: Duration::from_millis(200),
            drain_max_records: count(DRAIN_MAX_RECORDS),
            drain_max_bytes: MemorySize::bytes(DRAIN_MAX_BYTES),
        }
    }
}

/// One step of `streams[].transforms`: a map with one key, the step's kind.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawTransform {
    pub enrich: Option<RawEnrich>,
    pub filter: Option<RawFilter>,
    pub deadband: Option<RawDeadband>,
    pub window: Option<RawWindow>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawEnrich {
    pub fields: serde_json::Map<String, serde_json::Value>,
    pub facts: Vec<String>,
    pub topic: Option<String>,
    pub on_error: OnError,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawFilter {
    pub action: String,
    pub topics: Vec<String>,
    #[serde(rename = "where")]
    pub conditions: Vec<RawCondition>,
    pub on_error: OnError,
}

impl Default for RawFilter {
    fn default() -> Self {
        RawFilter {
            action: "keep".into(),
            topics: Vec::new(),
            conditions: Vec::new(),
            on_error: OnError::default(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCondition {
    pub field: String,
    pub op: String,
    #[serde(default)]
    pub value: Option<serde_json::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDeadband {
    pub field: String,
    #[serde(default)]
    pub absolute: Option<f64>,
    #[serde(default)]
    pub relative: Option<f64>,
    #[serde(default)]
    pub heartbeat: Option<Duration>,
    #[serde(default)]
    pub on_error: OnError,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWindow {
    pub every: Duration,
    #[serde(default)]
    pub fields: Vec<String>,
    #[serde(default)]
    pub keep_raw: bool,
    #[serde(default)]
    pub on_error: OnError,
}

/// One `sources` entry: a map with one key, the source's kind.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawSource {
    pub file: Option<RawFileSource>,
    pub mqtt: Option<RawMqttSource>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMqttSource {
    pub url: String,
    pub topics: Vec<String>,
    #[serde(default)]
    pub client_id: Option<String>,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password_file: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFileSource {
    pub path: String,
    pub stream: String,
    #[serde(default)]
    pub topic: Option<String>,
    #[serde(default = "default_max_line_bytes")]
    pub max_line_bytes: MemorySize,
    #[serde(default = "default_start_at")]
    pub start_at: String,
    #[serde(default = "default_file_poll")]
    pub poll: Duration,
}

fn default_max_line_bytes() -> MemorySize {
    MemorySize::bytes(64 << 10)
}

fn default_start_at() -> String {
    "beginning".into()
}

fn default_file_poll() -> Duration {
    Duration::from_millis(250)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawScheduling {
    pub weights: RawWeights,
    pub starvation_bound: Duration,
}

impl Default for RawScheduling {
    fn default() -> Self {
        RawScheduling {
            weights: RawWeights::default(),
            starvation_bound: Duration::from_secs(1),
        }
    }
}

/// Each class's share of the uplink; at least 1, so every class makes progress.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawWeights {
    pub high: NonZeroU32,
    pub normal: NonZeroU32,
    pub bulk: NonZeroU32,
}

impl Default for RawWeights {
    fn default() -> Self {
        RawWeights {
            high: NonZeroU32::new(4).expect("above 0"),
            normal: NonZeroU32::new(2).expect("above 0"),
            bulk: NonZeroU32::MIN,
        }
    }
}
