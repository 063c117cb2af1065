//! The agent's Prometheus metrics (every name is a constant here) and the small HTTP server
//! for `/metrics`, `/healthz` and `/readyz`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::http::StatusCode;

use prometheus::{
    Counter, Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};
use tokio_util::sync::CancellationToken;

/// Records received from the broker, per stream.
pub const RECORDS_RECEIVED: &str = "agent_records_received_total";
/// Records committed to the buffer, per stream.
pub const RECORDS_BUFFERED: &str = "agent_records_buffered_total";
/// Records acknowledged by the ingest and deleted, per stream (a delete may wait up to
/// [`crate::buffer::ACK_LINGER`] to share the next commit).
pub const RECORDS_DELIVERED: &str = "agent_records_delivered_total";
/// Records the ingest rejected, kept in the dead-letter table, per stream.
pub const RECORDS_DEAD_LETTERED: &str = "agent_records_dead_lettered_total";
/// Records lost, per stream and reason (`quota`, `ttl`, `disk_full`, `corrupt_buffer`,
/// `broker_overflow`, `stop_failed`).
pub const RECORDS_DROPPED: &str = "agent_records_dropped_total";
/// Records a stream's transforms chose not to send, per stream and reason (`filter`,
/// `deadband`, `window`, `unparsable`): not losses, never in loss reports.
pub const RECORDS_FILTERED: &str = "agent_records_filtered_total";
/// Payloads a transform step could not read, per stream, step (`enrich`, `filter`, `deadband`,
/// `window`) and what its `on_error` did (`passed`, `dropped`).
pub const TRANSFORM_UNPARSABLE: &str = "agent_transform_unparsable_total";
/// Readings a deadband or window step passed unchanged, or topics a deadband forgot, for its
/// bounds (topics over 1 KiB, more than 10,000 topics), per stream and step.
pub const TRANSFORM_STATE_FULL: &str = "agent_transform_state_full_total";
/// File source events, per source: `rotated` (a file left its path), `truncated` (read again
/// from its start), `line_cut` (a line over `max_line_bytes`), `too_many_files`.
pub const FILE_SOURCE_EVENTS: &str = "agent_file_source_events_total";
/// Records in the buffer, per stream.
pub const BACKLOG_RECORDS: &str = "agent_backlog_records";
/// Bytes in the buffer (quota cost), per stream.
pub const BACKLOG_BYTES: &str = "agent_backlog_bytes";
/// Batch requests per stream and outcome.
pub const BATCHES: &str = "agent_batches_total";
/// Compressed body bytes sent.
pub const WIRE_BYTES: &str = "agent_wire_bytes_total";
/// Topic + payload bytes of the records sent (before compression).
pub const RAW_BYTES: &str = "agent_raw_bytes_total";
/// 1 while the last request reached the ingest, 0 otherwise.
pub const LINK_UP: &str = "agent_link_up";
/// Seconds batches waited for the uplink's bandwidth cap (`ingest.max_upload_rate`).
pub const RATE_LIMITED_SECONDS: &str = "agent_rate_limited_seconds_total";
/// Switches from one ingest replica (`ingest.urls`) to the next after a failed request.
pub const INGEST_FAILOVERS: &str = "agent_ingest_failovers_total";
/// Index in `ingest.urls` of the replica requests go to now.
pub const INGEST_CURRENT: &str = "agent_ingest_current";
/// The body version (1 or 2, `SPEC.md`) of the last batch prepared; 0 before the first.
pub const BODY_VERSION: &str = "agent_ingest_body_version";
/// 1 while the ingest refuses our credentials (401/403): an operator must act.
pub const AUTH_ALARM: &str = "agent_auth_alarm";
/// Reloads (SIGHUP), by outcome: `applied`, or `refused` (the file did not pass its checks;
/// the running config stays).
pub const CONFIG_RELOADS: &str = "agent_config_reloads_total";
/// Id of the zstd dictionary a stream's batches are compressed with now (0: none), per stream.
pub const STREAM_DICTIONARY: &str = "agent_stream_dictionary_id";
/// Each stream in force and its priority class (0 bulk, 1 normal, 2 high, 3 critical).
pub const STREAM_PRIORITY: &str = "agent_stream_priority";
/// Dictionary registrations at an ingest replica (`PUT /v1/dictionaries/{id}`).
pub const DICTIONARY_REGISTRATIONS: &str = "agent_dictionary_registrations_total";
/// Batches read ahead (read and compressed while the stream's previous request was in flight),
/// per stream, by fate: `sent` next, or `dropped` (the previous one failed, or it went stale)
/// and read again.
pub const BATCHES_READ_AHEAD: &str = "agent_batches_read_ahead_total";
/// Buffer commit durations.
pub const COMMIT_SECONDS: &str = "agent_buffer_commit_seconds";
/// Corrupt buffer files moved aside at start.
pub const BUFFER_QUARANTINED: &str = "agent_buffer_quarantined_total";
/// Records read back from quarantined buffer files.
pub const BUFFER_SALVAGED: &str = "agent_buffer_salvaged_records_total";
/// Buffer commits refused because the disk was full (room made by eviction, then retried).
pub const DISK_FULL: &str = "agent_buffer_disk_full_total";
/// Failed buffer commits (retried).
pub const COMMIT_ERRORS: &str = "agent_buffer_commit_errors_total";
/// QoS 1/2 publishes refused to their sender (not acknowledged) because the disk could not
/// take them even after evicting everything the policy allows.
pub const PUBLISHES_REFUSED: &str = "agent_mqtt_publishes_refused_total";
/// MQTT connections refused for their credentials (or anonymous when that is off).
pub const MQTT_AUTH_FAILURES: &str = "agent_mqtt_auth_failures_total";
/// Publishes and subscriptions denied by `mqtt.acl`, by action.
pub const MQTT_DENIED: &str = "agent_mqtt_denied_total";
/// MQTT connections refused over `mqtt.max_connections`.
pub const MQTT_REFUSED: &str = "agent_mqtt_connections_refused_total";
/// QoS 1/2 resends (DUP) of publishes already kept: acknowledged again, not stored again.
pub const MQTT_RESENDS: &str = "agent_mqtt_resends_total";
/// QoS 0 publishes shed over `mqtt.rate_limit` (not stored).
pub const MQTT_SHED: &str = "agent_mqtt_shed_total";
/// Retained publishes over `mqtt.retained` (passed on without their retain flag).
pub const MQTT_RETAINED_REFUSED: &str = "agent_mqtt_retained_refused_total";
/// Bytes (topics and payloads) the embedded broker retains.
pub const MQTT_RETAINED_BYTES: &str = "agent_mqtt_retained_bytes";
/// MQTT connections open now (both listeners, from the TCP accept on).
pub const MQTT_CONNECTIONS: &str = "agent_mqtt_connections";
/// MQTT connections whose relay to the embedded broker (local pub/sub) is open now: those
/// that subscribed, or published while someone on the gateway subscribed, or retained.
pub const MQTT_LOCAL_RELAYS: &str = "agent_mqtt_local_relays";
/// Will messages of clients that vanished without DISCONNECT, kept in the buffer.
pub const MQTT_WILLS: &str = "agent_mqtt_wills_total";
/// QoS 0 copies for local subscribers dropped because the embedded broker lagged.
pub const LOCAL_COPIES_DROPPED: &str = "agent_mqtt_local_copies_dropped_total";
/// 1 while the buffer's disk is full (the file may not grow; room is made by eviction).
pub const BUFFER_DISK_FULL: &str = "agent_buffer_disk_full";
/// Records received and waiting in memory for the buffer writer.
pub const BUFFER_QUEUE_RECORDS: &str = "agent_buffer_queue_records";
/// Bytes of records queued in memory for the buffer writer (`buffer.queue_bytes` bounds it).
pub const BUFFER_QUEUE_BYTES: &str = "agent_buffer_queue_bytes";
/// Seconds since the buffer last committed (it commits at least once a second, plus the commit
/// window, while running).
pub const BUFFER_LAST_COMMIT_AGE: &str = "agent_buffer_last_commit_age_seconds";
/// Per stream, seconds since its oldest record still held was received (0: none held).
pub const OLDEST_UNDELIVERED_AGE: &str = "agent_oldest_undelivered_age_seconds";
/// Bytes the agent process wrote to disk (`/proc/self/io` `write_bytes`: WAL, checkpoints,
/// database), since it started. The kernel counts a page-cache folio each time one turns dirty
/// (up to 2 MiB on kernels with large folios), and not the file system's own journal writes;
/// what the device received is in BENCHMARKS.md ("Flash wear, at the device").
pub const DISK_WRITTEN: &str = "agent_disk_written_bytes_total";
/// Topic and payload bytes of the records committed to the buffer. An estimate of the flash
/// write amplification: `rate(agent_disk_written_bytes_total[5m]) / rate(agent_buffered_bytes_total[5m])`
/// (the device also receives the file system's journal: the flash bench measures it).
pub const BUFFERED_BYTES: &str = "agent_buffered_bytes_total";
/// 1 while delivery is stuck with the link up: records have waited longer than
/// `ingest.degraded_after`, the ingest answers, and nothing was delivered for that long.
pub const DEGRADED: &str = "agent_degraded";

