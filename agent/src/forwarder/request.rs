//! One request to the ingest: read and protect a batch, compress it, wait for the bandwidth
//! cap, POST it, and hand the answer back to the loop ([`Ended`]); the uplink's shared parts
//! ([`Uplink`]) and what a refusal of a dictionary means.

use super::*;
use crate::buffer::MAX_SEQ;

/// The request got no usable answer.
#[derive(Debug, thiserror::Error)]
pub(super) enum SendError {
    #[error("request to the ingest failed: {0}")]
    Transport(#[from] reqwest::Error),
}

/// A request that went out, as its task reports it.
pub(super) struct Sent {
    pub(super) stream: usize,
    /// The replica it went to.
    pub(super) replica: usize,
    /// The sequences it stands for (see [`crate::buffer::ReadBatch::covered`]).
    pub(super) covered: (u64, u64),
    pub(super) batch: PreparedBatch,
    /// Id of the zstd dictionary it is compressed with.
    pub(super) dictionary: Option<u32>,
    pub(super) outcome: Result<(Outcome, String), SendError>,
    /// What the ingest answered the POST, when it did.
    pub(super) heard: Option<Heard>,
    /// The stream's next batch, read and compressed while this one was in flight.
    pub(super) ahead: Option<Box<ReadAhead>>,
}

/// A stream's next batch, read (and protected) and compressed while the request before it was
/// in flight: it starts right after that request's records. The forwarder sends it next if that
/// request was delivered, the batch is still fresh ([`AHEAD_FRESH`]) and would be encoded the
/// same way now; otherwise it is dropped, and its records are read again.
pub(super) struct ReadAhead {
    pub(super) read_at: Instant,
    pub(super) batch: Covered,
}

/// The longest a batch read ahead waits to be sent: its `sent_at_ms`, from which the ingest
/// corrects the device's clock, was stamped when it was prepared.
pub(super) const AHEAD_FRESH: Duration = Duration::from_millis(200);

/// What an answer to a batch said besides its outcome.
#[derive(Debug, Clone, Copy)]
pub(super) struct Heard {
    pub(super) status: u16,
    /// It listed body version 2 in `Accept-Post`.
    pub(super) accepts_v2: bool,
}

/// How a request task ended.
pub(super) enum Ended {
    /// Nothing was left to read.
    Empty { stream: usize },
    /// The buffer could not be read; `damaged`: SQLite found the file corrupt (it is marked
    /// for salvage, and the forwarder stops, which stops the agent).
    ReadFailed {
        stream: usize,
        error: String,
        damaged: bool,
    },
    /// The batch went out; the answer (or why there is none).
    Answered(Sent),
    /// A readiness probe of a replica ended: its status, or why there is none.
    Probed {
        replica: usize,
        answer: Result<u16, String>,
    },
}

/// Why a batch could not be prepared.
pub(super) struct PrepareError {
    pub(super) error: String,
    /// The buffer file is damaged (and marked for salvage).
    pub(super) damaged: bool,
}

impl From<&str> for PrepareError {
    fn from(error: &str) -> Self {
        PrepareError {
            error: error.into(),
            damaged: false,
        }
    }
}

/// The client in force now.
pub(super) fn client_now(client: &SharedClient) -> reqwest::Client {
    client
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone()
}

/// The token in force now.
pub(super) fn current(token: &SharedToken) -> String {
    token
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone()
}

/// What every request task shares.
pub(super) struct Uplink {
    pub(super) client: SharedClient,
    pub(super) urls: Vec<reqwest::Url>,
    pub(super) device_id: String,
    pub(super) token: SharedToken,
    /// Idle read connections.
    pub(super) readers: std::sync::Mutex<Vec<BufferReader>>,
    /// The idle read-ahead connection, if it is idle (one stream reads ahead at a time).
    pub(super) ahead_readers: std::sync::Mutex<Vec<BufferReader>>,
    pub(super) protected: Arc<Protected>,
    /// The numbering of the streams this forwarder's indices follow ([`Protected::generation`]).
    pub(super) generation: u64,
    /// Records that fail their checksum go to the buffer writer from here.
    pub(super) commands: crate::buffer::Queue,
    pub(super) bucket: Option<std::sync::Mutex<TokenBucket>>,
    pub(super) metrics: Metrics,
    /// Per stream, its zstd dictionary.
    pub(super) dictionaries: std::sync::Mutex<Vec<StreamDictionary>>,
    /// (replica, dictionary id) pairs the replica has.
    pub(super) registered: std::sync::Mutex<HashSet<(usize, u32)>>,
    /// The body version each replica gets.
    pub(super) bodies: std::sync::Mutex<Bodies>,
}

impl Uplink {
    pub(super) fn dictionaries(&self) -> std::sync::MutexGuard<'_, Vec<StreamDictionary>> {
        self.dictionaries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(super) fn registered(&self) -> std::sync::MutexGuard<'_, HashSet<(usize, u32)>> {
        self.registered
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(super) fn bodies(&self) -> std::sync::MutexGuard<'_, Bodies> {
        self.bodies
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Makes sure `replica` has the dictionary `batch` uses. `None` when it has (or the batch
    /// uses none); otherwise the outcome to book instead of sending: the batch waits.
    pub(super) async fn register(
        &self,
        stream: usize,
        stream_name: &str,
        replica: usize,
        batch: &Ready,
    ) -> Option<Result<(Outcome, String), SendError>> {
        let trained = batch.dictionary.as_ref()?;
        if self.registered().contains(&(replica, trained.id)) {
            return None;
        }
        let url = self.urls[replica]
            .join(&format!(
                "{}/{}",
                ingest_wire::DICTIONARIES_PATH,
                trained.id
            ))
            .ok()?;
        let auth = bearer(&current(&self.token));
        let answer = client_now(&self.client)
            .put(url)
            .header(ingest_wire::HEADER_DEVICE_ID, &self.device_id)
            .headers(auth)
            .body(trained.bytes.clone())
            .send()
            .await;
        let status = match answer {
            Ok(r) => r.status().as_u16(),
            Err(e) => return Some(Err(SendError::Transport(e))),
        };
        match registration(status) {
            Registration::Done => {
                self.registered().insert((replica, trained.id));
                self.metrics.dictionary_registrations.inc();
                tracing::info!(stream = %stream_name, id = trained.id, ingest = %self.urls[replica], "zstd dictionary registered");
                None
            }
            Registration::Refused => {
                self.dictionaries()[stream] = StreamDictionary::Off;
                self.metrics
                    .stream_dictionary
                    .with_label_values(&[stream_name])
                    .set(0);
                tracing::warn!(stream = %stream_name, status, "the ingest does not take this zstd dictionary; compressing this stream without one");
                Some(Ok((
                    Outcome::NeedsDictionary,
                    format!("dictionary registration answered {status}"),
                )))
            }
            Registration::Failed(outcome) => Some(Ok((
                outcome,
                format!("dictionary registration answered {status}"),
            ))),
        }
    }
}

/// What a dictionary registration's answer means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Registration {
    /// 2xx: the replica has it.
    Done,
    /// Refused (400, 413), or an ingest from before dictionaries (404, 405, …): the stream's
    /// batches go without one from now on, and the batch is resent at once.
    Refused,
    /// Credentials refused or the ingest failing: booked like a batch with that answer.
    Failed(Outcome),
}

/// Classifies the status of `PUT /v1/dictionaries/{id}`. Pure.
pub(super) fn registration(status: u16) -> Registration {
    match classify(status, None) {
        Outcome::Delivered => Registration::Done,
        outcome @ Outcome::Retry { .. } => Registration::Failed(outcome),
        Outcome::Alarm if status == 401 || status == 403 => Registration::Failed(Outcome::Alarm),
        _ => Registration::Refused,
    }
}

/// One request: read a batch (protecting it), compress it, wait for the bandwidth cap, POST;
/// while it is out, read the stream's next batch if asked to ([`Request::ahead`]).
pub(super) struct Request {
    pub(super) stream: usize,
    pub(super) spans: Vec<(u64, u64)>,
    pub(super) newest_first: bool,
    pub(super) max_records: usize,
    pub(super) max_bytes: usize,
    pub(super) zstd_level: i32,
    pub(super) stream_name: String,
    pub(super) epoch: u64,
    /// Critical under the cap: goes at once, paid back after.
    pub(super) borrow: bool,
    pub(super) replica: usize,
    pub(super) uplink: Arc<Uplink>,
    /// The batch to send, read ahead by the request before; `None`: read it now.
    pub(super) prefetched: Option<Covered>,
    /// Read the next batch (right after this one) while this one is in flight, if this one is
    /// full: the stream is draining a FIFO backlog.
    pub(super) ahead: bool,
    /// This is the read of a next batch: it uses the read-ahead connection, if idle.
    pub(super) reading_ahead: bool,
    /// Its read ahead, if any, is of a stream below the critical class: at a low CPU priority
    /// ([`prepare`]).
    pub(super) background: bool,
    /// For a read ahead: set once the request before it was not delivered; the read then
    /// protects nothing and is not used.
    pub(super) abandoned: Option<Arc<std::sync::atomic::AtomicBool>>,
}

impl Request {
    pub(super) async fn run(mut self) -> Ended {
        let (stream, stream_name) = (self.stream, self.stream_name.clone());
        let uplink = self.uplink.clone();
        let (max_records, ahead) = (self.max_records, self.ahead);
        let (covered, batch) = match self.prefetched.take() {
            Some(ready) => ready,
            None => {
                let spans = std::mem::take(&mut self.spans);
                let request = self.reading(spans, self.newest_first);
                match prepare(request).await.map(|(_, read)| read) {
                    Ok(Ok(Some(ready))) => ready,
                    Ok(Ok(None)) => return Ended::Empty { stream },
                    Ok(Err(PrepareError { error, damaged })) => {
                        return Ended::ReadFailed {
                            stream,
                            error,
                            damaged,
                        };
                    }
                    Err(error) => {
                        return Ended::ReadFailed {
                            stream,
                            error,
                            damaged: false,
                        };
                    }
                }
            }
        };
        // A full batch of a draining stream: read and compress the next one meanwhile (spawned:
        // it starts now, not when awaited).
        let abandoned = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let next =
            (ahead && batch.prepared.records >= max_records && covered.1 < MAX_SEQ).then(|| {
                let next = Request {
                    abandoned: Some(abandoned.clone()),
                    ..self.following(covered.1)
                };
                tokio::spawn(prepare(next))
            });
        let Uplink {
            client,
            urls,
            device_id,
            token,
            ..
        } = &*uplink;
        tokio::time::sleep(batch.wait).await;
        let (outcome, heard) = match uplink
            .register(stream, &stream_name, batch.replica, &batch)
            .await
        {
            Some(instead) => (instead, None),
            None => {
                let token = current(token);
                send(
                    &client_now(client),
                    &urls[batch.replica],
                    device_id,
                    &token,
                    &batch.prepared,
                )
                .await
            }
        };
        // Only a delivered batch is followed by the one read ahead: otherwise that is not
        // waited for (it ends on its own; its reader goes back, its protection is replaced when
        // this answer is booked). A read ahead that failed is not used: the next request reads
        // again, and reports what it finds.
        let delivered = matches!(outcome, Ok((Outcome::Delivered, _)));
        if !delivered {
            // Before the answer is booked: a read ahead that protects after it would protect
            // records never sent for as long as the link stays down.
            abandoned.store(true, std::sync::atomic::Ordering::SeqCst);
        }
        let ahead = match next {
            Some(next) if delivered => match next.await {
                Ok(Ok((read_at, Ok(Some(batch))))) => Some(Box::new(ReadAhead { read_at, batch })),
                _ => None,
            },
            _ => None,
        };
        Ended::Answered(Sent {
            stream,
            replica: batch.replica,
            covered,
            dictionary: batch.dictionary.as_ref().map(|d| d.id),
            batch: batch.prepared,
            outcome,
            heard,
            ahead,
        })
    }

