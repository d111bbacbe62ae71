//! A binary buddy allocator over offsets.
//!
//! The arena is cut into units of `min_block_bytes` (a power of two). Blocks have
//! power-of-two sizes in units ("orders"); a block of order `k` at unit `u` is aligned to
//! `2^k` units and its buddy is at `u ^ 2^k`. The arena need not be a power of two: it is
//! covered by the largest aligned power-of-two blocks that fit (its binary decomposition), and
//! a merge happens only when the merged block lies inside the arena.
//!
//! Bookkeeping lives outside the managed memory, in per-unit arrays: the state of the block
//! that starts at each unit (free of order k, live of order k, or not a block head), a
//! generation per unit, and intrusive doubly linked free lists per order (`prev`/`next`
//! unit indices), so finding a buddy, unlinking it and popping a free block are all O(1). A
//! bitmap of non-empty orders finds the smallest order that can serve a request in one
//! `trailing_zeros`. Metadata costs 13 bytes per unit, and an allocator has at most
//! [`BuddyAllocator::MAX_UNITS`] units (832 MiB of metadata); larger arenas are refused.
//!
//! Concurrency: one mutex per allocator. Each public method locks once and passes
//! `&mut BuddyInner` to private helpers (`*_locked`); no helper ever locks, so a lock can
//! never be taken twice by one thread (no reentrant lock is needed, or possible).

use crate::Audit;
use crate::handle::{
    classify_bad_free, decode_generation, encode_generation, new_identity, unit_shift, units_for,
};
use crate::stats::{AllocStats, Counters, FragmentationReport};
use vlmem_core::sync::Mutex;
use vlmem_core::{AllocError, ArenaUsage, Block, OffsetAllocator, TensorKind};

const NIL: u32 = u32::MAX;
/// Unit state: not the head of any block (inside a larger block).
const NOT_HEAD: u8 = 0xFF;
/// Unit state flag: head of a live block (the low bits are its order).
const LIVE: u8 = 0x80;
/// Bookkeeping per unit: state (1), generation (4), `prev` and `next` (4 each).
const METADATA_BYTES_PER_UNIT: u64 = 13;

/// Configuration of a [`BuddyAllocator`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BuddyConfig {
    /// Size of the arena; a multiple of `min_block_bytes`, at most
    /// [`BuddyAllocator::MAX_UNITS`] units.
    pub capacity_bytes: u64,
    /// The smallest block (order 0); a power of two.
    pub min_block_bytes: u64,
    /// The typed pool this allocator serves, reported in out-of-memory errors.
    pub kind: Option<TensorKind>,
}

/// A thread-safe binary buddy allocator handing out offsets. See the module docs.
#[derive(Debug)]
pub struct BuddyAllocator {
    id: u32,
    salt: u32,
    unit_shift: u32,
    capacity_bytes: u64,
    kind: Option<TensorKind>,
    inner: Mutex<BuddyInner>,
}

/// Everything the lock protects. Helpers take `&mut self`: they run with the lock held.
#[derive(Debug)]
struct BuddyInner {
    units: u32,
    max_order: u32,
    /// Per unit: `NOT_HEAD`, a free block's order, or `LIVE | order`.
    state: Vec<u8>,
    /// Per unit: bumped each time a block starting here becomes live.
    generation: Vec<u32>,
    prev: Vec<u32>,
    next: Vec<u32>,
    /// Head of the free list per order.
    heads: Vec<u32>,
    /// Free blocks per order.
    free_count: Vec<u64>,
    /// Bit k set when order k has a free block.
    nonempty: u64,
    counters: Counters,
    limit_bytes: u64,
}

impl BuddyAllocator {
    /// The most units (`capacity_bytes / min_block_bytes`) an allocator may have: its
    /// bookkeeping is 13 bytes per unit, so this bounds it at 832 MiB (a 256 GiB arena at
    /// 4 KiB blocks, 4 TiB at 64 KiB). Larger configurations are refused with `InvalidConfig`.
    pub const MAX_UNITS: u64 = 1 << 26;