/// Per stream, when its oldest record still held was received (Unix ms).
type OldestReceived = Vec<(String, Option<i64>)>;

/// Handles to every metric of the agent.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// See [`RECORDS_RECEIVED`].
    pub records_received: IntCounterVec,
    /// See [`RECORDS_BUFFERED`].
    pub records_buffered: IntCounterVec,
    /// See [`RECORDS_DELIVERED`].
    pub records_delivered: IntCounterVec,
    /// See [`RECORDS_DEAD_LETTERED`].
    pub records_dead_lettered: IntCounterVec,
    /// See [`RECORDS_DROPPED`].
    pub records_dropped: IntCounterVec,
    /// See [`RECORDS_FILTERED`].
    pub records_filtered: IntCounterVec,
    /// See [`TRANSFORM_UNPARSABLE`].
    pub transform_unparsable: IntCounterVec,
    /// See [`TRANSFORM_STATE_FULL`].
    pub transform_state_full: IntCounterVec,
    /// See [`FILE_SOURCE_EVENTS`].
    pub file_source_events: IntCounterVec,
    /// See [`BACKLOG_RECORDS`].
    pub backlog_records: IntGaugeVec,
    /// See [`BACKLOG_BYTES`].
    pub backlog_bytes: IntGaugeVec,
    /// [`STREAM_DICTIONARY`]
    pub stream_dictionary: IntGaugeVec,
    /// [`STREAM_PRIORITY`]
    pub stream_priority: IntGaugeVec,
    /// [`DICTIONARY_REGISTRATIONS`]
    pub dictionary_registrations: IntCounter,
    /// See [`BATCHES_READ_AHEAD`].
    pub batches_read_ahead: IntCounterVec,
    /// See [`BATCHES`].
    pub batches: IntCounterVec,
    /// See [`WIRE_BYTES`].
    pub wire_bytes: IntCounter,
    /// See [`RAW_BYTES`].
    pub raw_bytes: IntCounter,
    /// See [`LINK_UP`].
    pub link_up: IntGauge,
    /// See [`AUTH_ALARM`].
    pub auth_alarm: IntGauge,
    /// See [`CONFIG_RELOADS`].
    pub config_reloads: IntCounterVec,
    /// See [`RATE_LIMITED_SECONDS`].
    pub rate_limited_seconds: Counter,
    /// See [`INGEST_FAILOVERS`].
    pub ingest_failovers: IntCounter,
    /// See [`INGEST_CURRENT`].
    pub ingest_current: IntGauge,
    /// See [`BODY_VERSION`].
    pub body_version: IntGauge,
    /// See [`COMMIT_SECONDS`].
    pub commit_seconds: Histogram,
    /// See [`COMMIT_ERRORS`].
    pub commit_errors: IntCounter,
    /// See [`BUFFER_QUARANTINED`].
    pub buffer_quarantined: IntCounter,
    /// See [`BUFFER_SALVAGED`].
    pub buffer_salvaged: IntCounter,
    /// See [`DISK_FULL`].
    pub disk_full: IntCounter,
    /// See [`BUFFER_DISK_FULL`].
    pub buffer_disk_full: IntGauge,
    /// See [`PUBLISHES_REFUSED`].
    pub publishes_refused: IntCounter,
    /// See [`MQTT_REFUSED`].
    pub mqtt_refused: IntCounter,
    /// See [`MQTT_AUTH_FAILURES`].
    pub mqtt_auth_failures: IntCounter,
    /// See [`MQTT_DENIED`].
    pub mqtt_denied: IntCounterVec,
    /// See [`MQTT_RESENDS`].
    pub mqtt_resends: IntCounter,
    /// See [`MQTT_WILLS`].
    pub mqtt_wills: IntCounter,
    /// See [`MQTT_CONNECTIONS`].
    pub mqtt_connections: IntGauge,
    /// See [`MQTT_LOCAL_RELAYS`].
    pub mqtt_local_relays: IntGauge,
    /// See [`MQTT_SHED`].
    pub mqtt_shed: IntCounter,
    /// See [`MQTT_RETAINED_REFUSED`].
    pub mqtt_retained_refused: IntCounter,
    /// See [`MQTT_RETAINED_BYTES`].
    pub mqtt_retained_bytes: IntGauge,
    /// See [`LOCAL_COPIES_DROPPED`].
    pub local_copies_dropped: IntCounter,
    /// See [`BUFFER_QUEUE_BYTES`].
    pub buffer_queue_bytes: IntGauge,
    /// See [`BUFFER_QUEUE_RECORDS`].
    pub buffer_queue_records: IntGauge,
    /// See [`BUFFER_LAST_COMMIT_AGE`]; set from `last_commit_ms` when rendered.
    buffer_last_commit_age: prometheus::Gauge,
    last_commit_ms: Arc<std::sync::atomic::AtomicI64>,
    /// Whether the buffer's last commit succeeded: `/readyz` is 503 while commits fail.
    buffer_ok: Arc<AtomicBool>,
    /// See [`OLDEST_UNDELIVERED_AGE`]; set from `oldest_received` when rendered.
    oldest_undelivered_age: prometheus::GaugeVec,
    oldest_received: Arc<std::sync::Mutex<OldestReceived>>,
    /// See [`DISK_WRITTEN`]; brought up to `/proc/self/io` when rendered.
    disk_written: IntCounter,
    /// See [`BUFFERED_BYTES`].
    pub buffered_bytes: IntCounter,
    disk_written_seen: Arc<std::sync::atomic::AtomicU64>,
    /// See [`DEGRADED`]; computed when rendered.
    degraded: IntGauge,
    degraded_after_ms: Arc<std::sync::atomic::AtomicI64>,
    last_delivered_ms: Arc<std::sync::atomic::AtomicI64>,
    /// The last failure the forwarder met: when (Unix ms) and why.
    last_error: Arc<std::sync::Mutex<Option<(i64, String)>>>,
}

