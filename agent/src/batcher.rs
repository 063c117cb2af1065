//! When a stream's batch is due, which stream goes next, and building the batch body.
//!
//! Invariant: a stream's records leave in sequence order, one batch at a time per stream, and
//! the next batch starts right after the last one the ingest acknowledged (or dead-lettered);
//! so order per (device, stream) holds into the log.
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

use crate::buffer::{StoredRecord, StreamProgress};
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

/// The forwarder's view of one stream: where sending resumes and since when data waits.
#[derive(Debug, Clone)]
pub struct Lane {
    /// Last sequence acknowledged (or dead-lettered, or found evicted).
    pub cursor: u64,
    waiting_since: Option<Instant>,
    /// `appended_bytes` when the stream was last caught up; `None` during a backlog.
    bytes_mark: Option<u64>,
    /// Cap on records per batch after a 413 (halved each time), reset after a success.
    pub size_cap: Option<usize>,
    /// Highest sequence ever put in a request: it may be in the log even if unacknowledged.
    sent_through: u64,
    /// When a batch of this stream last went out.
    last_served: Option<Instant>,
}

impl Lane {
    /// A lane resuming after `cursor`; `backlog` when records already wait (sent at once).
    pub fn new(cursor: u64, backlog: bool, now: Instant, linger: Duration) -> Lane {
        Lane {
            cursor,
            waiting_since: backlog.then(|| now.checked_sub(linger).unwrap_or(now)),
            bytes_mark: (!backlog).then_some(0),
            size_cap: None,
            sent_through: cursor,
            last_served: None,
        }
    }

    /// A batch of this stream went out at `now` (whatever the answer).
    pub fn served(&mut self, now: Instant) {
        self.last_served = Some(now);
    }

    /// A request carries records up to `last_seq`; returns the previous mark, for [`Lane::unsend`].
    pub fn sent(&mut self, last_seq: u64) -> u64 {
        let before = self.sent_through;
        self.sent_through = self.sent_through.max(last_seq);
        before
    }

    /// That request surely did not reach the log: put the mark back.
    pub fn unsend(&mut self, before: u64) {
        self.sent_through = before;
    }

    /// Records at or below this may be in the log: the buffer must not evict them.
    pub fn sent_floor(&self) -> u64 {
        self.sent_through.max(self.cursor)
    }

    /// Notes newly committed records.
    pub fn observe(&mut self, progress: &StreamProgress, now: Instant) {
        if progress.committed_seq > self.cursor && self.waiting_since.is_none() {
            self.waiting_since = Some(now);
        }
    }

    /// The batch up to `last_seq` has left the buffer (acknowledged, dead-lettered or evicted).
    pub fn advance(&mut self, last_seq: u64, progress: &StreamProgress) {
        self.cursor = self.cursor.max(last_seq);
        if progress.committed_seq <= self.cursor {
            self.waiting_since = None;
            self.bytes_mark = Some(progress.appended_bytes);
        } else {
            // Still a backlog: stay due.
            self.bytes_mark = None;
        }
    }

    /// The scheduler's view of this lane.
    pub fn candidate(
        &self,
        priority: Priority,
        triggers: BatchTriggers,
        progress: &StreamProgress,
    ) -> Candidate {
        Candidate {
            priority,
            pending_records: progress.committed_seq.saturating_sub(self.cursor),
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
}

/// Encodes and compresses `records` (non-empty, in sequence order) as one batch body.
pub fn prepare(
    device_id: &str,
    stream: &str,
    epoch: u64,
    records: Vec<StoredRecord>,
    zstd_level: i32,
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
                }
            })
            .collect(),
    };
    let body = ingest_wire::compress(&ingest_wire::encode_batch(&batch), zstd_level)?;
    Ok(PreparedBatch {
        first_seq,
        last_seq,
        records: count,
        raw_bytes,
        body,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: BatchTriggers = BatchTriggers {
        max_records: 100,
        max_bytes: 1000,
        linger: Duration::from_millis(50),
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
        let mut lane = Lane::new(0, false, now, T.linger);
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
        lane.advance(100, &p(3000, 30_000));
        assert_eq!(
            decide(
                now,
                &[lane.candidate(Priority::Normal, T, &p(3000, 30_000))]
            ),
            Decision::Send(0),
            "backlog stays due"
        );
        lane.advance(3000, &p(3000, 30_000));
        assert_eq!(
            decide(
                now,
                &[lane.candidate(Priority::Normal, T, &p(3000, 30_000))]
            ),
            Decision::Idle
        );

        let restarted = Lane::new(10, true, now, T.linger);
        assert_eq!(
            decide(now, &[restarted.candidate(Priority::Bulk, T, &p(20, 0))]),
            Decision::Send(0),
            "backlog after restart is due at once"
        );
    }
}
