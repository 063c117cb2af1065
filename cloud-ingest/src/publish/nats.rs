//! The NATS JetStream sink: every record is published to its subject with `Nats-Msg-Id` set to
//! its idempotency key, and the batch is acknowledged only when JetStream acknowledged (PubAck)
//! every record.
//!
//! - Subject: the topic template (`iot.{tenant}.{stream}`), inside one JetStream stream whose
//!   subjects cover the template (`iot.>`), created or checked at start-up.
//! - Dedup: the server drops a `Nats-Msg-Id` it saw within the stream's `duplicate_window`,
//!   whichever replica sends it: exactly-once across ingest replicas within the window. Each
//!   replica also remembers what it appended ([`SeenCache`]), which covers its own retries
//!   beyond the window.
//! - Poison: a record JetStream refuses for good (over the server's `max_payload` or the
//!   stream's maximum message size: see `poison`) is replaced by its dead letter (see
//!   [`super`]), and the batch goes on.
//! - Start-up and outages: the ingest starts without the server, reconnects by itself, and is
//!   ready once connected and the stream checked.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::{self, stream};
use async_nats::{HeaderMap, connection::State};
use ingest_wire::{BatchAck, Record};

use super::dedup::SeenCache;
use super::{
    DEDUP_CACHE_SCOPES, Delivery, PublishError, PublishFuture, Publisher, Settled, header_value,
    keep_acknowledged_prefix,
};
use crate::config::NatsConfig;

/// Delay between attempts to check or create the stream while it fails.
const STREAM_RETRY: Duration = Duration::from_secs(1);

/// A handle to the NATS connection and its JetStream context.
pub struct NatsLog {
    client: async_nats::Client,
    jetstream: jetstream::Context,
    stream_ok: Arc<AtomicBool>,
    seen: SeenCache,
}

impl NatsLog {
    /// Connects (in the background if the server is down) and starts checking the stream.
    /// Must be called within a Tokio runtime.
    pub async fn start(config: &NatsConfig) -> Result<NatsLog, async_nats::ConnectError> {
        let client = async_nats::ConnectOptions::new()
            .name("cloud-ingest")
            .retry_on_initial_connect()
            .connection_timeout(Duration::from_secs(5))
            .connect(config.url.as_str())
            .await?;
        let mut jetstream = jetstream::new(client.clone());
        jetstream.set_timeout(config.ack_timeout);
        let stream_ok = Arc::new(AtomicBool::new(false));
        tokio::spawn(ensure_stream(
            jetstream.clone(),
            config.clone(),
            stream_ok.clone(),
        ));
        Ok(NatsLog {
            client,
            jetstream,
            stream_ok,
            seen: SeenCache::new(DEDUP_CACHE_SCOPES),
        })
    }

    async fn append(&self, d: Delivery) -> Result<BatchAck, PublishError> {
        let mut seen = self.seen.lock(d.scope()).await;
        let batch_id = d.batch_id();
        let unavailable = |reason: String| PublishError::Unavailable {
            reason: format!("JetStream did not acknowledge batch {batch_id}: {reason}"),
        };
        let mut ack = BatchAck {
            accepted: 0,
            duplicates: 0,
            dead_lettered: 0,
        };
        // Publish everything, then await the PubAcks in order: one round trip per batch.
        let mut pending = Vec::with_capacity(d.batch.records.len());
        let mut failure = None;
        for r in &d.batch.records {
            if seen.contains(r.seq) {
                ack.duplicates += 1;
                continue;
            }
            let headers = nats_headers(&d, r, &d.headers(r, &batch_id));
            match self
                .jetstream
                .publish_with_headers(d.topic.clone(), headers, r.payload.clone())
                .await
            {
                Ok(puback) => pending.push((r, Ok(puback))),
                // Only once connected: before, the client checks against a 1 MiB default,
                // not the server's max_payload.
                Err(e)
                    if e.kind() == PublishErrorKind::MaxPayloadExceeded
                        && self.client.connection_state() == State::Connected =>
                {
                    pending.push((r, Err(e.to_string())));
                }
                Err(e) => {
                    failure = Some(e.to_string());
                    break;
                }
            }
        }
        // Every PubAck is awaited, even after a failure: none is left behind.
        let mut settled = Vec::with_capacity(pending.len());
        for (r, puback) in pending {
            settled.push((
                r,
                match puback {
                    Ok(puback) => match puback.await {
                        Ok(a) => Settled::Appended {
                            duplicate: a.duplicate,
                        },
                        Err(e) if poison(&e) => Settled::Poison(e.to_string()),
                        Err(e) => Settled::Failed(e.to_string()),
                    },
                    Err(refused) => Settled::Poison(refused),
                },
            ));
        }
        // The server drops any record of a retry it already has. After a failed publish nothing
        // of the batch is remembered (nor dead-lettered): the retry sends it all again.
        if failure.is_none() {
            let (delivery, id) = (&d, &batch_id);
            failure =
                keep_acknowledged_prefix(settled, &mut seen, &mut ack, |r, reason| async move {
                    self.dead_letter(delivery, r, id, &reason).await
                })
                .await;
        }
        match failure {
            None => Ok(ack),
            Some(reason) => Err(unavailable(reason)),
        }
    }