impl Metrics {
    /// Registers every metric in a fresh registry.
    pub fn new() -> Metrics {
        let registry = Registry::new();
        fn reg<C: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: C) -> C {
            r.register(Box::new(c.clone()))
                .expect("invariant: metric registered once");
            c
        }
        let counter = |name: &str, help: &str| {
            reg(
                &registry,
                IntCounter::new(name, help).expect("invariant: valid metric"),
            )
        };
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            reg(
                &registry,
                IntCounterVec::new(Opts::new(name, help), labels).expect("invariant: valid metric"),
            )
        };
        let gauge_vec = |name: &str, help: &str| {
            reg(
                &registry,
                IntGaugeVec::new(Opts::new(name, help), &["stream"])
                    .expect("invariant: valid metric"),
            )
        };
        let gauge = |name: &str, help: &str| {
            reg(
                &registry,
                IntGauge::new(name, help).expect("invariant: valid metric"),
            )
        };
        Metrics {
            records_received: counter_vec(
                RECORDS_RECEIVED,
                "Records received from the broker.",
                &["stream"],
            ),
            records_buffered: counter_vec(
                RECORDS_BUFFERED,
                "Records committed to the buffer.",
                &["stream"],
            ),
            records_delivered: counter_vec(
                RECORDS_DELIVERED,
                "Records acknowledged by the ingest.",
                &["stream"],
            ),
            records_dead_lettered: counter_vec(
                RECORDS_DEAD_LETTERED,
                "Records rejected by the ingest, kept as dead letters.",
                &["stream"],
            ),
            records_dropped: counter_vec(
                RECORDS_DROPPED,
                "Records lost, by reason.",
                &["stream", "reason"],
            ),
            records_filtered: counter_vec(
                RECORDS_FILTERED,
                "Records the stream's transforms chose not to send (not losses), by reason.",
                &["stream", "reason"],
            ),
            transform_unparsable: counter_vec(
                TRANSFORM_UNPARSABLE,
                "Payloads a transform step could not read, by step and what its on_error did.",
                &["stream", "transform", "action"],
            ),
            transform_state_full: counter_vec(
                TRANSFORM_STATE_FULL,
                "Readings a stateful step passed unchanged, or topics a deadband forgot, for its bounds.",
                &["stream", "transform"],
            ),
            file_source_events: counter_vec(
                FILE_SOURCE_EVENTS,
                "File source events: rotated, truncated, line_cut, too_many_files.",
                &["source", "event"],
            ),
            backlog_records: gauge_vec(BACKLOG_RECORDS, "Records in the buffer."),
            stream_dictionary: gauge_vec(
                STREAM_DICTIONARY,
                "Id of the zstd dictionary the stream's batches use (0: none).",
            ),
            dictionary_registrations: counter(
                DICTIONARY_REGISTRATIONS,
                "zstd dictionaries registered at an ingest replica.",
            ),
            batches_read_ahead: counter_vec(
                BATCHES_READ_AHEAD,
                "Batches read ahead while the stream's previous request was in flight, by fate (sent, dropped).",
                &["stream", "fate"],
            ),
            backlog_bytes: gauge_vec(BACKLOG_BYTES, "Bytes in the buffer (quota cost)."),
            stream_priority: gauge_vec(
                STREAM_PRIORITY,
                "Each stream in force and its priority class (0 bulk, 1 normal, 2 high, 3 critical).",
            ),
            batches: counter_vec(
                BATCHES,
                "Batch requests by outcome.",
                &["stream", "outcome"],
            ),
            wire_bytes: counter(WIRE_BYTES, "Compressed body bytes sent."),
            raw_bytes: counter(
                RAW_BYTES,
                "Topic and payload bytes sent, before compression.",
            ),
            link_up: gauge(LINK_UP, "1 while the ingest answers."),
            auth_alarm: gauge(AUTH_ALARM, "1 while the ingest refuses our credentials."),
            config_reloads: counter_vec(
                CONFIG_RELOADS,
                "Reloads (SIGHUP) by outcome: applied, or refused (the running config stays).",
                &["outcome"],
            ),
            rate_limited_seconds: reg(
                &registry,
                Counter::new(
                    RATE_LIMITED_SECONDS,
                    "Seconds batches waited for the bandwidth cap.",
                )
                .expect("invariant: valid metric"),
            ),
            ingest_failovers: counter(
                INGEST_FAILOVERS,
                "Switches to the next ingest replica after a failed request.",
            ),
            ingest_current: gauge(
                INGEST_CURRENT,
                "Index in ingest.urls of the replica in use.",
            ),
            body_version: gauge(
                BODY_VERSION,
                "Body version (1 or 2) of the last batch prepared.",
            ),
            commit_seconds: reg(
                &registry,
                Histogram::with_opts(
                    HistogramOpts::new(COMMIT_SECONDS, "Buffer commit durations.").buckets(vec![
                        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
                    ]),
                )
                .expect("invariant: valid metric"),
            ),
            commit_errors: counter(COMMIT_ERRORS, "Failed buffer commits (retried)."),
            buffer_quarantined: counter(
                BUFFER_QUARANTINED,
                "Corrupt buffer files moved aside at start.",
            ),
            buffer_salvaged: counter(
                BUFFER_SALVAGED,
                "Records read back from quarantined buffer files.",
            ),
            disk_full: counter(
                DISK_FULL,
                "Buffer commits refused for a full disk (room made, retried).",
            ),
            buffer_disk_full: gauge(
                BUFFER_DISK_FULL,
                "1 while the buffer's disk is full: room is made by eviction.",
            ),
            publishes_refused: counter(
                PUBLISHES_REFUSED,
                "QoS 1/2 publishes refused to their sender for a full disk.",
            ),
            mqtt_refused: counter(MQTT_REFUSED, "MQTT connections refused over the limit."),
            mqtt_auth_failures: counter(
                MQTT_AUTH_FAILURES,
                "MQTT connections refused for their credentials.",
            ),
            mqtt_denied: counter_vec(
                MQTT_DENIED,
                "Publishes and subscriptions denied by the ACL.",
                &["action"],
            ),
            mqtt_resends: counter(
                MQTT_RESENDS,
                "Resends of publishes already kept: acknowledged, not stored again.",
            ),
            mqtt_connections: gauge(MQTT_CONNECTIONS, "MQTT connections open now."),
            mqtt_local_relays: gauge(
                MQTT_LOCAL_RELAYS,
                "MQTT connections with a relay open to the embedded broker (local pub/sub).",
            ),
            buffer_queue_bytes: gauge(
                BUFFER_QUEUE_BYTES,
                "Bytes of records queued in memory for the buffer writer.",
            ),
            mqtt_shed: counter(
                MQTT_SHED,
                "QoS 0 publishes shed over the per-client rate limit (not stored).",
            ),
            mqtt_retained_refused: counter(
                MQTT_RETAINED_REFUSED,
                "Retained publishes over the retained bounds (passed on unretained).",
            ),
            mqtt_retained_bytes: gauge(
                MQTT_RETAINED_BYTES,
                "Bytes of topics and payloads the embedded broker retains.",
            ),
            mqtt_wills: counter(
                MQTT_WILLS,
                "Will messages of clients that vanished without DISCONNECT, kept in the buffer.",
            ),
            local_copies_dropped: counter(
                LOCAL_COPIES_DROPPED,
                "Copies for local subscribers dropped: the embedded broker lagged.",
            ),
            buffer_queue_records: gauge(
                BUFFER_QUEUE_RECORDS,
                "Records waiting in memory for the buffer writer.",
            ),
            buffer_last_commit_age: reg(
                &registry,
                prometheus::Gauge::new(
                    BUFFER_LAST_COMMIT_AGE,
                    "Seconds since the buffer last committed.",
                )
                .expect("invariant: valid metric"),
            ),
            last_commit_ms: Arc::new(std::sync::atomic::AtomicI64::new(crate::clock::now_ms())),
            buffer_ok: Arc::new(AtomicBool::new(true)),
            oldest_undelivered_age: reg(
                &registry,
                prometheus::GaugeVec::new(
                    Opts::new(
                        OLDEST_UNDELIVERED_AGE,
                        "Seconds since the stream's oldest record still held was received.",
                    ),
                    &["stream"],
                )
                .expect("invariant: valid metric"),
            ),
            oldest_received: Arc::default(),
            disk_written: counter(
                DISK_WRITTEN,
                "Bytes the agent wrote to disk (WAL, checkpoints, database) since it started.",
            ),
            buffered_bytes: counter(
                BUFFERED_BYTES,
                "Topic and payload bytes of the records committed to the buffer.",
            ),
            disk_written_seen: Arc::default(),
            degraded: gauge(
                DEGRADED,
                "1 while records wait longer than ingest.degraded_after with the link up and nothing delivered.",
            ),
            degraded_after_ms: Arc::new(std::sync::atomic::AtomicI64::new(300_000)),
            last_delivered_ms: Arc::new(std::sync::atomic::AtomicI64::new(crate::clock::now_ms())),
            last_error: Arc::default(),
            registry,
        }
    }

    /// The buffer committed just now.
    pub fn committed_now(&self) {
        self.last_commit_ms
            .store(crate::clock::now_ms(), Ordering::Relaxed);
        self.buffer_ok.store(true, Ordering::Relaxed);
    }

    /// A buffer commit failed (other than for a full disk, which is handled): not ready until
    /// one succeeds.
    pub fn commit_failing(&self) {
        self.buffer_ok.store(false, Ordering::Relaxed);
    }

    /// Per stream, when its oldest record still held was received (from the buffer writer).
    pub fn set_oldest_received(&self, oldest: OldestReceived) {
        *self
            .oldest_received
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = oldest;
    }

    /// Per stream, seconds since its oldest record still held was received (`None`: none held).
    pub fn oldest_ages(&self) -> Vec<(String, Option<f64>)> {
        let now = crate::clock::now_ms();
        self.oldest_received
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .map(|(name, at)| (name.clone(), at.map(|t| (now - t).max(0) as f64 / 1000.0)))
            .collect()
    }

    /// The streams in force are `streams` (a start or a reload): their priorities are set, and
    /// the gauges of streams no longer in force are removed (their counters stay).
    pub fn set_streams(&self, streams: &[(String, crate::routing::Priority)]) {
        use prometheus::core::Collector;
        for family in self.stream_priority.collect() {
            for m in family.get_metric() {
                for label in m.get_label() {
                    if !streams.iter().any(|(name, _)| name == label.value()) {
                        for vec in [
                            &self.stream_priority,
                            &self.backlog_records,
                            &self.backlog_bytes,
                            &self.stream_dictionary,
                        ] {
                            let _ = vec.remove_label_values(&[label.value()]);
                        }
                        let _ = self
                            .oldest_undelivered_age
                            .remove_label_values(&[label.value()]);
                    }
                }
            }
        }
        let mut oldest = self
            .oldest_received
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        oldest.retain(|(name, _)| streams.iter().any(|(n, _)| n == name));
        for (name, priority) in streams {
            self.stream_priority
                .with_label_values(&[name.as_str()])
                .set(*priority as i64);
            // A forwarder starts without dictionaries.
            self.stream_dictionary
                .with_label_values(&[name.as_str()])
                .set(0);
        }
    }

    /// How long records may wait with the link up and nothing delivered before the agent is
    /// degraded (`ingest.degraded_after`).
    pub fn set_degraded_after(&self, after: std::time::Duration) {
        self.degraded_after_ms
            .store(after.as_millis() as i64, Ordering::Relaxed);
    }

    /// A batch was delivered just now.
    pub fn delivered_now(&self) {
        self.last_delivered_ms
            .store(crate::clock::now_ms(), Ordering::Relaxed);
    }

    /// The forwarder met `error` just now (kept to its first 200 characters: it is shown by
    /// `/status`).
    pub fn set_last_error(&self, mut error: String) {
        if let Some((cut, _)) = error.char_indices().nth(200) {
            error.truncate(cut);
            error.push('…');
        }
        *self
            .last_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) =
            Some((crate::clock::now_ms(), error));
    }

    /// The last failure the forwarder met: when (Unix ms) and why.
    pub fn last_error(&self) -> Option<(i64, String)> {
        self.last_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Whether delivery is stuck with the link up (see [`DEGRADED`]).
    pub fn is_degraded(&self) -> bool {
        let now = crate::clock::now_ms();
        let after = self.degraded_after_ms.load(Ordering::Relaxed);
        let waited = self
            .oldest_ages()
            .iter()
            .filter_map(|(_, age)| *age)
            .any(|age| age * 1000.0 > after as f64);
        waited
            && self.link_up.get() == 1
            && now - self.last_delivered_ms.load(Ordering::Relaxed) > after
    }

    /// Bytes this process wrote to disk since it started (`/proc/self/io`), if readable.
    pub fn disk_written_bytes() -> Option<u64> {
        std::fs::read_to_string("/proc/self/io")
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix("write_bytes:"))
            .and_then(|v| v.trim().parse().ok())
    }

    /// Every metric's current values (for `status`).
    pub fn gather(&self) -> Vec<prometheus::proto::MetricFamily> {
        self.registry.gather()
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let since = crate::clock::now_ms() - self.last_commit_ms.load(Ordering::Relaxed);
        self.buffer_last_commit_age
            .set(since.max(0) as f64 / 1000.0);
        for (stream, age) in self.oldest_ages() {
            self.oldest_undelivered_age
                .with_label_values(&[&stream])
                .set(age.unwrap_or(0.0));
        }
        if let Some(written) = Metrics::disk_written_bytes() {
            // Two scrapes at once: only the one that moves the high mark adds the difference.
            let before = self.disk_written_seen.fetch_max(written, Ordering::Relaxed);
            self.disk_written.inc_by(written.saturating_sub(before));
        }
        self.degraded.set(i64::from(self.is_degraded()));
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("invariant: encoding into a Vec cannot fail");
        String::from_utf8(out).expect("invariant: Prometheus text is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// Serves `/metrics`, `/healthz`, `/readyz` on `addr` until `shutdown`. `/readyz` answers 200
/// while `ready` is set: the broker listens and the buffer takes records.
pub async fn serve(
    addr: SocketAddr,
    metrics: Metrics,
    ready: Arc<AtomicBool>,
    buffer: std::path::PathBuf,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    use axum::routing::get;
    let buffer_ok = metrics.buffer_ok.clone();
    let drain = Arc::new(crate::status::Drain::default());
    {
        let (drain, metrics, stop) = (drain.clone(), metrics.clone(), shutdown.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(crate::status::SAMPLE_EVERY);
            loop {
                tokio::select! {
                    _ = tick.tick() => drain.sample(&metrics),
                    () = stop.cancelled() => return,
                }
            }
        });
    }
    // One status at a time: each takes a few milliseconds of gathering; a flood gets 503.
    let one_at_a_time = Arc::new(tokio::sync::Semaphore::new(1));
    let status = {
        let metrics = metrics.clone();
        move || {
            let (metrics, drain, buffer) = (metrics.clone(), drain.clone(), buffer.clone());
            let turn = one_at_a_time.clone().try_acquire_owned();
            async move {
                let _turn = turn.map_err(|_| StatusCode::SERVICE_UNAVAILABLE)?;
                tokio::task::spawn_blocking(move || {
                    axum::Json(crate::status::Status::live(&metrics, &drain, &buffer))
                })
                .await
                .map_err(|_| StatusCode::INTERNAL_SERVER_ERROR)
            }
        }
    };
    let app = axum::Router::new()
        .route("/status", get(status))
        .route(
            "/metrics",
            get(move || std::future::ready(metrics.render())),
        )
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || {
                let up = ready.load(Ordering::Relaxed) && buffer_ok.load(Ordering::Relaxed);
                std::future::ready(if up {
                    (StatusCode::OK, "ready")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "starting or stopping")
                })
            }),
        );
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(addr = %listener.local_addr()?, "metrics listening");
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}
