//! A pool of fixed-size blocks (KV-cache blocks) with bounded per-thread caches and
//! reference counts for shared blocks.
//!
//! Block `i` is the `block_bytes` at offset `i * block_bytes`; a block's slot is its index.
//! Free block indices live in a shared stack and in a small set of caches ("stripes"): a
//! thread uses the cache its index picks (a thread-local index assigned round-robin, or an
//! index the caller passes, e.g. a worker's number). Allocation pops from the cache, refilling
//! half a cache from the shared stack when empty; a free pushes to the freeing thread's cache
//! (any thread may free any block: blocks are interchangeable), flushing half to the shared
//! stack when the cache is over its bound. Both are O(1) (amortised over the batch).
//!
//! Per-block state is one atomic word, `generation << 32 | refcount`: live blocks have a
//! refcount >= 1. [`SlabPool::retain`] adds a reference (prefix sharing) with a CAS;
//! [`SlabPool::release`] (and `free`) drops one, and the release that reaches zero returns
//! the block. The CAS checks the generation, so stale, double and foreign releases are
//! refused, and two racing final releases cannot both free the block.
//!
//! Exact statistics: a block changes between live and free only while the cache lock of the
//! thread doing it is held, together with the move into or out of that cache's list and the
//! counters. [`SlabPool::stats`] takes every cache lock (in index order) and then the shared
//! lock, so it sees no transition half-done: `in_use_bytes` is exactly the live blocks.
//!
//! Lock order: a cache before the shared stack; several caches only in ascending index
//! (slow path and snapshots). Each public method locks once at the top and passes the guards'
//! `&mut` contents to helpers.

use crate::Audit;
use crate::handle::{classify_bad_free, decode_generation, encode_generation, new_identity};
use crate::stats::{AllocStats, FragmentationReport};
use vlmem_core::sync::atomic::{AtomicU64, Ordering};
use vlmem_core::sync::{Mutex, MutexGuard};
use vlmem_core::{AllocError, ArenaUsage, Block, OffsetAllocator, TensorKind};

/// Configuration of a [`SlabPool`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlabConfig {
    /// Size of every block (e.g. 64 KiB: one layer's K+V for 16 tokens of Qwen3-VL-8B).
    pub block_bytes: u64,
    /// Number of blocks in the arena: 1 to [`SlabPool::MAX_BLOCKS`].
    pub capacity_blocks: u32,
    /// Bound on the free blocks one cache holds (0 disables caching); at most
    /// `max(capacity_blocks / caches, 64)` is used.
    pub cache_blocks: u32,
    /// Number of caches (threads map onto them); 1 to 256.
    pub caches: u32,
    /// The typed pool this allocator serves, reported in out-of-memory errors.
    pub kind: Option<TensorKind>,
}

/// What a release did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Released {
    /// That was the last reference: the block is free.
    Freed,
    /// Other references remain.
    StillShared {
        /// References left.
        refs_left: u32,
    },
}

#[derive(Debug, Default)]
struct Cache {
    free: Vec<u32>,
    allocations: u64,
    frees: u64,
    failures: u64,
}

#[derive(Debug, Default)]
struct Shared {
    free: Vec<u32>,
}

/// A cache on its own cache line, so two threads' caches do not share one.
#[derive(Debug)]
#[repr(align(64))]
struct Padded<T>(T);

/// A thread-safe pool of fixed-size blocks. See the module docs.
#[derive(Debug)]
pub struct SlabPool {
    id: u32,
    salt: u32,
    block_bytes: u64,
    capacity_blocks: u32,
    cache_limit: usize,
    refill_batch: usize,
    kind: Option<TensorKind>,
    /// Per block: `generation << 32 | refcount`.
    states: Vec<AtomicU64>,
    caches: Vec<Padded<Mutex<Cache>>>,
    shared: Mutex<Shared>,
    /// Live blocks; changed only under a cache lock, together with the free lists.
    live_blocks: AtomicU64,
    peak_blocks: AtomicU64,
    limit_blocks: AtomicU64,
}

