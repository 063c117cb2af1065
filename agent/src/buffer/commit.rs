//! One commit of the writer's commands, in one transaction ([`apply`]): appends, acks, dead
//! letters and handed-in losses, then TTL expiry, then eviction down to the quota (lowest
//! class first, oldest first, never what is in flight), then a loss report for every drop.
//! Invariant: whatever leaves the buffer in a commit leaves acknowledged, dead-lettered, or
//! counted in a loss report written in that same transaction.

use super::schema::Layout;
use super::*;

/// Saves (or deletes) a file's position, in the commit of the lines before it.
pub(super) fn save_file_position(
    tx: &rusqlite::Transaction<'_>,
    p: &FilePosition,
) -> rusqlite::Result<()> {
    if p.forget {
        tx.prepare_cached(
            "DELETE FROM file_positions WHERE source = ?1 AND dev = ?2 AND inode = ?3",
        )?
        .execute(params![p.source, p.dev as i64, p.inode as i64])?;
    } else {
        tx.prepare_cached(
            "INSERT OR REPLACE INTO file_positions (source, dev, inode, fingerprint, offset, path) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )?
        .execute(params![
            p.source,
            p.dev as i64,
            p.inode as i64,
            i64::from(p.fingerprint),
            p.offset as i64,
            p.path
        ])?;
    }
    Ok(())
}

/// Saves (or deletes) the transforms' state rows, in the commit of the records they go with.
pub(super) fn save_transform_state(
    tx: &rusqlite::Transaction<'_>,
    rows: &[crate::transform::StateRow],
) -> rusqlite::Result<()> {
    let mut put = tx.prepare_cached(
        "INSERT OR REPLACE INTO transform_state (stream, step, fingerprint, key, state) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?;
    let mut delete = tx.prepare_cached(
        "DELETE FROM transform_state WHERE stream = ?1 AND step = ?2 AND key = ?3",
    )?;
    for r in rows {
        match &r.state {
            Some(state) => put.execute(params![
                r.stream,
                r.step as i64,
                r.fingerprint,
                r.key,
                state
            ])?,
            None => delete.execute(params![r.stream, r.step as i64, r.key])?,
        };
    }
    Ok(())
}

/// How far a commit may fill the buffer.
#[derive(Debug, Clone, Copy)]
pub(super) struct Limits {
    /// Most bytes (quota cost) held after the commit.
    pub(super) cap: u64,
    /// What an eviction down to `cap` is reported as.
    pub(super) reason: LossReason,
    /// Only streams of this class or lower are evicted (all when `None`).
    pub(super) highest: Option<Priority>,
}

/// Stores a record.
const INSERT_RECORD: &str = "INSERT INTO records (id, stream_id, seq, topic, received_at_ms, payload, boot, monotonic_ms, crc, attributes)
     VALUES (?9, ?1, ?2, ?3, ?4, ?5, (SELECT id FROM boots WHERE boot_id = ?6), ?7, ?8, ?10)";
/// What a record costs against the quota (besides [`RECORD_OVERHEAD_BYTES`]).
const COST: &str =
    "length(CAST(topic AS BLOB)) + length(payload) + coalesce(length(attributes), 0)";

/// Records of a stream to drop, chosen by a condition on ?1 (the stream's id), ?2 and ?3 (its
/// sequence range) and, per kind, ?4: measured first, then deleted. Not one `DELETE …
/// RETURNING`: SQLite materialises what that returns and journals the statement, which made
/// an acknowledgement's delete about half again as costly.
pub(super) struct Removal {
    /// Count, first and last sequence, and cost of the records the condition selects.
    pub(super) measure: String,
    /// Deletes them.
    pub(super) delete: String,
}

impl Removal {
    fn of(condition: String) -> Removal {
        Removal {
            measure: format!(
                "SELECT count(*), min(seq), max(seq), coalesce(sum({COST}), 0) FROM records WHERE {condition}"
            ),
            delete: format!("DELETE FROM records WHERE {condition}"),
        }
    }
}

/// A stream's records in a sequence range.
pub(super) fn delete_range(layout: Layout) -> Removal {
    Removal::of(layout.seqs(""))
}

/// The oldest `?4` records of a stream's sequence range (one eviction chunk).
pub(super) fn evict_range(layout: Layout) -> Removal {
    Removal::of(format!(
        "id IN (SELECT id FROM records WHERE {} ORDER BY {} LIMIT ?4)",
        layout.seqs(""),
        layout.order("")
    ))
}

/// A stream's records of a sequence range received before `?4`.
pub(super) fn expire_range(layout: Layout) -> Removal {
    Removal::of(format!("{} AND received_at_ms < ?4", layout.seqs("")))
}

/// Copies a stream's records of a sequence range into the dead letters.
pub(super) fn dead_letter_range(layout: Layout) -> String {
    format!(
        "INSERT INTO dead_letters (stream_id, seq, topic, received_at_ms, payload, status, reason, dead_at_ms, attributes)
         SELECT stream_id, seq, topic, received_at_ms, payload, ?4, ?5, ?6, attributes FROM records WHERE {}",
        layout.seqs("")
    )
}

/// Saves a stream's next sequence and its oldest record's (the delivered floor).
pub(super) fn save_stream(layout: Layout) -> String {
    format!(
        "UPDATE streams SET next_seq = ?2, floor = ({}) WHERE id = ?1",
        layout.oldest("seq", "?1")
    )
}

/// Applies `commands` in one transaction, in named steps: the commands themselves, TTL expiry
/// (with `expire`), eviction down to `limits`, a loss report stored for every drop, and the
/// streams' rows. Nothing of `droppable`'s complement (records in flight) is dropped.
#[allow(clippy::too_many_arguments)]
pub(super) fn apply(
    conn: &mut Connection,
    layout: Layout,
    streams: &mut [StreamState],
    commands: &[WriterCommand],
    limits: Limits,
    droppable: &mut Droppable<'_>,
    now_ms: i64,
    expire: bool,
) -> rusqlite::Result<CommitSummary> {
    let n = streams.len();
    let mut summary = CommitSummary {
        appended: vec![0; n],
        appended_bytes: 0,
        acked: vec![0; n],
        dead_lettered: vec![0; n],
        evicted: vec![0; n],
        evicted_reason: limits.reason,
        expired: vec![0; n],
        losses: Vec::new(),
        filtered: BTreeMap::new(),
    };
    let loss_stream = streams.iter().position(|s| s.name == LOSS_STREAM);
    let tx = conn.transaction()?;
    apply_commands(&tx, layout, streams, commands, now_ms, &mut summary)?;
    if expire {
        expire_past_ttl(&tx, layout, streams, droppable, now_ms, &mut summary)?;
    }
    evict_over_quota(
        &tx,
        layout,
        streams,
        limits,
        droppable,
        loss_stream,
        now_ms,
        &mut summary,
    )?;
    if let Some(ls) = loss_stream {
        store_loss_reports(&tx, streams, ls, now_ms, &mut summary)?;
    }
    save_streams(&tx, layout, streams)?;
    tx.commit()?;
    Ok(summary)
}

/// The commands: appends, acks, dead letters, damaged records, handed-in losses, filtered
/// counts, transform state and file positions.
fn apply_commands(
    tx: &rusqlite::Transaction<'_>,
    layout: Layout,
    streams: &mut [StreamState],
    commands: &[WriterCommand],
    now_ms: i64,
    summary: &mut CommitSummary,
) -> rusqlite::Result<()> {
    let mut insert = tx.prepare_cached(INSERT_RECORD)?;
    let delete = Remover::new(tx, delete_range(layout));
    for command in commands {
        match command {
            WriterCommand::Append(r) => {
                append(&mut insert, &mut streams[r.stream], r)?;
                summary.appended[r.stream] += 1;
                summary.appended_bytes += (r.topic.len() + r.payload.len()) as u64;
            }
            WriterCommand::Loss(report) => summary.losses.push(report.clone()),
            WriterCommand::Ack {
                stream,
                first,
                last,
            } => {
                let dropped = delete.drop_rows(&mut streams[*stream], *first, *last, None)?;
                summary.acked[*stream] += dropped.count;
            }
            WriterCommand::DeadLetter {
                stream,
                first,
                last,
                status,
                reason,
            } => {
                tx.execute(
                    &dead_letter_range(layout),
                    params![
                        streams[*stream].id,
                        *first as i64,
                        *last as i64,
                        status,
                        reason,
                        now_ms
                    ],
                )?;
                let dropped = delete.drop_rows(&mut streams[*stream], *first, *last, None)?;
                summary.dead_lettered[*stream] += dropped.count;
            }
            WriterCommand::Corrupt { stream, seqs } => {
                // A stream dropped by a reload meanwhile: its records are no longer here.
                let Some(s) = streams.iter_mut().find(|s| s.name == *stream) else {
                    continue;
                };
                let mut dropped = Vec::new();
                for &seq in seqs {
                    let d = delete.drop_rows(s, seq, seq, None)?;
                    if d.count > 0 {
                        dropped.push(seq);
                    }
                }
                summary.losses.extend(seq_runs(&dropped).into_iter().map(
                    |(first, last, count)| LossReport {
                        stream: Some(s.name.clone()),
                        first_seq: Some(first),
                        last_seq: Some(last),
                        count,
                        reason: LossReason::CorruptBuffer,
                        detected_at_ms: now_ms,
                    },
                ));
            }
            WriterCommand::Filtered { stream, reason, .. } => {
                *summary.filtered.entry((*stream, *reason)).or_default() += 1;
            }
            WriterCommand::TransformState(rows) => save_transform_state(tx, rows)?,
            WriterCommand::FilePosition(p) => save_file_position(tx, p)?,
            // The writer makes records of them before a commit.
            WriterCommand::FileLines(_) => {}
            // The writer takes it out before a group is formed.
            WriterCommand::Reconfigure(_) => {}
        }
    }
    Ok(())
}

/// TTL: drops what is past its stream's TTL (and not in flight), with a report per stream.
fn expire_past_ttl(
    tx: &rusqlite::Transaction<'_>,
    layout: Layout,
    streams: &mut [StreamState],
    droppable: &mut Droppable<'_>,
    now_ms: i64,
    summary: &mut CommitSummary,
) -> rusqlite::Result<()> {
    let expire = Remover::new(tx, expire_range(layout));
    for (i, s) in streams.iter_mut().enumerate() {
        let Some(ttl) = s.ttl_ms else { continue };
        let mut dropped = Dropped::default();
        for &(first, last) in droppable.of(i) {
            dropped.merge(&expire.drop_rows(s, first, last, Some(now_ms - ttl))?);
        }
        if dropped.count > 0 {
            summary.expired[i] += dropped.count;
            summary
                .losses
                .push(dropped.report(&s.name, LossReason::Ttl, now_ms));
        }
    }
    Ok(())
}

/// Quota: evicts lowest priority, oldest first, until under `limits.cap`, with a report per
/// stream. Loss reports stay.
#[allow(clippy::too_many_arguments)]
fn evict_over_quota(
    tx: &rusqlite::Transaction<'_>,
    layout: Layout,
    streams: &mut [StreamState],
    limits: Limits,
    droppable: &mut Droppable<'_>,
    loss_stream: Option<usize>,
    now_ms: i64,
    summary: &mut CommitSummary,
) -> rusqlite::Result<()> {
    let evict = Remover::new(tx, evict_range(layout));
    let mut evicted: Vec<Option<Dropped>> = vec![None; streams.len()];
    let yielding: Vec<bool> = streams
        .iter()
        .map(|s| limits.highest.is_none_or(|h| s.priority <= h))
        .collect();
    evict_down_to(
        &evict,
        streams,
        limits.cap,
        droppable,
        &yielding,
        loss_stream,
        &mut evicted,
    )?;
    for (i, d) in evicted.iter().enumerate() {
        if let Some(d) = d {
            summary.evicted[i] += d.count;
            summary
                .losses
                .push(d.report(&streams[i].name, limits.reason, now_ms));
        }
    }
    Ok(())
}

/// Every drop of this commit, and every loss handed in, becomes a record of the loss stream
/// `ls`, to be sent like data.
fn store_loss_reports(
    tx: &rusqlite::Transaction<'_>,
    streams: &mut [StreamState],
    ls: usize,
    now_ms: i64,
    summary: &mut CommitSummary,
) -> rusqlite::Result<()> {
    let mut insert = tx.prepare_cached(INSERT_RECORD)?;
    for report in &summary.losses {
        let record = NewRecord {
            stream: ls,
            topic: format!("{LOSS_STREAM}/{}", report.reason.as_str()),
            payload: serde_json::to_vec(report)
                .expect("invariant: a loss report serialises")
                .into(),
            received_at_ms: now_ms,
            monotonic_ms: crate::clock::monotonic_ms(),
            attributes: Default::default(),
            receipt: None,
        };
        append(&mut insert, &mut streams[ls], &record)?;
        summary.appended[ls] += 1;
        summary.appended_bytes += (record.topic.len() + record.payload.len()) as u64;
    }
    Ok(())
}

/// The streams' rows: the next sequence, and the floor (lowest sequence still held), which
/// tells a salvage which records were delivered.
fn save_streams(
    tx: &rusqlite::Transaction<'_>,
    layout: Layout,
    streams: &[StreamState],
) -> rusqlite::Result<()> {
    let mut update = tx.prepare_cached(&save_stream(layout))?;
    for s in streams {
        update.execute(params![s.id, s.next_seq as i64])?;
    }
    Ok(())
}

/// Evicts the lowest priority, oldest droppable records of the `yielding` streams until what
/// is held is at most `cap` (or nothing of them is left to evict); what goes is added to
/// `evicted`. The loss stream is never evicted.
pub(super) fn evict_down_to(
    evict: &Remover<'_, '_>,
    streams: &mut [StreamState],
    cap: u64,
    droppable: &mut Droppable<'_>,
    yielding: &[bool],
    loss_stream: Option<usize>,
    evicted: &mut [Option<Dropped>],
) -> rusqlite::Result<()> {
    let n = streams.len();
    let mut exhausted: Vec<bool> = (0..n).map(|i| !yielding[i]).collect();
    // Per stream, the droppable range eviction is at (oldest first).
    let mut at = vec![0usize; n];
    while streams
        .iter()
        .map(|s| s.progress.backlog_bytes)
        .sum::<u64>()
        > cap
    {
        let candidates: Vec<(Priority, u64)> = streams
            .iter()
            .enumerate()
            .map(|(i, s)| {
                (
                    s.priority,
                    if Some(i) == loss_stream || exhausted[i] {
                        0
                    } else {
                        s.progress.backlog_records
                    },
                )
            })
            .collect();
        let Some(victim) = eviction_victim(&candidates) else {
            break;
        };
        let s = &mut streams[victim];
        let Some(&(first, last)) = droppable.of(victim).get(at[victim]) else {
            // What is left of it was sent: it may be in the log, so it is not evicted (it
            // will be delivered or dead-lettered). Try the next stream.
            exhausted[victim] = true;
            continue;
        };
        let dropped = evict.drop_rows(s, first, last, Some(EVICT_CHUNK as i64))?;
        if dropped.count == 0 {
            at[victim] += 1;
            continue;
        }
        evicted[victim]
            .get_or_insert(Dropped::default())
            .merge(&dropped);
    }
    Ok(())
}

/// Sorted sequence numbers as runs of consecutive ones: (first, last, count). Pure.
pub fn seq_runs(seqs: &[u64]) -> Vec<(u64, u64, u64)> {
    let mut runs: Vec<(u64, u64, u64)> = Vec::new();
    for &seq in seqs {
        match runs.last_mut() {
            Some((_, last, count)) if *last + 1 == seq => {
                *last = seq;
                *count += 1;
            }
            _ => runs.push((seq, seq, 1)),
        }
    }
    runs
}

pub(super) fn append(
    insert: &mut rusqlite::CachedStatement<'_>,
    s: &mut StreamState,
    r: &NewRecord,
) -> rusqlite::Result<()> {
    let (topic, payload) = (&r.topic, &r.payload);
    let attributes = stored_attributes(&r.attributes);
    // Statements find records by this rowid: one SQLite chose would be lost to them.
    let id = row_id(s.id, s.next_seq).ok_or_else(|| {
        rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_RANGE),
            Some(format!(
                "stream {:?} reached sequence {}, beyond what a rowid holds",
                s.name, s.next_seq
            )),
        )
    })?;
    insert.execute(params![
        s.id,
        s.next_seq as i64,
        topic,
        r.received_at_ms,
        payload.as_ref(),
        crate::clock::boot_id(),
        r.monotonic_ms as i64,
        checksum(
            s.next_seq,
            r.received_at_ms,
            topic,
            payload,
            attributes.as_deref()
        ),
        id,
        attributes,
    ])?;
    let cost = (topic.len() + payload.len() + attributes.as_ref().map_or(0, Vec::len)) as u64
        + RECORD_OVERHEAD_BYTES;
    s.progress.committed_seq = s.next_seq;
    s.next_seq += 1;
    s.progress.appended_bytes += cost;
    s.progress.backlog_records += 1;
    s.progress.backlog_bytes += cost;
    Ok(())
}

