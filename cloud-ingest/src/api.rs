//! The HTTP API: `POST /v1/batches`, the embedded log's read endpoints, metrics and probes.
//!
//! Invariant: a 2xx on `/v1/batches` means every record of the batch is durably in the log.
//! [`IngestError::status`] is the ONE table from error to HTTP status; the agent's retry
//! classification mirrors it. Clients get a short reason; internal details are logged once here.
//! The embedded log's read endpoints are in `read`, with their own table ([`ReadError`]).

mod read;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use ingest_wire::{Answer, BatchAck, DecodeError, HEADER_DEVICE_ID, HEADER_RETRY_AFTER, Limits};

use crate::auth::{Authenticated, Registry};
use crate::config::{ReadApi, RequestLimits};
use crate::dictionaries::Dictionaries;
use crate::metrics::Metrics;
pub use read::{MAX_CONCURRENT_READS, ReadError};

use crate::publish::{DEAD_LETTER_STREAM, Delivery, PublishError, Publisher, clock_offset};

/// What a config reload changes without a restart: who may send, at what rate, and who may
/// read. Swapped whole, so a request sees one version of it.
pub struct Access {
    /// Device registry.
    pub registry: Registry,
    /// Per-device rate limits (their buckets start full again after a reload).
    pub rates: crate::rates::DeviceRates,
    /// Who may use the read endpoints.
    pub read_api: ReadApi,
}

impl Access {
    /// The access a validated config describes.
    pub fn from_config(config: &crate::config::IngestConfig) -> Access {
        Access {
            registry: Registry::new(config.devices.clone()),
            rates: crate::rates::DeviceRates::new(
                &config.device_rates,
                config.limits.max_records_per_batch,
                config.limits.max_decompressed_bytes,
            ),
            read_api: config.read_api.clone(),
        }
    }
}

/// Everything the handlers share.
pub struct AppState {
    /// Registry, rates and read tokens: replaced by a reload ([`AppState::set_access`]).
    pub access: std::sync::RwLock<Arc<Access>>,
    /// The stream log.
    pub publisher: Arc<dyn Publisher>,
    /// Per-request limits.
    pub limits: RequestLimits,
    /// Log topic template.
    pub naming: crate::naming::Naming,
    /// Agent clocks further off than this get corrected timestamps (milliseconds).
    pub clock_skew_threshold_ms: i64,
    /// Metrics.
    pub metrics: Metrics,
    /// The embedded log's file, when that is the sink (enables the read endpoints).
    pub embedded_log: Option<PathBuf>,
    /// zstd dictionaries registered by devices.
    pub dictionaries: Dictionaries,
    /// Read responses being streamed ([`MAX_CONCURRENT_READS`]).
    pub reads: Arc<tokio::sync::Semaphore>,
    /// `limits.max_decoding_bytes`, in KiB permits: what the requests being decoded and
    /// appended may cost together ([`RequestLimits::decoding_cost`]).
    pub decoding: Arc<tokio::sync::Semaphore>,
}

impl AppState {
    /// The access in force now.
    pub fn access(&self) -> Arc<Access> {
        self.access
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Puts `access` in force for every request from now on (requests in flight keep theirs).
    pub fn set_access(&self, access: Access) {
        *self
            .access
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(access);
    }
}

/// The decoding budget of `limits`, in KiB permits.
pub fn decoding_budget(limits: &RequestLimits) -> Arc<tokio::sync::Semaphore> {
    Arc::new(tokio::sync::Semaphore::new(
        (limits.max_decoding_bytes / 1024).min(tokio::sync::Semaphore::MAX_PERMITS),
    ))
}

/// Why a batch request failed.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// No or wrong credentials. 401; the agent keeps the data and raises an alarm.
    #[error("unknown device or bad token")]
    Unauthorized,
    /// The batch names another device than the token's. 403; kept and alarmed like 401.
    #[error("batch device_id {body:?} is not the authenticated device {authenticated:?}")]
    Forbidden {
        /// Device of the token.
        authenticated: String,
        /// Device named in the batch.
        body: String,
    },
    /// The body is too large as sent or once decompressed. 413; the agent splits the batch
    /// (a lone record that is too large is dead-lettered).
    #[error("body larger than the limit of {limit} bytes")]
    TooLarge {
        /// The limit that was hit.
        limit: usize,
    },
    /// More records than `max_records_per_batch`. 413; the agent splits the batch.
    #[error("{count} records, more than the limit of {limit} per batch")]
    TooManyRecords {
        /// Records in the batch.
        count: usize,
        /// The limit.
        limit: usize,
    },
    /// The body is not a valid batch. 400; the agent dead-letters it.
    #[error(transparent)]
    BadBatch(DecodeError),
    /// The log cannot take it now. 503 + Retry-After; the agent retries. What failed stays in
    /// the ingest's own log, except a full log's reason, which is the sender's to see.
    #[error("{}", match .0 {
        PublishError::Full { reason } => format!("stream log full, retry later: {reason}"),
        _ => "stream log unavailable, retry later".to_owned(),
    })]
    Unavailable(#[source] PublishError),
    /// The log refuses the batch's stream for good ([`PublishError::Refused`]). 400; the agent
    /// dead-letters it and goes on with its other streams.
    #[error("{0}")]
    StreamRefused(PublishError),
    /// The body could not be read (client went away). 400.
    #[error("request body could not be read")]
    BodyRead,
    /// The body did not arrive within `limits.body_timeout`. 408.
    #[error("request body not received within {0:?}")]
    BodyTimeout(std::time::Duration),
    /// More requests in flight than `limits.max_concurrent_requests`. 503 with Retry-After.
    #[error("too many requests in flight on this replica, retry later")]
    Busy,
    /// The requests being decoded already cost `limits.max_decoding_bytes`. 503 with
    /// Retry-After.
    #[error("this replica is decoding as much as its memory budget allows, retry later")]
    Overloaded,
    /// The device is over its rate. 429 with Retry-After.
    #[error("this device is over its rate limit, retry in {0:?}")]
    RateLimited(std::time::Duration),
    /// The batch's zstd frame names a dictionary this replica does not have. 428; the agent
    /// registers it (`PUT /v1/dictionaries/{id}`) and resends.
    #[error(
        "the body is compressed with zstd dictionary {0}, which is not registered here: PUT it to /v1/dictionaries/{0}, then resend"
    )]
    UnknownDictionary(u32),
    /// A dictionary registration is not a zstd dictionary with the id of its path. 400.
    #[error("{0}")]
    BadDictionary(String),
}

