//! The writer stage: the one thread that writes the buffer.
//!
//! Invariants:
//! - every command handed in is committed, or, for new records that a full disk cannot take
//!   even after evicting everything the policy allows, dropped with a loss report in the commit
//!   that follows. The writer never waits forever on one group, so the queue in front of it
//!   always drains and acknowledgements from the ingest always become deletes;
//! - the [`Protected`] lock is held by a commit that may drop records, from its first look at
//!   the protections to its end, and never across a retry's sleep;
//! - once every sender is gone (the agent stops), what is queued is committed within
//!   [`STOP_BOUND`]; what still cannot be committed then is counted and logged as lost.
//!
//! Group commit: after the first command of a group the writer gathers more for at most
//! `commit_window`, up to [`MAX_GROUP`] commands and the group's byte bound
//! ([`super::space::group_bytes`]), then commits them in one transaction (one fsync). The group
//! closes sooner once no command came for `commit_gap` ([`BufferWriter::with_gap`]): sensors that
//! publish together land in one commit, and a publisher that waits for its PUBACKs is not kept
//! waiting for records that cannot come. A new record of a critical stream closes its group at
//! once (with what is already queued): alarms never wait for flash savings.
//!
//! New records before deletes: while records arrive, a commit deletes at most [`ACK_PIECE`]
//! acknowledged records; the rest of a large acknowledgement (a drain's batches are 5,000
//! records) is deleted in the commits that follow, so new (critical) records do not wait behind
//! commits full of deletes. A few owed deletes ([`ACK_PIECE`] or fewer) with nothing else to
//! commit wait up to [`ACK_LINGER`] for new records to share a commit with (at gateway rates the
//! next record comes within milliseconds) rather than cost a commit of their own: an fsync and
//! the pages every commit rewrites. Records acknowledged and not deleted yet are below their
//! stream's protection floor: never dropped, and not sent again while the agent runs (after a
//! crash they are, and the ingest deduplicates them); they count as delivered once deleted.
//! What is owed stays bounded ([`MAX_OWED`]), and is deleted at once when the buffer nears its
//! cap or the disk is full (deleting comes before evicting), at a reload and at the agent's
//! stop.
//!
//! Parts: this file is the loop and the commit of a group; `queue` the bounded queue in front
//! of it; `transforms` the edge transforms run before a commit; `refused` what a group the
//! disk cannot take becomes.

mod queue;
mod refused;
mod transforms;

use std::sync::Arc;
use std::time::{Duration, Instant};

use flume::RecvTimeoutError;
use ingest_wire::LossReason;
use tokio::sync::watch;

use super::{Buffer, CommitSummary, NewRecord, Protected, StreamProgress, WriterCommand};
use crate::metrics::Metrics;
use crate::transform::{Chain, Facts};
use queue::cost;
pub use queue::{Queue, QueueBytes};

/// Most commands folded into one transaction.
pub const MAX_GROUP: usize = 20_000;
/// Most acknowledged records deleted by a commit that also stores new records (or while more
/// commands wait): deleting 5,000 takes ~10 ms, which new records would wait for.
pub const ACK_PIECE: u64 = 500;
/// Most deleted by a commit of nothing else, while nothing waits (plus what is owed beyond
/// [`MAX_OWED`]).
const ACK_ALONE: u64 = 5_000;
/// Acknowledged records owed beyond which a commit deletes the excess too.
pub const MAX_OWED: u64 = 50_000;
/// How long at most [`ACK_PIECE`] or fewer owed acknowledged records wait, when nothing else is
/// to be committed, for new records to share a commit (and its fsync) with. More (a drain's
/// acknowledgements) are deleted at once, [`ACK_ALONE`] at a time; the last [`ACK_PIECE`] or
/// fewer of them may linger too.
pub const ACK_LINGER: Duration = Duration::from_secs(1);
/// How often records past their TTL are looked for and the file is fitted to its volume.
const TICK: Duration = Duration::from_secs(1);
/// Commits refused for a full disk, each after making more room, before the group's new
/// records are dropped (and reported) instead: by then the policy had nothing left to evict.
const FULL_ATTEMPTS: u32 = 8;
/// And the least time spent trying before that (checkpoints and deletes free room meanwhile):
/// a burst of refusals within milliseconds is not evidence that nothing can be evicted.
const FULL_PATIENCE: Duration = Duration::from_secs(3);
/// Once the agent stops, how long the writer keeps retrying commits that fail.
const STOP_RETRY: Duration = Duration::from_secs(5);
/// How long commits may keep failing (other than for a full disk, which is handled) before
/// the writer stops: the agent then stops and exits non-zero, and systemd restarts it.
pub const GIVE_UP_AFTER: Duration = Duration::from_secs(20);
/// The longest the agent's stop waits for the writer: its last commits, retries included.
pub const STOP_BOUND: Duration = Duration::from_secs(10);

/// How many records the acknowledged ranges (stream, first, last) hold.
fn owed_count(owed: &std::collections::VecDeque<(usize, u64, u64)>) -> u64 {
    owed.iter().map(|&(_, first, last)| last - first + 1).sum()
}

/// The writer stage: owns the [`Buffer`], group-commits commands, publishes progress.
/// Runs on its own thread until every command sender is dropped, then commits what is left.
pub struct BufferWriter {
    buffer: Buffer,
    commands: flume::Receiver<WriterCommand>,
    commit_window: Duration,
    /// A group closes early once no command came for this long ([`BufferWriter::with_gap`]).
    commit_gap: Duration,
    group_bytes: u64,
    progress: watch::Sender<Vec<StreamProgress>>,
    metrics: Metrics,
    stream_names: Vec<String>,
    protected: Arc<Protected>,
    /// When the writer first saw that the agent is stopping (every sender gone).
    stop_seen: Option<Instant>,
    budget: Option<QueueBytes>,
    /// Beaten on every turn of the loop (the watchdog's proof of progress).
    beat: Option<crate::systemd::Beat>,
    /// Each stream's transforms, by index ([`crate::transform`]); run on new records before
    /// their commit, their state saved in it.
    chains: Vec<Chain>,
    /// What `enrich` adds about this agent.
    facts: Facts,
    /// Acknowledged ranges (stream, first, last) not deleted yet, oldest first ([`ACK_PIECE`]).
    acks_owed: std::collections::VecDeque<(usize, u64, u64)>,
    /// When the oldest of them must be deleted even with nothing to share its commit
    /// ([`ACK_LINGER`]); `None` while none are owed.
    acks_due: Option<Instant>,
}