/// What one delete removed: count and sequence range.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Dropped {
    count: u64,
    first: Option<u64>,
    last: Option<u64>,
}

impl Dropped {
    fn merge(&mut self, other: &Dropped) {
        self.count += other.count;
        self.first = match (self.first, other.first) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.last = self.last.max(other.last);
    }

    fn report(&self, stream: &str, reason: LossReason, now_ms: i64) -> LossReport {
        LossReport {
            stream: Some(stream.to_owned()),
            first_seq: self.first,
            last_seq: self.last,
            count: self.count,
            reason,
            detected_at_ms: now_ms,
        }
    }
}

/// Sequences of a range measured then deleted at a time: the pages the measure loaded are
/// still in the writer's page cache (1 MiB, about 3,000 records) when the delete needs them.
const REMOVAL_SPAN: u64 = 1_000;

/// A [`Removal`] within a commit's transaction.
pub(super) struct Remover<'t, 'c> {
    tx: &'t rusqlite::Transaction<'c>,
    removal: Removal,
}

impl<'t, 'c> Remover<'t, 'c> {
    pub(super) fn new(tx: &'t rusqlite::Transaction<'c>, removal: Removal) -> Remover<'t, 'c> {
        Remover { tx, removal }
    }

    /// Drops the records of `s` that the removal selects in `first..=last` (with `extra` as
    /// ?4), and updates the stream's counts. A range without `extra` (acknowledged, dead
    /// letters) goes [`REMOVAL_SPAN`] sequences at a time.
    pub(super) fn drop_rows(
        &self,
        s: &mut StreamState,
        first: u64,
        last: u64,
        extra: Option<i64>,
    ) -> rusqlite::Result<Dropped> {
        let span = if extra.is_some() {
            u64::MAX
        } else {
            REMOVAL_SPAN
        };
        let mut dropped = Dropped::default();
        let mut from = first;
        while from <= last {
            let to = last.min(from.saturating_add(span - 1));
            let mut params = vec![s.id, from as i64, to as i64];
            params.extend(extra);
            dropped.merge(&self.drop_span(s, &params)?);
            if to == last {
                break;
            }
            from = to + 1;
        }
        Ok(dropped)
    }

