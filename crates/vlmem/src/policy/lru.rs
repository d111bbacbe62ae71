//! Least recently used, by bytes.

use super::CachePolicy;
use std::collections::{BTreeMap, HashMap};

/// LRU over byte sizes: on a miss the object is admitted (if it fits the capacity at all)
/// and the least recently used objects are evicted until it fits.
#[derive(Debug, Clone)]
pub struct Lru {
    capacity_bytes: u64,
    used_bytes: u64,
    tick: u64,
    entries: HashMap<u64, (u64, u64)>,
    order: BTreeMap<u64, u64>,
}

impl Lru {
    /// An empty cache of `capacity_bytes`.
    pub fn new(capacity_bytes: u64) -> Self {
        Lru {
            capacity_bytes,
            used_bytes: 0,
            tick: 0,
            entries: HashMap::new(),
            order: BTreeMap::new(),
        }
    }

    /// Whether `key` is resident.
    pub fn contains(&self, key: u64) -> bool {
        self.entries.contains_key(&key)
    }

    /// Objects resident.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is resident.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

impl CachePolicy for Lru {
    fn name(&self) -> &'static str {
        "lru"
    }

    fn request(&mut self, key: u64, bytes: u64) -> bool {
        self.tick += 1;
        if let Some((_, t)) = self.entries.get_mut(&key) {
            self.order.remove(t);
            *t = self.tick;
            self.order.insert(self.tick, key);
            return true;
        }
        if bytes > self.capacity_bytes {
            return false;
        }
        while self.used_bytes + bytes > self.capacity_bytes {
            let Some((_, victim)) = self.order.pop_first() else {
                break;
            };
            if let Some((b, _)) = self.entries.remove(&victim) {
                self.used_bytes -= b;
            }
        }
        self.entries.insert(key, (bytes, self.tick));
        self.order.insert(self.tick, key);
        self.used_bytes += bytes;
        false
    }

    fn resident_bytes(&self) -> u64 {
        self.used_bytes
    }
}
