//! First in, first out, by bytes.

use super::CachePolicy;
use std::collections::{HashMap, VecDeque};

/// FIFO over byte sizes: hits change nothing; a miss admits the object and evicts the oldest
/// admissions until it fits.
#[derive(Debug, Clone)]
pub struct Fifo {
    capacity_bytes: u64,
    used_bytes: u64,
    entries: HashMap<u64, u64>,
    queue: VecDeque<u64>,
}

impl Fifo {
    /// An empty cache of `capacity_bytes`.
    pub fn new(capacity_bytes: u64) -> Self {
        Fifo {
            capacity_bytes,
            used_bytes: 0,
            entries: HashMap::new(),
            queue: VecDeque::new(),
        }
    }
}

impl CachePolicy for Fifo {
    fn name(&self) -> &'static str {
        "fifo"
    }

    fn request(&mut self, key: u64, bytes: u64) -> bool {
        if self.entries.contains_key(&key) {
            return true;
        }
        if bytes > self.capacity_bytes {
            return false;
        }
        while self.used_bytes + bytes > self.capacity_bytes {
            let Some(victim) = self.queue.pop_front() else {
                break;
            };
            if let Some(b) = self.entries.remove(&victim) {
                self.used_bytes -= b;
            }
        }
        self.entries.insert(key, bytes);
        self.queue.push_back(key);
        self.used_bytes += bytes;
        false
    }

    fn resident_bytes(&self) -> u64 {
        self.used_bytes
    }
}