    /// One measure and delete, with `params` (?1 the stream's id, ?2 and ?3 the range, ?4).
    fn drop_span(&self, s: &mut StreamState, params: &[i64]) -> rusqlite::Result<Dropped> {
        let params = rusqlite::params_from_iter(params);
        let (count, first, last, bytes) = self
            .tx
            .prepare_cached(&self.removal.measure)?
            .query_row(params.clone(), |row| {
                Ok((
                    row.get::<_, i64>(0)? as u64,
                    row.get::<_, Option<i64>>(1)?,
                    row.get::<_, Option<i64>>(2)?,
                    row.get::<_, i64>(3)? as u64,
                ))
            })?;
        if count == 0 {
            return Ok(Dropped::default());
        }
        let deleted = self
            .tx
            .prepare_cached(&self.removal.delete)?
            .execute(params)? as u64;
        if deleted != count {
            // Both run on the one writer's transaction with one condition: cannot differ.
            tracing::error!(
                stream = %s.name,
                measured = count,
                deleted,
                "buffer: a removal deleted other records than it measured; the stream's backlog counts are off until the next start"
            );
        }
        s.progress.backlog_bytes = s
            .progress
            .backlog_bytes
            .saturating_sub(bytes + count * RECORD_OVERHEAD_BYTES);
        s.progress.backlog_records = s.progress.backlog_records.saturating_sub(count);
        Ok(Dropped {
            count,
            first: first.map(|f| f as u64),
            last: last.map(|l| l as u64),
        })
    }
}

