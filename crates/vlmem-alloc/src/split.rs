//! One arena split in two: a [`SlabPool`] of fixed blocks at the bottom (the paged KV cache's
//! blocks) and a general allocator above it for every other size. The tiers of the memory
//! manager use it so KV blocks come from the slab (O(1), no fragmentation) and cannot be
//! scattered among variable tensors, while every block stays an offset in one arena.
//!
//! Requests of exactly the slab's block size go to the slab, and to the general region when
//! the slab is full; everything else goes to the general region. A block is returned to the
//! part that made it (by its allocator id). The split holds no lock of its own: each part is
//! thread-safe, and the split only adds or subtracts the slab region's size to the general
//! part's offsets.

use crate::slab::SlabPool;
use std::sync::Arc;
use vlmem_core::{AllocError, ArenaUsage, Block, OffsetAllocator};

/// A slab region `[0, slab_bytes)` and a general region `[slab_bytes, capacity)`.
#[derive(Debug)]
pub struct SplitAllocator {
    slab: SlabPool,
    slab_bytes: u64,
    rest: Arc<dyn OffsetAllocator>,
}

impl SplitAllocator {
    /// The slab's blocks first, then `rest`'s arena shifted above them. Refused with
    /// `InvalidConfig` when the two regions together pass 2^64 bytes (the general region's
    /// offsets could not be represented).
    pub fn try_new(slab: SlabPool, rest: Arc<dyn OffsetAllocator>) -> Result<Self, AllocError> {
        // SlabPool::new refuses a slab whose bytes overflow, so this product fits.
        let slab_bytes = slab.block_bytes() * u64::from(slab.capacity_blocks());
        if slab_bytes.checked_add(rest.capacity_bytes()).is_none() {
            return Err(AllocError::InvalidConfig(format!(
                "a slab region of {slab_bytes} bytes and a general region of {} bytes add up \
                 to more than 2^64 bytes",
                rest.capacity_bytes()
            )));
        }
        Ok(SplitAllocator {
            slab,
            slab_bytes,
            rest,
        })
    }

    /// As [`try_new`](Self::try_new), for callers that cannot take an error: when the two
    /// regions together pass 2^64 bytes, the split keeps the slab alone (every other request
    /// is `TooLarge`) rather than hand out offsets past 2^64. Prefer `try_new`.
    pub fn new(slab: SlabPool, rest: Arc<dyn OffsetAllocator>) -> Self {
        let slab_bytes = slab.block_bytes() * u64::from(slab.capacity_blocks());
        let rest = if slab_bytes.checked_add(rest.capacity_bytes()).is_some() {
            rest
        } else {
            Arc::new(NoRoom)
        };
        SplitAllocator {
            slab,
            slab_bytes,
            rest,
        }
    }

    /// The slab part.
    pub fn slab(&self) -> &SlabPool {
        &self.slab
    }

    /// Bytes of the slab region (the general region starts there).
    pub fn slab_bytes(&self) -> u64 {
        self.slab_bytes
    }

    fn shift_up(&self, b: Block) -> Block {
        Block::from_parts(
            b.allocator_id(),
            b.slot(),
            b.generation(),
            b.offset_bytes() + self.slab_bytes,
            b.len_bytes(),
        )
    }
}

