//! The uplink: sends due batches to the ingest over HTTP(S) and tells the buffer what left.
//!
//! Invariant: a batch is acknowledged to the buffer (deleted) only after a 2xx; a 400 moves it
//! to the dead-letter table; anything else keeps it and retries with exponential backoff and
//! jitter. After every failure the scheduler decides again, so the batch retried first is the
//! most urgent one, not the one that happened to fail.

use std::sync::Arc;
use std::sync::mpsc::SyncSender;
use std::time::{Duration, Instant};

use backon::BackoffBuilder;
use reqwest::header::{AUTHORIZATION, CONTENT_ENCODING, CONTENT_TYPE, RETRY_AFTER};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::bandwidth::TokenBucket;
use crate::batcher::{self, Decision, Lane, PreparedBatch, SchedulePolicy, Scheduler};
use crate::buffer::{BufferReader, SentFloor, StreamProgress, WriterCommand};
use crate::config::{IngestConfig, StreamConfig};
use crate::metrics::Metrics;
use crate::retry::{Outcome, classify};
use crate::routing::Priority;

/// The forwarder stage.
pub struct Forwarder {
    /// This device's id.
    pub device_id: String,
    /// The buffer's sequence epoch (part of every record's idempotency key).
    pub epoch: u64,
    /// Uplink settings.
    pub ingest: IngestConfig,
    /// Bearer token.
    pub token: String,
    /// Streams, by index (orphans included).
    pub streams: Vec<StreamConfig>,
    /// Per-stream sending state, by index.
    pub lanes: Vec<Lane>,
    /// How the priority classes share the uplink.
    pub schedule: SchedulePolicy,
    /// Read side of the buffer.
    pub reader: BufferReader,
    /// Acks and dead letters go to the buffer writer.
    pub commands: SyncSender<WriterCommand>,
    /// Per stream, the highest sequence sent: the buffer never evicts up to it.
    pub sent_floor: Arc<SentFloor>,
    /// Committed progress from the buffer writer.
    pub progress: watch::Receiver<Vec<StreamProgress>>,
    /// Metrics.
    pub metrics: Metrics,
}

