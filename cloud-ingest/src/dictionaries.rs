//! zstd dictionaries registered by devices, by (device, dictionary id): in memory, bounded.
//!
//! Invariant: a batch compressed with a dictionary is decoded with exactly the bytes its
//! device registered under the id its zstd frame names, never another device's. A replica
//! that does not have it (restarted, or never asked) answers 428 and the device registers it
//! again, so replicas stay stateless: nothing here needs to survive a restart.
//!
//! Bounded per device too: a device holds at most [`PER_DEVICE`] dictionaries (its own least
//! recently used goes first), so one device cannot push out everyone else's; past the total
//! the least recently used of all go.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

/// (device id, dictionary id).
type Key = (String, u32);

/// Most dictionaries one device holds on a replica (the agent uses one per stream).
pub const PER_DEVICE: usize = 16;

/// The registered dictionaries of one replica, at most `max_bytes` of them: past it, the
/// least recently used are forgotten (their devices get a 428 and register again).
pub struct Dictionaries {
    max_bytes: usize,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    by_key: HashMap<Key, Entry>,
    /// Dictionaries held per device.
    per_device: HashMap<String, usize>,
    bytes: usize,
    tick: u64,
}

struct Entry {
    bytes: Arc<[u8]>,
    last_used: u64,
}

impl Inner {
    fn remove(&mut self, key: &Key) {
        if let Some(old) = self.by_key.remove(key) {
            self.bytes -= old.bytes.len();
            if let Some(n) = self.per_device.get_mut(&key.0) {
                *n -= 1;
                if *n == 0 {
                    self.per_device.remove(&key.0);
                }
            }
        }
    }

    /// The least recently used key, of `device` only if given.
    fn least_recent(&self, device: Option<&str>) -> Option<Key> {
        self.by_key
            .iter()
            .filter(|(k, _)| device.is_none_or(|d| k.0 == d))
            .min_by_key(|(_, e)| e.last_used)
            .map(|(k, _)| k.clone())
    }
}

impl Dictionaries {
    /// Holds at most `max_bytes` of dictionaries.
    pub fn new(max_bytes: usize) -> Dictionaries {
        Dictionaries {
            max_bytes,
            inner: Mutex::new(Inner::default()),
        }
    }

    /// Registers `dictionary` of `device` under `id` (again: replaces it).
    pub fn insert(&self, device: &str, id: u32, dictionary: &[u8]) {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let key = (device.to_owned(), id);
        inner.remove(&key);
        while inner.per_device.get(device).copied().unwrap_or(0) >= PER_DEVICE {
            let Some(own) = inner.least_recent(Some(device)) else {
                break;
            };
            inner.remove(&own);
        }
        while inner.bytes + dictionary.len() > self.max_bytes {
            let Some(oldest) = inner.least_recent(None) else {
                break;
            };
            inner.remove(&oldest);
        }
        inner.tick += 1;
        let last_used = inner.tick;
        inner.bytes += dictionary.len();
        *inner.per_device.entry(device.to_owned()).or_default() += 1;
        inner.by_key.insert(
            key,
            Entry {
                bytes: dictionary.into(),
                last_used,
            },
        );
    }

    /// The dictionary `device` registered under `id`, if this replica has it.
    pub fn get(&self, device: &str, id: u32) -> Option<Arc<[u8]>> {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        inner.tick += 1;
        let tick = inner.tick;
        let entry = inner.by_key.get_mut(&(device.to_owned(), id))?;
        entry.last_used = tick;
        Some(entry.bytes.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_device_and_bounded() {
        let d = Dictionaries::new(10);
        d.insert("a", 1, b"1234");
        d.insert("b", 1, b"abcd");
        assert_eq!(d.get("a", 1).as_deref(), Some(&b"1234"[..]));
        assert_eq!(d.get("b", 1).as_deref(), Some(&b"abcd"[..]));
        assert!(d.get("a", 2).is_none(), "another id");
        assert!(d.get("c", 1).is_none(), "another device's id is not shared");
        d.insert("a", 2, b"wxyz");
        assert!(
            d.get("a", 1).is_none(),
            "the least recently used went to stay under 10 bytes"
        );
        assert!(d.get("b", 1).is_some() && d.get("a", 2).is_some());
        d.insert("b", 1, b"abcdefg");
        assert!(d.get("a", 2).is_none() && d.get("b", 1).is_some());
    }

    #[test]
    fn one_device_cannot_push_out_the_others() {
        let d = Dictionaries::new(1 << 20);
        d.insert("quiet", 1, b"q");
        for id in 1..=1_000 {
            d.insert("noisy", id, b"n");
        }
        assert!(
            d.get("quiet", 1).is_some(),
            "another device's dictionary stays"
        );
        let held = (1..=1_000)
            .filter(|&id| d.get("noisy", id).is_some())
            .count();
        assert_eq!(held, PER_DEVICE);
        assert!(d.get("noisy", 1_000).is_some(), "its newest are kept");
    }

    #[test]
    fn a_dictionary_in_use_outlives_idle_ones() {
        let d = Dictionaries::new(8);
        d.insert("a", 1, b"1234");
        d.insert("b", 1, b"abcd");
        assert!(d.get("a", 1).is_some(), "a uses its dictionary");
        d.insert("c", 1, b"wxyz");
        assert!(d.get("a", 1).is_some() && d.get("b", 1).is_none());
    }
}
