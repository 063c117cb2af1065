//! zstd dictionaries registered by devices, by (device, dictionary id): in memory, bounded.
//!
//! Invariant: a batch compressed with a dictionary is decoded with exactly the bytes its
//! device registered under the id its zstd frame names, never another device's. A replica
//! that does not have it (restarted, or never asked) answers 428 and the device registers it
//! again, so replicas stay stateless: nothing here needs to survive a restart.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};

/// (device id, dictionary id).
type Key = (String, u32);

/// The registered dictionaries of one replica, at most `max_bytes` of them: past it, the
/// oldest registrations are forgotten (their devices get a 428 and register again).
pub struct Dictionaries {
    max_bytes: usize,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    by_key: HashMap<Key, Arc<[u8]>>,
    order: VecDeque<Key>,
    bytes: usize,
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
        if let Some(old) = inner.by_key.remove(&key) {
            inner.bytes -= old.len();
            inner.order.retain(|k| k != &key);
        }
        while inner.bytes + dictionary.len() > self.max_bytes {
            let Some(oldest) = inner.order.pop_front() else {
                break;
            };
            if let Some(old) = inner.by_key.remove(&oldest) {
                inner.bytes -= old.len();
            }
        }
        inner.bytes += dictionary.len();
        inner.order.push_back(key.clone());
        inner.by_key.insert(key, dictionary.into());
    }

    /// The dictionary `device` registered under `id`, if this replica has it.
    pub fn get(&self, device: &str, id: u32) -> Option<Arc<[u8]>> {
        let inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        inner.by_key.get(&(device.to_owned(), id)).cloned()
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
            "the oldest went to stay under 10 bytes"
        );
        assert!(d.get("b", 1).is_some() && d.get("a", 2).is_some());
        d.insert("b", 1, b"abcdefg");
        assert!(d.get("a", 2).is_none() && d.get("b", 1).is_some());
    }
}
