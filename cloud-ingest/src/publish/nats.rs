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
//! - Start-up and outages: the ingest starts without the server, reconnects by itself, and is
//!   ready once connected and the stream checked.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use async_nats::{HeaderMap, connection::State};
use ingest_wire::{BatchAck, Record};

use super::dedup::SeenCache;
use super::{DEDUP_CACHE_SCOPES, Delivery, PublishError, PublishFuture, Publisher};
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
        };
        // Publish everything, then await the PubAcks in order: one round trip per batch.
        let mut pending = Vec::with_capacity(d.batch.records.len());
        let mut failure = None;
        for r in &d.batch.records {
            if seen.contains(r.seq) {
                ack.duplicates += 1;
                continue;
            }
            match self
                .jetstream
                .publish_with_headers(
                    d.topic.clone(),
                    headers(&d, r, &batch_id),
                    r.payload.clone(),
                )
                .await
            {
                Ok(puback) => pending.push((r.seq, puback)),
                Err(e) => {
                    failure = Some(e.to_string());
                    break;
                }
            }
        }
        let mut broken = failure.is_some();
        for (seq, puback) in pending {
            match puback.await {
                // Remember the acknowledged prefix only, so a retry resends the rest in order
                // (the server drops any of them it already has).
                Ok(a) if !broken => {
                    seen.insert(seq);
                    if a.duplicate {
                        ack.duplicates += 1;
                    } else {
                        ack.accepted += 1;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    broken = true;
                    failure.get_or_insert(e.to_string());
                }
            }
        }
        match failure {
            None => Ok(ack),
            Some(reason) => Err(unavailable(reason)),
        }
    }
}

impl Publisher for NatsLog {
    fn publish(&self, delivery: Delivery) -> PublishFuture<'_> {
        Box::pin(self.append(delivery))
    }

    fn is_ready(&self) -> bool {
        self.stream_ok.load(Ordering::Relaxed) && self.client.connection_state() == State::Connected
    }
}

/// The record's headers: `Nats-Msg-Id` plus the same metadata as the Kafka headers.
fn headers(d: &Delivery, r: &Record, batch_id: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert("Nats-Msg-Id", d.record_key(r).as_str());
    h.insert("device", d.batch.device_id.as_str());
    h.insert("tenant", d.tenant.as_str());
    h.insert("stream", d.batch.stream.as_str());
    h.insert("epoch", d.batch.epoch.to_string().as_str());
    h.insert("seq", r.seq.to_string().as_str());
    h.insert("mqtt_topic", r.topic.as_str());
    h.insert("received_at_ms", r.received_at_ms.to_string().as_str());
    h.insert("sent_at_ms", d.batch.sent_at_ms.to_string().as_str());
    h.insert("ingested_at_ms", d.ingested_at_ms.to_string().as_str());
    h.insert("batch_id", batch_id);
    if let Some(qos) = r.qos {
        h.insert("qos", qos.to_string().as_str());
    }
    if !r.boot_id.is_empty() {
        h.insert("boot_id", r.boot_id.as_str());
        h.insert("monotonic_ms", r.monotonic_ms.to_string().as_str());
    }
    if let Some(corrected) = d.corrected_at_ms(r) {
        h.insert("corrected_at_ms", corrected.to_string().as_str());
        h.insert("clock_corrected", "true");
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
