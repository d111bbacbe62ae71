//! Eviction: the access plan, victim order, and eviction passes.

use super::waits::Waits;
use super::{Inner, MemoryManager, TensorHandle};
use crate::error::{ManagerError, Result};
use std::collections::HashMap;
use vlmem_core::sync::atomic::Ordering;
use vlmem_core::{TensorKind, Tier};

/// Where weights are used next: a cyclic access order (layer order), for the weights policy.
#[derive(Debug, Default)]
pub(super) struct AccessPlan {
    position: HashMap<(u32, u32), usize>,
    len: usize,
}

/// Victims in a row an eviction pass tries after the tier below refused them for want of
/// room, before it takes the tier below as full.
const MAX_REFUSED_BELOW: u32 = 4;

/// What one eviction pass did.
pub(super) struct Eviction {
    /// Bytes freed on the tier.
    pub(super) freed: u64,
    /// Candidates skipped because their tensors were moving.
    pub(super) moving: u64,
    /// A demotion failed (the tier below fails, or is full of pinned data).
    pub(super) failed: bool,
    /// Bytes of the kind's copies on the tier that stay: by rule (pinned, last copies on the
    /// disk, this call's own moves) or because the tier below refused them now.
    pub(super) settled_bytes: u64,
}

impl MemoryManager {
    /// The order in which weights are used, cyclically (layer order). Under pressure the
    /// weights policy then evicts the weight whose next use is farthest (Belady's choice for
    /// a known order) instead of the least recently used one.
    /// A new plan starts with its cursor at its first weight.
    pub fn set_access_plan(&self, order: &[TensorHandle]) {
        let mut plan = self.inner.plan.write();
        plan.position = order
            .iter()
            .enumerate()
            .map(|(i, h)| ((h.slot, h.generation), i))
            .collect();
        plan.len = order.len();
        self.inner.plan_cursor.store(0, Ordering::Relaxed);
    }

    /// Demotes unpinned tensors from `tier` until `bytes` are free or nothing more can go.
    /// Returns the bytes freed.
    pub fn evict(&self, tier: Tier, bytes: u64) -> Result<u64> {
        let waits = self.inner.waits();
        let mut freed = 0;
        for kind in TensorKind::ALL {
            if freed >= bytes {
                break;
            }
            freed += self.inner.evict_kind(tier, kind, bytes - freed, &waits)?;
        }
        Ok(freed)
    }

    /// Demotes one tensor's copy on `tier` (written back one tier down when it is the only
    /// copy), as a swap-out chosen by the caller rather than by the eviction policy. Returns
    /// the bytes freed on `tier`: 0 when the tensor has no copy there, is pinned or moving,
    /// its last copy is on the disk, or the copy is a checkpoint extent (the file itself
    /// stays the tensor's disk copy, whatever else is swapped out).
    pub fn swap_out(&self, handle: TensorHandle, tier: Tier) -> Result<u64> {
        let waits = self.inner.waits();
        self.inner.demote(handle, tier, &waits)
    }
}

impl Inner {
    /// Records a use of a planned weight: the cursor of the cyclic access plan.
    pub(super) fn note_plan_use(&self, h: TensorHandle) {
        let plan = self.plan.read();
        if let Some(&pos) = plan.position.get(&(h.slot, h.generation)) {
            self.plan_cursor.store(pos as u64, Ordering::Relaxed);
        }
    }

