//! When a stream's batch is due, which stream goes next, and building the batch body.
//!
//! Invariant: one batch at a time per stream, and the next one is sent only once the previous
//! one is answered (a draining stream's may be read ahead meanwhile, and is protected like one
//! in flight until sent or dropped). A FIFO stream's next batch starts right after what the ingest acknowledged
//! (or dead-lettered), so order per (device, stream) holds into the log; a newest-first stream
//! sends its newest undelivered records first, then fills the holes below, newest to oldest.
//! Within a batch, records are always in sequence order. A record leaves a [`Lane`] only as
//! delivered, dead-lettered or found gone; everything sent and unanswered stays protected.
//!
//! Batch size adapts: the triggers' size when caught up, growing with the backlog up to
//! `drain_max_records` / `drain_max_bytes`, so a drain uses few large requests.
//!
//! Policy: a stream is due when `max_records` or `max_bytes` are waiting, or its oldest waiting
//! record is `linger` old. A backlog (after an outage or a restart) is due at once. Among due
//! streams: first any stream not served for `starvation_bound` (so nothing waits forever, not
//! even behind a flood of critical data); then critical, strictly; then high, normal and bulk
//! share batches by weight (smooth weighted round robin). Within a class, the stream waiting
//! longest goes first.

use std::time::{Duration, Instant};

use bytes::Bytes;
use ingest_wire::{Batch, Record};

use crate::buffer::{MAX_SEQ, Protection, SeqRanges, StoredRecord, StreamProgress};
use crate::config::BatchTriggers;
use crate::routing::Priority;

/// What the scheduler sees of one stream.
#[derive(Debug, Clone, Copy)]
pub struct Candidate {
    /// Priority class.
    pub priority: Priority,
    /// Records committed after the stream's cursor.
    pub pending_records: u64,
    /// Bytes committed after the cursor, when known (not known for a backlog).
    pub pending_bytes: Option<u64>,
    /// Since when records have been waiting.
    pub waiting_since: Option<Instant>,
    /// When a batch of this stream last went out, if ever.
    pub last_served: Option<Instant>,
    /// The stream's triggers.
    pub triggers: BatchTriggers,
}

/// What the forwarder does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Send a batch of this stream now.
    Send(usize),
    /// Nothing is due; the next linger deadline is then.
    WaitUntil(Instant),
    /// Nothing is waiting at all.
    Idle,
}

impl Candidate {
    fn due_at(&self) -> Option<Instant> {
        if self.pending_records == 0 {
            return None;
        }
        let since = self.waiting_since?;
        let full = self.pending_records >= self.triggers.max_records as u64
            || self
                .pending_bytes
                .is_some_and(|b| b >= self.triggers.max_bytes as u64);
        Some(if full {
            since
        } else {
            since + self.triggers.linger
        })
    }
}

/// How the priority classes share the uplink.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedulePolicy {
    /// Relative shares of high, normal and bulk (critical is strict and takes no share).
    pub weights: [u32; 3],
    /// A due stream not served for this long goes next, whatever its class.
    pub starvation_bound: Duration,
}

impl Default for SchedulePolicy {
    fn default() -> Self {
        SchedulePolicy {
            weights: [4, 2, 1],
            starvation_bound: Duration::from_secs(1),
        }
    }
}

/// Index into [`SchedulePolicy::weights`] of a shared class.
fn share_index(p: Priority) -> Option<usize> {
    match p {
        Priority::Critical => None,
        Priority::High => Some(0),
        Priority::Normal => Some(1),
        Priority::Bulk => Some(2),
    }
}

/// Decides which stream sends next. Its only state is the weighted round robin's credit per
/// class; no I/O, no clock of its own: table-tested.
#[derive(Debug, Clone)]
pub struct Scheduler {
    policy: SchedulePolicy,
    credit: [i64; 3],
}

impl Scheduler {
    /// A scheduler with `policy`.
    pub fn new(policy: SchedulePolicy) -> Scheduler {
        Scheduler {
            policy,
            credit: [0; 3],
        }
    }

