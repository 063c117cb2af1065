//! The uplink: sends due batches to the ingest over HTTP(S) and tells the buffer what left.
//!
//! Invariants: a batch is acknowledged to the buffer (deleted) only after a 2xx; a 400 moves it
//! to the dead-letter table; anything else keeps it and retries with exponential backoff and
//! jitter. At most one request per stream is in flight, and a stream's next batch is sent
//! only once the previous one is answered, so order per (device, stream) holds into the log
//! whatever the concurrency across streams. While a FIFO stream drains a backlog, its next
//! batch is read (protected) and compressed while the previous request is in flight, and kept
//! only if that one was delivered (then sent if still fresh, starting right after it;
//! `request::ReadAhead`).
//!
//! Concurrency: up to `ingest.max_in_flight` requests at once across streams, the last slot
//! kept for critical streams, so critical data never waits behind a full pipe of bulk. While
//! the ingest fails, no batch goes: a `GET /readyz` probes it (with backoff and failover), so
//! no records sit in requests to a dead link. After every answer the scheduler decides again,
//! so the batch sent next is the most urgent one, not the one that failed.
//!
//! Parts: this file is the loop ([`Forwarder::run`]): it asks the scheduler ([`crate::batcher`])
//! what is due, starts requests, and books their answers; `request` is one request (read,
//! protect, compress, send); `link` the link's state (`Link`: up, paused, down and probing)
//! and its transitions; `replicas` the failover between ingest replicas.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::BackoffBuilder;
use reqwest::header::{AUTHORIZATION, CONTENT_ENCODING, CONTENT_TYPE, RETRY_AFTER};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::bandwidth::TokenBucket;
use crate::batcher::{
    self, Answer, Candidate, Decision, Lane, PreparedBatch, SchedulePolicy, Scheduler,
};
use crate::buffer::{BufferReader, Protected, StreamProgress, WriterCommand};
use crate::config::{IngestConfig, StreamConfig};
use crate::dictionary::{StreamDictionary, Trained};
use crate::metrics::Metrics;
use crate::retry::{Outcome, classify};
use crate::routing::Priority;
use ingest_wire::BodyVersion;

mod bodies;
mod link;
mod replicas;
mod request;

use bodies::Bodies;
use link::{Link, LinkEvent, open_slots};
use replicas::Replicas;
use request::{
    AHEAD_FRESH, Covered, Ended, ReadAhead, Request, SendError, Sent, Uplink, client_now,
    tell_buffer,
};

/// The forwarder stage.
pub struct Forwarder {
    /// This device's id.
    pub device_id: String,
    /// The buffer's sequence epoch (part of every record's idempotency key).
    pub epoch: u64,
    /// Uplink settings.
    pub ingest: IngestConfig,
    /// Bearer token (replaced by a reload).
    pub token: SharedToken,
    /// The HTTP client ([`http_client`]; replaced by a reload).
    pub client: SharedClient,
    /// Streams, by index (orphans included).
    pub streams: Vec<StreamConfig>,
    /// Per-stream sending state, by index.
    pub lanes: Vec<Lane>,
    /// How the priority classes share the uplink.
    pub schedule: SchedulePolicy,
    /// Read connections to the buffer, one per request that may be in flight.
    pub readers: Vec<BufferReader>,
    /// The read connection for reading ahead ([`request`]): a draining stream's next batch is
    /// read and compressed while its request is in flight. `None`: no reading ahead.
    pub ahead_reader: Option<BufferReader>,
    /// Acks and dead letters go to the buffer writer.
    pub commands: crate::buffer::Queue,
    /// Per stream, what may be in the log: the buffer never evicts it.
    pub protected: Arc<Protected>,
    /// Committed progress from the buffer writer.
    pub progress: watch::Receiver<Vec<StreamProgress>>,
    /// Metrics.
    pub metrics: Metrics,
    /// Beaten on every turn of the loop, at least every `BEAT_INTERVAL` (the watchdog's
    /// proof of progress).
    pub beat: crate::systemd::Beat,
}

