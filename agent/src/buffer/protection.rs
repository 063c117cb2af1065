//! Which records of a stream the buffer must not evict or expire: those that may be in the log.
//!
//! Invariant: a record the forwarder has put in a request (in flight, or sent without a
//! definite answer) is never dropped by the quota or the TTL, so loss reports stay exact: a
//! record is either reported lost or delivered, never both. Everything else may go, oldest
//! first, whatever order the stream is sent in.
//!
//! The forwarder updates a stream's [`Protection`] under [`Protected::lock`] in the same
//! critical section in which it reads a batch, and the writer holds the lock for the whole
//! commit in which it evicts: so a batch is either read before an eviction (and protected) or
//! after it (and no longer holds the evicted rows).

use std::sync::{Mutex, MutexGuard, PoisonError};

/// The set of sequence numbers both sides keep (the contract crate's).
pub use ingest_wire::SeqRanges;

/// One stream's protected records: everything at or below `floor` (delivered, being deleted),
/// and `ranges` above it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Protection {
    /// Records at or below it are gone or going; never dropped.
    pub floor: u64,
    /// Further protected ranges.
    pub ranges: SeqRanges,
}

/// The highest sequence SQLite can hold (its integers are signed).
pub const MAX_SEQ: u64 = i64::MAX as u64;

impl Protection {
    /// Protects everything at or below `floor`, nothing above.
    pub fn floor(floor: u64) -> Protection {
        Protection {
            floor,
            ranges: SeqRanges::default(),
        }
    }

    /// The unprotected sequence ranges, oldest first: where eviction and expiry may look.
    pub fn droppable(&self) -> Vec<(u64, u64)> {
        match self.floor.checked_add(1) {
            Some(from) if from <= MAX_SEQ => self.ranges.gaps(from, MAX_SEQ),
            _ => Vec::new(),
        }
    }
}

/// Every stream's [`Protection`], shared by the forwarder and the buffer writer.
pub struct Protected {
    streams: Mutex<Vec<Protection>>,
    /// Moves when a reload renumbers the streams ([`Protected::renumber`]): a forwarder started
    /// before must not touch them by its indices any more.
    generation: std::sync::atomic::AtomicU64,
}

impl Protected {
    /// Protections by stream index.
    pub fn new(streams: Vec<Protection>) -> Protected {
        Protected {
            streams: Mutex::new(streams),
            generation: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Which numbering of the streams is in force; read it, then compare it under
    /// [`Protected::lock`] before using a stream index.
    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Puts the protections of renumbered streams in force (a reload).
    pub fn renumber(&self, streams: Vec<Protection>) {
        let mut guard = self.lock();
        *guard = streams;
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    /// Holds the protections (and so excludes evictions) until the guard is dropped.
    pub fn lock(&self) -> MutexGuard<'_, Vec<Protection>> {
        // A panic while holding it leaves plain ranges behind; they stay usable.
        self.streams.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The set's own tables are in the contract crate (`ingest_wire::SeqRanges`).
    #[test]
    fn droppable_ranges_are_the_gaps_above_the_floor() {
        let mut s = SeqRanges::default();
        s.insert_range(3, 4);
        s.insert_range(8, 10);
        let p = Protection {
            floor: 2,
            ranges: s,
        };
        assert_eq!(p.droppable(), vec![(5, 7), (11, MAX_SEQ)]);
        assert_eq!(Protection::floor(0).droppable(), vec![(1, MAX_SEQ)]);
    }
}
