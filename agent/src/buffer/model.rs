//! A model-based property test of the buffer: random sequences of appends, commits, reads,
//! acknowledgements, dead letters, protections (records in flight), TTL expiry, evictions by a
//! small quota, and crashes with reopens, checked after every step against a plain in-memory
//! model of what must be held. A crash: the file and its WAL copied as they are while the
//! buffer is open (what a killed process leaves: no checkpoint, no close), and the copy opened.
//!
//! The guarantees it asserts:
//! - nothing acknowledged is lost: every record appended is held (read back byte for byte), or
//!   was acknowledged or dead-lettered by a command, or is covered by a loss report;
//! - nothing is read twice: a read of a stream gives each held record once, in sequence order,
//!   and an acknowledged record is never read again; sequences are never reused, across
//!   crashes;
//! - losses equal reports: the records that vanished in a commit are exactly the ones its loss
//!   reports count (by stream, reason and range), and each report is itself stored, as it
//!   was made, in the loss stream;
//! - eviction follows priority: a stream loses records to the quota only once every stream of
//!   a lower class holds nothing it may drop, and it loses its oldest first; records in flight
//!   (protected) are never dropped;
//! - the accounting (records and bytes per stream) matches what the file holds.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;

use super::*;
use bytes::Bytes;

/// Streams: critical, normal with a TTL, bulk, and the loss stream.
const PRIORITIES: [Priority; 3] = [Priority::Critical, Priority::Normal, Priority::Bulk];
const LOSSES: usize = 3;
const TTL_MS: i64 = 10_000;
const QUOTA: u64 = 24 * 1024;
const TOPIC: &str = "t/1";

#[derive(Debug, Clone)]
enum Op {
    /// One commit of appends: (stream, payload bytes, age in ms at receipt).
    Commit(Vec<(usize, usize, i64)>),
    /// Acknowledge the oldest `take` held records of `stream` (one range).
    Ack { stream: usize, take: usize },
    /// Dead-letter the oldest `take` held records of `stream` (one range).
    DeadLetter { stream: usize, take: usize },
    /// Mark the oldest `take` held records of `stream` in flight (protected).
    Protect { stream: usize, take: usize },
    /// A housekeeping commit that drops what is past its TTL.
    Expire,
    /// The process dies (no clean close) and the buffer is opened again.
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => proptest::collection::vec((0usize..3, 1usize..700, 0i64..20_000), 1..30)
            .prop_map(Op::Commit),
        2 => (0usize..4, 1usize..40).prop_map(|(stream, take)| Op::Ack { stream, take }),
        1 => (0usize..3, 1usize..10).prop_map(|(stream, take)| Op::DeadLetter { stream, take }),
        1 => (0usize..3, 1usize..20).prop_map(|(stream, take)| Op::Protect { stream, take }),
        1 => Just(Op::Expire),
        1 => Just(Op::Reopen),
    ]
}

fn streams() -> Vec<BufferStream> {
    let mut s: Vec<BufferStream> = ["alarms", "telemetry", "logs"]
        .iter()
        .zip(PRIORITIES)
        .map(|(name, priority)| BufferStream {
            name: (*name).into(),
            priority,
            ttl: (*name == "telemetry").then(|| Duration::from_millis(TTL_MS as u64)),
        })
        .collect();
    s.push(BufferStream {
        name: LOSS_STREAM.into(),
        priority: Priority::Critical,
        ttl: None,
    });
    s
}

/// What the buffer must hold, per stream.
#[derive(Default)]
struct Model {
    /// seq → (payload, received_at_ms), for the data streams.
    held: [BTreeMap<u64, (Vec<u8>, i64)>; 3],
    /// Loss reports stored in the loss stream and not acknowledged.
    loss_records: u64,
    /// The next sequence of each stream (data streams and the loss stream).
    next_seq: [u64; 4],
    /// Records in flight, per stream.
    protection: [Protection; 4],
    /// Payloads made so far (each one different).
    made: u64,
    /// Loss reports the last commit appended: they go in after its evictions, so the quota
    /// may be passed by them (and only them).
    fresh_reports: usize,
}

struct Run {
    _dir: tempfile::TempDir,
    path: PathBuf,
    crashes: u32,
    buffer: Option<Buffer>,
    model: Model,
    now_ms: i64,
}

