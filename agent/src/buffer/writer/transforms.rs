//! The writer's side of the edge transforms ([`crate::transform`]): each new record goes
//! through its stream's chain just before the commit that stores it, and the chains' state is
//! written in that same transaction, restored at a start and reset when a stream's steps
//! change.

use super::{BufferWriter, NewRecord, WriterCommand};
use crate::transform::{Chain, OnError, Output, Reading, Reason};

impl BufferWriter {
    /// Gives each chain the state its stream saved ([`Buffer::transform_state`]). State saved
    /// under steps no longer in force is deleted, and what it still owes (an open window's
    /// record, sent into its stream now) is returned with the deletions, to commit; state of
    /// streams no longer in the buffer is deleted. What cannot be read starts afresh.
    pub(super) fn restore_transforms(&mut self) -> Vec<WriterCommand> {
        let mut owed = Vec::new();
        for (i, name) in self.stream_names.iter().enumerate() {
            let rows = match self.buffer.transform_state(name) {
                Ok(rows) => rows,
                Err(e) => {
                    tracing::warn!(stream = %name, error = %e, "cannot read the transforms' saved state: windows and deadbands start afresh");
                    continue;
                }
            };
            let mut stale = Vec::new();
            for row in rows {
                let Some(state) = row.state.as_deref() else {
                    continue;
                };
                match self.chains.get_mut(i) {
                    Some(chain)
                        if chain.fingerprint(row.step) == Some(row.fingerprint.as_str()) =>
                    {
                        chain.restore(row.step, row.key.clone(), state);
                    }
                    _ => {
                        if let Some(m) = Chain::orphan_window(&row.key, state) {
                            owed.push(WriterCommand::Append(NewRecord {
                                stream: i,
                                topic: m.topic,
                                payload: m.payload,
                                received_at_ms: m.received_at_ms,
                                monotonic_ms: crate::clock::monotonic_ms(),
                                attributes: Default::default(),
                                receipt: None,
                            }));
                        }
                        stale.push(crate::transform::StateRow { state: None, ..row });
                    }
                }
            }
            if !stale.is_empty() {
                tracing::info!(stream = %name, rows = stale.len(), "transform steps changed: their saved state is dropped and their open windows sent");
                owed.push(WriterCommand::TransformState(stale));
            }
        }
        match self
            .buffer
            .forget_transform_state_except(&self.stream_names)
        {
            Ok(0) => {}
            Ok(n) => tracing::warn!(
                rows = n,
                "transform state of streams no longer in the buffer dropped (their open windows are not sent)"
            ),
            Err(e) => tracing::warn!(error = %e, "cannot drop the transform state of streams gone"),
        }
        owed
    }

    /// After a group was dropped or given up: the chains' state is read back from the buffer,
    /// which holds what was committed.
    pub(super) fn reset_transforms(&mut self) -> Vec<WriterCommand> {
        for chain in &mut self.chains {
            chain.forget_state();
        }
        self.restore_transforms()
    }

    /// Runs each new record of `group` through its stream's transforms (and, on a `tick`, ends
    /// the windows that are over): a record kept takes its new payload, one not kept becomes
    /// [`WriterCommand::Filtered`] (its publisher still waits for the commit), records made by
    /// windows are added, and the state changed is added to be saved in the same commit.
    pub(super) fn transform(&mut self, group: &mut Vec<WriterCommand>, tick: bool) {
        if self.chains.iter().all(Chain::is_empty) {
            return;
        }
        let now = crate::clock::now_ms();
        let commands = std::mem::take(group);
        group.reserve(commands.len());
        for command in commands {
            let WriterCommand::Append(r) = command else {
                group.push(command);
                continue;
            };
            let Some(chain) = self.chains.get_mut(r.stream).filter(|c| !c.is_empty()) else {
                group.push(WriterCommand::Append(r));
                continue;
            };
            let NewRecord {
                stream,
                topic,
                payload,
                received_at_ms,
                monotonic_ms,
                attributes,
                receipt,
            } = r;
            let out = chain.run(
                Reading {
                    topic,
                    payload,
                    received_at_ms,
                    attributes,
                },
                &self.facts,
            );
            self.made(group, stream, &out);
            match (out.kept, out.filtered) {
                (Some(kept), _) => group.push(WriterCommand::Append(NewRecord {
                    stream,
                    topic: kept.topic,
                    payload: kept.payload,
                    received_at_ms,
                    monotonic_ms,
                    attributes: kept.attributes,
                    receipt,
                })),
                (None, reason) => group.push(WriterCommand::Filtered {
                    stream,
                    reason: reason.unwrap_or(Reason::Filter),
                    receipt,
                }),
            }
        }
        for i in 0..self.chains.len() {
            if tick && !self.chains[i].is_empty() {
                let out = self.chains[i].tick(now, &self.facts);
                self.made(group, i, &out);
            }
            let Some(name) = self.stream_names.get(i) else {
                break;
            };
            let rows = self.chains[i].take_changes(name);
            if !rows.is_empty() {
                group.push(WriterCommand::TransformState(rows));
            }
        }
    }

    /// Adds what a chain of `stream` made (window records, and those a later step dropped), and
    /// counts the payloads it could not read.
    pub(super) fn made(&self, group: &mut Vec<WriterCommand>, stream: usize, out: &Output) {
        for m in &out.made {
            group.push(WriterCommand::Append(NewRecord {
                stream,
                topic: m.topic.clone(),
                payload: m.payload.clone(),
                received_at_ms: m.received_at_ms,
                monotonic_ms: crate::clock::monotonic_ms(),
                attributes: m.attributes.clone(),
                receipt: None,
            }));
        }
        for &reason in &out.made_filtered {
            group.push(WriterCommand::Filtered {
                stream,
                reason,
                receipt: None,
            });
        }
        if let Some(name) = self.stream_names.get(stream) {
            for step in &out.state_full {
                self.metrics
                    .transform_state_full
                    .with_label_values(&[name.as_str(), step])
                    .inc();
            }
            for (step, action) in &out.unparsable {
                let action = match action {
                    OnError::Pass => "passed",
                    OnError::Drop => "dropped",
                };
                self.metrics
                    .transform_unparsable
                    .with_label_values(&[name.as_str(), step, action])
                    .inc();
            }
        }
    }

    /// Fits the file to its volume ([`Buffer::fit_to_volume`]); a failure is retried next tick.
    pub(super) fn fit(&mut self) {
        if let Err(e) = self.buffer.fit_to_volume() {
            tracing::warn!(error = %e, "cannot fit the buffer to its volume now; retried");
        }
        self.metrics
            .buffer_disk_full
            .set(i64::from(self.buffer.is_frozen()));
    }
}
