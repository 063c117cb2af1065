//! The Kafka sink: every record of a batch is produced with librdkafka's idempotent producer
//! (`acks=all`), and the batch is acknowledged only when Kafka acknowledged every record.
//!
//! - Topic: the topic template (`iot.{tenant}.{stream}`); loss reports have their own stream
//!   (`_losses`), so their own topic. Key: the device id, so a device's records of a topic share
//!   a partition and keep their order. Timestamp: the record's receive time (corrected when the
//!   agent's clock was off). Headers: see `wire/SPEC.md`.
//! - Dedup: per replica, in a [`SeenCache`]: a retry reaching the replica that appended the
//!   batch appends nothing twice. A retry reaching another replica after a lost answer appends
//!   the records again; consumers that need exactly-once deduplicate by the headers
//!   (device, stream, epoch, seq): the idempotency key.
//! - Failure: a record not acknowledged within `delivery_timeout` fails the batch with 503.
//!   The prefix of the batch Kafka did acknowledge is remembered, so the retry sends only the
//!   rest, in order. The producer is then replaced (see `KafkaLog::replace_producer`). A record
//!   that timed out may still have been written (librdkafka: "possibly persisted"); its retry
//!   then appends it twice: the one duplicate path, and the headers identify it.
//! - Poison: a record the producer refuses for good when handed over (over the client's
//!   `message.max.bytes`: see `poison`) is replaced by its dead letter (see [`super`]); the
//!   replica stays ready and the producer is kept. Keep the client's `message.max.bytes` at
//!   most the topics' `max.message.bytes`, so the broker never refuses a batch for its size.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use ingest_wire::{BatchAck, Record};
use rdkafka::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};

use super::dedup::SeenCache;
use super::{
    DEDUP_CACHE_SCOPES, Delivery, PublishError, PublishFuture, Publisher, Settled,
    keep_acknowledged_prefix,
};
use crate::config::KafkaConfig;

/// How often the broker's health is probed for `/readyz`.
const HEALTH_INTERVAL: Duration = Duration::from_secs(2);

/// A handle to the Kafka producer.
pub struct KafkaLog {
    producer: RwLock<Arc<FutureProducer>>,
    client_config: ClientConfig,
    seen: SeenCache,
    healthy: Arc<AtomicBool>,
}

impl KafkaLog {
    /// Creates the producer (no broker needs to be up) and starts the health probe.
    /// Must be called within a Tokio runtime.
    pub fn start(config: &KafkaConfig) -> Result<Arc<KafkaLog>, KafkaError> {
        let client_config = client_config(config);
        let producer: FutureProducer = client_config.create()?;
        let log = Arc::new(KafkaLog {
            producer: RwLock::new(Arc::new(producer)),
            client_config,
            seen: SeenCache::new(DEDUP_CACHE_SCOPES),
            healthy: Arc::new(AtomicBool::new(false)),
        });
        tokio::spawn(probe_health(Arc::downgrade(&log)));
        Ok(log)
    }

    fn producer(&self) -> Arc<FutureProducer> {
        self.producer
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Replaces `failed` with a new producer (a new producer id), unless another request already
    /// did. Done after every failed batch: a broker that lost our producer's state (restarted,
    /// or expired it) answers UnknownProducerId to it forever, and a fatal error ends it.
    fn replace_producer(&self, failed: &Arc<FutureProducer>) {
        let mut current = self.producer.write().unwrap_or_else(|p| p.into_inner());
        if !Arc::ptr_eq(&current, failed) {
            return;
        }
        match self.client_config.create() {
            Ok(producer) => {
                tracing::info!(
                    fatal = ?failed.client().fatal_error(),
                    "Kafka producer replaced after a failed batch"
                );
                *current = Arc::new(producer);
            }
            Err(e) => tracing::error!(error = %e, "cannot recreate the Kafka producer"),
        }
    }

    async fn append(&self, d: Delivery) -> Result<BatchAck, PublishError> {
        let mut seen = self.seen.lock(d.scope()).await;
        let producer = self.producer();
        let batch_id = d.batch_id();
        let mut duplicates = 0;
        let mut pending: VecDeque<(&Record, Pending)> = VecDeque::new();
        let mut settled: Vec<(&Record, Settled)> = Vec::new();
        let mut enqueue_error = None;
        'records: for r in &d.batch.records {
            if seen.contains(r.seq) {
                duplicates += 1;
                continue;
            }
            let mut record = FutureRecord::to(&d.topic)
                .key(d.batch.device_id.as_str())
                .payload(r.payload.as_ref())
                .timestamp(d.corrected_at_ms(r).unwrap_or(r.received_at_ms))
                .headers(owned_headers(&d.headers(r, &batch_id)));
            loop {
                match producer.send_result(record) {
                    Ok(delivery) => {
                        pending.push_back((r, Pending::Sent(delivery)));
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                        // librdkafka's queue is full: wait for our oldest record to settle.
                        record = back;
                        match pending.pop_front() {
                            Some((r, p)) => settled.push((r, p.settle().await)),
                            None => tokio::time::sleep(Duration::from_millis(5)).await,
                        }
                    }
                    Err((KafkaError::MessageProduction(code), _)) if poison(code) => {
                        pending.push_back((r, Pending::Refused(code.to_string())));
                        break;
                    }
                    Err((e, _)) => {
                        enqueue_error = Some(e.to_string());
                        break 'records;
                    }
                }
            }
        }
        for (r, p) in pending {
            settled.push((r, p.settle().await));
        }
        // A poison record counts as acknowledged once its dead letter is.
        let mut ack = BatchAck {
            accepted: 0,
            duplicates,
            dead_lettered: 0,
        };
        let (producer_ref, delivery, id) = (&producer, &d, &batch_id);
        let failure =
            keep_acknowledged_prefix(settled, &mut seen, &mut ack, |r, reason| async move {
                self.dead_letter(producer_ref, delivery, r, id, &reason)
                    .await
            })
            .await;
        match failure.or(enqueue_error) {
            None => {
                self.healthy.store(true, Ordering::Relaxed);
                Ok(ack)
            }
            Some(reason) => {
                self.healthy.store(false, Ordering::Relaxed);
                self.replace_producer(&producer);
                Err(PublishError::Unavailable {
                    reason: format!("Kafka did not acknowledge batch {batch_id}: {reason}"),
                })
            }
        }
    }