impl IngestError {
    /// The contract's answer for it ([`ingest_wire::Answer`], the table clients read back).
    pub fn answer(&self) -> Answer {
        match self {
            IngestError::Unauthorized => Answer::Unauthorized,
            IngestError::Forbidden { .. } => Answer::Forbidden,
            IngestError::TooLarge { .. }
            | IngestError::TooManyRecords { .. }
            | IngestError::BadBatch(DecodeError::Expands { .. }) => Answer::TooLarge,
            IngestError::BadBatch(_)
            | IngestError::BodyRead
            | IngestError::BadDictionary(_)
            | IngestError::StreamRefused(_) => Answer::Invalid,
            IngestError::Unavailable(_) | IngestError::Busy | IngestError::Overloaded => {
                Answer::Unavailable
            }
            IngestError::BodyTimeout(_) => Answer::BodyTimeout,
            IngestError::RateLimited(_) => Answer::RateLimited,
            IngestError::UnknownDictionary(_) => Answer::NeedsDictionary,
        }
    }

    /// Its HTTP status, from the contract's table.
    pub fn status(&self) -> StatusCode {
        StatusCode::from_u16(self.answer().status())
            .expect("invariant: the contract's statuses are valid")
    }
}

impl From<DecodeError> for IngestError {
    fn from(e: DecodeError) -> Self {
        match e {
            DecodeError::TooLarge { limit } => IngestError::TooLarge { limit },
            DecodeError::TooManyRecords { count, limit } => {
                IngestError::TooManyRecords { count, limit }
            }
            other => IngestError::BadBatch(other),
        }
    }
}

/// Longest reason a refusal carries: a parser's message may quote the input (serde quotes a
/// string of the wrong type whole), which is never echoed back or logged in full.
const MAX_REASON_CHARS: usize = 512;

impl IngestError {
    /// The reason, cut to `MAX_REASON_CHARS`.
    pub fn short_reason(&self) -> String {
        let reason = self.to_string();
        match reason.char_indices().nth(MAX_REASON_CHARS) {
            None => reason,
            Some((cut, _)) => format!("{}… (cut)", &reason[..cut]),
        }
    }
}

