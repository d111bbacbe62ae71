//! Reservations: budget charging, room made by eviction, and blocks given back.

use super::waits::Waits;
use super::{Inner, MemoryManager};
use crate::error::{ManagerError, Result};
use vlmem_core::sync::atomic::Ordering;
use vlmem_core::{TensorKind, Tier};
use vlmem_tier::{Reservation, TierError};

/// Eviction rounds a reservation still makes once its call's waiting is spent, while they
/// free room (the call's own work, not a wait; bounded, since other threads may take the
/// room each time).
const MAX_ROUNDS_AFTER_SPENT: u32 = 64;

impl MemoryManager {
    /// Sets the byte budget of `kind` on `tier`. Lowering it below what is in use takes
    /// effect as tensors leave.
    pub fn set_budget(&self, tier: Tier, kind: TensorKind, bytes: u64) {
        self.inner.budgets.write().bytes[tier.index()][kind.index()] = bytes;
    }
}

impl Inner {
    /// Overwrites a whole reservation with zeros, in pieces of whole I/O units of the tier
    /// (the disk's integrity unit), at least 64 KiB, so every piece is a write the tier
    /// accepts.
    pub(super) fn write_zeros(&self, tier: Tier, res: &Reservation) -> Result<()> {
        static ZEROS: [u8; 64 << 10] = [0; 64 << 10];
        let backend = &self.tiers[tier.index()];
        let unit = backend.io_unit_bytes().max(1);
        let piece_bytes = (ZEROS.len() as u64).div_ceil(unit).saturating_mul(unit);
        let big;
        let zeros: &[u8] = if piece_bytes as usize <= ZEROS.len() {
            &ZEROS[..piece_bytes as usize]
        } else {
            big = vec![0u8; piece_bytes.min(res.len_bytes()) as usize];
            &big
        };
        let mut done = 0u64;
        while done < res.len_bytes() {
            let n = (res.len_bytes() - done).min(zeros.len() as u64);
            backend.write(res, done, &zeros[..n as usize])?;
            done += n;
        }
        Ok(())
    }

