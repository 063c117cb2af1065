//! When a stream's batch is due, which stream goes next, and building the batch body.
//!
//! Invariant: a stream's records leave in sequence order, one batch at a time per stream, and
//! the next batch starts right after the last one the ingest acknowledged (or dead-lettered);
//! so order per (device, stream) holds into the log.
//!
//! Policy: a stream is due when `max_records` or `max_bytes` are waiting, or its oldest waiting
//! record is `linger` old. A backlog (after an outage or a restart) is due at once. Among due
//! streams the highest priority class goes first; within a class, the one waiting longest.

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

/// The scheduling decision. Pure.
pub fn decide(now: Instant, candidates: &[Candidate]) -> Decision {
    let due = candidates
        .iter()
        .enumerate()
        .filter_map(|(i, c)| c.due_at().map(|at| (i, c, at)));
    let mut next_deadline: Option<Instant> = None;
    let mut best: Option<(usize, Priority, Instant)> = None;
    for (i, c, at) in due {
        if at > now {
            next_deadline = Some(next_deadline.map_or(at, |d| d.min(at)));
            continue;
        }
        let since = c.waiting_since.unwrap_or(now);
        let better = match best {
            None => true,
            Some((_, p, s)) => c.priority > p || (c.priority == p && since < s),
        };
        if better {
            best = Some((i, c.priority, since));
        }
    }
    match (best, next_deadline) {
        (Some((i, _, _)), _) => Decision::Send(i),
        (None, Some(at)) => Decision::WaitUntil(at),
        (None, None) => Decision::Idle,
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
        }
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
            assert_eq!(decide(now, &candidates), want, "{name}");
        }
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
