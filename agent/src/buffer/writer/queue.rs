//! The queue in front of the writer: bounded in commands ([`Queue`]) and in bytes
//! ([`QueueBytes`]), so a burst of large publishes waits at the front door instead of growing
//! the agent's memory.

use std::sync::Arc;

use super::WriterCommand;

/// The sending side of the writer's queue (bounded: senders wait while it is full).
pub type Queue = flume::Sender<WriterCommand>;

/// Bytes of records waiting for the writer (`buffer.queue_bytes`), beside the queue's bound in
/// records: the front door takes a record's cost before it queues it, waiting while all is
/// taken (its client waits with it), and the writer gives the cost back once the record's
/// group is committed or dropped. Every `Append` in the queue holds its cost: the front door
/// queues all of them in the agent.
#[derive(Debug, Clone)]
pub struct QueueBytes {
    room: Arc<tokio::sync::Semaphore>,
    max: u64,
}

impl QueueBytes {
    /// A budget of `bytes` (at most 4 GiB, 512 MiB on 32-bit targets; a record costing more
    /// takes all of it).
    pub fn new(bytes: u64) -> QueueBytes {
        // tokio's semaphore holds at most usize::MAX >> 3 permits (512 MiB on 32-bit ARM).
        let max = bytes
            .min(u64::from(u32::MAX))
            .min(tokio::sync::Semaphore::MAX_PERMITS as u64)
            .max(1);
        QueueBytes {
            room: Arc::new(tokio::sync::Semaphore::new(max as usize)),
            max,
        }
    }

    pub(super) fn share(&self, command: &WriterCommand) -> u32 {
        cost(command).min(self.max) as u32
    }

    /// Takes `command`'s cost, waiting for room.
    pub async fn take(&self, command: &WriterCommand) {
        if let Ok(room) = self.room.acquire_many(self.share(command)).await {
            room.forget();
        }
    }

    /// What the records of `group` hold.
    pub(super) fn held(&self, group: &[WriterCommand]) -> u64 {
        group.iter().map(|c| u64::from(self.share(c))).sum()
    }

    /// Gives `held` back.
    pub(super) fn give_back(&self, held: u64) {
        self.room.add_permits(held as usize);
    }

    /// Bytes queued now.
    pub fn queued(&self) -> u64 {
        self.max - self.room.available_permits() as u64
    }
}

pub(super) fn cost(command: &WriterCommand) -> u64 {
    match command {
        WriterCommand::Append(r) => r.cost(),
        // What its records will cost: a file source takes this before it sends them.
        WriterCommand::FileLines(f) => f
            .lines
            .iter()
            .map(|l| {
                (l.topic.len() + l.payload.len()) as u64 + crate::buffer::RECORD_OVERHEAD_BYTES
            })
            .sum(),
        _ => 0,
    }
}
