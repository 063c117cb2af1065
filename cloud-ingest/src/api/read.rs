//! The embedded log's read endpoints: `GET /v1/log` (the topics this request may read) and
//! `GET /v1/log/{topic}?from=&limit=` (records, streamed in pages of at most
//! [`MAX_READ_BYTES`]). Only with a read token, unless `allow_without_token`; a tenant's token
//! reads its own tenant's topics. Every refusal is a [`ReadError`], whose `status` is the one
//! table of their statuses.

use std::path::PathBuf;
use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::AppState;
use crate::config::ReadApi;
use crate::publish::embedded;

#[derive(Debug, Deserialize)]
pub(super) struct ReadQuery {
    #[serde(default)]
    from: u64,
    #[serde(default = "default_read_limit")]
    limit: usize,
}

fn default_read_limit() -> usize {
    1000
}

/// Most records one read returns.
const MAX_READ_LIMIT: usize = 10_000;

/// Most payload bytes one read returns (at least one record, whatever its size).
const MAX_READ_BYTES: u64 = 16 << 20;

/// Size of the chunks a read response is streamed in.
const READ_CHUNK_BYTES: usize = 64 * 1024;

/// Longest a read response may take to be sent; a client that reads slower is cut off.
const READ_DEADLINE: std::time::Duration = std::time::Duration::from_secs(60);

/// Read responses served at once per replica; beyond, 503 with Retry-After.
pub const MAX_CONCURRENT_READS: usize = 8;

/// Which tenants' topics a read request may see.
enum Readable {
    /// Every tenant's.
    All,
    /// These tenants' only.
    Tenants(Vec<String>),
}

impl Readable {
    fn covers(&self, naming: &crate::naming::Naming, topic: &str) -> bool {
        match self {
            Readable::All => true,
            Readable::Tenants(tenants) => naming
                .tenant_of(topic)
                .is_some_and(|t| tenants.iter().any(|mine| mine == t)),
        }
    }
}

/// The embedded log's file and what this request may read of it.
fn readable_log(state: &AppState, headers: &HeaderMap) -> Result<(PathBuf, Readable), ReadError> {
    let path = state.embedded_log.clone().ok_or(ReadError::NotEmbedded)?;
    match &state.access().read_api {
        ReadApi::Open => Ok((path, Readable::All)),
        ReadApi::Disabled => Err(ReadError::Disabled),
        ReadApi::Tokens(tokens) => {
            let presented = headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .map(|t| crate::auth::hash_token(t.trim()))
                .ok_or(ReadError::NoToken)?;
            // Every token is compared, in constant time, whichever matches.
            let mut all = false;
            let mut tenants = Vec::new();
            for token in tokens {
                if bool::from(subtle::ConstantTimeEq::ct_eq(
                    &presented[..],
                    &token.sha256[..],
                )) {
                    match &token.tenant {
                        None => all = true,
                        Some(t) => tenants.push(t.clone()),
                    }
                }
            }
            match (all, tenants.is_empty()) {
                (true, _) => Ok((path, Readable::All)),
                (false, false) => Ok((path, Readable::Tenants(tenants))),
                (false, true) => Err(ReadError::NoToken),
            }
        }
    }
}

