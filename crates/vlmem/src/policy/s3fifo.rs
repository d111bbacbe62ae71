//! S3-FIFO (Yang et al., "FIFO queues are all you need for cache eviction", SOSP'23), by
//! bytes: a small FIFO (10% of the capacity) filters one-hit wonders, a main FIFO with lazy
//! promotion (a 2-bit frequency per object, reinserted while non-zero) holds the rest, and a
//! ghost queue of recently filtered keys (bounded by the main queue's bytes) sends a returning
//! key straight to the main queue.

use super::CachePolicy;
use std::collections::{HashMap, VecDeque};
use std::hash::Hash;

/// Where an object lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Queue {
    Small,
    Main,
}

#[derive(Debug, Clone, Copy)]
struct Meta {
    bytes: u64,
    freq: u8,
    queue: Queue,
}

/// What [`S3Fifo::insert`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admission<K> {
    /// Whether the object is now resident (false only when it is larger than the capacity).
    pub admitted: bool,
    /// Objects evicted to make room, oldest first.
    pub evicted: Vec<K>,
}

/// S3-FIFO over byte sizes, generic over the key.
#[derive(Debug, Clone)]
pub struct S3Fifo<K: Hash + Eq + Copy = u64> {
    capacity_bytes: u64,
    small_capacity_bytes: u64,
    ghost_capacity_bytes: u64,
    small_bytes: u64,
    main_bytes: u64,
    ghost_bytes: u64,
    /// An object leaves the small queue for the main one when its frequency is at least this.
    move_threshold: u8,
    entries: HashMap<K, Meta>,
    small: VecDeque<K>,
    main: VecDeque<K>,
    ghost: VecDeque<(K, u64, u64)>,
    ghost_index: HashMap<K, u64>,
    ghost_generation: u64,
}

impl<K: Hash + Eq + Copy> S3Fifo<K> {
    /// An empty cache of `capacity_bytes` with a 10% small queue.
    pub fn new(capacity_bytes: u64) -> Self {
        Self::with_small_fraction(capacity_bytes, 0.1)
    }

    /// An empty cache whose small queue takes `small_fraction` of the bytes.
    pub fn with_small_fraction(capacity_bytes: u64, small_fraction: f64) -> Self {
        let small = ((capacity_bytes as f64) * small_fraction.clamp(0.0, 1.0)) as u64;
        S3Fifo {
            capacity_bytes,
            small_capacity_bytes: small,
            ghost_capacity_bytes: capacity_bytes - small,
            small_bytes: 0,
            main_bytes: 0,
            ghost_bytes: 0,
            move_threshold: 1,
            entries: HashMap::new(),
            small: VecDeque::new(),
            main: VecDeque::new(),
            ghost: VecDeque::new(),
            ghost_index: HashMap::new(),
            ghost_generation: 0,
        }
    }

    /// Sets the frequency at which an object leaves the small queue for the main one
    /// (default 1: used once more while in the small queue).
    pub fn with_move_threshold(mut self, threshold: u8) -> Self {
        self.move_threshold = threshold.clamp(1, 3);
        self
    }

    /// Sizes the ghost queue at `factor` times the main queue's bytes (default 1).
    pub fn with_ghost_factor(mut self, factor: f64) -> Self {
        let main = self.capacity_bytes - self.small_capacity_bytes;
        self.ghost_capacity_bytes = (main as f64 * factor.max(0.0)) as u64;
        self
    }

    /// The capacity.
    pub fn capacity_bytes(&self) -> u64 {
        self.capacity_bytes
    }

    /// Bytes resident (small + main), never above the capacity.
    pub fn used_bytes(&self) -> u64 {
        self.small_bytes + self.main_bytes
    }

    /// Objects resident.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is resident.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Whether `key` is resident (changes nothing).
    pub fn contains(&self, key: &K) -> bool {
        self.entries.contains_key(key)
    }

    /// Whether `key` is remembered by the ghost queue.
    pub fn in_ghost(&self, key: &K) -> bool {
        self.ghost_index.contains_key(key)
    }

    /// A hit: bumps the key's frequency (saturating at 3). False if it is not resident.
    pub fn touch(&mut self, key: &K) -> bool {
        match self.entries.get_mut(key) {
            Some(m) => {
                m.freq = (m.freq + 1).min(3);
                true
            }
            None => false,
        }
    }