const REFS: u64 = 0xFFFF_FFFF;
/// Bookkeeping per block: the state word (8) and a free-stack entry (4).
const METADATA_BYTES_PER_BLOCK: u64 = 12;
/// Entries a cache reserves up front (it grows past them on demand).
const CACHE_PREALLOC_BLOCKS: usize = 4096;
/// A cache may always hold this many free blocks, whatever its share of the pool.
const CACHE_FLOOR_BLOCKS: u32 = 64;

impl SlabPool {
    /// The most blocks a pool may have: its bookkeeping is 12 bytes per block (a state word
    /// and a free-stack entry), so this bounds it at 768 MiB (a 256 GiB arena of 4 KiB blocks,
    /// 4 TiB of 64 KiB blocks). Larger pools are refused with `InvalidConfig`.
    pub const MAX_BLOCKS: u64 = 1 << 26;

    /// A pool of `config.capacity_blocks` blocks of `config.block_bytes`. Refused with
    /// `InvalidConfig`: a zero block size, 0 or more than [`Self::MAX_BLOCKS`] blocks, an
    /// arena past 2^64 bytes, and a number of caches outside 1..=256. `cache_blocks` may be
    /// anything: a cache holds at most `max(capacity_blocks / caches, 64)` free blocks
    /// whatever it says, and reserves at most 4,096 entries up front.
    pub fn new(config: SlabConfig) -> Result<Self, AllocError> {
        let bad = |m: String| Err(AllocError::InvalidConfig(m));
        if config.block_bytes == 0 {
            return bad("block_bytes must be at least 1".into());
        }
        if config.capacity_blocks == 0 || u64::from(config.capacity_blocks) > Self::MAX_BLOCKS {
            return bad(format!(
                "capacity_blocks must be 1..=2^26 ({} bytes of bookkeeping each), got {}",
                METADATA_BYTES_PER_BLOCK, config.capacity_blocks
            ));
        }
        if u64::from(config.capacity_blocks)
            .checked_mul(config.block_bytes)
            .is_none()
        {
            return bad("capacity_blocks * block_bytes overflows u64".into());
        }
        if config.caches == 0 || config.caches > 256 {
            return bad(format!("caches must be 1..=256, got {}", config.caches));
        }
        let n = config.capacity_blocks;
        // Lowest offsets first out of the shared stack.
        let shared = Shared {
            free: (0..n).rev().collect(),
        };
        // The caches together never need more than the pool: past `n / caches` (or a small
        // floor) the bound only grows their lists and the refill batches (half the bound, moved
        // in one call).
        let cache_limit = (config.cache_blocks as usize)
            .min((n / config.caches).max(CACHE_FLOOR_BLOCKS) as usize);
        let (id, salt) = new_identity();
        Ok(SlabPool {
            id,
            salt,
            block_bytes: config.block_bytes,
            capacity_blocks: n,
            cache_limit,
            refill_batch: (cache_limit / 2).max(1),
            kind: config.kind,
            states: (0..n).map(|_| AtomicU64::new(0)).collect(),
            caches: (0..config.caches)
                .map(|_| {
                    Padded(Mutex::new(Cache {
                        // Past a few thousand entries the list grows on demand (up to
                        // the bound) instead of reserving the whole bound up front.
                        free: Vec::with_capacity(cache_limit.min(CACHE_PREALLOC_BLOCKS) + 1),
                        ..Cache::default()
                    }))
                })
                .collect(),
            shared: Mutex::new(shared),
            live_blocks: AtomicU64::new(0),
            peak_blocks: AtomicU64::new(0),
            limit_blocks: AtomicU64::new(u64::from(n)),
        })
    }

    /// This pool's id (carried by its blocks).
    pub fn id(&self) -> u32 {
        self.id
    }

