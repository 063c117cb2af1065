//! The ingest's YAML config: parse (raw serde structs), then a pure `validate` into domain types.
//! Every error names the file, the key path and the reason.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// A config file that cannot be used. Start-up stops with this message; nothing else happens.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("{file}: cannot read: {source}")]
    Read {
        /// The config file.
        file: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The YAML does not parse or does not fit the schema.
    #[error("{file}: {key}: {reason}")]
    Invalid {
        /// The config file.
        file: PathBuf,
        /// Key path, e.g. `devices[1].token_sha256`.
        key: String,
        /// What is wrong and what is expected.
        reason: String,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    version: u32,
    listen: SocketAddr,
    #[serde(default = "default_topic_template")]
    topic_template: String,
    devices: Vec<RawDevice>,
    sink: RawSink,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    read_api: RawReadApi,
    #[serde(default = "default_clock_skew_threshold")]
    clock_skew_threshold: String,
    #[serde(default)]
    tls: Option<TlsFiles>,
    #[serde(default)]
    metrics_listen: Option<SocketAddr>,
}

/// HTTPS for the listener: PEM files read at start, on SIGHUP and when they change
/// ([`crate::tls`]).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// Certificate chain, the server's first.
    pub cert_file: PathBuf,
    /// Its private key.
    pub key_file: PathBuf,
    /// CAs whose client certificates identify devices (mTLS): a certificate's Common Name is
    /// the device id, and no token is needed then.
    #[serde(default)]
    pub client_ca_file: Option<PathBuf>,
}