impl BufferWriter {
    /// A writer for `buffer`, taking `commands`, committing at most `commit_window` after the
    /// first command of a group and at most `group_bytes` of records at once, publishing
    /// progress and metrics (labelled by `stream_names`).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        buffer: Buffer,
        commands: flume::Receiver<WriterCommand>,
        commit_window: Duration,
        group_bytes: u64,
        progress: watch::Sender<Vec<StreamProgress>>,
        metrics: Metrics,
        stream_names: Vec<String>,
        protected: Arc<Protected>,
    ) -> BufferWriter {
        BufferWriter {
            buffer,
            commands,
            commit_window,
            commit_gap: commit_window,
            group_bytes: group_bytes.max(1),
            progress,
            metrics,
            stream_names,
            protected,
            stop_seen: None,
            budget: None,
            beat: None,
            chains: Vec::new(),
            facts: Facts::default(),
            acks_owed: std::collections::VecDeque::new(),
            acks_due: None,
        }
    }

    /// Runs `chains` (by stream index; streams beyond have none) on new records, with `facts`.
    pub fn with_transforms(mut self, chains: Vec<Chain>, facts: Facts) -> BufferWriter {
        self.chains = chains;
        self.facts = facts;
        self
    }

    /// Closes a group before its `commit_window` ends once no command came for `gap`: the
    /// publishers that had something to send have sent it.
    pub fn with_gap(mut self, gap: Duration) -> BufferWriter {
        self.commit_gap = gap;
        self
    }

    /// Gives the records' cost back to `budget` as they are committed ([`QueueBytes`]).
    pub fn with_budget(mut self, budget: QueueBytes) -> BufferWriter {
        self.budget = Some(budget);
        self
    }

    /// Beats `beat` on every turn of the loop (at least every second, idle or not).
    pub fn with_beat(mut self, beat: crate::systemd::Beat) -> BufferWriter {
        self.beat = Some(beat);
        self
    }

    /// Runs until the command channel closes and what it held is committed.
    pub fn run(mut self) {
        let mut group = Vec::new();
        let mut last_tick = Instant::now();
        let owed = self.restore_transforms();
        self.commit_owed(owed);
        self.fit();
        self.publish_backlog();
        loop {
            if let Some(beat) = &self.beat {
                beat.beat();
            }
            let mut closed = false;
            let mut reconfigure = None;
            match self.commands.recv_timeout(self.idle_wait()) {
                Ok(WriterCommand::Reconfigure(r)) => reconfigure = Some(r),
                Ok(first) => group.push(first),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => closed = true,
            }
            // A critical record waits for no one: the group takes what is queued, and closes.
            let mut deadline = if group.iter().any(|c| self.urgent(c)) {
                Instant::now()
            } else {
                Instant::now() + self.commit_window
            };
            let mut bytes: u64 = group.iter().map(cost).sum();
            while !closed
                && reconfigure.is_none()
                && !group.is_empty()
                && group.len() < MAX_GROUP
                && bytes < self.group_bytes
            {
                if let Some(beat) = &self.beat {
                    beat.beat();
                }
                let left = deadline
                    .saturating_duration_since(Instant::now())
                    .min(self.commit_gap);
                match self.commands.recv_timeout(left) {
                    Ok(WriterCommand::Reconfigure(r)) => reconfigure = Some(r),
                    Ok(c) => {
                        if self.urgent(&c) {
                            deadline = Instant::now();
                        }
                        bytes += cost(&c);
                        group.push(c);
                    }
                    Err(RecvTimeoutError::Timeout) => break,
                    Err(RecvTimeoutError::Disconnected) => closed = true,
                }
            }
            let all = closed || reconfigure.is_some();
            self.pace_acks(&mut group, all);
            let tick = last_tick.elapsed() >= TICK;
            if tick {
                last_tick = Instant::now();
                self.fit();
                if let Ok(oldest) = self.buffer.oldest_received_ms() {
                    self.metrics.set_oldest_received(
                        self.stream_names.iter().cloned().zip(oldest).collect(),
                    );
                }
            }
            // What the group holds of the budget, before committing reshapes it.
            let held = self.budget.as_ref().map_or(0, |b| b.held(&group));
            let committed = (group.is_empty() && !tick) || self.commit_group(&mut group, tick);
            if let Some(budget) = &self.budget {
                budget.give_back(held);
            }
            if !committed {
                tracing::error!(after = ?GIVE_UP_AFTER, "the buffer refuses every commit: the buffer writer stops, and with it the agent");
                return;
            }
            group.clear();
            // Everything queued before it is in: the commands after it use the new streams.
            if let Some(r) = reconfigure
                && !self.reconfigure(r)
            {
                return;
            }
            self.metrics
                .buffer_queue_records
                .set(self.commands.len() as i64);
            if let Some(budget) = &self.budget {
                self.metrics.buffer_queue_bytes.set(budget.queued() as i64);
            }
            if closed && self.commands.is_empty() {
                return;
            }
        }
    }

    /// Whether `command` is a new record of a critical stream: its group waits no longer.
    fn urgent(&self, command: &WriterCommand) -> bool {
        matches!(command, WriterCommand::Append(r) if self.buffer.is_critical(r.stream))
    }

    /// Moves `group`'s acknowledgements behind those owed, then takes back, oldest first, what
    /// this commit deletes: everything with `all` or near the buffer's cap; when nothing else is
    /// to be committed or waiting, nothing while [`ACK_PIECE`] or fewer are owed and not due
    /// ([`ACK_LINGER`]), else [`ACK_ALONE`]; else [`ACK_PIECE`], plus whatever is owed beyond
    /// [`MAX_OWED`].
    fn pace_acks(&mut self, group: &mut Vec<WriterCommand>, all: bool) {
        if self.acks_owed.is_empty()
            && !group.iter().any(|c| matches!(c, WriterCommand::Ack { .. }))
        {
            return;
        }
        let now = Instant::now();
        let due = *self.acks_due.get_or_insert(now + ACK_LINGER);
        let owed = &mut self.acks_owed;
        group.retain(|c| match *c {
            WriterCommand::Ack {
                stream,
                first,
                last,
            } => {
                owed.push_back((stream, first, last));
                false
            }
            _ => true,
        });
        let alone = group.is_empty() && self.commands.is_empty();
        let owed_records = owed_count(owed);
        let incoming: u64 = group.iter().map(cost).sum();
        let excess = owed_records.saturating_sub(MAX_OWED);
        let mut budget = if all || self.buffer.near_cap(incoming) {
            u64::MAX
        } else if alone && owed_records <= ACK_PIECE && now < due {
            // Lingers for new records to share a commit with ([`Self::idle_wait`]).
            0
        } else if alone {
            ACK_ALONE.max(excess)
        } else {
            ACK_PIECE.max(excess)
        };
        while budget > 0
            && let Some((stream, first, last)) = owed.pop_front()
        {
            let last = if last - first < budget {
                budget -= last - first + 1;
                last
            } else {
                owed.push_front((stream, first + budget, last));
                std::mem::replace(&mut budget, 0) + first - 1
            };
            group.push(WriterCommand::Ack {
                stream,
                first,
                last,
            });
        }
        if self.acks_owed.is_empty() {
            self.acks_due = None;
        }
    }

    /// How long the loop waits for a command: a tick while no deletes are owed; while they
    /// linger ([`ACK_LINGER`]), until they are due; not at all while more are owed than linger.
    fn idle_wait(&self) -> Duration {
        if self.acks_owed.is_empty() {
            return TICK;
        }
        match self.acks_due {
            Some(due) if owed_count(&self.acks_owed) <= ACK_PIECE => {
                due.saturating_duration_since(Instant::now()).min(TICK)
            }
            _ => Duration::ZERO,
        }
    }

    /// Puts the streams of a reload in force ([`Buffer::reconfigure`]): their names label the
    /// metrics; each one's protection starts at its resume point (where the forwarder, started
    /// anew, resumes) and keeps, by name, the ranges protected before (batches that may be in
    /// the log); progress is published. `false`: the buffer cannot take them; the writer must
    /// stop (the agent restarts, with the new config).
    fn reconfigure(&mut self, r: super::Reconfigure) -> bool {
        // A chain whose steps change (or whose stream goes) ends its open windows now, under
        // the old numbering: the readings folded into them are sent, not forgotten.
        let mut owed = Vec::new();
        for i in 0..self.chains.len() {
            let name = self.stream_names.get(i).cloned().unwrap_or_default();
            let kept = r
                .streams
                .iter()
                .position(|s| s.name == name)
                .and_then(|j| r.chains.get(j))
                .is_some_and(|next| next.same_steps(&self.chains[i]));
            if kept || self.chains[i].is_empty() {
                continue;
            }
            let out = self.chains[i].close_all(&self.facts);
            self.made(&mut owed, i, &out);
            let rows = self.chains[i].take_changes(&name);
            if !rows.is_empty() {
                owed.push(WriterCommand::TransformState(rows));
            }
        }
        self.commit_owed(owed);
        match self.buffer.reconfigure(&r.streams, r.quota_bytes) {
            Ok(opened) => {
                let before: Vec<(String, super::Protection)> = {
                    let guard = self.protected.lock();
                    self.stream_names
                        .iter()
                        .cloned()
                        .zip(guard.iter().cloned())
                        .collect()
                };
                let protections: Vec<super::Protection> = opened
                    .iter()
                    .map(|o| {
                        let mut p = super::Protection::floor(o.resume_after);
                        if let Some((_, old)) = before.iter().find(|(name, _)| *name == o.name) {
                            for (first, last) in old.ranges.iter() {
                                p.ranges.insert_range(first.max(o.resume_after + 1), last);
                            }
                        }
                        p
                    })
                    .collect();
                self.protected.renumber(protections.clone());
                self.stream_names = opened.iter().map(|o| o.name.clone()).collect();
                // Everything before is committed, state included: the saved state is current.
                self.chains = r.chains;
                let owed = self.restore_transforms();
                self.commit_owed(owed);
                self.progress.send_replace(self.buffer.progress());
                let _ = r.done.send(super::Reconfigured {
                    streams: opened,
                    protections,
                });
                true
            }
            Err(e) => {
                tracing::error!(error = %e, "the buffer cannot take the reloaded streams: the buffer writer stops, and with it the agent (its restart takes the new config)");
                false
            }
        }
    }

    /// Commits records the transforms owe (window records, state deletions) as they are, past
    /// the transforms; a failure is logged and left for the next start, which makes them again.
    fn commit_owed(&mut self, owed: Vec<WriterCommand>) {
        if owed.is_empty() {
            return;
        }
        let committed =
            self.buffer
                .commit_shared(&owed, &self.protected, crate::clock::now_ms(), false);
        match committed {
            Ok(summary) => self.published(&summary),
            Err(e) => {
                tracing::warn!(error = %e, "cannot commit the records the transforms owe now; retried at the next start")
            }
        }
    }

    /// Makes records of the lines file sources sent, each batch followed by its file's
    /// position, so that they are committed (or dropped) together.
    fn expand_file_lines(&mut self, group: &mut Vec<WriterCommand>) {
        if !group
            .iter()
            .any(|c| matches!(c, WriterCommand::FileLines(_)))
        {
            return;
        }
        let commands = std::mem::take(group);
        for command in commands {
            let WriterCommand::FileLines(f) = command else {
                group.push(command);
                continue;
            };
            let f = *f;
            match self.stream_names.iter().position(|n| *n == f.stream) {
                Some(stream) => group.extend(f.lines.into_iter().map(|l| {
                    WriterCommand::Append(NewRecord {
                        stream,
                        topic: l.topic,
                        payload: l.payload,
                        received_at_ms: l.received_at_ms,
                        monotonic_ms: crate::clock::monotonic_ms(),
                        attributes: Default::default(),
                        receipt: None,
                    })
                })),
                // A reload that removes a file source's stream is refused; kept for safety.
                None if !f.lines.is_empty() => {
                    tracing::error!(stream = %f.stream, lines = f.lines.len(), "a file source's stream is gone: lines not stored");
                    self.metrics
                        .records_dropped
                        .with_label_values(&[f.stream.as_str(), "no_stream"])
                        .inc_by(f.lines.len() as u64);
                }
                None => {}
            }
            group.push(WriterCommand::FilePosition(Box::new(f.position)));
        }
    }

    /// Commits `group` (and with `expire`, the TTL sweep), making room on a full disk, until it
    /// is in; see the module's invariants. Once the agent is stopping, retries end after
    /// [`STOP_RETRY`] (what is left is counted as lost). `false`: commits failed for
    /// [`GIVE_UP_AFTER`] for another reason than a full disk; the writer must stop.
    fn commit_group(&mut self, group: &mut Vec<WriterCommand>, expire: bool) -> bool {
        // Once per group, before its first try: a retry commits the same outcome.
        self.expand_file_lines(group);
        self.transform(group, expire);
        let mut delay = Duration::from_millis(50);
        let mut full_attempts = 0;
        let since = Instant::now();
        loop {
            let started = Instant::now();
            let error = match self.commit_once(group, expire) {
                Ok(summary) => {
                    super::settle(group, false);
                    self.metrics
                        .commit_seconds
                        .observe(started.elapsed().as_secs_f64());
                    self.published(&summary);
                    if let Err(e) = self.buffer.bound_growth() {
                        tracing::warn!(error = %e, "buffer checkpoint failed; retried after the next commit");
                    }
                    return true;
                }
                Err(e) => e,
            };
            if self.commands.is_disconnected() {
                let seen = *self.stop_seen.get_or_insert_with(Instant::now);
                if seen.elapsed() >= STOP_RETRY {
                    self.give_up(group, &error);
                    let _ = self.reset_transforms();
                    return true;
                }
            }
            if error.is_disk_full() && !self.acks_owed.is_empty() {
                // Deleting what was delivered comes before evicting anything: retry with it.
                self.acks_due = None;
                group.extend(self.acks_owed.drain(..).map(|(stream, first, last)| {
                    WriterCommand::Ack {
                        stream,
                        first,
                        last,
                    }
                }));
                continue;
            }
            if error.is_disk_full() {
                if full_attempts == 0 && !self.buffer.is_frozen() {
                    tracing::error!(error = %error, "buffer disk full: evicting the lowest priority, oldest records to make room (reported as disk_full)");
                }
                full_attempts += 1;
                if full_attempts % 20 == 0 {
                    tracing::warn!(error = %error, attempts = full_attempts, held_bytes = self.buffer.backlog_bytes(), "buffer commits still refused for a full disk; making more room");
                }
                self.metrics.disk_full.inc();
                self.metrics.buffer_disk_full.set(1);
                let appends = group.iter().any(|c| matches!(c, WriterCommand::Append(_)));
                if full_attempts >= FULL_ATTEMPTS
                    && since.elapsed() >= FULL_PATIENCE
                    && self.drop_appends(group)
                {
                    continue;
                }
                if appends {
                    self.buffer.disk_full();
                } else {
                    // Only WAL room is missing (deletes, reports): lowering the cap would not
                    // help; a checkpoint (with the reserve released) does.
                    self.buffer.wal_room();
                }
                if full_attempts < FULL_ATTEMPTS {
                    continue;
                }
            } else if error.mark_if_corrupt() {
                // Retrying cannot mend the file: the agent stops, and its next start salvages.
                self.give_up(group, &error);
                return false;
            } else {
                // Nothing was applied; the same group is retried. Meanwhile the queue from the
                // front door fills and publishers wait for their acknowledgements.
                tracing::error!(error = %error, commands = group.len(), retry_in = ?delay, "buffer commit failed");
                self.metrics.commit_errors.inc();
                self.metrics.commit_failing();
                if since.elapsed() >= GIVE_UP_AFTER {
                    self.give_up(group, &error);
                    return false;
                }
            }
            // Retrying is progress (room is being made, or the writer gives up in time): the
            // watchdog must not restart the agent for it.
            if let Some(beat) = &self.beat {
                beat.beat();
            }
            std::thread::sleep(delay);
            delay = (delay * 2).min(Duration::from_secs(2));
        }
    }

    /// One try at committing `group`. On a frozen file, room is made first in a commit of its
    /// own that also takes the group's other commands ([`Buffer::make_room`]); once that is in,
    /// `group` keeps only the new records, so a retry does not apply the others twice.
    fn commit_once(
        &mut self,
        group: &mut Vec<WriterCommand>,
        expire: bool,
    ) -> Result<CommitSummary, super::BufferError> {
        let now = crate::clock::now_ms();
        let is_append = |c: &WriterCommand| matches!(c, WriterCommand::Append(_));
        let mut first = None;
        // Making room evicts: it holds the protections throughout, and the commit after it
        // with them. Any other commit takes them only if it drops something.
        let mut held = None;
        if self.buffer.is_frozen() && group.iter().any(is_append) {
            let protected = held.insert(self.protected.lock_to_drop());
            // The transforms' outcomes and state are committed with the new records, not
            // before them.
            let (appends, others): (Vec<_>, Vec<_>) = std::mem::take(group)
                .into_iter()
                .partition(goes_with_records);
            match self.buffer.make_room(&others, &appends, protected, now) {
                Ok(summary) => {
                    // In: whoever waits on those commands is told.
                    super::settle(&others, false);
                    *group = appends;
                    first = Some(summary);
                }
                Err(e) => {
                    *group = others;
                    group.extend(appends);
                    return Err(e);
                }
            }
        }
        let committed = match &held {
            Some(protected) => self.buffer.commit(group, protected, now, expire),
            None => self
                .buffer
                .commit_shared(group, &self.protected, now, expire),
        };
        drop(held);
        match committed {
            Ok(mut summary) => {
                if let Some(first) = first {
                    summary.absorb(first);
                }
                Ok(summary)
            }
            Err(e) => {
                if let Some(first) = first {
                    self.published(&first);
                }
                Err(e)
            }
        }
    }

    /// A commit is in: its metrics, logs and the progress the forwarder reads.
    fn published(&self, summary: &CommitSummary) {
        self.metrics.committed_now();
        self.record(summary);
        self.progress.send_replace(self.buffer.progress());
    }

    fn record(&self, summary: &CommitSummary) {
        let m = &self.metrics;
        m.buffered_bytes.inc_by(summary.appended_bytes);
        for (i, name) in self.stream_names.iter().enumerate() {
            let labels = [name.as_str()];
            m.records_buffered
                .with_label_values(&labels)
                .inc_by(summary.appended[i]);
            m.records_delivered
                .with_label_values(&labels)
                .inc_by(summary.acked[i]);
            m.records_dead_lettered
                .with_label_values(&labels)
                .inc_by(summary.dead_lettered[i]);
            for (count, reason) in [
                (summary.evicted[i], summary.evicted_reason),
                (summary.expired[i], LossReason::Ttl),
            ] {
                if count > 0 {
                    m.records_dropped
                        .with_label_values(&[name.as_str(), reason.as_str()])
                        .inc_by(count);
                }
            }
        }
        for (&(stream, reason), &n) in &summary.filtered {
            if let Some(name) = self.stream_names.get(stream) {
                m.records_filtered
                    .with_label_values(&[name.as_str(), reason.as_str()])
                    .inc_by(n);
            }
        }
        for loss in &summary.losses {
            if loss.reason == LossReason::CorruptBuffer
                && let Some(stream) = loss.stream.as_deref()
            {
                m.records_dropped
                    .with_label_values(&[stream, loss.reason.as_str()])
                    .inc_by(loss.count);
            }
            tracing::error!(stream = loss.stream.as_deref().unwrap_or("(unknown)"), reason = loss.reason.as_str(), count = loss.count, first_seq = ?loss.first_seq, last_seq = ?loss.last_seq, "records lost; loss report queued for the cloud");
        }
        self.publish_backlog();
    }

    /// What each stream holds, as gauges.
    fn publish_backlog(&self) {
        let m = &self.metrics;
        for (name, p) in self.stream_names.iter().zip(self.buffer.progress()) {
            m.backlog_records
                .with_label_values(&[name])
                .set(p.backlog_records as i64);
            m.backlog_bytes
                .with_label_values(&[name])
                .set(p.backlog_bytes as i64);
        }
    }
}