    /// The size of every block.
    pub fn block_bytes(&self) -> u64 {
        self.block_bytes
    }

    /// Number of blocks in the arena.
    pub fn capacity_blocks(&self) -> u32 {
        self.capacity_blocks
    }

    /// Number of caches.
    pub fn caches(&self) -> usize {
        self.caches.len()
    }

    /// The cache the calling thread uses by default.
    pub fn thread_cache(&self) -> usize {
        thread_cache_index() % self.caches.len()
    }

    /// Allocates one block (`bytes` must be 1..=block_bytes) through the calling thread's cache.
    pub fn allocate(&self, bytes: u64) -> Result<Block, AllocError> {
        self.allocate_with_cache(self.thread_cache(), bytes)
    }

    /// Allocates one block through cache `cache` (taken modulo the number of caches).
    pub fn allocate_with_cache(&self, cache: usize, bytes: u64) -> Result<Block, AllocError> {
        self.check_request(bytes)?;
        let mut c = self.caches[cache % self.caches.len()].0.lock();
        match self.pop_locked(&mut c, 1) {
            Ok(()) => {
                let slot = c.free.pop().unwrap_or(0);
                Ok(self.make_live_locked(&mut c, slot))
            }
            Err(true) => {
                c.failures += 1;
                Err(self.budget_error(bytes))
            }
            Err(false) => {
                drop(c);
                self.allocate_slow(bytes)
            }
        }
    }

    /// Allocates `count` blocks into `out` through cache `cache`, taking its lock once
    /// (a decode step's blocks). All or nothing: on error `out` is unchanged.
    pub fn allocate_batch_with_cache(
        &self,
        cache: usize,
        count: usize,
        out: &mut Vec<Block>,
    ) -> Result<(), AllocError> {
        if count == 0 {
            return Ok(());
        }
        let mut c = self.caches[cache % self.caches.len()].0.lock();
        match self.pop_locked(&mut c, count) {
            Ok(()) => {
                out.reserve(count);
                for _ in 0..count {
                    let slot = c.free.pop().unwrap_or(0);
                    out.push(self.make_live_locked(&mut c, slot));
                }
                Ok(())
            }
            Err(over_budget) => {
                if over_budget {
                    c.failures += 1;
                    return Err(self.budget_error(count as u64 * self.block_bytes));
                }
                drop(c);
                // Not enough in this cache and the shared stack: one at a time, undo on failure.
                let start = out.len();
                for _ in 0..count {
                    match self.allocate_slow(self.block_bytes) {
                        Ok(b) => out.push(b),
                        Err(e) => {
                            for b in out.drain(start..) {
                                let _ = self.release_with_cache(cache, b);
                            }
                            return Err(e);
                        }
                    }
                }
                Ok(())
            }
        }
    }

    /// Adds a reference to a live block (another sequence shares it). Returns the new count.
    pub fn retain(&self, block: Block) -> Result<u32, AllocError> {
        let slot = self.check_block(block)?;
        let claimed = decode_generation(block.generation(), self.salt);
        let state = &self.states[slot as usize];
        let mut w = state.load(Ordering::Acquire);
        loop {
            let (generation, refs) = ((w >> 32) as u32, w & REFS);
            if generation != claimed || refs == 0 {
                return Err(classify_bad_free(
                    self.id,
                    block.offset_bytes(),
                    claimed,
                    generation,
                    refs > 0,
                ));
            }
            if refs == REFS - 1 {
                return Err(AllocError::InvalidConfig("reference count overflow".into()));
            }
            match state.compare_exchange_weak(w, w + 1, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Ok((refs + 1) as u32),
                Err(now) => w = now,
            }
        }
    }

    /// Drops one reference through the calling thread's cache; the last one frees the block.
    pub fn release(&self, block: Block) -> Result<Released, AllocError> {
        self.release_with_cache(self.thread_cache(), block)
    }