    /// The next decision at `now`.
    pub fn decide(&mut self, now: Instant, candidates: &[Candidate]) -> Decision {
        let mut next_deadline: Option<Instant> = None;
        let mut due = Vec::new();
        for (i, c) in candidates.iter().enumerate() {
            match c.due_at() {
                Some(at) if at > now => {
                    next_deadline = Some(next_deadline.map_or(at, |d| d.min(at)))
                }
                Some(_) => due.push((i, c)),
                None => {}
            }
        }
        if due.is_empty() {
            return next_deadline.map_or(Decision::Idle, Decision::WaitUntil);
        }
        let waited = |c: &Candidate| c.waiting_since.unwrap_or(now);
        let longest_waiting = |set: &mut dyn Iterator<Item = &(usize, &Candidate)>| {
            set.min_by_key(|(i, c)| (waited(c), *i)).map(|&(i, _)| i)
        };
        // 1. Nothing waits longer than the bound since its last service.
        let unserved_since = |c: &Candidate| c.last_served.or(c.waiting_since).unwrap_or(now);
        if let Some(&(i, _)) = due
            .iter()
            .filter(|(_, c)| {
                now.saturating_duration_since(unserved_since(c)) >= self.policy.starvation_bound
            })
            .min_by_key(|(i, c)| (unserved_since(c), *i))
        {
            return Decision::Send(i);
        }
        // 2. Critical, strictly.
        if let Some(i) =
            longest_waiting(&mut due.iter().filter(|(_, c)| c.priority == Priority::Critical))
        {
            return Decision::Send(i);
        }
        // 3. Smooth weighted round robin over the classes that have a due stream.
        let mut present = [false; 3];
        for (_, c) in &due {
            if let Some(k) = share_index(c.priority) {
                present[k] = true;
            }
        }
        let total: i64 = (0..3)
            .filter(|&k| present[k])
            .map(|k| i64::from(self.policy.weights[k]))
            .sum();
        for k in (0..3).filter(|&k| present[k]) {
            self.credit[k] += i64::from(self.policy.weights[k]);
        }
        let class = (0..3)
            .filter(|&k| present[k])
            .max_by_key(|&k| (self.credit[k], std::cmp::Reverse(k)))
            .expect("invariant: a due stream has a class");
        self.credit[class] -= total;
        let chosen = longest_waiting(
            &mut due
                .iter()
                .filter(|(_, c)| share_index(c.priority) == Some(class)),
        );
        Decision::Send(chosen.expect("invariant: the chosen class has a due stream"))
    }
}

/// In which order a stream's waiting records leave.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Order {
    /// Oldest first: the log gets the stream in sequence order (the default).
    #[default]
    Fifo,
    /// Newest first, for "latest value" streams: after an outage the newest batch goes first,
    /// then the backlog, newest to oldest. Records keep sequence order within a batch.
    NewestFirst,
}

/// What became of a request, as far as its records are concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// Acknowledged or dead-lettered: its records leave the buffer.
    Done,
    /// Surely not appended (refused, or never connected): sent again later.
    NotInLog,
    /// No usable answer after it went out: it may be in the log; sent again later.
    Unknown,
}

/// The request in flight of a lane.
#[derive(Debug, Clone, Copy)]
struct InFlight {
    /// The stream's committed sequence when its batch was read.
    committed_at_read: u64,
}

/// The forwarder's view of one stream: what is delivered, what is in flight or may be in the
/// log, where the next batch is read from and since when data waits.
#[derive(Debug, Clone)]
pub struct Lane {
    /// Every sequence at or below it is delivered (or dead-lettered, or found gone).
    pub cursor: u64,
    order: Order,
    /// Delivered ranges above the cursor (newest-first leaves holes below what it sent).
    done: SeqRanges,
    /// Ranges put in a request that may be in the log and are not delivered yet.
    maybe_sent: SeqRanges,
    in_flight: Option<InFlight>,
    /// The next batch's records, read ahead while the one before was in flight and not sent
    /// yet: protected like those in flight.
    ahead: Option<(u64, u64)>,
    waiting_since: Option<Instant>,
    /// `appended_bytes` when the stream was last caught up; `None` during a backlog.
    bytes_mark: Option<u64>,
    /// Cap on records per batch after a 413 (halved each time), reset after a success.
    pub size_cap: Option<usize>,
    /// When a batch of this stream last went out.
    last_served: Option<Instant>,
}

