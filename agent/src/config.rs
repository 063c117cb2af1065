//! The device's YAML config: parse (raw serde structs), then a pure `validate` into domain
//! types, then `resolve_token` (the only I/O). Every error names the file, the key path and
//! the reason, e.g. `config/agent.yaml: streams[2].priority: unknown variant "urgent" …`.

use crate::source::file::FileSourceConfig;
use crate::source::mqtt::MqttSourceConfig;
use crate::transform::{
    Condition, Deadband, Enrich, FieldPath, Filter, OnError, Op, Spec, Step, TopicPattern, Window,
};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::batcher::{Order, SchedulePolicy};
use crate::routing::{Priority, TopicFilter};

/// A config that cannot be used. The agent exits with this message before it starts.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {key}: {reason}")]
pub struct ConfigError {
    /// The config file.
    pub file: PathBuf,
    /// Key path, e.g. `streams[1].priority`.
    pub key: String,
    /// What is wrong and what to do.
    pub reason: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    version: u32,
    device_id: String,
    ingest: RawIngest,
    mqtt: RawMqtt,
    buffer: RawBuffer,
    streams: Vec<RawStream>,
    #[serde(default = "default_stream_name")]
    default_stream: String,
    #[serde(default)]
    metrics_listen: Option<SocketAddr>,
    #[serde(default)]
    scheduling: RawScheduling,
    #[serde(default)]
    sources: Vec<RawSource>,
}