    /// A buddy allocator over `config.capacity_bytes`. Refused with `InvalidConfig`: a
    /// `min_block_bytes` that is not a power of two, a capacity that is zero or not a multiple
    /// of it, and more than [`Self::MAX_UNITS`] units.
    pub fn new(config: BuddyConfig) -> Result<Self, AllocError> {
        let shift = unit_shift("min_block_bytes", config.min_block_bytes)?;
        if config.capacity_bytes == 0 || config.capacity_bytes & (config.min_block_bytes - 1) != 0 {
            return Err(AllocError::InvalidConfig(format!(
                "capacity_bytes ({}) must be a non-zero multiple of min_block_bytes ({})",
                config.capacity_bytes, config.min_block_bytes
            )));
        }
        let units64 = config.capacity_bytes >> shift;
        let units = u32::try_from(units64)
            .ok()
            .filter(|&u| u64::from(u) <= Self::MAX_UNITS)
            .ok_or_else(|| {
                AllocError::InvalidConfig(format!(
                    "{units64} units of {} bytes is too many (at most 2^26, {} bytes of \
                     bookkeeping each); use a larger min_block_bytes",
                    config.min_block_bytes, METADATA_BYTES_PER_UNIT
                ))
            })?;
        let max_order = 31 - units.leading_zeros();
        let n = units as usize;
        let mut inner = BuddyInner {
            units,
            max_order,
            state: vec![NOT_HEAD; n],
            generation: vec![0; n],
            prev: vec![NIL; n],
            next: vec![NIL; n],
            heads: vec![NIL; max_order as usize + 1],
            free_count: vec![0; max_order as usize + 1],
            nonempty: 0,
            counters: Counters::default(),
            limit_bytes: config.capacity_bytes,
        };
        // Binary decomposition: descending powers of two, each aligned to its own size.
        let mut unit = 0u32;
        for order in (0..=max_order).rev() {
            if units & (1 << order) != 0 {
                inner.push_free(unit, order);
                unit += 1 << order;
            }
        }
        let (id, salt) = new_identity();
        Ok(BuddyAllocator {
            id,
            salt,
            unit_shift: shift,
            capacity_bytes: config.capacity_bytes,
            kind: config.kind,
            inner: Mutex::new(inner),
        })
    }

    /// This allocator's id (carried by its blocks).
    pub fn id(&self) -> u32 {
        self.id
    }

    /// The smallest block size.
    pub fn min_block_bytes(&self) -> u64 {
        1 << self.unit_shift
    }

    /// The bytes a request of `bytes` reserves (its power-of-two block), if it can ever fit.
    pub fn rounded_bytes(&self, bytes: u64) -> Option<u64> {
        let units = units_for(bytes, self.unit_shift);
        let order = ceil_log2(units)?;
        let max_order = 63 - (self.capacity_bytes >> self.unit_shift).leading_zeros();
        (order <= max_order).then(|| 1u64 << (order + self.unit_shift))
    }

    /// Reserves a block of at least `bytes` (rounded up to a power of two of units).
    pub fn allocate(&self, bytes: u64) -> Result<Block, AllocError> {
        if bytes == 0 {
            return Err(AllocError::ZeroSize);
        }
        let too_large = AllocError::TooLarge {
            requested_bytes: bytes,
            capacity_bytes: self.capacity_bytes,
        };
        if bytes > self.capacity_bytes {
            return Err(too_large);
        }
        let order = ceil_log2(units_for(bytes, self.unit_shift)).ok_or(too_large.clone())?;
        // The only lock() of the allocation path; helpers below take &mut BuddyInner.
        let mut inner = self.inner.lock();
        if order > inner.max_order {
            return Err(too_large);
        }
        inner.allocate_locked(order, bytes, self)
    }

    /// Returns a block. Stale, double-freed and foreign blocks are refused and change nothing.
    pub fn free(&self, block: Block) -> Result<(), AllocError> {
        let foreign = AllocError::Foreign {
            allocator_id: block.allocator_id(),
            offset_bytes: block.offset_bytes(),
        };
        if block.allocator_id() != self.id
            || block.slot() as u64 >= self.capacity_bytes >> self.unit_shift
        {
            return Err(foreign);
        }
        if block.offset_bytes() != (block.slot() as u64) << self.unit_shift {
            return Err(foreign);
        }
        // The only lock() of the free path.
        let mut inner = self.inner.lock();
        inner.free_locked(block, self)
    }

