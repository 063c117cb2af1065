//! Which records of a stream the buffer must not evict or expire: those that may be in the log.
//!
//! Invariant: a record the forwarder has put in a request (in flight, or sent without a
//! definite answer) is never dropped by the quota or the TTL, so loss reports stay exact: a
//! record is either reported lost or delivered, never both. Everything else may go, oldest
//! first, whatever order the stream is sent in.
//!
//! The writer, in a commit that may drop records, holds [`Protected::lock_to_drop`] from the
//! moment it first looks at the protections until that commit is over ([`Droppable`]), and
//! counts such commits ([`Protected::drops`]). The forwarder reads a batch without the lock,
//! then takes it to protect what it read: if no such commit ended meanwhile, none dropped a
//! record of the batch (it would have had to end before the protection, and so meanwhile);
//! otherwise it reads the batch again under the lock. So a batch is either read before an
//! eviction (and protected) or after it (and no longer holds the evicted rows). A commit that
//! drops nothing (appends and acks, the usual case) never takes the lock, and a batch being
//! read holds it only to protect what it read: they do not wait for each other, nor a
//! critical stream's read for a bulk one's. Only a commit that did drop records is counted;
//! while one overlaps a read (a buffer held at its quota evicts in every commit), the read is
//! done twice, the second time holding the lock.

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
    /// Commits that looked at the protections to drop records, ended.
    drops: std::sync::atomic::AtomicU64,
}

/// [`Protected::lock`] for a commit that may drop records: counted in [`Protected::drops`]
/// when released.
pub struct DropGuard<'a> {
    protected: &'a Protected,
    guard: MutexGuard<'a, Vec<Protection>>,
    /// Whether releasing it counts as a drop (not when the commit dropped nothing).
    counted: bool,
}

impl std::ops::Deref for DropGuard<'_> {
    type Target = Vec<Protection>;
    fn deref(&self) -> &Vec<Protection> {
        &self.guard
    }
}

impl Drop for DropGuard<'_> {
    fn drop(&mut self) {
        // Before the lock goes (the field drops after this): a read that protects its batch
        // after this commit sees the count moved.
        if self.counted {
            self.protected
                .drops
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }
}

impl Protected {
    /// Protections by stream index.
    pub fn new(streams: Vec<Protection>) -> Protected {
        Protected {
            streams: Mutex::new(streams),
            generation: std::sync::atomic::AtomicU64::new(0),
            drops: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// How many commits that may have dropped records have ended: read it before reading a
    /// batch without the lock, and compare it under the lock before protecting the batch.
    pub fn drops(&self) -> u64 {
        self.drops.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The lock, for a commit that may drop records (see the module's doc).
    pub fn lock_to_drop(&self) -> DropGuard<'_> {
        DropGuard {
            protected: self,
            guard: self.lock(),
            counted: true,
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

    /// Holds the protections (and so excludes evictions) until the guard is dropped. A commit
    /// that may drop records takes [`Protected::lock_to_drop`] instead.
    pub fn lock(&self) -> MutexGuard<'_, Vec<Protection>> {
        // A panic while holding it leaves plain ranges behind; they stay usable.
        self.streams.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// What a commit may drop, per stream, worked out from the protections the first time one of
/// its steps needs it ([`Droppable::of`]). From the shared [`Protected`], that first time
/// takes its lock, held until this is dropped (after the commit): a commit that drops nothing
/// never takes it.
pub struct Droppable<'a> {
    from: Source<'a>,
    streams: usize,
    ranges: Option<Vec<Vec<(u64, u64)>>>,
}

enum Source<'a> {
    Given(&'a [Protection]),
    Shared {
        protected: &'a Protected,
        guard: Option<DropGuard<'a>>,
    },
}

impl<'a> Droppable<'a> {
    /// From protections already held (by index; a stream beyond them has none).
    pub fn given(protections: &'a [Protection], streams: usize) -> Droppable<'a> {
        Droppable {
            from: Source::Given(protections),
            streams,
            ranges: None,
        }
    }

    /// From the shared protections, locked only if a step needs them.
    pub fn shared(protected: &'a Protected, streams: usize) -> Droppable<'a> {
        Droppable {
            from: Source::Shared {
                protected,
                guard: None,
            },
            streams,
            ranges: None,
        }
    }

    /// Stream `i`'s unprotected sequence ranges, oldest first.
    pub fn of(&mut self, i: usize) -> &[(u64, u64)] {
        let streams = self.streams;
        let ranges = self.ranges.get_or_insert_with(|| {
            let protections: &[Protection] = match &mut self.from {
                Source::Given(p) => p,
                Source::Shared { protected, guard } => guard.insert(protected.lock_to_drop()),
            };
            (0..streams)
                .map(|i| protections.get(i).cloned().unwrap_or_default().droppable())
                .collect()
        });
        ranges.get(i).map_or(&[], Vec::as_slice)
    }

    /// The commit is over and dropped nothing: releasing the lock is not counted as a drop
    /// (no read can hold a record it dropped).
    pub fn dropped_nothing(&mut self) {
        if let Source::Shared {
            guard: Some(guard), ..
        } = &mut self.from
        {
            guard.counted = false;
        }
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