/// Longest the forwarder's loop waits before it goes round again, idle or not.
const BEAT_INTERVAL: Duration = Duration::from_secs(1);

/// The bearer token, shared with the reload that may replace it (empty: certificate only).
pub type SharedToken = Arc<std::sync::RwLock<String>>;

/// The HTTP client (TLS roots and client certificate), shared with the reload that may
/// replace it: requests started after take the new one.
pub type SharedClient = Arc<std::sync::RwLock<reqwest::Client>>;

/// The HTTP client towards the ingest: its timeouts, and TLS with the OS trust store plus
/// `ingest.ca_file`'s certificates, presenting `ingest.client_cert_file` (mTLS) if set. Reads
/// the files now; the error names the key and the file.
pub fn http_client(ingest: &IngestConfig) -> Result<reqwest::Client, String> {
    let read = |key: &str, path: &std::path::Path| {
        std::fs::read(path).map_err(|e| format!("ingest.{key}: {}: {e}", path.display()))
    };
    // No proxy from the environment (it would carry an http:// loopback URL's token across
    // the network) and no redirects (a 3xx is the ingest misconfigured: an alarm, never a
    // resend elsewhere that would count as delivered).
    let mut builder = reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(ingest.request_timeout)
        .connect_timeout(ingest.connect_timeout)
        .pool_idle_timeout(Duration::from_secs(60))
        .tcp_keepalive(Duration::from_secs(30));
    if let Some(ca) = &ingest.ca_file {
        let pem = read("ca_file", ca)?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|e| format!("ingest.ca_file: {}: {e}", ca.display()))?;
        if certs.is_empty() {
            return Err(format!(
                "ingest.ca_file: {}: no PEM certificate in it",
                ca.display()
            ));
        }
        for cert in certs {
            builder = builder.add_root_certificate(cert);
        }
    }
    if let Some((cert, key)) = &ingest.client_identity {
        let mut pem = read("client_cert_file", cert)?;
        pem.push(b'\n');
        pem.extend(read("client_key_file", key)?);
        let identity = reqwest::Identity::from_pem(&pem).map_err(|e| {
            format!(
                "ingest.client_cert_file / client_key_file: {} and {}: {e}",
                cert.display(),
                key.display()
            )
        })?;
        builder = builder.identity(identity);
    }
    builder.build().map_err(|e| e.to_string())
}