impl Lane {
    /// A lane resuming after `cursor`; `backlog` when records already wait (sent at once).
    pub fn new(cursor: u64, backlog: bool, now: Instant, linger: Duration, order: Order) -> Lane {
        Lane {
            cursor,
            order,
            done: SeqRanges::default(),
            maybe_sent: SeqRanges::default(),
            in_flight: None,
            ahead: None,
            waiting_since: backlog.then(|| now.checked_sub(linger).unwrap_or(now)),
            bytes_mark: (!backlog).then_some(0),
            size_cap: None,
            last_served: None,
        }
    }

    /// A batch of this stream went out at `now` (whatever the answer).
    pub fn served(&mut self, now: Instant) {
        self.last_served = Some(now);
    }

    /// Whether a request of this stream is in flight (one at a time keeps the order).
    pub fn busy(&self) -> bool {
        self.in_flight.is_some()
    }

    /// Whether the next batch, of `records`, leaves more waiting behind it in a FIFO stream:
    /// then the batch after it may be read ahead while it is in flight.
    pub fn drains(&self, progress: &StreamProgress, records: usize) -> bool {
        self.order == Order::Fifo && self.pending(progress) > records as u64
    }

    /// `covered` was read ahead and waits to be sent: it stays protected until it is sent (then
    /// as in flight) or [`Lane::drop_ahead`].
    pub fn hold_ahead(&mut self, covered: (u64, u64)) {
        self.ahead = Some(covered);
    }

    /// The batch read ahead is sent now, or dropped (read again when its turn comes).
    pub fn drop_ahead(&mut self) {
        self.ahead = None;
    }

    /// Where the next batch is read from, in reading order, and whether newest first.
    pub fn spans(&self) -> (Vec<(u64, u64)>, bool) {
        let from = self.cursor.saturating_add(1);
        match self.order {
            Order::Fifo => (vec![(from, MAX_SEQ)], false),
            Order::NewestFirst => {
                let mut gaps = self.done.gaps(from, MAX_SEQ);
                gaps.reverse();
                (gaps, true)
            }
        }
    }

    /// Records and bytes of the next batch: the triggers' size when caught up, growing with
    /// the backlog up to the drain sizes (fewer, larger requests while draining).
    /// A newest-first stream sends its newest records (above everything delivered) at the
    /// triggers' size, so they arrive first and fast; its older backlog drains in large batches.
    pub fn limits(&self, t: &BatchTriggers, progress: &StreamProgress) -> (usize, usize) {
        let newest_waiting = self.order == Order::NewestFirst
            && self
                .done
                .iter()
                .next_back()
                .is_none_or(|(_, top)| progress.committed_seq > top);
        let pending = if newest_waiting {
            0
        } else {
            usize::try_from(self.pending(progress)).unwrap_or(usize::MAX)
        };
        let drain_records = t.drain_max_records.max(t.max_records);
        let records = pending.clamp(t.max_records, drain_records);
        let scaled = (t.max_bytes as u128 * records as u128 / t.max_records as u128) as usize;
        let bytes = scaled.min(t.drain_max_bytes.max(t.max_bytes));
        (self.size_cap.map_or(records, |c| c.min(records)), bytes)
    }

    /// A request of this stream starts: its batch is read from [`Lane::spans`] with the
    /// stream's progress as it is now.
    pub fn begin(&mut self, progress: &StreamProgress) {
        self.in_flight = Some(InFlight {
            committed_at_read: progress.committed_seq,
        });
    }

    /// The request carrying the records of `covered` ended with `answer`.
    pub fn finish(&mut self, covered: (u64, u64), answer: Answer, progress: &StreamProgress) {
        self.in_flight = None;
        match answer {
            Answer::Done => {
                self.done.insert_range(covered.0, covered.1);
                self.maybe_sent.remove(covered.0, covered.1);
                self.settle(progress);
            }
            Answer::NotInLog => {}
            Answer::Unknown => self.maybe_sent.insert_range(covered.0, covered.1),
        }
    }

    /// The read found nothing to send: everything committed when it began is delivered or
    /// gone (evicted).
    pub fn found_empty(&mut self, progress: &StreamProgress) {
        if let Some(f) = self.in_flight.take()
            && f.committed_at_read > self.cursor
        {
            self.done.insert_range(self.cursor + 1, f.committed_at_read);
        }
        self.settle(progress);
    }