    /// Sets the byte budget: allocations that would take `in_use` over it fail with
    /// `OutOfMemory`. Clamped to the capacity. Lowering it below what is in use only
    /// refuses new allocations.
    pub fn set_limit_bytes(&self, limit_bytes: u64) {
        self.inner.lock().limit_bytes = limit_bytes.min(self.capacity_bytes);
    }

    /// A consistent snapshot of the counters.
    pub fn stats(&self) -> AllocStats {
        let inner = self.inner.lock();
        inner.stats_locked(self.capacity_bytes)
    }

    /// Free bytes, largest free block, external fragmentation and the unusable-free index per
    /// order, from one consistent view.
    pub fn fragmentation(&self) -> FragmentationReport {
        let inner = self.inner.lock();
        let extents = (0..=inner.max_order)
            .flat_map(|k| std::iter::repeat_n(1u64 << k, inner.free_count[k as usize] as usize));
        FragmentationReport::from_free_extents(self.capacity_bytes, self.unit_shift, extents)
    }

    /// Walks the whole structure under the lock and checks its invariants (free lists match
    /// unit states, buddies of free blocks are never both free, counters equal the walked
    /// sums). For tests and debugging; O(units).
    pub fn audit(&self) -> Result<Audit, String> {
        let inner = self.inner.lock();
        inner.audit_locked(self.capacity_bytes, self.unit_shift)
    }
}

/// `ceil(log2(units))` for `units >= 1`; `None` for 0 or values needing more than 2^63.
fn ceil_log2(units: u64) -> Option<u32> {
    match units {
        0 => None,
        1 => Some(0),
        u if u > 1 << 63 => None,
        u => Some(64 - (u - 1).leading_zeros()),
    }
}

impl BuddyInner {
    fn push_free(&mut self, unit: u32, order: u32) {
        let u = unit as usize;
        let head = self.heads[order as usize];
        self.state[u] = order as u8;
        self.prev[u] = NIL;
        self.next[u] = head;
        if head != NIL {
            self.prev[head as usize] = unit;
        }
        self.heads[order as usize] = unit;
        self.free_count[order as usize] += 1;
        self.nonempty |= 1 << order;
    }

    fn remove_free(&mut self, unit: u32, order: u32) {
        let u = unit as usize;
        let (p, n) = (self.prev[u], self.next[u]);
        if p == NIL {
            self.heads[order as usize] = n;
        } else {
            self.next[p as usize] = n;
        }
        if n != NIL {
            self.prev[n as usize] = p;
        }
        self.state[u] = NOT_HEAD;
        self.free_count[order as usize] -= 1;
        if self.heads[order as usize] == NIL {
            self.nonempty &= !(1 << order);
        }
    }

    fn largest_free_units(&self) -> u64 {
        if self.nonempty == 0 {
            0
        } else {
            1 << (63 - self.nonempty.leading_zeros())
        }
    }

    fn free_units(&self) -> u64 {
        self.free_count
            .iter()
            .enumerate()
            .map(|(k, &c)| c << k)
            .sum()
    }