impl Forwarder {
    /// Runs until `shutdown`. Requests in flight at shutdown are abandoned: their records stay
    /// in the buffer and are resent (and deduplicated) after the restart.
    pub async fn run(mut self, shutdown: CancellationToken) {
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
        let bucket = self
            .ingest
            .max_upload_rate
            .map(|rate| std::sync::Mutex::new(TokenBucket::new(rate, Instant::now())));
        let backoff_builder = backon::ExponentialBuilder::default()
            .with_min_delay(self.ingest.retry_initial)
            .with_max_delay(self.ingest.retry_max)
            .with_jitter()
            .without_max_times();
        let mut backoff = backoff_builder.build();
        if self.readers.is_empty() {
            tracing::error!("the forwarder has no buffer reader; nothing will be sent");
            return;
        }
        let mut scheduler = Scheduler::new(self.schedule);
        // Per stream, its next batch if it was read ahead.
        let mut ahead: Vec<Option<ReadAhead>> = self.streams.iter().map(|_| None).collect();
        let mut in_flight: JoinSet<Ended> = JoinSet::new();
        let mut link = Link::Up;
        let readyz: Vec<reqwest::Url> = self
            .ingest
            .urls
            .iter()
            .filter_map(|u| u.join(ingest_wire::READYZ_PATH).ok())
            .collect();
        let uplink = Arc::new(Uplink {
            client: self.client.clone(),
            generation: self.protected.generation(),
            urls: urls.clone(),
            device_id: self.device_id.clone(),
            token: self.token.clone(),
            readers: std::sync::Mutex::new(std::mem::take(&mut self.readers)),
            ahead_readers: std::sync::Mutex::new(self.ahead_reader.take().into_iter().collect()),
            protected: self.protected.clone(),
            commands: self.commands.clone(),
            bucket,
            metrics: self.metrics.clone(),
            dictionaries: std::sync::Mutex::new(
                self.streams
                    .iter()
                    .map(|s| StreamDictionary::new(s.zstd_dictionary))
                    .collect(),
            ),
            registered: std::sync::Mutex::new(HashSet::new()),
            bodies: std::sync::Mutex::new(Bodies::new(urls.len())),
        });
        loop {
            if shutdown.is_cancelled() {
                return;
            }
            self.beat.beat();
            let progress = self.progress.borrow_and_update().clone();
            let now = Instant::now();
            self.drop_stale_aheads(&mut ahead, link.down(), now);
            let candidates: Vec<Candidate> = self
                .lanes
                .iter_mut()
                .zip(&self.streams)
                .zip(&progress)
                .map(|((lane, stream), p)| {
                    lane.observe(p, now);
                    let mut c = lane.candidate(stream.priority, stream.batch, p);
                    let critical = stream.priority == Priority::Critical;
                    if open_slots(
                        self.ingest.max_in_flight,
                        in_flight.len(),
                        link.down(),
                        critical,
                    ) == 0
                    {
                        c.pending_records = 0;
                    }
                    c
                })
                .collect();
            let decision = match link.hold(now) {
                Some(at) => Decision::WaitUntil(at),
                None if link.down() => {
                    if in_flight.is_empty() {
                        let (client, url) =
                            (client_now(&uplink.client), readyz[replicas.current].clone());
                        let replica = replicas.current;
                        in_flight.spawn(async move {
                            let answer = client.get(url).send().await;
                            Ended::Probed {
                                replica,
                                answer: answer
                                    .map(|r| r.status().as_u16())
                                    .map_err(|e| e.to_string()),
                            }
                        });
                    }
                    Decision::Idle
                }
                _ => scheduler.decide(now, &candidates),
            };
            let stream = match decision {
                Decision::Send(i) => i,
                Decision::WaitUntil(_) | Decision::Idle => {
                    let deadline = match decision {
                        Decision::WaitUntil(at) => at,
                        _ => now + BEAT_INTERVAL,
                    }
                    .min(now + BEAT_INTERVAL);
                    tokio::select! {
                        Some(done) = in_flight.join_next(), if !in_flight.is_empty() => {
                            let ended = match done {
                                Ok(ended) => ended,
                                Err(e) => {
                                    tracing::error!(error = %e, "a request task panicked; the agent must restart");
                                    return;
                                }
                            };
                            match ended {
                                Ended::Empty { stream } => {
                                    // Everything committed left the buffer by other means
                                    // (evicted under quota): move past it.
                                    let latest = self.latest(stream);
                                    self.lanes[stream].found_empty(&latest);
                                    self.lanes[stream].publish_protection(&self.protected, stream);
                                }
                                Ended::ReadFailed { stream, error, damaged: true } => {
                                    tracing::error!(stream = %self.streams[stream].name, %error, "the buffer is damaged: the forwarder stops");
                                    return;
                                }
                                Ended::ReadFailed { stream, error, damaged: false } => {
                                    tracing::error!(stream = %self.streams[stream].name, %error, "cannot read a batch from the buffer; retrying");
                                    self.lanes[stream].abandon();
                                    self.lanes[stream].publish_protection(&self.protected, stream);
                                    link = link.after(LinkEvent::ReadFailed, Instant::now());
                                }
                                Ended::Probed { replica, answer } => {
                                    let (wait, failed) = self.probed(replica, answer, &mut replicas, &urls, &mut backoff);
                                    link = link.after(LinkEvent::Answered { failed, wait }, Instant::now());
                                }
                                Ended::Answered(mut sent) => {
                                    // (Only a delivered request brings one.)
                                    let stream = sent.stream;
                                    ahead[stream] = sent.ahead.take().map(|a| *a);
                                    match &ahead[stream] {
                                        Some(a) => self.lanes[stream].hold_ahead(a.batch.0),
                                        None => self.lanes[stream].drop_ahead(),
                                    }
                                    let (wait, failed) = self.answered(sent, &uplink, &mut replicas, &urls, &mut backoff, &backoff_builder);
                                    link = link.after(LinkEvent::Answered { failed, wait }, Instant::now());
                                }
                            }
                        }
                        changed = self.progress.changed() => if changed.is_err() { return },
                        _ = tokio::time::sleep_until(deadline.into()) => {}
                        _ = shutdown.cancelled() => return,
                    }
                    continue;
                }
            };
            link = link.after(LinkEvent::Sent, now);
            let config = &self.streams[stream];
            let (max_records, max_bytes) =
                self.lanes[stream].limits(&config.batch, &progress[stream]);
            let (spans, newest_first) = self.lanes[stream].spans();
            let prefetched = ahead[stream]
                .take()
                .and_then(|a| self.still_good(a, stream, &spans, &uplink, replicas.current, now));
            self.lanes[stream].drop_ahead();
            // Reading ahead is off under a bandwidth cap (the read reserves its bytes).
            let reads_ahead = uplink.bucket.is_none()
                && self.lanes[stream].drains(&progress[stream], max_records);
            self.lanes[stream].begin(&progress[stream]);
            self.lanes[stream].served(now);
            let request = Request {
                stream,
                spans,
                newest_first,
                max_records,
                max_bytes,
                zstd_level: config.zstd_level,
                stream_name: config.name.clone(),
                epoch: self.epoch,
                borrow: self.ingest.critical_may_exceed_rate
                    && config.priority == Priority::Critical,
                replica: replicas.current,
                uplink: uplink.clone(),
                prefetched,
                ahead: reads_ahead,
                reading_ahead: false,
                background: reads_ahead && config.priority != Priority::Critical,
                abandoned: None,
            };
            in_flight.spawn(request.run());
        }
    }