    /// Drops one reference through cache `cache`; the last one frees the block into it.
    pub fn release_with_cache(&self, cache: usize, block: Block) -> Result<Released, AllocError> {
        let slot = self.check_block(block)?;
        let mut c = self.caches[cache % self.caches.len()].0.lock();
        let r = self.release_locked(&mut c, slot, block);
        if r == Ok(Released::Freed) {
            // Still under the cache lock: the live count moves with the free list.
            self.live_blocks.fetch_sub(1, Ordering::AcqRel);
            self.flush_if_over_locked(&mut c);
        }
        r
    }

    /// Releases several blocks through cache `cache`, taking its lock once. Stops at the
    /// first refused block and returns its index and error (the ones before it are released).
    pub fn release_batch_with_cache(
        &self,
        cache: usize,
        blocks: &[Block],
    ) -> Result<(), (usize, AllocError)> {
        let mut c = self.caches[cache % self.caches.len()].0.lock();
        let mut result = Ok(());
        let mut freed = 0u64;
        for (i, &b) in blocks.iter().enumerate() {
            match self
                .check_block(b)
                .and_then(|slot| self.release_locked(&mut c, slot, b))
            {
                Ok(Released::Freed) => freed += 1,
                Ok(Released::StillShared { .. }) => {}
                Err(e) => {
                    result = Err((i, e));
                    break;
                }
            }
        }
        // One atomic for the whole batch, still under the cache lock.
        if freed > 0 {
            self.live_blocks.fetch_sub(freed, Ordering::AcqRel);
        }
        self.flush_if_over_locked(&mut c);
        result
    }

    /// The current reference count of a live block (0 if it is not live under that handle).
    pub fn refs(&self, block: Block) -> u32 {
        let Ok(slot) = self.check_block(block) else {
            return 0;
        };
        let w = self.states[slot as usize].load(Ordering::Acquire);
        if (w >> 32) as u32 == decode_generation(block.generation(), self.salt) {
            (w & REFS) as u32
        } else {
            0
        }
    }

    /// Sets the byte budget (rounded down to whole blocks, clamped to the capacity).
    pub fn set_limit_bytes(&self, limit_bytes: u64) {
        let blocks = (limit_bytes / self.block_bytes).min(u64::from(self.capacity_blocks));
        self.limit_blocks.store(blocks, Ordering::Release);
    }

    /// An exact snapshot: takes every cache lock (ascending) and the shared lock.
    pub fn stats(&self) -> AllocStats {
        let caches = self.lock_all_caches();
        let shared = self.shared.lock();
        self.stats_locked(&caches, &shared)
    }

    /// Fragmentation of a slab: every free block serves every request, so the largest free
    /// extent that matters is one block, and external fragmentation is 0 for its requests.
    /// (The report describes free blocks as one-block extents.)
    pub fn fragmentation(&self) -> FragmentationReport {
        let s = self.stats();
        let free_blocks = s.free_bytes / self.block_bytes;
        let mut r = FragmentationReport::from_free_extents(
            u64::from(self.capacity_blocks),
            0,
            std::iter::repeat_n(1u64, free_blocks as usize),
        );
        r.capacity_bytes = s.capacity_bytes;
        r.free_bytes = s.free_bytes;
        r.largest_free_bytes = if free_blocks > 0 { self.block_bytes } else { 0 };
        r.external_fragmentation = 0.0;
        for u in &mut r.unusable_free_index {
            u.request_bytes = u.request_bytes.saturating_mul(self.block_bytes);
        }
        r
    }

