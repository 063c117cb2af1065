//! The device's YAML config: parsed into raw serde structs with typed durations, sizes and
//! counts (`raw`), then a pure `validate` into the domain types below, then the start-up I/O
//! of `startup` (the token, the buffer's volume). Every error names the file, the key path and
//! the reason, e.g. `config/agent.yaml: streams[2].priority: unknown variant "urgent" …`.
//!
//! - `raw`: the file as written, and every default.
//! - this module: the domain types, the checks of the top level and of each stream, and the
//!   rules across sections (a stream or a source needed, the attribute names of a stream).
//! - `ingest`, `mqtt`, `sources`, `transforms`: each section's checks.
//! - `startup`: what needs I/O, done once at start ([`resolve_token`], [`check_buffer_volume`]).

mod ingest;
mod mqtt;
mod raw;
mod sources;
mod startup;
#[cfg(test)]
mod tests;
mod transforms;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use config_types::ConfigError;

use crate::batcher::{Order, SchedulePolicy};
use crate::routing::{Priority, TopicFilter};
use crate::source::file::FileSourceConfig;
use crate::source::mqtt::MqttSourceConfig;
use crate::transform::{Spec, Step};
use raw::RawConfig;
pub use raw::{DRAIN_MAX_BYTES, DRAIN_MAX_RECORDS};
pub use startup::{check_buffer_volume, resolve_token};

/// What is wrong where: (key path, reason).
type Invalid = (String, String);

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
    /// A group closes before its window ends once no record came for this long (at most
    /// `commit_window`; equal to it, the window is waited whole).
    pub commit_gap: Duration,
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
            max_records: raw::MAX_RECORDS,
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
        Self::parse(file, &config_types::read(file)?)
    }

    /// Parses and validates `text`; `file` is used in messages only.
    pub fn parse(file: &Path, text: &str) -> Result<AgentConfig, ConfigError> {
        let raw: RawConfig = config_types::parse(file, text)?;
        validate(raw).map_err(|(key, reason)| ConfigError::new(file, key, reason))
    }
}

/// The longest `buffer.commit_window` accepted.
pub const MAX_COMMIT_WINDOW: Duration = Duration::from_secs(1);

/// Pure: raw config to domain types, or (key path, reason).
fn validate(raw: RawConfig) -> Result<AgentConfig, Invalid> {
    if raw.version != 1 {
        return Err((
            "version".into(),
            format!("unsupported version {} (expected 1)", raw.version),
        ));
    }
    if !ingest_wire::valid_name(&raw.device_id) {
        return Err(("device_id".into(), config_types::NAME_RULE.into()));
    }
    let ingest = ingest::validate(raw.ingest)?;
    let mqtt = mqtt::validate(raw.mqtt)?;
    // A window set alone keeps the meaning it had before `commit_gap`: waited whole.
    let (commit_window, commit_gap) = match (raw.buffer.commit_window, raw.buffer.commit_gap) {
        (None, None) => (raw::DEFAULT_COMMIT.0.0, raw::DEFAULT_COMMIT.1.0),
        (Some(w), None) => (w.0, w.0),
        (w, Some(g)) => (w.unwrap_or(raw::DEFAULT_COMMIT.0).0, g.0),
    };
    if commit_window > MAX_COMMIT_WINDOW {
        return Err((
            "buffer.commit_window".into(),
            format!(
                "{} is too long: every QoS 1 publish may wait that long for its PUBACK; at most {} (a few ms is what saves flash)",
                humantime::format_duration(commit_window),
                humantime::format_duration(MAX_COMMIT_WINDOW)
            ),
        ));
    }
    if commit_gap > commit_window {
        let window = if raw.buffer.commit_window.is_some() {
            format!("{}", humantime::format_duration(commit_window))
        } else {
            format!(
                "{}, the default; set buffer.commit_window too",
                humantime::format_duration(commit_window)
            )
        };
        return Err((
            "buffer.commit_gap".into(),
            format!(
                "{} is longer than buffer.commit_window ({window}): a commit never waits longer than its window; make the gap shorter, or leave it out",
                humantime::format_duration(commit_gap)
            ),
        ));
    }
    let buffer = BufferConfig {
        path: raw.buffer.path,
        quota_bytes: raw.buffer.quota_bytes.get(),
        commit_window,
        commit_gap,
        queue_records: raw.buffer.queue_records.get(),
        queue_bytes: raw.buffer.queue_bytes.get(),
        reserve_bytes: raw.buffer.reserve_bytes.map(config_types::Size::get),
    };
    let mut streams = Vec::with_capacity(raw.streams.len() + 1);
    for (i, s) in raw.streams.into_iter().enumerate() {
        let key = |field: &str| format!("streams[{i}].{field}");
        if !ingest_wire::valid_name(&s.name) {
            return Err((
                key("name"),
                format!("{:?} {}", s.name, config_types::NAME_RULE),
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
        let topics = topic_filters(&key("topics"), &s.topics)?;
        let batch = BatchTriggers {
            max_records: s.batch.max_records.get(),
            max_bytes: s.batch.max_bytes.get(),
            linger: s.batch.linger.0,
            drain_max_records: s.batch.drain_max_records.get(),
            drain_max_bytes: s.batch.drain_max_bytes.get(),
        };
        let ttl = s.ttl.map(|t| t.0);
        let zstd_level = ingest::zstd_level(
            &key("zstd_level"),
            s.zstd_level.unwrap_or(ingest.zstd_level),
        )?;
        let transforms = s
            .transforms
            .into_iter()
            .enumerate()
            .map(|(j, t)| transforms::validate(&format!("streams[{i}].transforms[{j}]"), t))
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
                return Err(("default_stream".into(), config_types::NAME_RULE.into()));
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
    let schedule = SchedulePolicy {
        weights: [w.high.get(), w.normal.get(), w.bulk.get()],
        starvation_bound: raw.scheduling.starvation_bound.0,
    };
    let (sources, mqtt_sources) = sources::validate(
        raw.sources,
        &streams,
        &raw.device_id,
        mqtt.max_payload_bytes,
    )?;
    if !mqtt.enabled && sources.is_empty() && mqtt_sources.is_empty() {
        return Err((
            "mqtt.enabled".into(),
            "false, and no sources: nothing would feed the agent (declare a file or mqtt source, or enable mqtt)".into(),
        ));
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

/// The MQTT topic filters of the list at `key` (`key[j]` names a bad one).
fn topic_filters(key: &str, list: &[String]) -> Result<Vec<TopicFilter>, Invalid> {
    list.iter()
        .enumerate()
        .map(|(j, t)| {
            TopicFilter::new(t).ok_or_else(|| {
                (
                    format!("{key}[{j}]"),
                    format!("{t:?} is not a valid MQTT topic filter"),
                )
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