/// The request got no usable answer.
#[derive(Debug, thiserror::Error)]
enum SendError {
    #[error("request to the ingest failed: {0}")]
    Transport(#[from] reqwest::Error),
}

impl Forwarder {
    /// Runs until `shutdown`. A request in flight at shutdown is abandoned: its records stay
    /// in the buffer and are resent (and deduplicated) after the restart.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let client = match reqwest::Client::builder()
            .timeout(self.ingest.request_timeout)
            .connect_timeout(self.ingest.connect_timeout)
            .pool_idle_timeout(Duration::from_secs(60))
            .tcp_keepalive(Duration::from_secs(30))
            .build()
        {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "cannot build the HTTP client; nothing will be sent");
                return;
            }
        };
        // Validated by the config: every base URL takes the path.
        let urls: Vec<reqwest::Url> = self
            .ingest
            .urls
            .iter()
            .filter_map(|u| u.join(ingest_wire::BATCHES_PATH).ok())
            .collect();
        if urls.is_empty() {
            tracing::error!("no usable ingest URL; nothing will be sent");
            return;
        }
        let mut replicas = Replicas::new(urls.len());
        let mut bucket = self
            .ingest
            .max_upload_rate
            .map(|rate| TokenBucket::new(rate, Instant::now()));
        let backoff_builder = backon::ExponentialBuilder::default()
            .with_min_delay(self.ingest.retry_initial)
            .with_max_delay(self.ingest.retry_max)
            .with_jitter()
            .without_max_times();
        let mut backoff = backoff_builder.build();
        let mut reader = Some(self.reader);
        let mut scheduler = Scheduler::new(self.schedule);
        let delivered: Vec<_> = self
            .streams
            .iter()
            .map(|s| {
                self.metrics
                    .batches
                    .with_label_values(&[s.name.as_str(), "delivered"])
            })
            .collect();
        loop {
            if shutdown.is_cancelled() {
                return;
            }
            let progress = self.progress.borrow_and_update().clone();
            let now = Instant::now();
            let candidates: Vec<_> = self
                .lanes
                .iter_mut()
                .zip(&self.streams)
                .zip(&progress)
                .map(|((lane, stream), p)| {
                    lane.observe(p, now);
                    lane.candidate(stream.priority, stream.batch, p)
                })
                .collect();
            let stream = match scheduler.decide(now, &candidates) {
                Decision::Send(i) => i,
                Decision::WaitUntil(at) => {
                    tokio::select! {
                        _ = self.progress.changed() => {}
                        _ = tokio::time::sleep_until(at.into()) => {}
                        _ = shutdown.cancelled() => return,
                    }
                    continue;
                }
                Decision::Idle => {
                    tokio::select! {
                        changed = self.progress.changed() => if changed.is_err() { return },
                        _ = shutdown.cancelled() => return,
                    }
                    continue;
                }
            };
            let lane = &self.lanes[stream];
            let config = &self.streams[stream];
            let max_records = lane
                .size_cap
                .unwrap_or(config.batch.max_records)
                .min(config.batch.max_records);
            let (after, max_bytes, level) =
                (lane.cursor, config.batch.max_bytes, self.ingest.zstd_level);
            let (device, name, epoch) = (self.device_id.clone(), config.name.clone(), self.epoch);
            let mut sent_before = 0;
            let (floors, floor_before) = (self.sent_floor.clone(), self.lanes[stream].sent_floor());
            let taken = reader
                .take()
                .expect("invariant: the reader is returned after every read");
            let prepared = tokio::task::spawn_blocking(move || {
                // Read and raise the floor under the lock, so no eviction slips in between.
                let read = {
                    let mut floor = floors.lock();
                    let read = taken.read_batch(stream, after, max_records, max_bytes);
                    if let Some(last) = read.as_ref().ok().and_then(|r| r.last()) {
                        floor[stream] = floor_before.max(last.seq);
                    }
                    read
                };
                let result = read.map_err(|e| e.to_string()).and_then(|records| {
                    if records.is_empty() {
                        return Ok(None);
                    }
                    batcher::prepare(
                        &device,
                        &name,
                        epoch,
                        records,
                        level,
                        crate::clock::now_ms(),
                    )
                    .map(Some)
                    .map_err(|e| e.to_string())
                });
                (taken, result)
            })
            .await;
            let batch = match prepared {
                Ok((r, result)) => {
                    reader = Some(r);
                    if let Ok(Some(batch)) = &result {
                        sent_before = self.lanes[stream].sent(batch.last_seq);
                    }
                    match result {
                        Ok(Some(batch)) => batch,
                        Ok(None) => {
                            // Everything up to the committed seq left the buffer by other means
                            // (evicted under quota): move the cursor past it.
                            let p = progress[stream];
                            self.lanes[stream].advance(p.committed_seq, &p);
                            self.sent_floor.lock()[stream] = self.lanes[stream].sent_floor();
                            continue;
                        }
                        Err(e) => {
                            tracing::error!(stream = %self.streams[stream].name, error = %e, "cannot read a batch from the buffer; retrying");
                            sleep_or_stop(Duration::from_secs(1), &shutdown).await;
                            continue;
                        }
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "batch preparation panicked; the agent must restart");
                    return;
                }
            };
            if let Some(bucket) = &mut bucket {
                let borrow = self.ingest.critical_may_exceed_rate
                    && self.streams[stream].priority == Priority::Critical;
                let wait = bucket.reserve(batch.body.len(), Instant::now(), borrow);
                if !wait.is_zero() {
                    self.metrics.rate_limited_seconds.inc_by(wait.as_secs_f64());
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = shutdown.cancelled() => return,
                    }
                }
            }
            self.lanes[stream].served(Instant::now());
            let outcome = tokio::select! {
                r = send(&client, &urls[replicas.current], &self.device_id, &self.token, &batch) => r,
                _ = shutdown.cancelled() => return,
            };
            // Only a request without an answer after it went out may be in the log; an explicit
            // refusal or a failed connect means nothing of it was appended.
            let maybe_in_log = match &outcome {
                Ok((o, _)) => *o == Outcome::Delivered,
                Err(SendError::Transport(e)) => !e.is_connect(),
            };
            if !maybe_in_log {
                self.lanes[stream].unsend(sent_before);
                self.sent_floor.lock()[stream] = self.lanes[stream].sent_floor();
            }
            let (outcome, reason) = match outcome {
                Ok(answer) => answer,
                Err(e) => (Outcome::Retry { after: None }, e.to_string()),
            };
            let stream_name = self.streams[stream].name.clone();
            let latest = self
                .progress
                .borrow()
                .get(stream)
                .copied()
                .unwrap_or(progress[stream]);
            match outcome {
                Outcome::Delivered => {
                    self.metrics.link_up.set(1);
                    self.metrics.auth_alarm.set(0);
                    self.metrics.wire_bytes.inc_by(batch.body.len() as u64);
                    self.metrics.raw_bytes.inc_by(batch.raw_bytes);
                    delivered[stream].inc();
                    tell_buffer(
                        &self.commands,
                        WriterCommand::Ack {
                            stream,
                            first: batch.first_seq,
                            last: batch.last_seq,
                        },
                    );
                    self.lanes[stream].advance(batch.last_seq, &latest);
                    self.lanes[stream].size_cap = None;
                    backoff = backoff_builder.build();
                    replicas.succeeded();
                }
                Outcome::TooLarge if batch.records > 1 => {
                    self.metrics
                        .batches
                        .with_label_values(&[stream_name.as_str(), "too_large"])
                        .inc();
                    let cap = (batch.records / 2).max(1);
                    tracing::warn!(stream = %stream_name, records = batch.records, retry_with = cap, "ingest says the batch is too large; splitting it");
                    self.lanes[stream].size_cap = Some(cap);
                }
                Outcome::Reject | Outcome::TooLarge => {
                    self.metrics.link_up.set(1);
                    self.metrics
                        .batches
                        .with_label_values(&[stream_name.as_str(), "dead_lettered"])
                        .inc();
                    tracing::error!(stream = %stream_name, first_seq = batch.first_seq, last_seq = batch.last_seq, %reason, "ingest rejected the batch; kept in the dead-letter table, the queue goes on");
                    tell_buffer(
                        &self.commands,
                        WriterCommand::DeadLetter {
                            stream,
                            first: batch.first_seq,
                            last: batch.last_seq,
                            status: if outcome == Outcome::TooLarge {
                                413
                            } else {
                                400
                            },
                            reason,
                        },
                    );
                    self.lanes[stream].advance(batch.last_seq, &latest);
                    self.lanes[stream].size_cap = None;
                }
                Outcome::Alarm => {
                    self.metrics.link_up.set(1);
                    self.metrics.auth_alarm.set(1);
                    self.metrics
                        .batches
                        .with_label_values(&[stream_name.as_str(), "refused"])
                        .inc();
                    let delay = backoff.next().unwrap_or(self.ingest.retry_max);
                    tracing::error!(stream = %stream_name, %reason, retry_in = ?delay, "ingest refuses this device (check ingest.url, device_id and token); data kept");
                    sleep_or_stop(delay, &shutdown).await;
                }
                Outcome::Retry { after } => {
                    self.metrics.link_up.set(0);
                    self.metrics
                        .batches
                        .with_label_values(&[stream_name.as_str(), "retried"])
                        .inc();
                    let failed = replicas.current;
                    let delay = if replicas.failed() {
                        backoff
                            .next()
                            .unwrap_or(self.ingest.retry_max)
                            .max(after.unwrap_or_default())
                    } else {
                        // Another replica has not failed yet in this round: try it now.
                        Duration::ZERO
                    };
                    if replicas.current != failed {
                        self.metrics.ingest_failovers.inc();
                        self.metrics.ingest_current.set(replicas.current as i64);
                        tracing::warn!(stream = %stream_name, %reason, from = %urls[failed], to = %urls[replicas.current], "ingest replica unreachable or busy; failing over, data kept");
                    } else {
                        tracing::warn!(stream = %stream_name, %reason, retry_in = ?delay, "ingest unreachable or busy; data kept, retrying");
                    }
                    sleep_or_stop(delay, &shutdown).await;
                }
            }
        }
    }
}