impl OffsetAllocator for SplitAllocator {
    fn allocate(&self, bytes: u64) -> Result<Block, AllocError> {
        if bytes == self.slab.block_bytes() {
            match OffsetAllocator::allocate(&self.slab, bytes) {
                Ok(b) => return Ok(b),
                Err(AllocError::OutOfMemory { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        self.rest.allocate(bytes).map(|b| self.shift_up(b))
    }

    fn free(&self, block: Block) -> Result<(), AllocError> {
        if block.allocator_id() == self.slab.id() {
            return OffsetAllocator::free(&self.slab, block);
        }
        let offset =
            block
                .offset_bytes()
                .checked_sub(self.slab_bytes)
                .ok_or(AllocError::Foreign {
                    allocator_id: block.allocator_id(),
                    offset_bytes: block.offset_bytes(),
                })?;
        self.rest.free(Block::from_parts(
            block.allocator_id(),
            block.slot(),
            block.generation(),
            offset,
            block.len_bytes(),
        ))
    }

    fn capacity_bytes(&self) -> u64 {
        self.slab_bytes + self.rest.capacity_bytes()
    }

    fn usage(&self) -> ArenaUsage {
        let a = self.slab.usage();
        let b = self.rest.usage();
        ArenaUsage {
            capacity_bytes: a.capacity_bytes + b.capacity_bytes,
            in_use_bytes: a.in_use_bytes + b.in_use_bytes,
            free_bytes: a.free_bytes + b.free_bytes,
            largest_free_bytes: a.largest_free_bytes.max(b.largest_free_bytes),
        }
    }
}

/// An empty general region: nothing fits, no block is its own.
#[derive(Debug)]
struct NoRoom;

impl OffsetAllocator for NoRoom {
    fn allocate(&self, bytes: u64) -> Result<Block, AllocError> {
        if bytes == 0 {
            return Err(AllocError::ZeroSize);
        }
        Err(AllocError::TooLarge {
            requested_bytes: bytes,
            capacity_bytes: 0,
        })
    }
    fn free(&self, block: Block) -> Result<(), AllocError> {
        Err(AllocError::Foreign {
            allocator_id: block.allocator_id(),
            offset_bytes: block.offset_bytes(),
        })
    }
    fn capacity_bytes(&self) -> u64 {
        0
    }
    fn usage(&self) -> ArenaUsage {
        ArenaUsage::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::slab::SlabConfig;
    use crate::{BinnedAllocator, BinnedConfig};

    fn split(blocks: u32, block_bytes: u64, rest_bytes: u64) -> SplitAllocator {
        let slab = SlabPool::new(SlabConfig {
            block_bytes,
            capacity_blocks: blocks,
            cache_blocks: 4,
            caches: 2,
            kind: None,
        })
        .unwrap();
        let rest = BinnedAllocator::new(BinnedConfig {
            capacity_bytes: rest_bytes,
            granule_bytes: 256,
            kind: None,
        })
        .unwrap();
        SplitAllocator::new(slab, Arc::new(rest))
    }

    #[test]
    fn block_sized_requests_use_the_slab_then_overflow_above_it() {
        let s = split(4, 4096, 1 << 20);
        assert_eq!(s.capacity_bytes(), 4 * 4096 + (1 << 20));
        let blocks: Vec<_> = (0..4).map(|_| s.allocate(4096).unwrap()).collect();
        assert!(blocks.iter().all(|b| b.end_bytes() <= s.slab_bytes()));
        // The slab is full: the fifth block comes from the general region.
        let fifth = s.allocate(4096).unwrap();
        assert!(fifth.offset_bytes() >= s.slab_bytes());
        // Other sizes never touch the slab.
        let odd = s.allocate(5000).unwrap();
        assert!(odd.offset_bytes() >= s.slab_bytes());
        let u = s.usage();
        assert_eq!(u.in_use_bytes, 4 * 4096 + 4096 + 5120);
        assert_eq!(u.in_use_bytes + u.free_bytes, u.capacity_bytes);
        for b in blocks.into_iter().chain([fifth, odd]) {
            s.free(b).unwrap();
        }
        let u = s.usage();
        assert_eq!(u.in_use_bytes, 0);
    }

    #[test]
    fn bad_frees_are_refused_and_change_nothing() {
        let s = split(2, 4096, 1 << 16);
        let a = s.allocate(4096).unwrap();
        let b = s.allocate(1000).unwrap();
        s.free(a).unwrap();
        assert!(s.free(a).is_err(), "double free of a slab block");
        s.free(b).unwrap();
        assert!(s.free(b).is_err(), "double free of a general block");
        // A general-region block forged below the split point.
        let forged = Block::from_parts(b.allocator_id(), b.slot(), b.generation(), 0, 1000);
        assert!(matches!(s.free(forged), Err(AllocError::Foreign { .. })));
        assert!(matches!(s.allocate(0), Err(AllocError::ZeroSize)));
        assert!(s.allocate(u64::MAX).is_err());
        assert_eq!(s.usage().in_use_bytes, 0);
    }

    #[test]
    fn eight_threads_never_overlap() {
        // A ledger of live blocks checked for overlap after every allocation.
        let s = Arc::new(split(64, 4096, 1 << 20));
        let ledger = Arc::new(std::sync::Mutex::new(std::collections::BTreeMap::new()));
        let threads: Vec<_> = (0..8u64)
            .map(|t| {
                let (s, ledger) = (s.clone(), ledger.clone());
                std::thread::spawn(move || {
                    let mut rng = t * 31 + 7;
                    let mut mine = Vec::new();
                    for _ in 0..5000 {
                        rng ^= rng << 13;
                        rng ^= rng >> 7;
                        rng ^= rng << 17;
                        if rng % 3 == 0 && !mine.is_empty() {
                            let b: Block = mine.swap_remove((rng as usize / 3) % mine.len());
                            ledger.lock().unwrap().remove(&b.offset_bytes());
                            s.free(b).unwrap();
                            continue;
                        }
                        let bytes = if rng % 2 == 0 { 4096 } else { 256 + rng % 8000 };
                        if let Ok(b) = s.allocate(bytes) {
                            let mut l = ledger.lock().unwrap();
                            let prev = l.range(..b.end_bytes()).next_back().map(|(&o, &e)| (o, e));
                            if let Some((o, e)) = prev {
                                assert!(e <= b.offset_bytes() || o >= b.end_bytes(), "overlap");
                            }
                            l.insert(b.offset_bytes(), b.end_bytes());
                            drop(l);
                            mine.push(b);
                        }
                    }
                    for b in mine {
                        ledger.lock().unwrap().remove(&b.offset_bytes());
                        s.free(b).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(s.usage().in_use_bytes, 0);
        assert!(ledger.lock().unwrap().is_empty());
    }
}