    /// Appends the dead letter of `r`, which JetStream refused for good with `reason`. It has
    /// `r`'s `Nats-Msg-Id`, so a retry through another replica does not append it twice.
    async fn dead_letter(
        &self,
        d: &Delivery,
        r: &Record,
        batch_id: &str,
        reason: &str,
    ) -> Result<(), String> {
        tracing::warn!(batch = %batch_id, seq = r.seq, subject = %d.topic, reason, "JetStream refused a record for good: dead-lettered to {}", d.dead_letter_topic);
        let (headers, sample) = d.dead_letter(r, batch_id, reason);
        self.jetstream
            .publish_with_headers(
                d.dead_letter_topic.clone(),
                nats_headers(d, r, &headers),
                sample,
            )
            .await
            .map_err(|e| format!("dead letter refused: {e}"))?
            .await
            .map(|_| ())
            .map_err(|e| format!("dead letter refused: {e}"))
    }
}

/// Whether JetStream refused a record for good (a retry would be refused the same way).
fn poison(e: &jetstream::context::PublishError) -> bool {
    use async_nats::jetstream::ErrorCode;
    e.kind() == PublishErrorKind::MaxPayloadExceeded
        || std::error::Error::source(e)
            .and_then(|s| s.downcast_ref::<jetstream::Error>())
            .is_some_and(|j| {
                matches!(
                    j.error_code(),
                    ErrorCode::STREAM_MESSAGE_EXCEEDS_MAXIMUM
                        | ErrorCode::STREAM_HEADER_EXCEEDS_MAXIMUM
                )
            })
}

impl Publisher for NatsLog {
    fn publish(&self, delivery: Delivery) -> PublishFuture<'_> {
        Box::pin(self.append(delivery))
    }

    fn is_ready(&self) -> bool {
        self.stream_ok.load(Ordering::Relaxed) && self.client.connection_state() == State::Connected
    }
}

/// NATS headers: `Nats-Msg-Id` (the record's idempotency key) and `fields` (already encoded).
fn nats_headers(d: &Delivery, r: &Record, fields: &[(&str, String)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert("Nats-Msg-Id", header_value(&d.record_key(r)).as_ref());
    for (name, value) in fields {
        h.insert(*name, value.as_str());
    }
    h
}

/// Checks (or creates) the stream until that succeeds, then re-checks it now and then so
/// `/readyz` notices a stream deleted under us.
async fn ensure_stream(js: jetstream::Context, config: NatsConfig, ok: Arc<AtomicBool>) {
    loop {
        let result = check_stream(&js, &config).await;
        let now_ok = result.is_ok();
        if ok.swap(now_ok, Ordering::Relaxed) != now_ok || !now_ok {
            match &result {
                Ok(()) => tracing::info!(stream = %config.stream, "JetStream stream ready"),
                Err(e) => {
                    tracing::warn!(stream = %config.stream, error = %e, "JetStream stream not usable yet; batches are answered 503")
                }
            }
        }
        let pause = if now_ok {
            Duration::from_secs(10)
        } else {
            STREAM_RETRY
        };
        tokio::time::sleep(pause).await;
    }
}

async fn check_stream(js: &jetstream::Context, config: &NatsConfig) -> Result<(), String> {
    let info = if config.create_stream {
        let mut stream = js
            .get_or_create_stream(stream::Config {
                name: config.stream.clone(),
                subjects: config.subjects.clone(),
                storage: stream::StorageType::File,
                num_replicas: config.replicas,
                duplicate_window: config.duplicate_window,
                ..Default::default()
            })
            .await
            .map_err(|e| e.to_string())?;
        stream.info().await.map_err(|e| e.to_string())?.clone()
    } else {
        let mut stream = js
            .get_stream(&config.stream)
            .await
            .map_err(|e| format!("{e} (create_stream is false: create it yourself)"))?;
        stream.info().await.map_err(|e| e.to_string())?.clone()
    };
    let missing: Vec<_> = config
        .subjects
        .iter()
        .filter(|s| !info.config.subjects.contains(s))
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "stream {} exists with subjects {:?}, which lack {missing:?}; add them to the stream or set sink.options.stream to another one",
            config.stream, info.config.subjects
        ))
    }
}