    /// Admits a key that is not resident (a resident key is only touched), evicting others
    /// until it fits. A key the ghost queue remembers goes to the main queue, others to the
    /// small one. Objects larger than the capacity are not admitted.
    pub fn insert(&mut self, key: K, bytes: u64) -> Admission<K> {
        let mut evicted = Vec::new();
        if self.touch(&key) {
            return Admission {
                admitted: true,
                evicted,
            };
        }
        if bytes > self.capacity_bytes {
            return Admission {
                admitted: false,
                evicted,
            };
        }
        let to_main = self.ghost_index.remove(&key).is_some();
        while self.used_bytes() + bytes > self.capacity_bytes {
            match self.evict_one() {
                Some(k) => evicted.push(k),
                None => break,
            }
        }
        let queue = if to_main { Queue::Main } else { Queue::Small };
        self.entries.insert(
            key,
            Meta {
                bytes,
                freq: 0,
                queue,
            },
        );
        match queue {
            Queue::Small => {
                self.small.push_back(key);
                self.small_bytes += bytes;
            }
            Queue::Main => {
                self.main.push_back(key);
                self.main_bytes += bytes;
            }
        }
        Admission {
            admitted: true,
            evicted,
        }
    }

    /// Removes a resident key (not remembered by the ghost queue). Returns its bytes.
    pub fn remove(&mut self, key: &K) -> Option<u64> {
        let m = self.entries.remove(key)?;
        let q = match m.queue {
            Queue::Small => {
                self.small_bytes -= m.bytes;
                &mut self.small
            }
            Queue::Main => {
                self.main_bytes -= m.bytes;
                &mut self.main
            }
        };
        if let Some(i) = q.iter().position(|k| k == key) {
            q.remove(i);
        }
        Some(m.bytes)
    }

    fn evict_one(&mut self) -> Option<K> {
        if self.small.is_empty() && self.main.is_empty() {
            return None;
        }
        if !self.small.is_empty()
            && (self.small_bytes > self.small_capacity_bytes || self.main.is_empty())
            && let Some(k) = self.evict_small()
        {
            return Some(k);
        }
        self.evict_main()
    }

    /// Pops the small queue until one object leaves the cache (to the ghost queue); objects
    /// used while there move to the main queue instead. None if the small queue emptied.
    fn evict_small(&mut self) -> Option<K> {
        while let Some(k) = self.small.pop_front() {
            let Some(m) = self.entries.get_mut(&k) else {
                continue;
            };
            if m.freq >= self.move_threshold {
                m.queue = Queue::Main;
                m.freq = 0;
                let b = m.bytes;
                self.small_bytes -= b;
                self.main_bytes += b;
                self.main.push_back(k);
                continue;
            }
            let b = m.bytes;
            self.entries.remove(&k);
            self.small_bytes -= b;
            self.remember(k, b);
            return Some(k);
        }
        None
    }

    /// Pops the main queue, reinserting objects with a non-zero frequency (decremented), until
    /// one leaves.
    fn evict_main(&mut self) -> Option<K> {
        while let Some(k) = self.main.pop_front() {
            let Some(m) = self.entries.get_mut(&k) else {
                continue;
            };
            if m.freq > 0 {
                m.freq -= 1;
                self.main.push_back(k);
                continue;
            }
            let b = m.bytes;
            self.entries.remove(&k);
            self.main_bytes -= b;
            return Some(k);
        }
        None
    }

    fn remember(&mut self, key: K, bytes: u64) {
        self.ghost_generation += 1;
        let g = self.ghost_generation;
        if let Some(old) = self.ghost_index.insert(key, g) {
            // The older record stays in the queue and is skipped when it leaves.
            let _ = old;
        }
        self.ghost.push_back((key, g, bytes));
        self.ghost_bytes += bytes;
        while self.ghost_bytes > self.ghost_capacity_bytes {
            let Some((k, g, b)) = self.ghost.pop_front() else {
                break;
            };
            self.ghost_bytes -= b;
            if self.ghost_index.get(&k) == Some(&g) {
                self.ghost_index.remove(&k);
            }
        }
    }
}

impl CachePolicy for S3Fifo<u64> {
    fn name(&self) -> &'static str {
        "s3fifo"
    }

    fn request(&mut self, key: u64, bytes: u64) -> bool {
        if self.touch(&key) {
            return true;
        }
        self.insert(key, bytes);
        false
    }

    fn resident_bytes(&self) -> u64 {
        self.used_bytes()
    }
}