impl IntoResponse for IngestError {
    fn into_response(self) -> Response {
        let status = self.status();
        let mut response = (
            status,
            Json(serde_json::json!({ "error": self.short_reason() })),
        )
            .into_response();
        match self {
            IngestError::Unavailable(_) => {
                response
                    .headers_mut()
                    .insert(HEADER_RETRY_AFTER, HeaderValue::from_static("1"));
            }
            IngestError::Unauthorized => {
                response
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            IngestError::Busy | IngestError::Overloaded => {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            IngestError::RateLimited(wait) => {
                let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
            }
            _ => {}
        }
        response
    }
}

/// The router of the public listener (`/metrics` only `with_metrics`). Batches and dictionary
/// registrations are bounded by `limits.max_concurrent_requests` (`at_most`); health,
/// readiness and metrics never wait.
pub fn app(state: Arc<AppState>, with_metrics: bool) -> axum::Router {
    let slots = Arc::new(tokio::sync::Semaphore::new(
        state.limits.max_concurrent_requests,
    ));
    let bounded = axum::middleware::from_fn_with_state(slots, at_most);
    axum::Router::new()
        .route(
            ingest_wire::BATCHES_PATH,
            post(post_batch)
                .layer(bounded.clone())
                .layer(axum::middleware::from_fn(advertise_bodies)),
        )
        .route(
            &format!("{}/{{id}}", ingest_wire::DICTIONARIES_PATH),
            put(put_dictionary).layer(bounded),
        )
        .route("/v1/log", get(read::list_topics))
        .route("/v1/log/{topic}", get(read::read_topic))
        .with_state(state.clone())
        .merge(operations(state, with_metrics))
}

/// `/healthz`, `/readyz`, and `/metrics` if `with_metrics`: on the public listener, or all
/// three on `metrics_listen`.
pub fn operations(state: Arc<AppState>, with_metrics: bool) -> axum::Router {
    let router = axum::Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            ingest_wire::READYZ_PATH,
            get(readyz).layer(axum::middleware::from_fn(advertise_bodies)),
        );
    let router = if with_metrics {
        router.route(
            "/metrics",
            get(|State(s): State<Arc<AppState>>| async move { s.metrics.render() }),
        )
    } else {
        router
    };
    router.with_state(state)
}

/// A request's slot (`at_most`): a batch's append takes it along, so a client that hangs up
/// does not free the slot while its append still runs.
#[derive(Clone)]
pub struct Slot(Arc<Mutex<Option<tokio::sync::OwnedSemaphorePermit>>>);

impl Slot {
    fn take(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }
}

/// Serves the request if one of the replica's request slots is free, else 503 + Retry-After
/// at once (a queue would hold the client's connection and memory for nothing).
async fn at_most(
    State(slots): State<Arc<tokio::sync::Semaphore>>,
    mut request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    match slots.try_acquire_owned() {
        Ok(slot) => {
            request
                .extensions_mut()
                .insert(Slot(Arc::new(Mutex::new(Some(slot)))));
            next.run(request).await
        }
        Err(_) => IngestError::Busy.into_response(),
    }
}

async fn readyz(State(state): State<Arc<AppState>>) -> (StatusCode, &'static str) {
    if state.publisher.is_ready() {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "stream log unavailable")
    }
}

async fn post_batch(
    State(state): State<Arc<AppState>>,
    peer: Option<axum::Extension<PeerDevice>>,
    slot: Option<axum::Extension<Slot>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let peer = peer.and_then(|axum::Extension(PeerDevice(p))| p);
    let slot = slot.and_then(|axum::Extension(s)| s.take());
    let result = accept_batch(&state, peer.as_deref(), slot, &headers, body).await;
    let response = match result {
        Ok(ack) => (StatusCode::OK, Json(ack)).into_response(),
        Err(e) => {
            match &e {
                IngestError::Unavailable(source @ PublishError::Full { .. }) => {
                    state
                        .metrics
                        .batches_refused
                        .with_label_values(&["log_full"])
                        .inc();
                    tracing::error!(error = %source, "batch refused: the stream log is full; an operator must act")
                }
                IngestError::StreamRefused(source) => {
                    state
                        .metrics
                        .batches_refused
                        .with_label_values(&["tenant_topics"])
                        .inc();
                    tracing::info!(error = %source, "batch refused: its stream is past its tenant's topics")
                }
                IngestError::Unavailable(source) => {
                    tracing::warn!(error = %source, "batch refused: stream log unavailable")
                }
                other => {
                    tracing::info!(status = other.status().as_u16(), error = %other.short_reason(), "batch rejected")
                }
            }
            e.into_response()
        }
    };
    state
        .metrics
        .requests
        .with_label_values(&[response.status().as_str()])
        .inc();
    response
}

/// `PUT /v1/dictionaries/{id}`: registers a device's zstd dictionary on this replica.
async fn put_dictionary(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    peer: Option<axum::Extension<PeerDevice>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let peer = peer.and_then(|axum::Extension(PeerDevice(p))| p);
    let result = async {
        let device = authenticate(&state, peer.as_deref(), &headers)?;
        state
            .access()
            .rates
            .admit_registration(&device.device_id)
            .map_err(IngestError::RateLimited)?;
        let limit = ingest_wire::MAX_DICTIONARY_BYTES;
        let timeout = state.limits.body_timeout;
        let body = tokio::time::timeout(timeout, axum::body::to_bytes(body, limit))
            .await
            .map_err(|_| IngestError::BodyTimeout(timeout))?
            .map_err(|_| IngestError::TooLarge { limit })?;
        let id: u32 = id.parse().map_err(|_| {
            IngestError::BadDictionary(format!("dictionary id {id:?} is not a number"))
        })?;
        if ingest_wire::dictionary_id(&body) != Some(id) || id == 0 {
            return Err(IngestError::BadDictionary(format!(
                "the body is not a zstd dictionary with id {id} (train one with zstd --train; its id is in its header)"
            )));
        }
        state.dictionaries.insert(&device.device_id, id, &body);
        tracing::info!(device = %device.device_id, id, bytes = body.len(), "zstd dictionary registered");
        Ok::<_, IngestError>(StatusCode::NO_CONTENT)
    }
    .await;
    match result {
        Ok(status) => status.into_response(),
        Err(e) => {
            tracing::info!(status = e.status().as_u16(), error = %e.short_reason(), "dictionary refused");
            e.into_response()
        }
    }
}