    fn allocate_locked(
        &mut self,
        order: u32,
        requested_bytes: u64,
        outer: &BuddyAllocator,
    ) -> Result<Block, AllocError> {
        let len_bytes = 1u64 << (order + outer.unit_shift);
        let candidates = self.nonempty & !((1u64 << order) - 1);
        // `in_use + len` can pass 2^64 in an arena near 2^64 bytes: compare against the room.
        let over_budget = len_bytes > self.limit_bytes.saturating_sub(self.counters.in_use_bytes);
        if candidates == 0 || over_budget {
            self.counters.failures += 1;
            let real_free = self.free_units() << outer.unit_shift;
            return Err(AllocError::OutOfMemory {
                kind: outer.kind,
                requested_bytes,
                free_bytes: real_free
                    .min(self.limit_bytes.saturating_sub(self.counters.in_use_bytes)),
                largest_free_bytes: self.largest_free_units() << outer.unit_shift,
            });
        }
        let mut k = candidates.trailing_zeros();
        let unit = self.heads[k as usize];
        self.remove_free(unit, k);
        while k > order {
            k -= 1;
            self.push_free(unit + (1 << k), k);
        }
        let u = unit as usize;
        self.state[u] = LIVE | order as u8;
        self.generation[u] = self.generation[u].wrapping_add(1);
        self.counters.on_alloc(len_bytes);
        Ok(Block::from_parts(
            outer.id,
            unit,
            encode_generation(self.generation[u], outer.salt),
            u64::from(unit) << outer.unit_shift,
            len_bytes,
        ))
    }

    fn free_locked(&mut self, block: Block, outer: &BuddyAllocator) -> Result<(), AllocError> {
        let mut unit = block.slot();
        let u = unit as usize;
        let claimed = decode_generation(block.generation(), outer.salt);
        let state = self.state[u];
        let live = state & LIVE != 0 && state != NOT_HEAD;
        if !live || self.generation[u] != claimed {
            return Err(classify_bad_free(
                outer.id,
                block.offset_bytes(),
                claimed,
                self.generation[u],
                live,
            ));
        }
        let mut order = u32::from(state & !LIVE);
        if block.len_bytes() != 1u64 << (order + outer.unit_shift) {
            return Err(AllocError::Foreign {
                allocator_id: block.allocator_id(),
                offset_bytes: block.offset_bytes(),
            });
        }
        self.state[u] = NOT_HEAD;
        self.counters.on_free(block.len_bytes());
        self.merge_and_push_locked(&mut unit, &mut order);
        Ok(())
    }

    /// Merges the free block (`unit`, `order`) with its free buddies, then lists it.
    fn merge_and_push_locked(&mut self, unit: &mut u32, order: &mut u32) {
        while *order < self.max_order {
            let buddy = *unit ^ (1 << *order);
            let merged_start = (*unit).min(buddy);
            // The merged block must lie inside the arena (not a power of two in general).
            if u64::from(merged_start) + (2u64 << *order) > u64::from(self.units) {
                break;
            }
            if self.state[buddy as usize] != *order as u8 {
                break;
            }
            self.remove_free(buddy, *order);
            self.state[*unit as usize] = NOT_HEAD;
            *unit = merged_start;
            *order += 1;
        }
        self.push_free(*unit, *order);
    }

    fn stats_locked(&self, capacity_bytes: u64) -> AllocStats {
        let c = &self.counters;
        AllocStats {
            capacity_bytes,
            allocations: c.allocations,
            frees: c.frees,
            failures: c.failures,
            in_use_bytes: c.in_use_bytes,
            peak_in_use_bytes: c.peak_in_use_bytes,
            live_blocks: c.live_blocks,
            free_bytes: capacity_bytes - c.in_use_bytes,
            compaction_reserved_bytes: 0,
            limit_bytes: self.limit_bytes,
        }
    }