/// One `sources` entry: a map with one key, the source's kind.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSource {
    #[serde(default)]
    file: Option<RawFileSource>,
    #[serde(default)]
    mqtt: Option<RawMqttSource>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMqttSource {
    url: String,
    topics: Vec<String>,
    #[serde(default)]
    client_id: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password_file: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFileSource {
    path: String,
    stream: String,
    #[serde(default)]
    topic: Option<String>,
    #[serde(default = "default_max_line_bytes")]
    max_line_bytes: String,
    #[serde(default = "default_start_at")]
    start_at: String,
    #[serde(default = "default_file_poll")]
    poll: String,
}

fn default_max_line_bytes() -> String {
    "64KiB".into()
}
fn default_start_at() -> String {
    "beginning".into()
}
fn default_file_poll() -> String {
    "250ms".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawScheduling {
    #[serde(default)]
    weights: RawWeights,
    #[serde(default = "default_starvation_bound")]
    starvation_bound: String,
}

impl Default for RawScheduling {
    fn default() -> Self {
        RawScheduling {
            weights: RawWeights::default(),
            starvation_bound: default_starvation_bound(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWeights {
    #[serde(default = "default_weight_high")]
    high: u32,
    #[serde(default = "default_weight_normal")]
    normal: u32,
    #[serde(default = "default_weight_bulk")]
    bulk: u32,
}

impl Default for RawWeights {
    fn default() -> Self {
        RawWeights {
            high: default_weight_high(),
            normal: default_weight_normal(),
            bulk: default_weight_bulk(),
        }
    }
}

fn default_starvation_bound() -> String {
    "1s".into()
}
fn default_weight_high() -> u32 {
    4
}
fn default_weight_normal() -> u32 {
    2
}
fn default_weight_bulk() -> u32 {
    1
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIngest {
    #[serde(default)]
    url: Option<String>,
    #[serde(default)]
    urls: Option<Vec<String>>,
    #[serde(default)]
    token_file: Option<PathBuf>,
    #[serde(default)]
    token_env: Option<String>,
    /// Accepted only to refuse it with a clear message.
    #[serde(default)]
    token: Option<serde_yaml::Value>,
    #[serde(default = "default_request_timeout")]
    request_timeout: String,
    #[serde(default = "default_connect_timeout")]
    connect_timeout: String,
    #[serde(default = "default_retry_initial")]
    retry_initial: String,
    #[serde(default = "default_retry_max")]
    retry_max: String,
    #[serde(default = "default_zstd_level")]
    zstd_level: i32,
    #[serde(default)]
    max_upload_rate: Option<String>,
    #[serde(default = "default_true")]
    critical_may_exceed_rate: bool,
    #[serde(default = "default_max_in_flight")]
    max_in_flight: usize,
    #[serde(default)]
    ca_file: Option<PathBuf>,
    #[serde(default)]
    client_cert_file: Option<PathBuf>,
    #[serde(default)]
    client_key_file: Option<PathBuf>,
    #[serde(default)]
    allow_insecure_http: bool,
    #[serde(default = "default_degraded_after")]
    degraded_after: String,
}

fn default_max_in_flight() -> usize {
    4
}

fn default_true() -> bool {
    true
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMqtt {
    #[serde(default = "default_true")]
    enabled: bool,
    #[serde(default)]
    listen: Option<SocketAddr>,
    #[serde(default)]
    listen_v5: Option<SocketAddr>,
    #[serde(default = "default_max_payload")]
    max_payload_bytes: String,
    #[serde(default = "default_max_connections")]
    max_connections: usize,
    #[serde(default = "default_segment_bytes")]
    router_segment_bytes: String,
    #[serde(default = "default_segments")]
    router_segments: usize,
    #[serde(default)]
    auth: RawAuth,
    #[serde(default)]
    acl: Option<Vec<RawRule>>,
    #[serde(default)]
    tls: Option<RawTls>,
    #[serde(default)]
    rate_limit: Option<RawRateLimit>,
    #[serde(default)]
    retained: RawRetained,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRateLimit {
    messages_per_second: u32,
    #[serde(default)]
    bytes_per_second: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRetained {
    #[serde(default = "default_retained_messages")]
    max_messages: usize,
    #[serde(default = "default_retained_bytes")]
    max_bytes: String,
}

impl Default for RawRetained {
    fn default() -> Self {
        RawRetained {
            max_messages: default_retained_messages(),
            max_bytes: default_retained_bytes(),
        }
    }
}

fn default_retained_messages() -> usize {
    10_000
}

fn default_retained_bytes() -> String {
    "16MiB".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    listen: SocketAddr,
    cert_file: PathBuf,
    key_file: PathBuf,
    #[serde(default)]
    client_ca_file: Option<PathBuf>,
    #[serde(default)]
    require_client_cert: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAuth {
    #[serde(default)]
    allow_anonymous: bool,
    #[serde(default)]
    users_file: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    #[serde(default)]
    users: Vec<String>,
    #[serde(default)]
    groups: Vec<String>,
    #[serde(default)]
    anonymous: bool,
    #[serde(default)]
    publish: Vec<String>,
    #[serde(default)]
    subscribe: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBuffer {
    path: PathBuf,
    quota_bytes: String,
    #[serde(default = "default_commit_window")]
    commit_window: String,
    #[serde(default = "default_queue_records")]
    queue_records: usize,
    #[serde(default = "default_queue_bytes")]
    queue_bytes: String,
    #[serde(default)]
    reserve_bytes: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStream {
    name: String,
    topics: Vec<String>,
    priority: Priority,
    #[serde(default)]
    batch: RawBatch,
    #[serde(default)]
    ttl: Option<String>,
    #[serde(default)]
    order: Order,
    #[serde(default)]
    zstd_level: Option<i32>,
    #[serde(default)]
    zstd_dictionary: bool,
    #[serde(default)]
    transforms: Vec<RawTransform>,
}

/// One step of `streams[].transforms`: a map with one key, the step's kind.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTransform {
    #[serde(default)]
    enrich: Option<RawEnrich>,
    #[serde(default)]
    filter: Option<RawFilter>,
    #[serde(default)]
    deadband: Option<RawDeadband>,
    #[serde(default)]
    window: Option<RawWindow>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEnrich {
    #[serde(default)]
    fields: serde_json::Map<String, serde_json::Value>,
    #[serde(default)]
    facts: Vec<String>,
    #[serde(default)]
    topic: Option<String>,
    #[serde(default)]
    on_error: OnError,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFilter {
    #[serde(default = "default_filter_action")]
    action: String,
    #[serde(default)]
    topics: Vec<String>,
    #[serde(default, rename = "where")]
    conditions: Vec<RawCondition>,
    #[serde(default)]
    on_error: OnError,
}

fn default_filter_action() -> String {
    "keep".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCondition {
    field: String,
    op: String,
    #[serde(default)]
    value: Option<serde_json::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDeadband {
    field: String,
    #[serde(default)]
    absolute: Option<f64>,
    #[serde(default)]
    relative: Option<f64>,
    #[serde(default)]
    heartbeat: Option<String>,
    #[serde(default)]
    on_error: OnError,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWindow {
    every: String,
    #[serde(default)]
    fields: Vec<String>,
    #[serde(default)]
    keep_raw: bool,
    #[serde(default)]
    on_error: OnError,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBatch {
    #[serde(default = "default_max_records")]
    max_records: usize,
    #[serde(default = "default_max_bytes")]
    max_bytes: String,
    #[serde(default = "default_linger")]
    linger: String,
    #[serde(default = "default_drain_max_records")]
    drain_max_records: usize,
    #[serde(default = "default_drain_max_bytes")]
    drain_max_bytes: String,
}

impl Default for RawBatch {
    fn default() -> Self {
        RawBatch {
            max_records: default_max_records(),
            max_bytes: default_max_bytes(),
            linger: default_linger(),
            drain_max_records: default_drain_max_records(),
            drain_max_bytes: default_drain_max_bytes(),
        }
    }
}

fn default_stream_name() -> String {
    "default".into()
}
fn default_request_timeout() -> String {
    "30s".into()
}
fn default_connect_timeout() -> String {
    "5s".into()
}
fn default_retry_initial() -> String {
    "200ms".into()
}
fn default_retry_max() -> String {
    "30s".into()
}
fn default_zstd_level() -> i32 {
    1
}
fn default_degraded_after() -> String {
    "5m".into()
}

fn default_max_payload() -> String {
    "256KiB".into()
}
fn default_max_connections() -> usize {
    1000
}
fn default_segment_bytes() -> String {
    "4MiB".into()
}
fn default_segments() -> usize {
    4
}
fn default_commit_window() -> String {
    "0ms".into()
}
fn default_queue_records() -> usize {
    20_000
}
fn default_queue_bytes() -> String {
    "32MiB".into()
}
fn default_max_records() -> usize {
    1000
}
fn default_max_bytes() -> String {
    "1MiB".into()
}
fn default_linger() -> String {
    "200ms".into()
}
fn default_drain_max_records() -> usize {
    DRAIN_MAX_RECORDS
}
fn default_drain_max_bytes() -> String {
    "4MiB".into()
}

/// Default `batch.drain_max_records`: half the ingest's default `max_records_per_batch`.
pub const DRAIN_MAX_RECORDS: usize = 5000;
/// Default `batch.drain_max_bytes`.
pub const DRAIN_MAX_BYTES: usize = 4 << 20;

/// A validated agent config.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// This device's id; the key of its records in the log.
    pub device_id: String,
    /// How to reach the cloud ingest.
    pub ingest: IngestConfig,
    /// The embedded MQTT broker.
    pub mqtt: MqttConfig,
    /// The durable buffer.
    pub buffer: BufferConfig,
    /// Streams in config order; the first whose filter matches a topic takes the record.
    /// Then the default stream (when it was not configured), then the loss-report stream.
    pub streams: Vec<StreamConfig>,
    /// Index in `streams` of the stream unmatched topics go to.
    pub default_stream: usize,
    /// Where `/metrics`, `/healthz` and `/readyz` are served, if anywhere.
    pub metrics_listen: Option<SocketAddr>,
    /// How the priority classes share the uplink.
    pub schedule: SchedulePolicy,
    /// Files tailed into streams ([`crate::source::file`]).
    pub sources: Vec<FileSourceConfig>,
    /// Upstream brokers subscribed to ([`crate::source::mqtt`]).
    pub mqtt_sources: Vec<MqttSourceConfig>,
}

/// Where the token comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    /// A file holding the token (trailing whitespace ignored).
    File(PathBuf),
    /// An environment variable holding the token.
    Env(String),
    /// No token: the agent logs in with its client certificate only (mTLS; the ingest
    /// registers the device without a token).
    CertificateOnly,
}

/// The uplink to the ingest.
#[derive(Debug, Clone)]
pub struct IngestConfig {
    /// Base URLs of the ingest replicas, e.g. `https://ingest.example.com`, in order of
    /// preference. The agent sticks to one while it answers and fails over to the next.
    pub urls: Vec<reqwest::Url>,
    /// Where the bearer token is read from at start-up.
    pub token: TokenSource,
    /// Whole-request timeout: a stuck ingest is given up on after this.
    pub request_timeout: Duration,
    /// TCP/TLS connect timeout.
    pub connect_timeout: Duration,
    /// First retry delay after a failure.
    pub retry_initial: Duration,
    /// Longest retry delay.
    pub retry_max: Duration,
    /// zstd level of batch bodies.
    pub zstd_level: i32,
    /// Cap on request body bytes per second (a metered link), if any.
    pub max_upload_rate: Option<u64>,
    /// Whether critical batches go at once under the cap (their bytes are paid back after).
    pub critical_may_exceed_rate: bool,
    /// Requests in flight at once, across streams (one per stream; one slot kept for critical).
    pub max_in_flight: usize,
    /// Records waiting longer than this with the link up and nothing delivered for as long:
    /// the agent reports itself degraded (`agent_degraded`, `status`).
    pub degraded_after: Duration,
    /// PEM certificates trusted beside the OS store (a private CA).
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate and key presented to the ingest (mTLS), if any.
    pub client_identity: Option<(PathBuf, PathBuf)>,
}

/// Per-client publish rate at the front door: a QoS 1/2 publisher over it is slowed (its
/// packets are read, and so acknowledged, later), QoS 0 publishes over it are shed and counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    /// Publishes per second, per connection (a second's worth may come at once).
    pub messages_per_second: std::num::NonZeroU32,
    /// Payload bytes per second, per connection, if limited.
    pub bytes_per_second: Option<std::num::NonZeroU32>,
}

/// How much the embedded broker may retain for local subscribers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetainedLimits {
    /// Most retained topics.
    pub max_messages: usize,
    /// Most retained payload bytes (topics included).
    pub max_bytes: usize,
}

/// The embedded broker.
#[derive(Debug, Clone)]
pub struct MqttConfig {
    /// Whether the front door and the embedded broker run; off, the agent takes records from
    /// its `sources` alone and listens on no MQTT address.
    pub enabled: bool,
    /// MQTT 3.1.1 listener.
    pub listen: SocketAddr,
    /// MQTT 5 listener, if any.
    pub listen_v5: Option<SocketAddr>,
    /// Largest publish payload; larger ones are refused by disconnecting the client.
    pub max_payload_bytes: usize,
    /// Most concurrent MQTT connections.
    pub max_connections: usize,
    /// Size of one in-memory segment of rumqttd's router log.
    pub router_segment_bytes: usize,
    /// Segments kept per filter: how far a local subscriber may lag before it misses copies.
    pub router_segments: usize,
    /// Per-client publish rate, if limited.
    pub rate_limit: Option<RateLimit>,
    /// Bounds on retained messages.
    pub retained: RetainedLimits,
    /// Who may connect.
    pub auth: AuthConfig,
    /// What each client may publish and subscribe to; `None`: everything.
    pub acl: Option<Vec<crate::access::Rule>>,
    /// An MQTT over TLS listener, if any.
    pub tls: Option<TlsConfig>,
}

/// The MQTT over TLS listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    /// Where it listens.
    pub listen: SocketAddr,
    /// PEM certificate chain, the server's first.
    pub cert_file: PathBuf,
    /// PEM private key.
    pub key_file: PathBuf,
    /// PEM certificates of the CAs that sign sensors' client certificates (mTLS): a client
    /// presenting one it signed connects as the user its certificate's Common Name names.
    pub client_ca_file: Option<PathBuf>,
    /// Only clients with such a certificate may connect (else a client without one may still
    /// log in with a user name and password).
    pub require_client_cert: bool,
}

/// Who may connect to the front door.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthConfig {
    /// Clients without a user name may connect.
    pub allow_anonymous: bool,
    /// `name:hash[:groups]` lines (`edge-agent hash-password` makes the hash).
    pub users_file: Option<PathBuf>,
}

/// The durable buffer.
#[derive(Debug, Clone)]
pub struct BufferConfig {
    /// SQLite file.
    pub path: PathBuf,
    /// Most bytes of records kept; past it the lowest-priority, oldest records are evicted.
    pub quota_bytes: u64,
    /// Longest the writer waits for more records after the first of a group (0: it commits as
    /// soon as the previous commit ended, with whatever arrived meanwhile).
    pub commit_window: Duration,
    /// Records queued in memory between the broker and the buffer writer.
    pub queue_records: usize,
    /// And bytes of them (topic, payload and overhead).
    pub queue_bytes: u64,
    /// Size of the reserve file kept beside the buffer for a full disk; `None`: sized from the
    /// volume at start ([`crate::buffer::space::auto_reserve`]).
    pub reserve_bytes: Option<u64>,
}

/// One stream.
#[derive(Debug, Clone)]
pub struct StreamConfig {
    /// Name, also in log topic names.
    pub name: String,
    /// MQTT topic filters selecting its records.
    pub topics: Vec<TopicFilter>,
    /// Priority class.
    pub priority: Priority,
    /// When a batch is sent.
    pub batch: BatchTriggers,
    /// Records older than this are dropped (and reported) if still undelivered.
    pub ttl: Option<Duration>,
    /// Oldest first (FIFO) or newest first.
    pub order: Order,
    /// zstd level of this stream's batches.
    pub zstd_level: i32,
    /// Whether its batches use a zstd dictionary trained on its records.
    pub zstd_dictionary: bool,
    /// What is done to its records before they are buffered, in order ([`crate::transform`]).
    pub transforms: Vec<Step>,
}

/// A batch is sent when any trigger fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchTriggers {
    /// This many records are waiting.
    pub max_records: usize,
    /// This many bytes are waiting (a batch never exceeds it unless one record does).
    pub max_bytes: usize,
    /// The oldest waiting record is this old.
    pub linger: Duration,
    /// Records per batch while a backlog drains (batches grow with the backlog up to it).
    pub drain_max_records: usize,
    /// Bytes per batch while a backlog drains.
    pub drain_max_bytes: usize,
}

impl BatchTriggers {
    /// Triggers of streams the agent makes itself (orphans, the default and loss streams).
    pub fn internal(linger: Duration) -> BatchTriggers {
        BatchTriggers {
            max_records: default_max_records(),
            max_bytes: 1 << 20,
            linger,
            drain_max_records: DRAIN_MAX_RECORDS,
            drain_max_bytes: DRAIN_MAX_BYTES,
        }
    }
}

impl AgentConfig {
    /// Reads and validates `file` (no other I/O).
    pub fn load(file: &Path) -> Result<AgentConfig, ConfigError> {
        let text = std::fs::read_to_string(file).map_err(|e| ConfigError {
            file: file.to_owned(),
            key: "(file)".into(),
            reason: format!("cannot read: {e}"),
        })?;
        Self::parse(file, &text)
    }

    /// Parses and validates `text`; `file` is used in messages only.
    pub fn parse(file: &Path, text: &str) -> Result<AgentConfig, ConfigError> {
        let raw: RawConfig = serde_path_to_error::deserialize(serde_yaml::Deserializer::from_str(
            text,
        ))
        .map_err(|e| ConfigError {
            file: file.to_owned(),
            key: match e.path().to_string() {
                p if p == "." => "(top level)".into(),
                p => p,
            },
            reason: yaml_reason(&e.path().to_string(), e.into_inner().to_string()),
        })?;
        validate(raw).map_err(|(key, reason)| ConfigError {
            file: file.to_owned(),
            key,
            reason,
        })
    }
}

/// Reads the ingest token from its file or environment variable (start-up I/O); empty when
/// the agent logs in with its certificate only.
pub fn resolve_token(file: &Path, source: &TokenSource) -> Result<String, ConfigError> {
    let err = |key: &str, reason: String| ConfigError {
        file: file.to_owned(),
        key: key.into(),
        reason,
    };
    let token = match source {
        TokenSource::CertificateOnly => return Ok(String::new()),
        TokenSource::File(path) => std::fs::read_to_string(path).map_err(|e| {
            err(
                "ingest.token_file",
                format!("cannot read token file {}: {e}", path.display()),
            )
        })?,
        TokenSource::Env(var) => std::env::var(var).map_err(|_| {
            err(
                "ingest.token_env",
                format!("environment variable {var} is not set"),
            )
        })?,
    };
    let token = token.trim().to_owned();
    if token.is_empty() {
        let key = match source {
            TokenSource::File(_) => "ingest.token_file",
            _ => "ingest.token_env",
        };
        return Err(err(key, "the token is empty".into()));
    }
    if token.bytes().any(|b| !(0x21..=0x7e).contains(&b)) {
        let key = match source {
            TokenSource::File(_) => "ingest.token_file",
            _ => "ingest.token_env",
        };
        return Err(err(
            key,
            "the token holds a space or a character an HTTP header cannot carry".into(),
        ));
    }
    Ok(token)
}

/// Checks that the buffer's volume can hold the reserve, the WAL's room and the quota
/// ([`crate::buffer::space::check`]), and picks the reserve when the config leaves it open
/// (start-up I/O: the volume is asked). Returns the reserve in bytes.
pub fn check_buffer_volume(file: &Path, config: &AgentConfig) -> Result<u64, ConfigError> {
    use crate::buffer::space;
    let err = |key: &str, reason: String| ConfigError {
        file: file.to_owned(),
        key: key.into(),
        reason,
    };
    let path = &config.buffer.path;
    let volume = space::Volume::of(path).map_err(|e| {
        err(
            "buffer.path",
            format!("cannot read the free space of {}: {e}", path.display()),
        )
    })?;
    let max_record = config.mqtt.max_payload_bytes as u64;
    let reserve = config
        .buffer
        .reserve_bytes
        .unwrap_or_else(|| space::auto_reserve(volume.total, max_record));
    space::check(
        volume,
        space::Usage::of(path),
        reserve,
        config.buffer.quota_bytes,
        max_record,
    )
    .map_err(|(key, reason)| err(key, format!("{}: {reason}", path.display())))?;
    Ok(reserve)
}

/// serde_yaml puts its own path before its message ("buffer: unknown field …"); the key path
/// comes from serde_path_to_error instead, so drop the repeat.
fn yaml_reason(path: &str, message: String) -> String {
    match message.split_once(": ") {
        Some((prefix, rest)) if path.starts_with(prefix) => rest.to_owned(),
        _ => message,
    }
}

type Invalid = (String, String);

fn duration(key: &str, text: &str) -> Result<Duration, Invalid> {
    humantime::parse_duration(text).map_err(|e| {
        (
            key.into(),
            format!("{text:?} is not a duration like \"10ms\" or \"30s\": {e}"),
        )
    })
}

fn size(key: &str, text: &str) -> Result<u64, Invalid> {
    text.parse::<bytesize::ByteSize>()
        .map(|b| b.as_u64())
        .map_err(|e| {
            (
                key.into(),
                format!("{text:?} is not a size like \"64MiB\": {e}"),
            )
        })
        .and_then(|b| {
            if b == 0 {
                Err((key.into(), "must be above 0".into()))
            } else {
                Ok(b)
            }
        })
}

fn usize_size(key: &str, text: &str) -> Result<usize, Invalid> {
    size(key, text).and_then(|b| usize::try_from(b).map_err(|_| (key.into(), "too large".into())))
}

fn positive(key: &str, n: usize) -> Result<usize, Invalid> {
    if n == 0 {
        Err((key.into(), "must be above 0".into()))
    } else {
        Ok(n)
    }
}

/// Pure: raw config to domain types, or (key path, reason).
fn validate(raw: RawConfig) -> Result<AgentConfig, Invalid> {
    if raw.version != 1 {
        return Err((
            "version".into(),
            format!("unsupported version {} (expected 1)", raw.version),
        ));
    }
    if !ingest_wire::valid_name(&raw.device_id) {
        return Err((
            "device_id".into(),
            "must be 1-256 characters of [A-Za-z0-9_.-]".into(),
        ));
    }
    let ingest = validate_ingest(raw.ingest)?;
    let listen = match (raw.mqtt.enabled, raw.mqtt.listen) {
        (_, Some(listen)) => listen,
        // Never bound: nothing listens while the embedded broker is off.
        (false, None) => SocketAddr::from(([127, 0, 0, 1], 0)),
        (true, None) => {
            return Err((
                "mqtt.listen".into(),
                "missing: the address sensors publish to (e.g. 0.0.0.0:1883), or mqtt.enabled: false to run on sources alone".into(),
            ));
        }
    };
    let mut mqtt = MqttConfig {
        enabled: raw.mqtt.enabled,
        listen,
        listen_v5: raw.mqtt.listen_v5,
        max_payload_bytes: usize_size("mqtt.max_payload_bytes", &raw.mqtt.max_payload_bytes)?,
        max_connections: positive("mqtt.max_connections", raw.mqtt.max_connections)?,
        router_segment_bytes: usize_size(
            "mqtt.router_segment_bytes",
            &raw.mqtt.router_segment_bytes,
        )?,
        router_segments: positive("mqtt.router_segments", raw.mqtt.router_segments)?,
        rate_limit: raw
            .mqtt
            .rate_limit
            .map(|r| -> Result<RateLimit, Invalid> {
                let nonzero = |key: &str, n: u64| {
                    u32::try_from(n)
                        .ok()
                        .and_then(std::num::NonZeroU32::new)
                        .ok_or_else(|| (key.to_owned(), "must be 1 to 4294967295".to_owned()))
                };
                Ok(RateLimit {
                    messages_per_second: nonzero(
                        "mqtt.rate_limit.messages_per_second",
                        u64::from(r.messages_per_second),
                    )?,
                    bytes_per_second: r
                        .bytes_per_second
                        .map(|b| {
                            let key = "mqtt.rate_limit.bytes_per_second";
                            nonzero(key, size(key, &b)?)
                        })
                        .transpose()?,
                })
            })
            .transpose()?,
        retained: RetainedLimits {
            max_messages: raw.mqtt.retained.max_messages,
            max_bytes: usize_size("mqtt.retained.max_bytes", &raw.mqtt.retained.max_bytes)?,
        },
        auth: AuthConfig {
            allow_anonymous: raw.mqtt.auth.allow_anonymous,
            users_file: raw.mqtt.auth.users_file,
        },
        acl: raw.mqtt.acl.map(validate_acl).transpose()?,
        tls: raw
            .mqtt
            .tls
            .map(|t| {
                if t.require_client_cert && t.client_ca_file.is_none() {
                    return Err((
                        "mqtt.tls.require_client_cert".to_owned(),
                        "needs client_ca_file: the CA certificates that sign the sensors' client certificates".to_owned(),
                    ));
                }
                Ok(TlsConfig {
                    listen: t.listen,
                    cert_file: t.cert_file,
                    key_file: t.key_file,
                    client_ca_file: t.client_ca_file,
                    require_client_cert: t.require_client_cert,
                })
            })
            .transpose()?,
    };
    if !mqtt.enabled {
        // Nothing listens: the users file, the ACL and the TLS files are not read (a reload
        // would otherwise be refused for a certificate no listener uses).
        mqtt.tls = None;
        mqtt.acl = None;
        mqtt.auth.users_file = None;
    }
    if mqtt.enabled && !mqtt.auth.allow_anonymous && mqtt.auth.users_file.is_none() {
        return Err((
            "mqtt.auth".into(),
            "no client could connect: set users_file (lines of name:hash, from `edge-agent hash-password`) or allow_anonymous: true".into(),
        ));
    }
    if mqtt.router_segment_bytes < mqtt.max_payload_bytes {
        return Err((
            "mqtt.router_segment_bytes".into(),
            "must be at least mqtt.max_payload_bytes, or large publishes cannot be held".into(),
        ));
    }
    let buffer = BufferConfig {
        path: raw.buffer.path,
        quota_bytes: size("buffer.quota_bytes", &raw.buffer.quota_bytes)?,
        commit_window: duration("buffer.commit_window", &raw.buffer.commit_window)?,
        queue_records: positive("buffer.queue_records", raw.buffer.queue_records)?,
        queue_bytes: size("buffer.queue_bytes", &raw.buffer.queue_bytes)?,
        reserve_bytes: raw
            .buffer
            .reserve_bytes
            .as_deref()
            .map(|r| size("buffer.reserve_bytes", r))
            .transpose()?,
    };
    let mut streams = Vec::with_capacity(raw.streams.len() + 1);
    for (i, s) in raw.streams.into_iter().enumerate() {
        let key = |field: &str| format!("streams[{i}].{field}");
        if !ingest_wire::valid_name(&s.name) {
            return Err((
                key("name"),
                format!("{:?} must be 1-256 characters of [A-Za-z0-9_.-]", s.name),
            ));
        }
        if streams
            .iter()
            .any(|other: &StreamConfig| other.name == s.name)
        {
            return Err((key("name"), format!("stream {:?} is defined twice", s.name)));
        }
        if s.topics.is_empty() {
            return Err((key("topics"), "needs at least one MQTT topic filter".into()));
        }
        let topics = s
            .topics
            .iter()
            .enumerate()
            .map(|(j, t)| {
                TopicFilter::new(t).ok_or_else(|| {
                    (
                        format!("streams[{i}].topics[{j}]"),
                        format!("{t:?} is not a valid MQTT topic filter"),
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let batch = BatchTriggers {
            max_records: positive(&key("batch.max_records"), s.batch.max_records)?,
            max_bytes: usize_size(&key("batch.max_bytes"), &s.batch.max_bytes)?,
            linger: duration(&key("batch.linger"), &s.batch.linger)?,
            drain_max_records: positive(
                &key("batch.drain_max_records"),
                s.batch.drain_max_records,
            )?,
            drain_max_bytes: usize_size(&key("batch.drain_max_bytes"), &s.batch.drain_max_bytes)?,
        };
        let ttl = s
            .ttl
            .as_deref()
            .map(|t| duration(&key("ttl"), t))
            .transpose()?;
        let zstd_level = zstd_level(
            &key("zstd_level"),
            s.zstd_level.unwrap_or(ingest.zstd_level),
        )?;
        let transforms = s
            .transforms
            .into_iter()
            .enumerate()
            .map(|(j, t)| validate_transform(&format!("streams[{i}].transforms[{j}]"), t))
            .collect::<Result<Vec<_>, _>>()?;
        let attributes: std::collections::BTreeSet<&str> = transforms
            .iter()
            .filter_map(|t| match &t.spec {
                Spec::Enrich(e) => Some(e.names()),
                _ => None,
            })
            .flatten()
            .collect();
        let mut lower = std::collections::BTreeMap::new();
        for name in &attributes {
            if let Some(other) = lower.insert(name.to_ascii_lowercase(), *name) {
                return Err((
                    format!("streams[{i}].transforms"),
                    format!(
                        "its enrich steps add {other:?} and {name:?}: as attributes (headers), names must differ in more than case"
                    ),
                ));
            }
        }
        if attributes.len() > ingest_wire::MAX_ATTRIBUTES {
            return Err((
                format!("streams[{i}].transforms"),
                format!(
                    "its enrich steps add {} names; at most {} (a payload that is not a JSON object carries them as attributes, at most {} per record)",
                    attributes.len(),
                    ingest_wire::MAX_ATTRIBUTES,
                    ingest_wire::MAX_ATTRIBUTES
                ),
            ));
        }
        streams.push(StreamConfig {
            name: s.name,
            topics,
            priority: s.priority,
            batch,
            ttl,
            order: s.order,
            zstd_level,
            zstd_dictionary: s.zstd_dictionary,
            transforms,
        });
    }
    let default_stream = match streams.iter().position(|s| s.name == raw.default_stream) {
        Some(i) => i,
        None => {
            if !ingest_wire::valid_name(&raw.default_stream) || raw.default_stream.starts_with('_')
            {
                return Err((
                    "default_stream".into(),
                    "must be 1-256 characters of [A-Za-z0-9_.-]".into(),
                ));
            }
            streams.push(StreamConfig {
                name: raw.default_stream,
                topics: Vec::new(),
                priority: Priority::Bulk,
                batch: BatchTriggers::internal(Duration::from_millis(200)),
                ttl: None,
                order: Order::Fifo,
                zstd_level: ingest.zstd_level,
                zstd_dictionary: false,
                transforms: Vec::new(),
            });
            streams.len() - 1
        }
    };
    streams.push(loss_stream());
    let w = &raw.scheduling.weights;
    for (key, weight) in [("high", w.high), ("normal", w.normal), ("bulk", w.bulk)] {
        if weight == 0 {
            return Err((
                format!("scheduling.weights.{key}"),
                "must be at least 1, so the class always makes progress".into(),
            ));
        }
    }
    let schedule = SchedulePolicy {
        weights: [w.high, w.normal, w.bulk],
        starvation_bound: duration(
            "scheduling.starvation_bound",
            &raw.scheduling.starvation_bound,
        )?,
    };
    let mut sources = Vec::new();
    let mut mqtt_sources = Vec::new();
    for (i, s) in raw.sources.into_iter().enumerate() {
        let key = format!("sources[{i}]");
        match s {
            RawSource {
                file: Some(f),
                mqtt: None,
            } => sources.push(validate_source(&key, f, &streams)?),
            RawSource {
                file: None,
                mqtt: Some(m),
            } => mqtt_sources.push(validate_mqtt_source(
                &key,
                m,
                &raw.device_id,
                mqtt.max_payload_bytes,
            )?),
            _ => {
                return Err((
                    key,
                    "a source is one of file or mqtt (one key per list item)".into(),
                ));
            }
        }
    }
    for (i, m) in mqtt_sources.iter().enumerate() {
        if mqtt_sources[..i]
            .iter()
            .any(|o| (&o.host, o.port, &o.client_id) == (&m.host, m.port, &m.client_id))
        {
            return Err((
                "sources".into(),
                format!(
                    "two mqtt sources use client_id {:?} at {}:{}: their sessions would take each other over",
                    m.client_id, m.host, m.port
                ),
            ));
        }
    }
    if !mqtt.enabled && sources.is_empty() && mqtt_sources.is_empty() {
        return Err((
            "mqtt.enabled".into(),
            "false, and no sources: nothing would feed the agent (declare a file or mqtt source, or enable mqtt)".into(),
        ));
    }
    for (i, s) in sources.iter().enumerate() {
        if sources[..i].iter().any(|o| o.key() == s.key()) {
            return Err((
                format!("sources[{i}].file.path"),
                "the same files as an earlier source".into(),
            ));
        }
    }
    Ok(AgentConfig {
        device_id: raw.device_id,
        ingest,
        mqtt,
        buffer,
        streams,
        default_stream,
        metrics_listen: raw.metrics_listen,
        schedule,
        sources,
        mqtt_sources,
    })
}

/// ACL rules: who, and valid topic filters once `%u` and `%c` are filled in.
fn validate_acl(rules: Vec<RawRule>) -> Result<Vec<crate::access::Rule>, Invalid> {
    use crate::access::{Rule, Who};
    rules
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            let mut who: Vec<Who> = r
                .users
                .into_iter()
                .map(|u| if u == "*" { Who::AnyUser } else { Who::User(u) })
                .collect();
            who.extend(r.groups.into_iter().map(Who::Group));
            if r.anonymous {
                who.push(Who::Anonymous);
            }
            if who.is_empty() {
                return Err((
                    format!("mqtt.acl[{i}]"),
                    "says for whom: users (\"*\" for any user), groups, or anonymous: true".into(),
                ));
            }
            for (key, list) in [("publish", &r.publish), ("subscribe", &r.subscribe)] {
                for (j, p) in list.iter().enumerate() {
                    let sample = p.replace("%u", "u").replace("%c", "c");
                    if TopicFilter::new(&sample).is_none() {
                        return Err((
                            format!("mqtt.acl[{i}].{key}[{j}]"),
                            format!("{p:?} is not a valid MQTT topic filter"),
                        ));
                    }
                }
            }
            Ok(Rule {
                who,
                publish: r.publish,
                subscribe: r.subscribe,
            })
        })
        .collect()
}

/// The reserved stream loss reports travel in: critical, sent at once, never evicted.
pub fn loss_stream() -> StreamConfig {
    StreamConfig {
        name: ingest_wire::LOSS_STREAM.into(),
        topics: Vec::new(),
        priority: Priority::Critical,
        batch: BatchTriggers::internal(Duration::ZERO),
        ttl: None,
        order: Order::Fifo,
        zstd_level: 1,
        zstd_dictionary: false,
        transforms: Vec::new(),
    }
}

/// One `sources: - mqtt:` entry, checked.
fn validate_mqtt_source(
    key: &str,
    m: RawMqttSource,
    device_id: &str,
    max_payload_bytes: usize,
) -> Result<MqttSourceConfig, Invalid> {
    let key = format!("{key}.mqtt");
    let url = reqwest::Url::parse(&m.url)
        .map_err(|e| (format!("{key}.url"), format!("{:?}: {e}", m.url)))?;
    if !matches!(url.scheme(), "mqtt" | "tcp") {
        return Err((
            format!("{key}.url"),
            format!(
                "{:?}: mqtt://host:port (plain MQTT on the gateway; TLS is not supported here)",
                m.url
            ),
        ));
    }
    let host = url
        .host_str()
        .filter(|h| !h.is_empty())
        .ok_or_else(|| (format!("{key}.url"), format!("{:?} names no host", m.url)))?
        .to_owned();
    if m.topics.is_empty() {
        return Err((
            format!("{key}.topics"),
            "needs at least one MQTT topic filter".into(),
        ));
    }
    let topics = m
        .topics
        .iter()
        .enumerate()
        .map(|(j, t)| {
            TopicFilter::new(t).ok_or_else(|| {
                (
                    format!("{key}.topics[{j}]"),
                    format!("{t:?} is not a valid MQTT topic filter"),
                )
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let client_id = m
        .client_id
        .unwrap_or_else(|| format!("edge-agent-{device_id}"));
    if client_id.is_empty() || client_id.len() > 128 {
        return Err((
            format!("{key}.client_id"),
            "must be 1-128 bytes (it keys our persistent session at that broker)".into(),
        ));
    }
    let credentials = match (m.username, m.password_file) {
        (Some(u), Some(p)) => Some((u, p)),
        (None, None) => None,
        _ => {
            return Err((
                format!("{key}.username"),
                "username and password_file go together".into(),
            ));
        }
    };
    Ok(MqttSourceConfig {
        host,
        port: url.port().unwrap_or(1883),
        topics,
        client_id,
        credentials,
        max_payload_bytes,
    })
}

/// One `sources: - file:` entry, checked against the configured `streams`.
fn validate_source(
    key: &str,
    f: RawFileSource,
    streams: &[StreamConfig],
) -> Result<FileSourceConfig, Invalid> {
    let key = format!("{key}.file");
    let path = std::path::Path::new(&f.path);
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return Err((format!("{key}.path"), format!("{:?} names no file", f.path)));
    };
    if !path.is_absolute() {
        return Err((
            format!("{key}.path"),
            format!("{:?} must be absolute", f.path),
        ));
    }
    if dir.to_string_lossy().contains(['*', '?', '[']) {
        return Err((
            format!("{key}.path"),
            "patterns (*, ?, [..]) only in the file name, not in its directory".into(),
        ));
    }
    let pattern = glob::Pattern::new(&name.to_string_lossy())
        .map_err(|e| (format!("{key}.path"), format!("{:?}: {e}", f.path)))?;
    if !streams
        .iter()
        .any(|s| s.name == f.stream && s.name != ingest_wire::LOSS_STREAM)
    {
        return Err((
            format!("{key}.stream"),
            format!("{:?} is not a configured stream", f.stream),
        ));
    }
    let topic = f.topic.unwrap_or_else(|| "files/{file}".into());
    if topic.is_empty() || topic.contains(['+', '#']) {
        return Err((
            format!("{key}.topic"),
            format!(
                "{topic:?} must be an MQTT topic name (no + or #; {{file}} is the file's name)"
            ),
        ));
    }
    let max_line_bytes = usize_size(&format!("{key}.max_line_bytes"), &f.max_line_bytes)?;
    if !(1..=crate::source::file::MAX_LINE_BYTES).contains(&max_line_bytes) {
        return Err((
            format!("{key}.max_line_bytes"),
            "must be between 1 B and 512KiB".into(),
        ));
    }
    let start_at_end = match f.start_at.as_str() {
        "beginning" => false,
        "end" => true,
        other => {
            return Err((
                format!("{key}.start_at"),
                format!("{other:?} (expected beginning or end)"),
            ));
        }
    };
    let poll = duration(&format!("{key}.poll"), &f.poll)?;
    if poll < Duration::from_millis(10) || poll > Duration::from_secs(60) {
        return Err((format!("{key}.poll"), "must be between 10ms and 60s".into()));
    }
    Ok(FileSourceConfig {
        dir: dir.to_owned(),
        pattern,
        stream: f.stream,
        topic,
        max_line_bytes,
        start_at_end,
        poll,
    })
}

/// One transform step, checked; `key` is its path (`streams[i].transforms[j]`).
fn validate_transform(key: &str, raw: RawTransform) -> Result<Step, Invalid> {
    let path = |kind: &str, field: &str, text: &str| {
        FieldPath::new(text).ok_or_else(|| {
            (
                format!("{key}.{kind}.{field}"),
                format!("{text:?} is not a field path (names separated by dots, e.g. sensor.temperature)"),
            )
        })
    };
    Ok(match (raw.enrich, raw.filter, raw.deadband, raw.window) {
        (Some(e), None, None, None) => {
            let mut facts = (false, false);
            for (k, fact) in e.facts.iter().enumerate() {
                match fact.as_str() {
                    "device_id" => facts.0 = true,
                    "hostname" => facts.1 = true,
                    other => {
                        return Err((
                            format!("{key}.enrich.facts[{k}]"),
                            format!("unknown fact {other:?} (expected device_id or hostname)"),
                        ));
                    }
                }
            }
            let topic = e
                .topic
                .as_deref()
                .map(|t| TopicPattern::new(t).map_err(|why| (format!("{key}.enrich.topic"), why)))
                .transpose()?;
            if e.fields.is_empty() && e.facts.is_empty() && topic.is_none() {
                return Err((
                    format!("{key}.enrich"),
                    "adds nothing: give fields, facts or a topic pattern".into(),
                ));
            }
            // The names become headers when the payload is not a JSON object.
            let named = e
                .fields
                .keys()
                .map(|k| (format!("{key}.enrich.fields.{k}"), k.as_str()))
                .chain(
                    topic
                        .iter()
                        .flat_map(TopicPattern::names)
                        .map(|n| (format!("{key}.enrich.topic"), n)),
                );
            for (at, name) in named {
                if let Some(problem) = ingest_wire::attribute_name_problem(name) {
                    return Err((
                        at,
                        format!(
                            "{problem}; enrich names become headers when a payload is not a JSON object"
                        ),
                    ));
                }
            }
            for (k, v) in &e.fields {
                let bytes = crate::transform::attribute_value(v).len();
                if bytes > ingest_wire::MAX_ATTRIBUTE_VALUE_BYTES {
                    return Err((
                        format!("{key}.enrich.fields.{k}"),
                        format!(
                            "is {bytes} bytes; at most {} (it becomes a header when a payload is not a JSON object)",
                            ingest_wire::MAX_ATTRIBUTE_VALUE_BYTES
                        ),
                    ));
                }
            }
            Step {
                spec: Spec::Enrich(Enrich {
                    fields: e.fields,
                    device_id: facts.0,
                    hostname: facts.1,
                    topic,
                }),
                on_error: e.on_error,
            }
        }
        (None, Some(f), None, None) => {
            let keep = match f.action.as_str() {
                "keep" => true,
                "drop" => false,
                other => {
                    return Err((
                        format!("{key}.filter.action"),
                        format!("{other:?} (expected keep or drop)"),
                    ));
                }
            };
            let topics = f
                .topics
                .iter()
                .enumerate()
                .map(|(k, t)| {
                    TopicFilter::new(t).ok_or_else(|| {
                        (
                            format!("{key}.filter.topics[{k}]"),
                            format!("{t:?} is not a valid MQTT topic filter"),
                        )
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            let conditions = f
                .conditions
                .into_iter()
                .enumerate()
                .map(|(k, c)| condition(&format!("{key}.filter.where[{k}]"), c))
                .collect::<Result<Vec<_>, _>>()?;
            if topics.is_empty() && conditions.is_empty() {
                return Err((
                    format!("{key}.filter"),
                    "selects nothing: give topics, where, or both".into(),
                ));
            }
            Step {
                spec: Spec::Filter(Filter {
                    keep,
                    topics,
                    conditions,
                }),
                on_error: f.on_error,
            }
        }
        (None, None, Some(d), None) => {
            let field = path("deadband", "field", &d.field)?;
            for (name, v) in [("absolute", d.absolute), ("relative", d.relative)] {
                if v.is_some_and(|v| !(v.is_finite() && v > 0.0)) {
                    return Err((
                        format!("{key}.deadband.{name}"),
                        "must be a number above 0".into(),
                    ));
                }
            }
            if d.absolute.is_none() && d.relative.is_none() {
                return Err((
                    format!("{key}.deadband"),
                    "needs a threshold: absolute, relative, or both".into(),
                ));
            }
            let heartbeat = d
                .heartbeat
                .as_deref()
                .map(|h| duration(&format!("{key}.deadband.heartbeat"), h))
                .transpose()?;
            if heartbeat.is_some_and(|h| h.is_zero()) {
                return Err((
                    format!("{key}.deadband.heartbeat"),
                    "must be above 0 (leave it out for no heartbeat)".into(),
                ));
            }
            Step {
                spec: Spec::Deadband(Deadband {
                    field,
                    absolute: d.absolute,
                    relative: d.relative,
                    heartbeat,
                }),
                on_error: d.on_error,
            }
        }
        (None, None, None, Some(w)) => {
            let every = duration(&format!("{key}.window.every"), &w.every)?;
            if every < Duration::from_secs(1) || every > Duration::from_secs(7 * 86_400) {
                return Err((
                    format!("{key}.window.every"),
                    "must be at least 1s and at most 7d".into(),
                ));
            }
            let fields = w
                .fields
                .iter()
                .enumerate()
                .map(|(k, f)| {
                    if ["count", "window_start_ms", "window_end_ms"].contains(&f.as_str()) {
                        return Err((
                            format!("{key}.window.fields[{k}]"),
                            format!("{f:?} is a name the window's record uses itself"),
                        ));
                    }
                    path("window", &format!("fields[{k}]"), f)
                })
                .collect::<Result<Vec<_>, _>>()?;
            Step {
                spec: Spec::Window(Window {
                    every,
                    fields,
                    keep_raw: w.keep_raw,
                }),
                on_error: w.on_error,
            }
        }
        _ => {
            return Err((
                key.to_owned(),
                "a step is one of enrich, filter, deadband or window (one key per list item)"
                    .into(),
            ));
        }
    })
}

/// One `filter.where` condition, checked.
fn condition(key: &str, raw: RawCondition) -> Result<Condition, Invalid> {
    use serde_json::Value;
    let field = FieldPath::new(&raw.field).ok_or_else(|| {
        (
            format!("{key}.field"),
            format!(
                "{:?} is not a field path (names separated by dots)",
                raw.field
            ),
        )
    })?;
    let value = |v: Option<Value>| {
        v.ok_or_else(|| {
            (
                format!("{key}.value"),
                format!("{:?} needs a value", raw.op),
            )
        })
    };
    let ordered = |v: Option<Value>| match value(v)? {
        v @ (Value::Number(_) | Value::String(_)) => Ok(v),
        _ => Err((
            format!("{key}.value"),
            format!("{:?} compares numbers or strings", raw.op),
        )),
    };
    let op = match raw.op.as_str() {
        "==" => Op::Eq(value(raw.value)?),
        "!=" => Op::Ne(value(raw.value)?),
        "<" => Op::Lt(ordered(raw.value)?),
        "<=" => Op::Le(ordered(raw.value)?),
        ">" => Op::Gt(ordered(raw.value)?),
        ">=" => Op::Ge(ordered(raw.value)?),
        "exists" if raw.value.is_none() => Op::Exists,
        "exists" => {
            return Err((format!("{key}.value"), "exists takes no value".into()));
        }
        "in" => match value(raw.value)? {
            Value::Array(list) if !list.is_empty() => Op::In(list),
            _ => {
                return Err((
                    format!("{key}.value"),
                    "in takes a non-empty list, e.g. [ok, warn]".into(),
                ));
            }
        },
        other => {
            return Err((
                format!("{key}.op"),
                format!("unknown operator {other:?} (expected ==, !=, <, <=, >, >=, exists or in)"),
            ));
        }
    };
    Ok(Condition { field, op })
}

/// A zstd level the agent accepts.
fn zstd_level(key: &str, level: i32) -> Result<i32, Invalid> {
    if (1..=19).contains(&level) {
        Ok(level)
    } else {
        Err((key.into(), format!("{level} is not in 1..=19")))
    }
}

fn validate_ingest(raw: RawIngest) -> Result<IngestConfig, Invalid> {
    let (key, texts) = match (raw.url, raw.urls) {
        (Some(url), None) => ("ingest.url".to_owned(), vec![url]),
        (None, Some(urls)) if !urls.is_empty() => ("ingest.urls".to_owned(), urls),
        _ => {
            return Err((
                "ingest".into(),
                "set exactly one of url (one ingest) or urls (a non-empty list of replicas)".into(),
            ));
        }
    };
    let mut urls = Vec::with_capacity(texts.len());
    for (i, text) in texts.iter().enumerate() {
        let url = reqwest::Url::parse(text)
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https") && u.has_host())
            .filter(|u| u.join(ingest_wire::BATCHES_PATH).is_ok())
            .ok_or_else(|| {
                let at = if key == "ingest.urls" {
                    format!("{key}[{i}]")
                } else {
                    key.clone()
                };
                (at, format!("{text:?} is not an http(s) URL"))
            })?;
        let loopback = url.host_str().is_some_and(|h| {
            h.eq_ignore_ascii_case("localhost")
                || h.trim_matches(['[', ']'])
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        });
        if url.scheme() == "http" && !loopback && !raw.allow_insecure_http {
            let at = if key == "ingest.urls" {
                format!("{key}[{i}]")
            } else {
                key.clone()
            };
            return Err((
                at,
                format!(
                    "{text:?} would send the device token and the data unencrypted to another host: use https://, or set ingest.allow_insecure_http: true"
                ),
            ));
        }
        urls.push(url);
    }
    if raw.token.is_some() {
        return Err((
            "ingest.token".into(),
            "tokens are never written inline; put it in a file (ingest.token_file) or an environment variable (ingest.token_env)".into(),
        ));
    }
    let token = match (raw.token_file, raw.token_env) {
        (Some(file), None) => TokenSource::File(file),
        (None, Some(var)) => TokenSource::Env(var),
        (None, None) if raw.client_cert_file.is_some() => {
            if let Some(plain) = urls.iter().find(|u| u.scheme() != "https") {
                return Err((
                    "ingest".into(),
                    format!(
                        "without a token the client certificate is the only login, and {plain} is not https://: set token_file or token_env, or use https://"
                    ),
                ));
            }
            TokenSource::CertificateOnly
        }
        _ => {
            return Err((
                "ingest".into(),
                "set exactly one of token_file or token_env (or neither with client_cert_file and client_key_file: the certificate is then the only login)".into(),
            ));
        }
    };
    let zstd_level = zstd_level("ingest.zstd_level", raw.zstd_level)?;
    let retry_initial = duration("ingest.retry_initial", &raw.retry_initial)?;
    let retry_max = duration("ingest.retry_max", &raw.retry_max)?;
    if retry_max < retry_initial {
        return Err((
            "ingest.retry_max".into(),
            "must be at least ingest.retry_initial".into(),
        ));
    }
    Ok(IngestConfig {
        urls,
        token,
        request_timeout: duration("ingest.request_timeout", &raw.request_timeout)?,
        connect_timeout: duration("ingest.connect_timeout", &raw.connect_timeout)?,
        retry_initial,
        retry_max,
        zstd_level,
        max_upload_rate: match raw.max_upload_rate {
            None => None,
            Some(text) => match size("ingest.max_upload_rate", &text)? {
                0 => {
                    return Err((
                        "ingest.max_upload_rate".into(),
                        "must be above 0 (leave it out for no cap)".into(),
                    ));
                }
                n => Some(n),
            },
        },
        critical_may_exceed_rate: raw.critical_may_exceed_rate,
        max_in_flight: positive("ingest.max_in_flight", raw.max_in_flight)?,
        degraded_after: duration("ingest.degraded_after", &raw.degraded_after)?,
        ca_file: raw.ca_file,
        client_identity: match (raw.client_cert_file, raw.client_key_file) {
            (None, None) => None,
            (Some(cert), Some(key)) => Some((cert, key)),
            _ => {
                return Err((
                    "ingest".into(),
                    "set both client_cert_file and client_key_file (mTLS), or neither".into(),
                ));
            }
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) const GOOD: &str = "
version: 1
device_id: dev-1
ingest:
  url: http://127.0.0.1:8080
  token_env: EDGE_AGENT_TOKEN
mqtt:
  listen: 127.0.0.1:1883
  auth: { allow_anonymous: true }
buffer:
  path: /tmp/buffer.db
  quota_bytes: 64MiB
streams:
  - name: alarms
    topics: [\"plant/+/alarm/#\"]
    priority: critical
    batch: { max_records: 10, linger: 0ms }
  - name: telemetry
    topics: [\"plant/+/telemetry/#\", \"legacy/#\"]
    priority: normal
";

    #[test]
    fn a_client_certificate_may_replace_the_token_over_https_only() {
        let cert_only = GOOD.replace(
            "  token_env: EDGE_AGENT_TOKEN\n",
            "  client_cert_file: /c.pem\n  client_key_file: /c.key\n",
        );
        let err = AgentConfig::parse(Path::new("a.yaml"), &cert_only)
            .unwrap_err()
            .to_string();
        assert!(err.contains("https://"), "{err}");
        let https = cert_only.replace("http://127.0.0.1:8080", "https://ingest.example.com");
        let c = AgentConfig::parse(Path::new("a.yaml"), &https).expect("valid");
        assert_eq!(c.ingest.token, TokenSource::CertificateOnly);
        assert_eq!(
            resolve_token(Path::new("a.yaml"), &c.ingest.token).expect("no token"),
            ""
        );
        let neither = GOOD.replace("  token_env: EDGE_AGENT_TOKEN\n", "");
        assert!(AgentConfig::parse(Path::new("a.yaml"), &neither).is_err());
    }

    /// `GOOD` with `transforms` (indented list items) on the telemetry stream.
    fn with_transforms(list: &str) -> String {
        format!("{GOOD}    transforms:\n{list}")
    }

    #[test]
    fn transforms_parse_in_order() {
        let text = with_transforms(
            "      - enrich:
          fields: { device_location: factory-floor-1, line: 3 }
          facts: [device_id]
          topic: \"plant/{site}/#\"
      - filter:
          action: drop
          where:
            - { field: status, op: in, value: [maintenance, off] }
            - { field: sensor.t, op: \">\", value: 150 }
      - deadband: { field: sensor.t, absolute: 0.5, heartbeat: 5m, on_error: drop }
      - window: { every: 1m, fields: [sensor.t], keep_raw: false }
",
        );
        let c = AgentConfig::parse(Path::new("a.yaml"), &text).expect("valid");
        let kinds: Vec<&str> = c.streams[1]
            .transforms
            .iter()
            .map(|t| t.spec.name())
            .collect();
        assert_eq!(kinds, ["enrich", "filter", "deadband", "window"]);
        assert_eq!(c.streams[1].transforms[2].on_error, OnError::Drop);
        assert!(c.streams[0].transforms.is_empty());
    }

    #[test]
    fn transform_errors_name_the_key_path() {
        for (list, key, reason) in [
            (
                "      - colour: red\n",
                "streams[1].transforms[0]",
                "unknown field `colour`",
            ),
            (
                "      - { window: { every: 1m }, deadband: { field: t, absolute: 1 } }\n",
                "streams[1].transforms[0]",
                "one key per list item",
            ),
            (
                "      - enrich: { facts: [mood] }\n",
                "streams[1].transforms[0].enrich.facts[0]",
                "unknown fact",
            ),
            (
                "      - enrich: { topic: \"plant/#/x\" }\n",
                "streams[1].transforms[0].enrich.topic",
                "last segment",
            ),
            (
                "      - enrich: { fields: { \"device location\": a } }\n",
                "streams[1].transforms[0].enrich.fields.device location",
                "[A-Za-z0-9_.-]",
            ),
            (
                "      - enrich: { fields: { seq: 1 } }\n",
                "streams[1].transforms[0].enrich.fields.seq",
                "metadata",
            ),
            (
                "      - enrich: { topic: \"plant/{stream}/#\" }\n",
                "streams[1].transforms[0].enrich.topic",
                "metadata",
            ),
            (
                "      - enrich: { fields: { a1: 1, a2: 1, a3: 1, a4: 1, a5: 1, a6: 1, a7: 1, a8: 1, a9: 1 } }\n      - enrich: { fields: { b1: 1, b2: 1, b3: 1, b4: 1, b5: 1, b6: 1, b7: 1, b8: 1 } }\n",
                "streams[1].transforms",
                "add 17 names; at most 16",
            ),
            (
                "      - enrich: { fields: { Site: a } }\n      - enrich: { fields: { site: b } }\n",
                "streams[1].transforms",
                "differ in more than case",
            ),
            (
                "      - filter: { where: [{ field: t, op: \"~\", value: 1 }] }\n",
                "streams[1].transforms[0].filter.where[0].op",
                "unknown operator",
            ),
            (
                "      - filter: { where: [{ field: t, op: \">\" }] }\n",
                "streams[1].transforms[0].filter.where[0].value",
                "needs a value",
            ),
            (
                "      - filter: { where: [{ field: t, op: in, value: 3 }] }\n",
                "streams[1].transforms[0].filter.where[0].value",
                "non-empty list",
            ),
            (
                "      - filter: { action: keep }\n",
                "streams[1].transforms[0].filter",
                "selects nothing",
            ),
            (
                "      - deadband: { field: t }\n",
                "streams[1].transforms[0].deadband",
                "needs a threshold",
            ),
            (
                "      - deadband: { field: t, absolute: -1 }\n",
                "streams[1].transforms[0].deadband.absolute",
                "above 0",
            ),
            (
                "      - deadband: { field: \"a..b\", absolute: 1 }\n",
                "streams[1].transforms[0].deadband.field",
                "not a field path",
            ),
            (
                "      - window: { every: 10ms }\n",
                "streams[1].transforms[0].window.every",
                "at least 1s",
            ),
            (
                "      - window: { every: 1m, fields: [count] }\n",
                "streams[1].transforms[0].window.fields[0]",
                "uses itself",
            ),
            (
                "      - deadband: { field: t, absolute: 1, heartbeat: 0s }\n",
                "streams[1].transforms[0].deadband.heartbeat",
                "above 0",
            ),
            (
                "      - filter: { where: [{ field: t, op: in, value: [] }] }\n",
                "streams[1].transforms[0].filter.where[0].value",
                "non-empty list",
            ),
            (
                "      - window: { every: 1m, keep: true }\n",
                "streams[1].transforms[0]",
                "unknown field `keep`",
            ),
        ] {
            let err = AgentConfig::parse(Path::new("a.yaml"), &with_transforms(list))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("a.yaml") && err.contains(key) && err.contains(reason),
                "{list}: {err}"
            );
        }
        let long = format!(
            "      - enrich: {{ fields: {{ note: {} }} }}\n",
            "x".repeat(65_536)
        );
        let err = AgentConfig::parse(Path::new("a.yaml"), &with_transforms(&long))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("streams[1].transforms[0].enrich.fields.note")
                && err.contains("65536 bytes; at most 65535"),
            "{err}"
        );
    }

    #[test]
    fn file_sources_parse_and_errors_name_the_key_path() {
        let with = |source: &str| format!("{GOOD}sources:\n  - file: {source}\n");
        let c = AgentConfig::parse(
            Path::new("a.yaml"),
            &with("{ path: /edge/sensors/*.log, stream: telemetry, topic: \"sensors/temperature/{file}\" }"),
        )
        .expect("valid");
        assert_eq!(c.sources.len(), 1);
        assert_eq!(c.sources[0].dir, Path::new("/edge/sensors"));
        assert!(c.sources[0].pattern.matches("temperature.log"));
        assert!(!c.sources[0].pattern.matches("temperature.log.1"));
        assert_eq!(c.sources[0].max_line_bytes, 64 << 10);
        for (source, key, reason) in [
            (
                "{ path: sensors/*.log, stream: telemetry }",
                "sources[0].file.path",
                "absolute",
            ),
            (
                "{ path: /edge/*/t.log, stream: telemetry }",
                "sources[0].file.path",
                "not in its directory",
            ),
            (
                "{ path: /edge/t.log, stream: nowhere }",
                "sources[0].file.stream",
                "not a configured stream",
            ),
            (
                "{ path: /edge/t.log, stream: _losses }",
                "sources[0].file.stream",
                "not a configured stream",
            ),
            (
                "{ path: /edge/t.log, stream: telemetry, topic: \"a/#\" }",
                "sources[0].file.topic",
                "no + or #",
            ),
            (
                "{ path: /edge/t.log, stream: telemetry, start_at: middle }",
                "sources[0].file.start_at",
                "beginning or end",
            ),
            (
                "{ path: /edge/t.log, stream: telemetry, poll: 1ms }",
                "sources[0].file.poll",
                "between",
            ),
            (
                "{ path: /edge/t.log, stream: telemetry, max_line_bytes: 0B }",
                "sources[0].file.max_line_bytes",
                "above 0",
            ),
            (
                "{ path: /edge/t.log, stream: telemetry, colour: red }",
                "sources[0].file",
                "unknown field `colour`",
            ),
        ] {
            let err = AgentConfig::parse(Path::new("a.yaml"), &with(source))
                .unwrap_err()
                .to_string();
            assert!(err.contains(key) && err.contains(reason), "{source}: {err}");
        }
    }

    #[test]
    fn the_embedded_broker_can_be_turned_off_when_a_source_feeds_the_agent() {
        let off = GOOD.replace(
            "mqtt:\n  listen: 127.0.0.1:1883\n  auth: { allow_anonymous: true }\n",
            "mqtt:\n  enabled: false\n",
        );
        assert_ne!(off, GOOD);
        let err = AgentConfig::parse(Path::new("a.yaml"), &off)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("mqtt.enabled") && err.contains("nothing would feed the agent"),
            "{err}"
        );
        let c = AgentConfig::parse(
            Path::new("a.yaml"),
            &format!(
                "{off}sources:\n  - mqtt: {{ url: \"mqtt://127.0.0.1:1884\", topics: [\"#\"] }}\n"
            ),
        )
        .expect("valid");
        assert!(!c.mqtt.enabled);
        // Files only a listener would read are not read.
        let with_files = off.replace(
            "  enabled: false\n",
            "  enabled: false\n  auth: { users_file: /nonexistent/users }\n  tls: { listen: 127.0.0.1:8883, cert_file: /nonexistent/c, key_file: /nonexistent/k }\n",
        );
        assert_ne!(with_files, off);
        let c = AgentConfig::parse(
            Path::new("a.yaml"),
            &format!("{with_files}sources:\n  - mqtt: {{ url: \"mqtt://127.0.0.1:1884\", topics: [\"#\"] }}\n"),
        )
        .expect("valid");
        assert!(c.mqtt.tls.is_none() && c.mqtt.auth.users_file.is_none());
        assert!(
            AgentConfig::parse(Path::new("a.yaml"), GOOD)
                .expect("valid")
                .mqtt
                .enabled
        );
        let no_listen = GOOD.replace("  listen: 127.0.0.1:1883\n", "");
        let err = AgentConfig::parse(Path::new("a.yaml"), &no_listen)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("mqtt.listen") && err.contains("enabled: false"),
            "{err}"
        );
    }

    #[test]
    fn mqtt_sources_parse_and_errors_name_the_key_path() {
        let with = |source: &str| format!("{GOOD}sources:\n  - mqtt: {source}\n");
        let c = AgentConfig::parse(
            Path::new("a.yaml"),
            &with("{ url: \"mqtt://127.0.0.1:1884\", topics: [\"plant/#\"] }"),
        )
        .expect("valid");
        let m = &c.mqtt_sources[0];
        assert_eq!((m.host.as_str(), m.port), ("127.0.0.1", 1884));
        assert_eq!(m.client_id, "edge-agent-dev-1");
        for (source, key, reason) in [
            (
                "{ url: \"https://x\", topics: [a] }",
                "sources[0].mqtt.url",
                "mqtt://host:port",
            ),
            (
                "{ url: \"mqtt://x\", topics: [] }",
                "sources[0].mqtt.topics",
                "at least one",
            ),
            (
                "{ url: \"mqtt://x\", topics: [\"a/#/b\"] }",
                "sources[0].mqtt.topics[0]",
                "not a valid",
            ),
            (
                "{ url: \"mqtt://x\", topics: [a], username: u }",
                "sources[0].mqtt.username",
                "go together",
            ),
        ] {
            let err = AgentConfig::parse(Path::new("a.yaml"), &with(source))
                .unwrap_err()
                .to_string();
            assert!(err.contains(key) && err.contains(reason), "{source}: {err}");
        }
        let both = format!(
            "{GOOD}sources:\n  - {{ mqtt: {{ url: \"mqtt://x\", topics: [a] }}, file: {{ path: /a, stream: telemetry }} }}\n"
        );
        let err = AgentConfig::parse(Path::new("a.yaml"), &both)
            .unwrap_err()
            .to_string();
        assert!(err.contains("one of file or mqtt"), "{err}");
    }

    #[test]
    fn good_config_gets_an_implicit_default_stream() {
        let c = AgentConfig::parse(Path::new("a.yaml"), GOOD).expect("valid");
        assert_eq!(c.streams.len(), 4);
        assert_eq!(c.streams[3].name, "_losses");
        assert_eq!(c.streams[c.default_stream].name, "default");
        assert_eq!(c.streams[c.default_stream].priority, Priority::Bulk);
        assert_eq!(c.streams[0].batch.linger, Duration::ZERO);
        assert_eq!(c.buffer.commit_window, Duration::ZERO);
        assert_eq!(c.ingest.token, TokenSource::Env("EDGE_AGENT_TOKEN".into()));
    }

    #[test]
    fn errors_name_file_key_and_reason() {
        let cases = [
            (
                GOOD.replace("priority: critical", "priority: urgent"),
                "streams[0].priority",
                "unknown variant `urgent`",
            ),
            (
                GOOD.replace("quota_bytes: 64MiB", "quota_bytes: 64MiB\n  colour: red"),
                "buffer.colour",
                "unknown field `colour`",
            ),
            (
                GOOD.replace("token_env: EDGE_AGENT_TOKEN", "token: abc"),
                "ingest.token",
                "never written inline",
            ),
            (
                GOOD.replace(
                    "token_env: EDGE_AGENT_TOKEN",
                    "token_env: A\n  token_file: /x",
                ),
                "ingest",
                "exactly one",
            ),
            (
                GOOD.replace("\"legacy/#\"", "\"legacy/#/x\""),
                "streams[1].topics[1]",
                "not a valid MQTT topic filter",
            ),
            (
                GOOD.replace("linger: 0ms", "linger: soon"),
                "streams[0].batch.linger",
                "not a duration",
            ),
            (
                GOOD.replace("quota_bytes: 64MiB", "quota_bytes: lots"),
                "buffer.quota_bytes",
                "not a size",
            ),
            (
                GOOD.replace("name: telemetry", "name: alarms"),
                "streams[1].name",
                "defined twice",
            ),
            (
                GOOD.replace("url: http://127.0.0.1:8080", "url: ftp://x"),
                "ingest.url",
                "not an http(s) URL",
            ),
            (
                GOOD.replace(
                    "url: http://127.0.0.1:8080",
                    "urls: [\"https://a:1\", \"b:2\"]",
                ),
                "ingest.urls[1]",
                "\"b:2\" is not an http(s) URL",
            ),
            (
                GOOD.replace(
                    "url: http://127.0.0.1:8080",
                    "url: http://a:1\n  urls: [\"http://b:2\"]",
                ),
                "ingest",
                "exactly one of url",
            ),
            (
                GOOD.replace("url: http://127.0.0.1:8080", "url: http://10.0.0.1:8080"),
                "ingest.url",
                "allow_insecure_http",
            ),
            (
                GOOD.replace("url: http://127.0.0.1:8080", "urls: []"),
                "ingest",
                "exactly one of url",
            ),
            (
                GOOD.replace(
                    "url: http://127.0.0.1:8080",
                    "url: http://127.0.0.1:8080\n  max_upload_rate: fast",
                ),
                "ingest.max_upload_rate",
                "not a size",
            ),
            (
                GOOD.replace("version: 1", "version: 3"),
                "version",
                "unsupported version",
            ),
            (
                GOOD.replace(
                    "  auth: { allow_anonymous: true }",
                    "  auth: { allow_anonymous: true }\n  tls: { listen: 127.0.0.1:8883, cert_file: c, key_file: k, require_client_cert: true }",
                ),
                "mqtt.tls.require_client_cert",
                "needs client_ca_file",
            ),
        ];
        for (text, key, reason) in cases {
            let err = AgentConfig::parse(Path::new("config/agent.yaml"), &text)
                .unwrap_err()
                .to_string();
            assert!(err.starts_with("config/agent.yaml: "), "{err}");
            assert!(
                err.contains(&format!(": {key}: ")),
                "{err} should name {key}"
            );
            assert!(err.contains(reason), "{err} should say {reason}");
        }
    }

    #[test]
    fn the_annotated_example_is_valid() {
        let c = AgentConfig::parse(
            Path::new("config/agent.yaml"),
            include_str!("../../config/agent.yaml"),
        )
        .expect("config/agent.yaml is valid");
        let temperature = c
            .streams
            .iter()
            .find(|s| s.name == "temperature")
            .expect("the edge processing example");
        assert_eq!(temperature.transforms.len(), 4);
        assert_eq!(
            c.streams
                .iter()
                .find(|s| s.name == "logs")
                .and_then(|s| s.ttl),
            Some(Duration::from_secs(7 * 86_400))
        );
        assert_eq!(
            c.streams.last().map(|s| s.name.as_str()),
            Some(ingest_wire::LOSS_STREAM)
        );
    }

    #[test]
    fn missing_token_file_is_named() {
        let err = resolve_token(
            Path::new("a.yaml"),
            &TokenSource::File("/nonexistent/token".into()),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("a.yaml: ingest.token_file: cannot read token file /nonexistent/token"),
            "{err}"
        );
    }
}