/// The device a connection's verified client certificate names (its Common Name), if any:
/// put in each request's extensions by the TLS listener.
#[derive(Debug, Clone)]
pub struct PeerDevice(pub Option<String>);

/// Who sent the request: the device of its client certificate (mTLS; then no token is
/// needed), else the device its `X-Device-Id` names, checked against its bearer token.
fn authenticate(
    state: &AppState,
    peer: Option<&str>,
    headers: &HeaderMap,
) -> Result<Authenticated, IngestError> {
    let access = state.access();
    if let Some(device) = peer {
        return access
            .registry
            .by_certificate(device)
            .ok_or(IngestError::Unauthorized);
    }
    let device = headers
        .get(HEADER_DEVICE_ID)
        .and_then(|v| v.to_str().ok())
        .ok_or(IngestError::Unauthorized)?;
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or(IngestError::Unauthorized)?;
    access
        .registry
        .authenticate(device, token.trim())
        .ok_or(IngestError::Unauthorized)
}

async fn accept_batch(
    state: &AppState,
    peer: Option<&str>,
    slot: Option<tokio::sync::OwnedSemaphorePermit>,
    headers: &HeaderMap,
    body: Body,
) -> Result<BatchAck, IngestError> {
    let device = authenticate(state, peer, headers)?;
    let limit = state.limits.max_body_bytes;
    let timeout = state.limits.body_timeout;
    let body = tokio::time::timeout(timeout, axum::body::to_bytes(body, limit))
        .await
        .map_err(|_| IngestError::BodyTimeout(timeout))?
        .map_err(|e| {
            let too_large = std::error::Error::source(&e)
                .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
            if too_large {
                IngestError::TooLarge { limit }
            } else {
                IngestError::BodyRead
            }
        })?;
    let header = |name| {
        headers
            .get(name)
            .and_then(|v: &HeaderValue| v.to_str().ok())
    };
    let encoding = header(header::CONTENT_ENCODING);
    let zstd = encoding.is_some_and(|e| e.trim().eq_ignore_ascii_case(ingest_wire::ENCODING_ZSTD));
    let dictionary = match ingest_wire::frame_dictionary_id(&body).filter(|_| zstd) {
        Some(id) => Some(
            state
                .dictionaries
                .get(&device.device_id, id)
                .ok_or(IngestError::UnknownDictionary(id))?,
        ),
        None => None,
    };
    let wire_bytes = body.len();
    // What decoding and holding this batch may cost, taken from the replica's budget before
    // any of it is spent; the decoder is held to the bound it was charged for.
    let bound =
        ingest_wire::decoded_size_bound(&body, encoding, state.limits.max_decompressed_bytes);
    // A JSON body or an unknown type is charged as version 1: JSON costs no more per record,
    // and an unknown type is refused before anything is decoded.
    let record_bytes = ingest_wire::BodyVersion::of(header(header::CONTENT_TYPE))
        .unwrap_or(ingest_wire::BodyVersion::V1)
        .decoded_record_bytes();
    let cost_kib = state
        .limits
        .decoding_cost(body.len(), bound, record_bytes)
        .div_ceil(1024);
    let budget = state
        .decoding
        .clone()
        .try_acquire_many_owned(u32::try_from(cost_kib).unwrap_or(u32::MAX))
        .map_err(|_| IngestError::Overloaded)?;
    // Decompressing and decoding are CPU work: off the async workers, so a few large batches
    // never stall accepts, handshakes and timers.
    let limits = Limits {
        max_decompressed_bytes: bound,
        max_records: state.limits.max_records_per_batch,
    };
    let (content_type, encoding) = (
        header(header::CONTENT_TYPE).map(str::to_owned),
        encoding.map(str::to_owned),
    );
    // The permits go with the work: if the client hangs up and this handler is dropped, the
    // decode still holds its charge until it ends.
    let (decoded, slot, budget) = tokio::task::spawn_blocking(move || {
        let decoded = ingest_wire::decode_body_with(
            &body,
            content_type.as_deref(),
            encoding.as_deref(),
            limits,
            dictionary.as_deref(),
        );
        (decoded, slot, budget)
    })
    .await
    .map_err(|e| IngestError::BadBatch(DecodeError::Invalid(format!("decoding failed: {e}"))))?;
    let batch = decoded?;
    state
        .metrics
        .batches
        .with_label_values(&[body_format(header(header::CONTENT_TYPE))])
        .inc();
    if batch.device_id != device.device_id {
        return Err(IngestError::Forbidden {
            authenticated: device.device_id,
            body: batch.device_id,
        });
    }
    // A batch refused for its stream's name costs the device none of its rate.
    let topic = state
        .naming
        .topic(&device.tenant, &batch.stream)
        .map_err(|e| IngestError::BadBatch(DecodeError::Invalid(e)))?;
    let dead_letter_topic = state
        .naming
        .topic(&device.tenant, DEAD_LETTER_STREAM)
        .map_err(|e| IngestError::BadBatch(DecodeError::Invalid(e)))?;
    if let Err(wait) = state.access().rates.admit(
        &device.device_id,
        batch.records.len(),
        batch
            .records
            .iter()
            .map(|r| r.topic.len() + r.payload.len())
            .sum(),
    ) {
        return Err(IngestError::RateLimited(wait));
    }
    state.metrics.wire_bytes.inc_by(wire_bytes as u64);
    let raw: u64 = batch
        .records
        .iter()
        .map(|r| (r.payload.len() + r.topic.len()) as u64)
        .sum();
    state.metrics.raw_bytes.inc_by(raw);
    let ingested_at_ms = now_ms();
    let clock_offset_ms = clock_offset(
        batch.sent_at_ms,
        ingested_at_ms,
        state.clock_skew_threshold_ms,
    );
    if let Some(offset_ms) = clock_offset_ms {
        state.metrics.clock_corrected.inc();
        tracing::debug!(device = %batch.device_id, offset_ms, "agent clock is off; timestamps corrected beside the originals");
    }
    let delivery = Delivery {
        tenant: device.tenant,
        topic,
        dead_letter_topic,
        batch,
        ingested_at_ms,
        clock_offset_ms,
    };
    // The append runs to its end even if the client hangs up (its timeout): otherwise a batch
    // half-appended to a stateless sink would be forgotten by the dedup state and appended
    // again by the retry, which waits for this one to finish.
    let publisher = state.publisher.clone();
    let ack = tokio::spawn(async move {
        let (_slot, _budget) = (slot, budget);
        publisher.publish(delivery).await
    })
    .await
    .map_err(|e| {
        IngestError::Unavailable(PublishError::Unavailable {
            reason: format!("append task failed: {e}"),
        })
    })?
    .map_err(|e| match e {
        PublishError::Refused { .. } => IngestError::StreamRefused(e),
        other => IngestError::Unavailable(other),
    })?;
    state.metrics.records_accepted.inc_by(ack.accepted);
    state.metrics.records_duplicate.inc_by(ack.duplicates);
    state
        .metrics
        .records_dead_lettered
        .inc_by(ack.dead_lettered);
    Ok(ack)
}

