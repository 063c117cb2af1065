//! Deduplication: which sequence numbers of an idempotency scope are already in the log.
//!
//! The scope is (device, stream, epoch); within it a sequence number names one record. The
//! embedded log keeps its sets in its own file, in the transaction that appends the records.
//! The Kafka and NATS sinks are stateless: each replica remembers, in [`SeenCache`], what it
//! appended itself, and holds a scope's lock for the whole append, so two requests carrying
//! the same records (a retry racing its original) never both append them, and records of a
//! scope reach the log in request order.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::{Mutex, OwnedMutexGuard};

/// (device, stream, epoch): within it, a sequence number identifies one record.
pub type DedupScope = (String, String, u64);

/// The set of sequence numbers both sides keep (the contract crate's).
pub use ingest_wire::SeqRanges as RangeSet;

/// In-memory dedup sets of one replica, bounded to `capacity` scopes: past it, the scopes used
/// least recently (and not in use) are forgotten. A forgotten scope's retries are appended
/// again, which is why consumers of a stateless sink can also deduplicate by the record's
/// idempotency key (its headers).
pub struct SeenCache {
    scopes: std::sync::Mutex<HashMap<DedupScope, CacheEntry>>,
    capacity: usize,
    tick: AtomicU64,
}

struct CacheEntry {
    set: Arc<Mutex<RangeSet>>,
    last_used: u64,
}

impl SeenCache {
    /// An empty cache remembering at most `capacity` scopes.
    pub fn new(capacity: usize) -> SeenCache {
        SeenCache {
            scopes: std::sync::Mutex::new(HashMap::new()),
            capacity: capacity.max(1),
            tick: AtomicU64::new(0),
        }
    }

    /// Locks `scope`'s set until the guard is dropped; waits while another request holds it.
    pub async fn lock(&self, scope: DedupScope) -> OwnedMutexGuard<RangeSet> {
        let set = {
            let tick = self.tick.fetch_add(1, Ordering::Relaxed);
            let mut scopes = self.scopes.lock().unwrap_or_else(|p| p.into_inner());
            let set = scopes
                .entry(scope)
                .and_modify(|e| e.last_used = tick)
                .or_insert_with(|| CacheEntry {
                    set: Arc::default(),
                    last_used: tick,
                })
                .set
                .clone();
            if scopes.len() > self.capacity {
                forget_oldest(&mut scopes, self.capacity * 3 / 4);
            }
            set
        };
        set.lock_owned().await
    }

    /// Scopes remembered now.
    pub fn len(&self) -> usize {
        self.scopes.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Whether no scope is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Drops the least recently used scopes nobody holds until at most `keep` remain.
fn forget_oldest(scopes: &mut HashMap<DedupScope, CacheEntry>, keep: usize) {
    let mut idle: Vec<(u64, DedupScope)> = scopes
        .iter()
        .filter(|(_, e)| Arc::strong_count(&e.set) == 1)
        .map(|(k, e)| (e.last_used, k.clone()))
        .collect();
    idle.sort_unstable();
    let excess = scopes.len().saturating_sub(keep);
    for (_, key) in idle.into_iter().take(excess) {
        scopes.remove(&key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_scope_is_held_by_one_request_at_a_time() {
        let cache = Arc::new(SeenCache::new(10));
        let scope = || ("d".to_owned(), "s".to_owned(), 1);
        let mut first = cache.lock(scope()).await;
        first.insert(1);
        let waiter = {
            let cache = cache.clone();
            tokio::spawn(async move { cache.lock(scope()).await.contains(1) })
        };
        tokio::task::yield_now().await;
        assert!(
            !waiter.is_finished(),
            "the second request waits for the first"
        );
        drop(first);
        assert!(
            waiter.await.expect("join"),
            "and then sees what it appended"
        );
    }

    #[tokio::test]
    async fn past_capacity_the_least_recently_used_idle_scopes_are_forgotten() {
        let cache = SeenCache::new(4);
        let scope = |i: u64| ("d".to_owned(), "s".to_owned(), i);
        let held = cache.lock(scope(0)).await;
        for i in 1..=4 {
            cache.lock(scope(i)).await.insert(7);
        }
        assert_eq!(cache.len(), 3, "5 scopes > 4: trimmed to 3");
        drop(held);
        assert!(
            !cache.lock(scope(1)).await.contains(7),
            "the oldest idle scope was forgotten"
        );
        assert!(
            cache.lock(scope(4)).await.contains(7),
            "the newest was kept"
        );
    }
}
