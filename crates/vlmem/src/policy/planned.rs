//! The weights plan: a pinned prefix plus a streamed rest with lookahead.

use super::{Access, CachePolicy};
use std::collections::{HashMap, HashSet};

/// Keeps the longest prefix of the access plan that fits beside a staging ring of the
/// `lookahead + 1` largest chunks resident (loaded on first use, never evicted); every other
/// chunk streams through the ring and is always a miss. For a cyclic plan this is within one
/// ring of OPT.
#[derive(Debug, Clone)]
pub struct PlannedStream {
    prefix: HashSet<u64>,
    prefix_bytes: u64,
    ring_bytes: u64,
    loaded: HashSet<u64>,
    sizes: HashMap<u64, u64>,
}

impl PlannedStream {
    /// The plan for `plan` (each object once, in order of use) in `capacity_bytes`.
    pub fn new(plan: &[Access], capacity_bytes: u64, lookahead: usize) -> Self {
        let mut sizes: Vec<u64> = plan.iter().map(|a| a.bytes).collect();
        sizes.sort_unstable_by(|a, b| b.cmp(a));
        let ring_bytes: u64 = sizes.iter().take(lookahead + 1).sum();
        let room = capacity_bytes.saturating_sub(ring_bytes);
        let mut prefix = HashSet::new();
        let mut prefix_bytes = 0;
        for a in plan {
            if prefix_bytes + a.bytes > room {
                break;
            }
            prefix_bytes += a.bytes;
            prefix.insert(a.key);
        }
        PlannedStream {
            prefix,
            prefix_bytes,
            ring_bytes,
            loaded: HashSet::new(),
            sizes: plan.iter().map(|a| (a.key, a.bytes)).collect(),
        }
    }

    /// Bytes of the pinned prefix.
    pub fn prefix_bytes(&self) -> u64 {
        self.prefix_bytes
    }

    /// Bytes of the staging ring.
    pub fn ring_bytes(&self) -> u64 {
        self.ring_bytes
    }

    /// Whether `key` is in the pinned prefix.
    pub fn is_pinned(&self, key: u64) -> bool {
        self.prefix.contains(&key)
    }
}

impl CachePolicy for PlannedStream {
    fn name(&self) -> &'static str {
        "planned"
    }

    fn request(&mut self, key: u64, _bytes: u64) -> bool {
        if self.prefix.contains(&key) {
            !self.loaded.insert(key)
        } else {
            false
        }
    }

    fn resident_bytes(&self) -> u64 {
        self.loaded
            .iter()
            .map(|k| self.sizes.get(k).copied().unwrap_or(0))
            .sum::<u64>()
            + self.ring_bytes
    }
}