    /// The request ended before anything was sent (the read failed).
    pub fn abandon(&mut self) {
        self.in_flight = None;
    }

    /// Moves the cursor over delivered ranges and notes whether the stream is caught up.
    fn settle(&mut self, progress: &StreamProgress) {
        while let Some((first, last)) = self.done.first() {
            if first > self.cursor.saturating_add(1) {
                break;
            }
            self.cursor = self.cursor.max(last);
            self.done.remove_through(self.cursor);
        }
        self.maybe_sent.remove_through(self.cursor);
        if self.pending(progress) == 0 {
            self.waiting_since = None;
            self.bytes_mark = Some(progress.appended_bytes);
        } else {
            // Still a backlog: stay due.
            self.bytes_mark = None;
        }
    }

    /// Takes `ranges` (above the cursor) as possibly in the log: kept protected until they are
    /// delivered again (a forwarder started by a reload inherits what the stopped one sent).
    pub fn may_be_in_log(mut self, ranges: &SeqRanges) -> Lane {
        for (first, last) in ranges.iter() {
            self.maybe_sent
                .insert_range(first.max(self.cursor + 1), last);
        }
        self
    }

    /// Puts [`Lane::protection`] in force: `stream`'s entry of `protected`, which the writer
    /// reads under the same lock, held to the end of any commit in which it evicts.
    pub fn publish_protection(&self, protected: &crate::buffer::Protected, stream: usize) {
        protected.lock()[stream] = self.protection();
    }

    /// What the buffer must not evict or expire of this stream.
    pub fn protection(&self) -> Protection {
        let mut ranges = self.maybe_sent.clone();
        for (first, last) in self.done.iter().chain(self.ahead) {
            ranges.insert_range(first, last);
        }
        Protection {
            floor: self.cursor,
            ranges,
        }
    }

    /// Committed records not delivered yet.
    fn pending(&self, progress: &StreamProgress) -> u64 {
        let committed = progress.committed_seq;
        committed
            .saturating_sub(self.cursor)
            .saturating_sub(self.done.count_within(self.cursor + 1, committed))
    }

    /// Notes newly committed records.
    pub fn observe(&mut self, progress: &StreamProgress, now: Instant) {
        if self.pending(progress) > 0 && self.waiting_since.is_none() {
            self.waiting_since = Some(now);
        }
    }

    /// The scheduler's view of this lane (nothing pending while its request is in flight).
    pub fn candidate(
        &self,
        priority: Priority,
        triggers: BatchTriggers,
        progress: &StreamProgress,
    ) -> Candidate {
        Candidate {
            priority,
            pending_records: if self.busy() {
                0
            } else {
                self.pending(progress)
            },
            pending_bytes: self
                .bytes_mark
                .map(|m| progress.appended_bytes.saturating_sub(m)),
            waiting_since: self.waiting_since,
            last_served: self.last_served,
            triggers,
        }
    }
}

/// A batch ready to POST.
#[derive(Debug, Clone)]
pub struct PreparedBatch {
    /// First sequence in it.
    pub first_seq: u64,
    /// Last sequence in it.
    pub last_seq: u64,
    /// Number of records.
    pub records: usize,
    /// Topic + payload bytes before compression.
    pub raw_bytes: u64,
    /// The zstd-compressed protobuf body.
    pub body: Vec<u8>,
    /// The body's version (its `Content-Type`).
    pub version: ingest_wire::BodyVersion,
}

/// How a batch body is encoded and compressed.
#[derive(Debug, Clone, Copy)]
pub struct Encoding<'a> {
    /// Body version 1 or 2 (what the ingest replica takes; version 1 for a batch that does
    /// not fit version 2's limits).
    pub version: ingest_wire::BodyVersion,
    /// zstd level.
    pub zstd_level: i32,
    /// The stream's zstd dictionary, if any.
    pub dictionary: Option<&'a [u8]>,
}