    /// Books a readiness probe: batches go again after a 200; otherwise the next replica, or
    /// the same after a backoff. Returns the wait and whether the ingest still fails.
    fn probed(
        &mut self,
        replica: usize,
        answer: Result<u16, String>,
        replicas: &mut Replicas,
        urls: &[reqwest::Url],
        backoff: &mut backon::ExponentialBackoff,
    ) -> (Option<Duration>, bool) {
        let reason = match answer {
            Ok(status) if (200..300).contains(&status) => {
                tracing::info!(ingest = %urls[replica], "ingest ready again; sending");
                return (None, false);
            }
            Ok(status) => format!("readiness probe answered {status}"),
            Err(e) => format!("readiness probe failed: {e}"),
        };
        let delay = if replicas.failed() {
            backoff.next().unwrap_or(self.ingest.retry_max)
        } else {
            Duration::ZERO
        };
        if replicas.current != replica {
            self.metrics.ingest_failovers.inc();
            self.metrics.ingest_current.set(replicas.current as i64);
        }
        tracing::warn!(ingest = %urls[replica], %reason, retry_in = ?delay, "ingest not ready; data kept");
        (Some(delay), true)
    }

    /// Drops the batches read ahead that went stale, or all of them while the link is down: what
    /// was never sent must not stay protected from eviction through an outage.
    fn drop_stale_aheads(&mut self, ahead: &mut [Option<ReadAhead>], down: bool, now: Instant) {
        for (stream, slot) in ahead.iter_mut().enumerate() {
            if slot
                .as_ref()
                .is_some_and(|a| down || now.saturating_duration_since(a.read_at) >= AHEAD_FRESH)
            {
                *slot = None;
                self.lanes[stream].drop_ahead();
                self.lanes[stream].publish_protection(&self.protected, stream);
                self.count_read_ahead(stream, false);
            }
        }
    }

    /// Counts a batch read ahead of `stream` as `sent` or `dropped`.
    fn count_read_ahead(&self, stream: usize, sent: bool) {
        let fate = if sent { "sent" } else { "dropped" };
        self.metrics
            .batches_read_ahead
            .with_label_values(&[self.streams[stream].name.as_str(), fate])
            .inc();
    }