impl Run {
    fn new() -> Run {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("model.db");
        let buffer = Buffer::open(&path, &streams(), QUOTA).expect("open").buffer;
        Run {
            _dir: dir,
            path,
            crashes: 0,
            buffer: Some(buffer),
            model: Model {
                next_seq: [1; 4],
                ..Model::default()
            },
            now_ms: 1_800_000_000_000,
        }
    }

    fn buffer(&mut self) -> &mut Buffer {
        self.buffer.as_mut().expect("open")
    }

    fn protections(&self) -> Vec<Protection> {
        self.model.protection.to_vec()
    }

    /// What the file holds: per stream, every record read back (each once, in order).
    fn read_all(&self) -> Vec<Vec<StoredRecord>> {
        let names: Vec<String> = streams().into_iter().map(|s| s.name).collect();
        let reader = BufferReader::open(&self.path, &names).expect("reader");
        (0..4)
            .map(|i| {
                let read = reader
                    .read_batch(i, &[(1, MAX_SEQ)], false, 100_000, usize::MAX)
                    .expect("read");
                assert!(read.corrupt.is_empty(), "nothing corrupt");
                read.records
            })
            .collect()
    }

    /// The oldest `take` held seqs of data stream `stream`, as one range.
    fn oldest(&self, stream: usize, take: usize) -> Option<(u64, u64)> {
        let held = &self.model.held[stream];
        let first = *held.keys().next()?;
        let last = *held.keys().nth(take.min(held.len()) - 1)?;
        Some((first, last))
    }

    fn apply(&mut self, op: &Op) {
        self.now_ms += 1_000;
        let now = self.now_ms;
        match op {
            Op::Commit(appends) => {
                let mut commands = Vec::new();
                let mut appended = Vec::new();
                for &(stream, size, age) in appends {
                    self.model.made += 1;
                    let mut payload = self.model.made.to_be_bytes().to_vec();
                    payload.resize(size.max(8), (self.model.made % 251) as u8);
                    commands.push(WriterCommand::Append(NewRecord {
                        stream,
                        topic: TOPIC.into(),
                        payload: Bytes::from(payload.clone()),
                        received_at_ms: now - age,
                        monotonic_ms: 1,
                        attributes: Attributes::new(),
                        receipt: None,
                    }));
                    appended.push((stream, payload, now - age));
                }
                let protections = self.protections();
                let summary = self
                    .buffer()
                    .commit(&commands, &protections, now, false)
                    .expect("commit");
                let mut counts = [0u64; 4];
                for (stream, payload, at) in appended {
                    let seq = self.model.next_seq[stream];
                    self.model.next_seq[stream] += 1;
                    self.model.held[stream].insert(seq, (payload, at));
                    counts[stream] += 1;
                }
                // The loss reports of the commit are appended to the loss stream with them.
                counts[LOSSES] = summary.losses.len() as u64;
                assert_eq!(summary.appended, counts, "appended");
                self.settle(&summary, false);
            }
            Op::Ack { stream, take } => {
                let range = if *stream == LOSSES {
                    (self.model.loss_records > 0).then(|| {
                        let first = self.model.next_seq[LOSSES] - self.model.loss_records;
                        (
                            first,
                            first + (*take as u64).min(self.model.loss_records) - 1,
                        )
                    })
                } else {
                    self.oldest(*stream, *take)
                };
                let Some((first, last)) = range else { return };
                let protections = self.protections();
                let summary = self
                    .buffer()
                    .commit(
                        &[WriterCommand::Ack {
                            stream: *stream,
                            first,
                            last,
                        }],
                        &protections,
                        now,
                        false,
                    )
                    .expect("ack");
                let gone = if *stream == LOSSES {
                    let n = last - first + 1;
                    self.model.loss_records -= n;
                    n
                } else {
                    let before = self.model.held[*stream].len();
                    self.model.held[*stream].retain(|&s, _| s < first || s > last);
                    (before - self.model.held[*stream].len()) as u64
                };
                self.model.protection[*stream].ranges.remove(first, last);
                assert_eq!(summary.acked[*stream], gone, "acknowledged");
                self.settle(&summary, false);
            }
            Op::DeadLetter { stream, take } => {
                let Some((first, last)) = self.oldest(*stream, *take) else {
                    return;
                };
                let protections = self.protections();
                let summary = self
                    .buffer()
                    .commit(
                        &[WriterCommand::DeadLetter {
                            stream: *stream,
                            first,
                            last,
                            status: 400,
                            reason: "refused".into(),
                        }],
                        &protections,
                        now,
                        false,
                    )
                    .expect("dead letter");
                let before = self.model.held[*stream].len();
                self.model.held[*stream].retain(|&s, _| s < first || s > last);
                self.model.protection[*stream].ranges.remove(first, last);
                let gone = (before - self.model.held[*stream].len()) as u64;
                assert_eq!(summary.dead_lettered[*stream], gone, "dead-lettered");
                self.settle(&summary, false);
            }
            Op::Protect { stream, take } => {
                if let Some((first, last)) = self.oldest(*stream, *take) {
                    self.model.protection[*stream]
                        .ranges
                        .insert_range(first, last);
                }
            }
            Op::Expire => {
                let protections = self.protections();
                let summary = self
                    .buffer()
                    .commit(&[], &protections, now, true)
                    .expect("expire");
                self.settle(&summary, true);
                // Nothing past its TTL is left, but what is in flight.
                let telemetry = 1;
                for (&seq, (_, at)) in &self.model.held[telemetry] {
                    assert!(
                        *at >= now - TTL_MS || is_protected(&self.model.protection[telemetry], seq),
                        "seq {seq} received at {at} outlived its TTL at {now}"
                    );
                }
            }
            Op::Reopen => {
                // What a killed process leaves: the file and its WAL as they are.
                self.crashes += 1;
                let copy = self
                    .path
                    .with_file_name(format!("crash-{}.db", self.crashes));
                let side = |p: &Path, ext: &str| space::side(p, ext);
                std::fs::copy(&self.path, &copy).expect("copy the file");
                if side(&self.path, "-wal").exists() {
                    std::fs::copy(side(&self.path, "-wal"), side(&copy, "-wal")).expect("wal");
                }
                drop(self.buffer.take());
                for ext in ["", "-wal", "-shm", ".reserve"] {
                    let _ = std::fs::remove_file(side(&self.path, ext));
                }
                self.path = copy;
                let opened = Buffer::open(&self.path, &streams(), QUOTA).expect("reopen");
                assert!(opened.quarantine.is_none(), "a reopen is no corruption");
                self.buffer = Some(opened.buffer);
            }
        }
        self.check();
    }