    /// The read of the batch after `last`: same stream and limits, on the read-ahead connection
    /// (at a low CPU priority if this request's [`Request::background`]).
    fn following(&self, last: u64) -> Request {
        Request {
            reading_ahead: true,
            background: self.background,
            ..self.reading(vec![(last.saturating_add(1), MAX_SEQ)], false)
        }
    }

    /// A read of `spans` with this request's stream and limits, on a request's own connection.
    fn reading(&self, spans: Vec<(u64, u64)>, newest_first: bool) -> Request {
        Request {
            stream: self.stream,
            spans,
            newest_first,
            max_records: self.max_records,
            max_bytes: self.max_bytes,
            zstd_level: self.zstd_level,
            stream_name: self.stream_name.clone(),
            epoch: self.epoch,
            borrow: self.borrow,
            replica: self.replica,
            uplink: self.uplink.clone(),
            prefetched: None,
            ahead: false,
            reading_ahead: false,
            background: false,
            abandoned: None,
        }
    }

    /// Blocking: reads and protects the batch, compresses it, reserves its bytes under the cap
    /// (the wait itself is async, so a stop never waits for it).
    pub(super) fn prepare(self) -> Result<Option<Covered>, PrepareError> {
        let uplink = &*self.uplink;
        let pool = if self.reading_ahead {
            &uplink.ahead_readers
        } else {
            &uplink.readers
        };
        let Some(reader) = pool
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .pop()
        else {
            if self.reading_ahead {
                // Another stream is reading ahead: this one does not.
                return Ok(None);
            }
            return Err("invariant: a reader per request in flight".into());
        };
        // Read, then protect under the lock; read again under it if a commit that may have
        // dropped records ended in between (`crate::buffer::protection`).
        let read_batch = || {
            reader.read_batch(
                self.stream,
                &self.spans,
                self.newest_first,
                self.max_records,
                self.max_bytes,
            )
        };
        let drops = uplink.protected.drops();
        let read = read_batch();
        let read = {
            let mut guard = uplink.protected.lock();
            if uplink.protected.generation() != uplink.generation {
                // A reload renumbered the streams since this forwarder started (it is being
                // stopped): its indices mean other streams now.
                drop(guard);
                pool.lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .push(reader);
                return Err("the streams were reloaded".into());
            }
            let abandoned = self
                .abandoned
                .as_ref()
                .is_some_and(|a| a.load(std::sync::atomic::Ordering::SeqCst));
            let read = if uplink.protected.drops() == drops && !abandoned {
                read
            } else if self.reading_ahead {
                // Or its request was not delivered: the answer is booked (or about to be, under
                // this lock) and nothing would ever unprotect this batch.
                // Not read again under the lock at a low CPU priority (the writer and every
                // other stream's read would wait for it): the next request reads it.
                drop(guard);
                pool.lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .push(reader);
                return Ok(None);
            } else {
                read_batch()
            };
            if let Some((first, last)) = read.as_ref().ok().and_then(|r| r.covered) {
                guard[self.stream].ranges.insert_range(first, last);
            }
            read
        };
        pool.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(reader);
        let read = read.map_err(|e| PrepareError {
            damaged: e.mark_if_corrupt(),
            error: e.to_string(),
        })?;
        if !read.corrupt.is_empty() {
            // Dropped and reported before this batch's ack can delete their range.
            tracing::error!(stream = %self.stream_name, records = read.corrupt.len(), "buffered records failed their checksum; not sent, reported lost");
            let corrupt = WriterCommand::Corrupt {
                stream: self.stream_name.clone(),
                seqs: read.corrupt,
            };
            if uplink.commands.send(corrupt).is_err() {
                return Err("the buffer writer is gone".into());
            }
        }
        let corrupt_only = read.records.is_empty() && read.covered.is_some();
        let Some(covered) = read.covered.filter(|_| !read.records.is_empty()) else {
            if corrupt_only {
                // Only damaged records were read: the writer drops them; read again after,
                // rather than taking the stream for empty (good records may follow).
                return Err("only records failing their checksum were read; read again".into());
            }
            return Ok(None);
        };
        let dictionary = {
            let mut dictionaries = uplink.dictionaries();
            let d = &mut dictionaries[self.stream];
            if !self.reading_ahead
                && d.wants_samples()
                && let Some(trained) = d.learn(&uplink.device_id, &self.stream_name, &read.records)
            {
                tracing::info!(stream = %self.stream_name, id = trained.id, bytes = trained.bytes.len(), "zstd dictionary trained on this stream's records");
                uplink
                    .metrics
                    .stream_dictionary
                    .with_label_values(&[self.stream_name.as_str()])
                    .set(i64::from(trained.id));
            }
            d.current()
        };
        let asked = uplink.bodies().version(self.replica, Instant::now());
        let encoding = batcher::Encoding {
            version: asked,
            zstd_level: self.zstd_level,
            dictionary: dictionary.as_ref().map(|d| d.bytes.as_slice()),
        };
        let prepared = batcher::prepare(
            &uplink.device_id,
            &self.stream_name,
            self.epoch,
            read.records,
            encoding,
            crate::clock::now_ms(),
        )
        .map_err(|e| PrepareError::from(e.to_string().as_str()))?;
        uplink.metrics.body_version.set(match prepared.version {
            BodyVersion::V1 => 1,
            BodyVersion::V2 => 2,
        });
        let wait = uplink.bucket.as_ref().map_or(Duration::ZERO, |bucket| {
            bucket
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .reserve(prepared.body.len(), Instant::now(), self.borrow)
        });
        uplink
            .metrics
            .rate_limited_seconds
            .inc_by(wait.as_secs_f64());
        Ok(Some((
            covered,
            Ready {
                prepared,
                replica: self.replica,
                wait,
                dictionary,
                asked,
            },
        )))
    }
}

/// What [`prepare`] hands back: when the batch was ready, and the batch.
type Prepared = (Instant, Result<Option<Covered>, PrepareError>);

/// Reads and compresses `request`'s batch off the async threads. A read ahead for a stream
/// below the critical class ([`Request::background`]) runs on a thread of its own at a low CPU
/// priority (nice 10): it uses what the cores have left, never taking one from the path of new
/// (critical) records. Errs if the work panicked (or no thread could be started).
async fn prepare(request: Request) -> Result<Prepared, String> {
    let background = request.background;
    let work = move || {
        let read = request.prepare();
        (Instant::now(), read)
    };
    if !background {
        return tokio::task::spawn_blocking(work)
            .await
            .map_err(|e| format!("the batch preparation panicked: {e}"));
    }
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("bulk-read".into())
        .spawn(move || {
            // Best effort: raising one's own nice value needs no privilege.
            let _ = rustix::process::nice(10);
            let _ = tx.send(work());
        })
        .map_err(|e| e.to_string())?;
    rx.await
        .map_err(|_| "the batch preparation panicked".to_string())
}

/// A batch ready to go, with the sequences it stands for.
pub(super) type Covered = ((u64, u64), Ready);

/// A batch ready to go.
pub(super) struct Ready {
    pub(super) prepared: PreparedBatch,
    pub(super) replica: usize,
    /// How long the bandwidth cap holds it back.
    pub(super) wait: Duration,
    /// The dictionary it is compressed with, if any.
    pub(super) dictionary: Option<Arc<Trained>>,
    /// The body version it was asked for (a batch version 2 cannot carry goes as version 1).
    pub(super) asked: BodyVersion,
}

/// `Authorization: Bearer <token>`, or nothing when the agent logs in with its certificate
/// only (empty token).
pub(super) fn bearer(token: &str) -> reqwest::header::HeaderMap {
    let mut headers = reqwest::header::HeaderMap::new();
    if !token.is_empty()
        && let Ok(value) = reqwest::header::HeaderValue::from_str(&format!("Bearer {token}"))
    {
        headers.insert(AUTHORIZATION, value);
    }
    headers
}

/// POSTs one batch and classifies the answer.
pub(super) async fn send(
    client: &reqwest::Client,
    url: &reqwest::Url,
    device_id: &str,
    token: &str,
    batch: &PreparedBatch,
) -> (Result<(Outcome, String), SendError>, Option<Heard>) {
    let response = client
        .post(url.clone())
        .header(CONTENT_TYPE, batch.version.content_type())
        .header(CONTENT_ENCODING, ingest_wire::ENCODING_ZSTD)
        .header(ingest_wire::HEADER_DEVICE_ID, device_id)
        .headers(bearer(token))
        .body(batch.body.clone())
        .send()
        .await;
    let response = match response {
        Ok(response) => response,
        Err(e) => return (Err(SendError::Transport(e)), None),
    };
    let status = response.status();
    let heard = Heard {
        status: status.as_u16(),
        accepts_v2: response
            .headers()
            .get(ingest_wire::HEADER_ACCEPT_POST)
            .and_then(|v| v.to_str().ok())
            .is_some_and(ingest_wire::accepts_v2),
    };
    let retry_after = response
        .headers()
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let outcome = classify(status.as_u16(), retry_after.as_deref());
    // The body says why; keep it short, it ends up in logs and the dead-letter table.
    let text = response.text().await.unwrap_or_default();
    let reason = format!("{status}: {}", text.chars().take(500).collect::<String>());
    (Ok((outcome, reason)), Some(heard))
}

/// Hands an ack or dead letter to the buffer writer.
pub(super) fn tell_buffer(commands: &crate::buffer::Queue, command: WriterCommand) {
    // The queue is shared with the broker link and may be full for a moment.
    let sent = tokio::task::block_in_place(|| commands.send(command));
    if sent.is_err() {
        tracing::error!(
            "buffer writer is gone; the acknowledgement is lost and the batch will be resent (deduplicated)"
        );
    }
}