/// Encodes and compresses `records` (non-empty, in sequence order) as one batch body.
pub fn prepare(
    device_id: &str,
    stream: &str,
    epoch: u64,
    records: Vec<StoredRecord>,
    encoding: Encoding<'_>,
    sent_at_ms: i64,
) -> std::io::Result<PreparedBatch> {
    let first_seq = records.first().map_or(0, |r| r.seq);
    let last_seq = records.last().map_or(0, |r| r.seq);
    let count = records.len();
    let mut raw_bytes = 0u64;
    let batch = Batch {
        device_id: device_id.to_owned(),
        stream: stream.to_owned(),
        sent_at_ms,
        epoch,
        records: records
            .into_iter()
            .map(|r| {
                raw_bytes += (r.topic.len() + r.payload.len()) as u64;
                Record {
                    seq: r.seq,
                    topic: r.topic,
                    payload: Bytes::from(r.payload),
                    qos: None,
                    received_at_ms: r.received_at_ms,
                    boot_id: r.boot_id,
                    monotonic_ms: r.monotonic_ms,
                    attributes: r
                        .attributes
                        .into_iter()
                        .map(|(key, value)| ingest_wire::Attribute { key, value })
                        .collect(),
                }
            })
            .collect(),
    };
    let (raw, version) = encoding.version.encode(&batch);
    let body = match encoding.dictionary {
        Some(d) => ingest_wire::compress_with_dictionary(&raw, encoding.zstd_level, d)?,
        None => ingest_wire::compress(&raw, encoding.zstd_level)?,
    };
    Ok(PreparedBatch {
        first_seq,
        last_seq,
        records: count,
        raw_bytes,
        body,
        version,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: BatchTriggers = BatchTriggers {
        max_records: 100,
        max_bytes: 1000,
        linger: Duration::from_millis(50),
        drain_max_records: 1000,
        drain_max_bytes: 5000,
    };

    fn c(
        priority: Priority,
        pending: u64,
        bytes: Option<u64>,
        waited_ms: Option<u64>,
        now: Instant,
    ) -> Candidate {
        Candidate {
            priority,
            pending_records: pending,
            pending_bytes: bytes,
            waiting_since: waited_ms.map(|ms| now - Duration::from_millis(ms)),
            // Served just now unless a case says otherwise, so the starvation bound stays out.
            last_served: Some(now),
            triggers: T,
        }
    }

    #[test]
    fn decisions() {
        use Priority::*;
        let now = Instant::now() + Duration::from_secs(10);
        let cases: Vec<(&str, Vec<Candidate>, Decision)> = vec![
            (
                "nothing waits",
                vec![c(Normal, 0, Some(0), None, now)],
                Decision::Idle,
            ),
            (
                "linger not over",
                vec![c(Normal, 5, Some(50), Some(10), now)],
                Decision::WaitUntil(now + Duration::from_millis(40)),
            ),
            (
                "linger over",
                vec![c(Normal, 5, Some(50), Some(50), now)],
                Decision::Send(0),
            ),
            (
                "count trigger",
                vec![c(Normal, 100, Some(50), Some(0), now)],
                Decision::Send(0),
            ),
            (
                "bytes trigger",
                vec![c(Normal, 5, Some(1000), Some(0), now)],
                Decision::Send(0),
            ),
            (
                "critical first",
                vec![
                    c(Bulk, 500, None, Some(9000), now),
                    c(Critical, 1, Some(10), Some(60), now),
                    c(Normal, 500, None, Some(9000), now),
                ],
                Decision::Send(1),
            ),
            (
                "same class: longest waiting",
                vec![
                    c(Normal, 500, None, Some(100), now),
                    c(Normal, 500, None, Some(900), now),
                ],
                Decision::Send(1),
            ),
            (
                "due low beats not-due high",
                vec![
                    c(Critical, 1, Some(1), Some(10), now),
                    c(Bulk, 100, None, Some(0), now),
                ],
                Decision::Send(1),
            ),
        ];
        for (name, candidates, want) in cases {
            let mut scheduler = Scheduler::new(SchedulePolicy::default());
            assert_eq!(scheduler.decide(now, &candidates), want, "{name}");
        }
    }

    fn decide(now: Instant, candidates: &[Candidate]) -> Decision {
        Scheduler::new(SchedulePolicy::default()).decide(now, candidates)
    }

    #[test]
    fn starvation_bound_beats_even_critical() {
        use Priority::*;
        let now = Instant::now() + Duration::from_secs(10);
        let mut bulk = c(Bulk, 500, None, Some(9000), now);
        let critical = c(Critical, 100, None, Some(5), now);
        bulk.last_served = Some(now - Duration::from_millis(999));
        assert_eq!(
            decide(now, &[bulk, critical]),
            Decision::Send(1),
            "within the bound: critical"
        );
        bulk.last_served = Some(now - Duration::from_millis(1000));
        assert_eq!(
            decide(now, &[bulk, critical]),
            Decision::Send(0),
            "at the bound: the starved bulk stream"
        );
        bulk.last_served = None;
        assert_eq!(
            decide(now, &[bulk, critical]),
            Decision::Send(0),
            "never served and waiting 9 s"
        );
    }

    #[test]
    fn shared_classes_get_batches_by_weight() {
        use Priority::*;
        let now = Instant::now() + Duration::from_secs(10);
        let streams = [
            c(High, 500, None, Some(5), now),
            c(Normal, 500, None, Some(5), now),
            c(Bulk, 500, None, Some(5), now),
        ];
        let mut scheduler = Scheduler::new(SchedulePolicy {
            weights: [4, 2, 1],
            starvation_bound: Duration::from_secs(60),
        });
        let mut counts = [0; 3];
        for _ in 0..700 {
            let Decision::Send(i) = scheduler.decide(now, &streams) else {
                panic!("all are due")
            };
            counts[i] += 1;
        }
        assert_eq!(counts, [400, 200, 100]);
        // Only bulk and normal due: they split 2:1, bulk is never shut out.
        let mut counts = [0; 3];
        for _ in 0..300 {
            let Decision::Send(i) = scheduler.decide(now, &streams[1..]) else {
                panic!("due")
            };
            counts[i + 1] += 1;
        }
        assert_eq!(counts, [0, 200, 100]);
    }

    #[test]
    fn lane_lifecycle() {
        let now = Instant::now();
        let p = |seq, bytes| StreamProgress {
            committed_seq: seq,
            appended_bytes: bytes,
            ..Default::default()
        };
        let mut lane = Lane::new(0, false, now, T.linger, Order::Fifo);
        assert_eq!(
            decide(now, &[lane.candidate(Priority::Normal, T, &p(0, 0))]),
            Decision::Idle
        );
        lane.observe(&p(3, 30), now);
        assert_eq!(
            decide(now, &[lane.candidate(Priority::Normal, T, &p(3, 30))]),
            Decision::WaitUntil(now + T.linger)
        );
        lane.observe(&p(3000, 30_000), now);
        assert_eq!(
            decide(
                now,
                &[lane.candidate(Priority::Normal, T, &p(3000, 30_000))]
            ),
            Decision::Send(0)
        );
        lane.begin(&p(3000, 30_000));
        assert_eq!(
            decide(
                now,
                &[lane.candidate(Priority::Normal, T, &p(3000, 30_000))]
            ),
            Decision::Idle,
            "one request in flight per stream"
        );
        lane.finish((1, 100), Answer::Done, &p(3000, 30_000));
        assert_eq!(
            decide(
                now,
                &[lane.candidate(Priority::Normal, T, &p(3000, 30_000))]
            ),
            Decision::Send(0),
            "backlog stays due"
        );
        lane.begin(&p(3000, 30_000));
        lane.finish((101, 3000), Answer::Done, &p(3000, 30_000));
        assert_eq!(
            decide(
                now,
                &[lane.candidate(Priority::Normal, T, &p(3000, 30_000))]
            ),
            Decision::Idle
        );

        let restarted = Lane::new(10, true, now, T.linger, Order::Fifo);
        assert_eq!(
            decide(now, &[restarted.candidate(Priority::Bulk, T, &p(20, 0))]),
            Decision::Send(0),
            "backlog after restart is due at once"
        );
    }

    #[test]
    fn fifo_lane_protects_what_may_be_in_the_log() {
        let p = StreamProgress {
            committed_seq: 500,
            ..Default::default()
        };
        let mut lane = Lane::new(0, true, Instant::now(), T.linger, Order::Fifo);
        assert_eq!(lane.spans(), (vec![(1, MAX_SEQ)], false));
        lane.begin(&p);
        lane.finish((1, 100), Answer::Unknown, &p);
        assert_eq!(
            lane.protection().droppable()[0],
            (101, MAX_SEQ),
            "no answer: it may be in the log"
        );
        lane.begin(&p);
        lane.finish((1, 200), Answer::NotInLog, &p);
        assert_eq!(
            lane.protection().droppable()[0],
            (101, MAX_SEQ),
            "a refused retry does not unprotect the earlier unknown"
        );
        lane.begin(&p);
        lane.finish((1, 200), Answer::Done, &p);
        assert_eq!(lane.cursor, 200);
        assert_eq!(lane.protection(), Protection::floor(200));
        assert_eq!(lane.spans(), (vec![(201, MAX_SEQ)], false));
    }

    #[test]
    fn a_batch_read_ahead_is_protected_until_sent_or_dropped() {
        let p = StreamProgress {
            committed_seq: 500,
            ..Default::default()
        };
        let mut lane = Lane::new(0, true, Instant::now(), T.linger, Order::Fifo);
        assert!(lane.drains(&p, 100), "400 more wait behind a batch of 100");
        assert!(
            !lane.drains(&p, 500),
            "nothing waits behind the whole backlog"
        );
        lane.begin(&p);
        // 101..=200 read ahead while 1..=100 is in flight; the answer comes.
        lane.hold_ahead((101, 200));
        lane.finish((1, 100), Answer::Done, &p);
        assert_eq!(
            lane.protection().droppable()[0],
            (201, MAX_SEQ),
            "read ahead: not evictable"
        );
        assert_eq!(lane.spans(), (vec![(101, MAX_SEQ)], false), "it is next");
        lane.drop_ahead();
        assert_eq!(lane.protection(), Protection::floor(100));

        let newest = Lane::new(0, true, Instant::now(), T.linger, Order::NewestFirst);
        assert!(!newest.drains(&p, 100), "only FIFO streams read ahead");
    }

    #[test]
    fn newest_first_lane_reads_from_the_top_and_fills_the_holes() {
        let p = |seq| StreamProgress {
            committed_seq: seq,
            ..Default::default()
        };
        let mut lane = Lane::new(0, true, Instant::now(), T.linger, Order::NewestFirst);
        assert_eq!(lane.spans(), (vec![(1, MAX_SEQ)], true));
        assert_eq!(
            lane.limits(&T, &p(1000)),
            (100, 1000),
            "the newest go at the triggers' size"
        );
        // The newest 100 of 1000 go first.
        lane.begin(&p(1000));
        lane.finish((901, 1000), Answer::Done, &p(1000));
        assert_eq!(
            lane.limits(&T, &p(1000)),
            (900, 5000),
            "then the backlog drains in large batches"
        );
        assert_eq!(lane.cursor, 0);
        assert_eq!(lane.spans(), (vec![(1001, MAX_SEQ), (1, 900)], true));
        assert_eq!(lane.pending(&p(1000)), 900);
        assert_eq!(
            lane.protection().droppable(),
            vec![(1, 900), (1001, MAX_SEQ)],
            "the oldest unsent stay evictable"
        );
        // Live records arrived meanwhile: they go next, then the backlog.
        lane.begin(&p(1010));
        lane.finish((1001, 1010), Answer::Done, &p(1010));
        assert_eq!(lane.spans(), (vec![(1011, MAX_SEQ), (1, 900)], true));
        lane.begin(&p(1010));
        lane.finish((1, 900), Answer::Done, &p(1010));
        assert_eq!(lane.cursor, 1010, "the holes closed: the cursor moves up");
        assert_eq!(lane.pending(&p(1010)), 0);
        assert_eq!(lane.spans(), (vec![(1011, MAX_SEQ)], true));
    }

    #[test]
    fn batches_grow_with_the_backlog() {
        let lane = Lane::new(0, true, Instant::now(), T.linger, Order::Fifo);
        let p = |seq| StreamProgress {
            committed_seq: seq,
            ..Default::default()
        };
        assert_eq!(
            lane.limits(&T, &p(5)),
            (100, 1000),
            "caught up: the triggers"
        );
        assert_eq!(lane.limits(&T, &p(300)), (300, 3000));
        assert_eq!(
            lane.limits(&T, &p(100_000)),
            (1000, 5000),
            "draining: the drain caps"
        );
        let mut capped = lane.clone();
        capped.size_cap = Some(50);
        assert_eq!(capped.limits(&T, &p(100_000)), (50, 5000), "after a 413");
    }
}