    fn audit_locked(&self, capacity_bytes: u64, shift: u32) -> Result<Audit, String> {
        let mut walked_live = 0u64;
        let mut walked_in_use_units = 0u64;
        let mut walked_free_units = 0u64;
        let mut covered = 0u64;
        let mut u = 0u64;
        // Walk blocks in address order: every unit is covered by exactly one block.
        while u < u64::from(self.units) {
            let s = self.state[u as usize];
            if s == NOT_HEAD {
                return Err(format!("unit {u} is not covered by any block"));
            }
            let order = u32::from(s & !LIVE);
            if u & ((1 << order) - 1) != 0 {
                return Err(format!("block at unit {u} of order {order} is misaligned"));
            }
            let len = 1u64 << order;
            if s & LIVE != 0 {
                walked_live += 1;
                walked_in_use_units += len;
            } else {
                walked_free_units += len;
                let buddy = u ^ len;
                let start = u.min(buddy);
                if order < self.max_order
                    && start + 2 * len <= u64::from(self.units)
                    && self.state[buddy as usize] == order as u8
                {
                    return Err(format!(
                        "free buddies at units {u} and {buddy} were not merged"
                    ));
                }
            }
            covered += len;
            u += len;
        }
        if covered != u64::from(self.units) {
            return Err(format!("blocks cover {covered} units of {}", self.units));
        }
        for k in 0..=self.max_order {
            let mut n = 0u64;
            let mut cur = self.heads[k as usize];
            while cur != NIL {
                if self.state[cur as usize] != k as u8 {
                    return Err(format!(
                        "unit {cur} in free list {k} has state {}",
                        self.state[cur as usize]
                    ));
                }
                n += 1;
                cur = self.next[cur as usize];
            }
            if n != self.free_count[k as usize] {
                return Err(format!(
                    "free list {k} holds {n} blocks, counted {}",
                    self.free_count[k as usize]
                ));
            }
            if (n > 0) != (self.nonempty & (1 << k) != 0) {
                return Err(format!("non-empty bitmap wrong at order {k}"));
            }
        }
        let stats = self.stats_locked(capacity_bytes);
        let audit = Audit {
            stats,
            walked_live_blocks: walked_live,
            walked_in_use_bytes: walked_in_use_units << shift,
            walked_free_bytes: walked_free_units << shift,
        };
        audit.check()?;
        Ok(audit)
    }
}

impl OffsetAllocator for BuddyAllocator {
    fn allocate(&self, bytes: u64) -> Result<Block, AllocError> {
        BuddyAllocator::allocate(self, bytes)
    }
    fn free(&self, block: Block) -> Result<(), AllocError> {
        BuddyAllocator::free(self, block)
    }
    fn capacity_bytes(&self) -> u64 {
        self.capacity_bytes
    }
    fn usage(&self) -> ArenaUsage {
        let inner = self.inner.lock();
        ArenaUsage {
            capacity_bytes: self.capacity_bytes,
            in_use_bytes: inner.counters.in_use_bytes,
            free_bytes: self.capacity_bytes - inner.counters.in_use_bytes,
            largest_free_bytes: inner.largest_free_units() << self.unit_shift,
        }
    }
}

#[cfg(all(test, not(vlmem_loom)))]
mod tests {
    use super::*;

    fn buddy(capacity_bytes: u64, min_block_bytes: u64) -> BuddyAllocator {
        BuddyAllocator::new(BuddyConfig {
            capacity_bytes,
            min_block_bytes,
            kind: Some(TensorKind::Weight),
        })
        .unwrap()
    }

    #[test]
    fn config_errors() {
        let bad = |c, m| {
            BuddyAllocator::new(BuddyConfig {
                capacity_bytes: c,
                min_block_bytes: m,
                kind: None,
            })
        };
        assert!(matches!(bad(1024, 3), Err(AllocError::InvalidConfig(_))));
        assert!(matches!(bad(1000, 64), Err(AllocError::InvalidConfig(_))));
        assert!(matches!(bad(0, 64), Err(AllocError::InvalidConfig(_))));
        assert!(matches!(bad(1 << 40, 1), Err(AllocError::InvalidConfig(_))));
    }

