//! Belady's OPT (MIN): evict the object whose next use is farthest in the future.
//!
//! [`Belady::new`] is OPT with bypass: a missed object whose next use is later than every candidate victim's is not
//! admitted at all. For unit sizes this is exactly optimal. For variable sizes exact OPT is
//! NP-hard; this is the standard farthest-next-use heuristic: evict from the farthest next use
//! down until the object fits, unless one of those victims is used before the object is, in
//! which case the object bypasses the cache.
//!
//! [`Belady::demand_paging`] is Belady's MIN as defined for paging: every object must enter
//! the cache to be used (a weight must be on the device to be computed on), so a miss always
//! admits it, evicting the farthest next uses. On a cyclic scan of `n` equal objects through
//! `k` slots it keeps `k - 1` and cycles one slot: `k - 1` hits per cycle (with bypass, `k`).

use super::{Access, HitStats};
use std::collections::{BTreeSet, HashMap};

/// No further use.
const NEVER: usize = usize::MAX;

/// OPT over a known trace.
#[derive(Debug, Clone)]
pub struct Belady<'a> {
    trace: &'a [Access],
    capacity_bytes: u64,
    next_use: Vec<usize>,
    bypass: bool,
}

impl<'a> Belady<'a> {
    /// Prepares OPT for `trace` with a cache of `capacity_bytes` (one backward pass).
    pub fn new(trace: &'a [Access], capacity_bytes: u64) -> Self {
        let mut next_use = vec![NEVER; trace.len()];
        let mut seen: HashMap<u64, usize> = HashMap::new();
        for (i, a) in trace.iter().enumerate().rev() {
            if let Some(&j) = seen.get(&a.key) {
                next_use[i] = j;
            }
            seen.insert(a.key, i);
        }
        Belady {
            trace,
            capacity_bytes,
            next_use,
            bypass: true,
        }
    }

    /// MIN without bypass: every missed object is admitted (if it fits the capacity at all).
    pub fn demand_paging(mut self) -> Self {
        self.bypass = false;
        self
    }

    /// Runs the trace; every request counts.
    pub fn run(&self) -> HitStats {
        let mut stats = HitStats::default();
        let mut resident: HashMap<u64, (u64, usize)> = HashMap::new();
        let mut by_next: BTreeSet<(usize, u64)> = BTreeSet::new();
        let mut used = 0u64;
        for (i, a) in self.trace.iter().enumerate() {
            let next = self.next_use[i];
            if let Some((_, n)) = resident.get_mut(&a.key) {
                by_next.remove(&(*n, a.key));
                *n = next;
                by_next.insert((next, a.key));
                stats.record(true, a.bytes);
                continue;
            }
            stats.record(false, a.bytes);
            if a.bytes > self.capacity_bytes || (self.bypass && next == NEVER) {
                continue;
            }
            // Victims from the farthest next use down until the object fits.
            let need = (used + a.bytes).saturating_sub(self.capacity_bytes);
            let mut victims = Vec::new();
            let mut freed = 0u64;
            let mut bypass = false;
            for &(n, k) in by_next.iter().rev() {
                if freed >= need {
                    break;
                }
                if self.bypass && n < next {
                    bypass = true;
                    break;
                }
                victims.push((n, k));
                freed += resident[&k].0;
            }
            if bypass || freed < need {
                continue;
            }
            for (n, k) in victims {
                by_next.remove(&(n, k));
                if let Some((b, _)) = resident.remove(&k) {
                    used -= b;
                }
            }
            resident.insert(a.key, (a.bytes, next));
            by_next.insert((next, a.key));
            used += a.bytes;
        }
        stats
    }
}
