//! Compaction under load: live copies slide into lower free space.

use super::claims::BusyClaim;
use super::{Inner, MemoryManager, TensorHandle};
use crate::error::{ManagerError, Result};
use std::time::Instant;
use vlmem_core::Tier;
use vlmem_core::sync::atomic::Ordering;
use vlmem_tier::{Reservation, TierBackend, TierError};

/// What one compaction pass did on one tier.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CompactionReport {
    /// The tier compacted.
    pub tier: Tier,
    /// Arena usage before the pass.
    pub before: vlmem_core::ArenaUsage,
    /// Arena usage after it (other threads may have allocated meanwhile).
    pub after: vlmem_core::ArenaUsage,
    /// Copies considered.
    pub candidates: u64,
    /// Copies relocated to a lower block.
    pub moved: u64,
    /// Bytes those relocations copied.
    pub bytes_moved: u64,
    /// Copies left in place because they were pinned or moving.
    pub skipped: u64,
    /// Relocations whose read-back did not match (the tensor kept its old block).
    pub verify_failures: u64,
    /// Wall time of the pass.
    pub elapsed: std::time::Duration,
}

/// External fragmentation of an arena: 1 - largest free run / free bytes (0 when nothing
/// or everything is free in one run).
pub fn fragmentation(usage: &vlmem_core::ArenaUsage) -> f64 {
    if usage.free_bytes == 0 {
        0.0
    } else {
        1.0 - usage.largest_free_bytes as f64 / usage.free_bytes as f64
    }
}

/// What relocating one copy did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Relocation {
    Moved(u64),
    /// The allocator had no lower block that fits.
    Stayed,
    /// Pinned, moving, or an extent.
    Skipped,
    VerifyFailed,
}

/// Copies `src` to `dst` (same tier) in 4 MiB pieces, reading each piece back and comparing
/// it. `Ok(false)` when a read-back differs.
fn copy_verified(backend: &dyn TierBackend, src: &Reservation, dst: &Reservation) -> Result<bool> {
    const PIECE_BYTES: u64 = 4 << 20;
    let len = src.len_bytes();
    let mut a = vec![0u8; len.min(PIECE_BYTES) as usize];
    let mut b = vec![0u8; a.len()];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(PIECE_BYTES) as usize;
        backend.read(src, done, &mut a[..n])?;
        backend.write(dst, done, &a[..n])?;
        backend.read(dst, done, &mut b[..n])?;
        if a[..n] != b[..n] {
            return Ok(false);
        }
        done += n as u64;
    }
    Ok(true)
}

impl MemoryManager {
    /// Compacts every tier (see [`MemoryManager::compact_tier`]).
    pub fn compact(&self) -> Result<Vec<CompactionReport>> {
        Tier::ALL.iter().map(|&t| self.compact_tier(t)).collect()
    }

    /// Compaction under load: slides the tier's live, unpinned copies into lower free space
    /// while other threads go on working. Copies are taken highest address first; for each,
    /// the arena's allocator places a new block (first fit: the lowest hole that fits), and
    /// when that block lies below the old one the bytes are copied, read back and compared,
    /// and the entry switches blocks. Pinned copies, moving entries and checkpoint extents
    /// stay put. Each relocation holds the tensor busy (pins of it wait) and no lock across
    /// the copy.
    pub fn compact_tier(&self, tier: Tier) -> Result<CompactionReport> {
        let inner = &self.inner;
        let started = Instant::now();
        let before = inner.tiers[tier.index()].usage();
        let mut candidates = inner.copies_on(tier);
        // Highest address first: those are the ones that can slide the farthest.
        candidates.sort_unstable_by_key(|&(_, offset)| std::cmp::Reverse(offset));
        let mut report = CompactionReport {
            tier,
            before,
            after: before,
            candidates: candidates.len() as u64,
            moved: 0,
            bytes_moved: 0,
            skipped: 0,
            verify_failures: 0,
            elapsed: std::time::Duration::ZERO,
        };
        for (h, _) in candidates {
            match inner.relocate(h, tier) {
                Ok(Relocation::Moved(bytes)) => {
                    report.moved += 1;
                    report.bytes_moved += bytes;
                }
                Ok(Relocation::Stayed) => {}
                Ok(Relocation::Skipped) | Err(ManagerError::Stale { .. }) => report.skipped += 1,
                Ok(Relocation::VerifyFailed) => report.verify_failures += 1,
                Err(e) => return Err(e),
            }
        }
        report.after = inner.tiers[tier.index()].usage();
        report.elapsed = started.elapsed();
        Ok(report)
    }