    /// Checks every invariant under all locks: each block is either live (refcount >= 1) or
    /// in exactly one free list, and the live counter equals the walked count.
    pub fn audit(&self) -> Result<Audit, String> {
        let caches = self.lock_all_caches();
        let shared = self.shared.lock();
        let mut listed = vec![false; self.capacity_blocks as usize];
        for list in caches
            .iter()
            .map(|c| &c.free)
            .chain(std::iter::once(&shared.free))
        {
            for &i in list {
                if std::mem::replace(&mut listed[i as usize], true) {
                    return Err(format!("block {i} is listed free twice"));
                }
            }
        }
        let mut live = 0u64;
        for (i, s) in self.states.iter().enumerate() {
            let refs = s.load(Ordering::Acquire) & REFS;
            match (refs > 0, listed[i]) {
                (true, false) => live += 1,
                (false, true) => {}
                (true, true) => return Err(format!("block {i} is live and listed free")),
                (false, false) => {
                    return Err(format!("block {i} is neither live nor free (leaked)"));
                }
            }
        }
        let stats = self.stats_locked(&caches, &shared);
        if self.live_blocks.load(Ordering::Acquire) != live {
            return Err(format!(
                "live counter {} != walked {live}",
                self.live_blocks.load(Ordering::Acquire)
            ));
        }
        let audit = Audit {
            stats,
            walked_live_blocks: live,
            walked_in_use_bytes: live * self.block_bytes,
            walked_free_bytes: (u64::from(self.capacity_blocks) - live) * self.block_bytes,
        };
        audit.check()?;
        Ok(audit)
    }

