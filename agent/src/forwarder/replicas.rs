//! The ingest replicas the agent fails over between: the one in use, and when to move on.

/// Which ingest replica requests go to: the same one while it answers (its dedup state then
/// covers our retries), the next one after a failure. Backoff applies once every replica
/// failed in a row.
#[derive(Debug)]
pub(super) struct Replicas {
    pub(super) count: usize,
    pub(super) current: usize,
    pub(super) failed_in_row: usize,
}

impl Replicas {
    pub(super) fn new(count: usize) -> Replicas {
        Replicas {
            count: count.max(1),
            current: 0,
            failed_in_row: 0,
        }
    }

    pub(super) fn succeeded(&mut self) {
        self.failed_in_row = 0;
    }

    /// Records a failure of the current replica and moves to the next; true when every replica
    /// failed since the last success (time to back off).
    pub(super) fn failed(&mut self) -> bool {
        self.failed_in_row += 1;
        self.current = (self.current + 1) % self.count;
        self.failed_in_row.is_multiple_of(self.count)
    }
}