pub(super) async fn list_topics(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Response, ReadError> {
    let (path, readable) = readable_log(&state, &headers)?;
    let topics = tokio::task::spawn_blocking(move || {
        embedded::topics(&path).map(|topics| {
            topics
                .into_iter()
                .filter(|t| readable.covers(&state.naming, &t.topic))
                .collect::<Vec<_>>()
        })
    })
    .await
    .map_err(|_| ReadError::Internal)?
    .map_err(ReadError::Failed)?;
    Ok(Json(topics).into_response())
}

pub(super) async fn read_topic(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(topic): Path<String>,
    Query(q): Query<ReadQuery>,
) -> Result<Response, ReadError> {
    let (path, readable) = readable_log(&state, &headers)?;
    if !readable.covers(&state.naming, &topic) {
        return Err(ReadError::NotCovered);
    }
    let limit = q.limit.min(MAX_READ_LIMIT);
    let reader = tokio::task::spawn_blocking(move || embedded::Reader::open(&path))
        .await
        .map_err(|_| ReadError::Internal)?
        .map_err(ReadError::Failed)?;
    // Streamed: the records are serialised one at a time on a blocking thread and sent in
    // chunks through a small channel, so a response costs a few chunks of memory, whatever
    // its size; the client pages on with `next_offset`.
    let permit = state
        .reads
        .clone()
        .try_acquire_owned()
        .map_err(|_| ReadError::Busy)?;
    let (chunks, body) = tokio::sync::mpsc::channel::<Result<bytes::Bytes, std::io::Error>>(4);
    let runtime = tokio::runtime::Handle::current();
    let deadline = tokio::time::Instant::now() + READ_DEADLINE;
    // A chunk waits for the client at most until the deadline: a reader that stops reading
    // cannot hold this thread and the log's read snapshot for ever.
    let send = move |chunk: Result<bytes::Bytes, std::io::Error>| {
        runtime
            .block_on(tokio::time::timeout_at(deadline, chunks.send(chunk)))
            .is_ok_and(|sent| sent.is_ok())
    };
    tokio::task::spawn_blocking(move || {
        let _permit = permit;
        let mut chunk = format!(
            "{{\"topic\":{},\"records\":[",
            serde_json::to_string(&topic).unwrap_or_default()
        )
        .into_bytes();
        let (mut next, mut first, mut open) = (q.from, true, true);
        let result = reader.each(&topic, q.from, limit, MAX_READ_BYTES, |record| {
            if !std::mem::take(&mut first) {
                chunk.push(b',');
            }
            next = record.offset + 1;
            if serde_json::to_writer(&mut chunk, &record).is_err() {
                return false;
            }
            if chunk.len() >= READ_CHUNK_BYTES {
                let full = std::mem::replace(&mut chunk, Vec::with_capacity(READ_CHUNK_BYTES));
                open = send(Ok(full.into()));
            }
            open
        });
        let last = match result {
            Ok(()) => {
                chunk.extend_from_slice(format!("],\"next_offset\":{next}}}").as_bytes());
                Ok(chunk.into())
            }
            Err(e) => {
                tracing::warn!(error = %e, "log read failed while streaming");
                Err(std::io::Error::other(e))
            }
        };
        if !send(last) {
            tracing::debug!("a log reader did not read its response in time; cut off");
        }
    });
    let stream = futures_util::stream::unfold(body, |mut body| async move {
        body.recv().await.map(|chunk| (chunk, body))
    });
    Ok((
        [(header::CONTENT_TYPE, "application/json")],
        Body::from_stream(stream),
    )
        .into_response())
}

/// Why a read was not served: the read API's one table from error to status.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The ingest writes to Kafka or NATS. 404.
    #[error(
        "the read API serves the embedded log only; read your Kafka or NATS log with its own clients"
    )]
    NotEmbedded,
    /// `read_api.enabled` is off. 404.
    #[error("the log's read API is disabled (read_api.enabled)")]
    Disabled,
    /// No read token, or an unknown one. 401 with `WWW-Authenticate: Bearer`.
    #[error("a valid read token is required")]
    NoToken,
    /// The token is a tenant's, and the topic is another tenant's. 403.
    #[error("this read token does not cover that topic's tenant")]
    NotCovered,
    /// [`MAX_CONCURRENT_READS`] responses are being sent. 503 with Retry-After.
    #[error("too many reads in flight on this replica, retry later")]
    Busy,
    /// The log could not be read (logged). 503.
    #[error("log read failed")]
    Failed(#[source] embedded::LogError),
    /// The read's thread failed. 500.
    #[error("internal error")]
    Internal,
}

impl ReadError {
    /// Its HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            ReadError::NotEmbedded | ReadError::Disabled => StatusCode::NOT_FOUND,
            ReadError::NoToken => StatusCode::UNAUTHORIZED,
            ReadError::NotCovered => StatusCode::FORBIDDEN,
            ReadError::Busy | ReadError::Failed(_) => StatusCode::SERVICE_UNAVAILABLE,
            ReadError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl IntoResponse for ReadError {
    fn into_response(self) -> Response {
        if let ReadError::Failed(e) = &self {
            tracing::warn!(error = %e, "log read failed");
        }
        let mut response = (
            self.status(),
            Json(serde_json::json!({ "error": self.to_string() })),
        )
            .into_response();
        let headers = response.headers_mut();
        match self {
            ReadError::NoToken => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            ReadError::Busy => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            _ => {}
        }
        response
    }
}
