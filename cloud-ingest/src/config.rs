//! The ingest's YAML config: parsed into raw serde structs with typed durations, sizes and
//! counts (`raw`), then a pure `validate` into the domain types below. Every error names the
//! file, the key path and the reason ([`ConfigError`]).
//!
//! - `raw`: the file as written, and every default.
//! - this module: the domain types; the devices, limits and read API checks.
//! - `sink`: the stream log's section.

mod raw;
mod sink;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use config_types::ConfigError;
use serde::Deserialize;

use raw::{RawConfig, RawReadApi};

/// What is wrong where: (key path, reason).
type Invalid = (String, String);

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
        /// Most topics (streams) one tenant may create in the log; a batch for a new one past
        /// it is refused with 400 and why (`max_topics_per_tenant`, 1,000 by default).
        max_topics_per_tenant: u64,
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
    /// never more than the output), and `record_bytes` per decoded record (the record and its
    /// attributes: [`ingest_wire::BodyVersion::decoded_record_bytes`]).
    pub fn decoding_cost(&self, body_bytes: usize, raw_bound: usize, record_bytes: usize) -> usize {
        let window = raw_bound.min(1 << ingest_wire::MAX_WINDOW_LOG);
        body_bytes
            .saturating_add(raw_bound.saturating_mul(5) / 2)
            .saturating_add(window)
            .saturating_add(self.max_records_per_batch.saturating_mul(record_bytes))
    }
}

impl IngestConfig {
    /// Reads and validates `file`.
    pub fn load(file: &Path) -> Result<IngestConfig, ConfigError> {
        Self::parse(file, &config_types::read(file)?)
    }

    /// Parses and validates `text` as the content of `file` (used in messages only).
    pub fn parse(file: &Path, text: &str) -> Result<IngestConfig, ConfigError> {
        let raw: RawConfig = config_types::parse(file, text)?;
        validate(raw).map_err(|(key, reason)| ConfigError::new(file, key, reason))
    }
}

/// Pure: raw config to domain types, or (key path, reason).
fn validate(raw: RawConfig) -> Result<IngestConfig, Invalid> {
    if raw.version != 1 {
        return Err((
            "version".into(),
            format!("unsupported version {} (expected 1)", raw.version),
        ));
    }
    let naming = crate::naming::Naming::parse(&raw.topic_template)
        .map_err(|e| ("topic_template".to_owned(), e))?;
    let default_rate = DeviceRate {
        records_per_second: raw.limits.device_records_per_second,
        bytes_per_second: raw.limits.device_bytes_per_second.map(|b| b.0),
    };
    let mut device_rates = HashMap::new();
    let mut devices = HashMap::new();
    for (i, d) in raw.devices.into_iter().enumerate() {
        let key = |field: &str| format!("devices[{i}].{field}");
        if !ingest_wire::valid_name(&d.id) {
            return Err((key("id"), config_types::NAME_RULE.into()));
        }
        if !ingest_wire::valid_name(&d.tenant) {
            return Err((key("tenant"), config_types::NAME_RULE.into()));
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
            records_per_second: d.records_per_second,
            bytes_per_second: d.bytes_per_second.map(|b| b.0),
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
    let l = &raw.limits;
    for (key, timeout) in [
        ("limits.header_timeout", l.header_timeout),
        ("limits.body_timeout", l.body_timeout),
    ] {
        if timeout.0.is_zero() {
            return Err((key.into(), "must be above 0".into()));
        }
    }
    let limits = RequestLimits {
        max_body_bytes: l.max_body_bytes.get(),
        max_decompressed_bytes: l.max_decompressed_bytes.get(),
        max_records_per_batch: l.max_records_per_batch.get(),
        max_concurrent_requests: l.max_concurrent_requests.get(),
        header_timeout: l.header_timeout.0,
        body_timeout: l.body_timeout.0,
        max_decoding_bytes: l.max_decoding_bytes.get(),
    };
    let largest = limits.decoding_cost(
        limits.max_body_bytes,
        limits.max_decompressed_bytes,
        ingest_wire::DECODED_RECORD_BYTES_V2,
    );
    // Compared in the KiB the budget is counted in.
    if limits.max_decoding_bytes / 1024 < largest.div_ceil(1024) {
        return Err((
            "limits.max_decoding_bytes".into(),
            format!(
                "must be at least what the largest request may cost ({} MiB with these limits: the body, 2.5 times its decompressed size, the zstd window and 2,616 bytes per record), or such a request could never be decoded",
                largest.div_ceil(1 << 20)
            ),
        ));
    }
    let read_api = read_api(raw.read_api, &devices)?;
    let sink = sink::validate(raw.sink, &raw.topic_template)?;
    let clock_skew_threshold = raw.clock_skew_threshold.0;
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

/// The read API's access from its config section; `devices` name the tenants that exist.
fn read_api(raw: RawReadApi, devices: &HashMap<String, Device>) -> Result<ReadApi, Invalid> {
    let hash = |key: String, hex_text: &str| {
        let mut sha256 = [0u8; 32];
        hex::decode_to_slice(hex_text.trim(), &mut sha256).map_err(|_| {
            (
                key,
                "must be 64 hex characters: the SHA-256 of the token (`cloud-ingest hash-token`)"
                    .to_owned(),
            )
        })?;
        Ok::<_, Invalid>(sha256)
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