    fn lock_all_caches(&self) -> Vec<MutexGuard<'_, Cache>> {
        self.caches.iter().map(|c| c.0.lock()).collect()
    }

    fn stats_locked(&self, caches: &[MutexGuard<'_, Cache>], shared: &Shared) -> AllocStats {
        let mut s = AllocStats {
            capacity_bytes: u64::from(self.capacity_blocks) * self.block_bytes,
            limit_bytes: self.limit_blocks.load(Ordering::Acquire) * self.block_bytes,
            ..AllocStats::default()
        };
        let mut free_blocks = shared.free.len() as u64;
        for c in caches {
            s.allocations += c.allocations;
            s.frees += c.frees;
            s.failures += c.failures;
            free_blocks += c.free.len() as u64;
        }
        s.live_blocks = u64::from(self.capacity_blocks) - free_blocks;
        s.in_use_bytes = s.live_blocks * self.block_bytes;
        s.free_bytes = free_blocks * self.block_bytes;
        s.peak_in_use_bytes = self.peak_blocks.load(Ordering::Acquire) * self.block_bytes;
        s
    }

    fn check_request(&self, bytes: u64) -> Result<(), AllocError> {
        if bytes == 0 {
            Err(AllocError::ZeroSize)
        } else if bytes > self.block_bytes {
            Err(AllocError::TooLarge {
                requested_bytes: bytes,
                capacity_bytes: self.block_bytes,
            })
        } else {
            Ok(())
        }
    }

    fn check_block(&self, block: Block) -> Result<u32, AllocError> {
        let slot = block.slot();
        if block.allocator_id() != self.id
            || slot >= self.capacity_blocks
            || block.offset_bytes() != u64::from(slot) * self.block_bytes
            || block.len_bytes() != self.block_bytes
        {
            return Err(AllocError::Foreign {
                allocator_id: block.allocator_id(),
                offset_bytes: block.offset_bytes(),
            });
        }
        Ok(slot)
    }

    fn budget_error(&self, requested_bytes: u64) -> AllocError {
        let live = self.live_blocks.load(Ordering::Acquire);
        let limit = self.limit_blocks.load(Ordering::Acquire);
        let free_blocks = limit.saturating_sub(live);
        AllocError::OutOfMemory {
            kind: self.kind,
            requested_bytes,
            free_bytes: free_blocks * self.block_bytes,
            largest_free_bytes: if free_blocks > 0 { self.block_bytes } else { 0 },
        }
    }

    /// Adds `count` to the live counter if the budget allows; updates the peak. One atomic
    /// read-modify-write when no budget below the capacity is set (the free lists then
    /// enforce the capacity), a CAS loop otherwise; the peak is written only when it rises.
    fn reserve_live(&self, count: u64) -> bool {
        let limit = self.limit_blocks.load(Ordering::Acquire);
        let before = if limit >= u64::from(self.capacity_blocks) {
            self.live_blocks.fetch_add(count, Ordering::AcqRel)
        } else {
            match self
                .live_blocks
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |live| {
                    live.checked_add(count).filter(|&n| n <= limit)
                }) {
                Ok(before) => before,
                Err(_) => return false,
            }
        };
        if before + count > self.peak_blocks.load(Ordering::Acquire) {
            self.peak_blocks.fetch_max(before + count, Ordering::AcqRel);
        }
        true
    }

    /// Makes sure the cache holds `count` free blocks (refilling from the shared stack) and
    /// reserves them against the budget. `Err(true)`: over budget; `Err(false)`: not enough
    /// blocks in this cache and the shared stack.
    fn pop_locked(&self, c: &mut Cache, count: usize) -> Result<(), bool> {
        if c.free.len() < count {
            let mut shared = self.shared.lock();
            let want = (count - c.free.len()).max(self.refill_batch);
            let take = want.min(shared.free.len());
            let from = shared.free.len() - take;
            c.free.extend(shared.free.drain(from..).rev());
        }
        if c.free.len() < count {
            return Err(false);
        }
        if !self.reserve_live(count as u64) {
            return Err(true);
        }
        Ok(())
    }

    /// Marks free block `slot` (just popped from a free list, reserved) live with one reference.
    fn make_live_locked(&self, c: &mut Cache, slot: u32) -> Block {
        let state = &self.states[slot as usize];
        // A free block's word has refcount 0, and every writer CASes from refcount >= 1, so
        // nobody else writes it now: a load and a store suffice.
        let generation = ((state.load(Ordering::Acquire) >> 32) as u32).wrapping_add(1);
        state.store(u64::from(generation) << 32 | 1, Ordering::Release);
        c.allocations += 1;
        Block::from_parts(
            self.id,
            slot,
            encode_generation(generation, self.salt),
            u64::from(slot) * self.block_bytes,
            self.block_bytes,
        )
    }

    fn release_locked(
        &self,
        c: &mut Cache,
        slot: u32,
        block: Block,
    ) -> Result<Released, AllocError> {
        let claimed = decode_generation(block.generation(), self.salt);
        let state = &self.states[slot as usize];
        let mut w = state.load(Ordering::Acquire);
        loop {
            let (generation, refs) = ((w >> 32) as u32, w & REFS);
            if generation != claimed || refs == 0 {
                return Err(classify_bad_free(
                    self.id,
                    block.offset_bytes(),
                    claimed,
                    generation,
                    refs > 0,
                ));
            }
            match state.compare_exchange_weak(w, w - 1, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) if refs == 1 => break,
                Ok(_) => {
                    return Ok(Released::StillShared {
                        refs_left: (refs - 1) as u32,
                    });
                }
                Err(now) => w = now,
            }
        }
        c.free.push(slot);
        c.frees += 1;
        Ok(Released::Freed)
    }

    fn flush_if_over_locked(&self, c: &mut Cache) {
        if c.free.len() > self.cache_limit {
            let keep = self.cache_limit / 2;
            let mut shared = self.shared.lock();
            shared.free.extend(c.free.drain(keep..));
        }
    }

    /// The cache and the shared stack were empty: look everywhere, holding every cache lock
    /// (ascending) and the shared lock, so "out of memory" means no block was free at all.
    fn allocate_slow(&self, bytes: u64) -> Result<Block, AllocError> {
        let mut caches = self.lock_all_caches();
        let mut shared = self.shared.lock();
        let found = shared
            .free
            .pop()
            .or_else(|| caches.iter_mut().find_map(|c| c.free.pop()));
        let first = &mut caches[0];
        match found {
            Some(slot) if self.reserve_live(1) => Ok(self.make_live_locked(first, slot)),
            Some(slot) => {
                shared.free.push(slot);
                first.failures += 1;
                drop(shared);
                Err(self.budget_error(bytes))
            }
            None => {
                first.failures += 1;
                Err(AllocError::OutOfMemory {
                    kind: self.kind,
                    requested_bytes: bytes,
                    free_bytes: 0,
                    largest_free_bytes: 0,
                })
            }
        }
    }
}

