//! A set of sequence numbers, the one both sides keep: the agent's records in flight (which
//! must not be evicted) and the ingest's records already in the log (its deduplication). Stored
//! as disjoint, non-adjacent inclusive ranges; sequences come mostly in order, so a set is
//! usually one range or a few. Pure.

use std::collections::BTreeMap;

/// Sequence numbers as sorted, disjoint, non-adjacent inclusive ranges (first → last).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SeqRanges {
    ranges: BTreeMap<u64, u64>,
}

impl SeqRanges {
    /// Whether `v` is in the set.
    pub fn contains(&self, v: u64) -> bool {
        self.range_of(v).is_some()
    }

    /// The range holding `v`, if any.
    pub fn range_of(&self, v: u64) -> Option<(u64, u64)> {
        self.ranges
            .range(..=v)
            .next_back()
            .filter(|&(_, &last)| v <= last)
            .map(|(&f, &l)| (f, l))
    }

    /// Adds `v`, merging with neighbouring ranges. Returns the first of the range that merging
    /// removed (the one that began at `v + 1`), if any: a stored copy of it must go.
    pub fn insert(&mut self, v: u64) -> Option<u64> {
        if self.contains(v) {
            return None;
        }
        let merged_away = v.checked_add(1).filter(|n| self.ranges.contains_key(n));
        self.insert_range(v, v);
        merged_away
    }

    /// Adds `first..=last`, merging with what it touches or overlaps.
    pub fn insert_range(&mut self, first: u64, last: u64) {
        if first > last {
            return;
        }
        let (mut lo, mut hi) = (first, last);
        // The range before, if it reaches `first` or touches it.
        if let Some((&f, &l)) = self.ranges.range(..=first).next_back()
            && l.saturating_add(1) >= first
        {
            lo = f;
            hi = hi.max(l);
        }
        // Every range starting inside `lo..=hi + 1` is swallowed.
        let swallowed: Vec<(u64, u64)> = self
            .ranges
            .range(lo..=hi.saturating_add(1))
            .map(|(&f, &l)| (f, l))
            .collect();
        for (f, l) in swallowed {
            self.ranges.remove(&f);
            hi = hi.max(l);
        }
        self.ranges.insert(lo, hi);
    }

    /// Removes `first..=last`.
    pub fn remove(&mut self, first: u64, last: u64) {
        if first > last {
            return;
        }
        let touched: Vec<(u64, u64)> = self
            .ranges
            .range(..=last)
            .rev()
            .take_while(|&(_, &l)| l >= first)
            .map(|(&f, &l)| (f, l))
            .collect();
        for (f, l) in touched {
            self.ranges.remove(&f);
            if f < first {
                self.ranges.insert(f, first - 1);
            }
            if l > last {
                self.ranges.insert(last + 1, l);
            }
        }
    }

    /// Drops everything at or below `seq`.
    pub fn remove_through(&mut self, seq: u64) {
        self.remove(0, seq);
    }