    /// Eviction order of `kind`'s unpinned tensors on `tier`: weights with an access plan by
    /// farthest next use (Belady's choice for a known cyclic order), everything else least
    /// recently used first.
    /// Also returns how many of the kind's copies on the tier belong to entries that are
    /// moving right now (they may become evictable in a moment), and the bytes of its copies
    /// there that stay by rule (pinned, or a last copy on the disk).
    fn victims(
        &self,
        tier: Tier,
        kind: TensorKind,
        waits: &Waits,
    ) -> (Vec<(TensorHandle, u64)>, u64, u64) {
        let mut found: Vec<(TensorHandle, u64, u64)> = Vec::new();
        let mut moving = 0u64;
        let mut settled_bytes = 0u64;
        let n = self.shards.len();
        for (si, shard) in self.shards.iter().enumerate() {
            let st = shard.state.lock();
            for (local, slot) in st.slots.iter().enumerate() {
                let Some(e) = slot.entry.as_ref() else {
                    continue;
                };
                if e.kind != kind {
                    continue;
                }
                let Some(c) = e.copies[tier.index()] else {
                    continue;
                };
                let h = TensorHandle {
                    manager_id: self.id,
                    slot: (local * n + si) as u32,
                    generation: slot.generation,
                };
                // The disk keeps a tensor's last copy; in-place extents cost nothing to keep.
                let last_on_disk = tier == Tier::Disk && !e.has_other_copy(tier);
                if e.busy && !c.res.is_in_place() {
                    // This call's own move, or a last copy on the disk, is not in flight for
                    // this reservation: it will not be evictable in a moment.
                    if waits.is_own(h) || last_on_disk {
                        settled_bytes += e.len_bytes;
                    } else {
                        moving += 1;
                    }
                    continue;
                }
                if e.busy {
                    continue;
                }
                if c.res.is_in_place() {
                    continue;
                }
                if c.pins > 0 || last_on_disk {
                    settled_bytes += e.len_bytes;
                    continue;
                }
                found.push((h, e.last_use, e.len_bytes));
            }
        }
        let plan = self.plan.read();
        if kind == TensorKind::Weight && plan.len > 0 {
            let len = plan.len;
            // The cursor may come from an older, longer plan (a new plan resets it, but a
            // use of the old one can race that): reduce it to this plan first.
            let cursor = self.plan_cursor.load(Ordering::Relaxed) as usize % len;
            // Distance to next use; unplanned weights go first.
            let dist = |h: &TensorHandle| match plan.position.get(&(h.slot, h.generation)) {
                Some(&p) => (p % len + len - cursor - 1) % len,
                None => usize::MAX,
            };
            found.sort_by_key(|(h, _, _)| std::cmp::Reverse(dist(h)));
        } else {
            found.sort_by_key(|&(_, last_use, _)| last_use);
        }
        let order = found.into_iter().map(|(h, _, len)| (h, len)).collect();
        (order, moving, settled_bytes)
    }

    /// Demotes `kind`'s tensors from `tier` until `bytes` are freed; returns bytes freed.
    fn evict_kind(&self, tier: Tier, kind: TensorKind, bytes: u64, waits: &Waits) -> Result<u64> {
        Ok(self.evict_kind_counting(tier, kind, bytes, waits)?.freed)
    }

    /// [`Self::evict_kind`], also returning how many candidates were moving (skipped) and
    /// whether a demotion failed (the tier below is failing or full of pinned data).
    pub(super) fn evict_kind_counting(
        &self,
        tier: Tier,
        kind: TensorKind,
        bytes: u64,
        waits: &Waits,
    ) -> Result<Eviction> {
        let mut freed = 0;
        let mut failed = false;
        let mut refused_below = 0u32;
        let (victims, moving, mut settled_bytes) = self.victims(tier, kind, waits);
        for (h, len_bytes) in victims {
            if freed >= bytes {
                break;
            }
            match self.demote(h, tier, waits) {
                Ok(n) => {
                    freed += n;
                    refused_below = 0;
                }
                // A victim that went away keeps nothing to free; try others.
                Err(ManagerError::Stale { .. }) => {}
                // A victim the tier below cannot take (too large for it, or no room for its
                // size there now): others, smaller, may fit. A few such refusals in a row
                // mean the tier below is full.
                // Such a victim stays where it is: settled for this reservation.
                Err(ManagerError::TooLarge { .. }) => settled_bytes += len_bytes,
                Err(ManagerError::OutOfMemory { .. }) if refused_below < MAX_REFUSED_BELOW => {
                    refused_below += 1;
                    settled_bytes += len_bytes;
                }
                Err(e) => {
                    tracing::warn!(%tier, error = %e, "demotion failed; data stays in place");
                    self.counters
                        .demote_failures
                        .fetch_add(1, Ordering::Relaxed);
                    // The tier below is failing (I/O error, or full of pinned data): other
                    // victims would fail the same way, and trying them all from nested
                    // evictions multiplies the failing I/O. Stop here.
                    failed = true;
                    break;
                }
            }
        }
        Ok(Eviction {
            freed,
            moving,
            failed,
            settled_bytes,
        })
    }
}