    /// Takes in what a commit dropped: every record gone from a data stream without a command
    /// is covered by exactly its loss reports (the TTL's: what was past it, on an `expire`
    /// commit, which drops by TTL before the quota evicts; the quota's: the rest), and the
    /// reports are in the loss stream.
    fn settle(&mut self, summary: &CommitSummary, expire: bool) {
        let held = self.read_all();
        let names = ["alarms", "telemetry", "logs"];
        let mut expired: [BTreeSet<u64>; 3] = Default::default();
        let mut evicted: [BTreeSet<u64>; 3] = Default::default();
        for i in 0..3 {
            let now_held: BTreeSet<u64> = held[i].iter().map(|r| r.seq).collect();
            for (&seq, (_, at)) in &self.model.held[i] {
                if !now_held.contains(&seq) {
                    assert!(
                        !is_protected(&self.model.protection[i], seq),
                        "{}: seq {seq} was in flight and was dropped",
                        names[i]
                    );
                    let past_ttl = expire && i == 1 && *at < self.now_ms - TTL_MS;
                    if past_ttl {
                        expired[i].insert(seq);
                    } else {
                        evicted[i].insert(seq);
                    }
                }
            }
        }
        let mut reported = [[0u64; 2]; 3];
        for report in &summary.losses {
            let i = names
                .iter()
                .position(|n| report.stream.as_deref() == Some(n))
                .expect("a report names its stream");
            let (first, last) = (
                report.first_seq.expect("first"),
                report.last_seq.expect("last"),
            );
            let kind = usize::from(report.reason != LossReason::Ttl);
            let dropped = if kind == 0 { &expired[i] } else { &evicted[i] };
            let within = dropped.range(first..=last).count() as u64;
            assert_eq!(
                within, report.count,
                "{report:?} counts what it dropped in its range"
            );
            reported[i][kind] += report.count;
        }
        for i in 0..3 {
            assert_eq!(
                reported[i],
                [expired[i].len() as u64, evicted[i].len() as u64],
                "{}: every record gone without a command is reported, under its reason",
                names[i]
            );
            assert_eq!(
                (summary.expired[i], summary.evicted[i]),
                (expired[i].len() as u64, evicted[i].len() as u64),
                "{}: the summary counts them",
                names[i]
            );
        }
        // The reports are stored as made, after what the loss stream held.
        let stored: Vec<LossReport> = held[LOSSES]
            .iter()
            .skip(self.model.loss_records as usize)
            .map(|r| serde_json::from_slice(&r.payload).expect("a stored loss report"))
            .collect();
        assert_eq!(
            stored, summary.losses,
            "each report stored in the loss stream"
        );
        // Eviction: lowest class first, oldest first, never what is in flight.
        for (i, gone) in evicted.iter().enumerate() {
            if summary.evicted[i] == 0 {
                continue;
            }
            let oldest_kept = held[i]
                .iter()
                .map(|r| r.seq)
                .find(|&s| !is_protected(&self.model.protection[i], s));
            if let (Some(kept), Some(&newest_gone)) = (oldest_kept, gone.iter().next_back()) {
                assert!(
                    kept > newest_gone,
                    "{}: evicted seq {newest_gone} while older seq {kept} stayed",
                    names[i]
                );
            }
            for (j, lower) in PRIORITIES.iter().enumerate() {
                if *lower < PRIORITIES[i] {
                    let droppable = held[j]
                        .iter()
                        .filter(|r| !is_protected(&self.model.protection[j], r.seq))
                        .count();
                    assert_eq!(
                        droppable, 0,
                        "{} lost records to the quota while {} (a lower class) kept {droppable}",
                        names[i], names[j]
                    );
                }
            }
        }
        for i in 0..3 {
            self.model.held[i].retain(|s, _| !expired[i].contains(s) && !evicted[i].contains(s));
        }
        self.model.loss_records += summary.losses.len() as u64;
        self.model.fresh_reports = summary.losses.len();
        self.model.next_seq[LOSSES] += summary.losses.len() as u64;
    }