#[cfg(not(vlmem_loom))]
fn thread_cache_index() -> usize {
    // Plain std atomic: it only hands out distinct numbers.
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    thread_local! {
        static INDEX: usize = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    INDEX.with(|i| *i)
}

/// Under loom every model thread would share one OS thread's locals; models pass cache
/// indices explicitly instead.
#[cfg(vlmem_loom)]
fn thread_cache_index() -> usize {
    0
}

impl OffsetAllocator for SlabPool {
    fn allocate(&self, bytes: u64) -> Result<Block, AllocError> {
        SlabPool::allocate(self, bytes)
    }
    /// Drops one reference; the last one frees the block.
    fn free(&self, block: Block) -> Result<(), AllocError> {
        self.release(block).map(|_| ())
    }
    fn capacity_bytes(&self) -> u64 {
        u64::from(self.capacity_blocks) * self.block_bytes
    }
    fn usage(&self) -> ArenaUsage {
        let s = self.stats();
        ArenaUsage {
            capacity_bytes: s.capacity_bytes,
            in_use_bytes: s.in_use_bytes,
            free_bytes: s.free_bytes,
            largest_free_bytes: if s.free_bytes > 0 {
                self.block_bytes
            } else {
                0
            },
        }
    }
}

#[cfg(all(test, not(vlmem_loom)))]
mod tests {
    use super::*;

    fn slab(capacity_blocks: u32, cache_blocks: u32, caches: u32) -> SlabPool {
        SlabPool::new(SlabConfig {
            block_bytes: 65536,
            capacity_blocks,
            cache_blocks,
            caches,
            kind: Some(TensorKind::KvCache),
        })
        .unwrap()
    }

    #[test]
    fn config_errors() {
        let cfg = SlabConfig {
            block_bytes: 64,
            capacity_blocks: 4,
            cache_blocks: 2,
            caches: 2,
            kind: None,
        };
        assert!(
            SlabPool::new(SlabConfig {
                block_bytes: 0,
                ..cfg
            })
            .is_err()
        );
        assert!(
            SlabPool::new(SlabConfig {
                capacity_blocks: 0,
                ..cfg
            })
            .is_err()
        );
        assert!(SlabPool::new(SlabConfig { caches: 0, ..cfg }).is_err());
        assert!(
            SlabPool::new(SlabConfig {
                block_bytes: u64::MAX,
                ..cfg
            })
            .is_err()
        );
        assert!(SlabPool::new(cfg).is_ok());
    }

    #[test]
    fn fills_exactly_and_reports_oom() {
        let p = slab(10, 4, 3);
        let blocks: Vec<Block> = (0..10)
            .map(|i| p.allocate_with_cache(i, 65536).unwrap())
            .collect();
        let mut offs: Vec<u64> = blocks.iter().map(|b| b.offset_bytes()).collect();
        offs.sort_unstable();
        offs.dedup();
        assert_eq!(offs.len(), 10);
        assert_eq!(
            p.allocate(1),
            Err(AllocError::OutOfMemory {
                kind: Some(TensorKind::KvCache),
                requested_bytes: 1,
                free_bytes: 0,
                largest_free_bytes: 0
            })
        );
        assert_eq!(p.allocate(0), Err(AllocError::ZeroSize));
        assert!(matches!(
            p.allocate(65537),
            Err(AllocError::TooLarge { .. })
        ));
        // Free everything into cache 2: the cache flushes its overflow to the shared stack.
        for b in &blocks {
            assert_eq!(p.release_with_cache(2, *b), Ok(Released::Freed));
        }
        let s = p.stats();
        assert_eq!(
            (
                s.allocations,
                s.frees,
                s.failures,
                s.live_blocks,
                s.in_use_bytes
            ),
            (10, 10, 1, 0, 0)
        );
        assert_eq!(s.peak_in_use_bytes, 10 * 65536);
        p.audit().unwrap();
        // Blocks parked in cache 2 are found by a thread using cache 0 (slow path).
        let again: Vec<Block> = (0..10)
            .map(|_| p.allocate_with_cache(0, 1).unwrap())
            .collect();
        assert_eq!(p.stats().live_blocks, 10);
        p.release_batch_with_cache(1, &again).unwrap();
        p.audit().unwrap();
    }

    #[test]
    fn stale_double_foreign_and_refcounts() {
        let p = slab(4, 2, 2);
        let b = p.allocate(100).unwrap();
        assert_eq!(p.retain(b), Ok(2));
        assert_eq!(p.refs(b), 2);
        assert_eq!(
            p.release_with_cache(1, b),
            Ok(Released::StillShared { refs_left: 1 })
        );
        assert_eq!(p.stats().live_blocks, 1);
        assert_eq!(p.release_with_cache(0, b), Ok(Released::Freed));
        assert_eq!(
            p.release(b),
            Err(AllocError::DoubleFree {
                offset_bytes: b.offset_bytes()
            })
        );
        assert_eq!(
            p.retain(b),
            Err(AllocError::DoubleFree {
                offset_bytes: b.offset_bytes()
            })
        );
        // Reuse the same slot: the old handle is now stale.
        let mut out = Vec::new();
        p.allocate_batch_with_cache(0, 4, &mut out).unwrap();
        assert!(out.iter().any(|x| x.slot() == b.slot()));
        assert_eq!(
            p.release(b),
            Err(AllocError::Stale {
                offset_bytes: b.offset_bytes()
            })
        );
        assert_eq!(p.refs(b), 0);
        let other = slab(4, 2, 2);
        assert!(matches!(
            p.release(other.allocate(1).unwrap()),
            Err(AllocError::Foreign { .. })
        ));
        let forged = Block::from_parts(p.id(), 1, 77, 65536, 65536);
        assert!(matches!(
            p.release(forged),
            Err(AllocError::Foreign { .. }) | Err(AllocError::Stale { .. })
        ));
        let mut more = Vec::new();
        assert!(matches!(
            p.allocate_batch_with_cache(1, 1, &mut more),
            Err(AllocError::OutOfMemory { .. })
        ));
        assert!(more.is_empty());
        // A batch release stops at the first bad block.
        let err = p
            .release_batch_with_cache(0, &[out[0], out[0]])
            .unwrap_err();
        assert_eq!(err.0, 1);
        p.release_batch_with_cache(0, &out[1..]).unwrap();
        p.audit().unwrap();
        assert_eq!(p.stats().live_blocks, 0);
    }

    #[test]
    fn budget_in_blocks() {
        let p = slab(8, 4, 1);
        p.set_limit_bytes(2 * 65536 + 5);
        let a = p.allocate(1).unwrap();
        let b = p.allocate(1).unwrap();
        let e = p.allocate(1).unwrap_err();
        assert!(matches!(e, AllocError::OutOfMemory { free_bytes: 0, .. }));
        let mut v = Vec::new();
        assert!(p.allocate_batch_with_cache(0, 1, &mut v).is_err());
        p.release(a).unwrap();
        p.release(b).unwrap();
        assert_eq!(p.stats().failures, 2);
        assert_eq!(p.stats().limit_bytes, 2 * 65536);
        p.audit().unwrap();
        assert_eq!(p.fragmentation().external_fragmentation, 0.0);
        assert_eq!(p.fragmentation().largest_free_bytes, 65536);
    }
}