/// The body format of a batch that decoded, as the metric labels it.
fn body_format(content_type: Option<&str>) -> &'static str {
    match ingest_wire::BodyVersion::of(content_type) {
        Some(ingest_wire::BodyVersion::V2) => "v2",
        Some(ingest_wire::BodyVersion::V1) => "v1",
        None => "json",
    }
}

/// Lists the body formats this ingest takes ([`ingest_wire::HEADER_ACCEPT_POST`]) on every
/// answer to a batch and to `/readyz`, so that a client finds out it may send body version 2.
async fn advertise_bodies(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let mut response = next.run(request).await;
    response.headers_mut().insert(
        ingest_wire::HEADER_ACCEPT_POST,
        HeaderValue::from_static(ingest_wire::ACCEPTED_BODIES),
    );
    response
}

pub use ingest_wire::now_ms;

/// Builds the state's body type for tests.
#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use axum::http::Request;
    use http_body_util::BodyExt;
    use ingest_wire::{Batch, CONTENT_TYPE_BATCH, Record};
    use tower::ServiceExt;

    use super::*;
    use crate::auth::hash_token;
    use crate::config::Device;
    use crate::config::ReadToken;
    use crate::publish::embedded;
    use crate::publish::embedded::EmbeddedLog;

    fn state(dir: &std::path::Path) -> Arc<AppState> {
        state_with_topics(dir, 1_000)
    }

    /// [`state`] whose embedded log takes `max_topics_per_tenant` topics per tenant.
    fn state_with_topics(dir: &std::path::Path, max_topics_per_tenant: u64) -> Arc<AppState> {
        let path = dir.join("log.db");
        Arc::new(AppState {
            dictionaries: Dictionaries::new(1 << 20),
            access: std::sync::RwLock::new(Arc::new(Access {
                registry: Registry::new(HashMap::from([(
                    "d1".to_owned(),
                    Device {
                        tenant: "acme".into(),
                        token_sha256: Some(hash_token("tok")),
                    },
                )])),
                rates: crate::rates::DeviceRates::new(&HashMap::new(), 100, 1 << 16),
                read_api: ReadApi::Open,
            })),
            publisher: Arc::new(
                EmbeddedLog::open(&path, Default::default(), max_topics_per_tenant).expect("open"),
            ),
            limits: RequestLimits {
                max_body_bytes: 4096,
                max_decompressed_bytes: 1 << 16,
                max_records_per_batch: 100,
                max_concurrent_requests: 8,
                header_timeout: std::time::Duration::from_secs(10),
                body_timeout: std::time::Duration::from_secs(10),
                max_decoding_bytes: 1 << 20,
            },
            naming: crate::naming::Naming::parse("iot.{tenant}.{stream}").expect("template"),
            clock_skew_threshold_ms: 60_000,
            metrics: Metrics::new(),
            embedded_log: Some(path),
            decoding: Arc::new(tokio::sync::Semaphore::new(1 << 10)),
            reads: Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT_READS)),
        })
    }

    fn batch(device: &str, topic: &str, seqs: std::ops::Range<u64>) -> Batch {
        Batch {
            device_id: device.into(),
            stream: "t".into(),
            sent_at_ms: 0,
            epoch: 0,
            records: seqs
                .map(|seq| Record {
                    seq,
                    topic: topic.into(),
                    payload: vec![0, 1, 2].into(),
                    qos: Some(1),
                    received_at_ms: 0,
                    ..Default::default()
                })
                .collect(),
        }
    }

    fn body(device: &str, seqs: std::ops::Range<u64>) -> Vec<u8> {
        encoded(&batch(device, "a/b", seqs))
    }

    /// `batch` as a v1 body, zstd level 1.
    fn encoded(batch: &Batch) -> Vec<u8> {
        ingest_wire::compress(&ingest_wire::encode_batch(batch), 1).expect("compress")
    }

    /// The body of `response` as text.
    async fn text_of(response: axum::response::Response) -> String {
        let bytes = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        String::from_utf8(bytes.to_vec()).expect("utf8")
    }

    fn request(token: &str, body: Vec<u8>) -> Request<Body> {
        Request::post(ingest_wire::BATCHES_PATH)
            .header(HEADER_DEVICE_ID, "d1")
            .header(header::AUTHORIZATION, format!("Bearer {token}"))
            .header(header::CONTENT_TYPE, CONTENT_TYPE_BATCH)
            .header(header::CONTENT_ENCODING, "zstd")
            .body(Body::from(body))
            .expect("request")
    }

    /// Body version 2 is advertised on every answer, taken, counted by its format, and a v2
    /// body that writes out past the decompressed limit gets 413 (split and resend).
    #[tokio::test]
    async fn body_version_2_is_advertised_and_taken() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = state(dir.path());
        let v2 = |topic: &str, seqs: std::ops::Range<u64>| {
            let batch = batch("d1", topic, seqs);
            let mut req = request(
                "tok",
                ingest_wire::compress(&ingest_wire::encode_columnar(&batch), 1).expect("zstd"),
            );
            req.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(ingest_wire::CONTENT_TYPE_BATCH_V2),
            );
            req
        };
        for (req, status) in [
            (request("tok", body("d1", 1..3)), StatusCode::OK),
            (v2("a/b", 3..9), StatusCode::OK),
            (request("nope", body("d1", 9..10)), StatusCode::UNAUTHORIZED),
            // 100 records sharing a 2,000-byte topic: 200 KB written out, over 64 KiB.
            (
                v2(&"t".repeat(2_000), 10..110),
                StatusCode::PAYLOAD_TOO_LARGE,
            ),
        ] {
            let response = app(state.clone(), true)
                .oneshot(req)
                .await
                .expect("response");
            assert_eq!(response.status(), status);
            let advertised = response.headers()[ingest_wire::HEADER_ACCEPT_POST]
                .to_str()
                .expect("text");
            assert!(ingest_wire::accepts_v2(advertised), "{advertised}");
        }
        let ready = app(state.clone(), true)
            .oneshot(
                Request::get(ingest_wire::READYZ_PATH)
                    .body(Body::empty())
                    .expect("request"),
            )
            .await
            .expect("response");
        assert!(
            ready
                .headers()
                .contains_key(ingest_wire::HEADER_ACCEPT_POST)
        );
        let counted = |body: &str| state.metrics.batches.with_label_values(&[body]).get();
        assert_eq!((counted("v1"), counted("v2")), (1, 1));
    }

    /// A refusal never echoes the input whole: serde quotes a string of the wrong type, and a
    /// name that breaks the rules may be megabytes long.
    #[tokio::test]
    async fn refusals_quote_at_most_a_little_of_the_input() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = state(dir.path());
        let long = "y".repeat(30_000);
        for json in [
            format!(
                r#"{{"device_id":"d1","stream":"t","records":[{{"seq":"{long}","topic":"t","payload":"p"}}]}}"#
            ),
            format!(
                r#"{{"device_id":"d1","stream":"{long}!","records":[{{"seq":1,"topic":"t","payload":"p"}}]}}"#
            ),
        ] {
            let body = ingest_wire::compress(json.as_bytes(), 1).expect("compress");
            let mut req = request("tok", body);
            req.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(ingest_wire::CONTENT_TYPE_JSON),
            );
            let response = app(state.clone(), true)
                .oneshot(req)
                .await
                .expect("response");
            assert_eq!(response.status(), StatusCode::BAD_REQUEST);
            let text = text_of(response).await;
            assert!(
                text.len() < 1_000,
                "{} bytes: {:?}",
                text.len(),
                &text[..200]
            );
        }
    }

    #[tokio::test]
    async fn status_table() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = state(dir.path());
        let bomb = ingest_wire::compress(&vec![0u8; 1 << 20], 19).expect("compress");
        let cases: Vec<(Request<Body>, StatusCode)> = vec![
            (request("tok", body("d1", 1..3)), StatusCode::OK),
            (request("nope", body("d1", 1..3)), StatusCode::UNAUTHORIZED),
            (request("tok", body("d2", 1..3)), StatusCode::FORBIDDEN),
            (request("tok", b"garbage".to_vec()), StatusCode::BAD_REQUEST),
            (request("tok", bomb), StatusCode::PAYLOAD_TOO_LARGE),
            (
                request("tok", vec![0u8; 5000]),
                StatusCode::PAYLOAD_TOO_LARGE,
            ),
            (
                request("tok", body("d1", 0..101)),
                StatusCode::PAYLOAD_TOO_LARGE,
            ),
        ];
        for (i, (req, want)) in cases.into_iter().enumerate() {
            let response = app(state.clone(), true)
                .oneshot(req)
                .await
                .expect("response");
            assert_eq!(response.status(), want, "case {i}");
        }
        let topics =
            embedded::topics(state.embedded_log.as_ref().expect("embedded")).expect("topics");
        assert_eq!(topics.len(), 1);
        assert_eq!(
            topics[0].end_offset, 2,
            "only the accepted batch is in the log"
        );
    }

    #[tokio::test]
    async fn batches_compressed_with_a_dictionary_need_it_registered_first() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = state(dir.path());
        let raw = |seqs: std::ops::Range<u64>| {
            ingest_wire::encode_batch(&Batch {
                device_id: "d1".into(),
                stream: "t".into(),
                records: seqs
                    .map(|seq| Record {
                        seq,
                        topic: format!("plant/{}/t", seq % 5),
                        payload: format!("{{\"v\":{}}}", seq * 7 % 100).into_bytes().into(),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            })
        };
        let samples: Vec<Vec<u8>> = (1..400).map(|i| raw(i..i + 1)).collect();
        let dict = ingest_wire::train_dictionary(&samples, 1024).expect("train");
        let id = ingest_wire::dictionary_id(&dict).expect("id");
        let put = |token: &str, id: String, body: Vec<u8>| {
            Request::put(format!("{}/{id}", ingest_wire::DICTIONARIES_PATH))
                .header(HEADER_DEVICE_ID, "d1")
                .header(header::AUTHORIZATION, format!("Bearer {token}"))
                .body(Body::from(body))
                .expect("request")
        };
        let with_dict = |seqs| {
            request(
                "tok",
                ingest_wire::compress_with_dictionary(&raw(seqs), 1, &dict).expect("zstd"),
            )
        };
        let cases: Vec<(Request<Body>, StatusCode)> = vec![
            (with_dict(1..4), StatusCode::PRECONDITION_REQUIRED),
            (
                put("nope", id.to_string(), dict.clone()),
                StatusCode::UNAUTHORIZED,
            ),
            (
                put("tok", (id ^ 1).to_string(), dict.clone()),
                StatusCode::BAD_REQUEST,
            ),
            (
                put("tok", id.to_string(), b"not a dictionary".to_vec()),
                StatusCode::BAD_REQUEST,
            ),
            (
                put("tok", "x".into(), dict.clone()),
                StatusCode::BAD_REQUEST,
            ),
            (
                put(
                    "tok",
                    id.to_string(),
                    vec![0; ingest_wire::MAX_DICTIONARY_BYTES + 1],
                ),
                StatusCode::PAYLOAD_TOO_LARGE,
            ),
            (
                put("tok", id.to_string(), dict.clone()),
                StatusCode::NO_CONTENT,
            ),
            (with_dict(1..4), StatusCode::OK),
        ];
        for (i, (req, want)) in cases.into_iter().enumerate() {
            let response = app(state.clone(), true)
                .oneshot(req)
                .await
                .expect("response");
            assert_eq!(response.status(), want, "case {i}");
        }
        let topics =
            embedded::topics(state.embedded_log.as_ref().expect("embedded")).expect("topics");
        assert_eq!(
            topics[0].end_offset, 3,
            "the batch is in once its dictionary is"
        );
    }

    #[tokio::test]
    async fn the_read_api_can_require_a_token_or_be_off() {
        let dir = tempfile::tempdir().expect("tempdir");
        let open = state(dir.path());
        let with = |read_api| {
            Arc::new(AppState {
                dictionaries: Dictionaries::new(1 << 20),
                access: std::sync::RwLock::new(Arc::new(Access {
                    registry: open.access().registry.clone(),
                    rates: crate::rates::DeviceRates::new(&HashMap::new(), 100, 1 << 16),
                    read_api,
                })),
                publisher: open.publisher.clone(),
                limits: open.limits,
                naming: open.naming.clone(),
                clock_skew_threshold_ms: open.clock_skew_threshold_ms,
                metrics: Metrics::new(),
                embedded_log: open.embedded_log.clone(),
                decoding: open.decoding.clone(),
                reads: open.reads.clone(),
            })
        };
        let get = |token: Option<&str>| {
            let mut r = Request::get("/v1/log");
            if let Some(t) = token {
                r = r.header(header::AUTHORIZATION, format!("Bearer {t}"));
            }
            r.body(Body::empty()).expect("request")
        };
        let operator = |t: &str| {
            ReadApi::Tokens(vec![ReadToken {
                sha256: hash_token(t),
                tenant: None,
            }])
        };
        for (api, token, want) in [
            (ReadApi::Open, None, StatusCode::OK),
            (operator("reader"), Some("reader"), StatusCode::OK),
            (operator("reader"), Some("tok"), StatusCode::UNAUTHORIZED),
            (operator("reader"), None, StatusCode::UNAUTHORIZED),
            (ReadApi::Disabled, Some("reader"), StatusCode::NOT_FOUND),
        ] {
            let response = app(with(api), true)
                .oneshot(get(token))
                .await
                .expect("response");
            assert_eq!(response.status(), want, "{token:?}");
        }
    }

    #[tokio::test]
    async fn replay_is_acknowledged_as_duplicate() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = state(dir.path());
        for want in [
            r#"{"accepted":5,"duplicates":0}"#,
            r#"{"accepted":0,"duplicates":5}"#,
        ] {
            let response = app(state.clone(), true)
                .oneshot(request("tok", body("d1", 1..6)))
                .await
                .expect("response");
            assert_eq!(response.status(), StatusCode::OK);
            assert_eq!(text_of(response).await, want);
        }
    }

    /// A batch for a stream its tenant may not create (past `max_topics_per_tenant`) gets 400
    /// with the reason (the agent dead-letters it and goes on with its other streams: a 503
    /// would hold them all), and the tenant's existing streams go on.
    #[tokio::test]
    async fn a_stream_past_its_tenants_topics_gets_400_with_why() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = state_with_topics(dir.path(), 1);
        let post = |stream: &str, seqs| {
            let mut b = batch("d1", "a/b", seqs);
            b.stream = stream.into();
            request("tok", encoded(&b))
        };
        let response = app(state.clone(), true)
            .oneshot(post("t", 1..3))
            .await
            .expect("response");
        assert_eq!(response.status(), StatusCode::OK);
        let response = app(state.clone(), true)
            .oneshot(post("u", 1..3))
            .await
            .expect("response");
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        let text = text_of(response).await;
        assert!(
            text.contains("stream refused") && text.contains("max_topics_per_tenant"),
            "{text}"
        );
        assert!(
            state
                .metrics
                .render()
                .contains("ingest_batches_refused_total{reason=\"tenant_topics\"} 1"),
            "counted"
        );
        assert!(state.publisher.is_ready());
        let response = app(state.clone(), true)
            .oneshot(post("t", 3..5))
            .await
            .expect("response");
        assert_eq!(
            response.status(),
            StatusCode::OK,
            "the existing stream goes on"
        );
    }

    /// A batch past a limit of the whole embedded log (here its last topic id is taken) gets
    /// 503 + Retry-After with the reason in the body, and the log stays ready.
    #[tokio::test]
    async fn a_full_log_says_why_in_its_503() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("log.db");
        drop(EmbeddedLog::open(&path, Default::default(), 1_000).expect("create"));
        rusqlite::Connection::open(&path)
            .expect("open")
            .execute(
                "INSERT INTO topics (name, next_offset, bytes, id, tenant) VALUES ('iot.other.t', 0, 0, ?1, 'other')",
                [embedded::MAX_TOPICS as i64],
            )
            .expect("the last topic id taken");
        let state = state(dir.path());
        let response = app(state.clone(), true)
            .oneshot(request("tok", body("d1", 1..3)))
            .await
            .expect("response");
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[HEADER_RETRY_AFTER], "1");
        let text = text_of(response).await;
        assert!(
            text.contains("stream log full, retry later") && text.contains("topics, its limit"),
            "{text}"
        );
        assert!(
            state
                .metrics
                .render()
                .contains("ingest_batches_refused_total{reason=\"log_full\"} 1"),
            "counted"
        );
        assert!(state.publisher.is_ready());
    }
}