    /// Charges `bytes` to the budget of `kind` on `tier`; false if it would exceed it.
    fn charge(&self, tier: Tier, kind: TensorKind, bytes: u64) -> bool {
        let budget = self.budgets.read().get(tier, kind);
        self.used[tier.index()][kind.index()]
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(bytes).filter(|&n| n <= budget)
            })
            .is_ok()
    }

    fn uncharge(&self, tier: Tier, kind: TensorKind, bytes: u64) {
        self.used[tier.index()][kind.index()].fetch_sub(bytes, Ordering::AcqRel);
    }

    /// Gives a copy's space back (extents cost no budget: they live in the checkpoint file).
    pub(super) fn release(&self, tier: Tier, kind: TensorKind, res: Reservation) {
        if !res.is_in_place() {
            self.uncharge(tier, kind, res.len_bytes());
        }
        self.free_block(tier, res);
    }

    /// Returns a reservation to its tier's arena, zeroing it first when so configured
    /// ([`Inner::write_zeros`]). A block that cannot be zeroed is not freed (it stays
    /// reserved, so its bytes cannot reach a new owner).
    pub(super) fn free_block(&self, tier: Tier, res: Reservation) {
        let backend = &self.tiers[tier.index()];
        if self.zero_on_free
            && !res.is_in_place()
            && let Err(e) = self.write_zeros(tier, &res)
        {
            tracing::warn!(%tier, error = %e, "zeroing a freed block failed; it stays reserved");
            return;
        }
        if let Err(e) = backend.release(res) {
            tracing::warn!(%tier, error = %e, "release failed; the space stays reserved");
        }
    }

    /// Reserves `bytes` of `kind` on `tier`, demoting unpinned tensors of that kind when its
    /// budget or the arena is full. No lock is held on entry or exit.
    /// Waits for tensors being moved come out of the call's budget (`waits`), shared with
    /// every reservation nested in this one: once it is spent, this and every enclosing
    /// reservation that still finds no room ends in `OutOfMemory` at once.
    pub(super) fn reserve_on(
        &self,
        tier: Tier,
        kind: TensorKind,
        bytes: u64,
        id: u64,
        waits: &Waits,
    ) -> Result<Reservation> {
        let budget = self.budgets.read().get(tier, kind);
        let mut arena_bytes = self.tiers[tier.index()].capacity_bytes();
        // Only a KV block of exactly the slab's block size can take the slab region; every
        // other request has the rest of the arena.
        let slab_block = kind == TensorKind::KvCache && Some(bytes) == self.kv_block_bytes;
        if !slab_block {
            arena_bytes = arena_bytes.saturating_sub(self.kv_slab_bytes[tier.index()]);
        }
        let limit = budget.min(arena_bytes);
        if bytes > limit {
            return Err(ManagerError::TooLarge {
                tier,
                kind,
                requested_bytes: bytes,
                budget_bytes: limit,
            });
        }
        let mut waited = false;
        let mut rounds_after_spent = 0u32;
        loop {
            if self.charge(tier, kind, bytes) {
                match self.tiers[tier.index()].reserve(bytes, &format!("tensor {id}")) {
                    Ok(res) => return Ok(res),
                    Err(TierError::Alloc { .. }) => self.uncharge(tier, kind, bytes),
                    Err(e) => {
                        self.uncharge(tier, kind, bytes);
                        return Err(e.into());
                    }
                }
            }
            let used_before = self.used[tier.index()][kind.index()].load(Ordering::Acquire);
            // Not enough room: demote the kind's unpinned tensors from this tier. When the
            // only candidates are moving (another thread is bringing them up, writing them
            // back or compacting them), wait a little for them rather than fail at once; the
            // wait comes out of the call's budget, so two threads waiting on each other's
            // moves end in OutOfMemory, never in a hang. The call's own evictions are not
            // waits: they go on while they free room, also once the budget is spent, but
            // then for at most MAX_ROUNDS_AFTER_SPENT rounds (other threads could take the
            // room each time).
            if waits.spent() {
                rounds_after_spent += 1;
            }
            if rounds_after_spent > MAX_ROUNDS_AFTER_SPENT {
                return Err(self.out_of_memory(tier, kind, bytes, budget));
            }
            let ev = self.evict_kind_counting(tier, kind, bytes, waits)?;
            if ev.freed == 0 {
                // Nothing could go now. Unless everything charged to the kind here stays by
                // rule (pinned, or last copies on the disk), or the tier below fails, some of
                // it is in flight: being moved, reserved by another call and not yet in the
                // table, or under a plain read. It will be evictable in a moment: wait for
                // it, out of the call's budget.
                let used = self.used[tier.index()][kind.index()].load(Ordering::Acquire);
                if used < used_before {
                    // Others gave bytes back meanwhile: try again before judging.
                    continue;
                }
                let in_flight = ev.moving > 0 || used > ev.settled_bytes;
                if in_flight && !ev.failed && waits.pause() {
                    if !waited {
                        self.counters.oom_waits.fetch_add(1, Ordering::Relaxed);
                        waited = true;
                    }
                    continue;
                }
                return Err(self.out_of_memory(tier, kind, bytes, budget));
            }
        }
    }

    /// The out-of-memory error of a reservation of `bytes` of `kind` on `tier`, with its
    /// numbers now.
    fn out_of_memory(&self, tier: Tier, kind: TensorKind, bytes: u64, budget: u64) -> ManagerError {
        let used = self.used[tier.index()][kind.index()].load(Ordering::Acquire);
        ManagerError::OutOfMemory {
            tier,
            kind,
            requested_bytes: bytes,
            free_bytes: budget.saturating_sub(used),
            pinned_bytes: self.pinned_bytes(tier, kind),
        }
    }

    fn pinned_bytes(&self, tier: Tier, kind: TensorKind) -> u64 {
        let mut total = 0;
        for shard in self.shards.iter() {
            let st = shard.state.lock();
            for e in st.slots.iter().filter_map(|s| s.entry.as_ref()) {
                if e.kind == kind
                    && let Some(c) = e.copies[tier.index()]
                    && c.pins > 0
                {
                    total += e.len_bytes;
                }
            }
        }
        total
    }
}