/// Record bytes a command adds to its group.
/// Whether `command` is a new record or what the transforms made of one: such commands are
/// committed together, or dropped together.
pub(super) fn goes_with_records(command: &WriterCommand) -> bool {
    matches!(
        command,
        WriterCommand::Append(_)
            | WriterCommand::Filtered { .. }
            | WriterCommand::TransformState(_)
            | WriterCommand::FilePosition(_)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buffer::{BufferStream, NewRecord};
    use crate::routing::Priority;
    use crate::transform::OnError;
    use bytes::Bytes;

    fn streams() -> Vec<BufferStream> {
        [
            ("logs", Priority::Bulk),
            (ingest_wire::LOSS_STREAM, Priority::Critical),
        ]
        .into_iter()
        .map(|(name, priority)| BufferStream {
            name: name.into(),
            priority,
            ttl: None,
        })
        .collect()
    }

    /// Runs a writer over the buffer at `path` (the test streams) with `chains`, through
    /// `commands`, to its end; what "logs" holds after, and its metrics.
    fn run_with(
        path: &std::path::Path,
        chains: Vec<Chain>,
        commands: Vec<WriterCommand>,
    ) -> (u64, Metrics) {
        let buffer = Buffer::open(path, &streams(), 1 << 30)
            .expect("open")
            .buffer;
        let (tx, rx) = flume::bounded(commands.len().max(1));
        let (progress, progress_rx) = watch::channel(buffer.progress());
        let metrics = Metrics::new();
        let writer = BufferWriter::new(
            buffer,
            rx,
            Duration::from_millis(10),
            1 << 20,
            progress,
            metrics.clone(),
            vec!["logs".into(), ingest_wire::LOSS_STREAM.into()],
            Arc::new(Protected::new(vec![Default::default(); 2])),
        )
        .with_transforms(chains, Facts::default());
        for c in commands {
            tx.send(c).expect("send");
        }
        drop(tx);
        writer.run();
        let held = progress_rx.borrow()[0].backlog_records;
        (held, metrics)
    }

    /// A writer over `buffer` (the test streams, no commit window, nothing protected), and
    /// the sender of its commands, to drive its steps one by one.
    fn bare_writer(buffer: Buffer) -> (flume::Sender<WriterCommand>, BufferWriter) {
        let (tx, rx) = flume::bounded(10);
        let (progress, _) = watch::channel(buffer.progress());
        let writer = BufferWriter::new(
            buffer,
            rx,
            Duration::ZERO,
            1 << 20,
            progress,
            Metrics::new(),
            vec!["logs".into(), ingest_wire::LOSS_STREAM.into()],
            Arc::new(Protected::new(vec![Default::default(); 2])),
        );
        (tx, writer)
    }

    /// A writer over a fresh buffer in `dir` ([`bare_writer`]) with `window` and `gap`, running
    /// on a thread; its command sender, and the receipts its records settle.
    fn windowed_writer(
        dir: &std::path::Path,
        window: Duration,
        gap: Duration,
    ) -> (
        flume::Sender<WriterCommand>,
        std::thread::JoinHandle<()>,
        Arc<crate::buffer::Receipts>,
    ) {
        let buffer = Buffer::open(&dir.join("b.db"), &streams(), 1 << 30)
            .expect("open")
            .buffer;
        let (tx, mut writer) = bare_writer(buffer);
        writer.commit_window = window;
        let writer = writer.with_gap(gap);
        (
            tx,
            std::thread::spawn(move || writer.run()),
            Arc::new(crate::buffer::Receipts::default()),
        )
    }

    /// A new record of `stream` (0: bulk, 1: critical) whose commit settles `ticket`.
    fn receipted(
        stream: usize,
        receipts: &Arc<crate::buffer::Receipts>,
        ticket: u64,
    ) -> WriterCommand {
        WriterCommand::Append(NewRecord {
            stream,
            topic: "t".into(),
            payload: Bytes::from_static(b"x"),
            received_at_ms: 1,
            monotonic_ms: 1,
            attributes: Default::default(),
            receipt: Some(crate::buffer::Receipt {
                to: receipts.clone(),
                ticket,
            }),
        })
    }

    /// The highest ticket settled once any is, waiting at most 30 s (half the tests' window).
    fn first_settled(receipts: &crate::buffer::Receipts) -> u64 {
        let started = Instant::now();
        loop {
            let (done, _) = receipts.take();
            if done > 0 || started.elapsed() > Duration::from_secs(30) {
                return done;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// A group gathers records while they keep coming, and closes once none came for
    /// `commit_gap`, long before its window ends.
    #[test]
    fn a_group_closes_once_records_stop_coming() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (tx, running, receipts) =
            windowed_writer(dir.path(), Duration::from_secs(60), Duration::from_secs(2));
        tx.send(receipted(0, &receipts, 1)).expect("send");
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(receipts.take().0, 0, "the group still gathers");
        tx.send(receipted(0, &receipts, 2)).expect("send");
        assert_eq!(
            first_settled(&receipts),
            2,
            "both records in one commit, long before the window's end"
        );
        drop(tx);
        running.join().expect("writer");
    }

    /// Records that keep coming within the gap do not hold a group open past its window.
    #[test]
    fn a_steady_trickle_is_committed_when_the_window_ends() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (tx, running, receipts) = windowed_writer(
            dir.path(),
            Duration::from_secs(1),
            Duration::from_millis(500),
        );
        let sent = 30;
        let mut first = None;
        for ticket in 1..=sent {
            tx.send(receipted(0, &receipts, ticket)).expect("send");
            std::thread::sleep(Duration::from_millis(100));
            let (done, _) = receipts.take();
            if done > 0 && first.is_none() {
                first = Some(done);
            }
        }
        drop(tx);
        running.join().expect("writer");
        let first = first.expect("a commit while the records kept coming");
        assert!(
            first < sent,
            "the first commit took {first} of {sent} records"
        );
    }

    /// A critical record closes its group at once, with what was queued before it, however
    /// long the window and the gap.
    #[test]
    fn a_critical_record_closes_its_group_at_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (tx, running, receipts) =
            windowed_writer(dir.path(), Duration::from_secs(60), Duration::from_secs(60));
        tx.send(receipted(0, &receipts, 1)).expect("send");
        tx.send(receipted(1, &receipts, 2)).expect("send");
        assert_eq!(
            first_settled(&receipts),
            2,
            "both committed, without waiting"
        );
        drop(tx);
        running.join().expect("writer");
    }

    #[test]
    fn a_group_the_disk_cannot_take_is_dropped_and_reported_and_acks_still_commit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("b.db");
        let mut buffer = Buffer::open(&path, &streams(), 1 << 30)
            .expect("open")
            .buffer;
        buffer
            .commit(
                &[WriterCommand::Append(NewRecord {
                    stream: 0,
                    topic: "t".into(),
                    payload: Bytes::from_static(b"x"),
                    received_at_ms: 1,
                    monotonic_ms: 1,
                    attributes: Default::default(),
                    receipt: None,
                })],
                &[],
                1,
                false,
            )
            .expect("commit");
        // The file may not grow by a single page: big records cannot fit, whatever is evicted.
        let pages = buffer.pragma("page_count").expect("pages");
        buffer.ceiling = Some(pages);
        buffer
            .pragma(&format!("max_page_count = {pages}"))
            .expect("limit");
        let (tx, mut writer) = bare_writer(buffer);
        drop(tx);
        let big = |i: u8| {
            WriterCommand::Append(NewRecord {
                stream: 0,
                topic: "t".into(),
                payload: Bytes::from(vec![i; 64 << 10]),
                received_at_ms: 2,
                monotonic_ms: 2,
                attributes: Default::default(),
                receipt: None,
            })
        };
        let mut group = vec![
            big(1),
            WriterCommand::Ack {
                stream: 0,
                first: 1,
                last: 1,
            },
            big(2),
        ];
        assert!(writer.commit_group(&mut group, false));
        let p = writer.buffer.progress();
        assert_eq!(p[0].backlog_records, 0, "the ack became a delete");
        assert_eq!(
            p[1].backlog_records, 1,
            "one loss report for the two records"
        );
        let dropped = writer
            .metrics
            .records_dropped
            .with_label_values(&["logs", "disk_full"])
            .get();
        assert_eq!(dropped, 2);
    }

    /// While new records come, a commit deletes at most [`ACK_PIECE`] acknowledged records,
    /// oldest first; the rest follow in the next commits, or all at once when nothing else is
    /// to be committed, or the writer must finish (a reload, the agent's stop). A few with
    /// nothing else to commit linger for the next records' commit, at most [`ACK_LINGER`].
    #[test]
    fn acks_are_deleted_in_pieces_while_new_records_wait() {
        let dir = tempfile::tempdir().expect("tempdir");
        let buffer = Buffer::open(&dir.path().join("b.db"), &streams(), 1 << 30)
            .expect("open")
            .buffer;
        let (tx, mut writer) = bare_writer(buffer);
        let append = || {
            WriterCommand::Append(NewRecord {
                stream: 0,
                topic: "t".into(),
                payload: Bytes::from_static(b"x"),
                received_at_ms: 1,
                monotonic_ms: 1,
                attributes: Default::default(),
                receipt: None,
            })
        };
        let ack = |stream, first, last| WriterCommand::Ack {
            stream,
            first,
            last,
        };
        let acks = |group: &[WriterCommand]| -> Vec<(usize, u64, u64)> {
            group
                .iter()
                .filter_map(|c| match *c {
                    WriterCommand::Ack {
                        stream,
                        first,
                        last,
                    } => Some((stream, first, last)),
                    _ => None,
                })
                .collect()
        };
        let piece = ACK_PIECE;
        let mut group = vec![append(), ack(0, 1, 2 * piece + 200)];
        writer.pace_acks(&mut group, false);
        assert_eq!(
            acks(&group),
            vec![(0, 1, piece)],
            "one piece beside new records"
        );
        assert_eq!(group.len(), 2, "the new record stays");
        let mut group = vec![ack(1, 7, 7), append()];
        writer.pace_acks(&mut group, false);
        assert_eq!(
            acks(&group),
            vec![(0, piece + 1, 2 * piece)],
            "the oldest owed first; the newer ack waits its turn"
        );
        tx.send(append()).expect("queued");
        let mut group = Vec::new();
        writer.pace_acks(&mut group, false);
        assert_eq!(
            acks(&group),
            vec![(0, 2 * piece + 1, 2 * piece + 200), (1, 7, 7)],
            "a piece may span acks"
        );
        let mut group = vec![ack(0, 1, piece)];
        let _ = writer.commands.try_recv();
        assert!(writer.acks_due.is_none(), "nothing was owed");
        let before = Instant::now();
        writer.pace_acks(&mut group, false);
        assert_eq!(
            acks(&group),
            vec![],
            "a few, with nothing else to commit or waiting: they linger for new records"
        );
        let due = writer.acks_due.expect("due once owed");
        assert!(due >= before + ACK_LINGER && due <= Instant::now() + ACK_LINGER);
        assert!(
            writer.idle_wait() > Duration::ZERO,
            "the loop waits for them"
        );
        let mut group = vec![append()];
        writer.pace_acks(&mut group, false);
        assert_eq!(
            acks(&group),
            vec![(0, 1, piece)],
            "new records take them into their commit"
        );
        assert!(writer.acks_due.is_none(), "nothing owed: no due time");
        assert_eq!(writer.idle_wait(), TICK, "nothing owed: the loop ticks");
        let mut group = vec![ack(0, 1, 2)];
        tx.send(append()).expect("queued");
        writer.pace_acks(&mut group, false);
        assert_eq!(
            acks(&group),
            vec![(0, 1, 2)],
            "a command waiting: they go now, beside it"
        );
        let _ = writer.commands.try_recv();
        let mut group = vec![ack(0, 3, 4)];
        writer.pace_acks(&mut group, false);
        assert_eq!(acks(&group), vec![], "alone again: they linger again");
        writer.acks_due = Some(Instant::now());
        assert_eq!(writer.idle_wait(), Duration::ZERO, "then they are due");
        writer.pace_acks(&mut group, false);
        assert_eq!(
            acks(&group),
            vec![(0, 3, 4)],
            "due, with nothing else to commit: all at once"
        );
        assert!(writer.acks_due.is_none());
        let mut group = vec![ack(0, 1, 3 * piece)];
        writer.pace_acks(&mut group, false);
        assert_eq!(
            acks(&group),
            vec![(0, 1, 3 * piece)],
            "more than linger, with nothing else to commit: all at once"
        );
        assert_eq!(writer.idle_wait(), TICK);
        let mut group = vec![append(), ack(0, 1, 3 * piece)];
        writer.pace_acks(&mut group, true);
        assert_eq!(
            acks(&group),
            vec![(0, 1, 3 * piece)],
            "a reload or a stop: all at once"
        );
        assert!(writer.acks_owed.is_empty());
    }

    /// Commands queued before a reconfigure are committed under the old stream indices, those
    /// after it under the new ones; the protections and progress follow the new streams.
    #[test]
    fn a_reconfigure_splits_the_queue_between_old_and_new_streams() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("b.db");
        let buffer = Buffer::open(&path, &streams(), 1 << 30)
            .expect("open")
            .buffer;
        let (tx, rx) = flume::bounded(10);
        let (progress, progress_rx) = watch::channel(buffer.progress());
        let protected = Arc::new(Protected::new(vec![Default::default(); 2]));
        // The forwarder has seq 1 of "logs" in flight.
        protected.lock()[0].ranges.insert_range(1, 1);
        let writer = BufferWriter::new(
            buffer,
            rx,
            Duration::from_millis(50),
            1 << 20,
            progress,
            Metrics::new(),
            vec!["logs".into(), ingest_wire::LOSS_STREAM.into()],
            protected.clone(),
        );
        let append = |stream: usize| {
            WriterCommand::Append(NewRecord {
                stream,
                topic: "t".into(),
                payload: Bytes::from_static(b"x"),
                received_at_ms: 1,
                monotonic_ms: 1,
                attributes: Default::default(),
                receipt: None,
            })
        };
        let (done, opened) = tokio::sync::oneshot::channel();
        let mut new = vec![BufferStream {
            name: "alarms".into(),
            priority: Priority::Critical,
            ttl: None,
        }];
        new.extend(streams());
        // "logs" is index 0 before, 1 after.
        tx.send(append(0)).expect("send");
        tx.send(WriterCommand::Reconfigure(super::super::Reconfigure {
            streams: new,
            quota_bytes: 1 << 30,
            chains: Vec::new(),
            done,
        }))
        .expect("send");
        tx.send(append(1)).expect("send");
        tx.send(append(0)).expect("send");
        drop(tx);
        let running = std::thread::spawn(move || writer.run());
        let opened = opened.blocking_recv().expect("reconfigured").streams;
        running.join().expect("writer");
        let names: Vec<&str> = opened.iter().map(|o| o.name.as_str()).collect();
        assert_eq!(names, ["alarms", "logs", ingest_wire::LOSS_STREAM]);
        let held: Vec<u64> = progress_rx
            .borrow()
            .iter()
            .map(|p| p.backlog_records)
            .collect();
        assert_eq!(held, vec![1, 2, 0]);
        assert_eq!(protected.lock().len(), 3, "a protection per new stream");
        assert_eq!(
            protected.lock()[1].ranges.iter().collect::<Vec<_>>(),
            vec![(1, 1)],
            "what was in flight stays protected, under the stream's new index"
        );
        assert_eq!(protected.generation(), 1, "the renumbering is announced");
    }

    /// Transforms run in the writer: a record not kept is counted and never stored, the
    /// state is saved in the same commit, and a writer on the reopened buffer resumes it.
    #[test]
    fn transforms_filter_before_the_commit_and_their_state_survives_a_restart() {
        use crate::transform::{Deadband, FieldPath, Step};
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("b.db");
        let chain = || {
            vec![Chain::new(vec![Step {
                spec: crate::transform::Spec::Deadband(Deadband {
                    field: FieldPath::new("t").expect("path"),
                    absolute: Some(1.0),
                    relative: None,
                    heartbeat: None,
                }),
                on_error: OnError::Pass,
            }])]
        };
        let reading = |t: f64| {
            WriterCommand::Append(NewRecord {
                stream: 0,
                topic: "plant/1/t".into(),
                payload: Bytes::from(format!(r#"{{"t": {t}}}"#)),
                received_at_ms: 1,
                monotonic_ms: 1,
                attributes: Default::default(),
                receipt: None,
            })
        };
        let run = |readings: Vec<WriterCommand>| {
            let (held, metrics) = run_with(&path, chain(), readings);
            let filtered = metrics
                .records_filtered
                .with_label_values(&["logs", "deadband"])
                .get();
            (held, filtered)
        };
        assert_eq!(
            run(vec![reading(1.0), reading(1.5), reading(3.0)]),
            (2, 1),
            "1.5 is within the band of 1.0"
        );
        assert_eq!(
            run(vec![reading(3.5), reading(4.0)]),
            (3, 1),
            "after a restart the last value sent is still 3.0"
        );
    }

    /// Readings folded into a window are never forgotten when the steps change: at a start
    /// under another config, and at a reload, the open window's record is sent.
    #[test]
    fn a_changed_window_sends_what_it_folded_at_a_restart_and_at_a_reload() {
        use crate::transform::{FieldPath, Spec, Step, Window};
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("b.db");
        let window = |hours: u64| {
            Chain::new(vec![Step {
                spec: Spec::Window(Window {
                    every: Duration::from_secs(3600 * hours),
                    fields: vec![FieldPath::new("t").expect("path")],
                    keep_raw: false,
                }),
                on_error: OnError::Pass,
            }])
        };
        let reading = |t: f64| {
            WriterCommand::Append(NewRecord {
                stream: 0,
                topic: "plant/1/t".into(),
                payload: Bytes::from(format!(r#"{{"t": {t}}}"#)),
                received_at_ms: crate::clock::now_ms(),
                monotonic_ms: 1,
                attributes: Default::default(),
                receipt: None,
            })
        };
        let run =
            |chain: Chain, commands: Vec<WriterCommand>| run_with(&path, vec![chain], commands).0;
        assert_eq!(
            run(window(1), vec![reading(1.0), reading(3.0)]),
            0,
            "folded"
        );
        assert_eq!(run(window(1), vec![]), 0, "same steps: still open");
        assert_eq!(
            run(window(2), vec![]),
            1,
            "another window: the open one's record is sent at the start"
        );
        assert_eq!(run(window(2), vec![]), 1, "and only once");

        // A reload that changes the steps: the open window's record, before the new streams.
        let (done, reconfigured) = tokio::sync::oneshot::channel();
        let held = run(
            window(2),
            vec![
                reading(5.0),
                WriterCommand::Reconfigure(crate::buffer::Reconfigure {
                    streams: streams(),
                    quota_bytes: 1 << 30,
                    chains: vec![window(3)],
                    done,
                }),
            ],
        );
        assert!(reconfigured.blocking_recv().is_ok());
        assert_eq!(
            held, 2,
            "the reading folded before the reload is sent with its window"
        );
    }
}