    /// The tier's arena usage now (free bytes and the largest free run: fragmentation).
    pub fn tier_usage(&self, tier: Tier) -> vlmem_core::ArenaUsage {
        self.inner.tiers[tier.index()].usage()
    }
}

impl Inner {
    /// Every movable copy on `tier` (not a checkpoint extent): handle and block offset.
    fn copies_on(&self, tier: Tier) -> Vec<(TensorHandle, u64)> {
        let n = self.shards.len();
        let mut found = Vec::new();
        for (si, shard) in self.shards.iter().enumerate() {
            let st = shard.state.lock();
            for (local, slot) in st.slots.iter().enumerate() {
                let Some(e) = slot.entry.as_ref() else {
                    continue;
                };
                if let Some(c) = e.copies[tier.index()]
                    && !c.res.is_in_place()
                {
                    let h = TensorHandle {
                        manager_id: self.id,
                        slot: (local * n + si) as u32,
                        generation: slot.generation,
                    };
                    found.push((h, c.res.offset_bytes()));
                }
            }
        }
        found
    }

    /// Moves `h`'s copy on `tier` to a lower block of the same tier, if the allocator has one.
    fn relocate(&self, h: TensorHandle, tier: Tier) -> Result<Relocation> {
        let shard = self.shard_of(h)?;
        let (src, written, id) = {
            let mut st = shard.state.lock();
            let e = self.entry(&mut st, h)?;
            match e.begin_relocate(tier, |r: &Reservation| !r.is_in_place()) {
                Some(src) => (src, e.written, e.id),
                None => return Ok(Relocation::Skipped),
            }
        };
        let started = Instant::now();
        let backend = &self.tiers[tier.index()];
        let claim = BusyClaim {
            inner: self,
            handle: h,
            armed: true,
        };
        // Unlocked (the entry is busy): place, copy, verify.
        let outcome = (|| -> Result<(Option<Reservation>, Relocation)> {
            let dst = match backend.reserve(src.len_bytes(), &format!("tensor {id} (compaction)")) {
                Ok(d) => d,
                Err(TierError::Alloc { .. }) => return Ok((None, Relocation::Stayed)),
                Err(e) => return Err(e.into()),
            };
            if dst.offset_bytes() >= src.offset_bytes() {
                backend.release(dst)?;
                return Ok((None, Relocation::Stayed));
            }
            if written {
                match copy_verified(backend.as_ref(), &src, &dst) {
                    Ok(true) => {}
                    Ok(false) => {
                        self.free_block(tier, dst);
                        return Ok((None, Relocation::VerifyFailed));
                    }
                    Err(e) => {
                        self.free_block(tier, dst);
                        return Err(e);
                    }
                }
            }
            Ok((Some(dst), Relocation::Moved(src.len_bytes())))
        })();
        let dst = outcome.as_ref().ok().and_then(|(d, _)| *d);
        claim.disarm();
        let old = {
            let mut st = shard.state.lock();
            let e = self.entry(&mut st, h)?;
            let old = e.finish_relocate(tier, dst);
            shard.cond.notify_all();
            old
        };
        if let Some(old) = old {
            // Same length, same kind: the budget charge carries over to the new block.
            self.free_block(tier, old);
        }
        let (_, outcome) = outcome?;
        match outcome {
            Relocation::Moved(bytes) => {
                self.counters
                    .compaction_moves
                    .fetch_add(1, Ordering::Relaxed);
                self.counters
                    .compaction_bytes
                    .fetch_add(bytes, Ordering::Relaxed);
            }
            Relocation::VerifyFailed => {
                self.counters
                    .compaction_verify_failures
                    .fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
        self.counters
            .compaction_ns
            .fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
        Ok(outcome)
    }
}