/// Which ingest replica requests go to: the same one while it answers (its dedup state then
/// covers our retries), the next one after a failure. Backoff applies once every replica
/// failed in a row.
#[derive(Debug)]
struct Replicas {
    count: usize,
    current: usize,
    failed_in_row: usize,
}

impl Replicas {
    fn new(count: usize) -> Replicas {
        Replicas {
            count: count.max(1),
            current: 0,
            failed_in_row: 0,
        }
    }

    fn succeeded(&mut self) {
        self.failed_in_row = 0;
    }

    /// Records a failure of the current replica and moves to the next; true when every replica
    /// failed since the last success (time to back off).
    fn failed(&mut self) -> bool {
        self.failed_in_row += 1;
        self.current = (self.current + 1) % self.count;
        self.failed_in_row.is_multiple_of(self.count)
    }
}

/// POSTs one batch and classifies the answer.
async fn send(
    client: &reqwest::Client,
    url: &reqwest::Url,
    device_id: &str,
    token: &str,
    batch: &PreparedBatch,
) -> Result<(Outcome, String), SendError> {
    let response = client
        .post(url.clone())
        .header(CONTENT_TYPE, ingest_wire::CONTENT_TYPE_BATCH)
        .header(CONTENT_ENCODING, ingest_wire::ENCODING_ZSTD)
        .header(ingest_wire::HEADER_DEVICE_ID, device_id)
        .header(AUTHORIZATION, format!("Bearer {token}"))
        .body(batch.body.clone())
        .send()
        .await?;
    let status = response.status();
    let retry_after = response
        .headers()
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let outcome = classify(status.as_u16(), retry_after.as_deref());
    // The body says why; keep it short, it ends up in logs and the dead-letter table.
    let text = response.text().await.unwrap_or_default();
    let reason = format!("{status}: {}", text.chars().take(500).collect::<String>());
    Ok((outcome, reason))
}

