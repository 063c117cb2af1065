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

/// A set of sequence numbers as sorted, disjoint, non-adjacent inclusive ranges. Small: a
/// stream has a few ranges at most (its in-flight batch, a failed one, newest-first holes).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SeqRanges(Vec<(u64, u64)>);

impl SeqRanges {
    /// Adds `first..=last`, merging with what it touches.
    pub fn insert(&mut self, first: u64, last: u64) {
        if first > last {
            return;
        }
        let (mut lo, mut hi) = (first, last);
        let mut kept = Vec::with_capacity(self.0.len() + 1);
        for &(f, l) in &self.0 {
            if l.saturating_add(1) < lo || hi.saturating_add(1) < f {
                kept.push((f, l));
            } else {
                lo = lo.min(f);
                hi = hi.max(l);
            }
        }
        kept.push((lo, hi));
        kept.sort_unstable();
        self.0 = kept;
    }

    /// Removes `first..=last`.
    pub fn remove(&mut self, first: u64, last: u64) {
        if first > last {
            return;
        }
        let mut kept = Vec::with_capacity(self.0.len() + 1);
        for &(f, l) in &self.0 {
            if l < first || f > last {
                kept.push((f, l));
                continue;
            }
            if f < first {
                kept.push((f, first - 1));
            }
            if l > last {
                kept.push((last + 1, l));
            }
        }
        self.0 = kept;
    }

    /// Drops everything at or below `seq`.
    pub fn remove_through(&mut self, seq: u64) {
        self.remove(0, seq);
    }

    /// The ranges, ascending.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = (u64, u64)> + '_ {
        self.0.iter().copied()
    }

    /// The lowest range, if any.
    pub fn first(&self) -> Option<(u64, u64)> {
        self.0.first().copied()
    }

    /// How many members lie in `first..=last`.
    pub fn count_within(&self, first: u64, last: u64) -> u64 {
        self.0
            .iter()
            .map(|&(f, l)| {
                let (f, l) = (f.max(first), l.min(last));
                if f > l { 0 } else { l - f + 1 }
            })
            .sum()
    }

    /// The parts of `first..=last` outside the set, ascending.
    pub fn gaps(&self, first: u64, last: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut from = first;
        for &(f, l) in &self.0 {
            if from > last {
                break;
            }
            if l < from {
                continue;
            }
            if f > from {
                out.push((from, (f - 1).min(last)));
            }
            from = match l.checked_add(1) {
                Some(n) => n,
                None => return out,
            };
        }
        if from <= last {
            out.push((from, last));
        }
        out
    }
}

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

    type Ranges<'a> = &'a [(u64, u64)];

    fn set(ranges: Ranges<'_>) -> SeqRanges {
        let mut s = SeqRanges::default();
        for &(f, l) in ranges {
            s.insert(f, l);
        }
        s
    }

    #[test]
    fn insert_merges_touching_and_overlapping_ranges() {
        let cases: Vec<(Ranges, Ranges)> = vec![
            (&[(1, 5)], &[(1, 5)]),
            (&[(1, 5), (6, 9)], &[(1, 9)]),
            (&[(6, 9), (1, 5)], &[(1, 9)]),
            (&[(1, 3), (7, 9), (4, 6)], &[(1, 9)]),
            (&[(1, 3), (7, 9)], &[(1, 3), (7, 9)]),
            (&[(1, 3), (7, 9), (2, 8)], &[(1, 9)]),
            (&[(10, 20), (12, 13)], &[(10, 20)]),
            (&[(5, 4)], &[]),
        ];
        for (inserted, want) in cases {
            assert_eq!(
                set(inserted).iter().collect::<Vec<_>>(),
                want,
                "{inserted:?}"
            );
        }
    }

    #[test]
    fn remove_splits_and_trims() {
        let cases: Vec<(Ranges, (u64, u64), Ranges)> = vec![
            (&[(1, 9)], (4, 6), &[(1, 3), (7, 9)]),
            (&[(1, 9)], (1, 9), &[]),
            (&[(1, 9)], (0, 3), &[(4, 9)]),
            (&[(1, 3), (7, 9)], (3, 7), &[(1, 2), (8, 9)]),
            (&[(1, 3)], (5, 6), &[(1, 3)]),
        ];
        for (start, (f, l), want) in cases {
            let mut s = set(start);
            s.remove(f, l);
            assert_eq!(s.iter().collect::<Vec<_>>(), want, "{start:?} - {f}..={l}");
        }
    }

    #[test]
    fn gaps_counts_and_droppable_ranges() {
        let s = set(&[(3, 4), (8, 10)]);
        assert_eq!(s.gaps(1, 12), vec![(1, 2), (5, 7), (11, 12)]);
        assert_eq!(s.gaps(3, 10), vec![(5, 7)]);
        assert_eq!(s.gaps(9, 9), vec![]);
        assert_eq!(s.count_within(1, 12), 5);
        assert_eq!(s.count_within(4, 8), 2);
        let p = Protection {
            floor: 2,
            ranges: s,
        };
        assert_eq!(p.droppable(), vec![(5, 7), (11, MAX_SEQ)]);
        assert_eq!(Protection::floor(0).droppable(), vec![(1, MAX_SEQ)]);
    }
}
