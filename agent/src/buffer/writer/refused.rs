//! When the disk refuses a group: the new records it holds are dropped, each with its loss
//! report, so the queue drains and acknowledgements keep becoming deletes; and when the agent
//! stops, what still cannot be committed is counted and logged as lost.

use std::collections::BTreeMap;

use ingest_wire::{LossReason, LossReport};

use super::{BufferWriter, NewRecord, WriterCommand, goes_with_records};

impl BufferWriter {
    /// Takes the group's new records out: the disk cannot take them even with everything
    /// evictable gone. Those a publisher waits on are refused to it (it was never told they
    /// are kept, so they are not lost); the others (QoS 0) are replaced by loss reports, per
    /// stream, reason `disk_full`. `false` when the group held none.
    pub(super) fn drop_appends(&mut self, group: &mut Vec<WriterCommand>) -> bool {
        if !group.iter().any(|c| matches!(c, WriterCommand::Append(_))) {
            return false;
        }
        // What the transforms decided on these records goes with them: records they did not
        // keep are refused (or reported) too, and their state is read back from the buffer.
        let (appends, mut rest): (Vec<_>, Vec<_>) = std::mem::take(group)
            .into_iter()
            .partition(goes_with_records);
        // A file's position still moves past its lines: they are reported lost, not re-read.
        let (positions, appends): (Vec<_>, Vec<_>) = appends
            .into_iter()
            .partition(|c| matches!(c, WriterCommand::FilePosition(_)));
        rest.extend(positions);
        *group = rest;
        crate::buffer::settle(&appends, true);
        let mut dropped: BTreeMap<usize, u64> = BTreeMap::new();
        let mut refused = 0u64;
        for c in &appends {
            match c {
                WriterCommand::Append(NewRecord {
                    receipt: Some(_), ..
                })
                | WriterCommand::Filtered {
                    receipt: Some(_), ..
                } => refused += 1,
                WriterCommand::Append(NewRecord { stream, .. })
                | WriterCommand::Filtered { stream, .. } => {
                    *dropped.entry(*stream).or_default() += 1
                }
                _ => {}
            }
        }
        let restored = self.reset_transforms();
        group.extend(restored);
        if refused > 0 {
            tracing::error!(
                count = refused,
                "buffer disk full and nothing left to evict: publishes refused to their senders (not acknowledged)"
            );
            self.metrics.publishes_refused.inc_by(refused);
        }
        let now = crate::clock::now_ms();
        for (stream, count) in dropped {
            let name = self.stream_names[stream].clone();
            tracing::error!(stream = %name, count, "buffer disk full and nothing left to evict: new records dropped; loss report queued for the cloud");
            self.metrics
                .records_dropped
                .with_label_values(&[name.as_str(), LossReason::DiskFull.as_str()])
                .inc_by(count);
            group.push(WriterCommand::Loss(LossReport {
                stream: Some(name),
                first_seq: None,
                last_seq: None,
                count,
                reason: LossReason::DiskFull,
                detected_at_ms: now,
            }));
        }
        true
    }

    /// The buffer still refuses the group and the writer gives up on it (the agent is stopping,
    /// or commits keep failing): publishers waiting on it are refused; what they were not told
    /// about is counted and logged as lost (a loss report cannot be written either).
    pub(super) fn give_up(&self, group: &[WriterCommand], error: &crate::buffer::BufferError) {
        crate::buffer::settle(group, true);
        let mut lost: BTreeMap<usize, u64> = BTreeMap::new();
        let mut reports = 0u64;
        for c in group {
            match c {
                WriterCommand::Append(r) => *lost.entry(r.stream).or_default() += 1,
                WriterCommand::Loss(l) => reports += l.count,
                _ => {}
            }
        }
        for (stream, count) in lost {
            let name = self.stream_names[stream].as_str();
            self.metrics
                .records_dropped
                .with_label_values(&[name, "stop_failed"])
                .inc_by(count);
            tracing::error!(stream = name, count, error = %error, "stopping: the buffer refused these records; they are lost and could not be reported upstream");
        }
        if reports > 0 {
            tracing::error!(count = reports, error = %error, "stopping: loss reports for these records could not be written");
        }
    }
}