    /// The file holds exactly what the model says, and the accounting agrees.
    fn check(&mut self) {
        let held = self.read_all();
        for (i, records) in held.iter().take(3).enumerate() {
            let seqs: Vec<u64> = records.iter().map(|r| r.seq).collect();
            let want: Vec<u64> = self.model.held[i].keys().copied().collect();
            assert_eq!(seqs, want, "stream {i} holds what the model holds");
            for r in records {
                let (payload, at) = &self.model.held[i][&r.seq];
                assert_eq!(&r.payload, payload, "stream {i} seq {}: the bytes", r.seq);
                assert_eq!(r.received_at_ms, *at);
                assert_eq!(r.topic, TOPIC);
            }
        }
        assert_eq!(
            held[LOSSES].len() as u64,
            self.model.loss_records,
            "loss reports held"
        );
        let progress = self.buffer().progress();
        for (i, records) in held.iter().enumerate() {
            let bytes: u64 = records
                .iter()
                .map(|r| (r.topic.len() + r.payload.len()) as u64 + RECORD_OVERHEAD_BYTES)
                .sum();
            assert_eq!(
                progress[i].backlog_records,
                records.len() as u64,
                "stream {i} count"
            );
            assert_eq!(progress[i].backlog_bytes, bytes, "stream {i} bytes");
            assert_eq!(
                progress[i].committed_seq + 1,
                self.model.next_seq[i],
                "stream {i}: sequences go on, never reused"
            );
        }
        // The quota holds, but for the last commit's own loss reports, unless what is over it
        // may not be dropped.
        let cost =
            |r: &StoredRecord| (r.topic.len() + r.payload.len()) as u64 + RECORD_OVERHEAD_BYTES;
        let reports: u64 = held[LOSSES]
            .iter()
            .rev()
            .take(self.model.fresh_reports)
            .map(cost)
            .sum();
        let total: u64 = progress.iter().map(|p| p.backlog_bytes).sum::<u64>() - reports;
        if total > QUOTA {
            for (i, records) in held.iter().take(3).enumerate() {
                assert!(
                    records
                        .iter()
                        .all(|r| is_protected(&self.model.protection[i], r.seq)),
                    "over quota ({total} B) with droppable records in stream {i}"
                );
            }
        }
    }
}

fn is_protected(p: &Protection, seq: u64) -> bool {
    seq <= p.floor || p.ranges.count_within(seq, seq) > 0
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 48,
        ..ProptestConfig::default()
    })]

    #[test]
    fn the_buffer_keeps_its_guarantees_through_any_sequence(ops in proptest::collection::vec(op(), 1..40)) {
        let mut run = Run::new();
        for op in &ops {
            run.apply(op);
        }
    }
}