/// Which stream loses records when the buffer is over quota: the lowest priority class that
/// holds any, and within it the largest backlog. Critical goes last. Pure.
pub fn eviction_victim(streams: &[(Priority, u64)]) -> Option<usize> {
    streams
        .iter()
        .enumerate()
        .filter(|(_, (_, records))| *records > 0)
        .min_by_key(|(_, (priority, records))| (*priority, std::cmp::Reverse(*records)))
        .map(|(i, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records are found by a range of the table's own key, or on a buffer that still holds an
    /// older version's records through the index on (stream, sequence): a statement that
    /// scanned or sorted the table would read the whole backlog for every ack.
    #[test]
    fn every_records_statement_searches_and_never_sorts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let b = Buffer::open(&dir.path().join("b.db"), &[], 1 << 20)
            .expect("open")
            .buffer;
        for layout in [Layout::Rowid, Layout::Indexed] {
            if layout == Layout::Indexed {
                b.conn
                    .execute_batch(
                        "CREATE UNIQUE INDEX records_by_seq ON records (stream_id, seq);",
                    )
                    .expect("index");
            }
            let removals = [
                delete_range(layout),
                evict_range(layout),
                expire_range(layout),
            ];
            for sql in removals
                .into_iter()
                .flat_map(|r| [r.measure, r.delete])
                .chain([
                    dead_letter_range(layout),
                    save_stream(layout),
                    super::super::reader::read_sql(layout, false),
                    super::super::reader::read_sql(layout, true),
                    layout.oldest("seq", "?1"),
                ])
            {
                let mut plan = b
                    .conn
                    .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
                    .expect("plan");
                for i in 1..=plan.parameter_count() {
                    plan.raw_bind_parameter(i, 1i64).expect("bind");
                }
                let mut rows = plan.raw_query();
                let mut steps: Vec<String> = Vec::new();
                while let Some(row) = rows.next().expect("query plan") {
                    steps.push(row.get(3).expect("step"));
                }
                assert!(
                    steps
                        .iter()
                        .all(|s| !s.starts_with("SCAN r") && !s.contains("TEMP B-TREE")),
                    "{layout:?}: {sql}\n{steps:?}"
                );
            }
        }
    }
}
