//! The count of blocks on the compute tier against the manager's placement: notes,
//! reconciliation and the invariant check.

use super::{KvPool, Tables};
#[cfg(doc)]
use crate::manager::MemoryManager;
use crate::manager::TensorHandle;
use std::collections::HashMap;

impl KvPool {
    /// Whether the manager has a copy of the block on the compute tier now (`None`: it
    /// could not say; the count stays as it was).
    pub(super) fn on_compute_tier(&self, handle: TensorHandle) -> Option<bool> {
        self.manager
            .residency(handle)
            .ok()
            .map(|(tiers, _)| tiers.contains(&self.config.compute_tier))
    }

    /// Records where a block is after the pool moved or pinned it: counted on the compute
    /// tier or not (`None`: unknown, the count stays). Clears its `leaving` mark and wakes
    /// the uses waiting for it.
    pub(super) fn note_placement(&self, block: u64, on_tier: Option<bool>, holder: Option<u64>) {
        let mut t = self.tables.lock();
        let Some(m) = t.blocks.get_mut(&block) else {
            return;
        };
        let was_leaving = std::mem::replace(&mut m.leaving, false);
        m.epoch += 1;
        if let Some(on_tier) = on_tier {
            Self::set_counted(&mut t, block, on_tier, holder);
        }
        drop(t);
        if was_leaving {
            self.swapped_for_room.notify_all();
        }
    }

    /// Counts a block on the compute tier or not (the one place the count changes after a
    /// block is made). A block not counted there marks every sequence holding it swapped,
    /// so its next use brings the block back (`holder`: the one holder, when the caller
    /// knows it and the block has no other).
    pub(super) fn set_counted(t: &mut Tables, block: u64, on_tier: bool, holder: Option<u64>) {
        let Some(m) = t.blocks.get_mut(&block) else {
            return;
        };
        m.epoch += 1;
        let was = std::mem::replace(&mut m.resident, on_tier);
        let refs = m.refs;
        match (was, on_tier) {
            (false, true) => t.resident_blocks += 1,
            (true, false) => t.resident_blocks -= 1,
            _ => {}
        }
        if on_tier {
            return;
        }
        match holder.filter(|_| refs <= 1) {
            Some(h) => {
                if let Some(s) = t.seqs.get_mut(&h) {
                    s.swapped = true;
                }
            }
            None => {
                for s in t.seqs.values_mut() {
                    if s.blocks.contains(&block) {
                        s.swapped = true;
                    }
                }
            }
        }
    }

    /// Follows moves the pool did not make (the manager's own evictions, a direct
    /// [`MemoryManager::evict`]): a block counted on the compute tier that the manager no
    /// longer has there stops being counted, and its holders are marked swapped (their
    /// next use brings it back). Only counted blocks are asked about; a block the pool
    /// noted again meanwhile keeps the newer note.
    pub(super) fn reconcile(&self) {
        let counted: Vec<(u64, TensorHandle, u64)> = {
            let t = self.tables.lock();
            t.blocks
                .iter()
                .filter(|(_, m)| m.resident && !m.leaving)
                .map(|(b, m)| (*b, m.handle, m.epoch))
                .collect()
        };
        let gone: Vec<(u64, u64)> = counted
            .into_iter()
            .filter(|(_, h, _)| self.on_compute_tier(*h) == Some(false))
            .map(|(b, _, epoch)| (b, epoch))
            .collect();
        if gone.is_empty() {
            return;
        }
        let mut t = self.tables.lock();
        for (b, epoch) in gone {
            if t.blocks
                .get(&b)
                .is_some_and(|m| m.epoch == epoch && m.resident && !m.leaving)
            {
                Self::set_counted(&mut t, b, false, None);
            }
        }
    }

    /// Checks the pool's invariants; `Err` names the first broken one. The count first
    /// follows the manager's placement (moves the pool did not make), then, exact while no
    /// call is in flight (tests and models call it between operations):
    /// - `resident_blocks` is the number of blocks counted on the compute tier, at most
    ///   [`KvPool::max_resident_blocks`];
    /// - a block's reference count is the number of sequences that hold it;
    /// - a sequence that is not swapped holds only blocks counted on the compute tier;
    /// - no block is marked as being moved down;
    /// - the prefix index points at live sealed blocks under their own hash, and every
    ///   live sealed block's hash is in it (an identical block filled independently is
    ///   kept to take the entry over);
    /// - the manager's placement agrees with the count both ways: a block counted on the
    ///   compute tier has a copy there, and a block not counted there has none.
    pub fn check(&self) -> std::result::Result<(), String> {
        self.reconcile();
        let all: Vec<(u64, TensorHandle, bool)> = {
            let t = self.tables.lock();
            let counted = t.blocks.values().filter(|m| m.resident).count() as u64;
            if counted != t.resident_blocks {
                return Err(format!(
                    "resident_blocks {} != {counted} blocks counted on the compute tier",
                    t.resident_blocks
                ));
            }
            if t.resident_blocks > self.max_resident_blocks {
                return Err(format!(
                    "{} blocks counted on the compute tier, room for {}",
                    t.resident_blocks, self.max_resident_blocks
                ));
            }
            let mut holders: HashMap<u64, u32> = HashMap::new();
            for (id, s) in &t.seqs {
                for b in &s.blocks {
                    *holders.entry(*b).or_insert(0) += 1;
                    let Some(m) = t.blocks.get(b) else {
                        return Err(format!("sequence {id} holds a freed block {b}"));
                    };
                    if !s.swapped && !m.resident {
                        return Err(format!(
                            "sequence {id} is not swapped but its block {b} is not counted on \
                             the compute tier"
                        ));
                    }
                }
            }
            for (b, m) in &t.blocks {
                let n = holders.get(b).copied().unwrap_or(0);
                if n != m.refs {
                    return Err(format!("block {b}: {} references, {n} holders", m.refs));
                }
                if m.leaving {
                    return Err(format!("block {b} is still marked as leaving"));
                }
                if let Some(h) = m.sealed {
                    let indexed = t.prefix.get(&h) == Some(b)
                        || (t.prefix.contains_key(&h)
                            && t.dupes.get(&h).is_some_and(|v| v.contains(b)));
                    if !indexed {
                        return Err(format!(
                            "block {b} is sealed under {h:x} but not reachable from the index"
                        ));
                    }
                }
            }
            for (h, b) in &t.prefix {
                if t.blocks.get(b).and_then(|m| m.sealed) != Some(*h) {
                    return Err(format!(
                        "prefix entry {h:x} points at block {b}, not sealed so"
                    ));
                }
            }
            for (h, v) in &t.dupes {
                for b in v {
                    if t.blocks.get(b).and_then(|m| m.sealed) != Some(*h)
                        || t.prefix.get(h) == Some(b)
                    {
                        return Err(format!(
                            "identical block {b} kept under {h:x} is not a second live block \
                             sealed so"
                        ));
                    }
                }
            }
            t.blocks
                .iter()
                .map(|(b, m)| (*b, m.handle, m.resident))
                .collect()
        };
        let tier = self.config.compute_tier;
        for (b, h, counted) in all {
            let (tiers, _) = self.manager.residency(h).map_err(|e| e.to_string())?;
            match (counted, tiers.contains(&tier)) {
                (true, false) => {
                    return Err(format!(
                        "block {b} is counted on {tier} but not there (on {tiers:?})"
                    ));
                }
                (false, true) => {
                    return Err(format!("block {b} is on {tier} but not counted there"));
                }
                _ => {}
            }
        }
        Ok(())
    }
}