    /// Appends the dead letter of `r`, which Kafka refused for good with `reason`.
    async fn dead_letter(
        &self,
        producer: &FutureProducer,
        d: &Delivery,
        r: &Record,
        batch_id: &str,
        reason: &str,
    ) -> Result<(), String> {
        tracing::warn!(batch = %batch_id, seq = r.seq, topic = %d.topic, reason, "Kafka refused a record for good: dead-lettered to {}", d.dead_letter_topic);
        let (headers, sample) = d.dead_letter(r, batch_id, reason);
        let record = FutureRecord::to(&d.dead_letter_topic)
            .key(d.batch.device_id.as_str())
            .payload(sample.as_ref())
            .timestamp(d.corrected_at_ms(r).unwrap_or(r.received_at_ms))
            .headers(owned_headers(&headers));
        let delivery = producer
            .send_result(record)
            .map_err(|(e, _)| format!("dead letter not enqueued: {e}"))?;
        match Pending::Sent(delivery).settle().await {
            Settled::Appended { .. } => Ok(()),
            Settled::Poison(e) | Settled::Failed(e) => Err(format!("dead letter refused: {e}")),
        }
    }
}

/// Errors with which the producer refuses one record for good when it is handed over (the
/// record alone is over `message.max.bytes`): a retry would be refused the same way. Only
/// these: the same codes in a delivery report may concern a whole produce batch, records of
/// other requests with it, each of which would fit alone, so they are answered 503 like any
/// failure (and logged with what to configure), never dead-lettered.
fn poison(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::MessageSizeTooLarge | RDKafkaErrorCode::InvalidMessageSize
    )
}

/// A record handed to the producer, or refused by it before it was sent.
enum Pending {
    Sent(DeliveryFuture),
    Refused(String),
}

impl Pending {
    async fn settle(self) -> Settled {
        match self {
            Pending::Refused(reason) => Settled::Poison(reason),
            Pending::Sent(delivery) => match delivery.await {
                Ok(Ok(_)) => Settled::Appended { duplicate: false },
                Ok(Err((KafkaError::MessageProduction(code), _))) if poison(code) => {
                    tracing::error!(%code, "the broker refused a produce batch for its size: set sink.options.properties.message.max.bytes to at most the topics' max.message.bytes, so that an oversized record is refused alone (and dead-lettered) before it is sent");
                    Settled::Failed(code.to_string())
                }
                Ok(Err((e, _))) => Settled::Failed(e.to_string()),
                Err(_) => Settled::Failed("producer dropped the record".into()),
            },
        }
    }
}

impl Publisher for KafkaLog {
    fn publish(&self, delivery: Delivery) -> PublishFuture<'_> {
        Box::pin(self.append(delivery))
    }

    fn is_ready(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }
}

fn client_config(config: &KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    for (key, value) in &config.properties {
        c.set(key, value);
    }
    c.set("bootstrap.servers", &config.brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("max.in.flight.requests.per.connection", "5")
        .set("compression.type", &config.compression)
        .set("linger.ms", config.linger.as_millis().to_string())
        .set(
            "message.timeout.ms",
            config.delivery_timeout.as_millis().to_string(),
        );
    c
}

/// Kafka headers from (name, value) pairs.
fn owned_headers(fields: &[(&str, String)]) -> OwnedHeaders {
    fields.iter().fold(
        OwnedHeaders::new_with_capacity(fields.len()),
        |h, (k, v)| {
            h.insert(Header {
                key: k,
                value: Some(v.as_str()),
            })
        },
    )
}

/// Keeps `healthy` current: a metadata request answered by the brokers means ready.
async fn probe_health(log: Weak<KafkaLog>) {
    loop {
        let Some(strong) = log.upgrade() else { return };
        let producer = strong.producer();
        let healthy = strong.healthy.clone();
        drop(strong);
        let up = tokio::task::spawn_blocking(move || {
            producer.client().fatal_error().is_none()
                && producer
                    .client()
                    .fetch_metadata(None, HEALTH_INTERVAL)
                    .is_ok_and(|m| !m.brokers().is_empty())
        })
        .await
        .unwrap_or(false);
        if healthy.swap(up, Ordering::Relaxed) != up {
            if up {
                tracing::info!("Kafka reachable: ready");
            } else {
                tracing::warn!("Kafka unreachable: not ready (batches are answered 503)");
            }
        }
        tokio::time::sleep(HEALTH_INTERVAL).await;
    }
}