fn default_clock_skew_threshold() -> String {
    "60s".into()
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawReadApi {
    #[serde(default)]
    enabled: bool,
    #[serde(default)]
    token_sha256: Option<String>,
    #[serde(default)]
    tenant_tokens: Vec<RawTenantToken>,
    #[serde(default)]
    allow_without_token: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTenantToken {
    tenant: String,
    token_sha256: String,
}

/// The read API's access from its config section; `devices` name the tenants that exist.
fn read_api(
    raw: RawReadApi,
    devices: &HashMap<String, Device>,
) -> Result<ReadApi, (String, String)> {
    let hash = |key: String, hex_text: &str| {
        let mut sha256 = [0u8; 32];
        hex::decode_to_slice(hex_text.trim(), &mut sha256).map_err(|_| {
            (
                key,
                "must be 64 hex characters: the SHA-256 of the token (`cloud-ingest hash-token`)"
                    .to_owned(),
            )
        })?;
        Ok::<_, (String, String)>(sha256)
    };
    let mut tokens = Vec::new();
    if let Some(hex_text) = &raw.token_sha256 {
        tokens.push(ReadToken {
            sha256: hash("read_api.token_sha256".into(), hex_text)?,
            tenant: None,
        });
    }
    for (i, t) in raw.tenant_tokens.iter().enumerate() {
        let key = |field: &str| format!("read_api.tenant_tokens[{i}].{field}");
        if !devices.values().any(|d| d.tenant == t.tenant) {
            return Err((
                key("tenant"),
                format!(
                    "no device of the registry has tenant {:?}: a typo?",
                    t.tenant
                ),
            ));
        }
        tokens.push(ReadToken {
            sha256: hash(key("token_sha256"), &t.token_sha256)?,
            tenant: Some(t.tenant.clone()),
        });
    }
    match (raw.enabled, tokens.is_empty(), raw.allow_without_token) {
        (false, _, _) => Ok(ReadApi::Disabled),
        (true, false, true) => Err((
            "read_api".into(),
            "tokens and allow_without_token: true contradict each other: keep one".into(),
        )),
        (true, false, false) => Ok(ReadApi::Tokens(tokens)),
        // Never opened just because the address is loopback: a TLS proxy on the same host
        // makes every client a loopback one.
        (true, true, true) => Ok(ReadApi::Open),
        (true, true, false) => Err((
            "read_api".into(),
            "the log's read API shows the tenants' data: set read_api.tenant_tokens (a tenant's readers, its topics only) or read_api.token_sha256 (every tenant's); readers send \"Authorization: Bearer <token>\"; or allow_without_token: true to serve it to anyone who reaches the listener, or enabled: false".into(),
        )),
    }
}

fn default_true() -> bool {
    true
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDevice {
    id: String,
    tenant: String,
    #[serde(default)]
    token_sha256: Option<String>,
    #[serde(default)]
    records_per_second: Option<u32>,
    #[serde(default)]
    bytes_per_second: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(
    tag = "type",
    content = "options",
    rename_all = "snake_case",
    deny_unknown_fields
)]
enum RawSink {
    Embedded(RawEmbedded),
    Kafka(RawKafka),
    Nats(RawNats),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEmbedded {
    path: PathBuf,
    #[serde(default = "default_retention_max_age")]
    max_age: String,
    #[serde(default)]
    max_bytes_per_topic: Option<String>,
}

fn default_retention_max_age() -> String {
    "forever".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKafka {
    brokers: String,
    #[serde(default = "default_kafka_compression")]
    compression: String,
    #[serde(default = "default_kafka_linger")]
    linger: String,
    #[serde(default = "default_delivery_timeout")]
    delivery_timeout: String,
    #[serde(default)]
    properties: BTreeMap<String, String>,
}

fn default_kafka_compression() -> String {
    "zstd".into()
}
fn default_kafka_linger() -> String {
    "5ms".into()
}
fn default_delivery_timeout() -> String {
    "10s".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNats {
    url: String,
    #[serde(default = "default_nats_stream")]
    stream: String,
    #[serde(default)]
    subjects: Option<Vec<String>>,
    #[serde(default = "default_true")]
    create_stream: bool,
    #[serde(default = "default_duplicate_window")]
    duplicate_window: String,
    #[serde(default = "default_nats_replicas")]
    replicas: usize,
    #[serde(default = "default_delivery_timeout")]
    ack_timeout: String,
}

fn default_nats_stream() -> String {
    "IOT".into()
}
fn default_duplicate_window() -> String {
    "2m".into()
}
fn default_nats_replicas() -> usize {
    1
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    #[serde(default = "default_max_body")]
    max_body_bytes: String,
    #[serde(default = "default_max_decompressed")]
    max_decompressed_bytes: String,
    #[serde(default = "default_max_records")]
    max_records_per_batch: usize,
    #[serde(default = "default_max_concurrent")]
    max_concurrent_requests: usize,
    #[serde(default = "default_header_timeout")]
    header_timeout: String,
    #[serde(default = "default_body_timeout")]
    body_timeout: String,
    #[serde(default = "default_max_decoding")]
    max_decoding_bytes: String,
    #[serde(default)]
    device_records_per_second: Option<u32>,
    #[serde(default)]
    device_bytes_per_second: Option<String>,
}

impl Default for RawLimits {
    fn default() -> Self {
        RawLimits {
            max_body_bytes: default_max_body(),
            max_decompressed_bytes: default_max_decompressed(),
            max_records_per_batch: default_max_records(),
            max_concurrent_requests: default_max_concurrent(),
            header_timeout: default_header_timeout(),
            body_timeout: default_body_timeout(),
            max_decoding_bytes: default_max_decoding(),
            device_records_per_second: None,
            device_bytes_per_second: None,
        }
    }
}

fn default_max_concurrent() -> usize {
    64
}
fn default_max_decoding() -> String {
    "512MiB".into()
}
fn default_header_timeout() -> String {
    "10s".into()
}
fn default_body_timeout() -> String {
    "30s".into()
}

fn default_topic_template() -> String {
    "iot.{tenant}.{stream}".into()
}
fn default_max_body() -> String {
    "8MiB".into()
}
fn default_max_decompressed() -> String {
    "64MiB".into()
}
fn default_max_records() -> usize {
    10_000
}

/// A validated ingest config.
#[derive(Debug, Clone)]
pub struct IngestConfig {
    /// Address the HTTP server binds.
    pub listen: SocketAddr,
    /// Where `/metrics` is served instead of `listen` (plain HTTP, with `/healthz` and
    /// `/readyz`), if set: the public port then has no `/metrics`.
    pub metrics_listen: Option<SocketAddr>,
    /// Log topic name template with `{tenant}` and `{stream}`.
    pub topic_template: String,
    /// Registered devices by id.
    pub devices: HashMap<String, Device>,
    /// HTTPS, if configured.
    pub tls: Option<TlsFiles>,
    /// Each device's rate limits (its own, else `limits.device_*`), where any is set.
    pub device_rates: HashMap<String, DeviceRate>,
    /// Where records go.
    pub sink: SinkConfig,
    /// Per-request limits.
    pub limits: RequestLimits,
    /// Who may read the embedded log over HTTP.
    pub read_api: ReadApi,
    /// Agent clocks further off than this get corrected timestamps beside the originals.
    pub clock_skew_threshold: Duration,
}

/// Access to `GET /v1/log…` (the embedded log's read endpoints).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadApi {
    /// Not served (404).
    Disabled,
    /// Served to anyone who can reach the listener (`allow_without_token: true`).
    Open,
    /// Served to requests bearing one of these tokens, each for what it covers.
    Tokens(Vec<ReadToken>),
}

/// A read token: the SHA-256 of the token, and the tenant whose topics it reads (every
/// tenant's for `read_api.token_sha256`, an operator's token).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadToken {
    /// SHA-256 of the token.
    pub sha256: [u8; 32],
    /// `None`: every tenant.
    pub tenant: Option<String>,
}

/// A device's rate limits (`limits.device_*_per_second`, or its own).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceRate {
    /// Records per second (a second's worth, or a largest batch, at once).
    pub records_per_second: Option<NonZeroU32>,
    /// Decompressed body bytes per second.
    pub bytes_per_second: Option<NonZeroU32>,
}

/// A device of the registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    /// Tenant the device belongs to; its records go to that tenant's topics only.
    pub tenant: String,
    /// SHA-256 of the device's bearer token; `None`: it logs in with its client certificate
    /// only (mTLS).
    pub token_sha256: Option<[u8; 32]>,
}

/// How long and how much the embedded log keeps, per topic: older records go first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Retention {
    /// Records ingested longer ago than this are deleted (`max_age`; `forever`, the default,
    /// keeps them: an upgrade never starts deleting; the shipped config sets 7 days).
    pub max_age: Option<Duration>,
    /// A topic's payload bytes past this are deleted, oldest first (`max_bytes_per_topic`; no
    /// limit by default).
    pub max_bytes_per_topic: Option<u64>,
}

/// The stream log records are appended to.
#[derive(Debug, Clone)]
pub enum SinkConfig {
    /// The embedded log: one SQLite file.
    Embedded {
        /// Path of the log file.
        path: PathBuf,
        /// What the log keeps.
        retention: Retention,
    },
    /// Apache Kafka (or a Kafka-protocol broker).
    Kafka(KafkaConfig),
    /// NATS JetStream.
    Nats(NatsConfig),
}

/// Settings librdkafka gets from us and that `properties` may not override: they are what
/// makes a 2xx mean "in Kafka, once, in order".
pub const KAFKA_FIXED_PROPERTIES: [&str; 5] = [
    "bootstrap.servers",
    "enable.idempotence",
    "acks",
    "max.in.flight.requests.per.connection",
    "message.timeout.ms",
];

/// The Kafka sink.
#[derive(Debug, Clone)]
pub struct KafkaConfig {
    /// Bootstrap brokers, `host:port[,host:port…]`.
    pub brokers: String,
    /// `compression.type`: zstd, lz4, snappy, gzip or none.
    pub compression: String,
    /// `linger.ms`.
    pub linger: Duration,
    /// How long a record may take to be acknowledged before the batch is answered 503.
    pub delivery_timeout: Duration,
    /// Further librdkafka properties (security, SASL, tuning), passed as they are.
    pub properties: BTreeMap<String, String>,
}

/// The NATS JetStream sink.
#[derive(Debug, Clone)]
pub struct NatsConfig {
    /// Server URL(s), e.g. `nats://127.0.0.1:4222` (comma-separated for a cluster).
    pub url: String,
    /// JetStream stream holding every subject the ingest writes.
    pub stream: String,
    /// The stream's subjects (`iot.>` from the default template).
    pub subjects: Vec<String>,
    /// Create the stream when it is missing (otherwise it must exist).
    pub create_stream: bool,
    /// The stream's `Nats-Msg-Id` dedup window, when the ingest creates it.
    pub duplicate_window: Duration,
    /// The stream's replicas, when the ingest creates it.
    pub replicas: usize,
    /// How long a PubAck may take before the batch is answered 503.
    pub ack_timeout: Duration,
}

/// Limits applied to every request.
#[derive(Debug, Clone, Copy)]
pub struct RequestLimits {
    /// Largest request body as sent.
    pub max_body_bytes: usize,
    /// Largest body once decompressed.
    pub max_decompressed_bytes: usize,
    /// Most records in one batch.
    pub max_records_per_batch: usize,
    /// Batch and dictionary requests served at once; beyond, 503 with Retry-After.
    pub max_concurrent_requests: usize,
    /// Longest a client may take to send a request's headers (then the connection closes).
    pub header_timeout: Duration,
    /// Longest a client may take to send a request's body (then 408).
    pub body_timeout: Duration,
    /// Memory all requests decoding at once may cost together, by
    /// [`RequestLimits::decoding_cost`]; a request that does not fit gets 503 with Retry-After.
    pub max_decoding_bytes: usize,
}

impl RequestLimits {
    /// What decoding a body may cost at most: the body, its decompressed bytes (`raw_bound`,
    /// at most `max_decompressed_bytes`) two and a half times (the buffer, the payloads and
    /// topics copied out of it, the decoder's buffers), the zstd window (at most 16 MiB, and
    /// never more than the output), and [`ingest_wire::DECODED_RECORD_BYTES`] per decoded record
    /// (the record and its attributes).
    pub fn decoding_cost(&self, body_bytes: usize, raw_bound: usize) -> usize {
        let window = raw_bound.min(1 << ingest_wire::MAX_WINDOW_LOG);
        body_bytes
            .saturating_add(raw_bound.saturating_mul(5) / 2)
            .saturating_add(window)
            .saturating_add(
                self.max_records_per_batch
                    .saturating_mul(ingest_wire::DECODED_RECORD_BYTES),
            )
    }
}

impl IngestConfig {
    /// Reads and validates `file`.
    pub fn load(file: &Path) -> Result<IngestConfig, ConfigError> {
        let text = std::fs::read_to_string(file).map_err(|source| ConfigError::Read {
            file: file.to_owned(),
            source,
        })?;
        Self::parse(file, &text)
    }

    /// Parses and validates `text` as the content of `file` (used in messages only).
    pub fn parse(file: &Path, text: &str) -> Result<IngestConfig, ConfigError> {
        let raw: RawConfig = serde_path_to_error::deserialize(serde_yaml::Deserializer::from_str(
            text,
        ))
        .map_err(|e| ConfigError::Invalid {
            file: file.to_owned(),
            key: key_or_root(e.path().to_string()),
            reason: yaml_reason(&e.path().to_string(), e.into_inner().to_string()),
        })?;
        validate(raw).map_err(|(key, reason)| ConfigError::Invalid {
            file: file.to_owned(),
            key,
            reason,
        })
    }
}

/// serde_yaml puts its own path before its message ("buffer: unknown field …"); the key path
/// comes from serde_path_to_error instead, so drop the repeat.
fn yaml_reason(path: &str, message: String) -> String {
    match message.split_once(": ") {
        Some((prefix, rest)) if path.starts_with(prefix) => rest.to_owned(),
        _ => message,
    }
}

fn key_or_root(path: String) -> String {
    if path == "." {
        "(top level)".into()
    } else {
        path
    }
}

/// Pure: raw config to domain types, or (key path, reason).
fn validate(raw: RawConfig) -> Result<IngestConfig, (String, String)> {
    if raw.version != 1 {
        return Err((
            "version".into(),
            format!("unsupported version {} (expected 1)", raw.version),
        ));
    }
    let naming = crate::naming::Naming::parse(&raw.topic_template)
        .map_err(|e| ("topic_template".to_owned(), e))?;
    let rate = |key: String, n: Option<u64>| -> Result<Option<NonZeroU32>, (String, String)> {
        n.map(|n| {
            u32::try_from(n)
                .ok()
                .and_then(NonZeroU32::new)
                .ok_or((key, "must be 1 to 4294967295".to_owned()))
        })
        .transpose()
    };
    let bytes_rate = |key: String, text: Option<&String>| {
        let n = text
            .map(|t| {
                t.parse::<bytesize::ByteSize>()
                    .map(|b| b.as_u64())
                    .map_err(|e| {
                        (
                            key.clone(),
                            format!("{t:?} is not a size like \"1MiB\": {e}"),
                        )
                    })
            })
            .transpose()?;
        rate(key, n)
    };
    let default_rate = DeviceRate {
        records_per_second: rate(
            "limits.device_records_per_second".into(),
            raw.limits.device_records_per_second.map(u64::from),
        )?,
        bytes_per_second: bytes_rate(
            "limits.device_bytes_per_second".into(),
            raw.limits.device_bytes_per_second.as_ref(),
        )?,
    };
    let mut device_rates = HashMap::new();
    let mut devices = HashMap::new();
    for (i, d) in raw.devices.into_iter().enumerate() {
        let key = |field: &str| format!("devices[{i}].{field}");
        if !ingest_wire::valid_name(&d.id) {
            return Err((
                key("id"),
                "must be 1-256 characters of [A-Za-z0-9_.-]".into(),
            ));
        }
        if !ingest_wire::valid_name(&d.tenant) {
            return Err((
                key("tenant"),
                "must be 1-256 characters of [A-Za-z0-9_.-]".into(),
            ));
        }
        naming
            .check_tenant(&d.tenant)
            .map_err(|e| (key("tenant"), format!("{:?} {e}", d.tenant)))?;
        let token_sha256 = match &d.token_sha256 {
            Some(text) => {
                let mut hash = [0u8; 32];
                hex::decode_to_slice(text.trim(), &mut hash).map_err(|_| {
                    (
                        key("token_sha256"),
                        "must be 64 hex characters: the SHA-256 of the token (`cloud-ingest hash-token`)"
                            .into(),
                    )
                })?;
                Some(hash)
            }
            None if raw.tls.as_ref().is_some_and(|t| t.client_ca_file.is_some()) => None,
            None => {
                return Err((
                    key("token_sha256"),
                    "is required: the SHA-256 of the device's token (`cloud-ingest hash-token`); a device may go without one only when tls.client_ca_file is set, and then logs in with its certificate".into(),
                ));
            }
        };
        let own = DeviceRate {
            records_per_second: rate(
                key("records_per_second"),
                d.records_per_second.map(u64::from),
            )?,
            bytes_per_second: bytes_rate(key("bytes_per_second"), d.bytes_per_second.as_ref())?,
        };
        let device_rate = DeviceRate {
            records_per_second: own.records_per_second.or(default_rate.records_per_second),
            bytes_per_second: own.bytes_per_second.or(default_rate.bytes_per_second),
        };
        if device_rate.records_per_second.is_some() || device_rate.bytes_per_second.is_some() {
            device_rates.insert(d.id.clone(), device_rate);
        }
        let device = Device {
            tenant: d.tenant,
            token_sha256,
        };
        if devices.insert(d.id.clone(), device).is_some() {
            return Err((key("id"), format!("device {:?} is listed twice", d.id)));
        }
    }
    let size = |key: &str, text: &str| -> Result<usize, (String, String)> {
        let bytes = text
            .parse::<bytesize::ByteSize>()
            .map_err(|e| {
                (
                    format!("limits.{key}"),
                    format!("{text:?} is not a size like \"8MiB\": {e}"),
                )
            })?
            .as_u64();
        usize::try_from(bytes)
            .ok()
            .filter(|&b| b > 0)
            .ok_or_else(|| (format!("limits.{key}"), "must be above 0".into()))
    };
    let limits = RequestLimits {
        max_body_bytes: size("max_body_bytes", &raw.limits.max_body_bytes)?,
        max_decompressed_bytes: size("max_decompressed_bytes", &raw.limits.max_decompressed_bytes)?,
        max_records_per_batch: positive(
            "limits.max_records_per_batch",
            raw.limits.max_records_per_batch,
        )?,
        max_concurrent_requests: positive(
            "limits.max_concurrent_requests",
            raw.limits.max_concurrent_requests,
        )?,
        header_timeout: positive_duration("limits.header_timeout", &raw.limits.header_timeout)?,
        body_timeout: positive_duration("limits.body_timeout", &raw.limits.body_timeout)?,
        max_decoding_bytes: size("max_decoding_bytes", &raw.limits.max_decoding_bytes)?,
    };
    let largest = limits.decoding_cost(limits.max_body_bytes, limits.max_decompressed_bytes);
    // Compared in the KiB the budget is counted in.
    if limits.max_decoding_bytes / 1024 < largest.div_ceil(1024) {
        return Err((
            "limits.max_decoding_bytes".into(),
            format!(
                "must be at least what the largest request may cost ({} MiB with these limits: the body, 2.5 times its decompressed size, the zstd window and 1,928 bytes per record), or such a request could never be decoded",
                largest.div_ceil(1 << 20)
            ),
        ));
    }
    let read_api = read_api(raw.read_api, &devices)?;
    let sink = validate_sink(raw.sink, &raw.topic_template)?;
    let clock_skew_threshold = duration("clock_skew_threshold", &raw.clock_skew_threshold)?;
    if raw
        .metrics_listen
        .is_some_and(|m| m == raw.listen && m.port() != 0)
    {
        return Err((
            "metrics_listen".into(),
            "must be another address than listen (it takes /metrics off the public port)".into(),
        ));
    }
    Ok(IngestConfig {
        listen: raw.listen,
        metrics_listen: raw.metrics_listen,
        topic_template: raw.topic_template,
        devices,
        device_rates,
        tls: raw.tls,
        sink,
        limits,
        read_api,
        clock_skew_threshold,
    })
}

fn positive(key: &str, n: usize) -> Result<usize, (String, String)> {
    if n == 0 {
        return Err((key.to_owned(), "must be above 0".to_owned()));
    }
    Ok(n)
}

fn positive_duration(key: &str, text: &str) -> Result<Duration, (String, String)> {
    let d = duration(key, text)?;
    if d.is_zero() {
        return Err((key.to_owned(), "must be above 0".to_owned()));
    }
    Ok(d)
}

fn duration(key: &str, text: &str) -> Result<Duration, (String, String)> {
    humantime::parse_duration(text).map_err(|e| {
        (
            key.to_owned(),
            format!("{text:?} is not a duration like \"5s\": {e}"),
        )
    })
}

fn validate_sink(raw: RawSink, topic_template: &str) -> Result<SinkConfig, (String, String)> {
    Ok(match raw {
        RawSink::Embedded(e) => {
            let max_age = match e.max_age.trim() {
                "forever" => None,
                text => Some(
                    positive_duration("sink.options.max_age", text)
                        .map_err(|(key, reason)| (key, format!("{reason} (or \"forever\")")))?,
                ),
            };
            let max_bytes_per_topic = match &e.max_bytes_per_topic {
                None => None,
                Some(text) => Some(
                    text.parse::<bytesize::ByteSize>()
                        .map_err(|err| {
                            (
                                "sink.options.max_bytes_per_topic".to_owned(),
                                format!("{text:?} is not a size like \"10GiB\": {err}"),
                            )
                        })?
                        .as_u64()
                        .max(1),
                ),
            };
            SinkConfig::Embedded {
                path: e.path,
                retention: Retention {
                    max_age,
                    max_bytes_per_topic,
                },
            }
        }
        RawSink::Kafka(k) => {
            if k.brokers.trim().is_empty() {
                return Err((
                    "sink.options.brokers".into(),
                    "must list at least one host:port".into(),
                ));
            }
            if !["zstd", "lz4", "snappy", "gzip", "none"].contains(&k.compression.as_str()) {
                return Err((
                    "sink.options.compression".into(),
                    format!(
                        "{:?} is not one of zstd, lz4, snappy, gzip, none",
                        k.compression
                    ),
                ));
            }
            if let Some(fixed) = k.properties.keys().find(|p| {
                KAFKA_FIXED_PROPERTIES.contains(&p.as_str())
                    || p.as_str() == "compression.type"
                    || p.as_str() == "linger.ms"
            }) {
                return Err((
                    format!("sink.options.properties.{fixed}"),
                    "is set by the ingest (brokers, compression, linger and delivery_timeout are options of their own; idempotence, acks=all and ordering are not negotiable)".into(),
                ));
            }
            let delivery_timeout = duration("sink.options.delivery_timeout", &k.delivery_timeout)?;
            if delivery_timeout < Duration::from_secs(1) {
                return Err((
                    "sink.options.delivery_timeout".into(),
                    "must be at least 1s".into(),
                ));
            }
            SinkConfig::Kafka(KafkaConfig {
                brokers: k.brokers,
                compression: k.compression,
                linger: duration("sink.options.linger", &k.linger)?,
                delivery_timeout,
                properties: k.properties,
            })
        }
        RawSink::Nats(n) => {
            if !n.url.starts_with("nats://") && !n.url.starts_with("tls://") {
                return Err((
                    "sink.options.url".into(),
                    format!("{:?} is not a nats:// or tls:// URL", n.url),
                ));
            }
            if n.stream.is_empty()
                || n.stream
                    .contains(|c: char| c == '.' || c == '*' || c == '>' || c.is_whitespace())
            {
                return Err((
                    "sink.options.stream".into(),
                    format!(
                        "{:?} is not a JetStream stream name (no '.', '*', '>' or spaces)",
                        n.stream
                    ),
                ));
            }
            let subjects = match n.subjects {
                Some(s) if !s.is_empty() => s,
                Some(_) => {
                    return Err((
                        "sink.options.subjects".into(),
                        "must list at least one subject".into(),
                    ));
                }
                None => {
                    let prefix = topic_template.split('{').next().unwrap_or_default();
                    if prefix.is_empty() || !prefix.ends_with('.') {
                        return Err((
                            "sink.options.subjects".into(),
                            format!(
                                "cannot be derived from topic_template {topic_template:?} (it must start with a fixed prefix ending in '.', like \"iot.\"); list the stream's subjects"
                            ),
                        ));
                    }
                    vec![format!("{prefix}>")]
                }
            };
            if n.replicas == 0 {
                return Err(("sink.options.replicas".into(), "must be at least 1".into()));
            }
            SinkConfig::Nats(NatsConfig {
                url: n.url,
                stream: n.stream,
                subjects,
                create_stream: n.create_stream,
                duplicate_window: duration("sink.options.duplicate_window", &n.duplicate_window)?,
                replicas: n.replicas,
                ack_timeout: duration("sink.options.ack_timeout", &n.ack_timeout)?,
            })
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "
version: 1
listen: 127.0.0.1:0
devices:
  - id: dev-1
    tenant: acme
    token_sha256: 2bb80d537b1da3e38bd30361aa855686bde0eacd7162fef6a25fe97bf527a25b
sink:
  type: embedded
  options:
    path: /tmp/log.db
";

    #[test]
    fn good_config() {
        let c = IngestConfig::parse(Path::new("i.yaml"), GOOD).expect("valid");
        assert_eq!(c.devices["dev-1"].tenant, "acme");
        assert_eq!(c.limits.max_records_per_batch, 10_000);
        assert_eq!(c.limits.max_body_bytes, 8 << 20);
    }

    #[test]
    fn the_read_api_is_off_by_default_and_never_open_for_a_loopback_address_alone() {
        let c = IngestConfig::parse(Path::new("i.yaml"), GOOD).expect("valid");
        assert_eq!(c.read_api, ReadApi::Disabled);
        let on = format!("{GOOD}read_api: {{ enabled: true }}\n");
        let err = IngestConfig::parse(Path::new("i.yaml"), &on)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("read_api") && err.contains("allow_without_token"),
            "{err}"
        );
        let tenant = format!(
            "{GOOD}read_api: {{ enabled: true, tenant_tokens: [{{ tenant: acme, token_sha256: {} }}] }}\n",
            "ab".repeat(32)
        );
        assert_eq!(
            IngestConfig::parse(Path::new("i.yaml"), &tenant)
                .expect("valid")
                .read_api,
            ReadApi::Tokens(vec![ReadToken {
                sha256: [0xab; 32],
                tenant: Some("acme".into())
            }])
        );
        let typo = tenant.replace("[{ tenant: acme", "[{ tenant: acne");
        let err = IngestConfig::parse(Path::new("i.yaml"), &typo)
            .unwrap_err()
            .to_string();
        assert!(err.contains("read_api.tenant_tokens[0].tenant"), "{err}");
        let open = format!("{GOOD}read_api: {{ enabled: true, allow_without_token: true }}\n");
        assert_eq!(
            IngestConfig::parse(Path::new("i.yaml"), &open)
                .expect("valid")
                .read_api,
            ReadApi::Open
        );
        let both = format!(
            "{GOOD}read_api: {{ enabled: true, allow_without_token: true, token_sha256: {} }}\n",
            "ab".repeat(32)
        );
        assert!(IngestConfig::parse(Path::new("i.yaml"), &both).is_err());
    }

    #[test]
    fn embedded_retention() {
        let parse = |options: &str| {
            IngestConfig::parse(
                Path::new("i.yaml"),
                &GOOD.replace(
                    "    path: /tmp/log.db",
                    &format!("    path: /tmp/log.db\n{options}"),
                ),
            )
        };
        let retention = |c: IngestConfig| match c.sink {
            SinkConfig::Embedded { retention, .. } => retention,
            other => panic!("{other:?}"),
        };
        assert_eq!(retention(parse("").expect("valid")).max_age, None);
        assert_eq!(
            retention(parse("    max_age: 7d").expect("valid")).max_age,
            Some(Duration::from_secs(7 * 86_400))
        );
        let r =
            retention(parse("    max_age: forever\n    max_bytes_per_topic: 1GiB").expect("valid"));
        assert_eq!((r.max_age, r.max_bytes_per_topic), (None, Some(1 << 30)));
        for (bad, key) in [
            ("    max_age: soon", "sink.options.max_age"),
            (
                "    max_bytes_per_topic: lots",
                "sink.options.max_bytes_per_topic",
            ),
        ] {
            let err = parse(bad).unwrap_err().to_string();
            assert!(err.contains(key), "{err}");
        }
    }

    #[test]
    fn stateless_sinks() {
        let kafka = GOOD.replace(
            "type: embedded\n  options:\n    path: /tmp/log.db",
            "type: kafka\n  options:\n    brokers: k1:9092,k2:9092\n    properties:\n      security.protocol: plaintext",
        );
        match IngestConfig::parse(Path::new("i.yaml"), &kafka)
            .expect("valid")
            .sink
        {
            SinkConfig::Kafka(k) => {
                assert_eq!(k.compression, "zstd");
                assert_eq!(k.linger, Duration::from_millis(5));
                assert_eq!(k.properties["security.protocol"], "plaintext");
            }
            other => panic!("{other:?}"),
        }
        let nats = GOOD.replace(
            "type: embedded\n  options:\n    path: /tmp/log.db",
            "type: nats\n  options:\n    url: nats://127.0.0.1:4222",
        );
        match IngestConfig::parse(Path::new("i.yaml"), &nats)
            .expect("valid")
            .sink
        {
            SinkConfig::Nats(n) => {
                assert_eq!(n.subjects, vec!["iot.>".to_owned()]);
                assert_eq!(n.stream, "IOT");
                assert_eq!(n.duplicate_window, Duration::from_secs(120));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_annotated_example_is_valid() {
        let c = IngestConfig::parse(
            Path::new("config/cloud-ingest.yaml"),
            include_str!("../../config/cloud-ingest.yaml"),
        )
        .expect("config/cloud-ingest.yaml is valid");
        assert_eq!(
            c.devices["demo-device"].token_sha256,
            Some(crate::auth::hash_token("demo-token-change-me"))
        );
    }

    #[test]
    fn errors_name_file_key_and_reason() {
        let cases = [
            (
                GOOD.replace("tenant: acme", "tenant: acme\n    colour: red"),
                "devices[0]",
                "unknown field `colour`",
            ),
            (
                GOOD.replace("token_sha256: 2bb8", "token_sha256: zz"),
                "devices[0].token_sha256",
                "64 hex",
            ),
            (
                GOOD.replace("type: embedded", "type: kafkaa"),
                "sink",
                "unknown variant `kafkaa`",
            ),
            (
                GOOD.replace("version: 1", "version: 2"),
                "version",
                "unsupported version 2",
            ),
            (
                GOOD.replace("    path: /tmp/log.db", "    path: /tmp/log.db\n    extra: 1"),
                "sink.options",
                "unknown field `extra`",
            ),
            (
                GOOD.replace("  options:\n    path: /tmp/log.db", "  path: /tmp/log.db"),
                "sink.path",
                "expected \"type\" or \"options\"",
            ),
            (
                GOOD.replace(
                    "type: embedded\n  options:\n    path: /tmp/log.db",
                    "type: kafka\n  options:\n    brokers: k:9092\n    properties:\n      acks: \"1\"",
                ),
                "sink.options.properties.acks",
                "not negotiable",
            ),
            (
                GOOD.replace(
                    "type: embedded\n  options:\n    path: /tmp/log.db",
                    "type: kafka\n  options:\n    brokers: k:9092\n    compression: brotli",
                ),
                "sink.options.compression",
                "\"brotli\" is not one of",
            ),
            (
                GOOD.replace(
                    "type: embedded\n  options:\n    path: /tmp/log.db",
                    "type: nats\n  options:\n    url: http://n:4222",
                ),
                "sink.options.url",
                "not a nats://",
            ),
            (
                format!("{GOOD}topic_template: \"{{tenant}}.{{stream}}\"\n").replace(
                    "type: embedded\n  options:\n    path: /tmp/log.db",
                    "type: nats\n  options:\n    url: nats://n:4222",
                ),
                "sink.options.subjects",
                "cannot be derived",
            ),
            (
                format!("{GOOD}clock_skew_threshold: soon\n"),
                "clock_skew_threshold",
                "not a duration",
            ),
            (
                format!("{GOOD}limits:\n  max_body_bytes: lots\n"),
                "limits.max_body_bytes",
                "not a size",
            ),
            (
                format!("{GOOD}topic_template: iot.{{stream}}\n"),
                "topic_template",
                "{tenant}",
            ),
        ];
        for (text, key, reason) in cases {
            let err = IngestConfig::parse(Path::new("conf/i.yaml"), &text)
                .unwrap_err()
                .to_string();
            assert!(err.starts_with("conf/i.yaml: "), "{err}");
            assert!(err.contains(key), "{err} should name {key}");
            assert!(err.contains(reason), "{err} should say {reason}");
        }
    }
}