/// Hands an ack or dead letter to the buffer writer.
fn tell_buffer(commands: &SyncSender<WriterCommand>, command: WriterCommand) {
    // The queue is shared with the broker link and may be full for a moment.
    let sent = tokio::task::block_in_place(|| commands.send(command));
    if sent.is_err() {
        tracing::error!(
            "buffer writer is gone; the acknowledgement is lost and the batch will be resent (deduplicated)"
        );
    }
}

async fn sleep_or_stop(delay: Duration, shutdown: &CancellationToken) {
    tokio::select! {
        _ = tokio::time::sleep(delay) => {}
        _ = shutdown.cancelled() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::Replicas;

    #[test]
    fn replicas_fail_over_in_turn_and_back_off_after_a_full_round() {
        let mut r = Replicas::new(3);
        assert_eq!(r.current, 0);
        let mut seen = Vec::new();
        for _ in 0..6 {
            let back_off = r.failed();
            seen.push((r.current, back_off));
        }
        assert_eq!(
            seen,
            vec![
                (1, false),
                (2, false),
                (0, true),
                (1, false),
                (2, false),
                (0, true)
            ]
        );
        r.failed();
        r.succeeded();
        assert_eq!(r.current, 1, "a replica that answers is kept");
        assert!(!r.failed(), "a success starts a new round");

        let mut one = Replicas::new(1);
        assert!(
            one.failed() && one.failed(),
            "one ingest: back off every time"
        );
        assert_eq!(one.current, 0);
    }
}