    /// The ranges, ascending.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = (u64, u64)> + '_ {
        self.ranges.iter().map(|(&f, &l)| (f, l))
    }

    /// The lowest range, if any.
    pub fn first(&self) -> Option<(u64, u64)> {
        self.ranges.first_key_value().map(|(&f, &l)| (f, l))
    }

    /// How many members lie in `first..=last`.
    pub fn count_within(&self, first: u64, last: u64) -> u64 {
        self.iter()
            .map(|(f, l)| {
                let (f, l) = (f.max(first), l.min(last));
                if f > l { 0 } else { l - f + 1 }
            })
            .sum()
    }

    /// The parts of `first..=last` outside the set, ascending.
    pub fn gaps(&self, first: u64, last: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut from = first;
        for (f, l) in self.iter() {
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use proptest::prelude::*;

    use super::*;

    type Ranges = &'static [(u64, u64)];

    fn set(ranges: &[(u64, u64)]) -> SeqRanges {
        let mut s = SeqRanges::default();
        for &(f, l) in ranges {
            s.insert_range(f, l);
        }
        s
    }

    #[test]
    fn insert_range_merges_touching_and_overlapping_ranges() {
        let cases: Vec<(Ranges, Ranges)> = vec![
            (&[(1, 5)], &[(1, 5)]),
            (&[(1, 5), (6, 9)], &[(1, 9)]),
            (&[(6, 9), (1, 5)], &[(1, 9)]),
            (&[(1, 3), (7, 9), (4, 6)], &[(1, 9)]),
            (&[(1, 3), (7, 9)], &[(1, 3), (7, 9)]),
            (&[(1, 3), (7, 9), (2, 8)], &[(1, 9)]),
            (&[(10, 20), (12, 13)], &[(10, 20)]),
            (&[(5, 4)], &[]),
            (
                &[(0, 0), (u64::MAX, u64::MAX), (1, u64::MAX - 1)],
                &[(0, u64::MAX)],
            ),
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
    fn insert_merges_and_says_which_range_it_swallowed() {
        let mut s = SeqRanges::default();
        for v in [5, 7, 6, 1, 3, 2, 10] {
            s.insert(v);
        }
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![(1, 3), (5, 7), (10, 10)]);
        for (v, want) in [
            (0, false),
            (1, true),
            (4, false),
            (7, true),
            (8, false),
            (10, true),
        ] {
            assert_eq!(s.contains(v), want, "{v}");
        }
        assert_eq!(s.insert(4), Some(5), "(5, 7) merged into (1, 7)");
        assert_eq!(s.insert(4), None, "already there");
        assert_eq!(s.insert(u64::MAX), None);
        assert_eq!(
            s.iter().collect::<Vec<_>>(),
            vec![(1, 7), (10, 10), (u64::MAX, u64::MAX)]
        );
        assert_eq!(s.range_of(6), Some((1, 7)));
        assert_eq!(s.first(), Some((1, 7)));
    }

    #[test]
    fn remove_splits_and_trims() {
        let cases: Vec<(Ranges, (u64, u64), Ranges)> = vec![
            (&[(1, 9)], (4, 6), &[(1, 3), (7, 9)]),
            (&[(1, 9)], (1, 9), &[]),
            (&[(1, 9)], (0, 3), &[(4, 9)]),
            (&[(1, 3), (7, 9)], (3, 7), &[(1, 2), (8, 9)]),
            (&[(1, 3)], (5, 6), &[(1, 3)]),
            (&[(1, 3), (5, 6), (8, 9)], (2, 8), &[(1, 1), (9, 9)]),
        ];
        for (start, (f, l), want) in cases {
            let mut s = set(start);
            s.remove(f, l);
            assert_eq!(s.iter().collect::<Vec<_>>(), want, "{start:?} - {f}..={l}");
        }
    }

    #[test]
    fn gaps_and_counts() {
        let s = set(&[(3, 4), (8, 10)]);
        assert_eq!(s.gaps(1, 12), vec![(1, 2), (5, 7), (11, 12)]);
        assert_eq!(s.gaps(3, 10), vec![(5, 7)]);
        assert_eq!(s.gaps(9, 9), vec![]);
        assert_eq!(s.count_within(1, 12), 5);
        assert_eq!(s.count_within(4, 8), 2);
    }

    proptest! {
        /// Against a plain set of numbers: the same members, always as disjoint, non-adjacent
        /// ranges, whatever the inserts and removals.
        #[test]
        fn behaves_as_a_set(ops in proptest::collection::vec((0u8..3, 0u64..200, 0u64..20), 1..60)) {
            let mut s = SeqRanges::default();
            let mut model = BTreeSet::new();
            for (op, at, len) in ops {
                let (first, last) = (at, at + len);
                match op {
                    0 => {
                        s.insert_range(first, last);
                        model.extend(first..=last);
                    }
                    1 => {
                        let swallowed = s.insert(at);
                        prop_assert_eq!(swallowed.is_some(), !model.contains(&at) && model.contains(&(at + 1)));
                        model.insert(at);
                    }
                    _ => {
                        s.remove(first, last);
                        model.retain(|v| *v < first || *v > last);
                    }
                }
                let members: BTreeSet<u64> = s.iter().flat_map(|(f, l)| f..=l).collect();
                prop_assert_eq!(&members, &model);
                let ranges: Vec<(u64, u64)> = s.iter().collect();
                prop_assert!(ranges.windows(2).all(|w| w[0].1 + 1 < w[1].0), "{:?}", ranges);
                prop_assert_eq!(s.count_within(50, 120), model.range(50..=120).count() as u64);
                let gaps: BTreeSet<u64> = s.gaps(50, 120).into_iter().flat_map(|(f, l)| f..=l).collect();
                let outside: BTreeSet<u64> = (50..=120).filter(|v| !model.contains(v)).collect();
                prop_assert_eq!(gaps, outside);
            }
        }
    }
}