    #[test]
    fn split_merge_and_errors() {
        let b = buddy(16 * 64, 64);
        assert_eq!(b.allocate(0), Err(AllocError::ZeroSize));
        assert!(matches!(
            b.allocate(16 * 64 + 1),
            Err(AllocError::TooLarge { .. })
        ));
        assert!(matches!(
            b.allocate(u64::MAX),
            Err(AllocError::TooLarge { .. })
        ));
        let a = b.allocate(1).unwrap();
        assert_eq!((a.offset_bytes(), a.len_bytes()), (0, 64));
        let c = b.allocate(65).unwrap();
        assert_eq!((c.offset_bytes(), c.len_bytes()), (128, 128));
        let d = b.allocate(512).unwrap();
        assert_eq!((d.offset_bytes(), d.len_bytes()), (512, 512));
        let oom = b.allocate(512).unwrap_err();
        assert_eq!(
            oom,
            AllocError::OutOfMemory {
                kind: Some(TensorKind::Weight),
                requested_bytes: 512,
                free_bytes: 16 * 64 - 64 - 128 - 512,
                largest_free_bytes: 256,
            }
        );
        b.free(a).unwrap();
        assert_eq!(b.free(a), Err(AllocError::DoubleFree { offset_bytes: 0 }));
        let a2 = b.allocate(64).unwrap();
        assert_eq!(a2.offset_bytes(), 0);
        assert_eq!(b.free(a), Err(AllocError::Stale { offset_bytes: 0 }));
        // A made-up generation is refused (as foreign or stale: generations are salted, so
        // which one depends on the salt) and changes nothing.
        let forged = Block::from_parts(b.id(), 0, 12345, 0, 64);
        let before = b.stats();
        assert!(matches!(
            b.free(forged),
            Err(AllocError::Foreign { .. }) | Err(AllocError::Stale { .. })
        ));
        assert_eq!(b.stats(), before);
        let other = buddy(1024, 64);
        assert!(matches!(other.free(a2), Err(AllocError::Foreign { .. })));
        let wrong_len = Block::from_parts(b.id(), a2.slot(), a2.generation(), 0, 128);
        assert!(matches!(b.free(wrong_len), Err(AllocError::Foreign { .. })));
        for blk in [a2, c, d] {
            b.free(blk).unwrap();
        }
        let f = b.fragmentation();
        assert_eq!(f.largest_free_bytes, 1024);
        assert_eq!(f.free_extents, 1);
        let s = b.stats();
        assert_eq!(
            (s.allocations, s.frees, s.failures, s.in_use_bytes),
            (4, 4, 1, 0)
        );
        assert_eq!(s.peak_in_use_bytes, 64 + 128 + 512);
        b.audit().unwrap();
    }

    #[test]
    fn non_power_of_two_arena_fills_completely() {
        // 7 units: blocks of 4, 2, 1.
        let b = buddy(7 * 4096, 4096);
        let blocks: Vec<Block> = (0..7).map(|_| b.allocate(4096).unwrap()).collect();
        assert!(matches!(b.allocate(1), Err(AllocError::OutOfMemory { .. })));
        assert!(matches!(
            b.allocate(8 * 4096),
            Err(AllocError::TooLarge { .. })
        ));
        // 5 units can never fit (would need an 8-unit block).
        assert!(matches!(
            b.allocate(5 * 4096),
            Err(AllocError::TooLarge { .. })
        ));
        let mut offs: Vec<u64> = blocks.iter().map(|b| b.offset_bytes()).collect();
        offs.sort_unstable();
        assert_eq!(offs, (0..7).map(|i| i * 4096).collect::<Vec<_>>());
        for blk in blocks {
            b.free(blk).unwrap();
        }
        let f = b.fragmentation();
        assert_eq!(
            (f.free_bytes, f.largest_free_bytes, f.free_extents),
            (7 * 4096, 4 * 4096, 3)
        );
        b.audit().unwrap();
        assert_eq!(b.allocate(4 * 4096).unwrap().offset_bytes(), 0);
    }

    #[test]
    fn budget_limits_allocation() {
        let b = buddy(1024, 64);
        b.set_limit_bytes(128);
        let x = b.allocate(128).unwrap();
        let e = b.allocate(64).unwrap_err();
        assert!(matches!(e, AllocError::OutOfMemory { free_bytes: 0, .. }));
        b.free(x).unwrap();
        assert_eq!(b.stats().limit_bytes, 128);
    }

    #[test]
    fn ceil_log2_edges() {
        assert_eq!(ceil_log2(0), None);
        assert_eq!(ceil_log2(1), Some(0));
        assert_eq!(ceil_log2(2), Some(1));
        assert_eq!(ceil_log2(3), Some(2));
        assert_eq!(ceil_log2(1 << 63), Some(63));
        assert_eq!(ceil_log2((1 << 63) + 1), None);
        assert_eq!(ceil_log2(u64::MAX), None);
    }
}