    /// The batch read ahead for `stream`, if it is still the one to send: it starts where the
    /// next read would (`spans`), is fresh, and is encoded as a batch read now would be (same
    /// replica, body version, dictionary, and size cap). Otherwise it is dropped.
    fn still_good(
        &self,
        read: ReadAhead,
        stream: usize,
        spans: &[(u64, u64)],
        uplink: &Uplink,
        replica: usize,
        now: Instant,
    ) -> Option<Covered> {
        let ((first, _), ready) = &read.batch;
        let good = spans.first().is_some_and(|&(from, _)| from == *first)
            && now.saturating_duration_since(read.read_at) < AHEAD_FRESH
            && ready.replica == replica
            && ready.asked == uplink.bodies().version(replica, now)
            && ready.dictionary.as_ref().map(|d| d.id)
                == uplink.dictionaries()[stream].current().map(|d| d.id)
            && self.lanes[stream]
                .size_cap
                .is_none_or(|cap| ready.prepared.records <= cap);
        self.count_read_ahead(stream, good);
        good.then_some(read.batch)
    }

    /// The stream's committed progress as of now.
    fn latest(&self, stream: usize) -> StreamProgress {
        self.progress
            .borrow()
            .get(stream)
            .copied()
            .unwrap_or_default()
    }

