//! The ingest's Prometheus metrics; every metric name is a constant here.

use prometheus::{Encoder, IntCounter, IntCounterVec, Opts, Registry, TextEncoder};

/// Requests by HTTP status code.
pub const REQUESTS: &str = "ingest_requests_total";
/// Records newly appended to the log.
pub const RECORDS_ACCEPTED: &str = "ingest_records_accepted_total";
/// Records already in the log (retries), not appended again.
pub const RECORDS_DUPLICATE: &str = "ingest_records_duplicate_total";
/// Poison records the log refused for good, replaced by dead letters.
pub const RECORDS_DEAD_LETTERED: &str = "ingest_records_dead_lettered_total";
/// Request body bytes as received (compressed).
pub const WIRE_BYTES: &str = "ingest_wire_bytes_total";
/// Body bytes once decompressed.
pub const RAW_BYTES: &str = "ingest_raw_bytes_total";
/// Batches decoded, by body format (`v1`, `v2` or `json`).
pub const BATCHES: &str = "ingest_batches_total";
/// Batches whose agent clock was off by more than the threshold (timestamps corrected).
pub const CLOCK_CORRECTED: &str = "ingest_clock_corrected_batches_total";
/// Batches the log would not take until an operator acts, by reason: `tenant_topics` (a new
/// stream past its tenant's `max_topics_per_tenant`, 400) or `log_full` (a limit of the whole
/// embedded log, 503).
pub const BATCHES_REFUSED: &str = "ingest_batches_refused_total";

/// Handles to every metric of the ingest.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// See [`REQUESTS`].
    pub requests: IntCounterVec,
    /// See [`RECORDS_ACCEPTED`].
    pub records_accepted: IntCounter,
    /// See [`RECORDS_DUPLICATE`].
    pub records_duplicate: IntCounter,
    /// See [`RECORDS_DEAD_LETTERED`].
    pub records_dead_lettered: IntCounter,
    /// See [`WIRE_BYTES`].
    pub wire_bytes: IntCounter,
    /// See [`RAW_BYTES`].
    pub raw_bytes: IntCounter,
    /// See [`CLOCK_CORRECTED`].
    pub clock_corrected: IntCounter,
    /// See [`BATCHES`].
    pub batches: IntCounterVec,
    /// See [`BATCHES_REFUSED`].
    pub batches_refused: IntCounterVec,
}

impl Metrics {
    /// Registers every metric in a fresh registry.
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("invariant: valid metric name");
            registry
                .register(Box::new(c.clone()))
                .expect("invariant: metric registered once");
            c
        };
        let records_accepted = counter(RECORDS_ACCEPTED, "Records newly appended to the log.");
        let records_duplicate = counter(
            RECORDS_DUPLICATE,
            "Records already in the log, not appended again.",
        );
        let records_dead_lettered = counter(
            RECORDS_DEAD_LETTERED,
            "Poison records the log refused for good, replaced by dead letters.",
        );
        let wire_bytes = counter(WIRE_BYTES, "Request body bytes as received.");
        let raw_bytes = counter(RAW_BYTES, "Batch bytes once decompressed.");
        let clock_corrected = counter(
            CLOCK_CORRECTED,
            "Batches from an agent whose clock was off (timestamps corrected).",
        );
        let counters = |name: &str, help: &str, label: &str| {
            let c = IntCounterVec::new(Opts::new(name, help), &[label])
                .expect("invariant: valid metric name");
            registry
                .register(Box::new(c.clone()))
                .expect("invariant: metric registered once");
            c
        };
        let requests = counters(REQUESTS, "Batch requests by HTTP status.", "status");
        let batches = counters(
            BATCHES,
            "Batches decoded, by body format (v1, v2 or json).",
            "body",
        );
        let batches_refused = counters(
            BATCHES_REFUSED,
            "Batches the log would not take until an operator acts, by reason (tenant_topics, log_full).",
            "reason",
        );
        Metrics {
            batches_refused,
            registry,
            requests,
            records_accepted,
            records_duplicate,
            records_dead_lettered,
            wire_bytes,
            raw_bytes,
            clock_corrected,
            batches,
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("invariant: text encoding into a Vec cannot fail");
        String::from_utf8(out).expect("invariant: Prometheus text is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