    /// Books the answer to one request: the lane, the buffer, metrics and replicas. Returns
    /// how long nothing new may go (after a failure or a refusal) and whether the ingest failed.
    fn answered(
        &mut self,
        sent: Sent,
        uplink: &Uplink,
        replicas: &mut Replicas,
        urls: &[reqwest::Url],
        backoff: &mut backon::ExponentialBackoff,
        backoff_builder: &backon::ExponentialBuilder,
    ) -> (Option<Duration>, bool) {
        let Sent {
            stream,
            replica,
            covered,
            batch,
            dictionary,
            outcome,
            heard,
            ahead: _,
        } = sent;
        let heard = heard.map(|h| {
            uplink.bodies().answered(
                replica,
                batch.version,
                h.status,
                h.accepts_v2,
                Instant::now(),
            )
        });
        match heard {
            Some(bodies::Heard::RefusedVersion2) => {
                // An ingest (or a replica behind the same URL) that cannot read version 2: the
                // same records go again at once as version 1; nothing is dead-lettered.
                let reason = outcome.as_ref().map_or("", |(_, r)| r.as_str());
                tracing::warn!(ingest = %urls[replica], %reason, hold = ?bodies::HOLD, "the ingest refused a version 2 batch body; resending it as version 1");
                let latest = self.latest(stream);
                self.lanes[stream].finish(covered, Answer::NotInLog, &latest);
                self.lanes[stream].publish_protection(&self.protected, stream);
                return (None, false);
            }
            Some(bodies::Heard::Changed(version)) => {
                tracing::info!(ingest = %urls[replica], ?version, "ingest batch body version");
            }
            Some(bodies::Heard::Same) | None => {}
        }
        // Only a request without an answer after it went out may be in the log; an explicit
        // refusal or a failed connect means nothing of it was appended.
        let answer = match &outcome {
            Ok((Outcome::Delivered | Outcome::Reject, _)) => Answer::Done,
            Ok((Outcome::TooLarge, _)) if batch.records <= 1 => Answer::Done,
            Ok(_) => Answer::NotInLog,
            Err(SendError::Transport(e)) if e.is_connect() => Answer::NotInLog,
            Err(_) => Answer::Unknown,
        };
        let (outcome, reason) = match outcome {
            Ok(answer) => answer,
            // Without the URL: the reason is logged and shown by `/status`.
            Err(SendError::Transport(e)) => {
                (Outcome::Retry { after: None }, e.without_url().to_string())
            }
        };
        let latest = self
            .progress
            .borrow()
            .get(stream)
            .copied()
            .unwrap_or_default();
        if answer == Answer::Done {
            // Tell the buffer before the lane moves on, so a read never sees them again.
            let command = if outcome == Outcome::Delivered {
                WriterCommand::Ack {
                    stream,
                    first: batch.first_seq,
                    last: batch.last_seq,
                }
            } else {
                WriterCommand::DeadLetter {
                    stream,
                    first: batch.first_seq,
                    last: batch.last_seq,
                    status: if outcome == Outcome::TooLarge {
                        413
                    } else {
                        400
                    },
                    reason: reason.clone(),
                }
            };
            tell_buffer(&self.commands, command);
        }
        self.lanes[stream].finish(covered, answer, &latest);
        self.lanes[stream].publish_protection(&self.protected, stream);
        let stream_name = self.streams[stream].name.as_str();
        let count = |what: &str| {
            self.metrics
                .batches
                .with_label_values(&[stream_name, what])
                .inc();
        };
        match outcome {
            Outcome::Delivered => {
                self.metrics.link_up.set(1);
                self.metrics.delivered_now();
                self.metrics.auth_alarm.set(0);
                self.metrics.wire_bytes.inc_by(batch.body.len() as u64);
                self.metrics.raw_bytes.inc_by(batch.raw_bytes);
                count("delivered");
                self.lanes[stream].size_cap = None;
                *backoff = backoff_builder.build();
                replicas.succeeded();
                uplink.dictionaries()[stream].hit();
                (None, false)
            }
            Outcome::NeedsDictionary => {
                // The replica lacks the batch's dictionary (restarted, or another replica
                // registered it): register it again and resend; repeated misses turn it off.
                if let Some(id) = dictionary {
                    uplink.registered().remove(&(replica, id));
                    if uplink.dictionaries()[stream].missed() {
                        self.metrics
                            .stream_dictionary
                            .with_label_values(&[stream_name])
                            .set(0);
                        tracing::warn!(stream = %stream_name, %reason, "the ingest keeps asking for the zstd dictionary; compressing this stream without one");
                    }
                }
                (None, false)
            }
            Outcome::TooLarge if batch.records > 1 => {
                count("too_large");
                let cap = (batch.records / 2).max(1);
                tracing::warn!(stream = %stream_name, records = batch.records, retry_with = cap, "ingest says the batch is too large; splitting it");
                self.lanes[stream].size_cap = Some(cap);
                (None, false)
            }
            Outcome::Reject | Outcome::TooLarge => {
                self.metrics.link_up.set(1);
                self.metrics
                    .set_last_error(format!("{stream_name}: batch rejected: {reason}"));
                count("dead_lettered");
                tracing::error!(stream = %stream_name, first_seq = batch.first_seq, last_seq = batch.last_seq, %reason, "ingest rejected the batch; kept in the dead-letter table, the queue goes on");
                self.lanes[stream].size_cap = None;
                (None, false)
            }
            Outcome::Alarm => {
                self.metrics.link_up.set(1);
                self.metrics
                    .set_last_error(format!("{stream_name}: credentials refused: {reason}"));
                self.metrics.auth_alarm.set(1);
                count("refused");
                let delay = backoff.next().unwrap_or(self.ingest.retry_max);
                tracing::error!(stream = %stream_name, %reason, retry_in = ?delay, "ingest refuses this device (check ingest.url, device_id and token); data kept");
                (Some(delay), true)
            }
            Outcome::Retry { after } => {
                self.metrics.link_up.set(0);
                self.metrics
                    .set_last_error(format!("{stream_name}: {reason}"));
                count("retried");
                if replica != replicas.current {
                    // Another request already moved away from that replica.
                    return (Some(Duration::ZERO), true);
                }
                let delay = if replicas.failed() {
                    backoff
                        .next()
                        .unwrap_or(self.ingest.retry_max)
                        .max(after.unwrap_or_default())
                } else {
                    // Another replica has not failed yet in this round: try it now.
                    Duration::ZERO
                };
                if replicas.current != replica {
                    self.metrics.ingest_failovers.inc();
                    self.metrics.ingest_current.set(replicas.current as i64);
                    tracing::warn!(stream = %stream_name, %reason, from = %urls[replica], to = %urls[replicas.current], "ingest replica unreachable or busy; failing over, data kept");
                } else {
                    tracing::warn!(stream = %stream_name, %reason, retry_in = ?delay, "ingest unreachable or busy; data kept, retrying");
                }
                (Some(delay), true)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::request::{Registration, registration};
    use super::{Link, LinkEvent, Replicas, open_slots};
    use crate::retry::Outcome;

    #[test]
    fn dictionary_registration_answers() {
        for (status, want) in [
            (204, Registration::Done),
            (200, Registration::Done),
            (400, Registration::Refused),
            (413, Registration::Refused),
            (404, Registration::Refused),
            (405, Registration::Refused),
            (428, Registration::Refused),
            (401, Registration::Failed(Outcome::Alarm)),
            (403, Registration::Failed(Outcome::Alarm)),
            (503, Registration::Failed(Outcome::Retry { after: None })),
            (429, Registration::Failed(Outcome::Retry { after: None })),
        ] {
            assert_eq!(registration(status), want, "{status}");
        }
    }

    #[test]
    fn link_states_follow_their_table() {
        let now = Instant::now();
        let s = Duration::from_secs;
        let later = now + s(5);
        let answered = |failed, wait| LinkEvent::Answered { failed, wait };
        for (from, event, to) in [
            (Link::Up, LinkEvent::Sent, Link::Up),
            (Link::Down { until: None }, LinkEvent::Sent, Link::Up),
            (
                Link::Up,
                answered(true, Some(s(2))),
                Link::Down {
                    until: Some(now + s(2)),
                },
            ),
            (Link::Up, answered(true, None), Link::Down { until: None }),
            (
                Link::Paused { until: later },
                answered(true, None),
                Link::Down { until: Some(later) },
            ),
            (
                Link::Up,
                answered(false, Some(s(3))),
                Link::Paused { until: now + s(3) },
            ),
            (
                Link::Down { until: None },
                answered(false, Some(s(3))),
                Link::Paused { until: now + s(3) },
            ),
            (Link::Down { until: None }, answered(false, None), Link::Up),
            (
                Link::Down { until: Some(later) },
                answered(false, None),
                Link::Paused { until: later },
            ),
            (
                Link::Down { until: Some(later) },
                answered(true, Some(s(1))),
                Link::Down {
                    until: Some(now + s(1)),
                },
            ),
            (
                Link::Down { until: Some(later) },
                answered(true, None),
                Link::Down { until: Some(later) },
            ),
            (Link::Up, answered(false, None), Link::Up),
            (
                Link::Paused { until: later },
                answered(false, None),
                Link::Paused { until: later },
            ),
            (
                Link::Up,
                LinkEvent::ReadFailed,
                Link::Paused { until: now + s(1) },
            ),
            (
                Link::Down { until: None },
                LinkEvent::ReadFailed,
                Link::Down {
                    until: Some(now + s(1)),
                },
            ),
        ] {
            assert_eq!(from.after(event, now), to, "{from:?} + {event:?}");
        }
        // What each state lets through.
        assert_eq!(Link::Up.hold(now), None);
        assert_eq!(Link::Paused { until: later }.hold(now), Some(later));
        assert_eq!(
            Link::Paused { until: now }.hold(later),
            None,
            "a wait passed"
        );
        assert!(Link::Down { until: None }.down() && !Link::Paused { until: later }.down());
    }

    #[test]
    fn slots_keep_one_for_critical_and_none_while_probing() {
        // (max, in flight, probing, critical) → slots open
        let cases = [
            ((4, 0, false, false), 3),
            ((4, 2, false, false), 1),
            ((4, 3, false, false), 0),
            ((4, 3, false, true), 1),
            ((4, 4, false, true), 0),
            ((4, 0, true, false), 0),
            ((4, 0, true, true), 0),
            ((1, 0, false, false), 1),
            ((1, 1, false, true), 0),
            ((2, 1, false, false), 0),
            ((2, 1, false, true), 1),
        ];
        for ((max, n, probing, critical), want) in cases {
            assert_eq!(
                open_slots(max, n, probing, critical),
                want,
                "max {max}, {n} in flight, probing {probing}, critical {critical}"
            );
        }
    }

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
