//! A binned O(1) offset allocator (TLSF-like) for variable-size tensors, with compaction.
//!
//! Free extents live in 2,048 bins indexed by a "small float" of their size in granules:
//! sizes below 32 granules have exact bins, larger ones 32 linear sub-bins per power of two
//! (a 5-bit mantissa, TLSF's SLI = 5), so a bin's sizes are within 1/32 of each other. A
//! two-level bitmap (one `u64` of groups, one `u32` of bins per group) finds the first
//! non-empty bin at or above a request with two `trailing_zeros`; alloc and free are O(1).
//!
//! Requests are rounded **up to their bin's size** (at most 3.1% more): a freed block then
//! lands in exactly the bin that a request of the same size searches, so runs of same-size
//! requests reuse holes and fill the arena (the plain OffsetAllocator reaches about 0.68 there:
//! it inserts a freed block one bin below where equal requests look).
//!
//! Metadata is out of band: a `Vec` of nodes (offset, size, bin links, address-neighbour
//! links, generation, state) plus a stack of unused node indices; a block's slot is its node
//! index, so free needs no lookup. Free merges with both address neighbours in O(1).
//!
//! Concurrency: one mutex per allocator; every public method locks once and passes
//! `&mut BinnedInner` down to private `*_locked` helpers, which never lock.
//!
//! Compaction (see [`BinnedAllocator::plan_compaction`]) reserves a region, hands out a move
//! list, and re-lays the region out at commit; it can run while other threads allocate and
//! free.

use crate::handle::{
    classify_bad_free, decode_generation, encode_generation, new_identity, unit_shift, units_for,
};
use crate::stats::{AllocStats, Counters, FragmentationReport};
use crate::{Audit, CompactionError};
use vlmem_core::sync::Mutex;
use vlmem_core::{AllocError, ArenaUsage, Block, OffsetAllocator, TensorKind};

const NIL: u32 = u32::MAX;
const MANT_BITS: u32 = 5;
const SUB_BINS: u64 = 1 << MANT_BITS;
const GROUPS: usize = 64;
const BINS: usize = GROUPS << MANT_BITS;
/// How many nodes of the bin below a request are examined when no bin at or above it has a
/// free extent (the near-full case: an extent that fits but whose bin is below the request's).
const NEAR_FULL_SCAN: usize = 16;
/// The largest arena, in granules, keeps every rounded size below 2^63.
const MAX_UNITS: u64 = 1 << 62;

/// The bin whose sizes are all `<= units` (where a free extent of `units` is listed).
fn bin_round_down(units: u64) -> usize {
    if units < SUB_BINS {
        return units as usize;
    }
    let shift = 63 - units.leading_zeros() - MANT_BITS;
    let mantissa = units >> shift;
    ((((shift + 1) as u64) << MANT_BITS) | (mantissa - SUB_BINS)) as usize
}

/// The first bin whose sizes are all `>= units` (where a request of `units` looks).
fn bin_round_up(units: u64) -> usize {
    if units < SUB_BINS {
        return units as usize;
    }
    let mut shift = 63 - units.leading_zeros() - MANT_BITS;
    let mut mantissa = units >> shift;
    if units & ((1u64 << shift) - 1) != 0 {
        mantissa += 1;
        if mantissa == 2 * SUB_BINS {
            mantissa = SUB_BINS;
            shift += 1;
        }
    }
    ((((shift + 1) as u64) << MANT_BITS) | (mantissa - SUB_BINS)) as usize
}

/// The smallest size (in granules) listed in `bin`.
fn bin_size(bin: usize) -> u64 {
    let bin = bin as u64;
    if bin < SUB_BINS {
        bin
    } else {
        ((bin & (SUB_BINS - 1)) | SUB_BINS) << ((bin >> MANT_BITS) - 1)
    }
}

/// Configuration of a [`BinnedAllocator`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BinnedConfig {
    /// Size of the arena; a multiple of `granule_bytes`.
    pub capacity_bytes: u64,
    /// The allocation unit and alignment of every offset; a power of two (e.g. 256 B for
    /// activations, 4 KiB for host memory and files).
    pub granule_bytes: u64,
    /// The typed pool this allocator serves, reported in out-of-memory errors.
    pub kind: Option<TensorKind>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NodeState {
    /// In the unused-node stack.
    Unused,
    /// A free extent, listed in its bin.
    Free,
    /// A live block.
    Live,
    /// A live block inside an in-flight compaction plan.
    Moving,
    /// A block freed by its owner while it was being moved; its space is released at commit.
    MovingFreed,
    /// A free extent reserved by a compaction plan (a move destination).
    Reserved,
}

#[derive(Debug, Clone, Copy)]
struct Node {
    offset: u64,
    size: u64,
    bin_prev: u32,
    bin_next: u32,
    nb_prev: u32,
    nb_next: u32,
    generation: u32,
    state: NodeState,
}

#[derive(Debug)]
struct PlanState {
    plan_id: u64,
    start_units: u64,
    end_units: u64,
    /// The region's nodes in address order at plan time.
    region: Vec<u32>,
    /// Moving nodes and their destinations, in address order.
    dests: Vec<(u32, u64)>,
}

/// A thread-safe binned (TLSF-like) offset allocator. See the module docs.
#[derive(Debug)]
pub struct BinnedAllocator {
    id: u32,
    salt: u32,
    unit_shift: u32,
    capacity_bytes: u64,
    kind: Option<TensorKind>,
    inner: Mutex<BinnedInner>,
}

#[derive(Debug)]
struct BinnedInner {
    nodes: Vec<Node>,
    unused: Vec<u32>,
    bin_heads: Vec<u32>,
    top: u64,
    groups: [u32; GROUPS],
    /// The node at offset 0 (address-order walks start here).
    head: u32,
    free_units: u64,
    reserved_units: u64,
    counters: Counters,
    limit_bytes: u64,
    plan: Option<PlanState>,
    next_plan_id: u64,
}

/// One block to move: copy `len_bytes` from `from_offset_bytes` to `to_offset_bytes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompactionMove {
    /// The block being moved, as its owner knows it (valid until commit).
    pub block: Block,
    /// Where its bytes are now.
    pub from_offset_bytes: u64,
    /// Where they go (always lower than `from_offset_bytes`; the ranges may overlap, so copy
    /// with memmove semantics).
    pub to_offset_bytes: u64,
    /// Bytes to copy.
    pub len_bytes: u64,
}

/// A move list returned by [`BinnedAllocator::plan_compaction`]. Commit or abort it.
#[derive(Debug, PartialEq, Eq)]
#[must_use = "a plan holds its region until it is committed or aborted"]
pub struct CompactionPlan {
    allocator_id: u32,
    /// 0 for an empty plan (nothing to move; nothing reserved).
    plan_id: u64,
    moves: Vec<CompactionMove>,
}

impl CompactionPlan {
    /// The moves, in the order their copies must be done.
    pub fn moves(&self) -> &[CompactionMove] {
        &self.moves
    }
    /// True when there is nothing to move.
    pub fn is_empty(&self) -> bool {
        self.moves.is_empty()
    }
    /// Total bytes to copy.
    pub fn bytes_to_copy(&self) -> u64 {
        self.moves.iter().map(|m| m.len_bytes).sum()
    }
}

/// What a commit (or abort) did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CompactionOutcome {
    /// (old block, new block) for every block that moved. The old handle is stale now.
    pub moved: Vec<(Block, Block)>,
    /// Blocks whose owners freed them while the plan was in flight; their moves were
    /// skipped and their space released.
    pub freed_during_plan: Vec<Block>,
    /// Free bytes after the commit.
    pub free_bytes: u64,
    /// The largest free extent after the commit.
    pub largest_free_bytes: u64,
}

impl BinnedAllocator {
    /// A binned allocator over `config.capacity_bytes`.
    pub fn new(config: BinnedConfig) -> Result<Self, AllocError> {
        let shift = unit_shift("granule_bytes", config.granule_bytes)?;
        if config.capacity_bytes == 0 || config.capacity_bytes & (config.granule_bytes - 1) != 0 {
            return Err(AllocError::InvalidConfig(format!(
                "capacity_bytes ({}) must be a non-zero multiple of granule_bytes ({})",
                config.capacity_bytes, config.granule_bytes
            )));
        }
        let units = config.capacity_bytes >> shift;
        if units > MAX_UNITS {
            return Err(AllocError::InvalidConfig(format!(
                "{units} granules is too many (at most 2^62)"
            )));
        }
        let mut inner = BinnedInner {
            nodes: Vec::with_capacity(64),
            unused: Vec::new(),
            bin_heads: vec![NIL; BINS],
            top: 0,
            groups: [0; GROUPS],
            head: 0,
            free_units: 0,
            reserved_units: 0,
            counters: Counters::default(),
            limit_bytes: config.capacity_bytes,
            plan: None,
            next_plan_id: 1,
        };
        let first = inner.new_node(0, units);
        inner.head = first;
        inner.insert_free(first);
        let (id, salt) = new_identity();
        Ok(BinnedAllocator {
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

    /// The allocation unit.
    pub fn granule_bytes(&self) -> u64 {
        1 << self.unit_shift
    }

    /// The bytes a request of `bytes` reserves (rounded to granules, then up to its bin).
    pub fn rounded_bytes(&self, bytes: u64) -> Option<u64> {
        if bytes == 0 || bytes > self.capacity_bytes {
            return None;
        }
        let units = units_for(bytes, self.unit_shift);
        Some(
            bin_size(bin_round_up(units)).min(self.capacity_bytes >> self.unit_shift)
                << self.unit_shift,
        )
    }

    /// Reserves a block of at least `bytes`.
    pub fn allocate(&self, bytes: u64) -> Result<Block, AllocError> {
        if bytes == 0 {
            return Err(AllocError::ZeroSize);
        }
        if bytes > self.capacity_bytes {
            return Err(AllocError::TooLarge {
                requested_bytes: bytes,
                capacity_bytes: self.capacity_bytes,
            });
        }
        let units = units_for(bytes, self.unit_shift);
        // The only lock() of the allocation path.
        let mut inner = self.inner.lock();
        inner.allocate_locked(units, bytes, self)
    }

    /// Returns a block. Stale, double-freed and foreign blocks are refused and change nothing.
    /// A block inside an in-flight compaction plan is freed for its owner at once; its space
    /// comes back when the plan is committed or aborted.
    pub fn free(&self, block: Block) -> Result<(), AllocError> {
        if block.allocator_id() != self.id {
            return Err(AllocError::Foreign {
                allocator_id: block.allocator_id(),
                offset_bytes: block.offset_bytes(),
            });
        }
        // The only lock() of the free path.
        let mut inner = self.inner.lock();
        inner.free_locked(block, self)
    }

    /// Sets the byte budget (clamped to the capacity); see
    /// [`BuddyAllocator::set_limit_bytes`](crate::BuddyAllocator::set_limit_bytes).
    pub fn set_limit_bytes(&self, limit_bytes: u64) {
        self.inner.lock().limit_bytes = limit_bytes.min(self.capacity_bytes);
    }

    /// A consistent snapshot of the counters.
    pub fn stats(&self) -> AllocStats {
        let inner = self.inner.lock();
        inner.stats_locked(self.capacity_bytes, self.unit_shift)
    }

    /// Fragmentation metrics from one consistent view. O(nodes).
    pub fn fragmentation(&self) -> FragmentationReport {
        let inner = self.inner.lock();
        let extents = inner
            .nodes
            .iter()
            .filter(|n| n.state == NodeState::Free)
            .map(|n| n.size);
        FragmentationReport::from_free_extents(self.capacity_bytes, self.unit_shift, extents)
    }

    /// Walks the structure under the lock and checks its invariants (address chain covers
    /// the arena, no two free neighbours, bins match sizes, counters equal walked sums).
    pub fn audit(&self) -> Result<Audit, String> {
        let inner = self.inner.lock();
        inner.audit_locked(self.capacity_bytes, self.unit_shift)
    }

    /// Plans a compaction that slides every live block after the first free extent down, so
    /// that, once committed, the free space is one extent at the end of the used space.
    ///
    /// Protocol (it runs while other threads allocate and free):
    /// 1. `plan_compaction()` reserves, under the lock, the region from the first free extent
    ///    to the end of the last live block: its free extents become reserved (no allocation
    ///    can land there) and its live blocks become "moving".
    /// 2. The caller copies each move's bytes, in the plan's order, with memmove semantics,
    ///    while it keeps the moving blocks' owners from writing them (the tier manager's
    ///    handle table marks them Moving). No allocator lock is held meanwhile.
    /// 3. [`commit_compaction`](Self::commit_compaction) re-lays the region out under the
    ///    lock and returns the new block for every moved one (the old handles become stale).
    ///    A block its owner freed during the plan is skipped and its space released; the
    ///    owner's free succeeded at once, but the space stayed reserved until commit, so the
    ///    in-flight copy could never overwrite a new owner's data.
    ///    Or [`abort_compaction`](Self::abort_compaction) releases the plan, moving nothing.
    ///
    /// One plan at a time per allocator; a second call while one is in flight fails with
    /// [`CompactionError::PlanInProgress`].
    pub fn plan_compaction(&self) -> Result<CompactionPlan, CompactionError> {
        let mut inner = self.inner.lock();
        inner.plan_locked(self)
    }

    /// Commits a plan after its copies are done. See [`plan_compaction`](Self::plan_compaction).
    pub fn commit_compaction(
        &self,
        plan: CompactionPlan,
    ) -> Result<CompactionOutcome, CompactionError> {
        self.finish_plan(plan, true)
    }

    /// Gives a plan up: every block stays where it was (handles stay valid), reserved
    /// space is freed again.
    pub fn abort_compaction(
        &self,
        plan: CompactionPlan,
    ) -> Result<CompactionOutcome, CompactionError> {
        self.finish_plan(plan, false)
    }

    fn finish_plan(
        &self,
        plan: CompactionPlan,
        apply_moves: bool,
    ) -> Result<CompactionOutcome, CompactionError> {
        if plan.allocator_id != self.id {
            return Err(CompactionError::UnknownPlan {
                plan_id: plan.plan_id,
            });
        }
        let mut inner = self.inner.lock();
        if plan.plan_id == 0 {
            return Ok(inner.outcome_locked(self.unit_shift));
        }
        match &inner.plan {
            Some(p) if p.plan_id == plan.plan_id => {}
            _ => {
                return Err(CompactionError::UnknownPlan {
                    plan_id: plan.plan_id,
                });
            }
        }
        Ok(inner.finish_plan_locked(apply_moves, self))
    }
}

impl BinnedInner {
    fn new_node(&mut self, offset: u64, size: u64) -> u32 {
        let node = Node {
            offset,
            size,
            bin_prev: NIL,
            bin_next: NIL,
            nb_prev: NIL,
            nb_next: NIL,
            generation: 0,
            state: NodeState::Unused,
        };
        if let Some(i) = self.unused.pop() {
            let generation = self.nodes[i as usize].generation;
            self.nodes[i as usize] = Node { generation, ..node };
            i
        } else {
            // Node count is bounded by 2 * live blocks + 1 < 2^32 (a block is >= 1 granule and
            // the arena is < 2^62 granules, but blocks are counted in u32 slots): refuse to
            // grow past u32 range by construction in allocate_locked.
            self.nodes.push(node);
            (self.nodes.len() - 1) as u32
        }
    }

    fn release_node(&mut self, i: u32) {
        self.nodes[i as usize].state = NodeState::Unused;
        self.unused.push(i);
    }

    fn insert_free(&mut self, i: u32) {
        let size = self.nodes[i as usize].size;
        let bin = bin_round_down(size);
        let head = self.bin_heads[bin];
        {
            let n = &mut self.nodes[i as usize];
            n.state = NodeState::Free;
            n.bin_prev = NIL;
            n.bin_next = head;
        }
        if head != NIL {
            self.nodes[head as usize].bin_prev = i;
        }
        self.bin_heads[bin] = i;
        let g = bin >> MANT_BITS;
        self.groups[g] |= 1 << (bin & (SUB_BINS as usize - 1));
        self.top |= 1 << g;
        self.free_units += size;
    }

    fn remove_free(&mut self, i: u32) {
        let n = self.nodes[i as usize];
        let bin = bin_round_down(n.size);
        if n.bin_prev == NIL {
            self.bin_heads[bin] = n.bin_next;
        } else {
            self.nodes[n.bin_prev as usize].bin_next = n.bin_next;
        }
        if n.bin_next != NIL {
            self.nodes[n.bin_next as usize].bin_prev = n.bin_prev;
        }
        if self.bin_heads[bin] == NIL {
            let g = bin >> MANT_BITS;
            self.groups[g] &= !(1 << (bin & (SUB_BINS as usize - 1)));
            if self.groups[g] == 0 {
                self.top &= !(1 << g);
            }
        }
        self.free_units -= n.size;
    }

    fn find_bin_at_least(&self, bin: usize) -> Option<usize> {
        let g = bin >> MANT_BITS;
        let in_group = self.groups[g] & (u32::MAX << (bin & (SUB_BINS as usize - 1)));
        if in_group != 0 {
            return Some((g << MANT_BITS) | in_group.trailing_zeros() as usize);
        }
        let higher = if g + 1 >= GROUPS {
            0
        } else {
            self.top & (u64::MAX << (g + 1))
        };
        if higher == 0 {
            return None;
        }
        let g2 = higher.trailing_zeros() as usize;
        Some((g2 << MANT_BITS) | self.groups[g2].trailing_zeros() as usize)
    }

    fn largest_free_units(&self) -> u64 {
        if self.top == 0 {
            return 0;
        }
        let g = 63 - self.top.leading_zeros() as usize;
        let bin = (g << MANT_BITS) | (31 - self.groups[g].leading_zeros() as usize);
        let mut best = 0;
        let mut cur = self.bin_heads[bin];
        while cur != NIL {
            best = best.max(self.nodes[cur as usize].size);
            cur = self.nodes[cur as usize].bin_next;
        }
        best
    }

    /// Links `new` right after `after` in address order.
    fn link_after(&mut self, after: u32, new: u32) {
        let next = self.nodes[after as usize].nb_next;
        self.nodes[new as usize].nb_prev = after;
        self.nodes[new as usize].nb_next = next;
        self.nodes[after as usize].nb_next = new;
        if next != NIL {
            self.nodes[next as usize].nb_prev = new;
        }
    }

    /// Unlinks `i` from the address chain.
    fn unlink(&mut self, i: u32) {
        let Node {
            nb_prev, nb_next, ..
        } = self.nodes[i as usize];
        if nb_prev != NIL {
            self.nodes[nb_prev as usize].nb_next = nb_next;
        }
        if nb_next != NIL {
            self.nodes[nb_next as usize].nb_prev = nb_prev;
        }
    }

    fn out_of_memory(&mut self, requested_bytes: u64, outer: &BinnedAllocator) -> AllocError {
        self.counters.failures += 1;
        let real_free = self.free_units << outer.unit_shift;
        AllocError::OutOfMemory {
            kind: outer.kind,
            requested_bytes,
            free_bytes: real_free.min(self.limit_bytes.saturating_sub(self.counters.in_use_bytes)),
            largest_free_bytes: self.largest_free_units() << outer.unit_shift,
        }
    }

    fn allocate_locked(
        &mut self,
        units: u64,
        requested_bytes: u64,
        outer: &BinnedAllocator,
    ) -> Result<Block, AllocError> {
        let bin = bin_round_up(units);
        let mut want = bin_size(bin);
        let found = match self.find_bin_at_least(bin) {
            Some(b) => Some(self.bin_heads[b]),
            None => {
                // Near full: an extent of the bin below may still hold `units`.
                let mut cur = self.bin_heads[bin_round_down(units)];
                let mut hit = None;
                for _ in 0..NEAR_FULL_SCAN {
                    if cur == NIL {
                        break;
                    }
                    if self.nodes[cur as usize].size >= units {
                        hit = Some(cur);
                        break;
                    }
                    cur = self.nodes[cur as usize].bin_next;
                }
                hit
            }
        };
        let Some(i) = found else {
            return Err(self.out_of_memory(requested_bytes, outer));
        };
        want = want.min(self.nodes[i as usize].size);
        let len_bytes = want << outer.unit_shift;
        let too_many_nodes = self.unused.is_empty() && self.nodes.len() >= (NIL - 1) as usize;
        if self.counters.in_use_bytes + len_bytes > self.limit_bytes || too_many_nodes {
            return Err(self.out_of_memory(requested_bytes, outer));
        }
        self.remove_free(i);
        let node = self.nodes[i as usize];
        if node.size > want {
            let rest = self.new_node(node.offset + want, node.size - want);
            self.link_after(i, rest);
            self.insert_free(rest);
        }
        let n = &mut self.nodes[i as usize];
        n.size = want;
        n.state = NodeState::Live;
        n.generation = n.generation.wrapping_add(1);
        let block = Block::from_parts(
            outer.id,
            i,
            encode_generation(n.generation, outer.salt),
            n.offset << outer.unit_shift,
            len_bytes,
        );
        self.counters.on_alloc(len_bytes);
        Ok(block)
    }

    fn free_locked(&mut self, block: Block, outer: &BinnedAllocator) -> Result<(), AllocError> {
        let foreign = AllocError::Foreign {
            allocator_id: block.allocator_id(),
            offset_bytes: block.offset_bytes(),
        };
        let Some(node) = self.nodes.get(block.slot() as usize).copied() else {
            return Err(foreign);
        };
        let claimed = decode_generation(block.generation(), outer.salt);
        let live = matches!(node.state, NodeState::Live | NodeState::Moving);
        if !live || node.generation != claimed {
            return Err(classify_bad_free(
                outer.id,
                block.offset_bytes(),
                claimed,
                node.generation,
                live,
            ));
        }
        if block.offset_bytes() != node.offset << outer.unit_shift
            || block.len_bytes() != node.size << outer.unit_shift
        {
            return Err(foreign);
        }
        self.counters.on_free(block.len_bytes());
        if node.state == NodeState::Moving {
            self.nodes[block.slot() as usize].state = NodeState::MovingFreed;
            self.reserved_units += node.size;
        } else {
            self.free_and_merge_locked(block.slot());
        }
        Ok(())
    }

    /// Lists node `i` (not in any bin) as free, merged with free address neighbours.
    fn free_and_merge_locked(&mut self, mut i: u32) {
        let prev = self.nodes[i as usize].nb_prev;
        if prev != NIL && self.nodes[prev as usize].state == NodeState::Free {
            self.remove_free(prev);
            self.nodes[prev as usize].size += self.nodes[i as usize].size;
            self.unlink(i);
            self.release_node(i);
            i = prev;
        }
        let next = self.nodes[i as usize].nb_next;
        if next != NIL && self.nodes[next as usize].state == NodeState::Free {
            self.remove_free(next);
            self.nodes[i as usize].size += self.nodes[next as usize].size;
            self.unlink(next);
            self.release_node(next);
        }
        self.insert_free(i);
    }

    fn stats_locked(&self, capacity_bytes: u64, shift: u32) -> AllocStats {
        let c = &self.counters;
        AllocStats {
            capacity_bytes,
            allocations: c.allocations,
            frees: c.frees,
            failures: c.failures,
            in_use_bytes: c.in_use_bytes,
            peak_in_use_bytes: c.peak_in_use_bytes,
            live_blocks: c.live_blocks,
            free_bytes: self.free_units << shift,
            compaction_reserved_bytes: self.reserved_units << shift,
            limit_bytes: self.limit_bytes,
        }
    }

    fn outcome_locked(&self, shift: u32) -> CompactionOutcome {
        CompactionOutcome {
            moved: Vec::new(),
            freed_during_plan: Vec::new(),
            free_bytes: self.free_units << shift,
            largest_free_bytes: self.largest_free_units() << shift,
        }
    }

    fn block_of(&self, i: u32, outer: &BinnedAllocator) -> Block {
        let n = &self.nodes[i as usize];
        Block::from_parts(
            outer.id,
            i,
            encode_generation(n.generation, outer.salt),
            n.offset << outer.unit_shift,
            n.size << outer.unit_shift,
        )
    }

    fn plan_locked(&mut self, outer: &BinnedAllocator) -> Result<CompactionPlan, CompactionError> {
        if self.plan.is_some() {
            return Err(CompactionError::PlanInProgress);
        }
        let empty = CompactionPlan {
            allocator_id: outer.id,
            plan_id: 0,
            moves: Vec::new(),
        };
        let mut region = Vec::new();
        let mut cur = self.head;
        while cur != NIL {
            let n = &self.nodes[cur as usize];
            if !region.is_empty() || n.state == NodeState::Free {
                region.push(cur);
            }
            cur = n.nb_next;
        }
        let Some(last_live) = region
            .iter()
            .rposition(|&i| self.nodes[i as usize].state == NodeState::Live)
        else {
            return Ok(empty);
        };
        region.truncate(last_live + 1);
        let start_units = self.nodes[region[0] as usize].offset;
        let last = self.nodes[region[last_live] as usize];
        let end_units = last.offset + last.size;
        let mut cursor = start_units;
        let mut dests = Vec::new();
        let mut moves = Vec::new();
        for &i in &region {
            match self.nodes[i as usize].state {
                NodeState::Free => {
                    self.remove_free(i);
                    self.nodes[i as usize].state = NodeState::Reserved;
                    self.reserved_units += self.nodes[i as usize].size;
                }
                NodeState::Live => {
                    let block = self.block_of(i, outer);
                    self.nodes[i as usize].state = NodeState::Moving;
                    dests.push((i, cursor));
                    moves.push(CompactionMove {
                        block,
                        from_offset_bytes: block.offset_bytes(),
                        to_offset_bytes: cursor << outer.unit_shift,
                        len_bytes: block.len_bytes(),
                    });
                    cursor += self.nodes[i as usize].size;
                }
                // No plan is in flight, so no other state can be in the chain.
                _ => {}
            }
        }
        let plan_id = self.next_plan_id;
        self.next_plan_id += 1;
        self.plan = Some(PlanState {
            plan_id,
            start_units,
            end_units,
            region,
            dests,
        });
        Ok(CompactionPlan {
            allocator_id: outer.id,
            plan_id,
            moves,
        })
    }

    fn finish_plan_locked(
        &mut self,
        apply_moves: bool,
        outer: &BinnedAllocator,
    ) -> CompactionOutcome {
        let mut outcome = CompactionOutcome::default();
        let Some(plan) = self.plan.take() else {
            return self.outcome_locked(outer.unit_shift);
        };
        let pred = self.nodes[plan.region[0] as usize].nb_prev;
        let succ = self.nodes[*plan.region.last().unwrap_or(&plan.region[0]) as usize].nb_next;
        // Surviving blocks and where they end up.
        let mut lives = Vec::with_capacity(plan.dests.len());
        for &(i, dest) in &plan.dests {
            match self.nodes[i as usize].state {
                NodeState::Moving => {
                    let to = if apply_moves {
                        dest
                    } else {
                        self.nodes[i as usize].offset
                    };
                    lives.push((i, to));
                }
                NodeState::MovingFreed => {
                    outcome.freed_during_plan.push(self.block_of(i, outer));
                }
                _ => {}
            }
        }
        // Everything else in the region goes back to the unused stack.
        for &i in &plan.region {
            let n = self.nodes[i as usize];
            if matches!(n.state, NodeState::Reserved | NodeState::MovingFreed) {
                self.reserved_units -= n.size;
                self.release_node(i);
            }
        }
        // Re-lay the region out: lives at their offsets, free extents in the gaps.
        let mut prev = pred;
        let mut first_in_region = NIL;
        let mut frees = Vec::new();
        let mut cursor = plan.start_units;
        let link = |inner: &mut BinnedInner, prev: &mut u32, i: u32| {
            inner.nodes[i as usize].nb_prev = *prev;
            if *prev != NIL {
                inner.nodes[*prev as usize].nb_next = i;
            }
            *prev = i;
        };
        for &(i, to) in &lives {
            if to > cursor {
                let f = self.new_node(cursor, to - cursor);
                link(self, &mut prev, f);
                frees.push(f);
                if first_in_region == NIL {
                    first_in_region = f;
                }
            }
            let old = self.block_of(i, outer);
            let n = &mut self.nodes[i as usize];
            n.state = NodeState::Live;
            if n.offset != to {
                n.offset = to;
                n.generation = n.generation.wrapping_add(1);
                let new = self.block_of(i, outer);
                outcome.moved.push((old, new));
            }
            link(self, &mut prev, i);
            if first_in_region == NIL {
                first_in_region = i;
            }
            cursor = to + self.nodes[i as usize].size;
        }
        if cursor < plan.end_units {
            let f = self.new_node(cursor, plan.end_units - cursor);
            link(self, &mut prev, f);
            frees.push(f);
            if first_in_region == NIL {
                first_in_region = f;
            }
        }
        self.nodes[prev as usize].nb_next = succ;
        if succ != NIL {
            self.nodes[succ as usize].nb_prev = prev;
        }
        if pred == NIL {
            self.head = first_in_region;
        }
        for f in frees {
            self.free_and_merge_locked(f);
        }
        let rest = self.outcome_locked(outer.unit_shift);
        outcome.free_bytes = rest.free_bytes;
        outcome.largest_free_bytes = rest.largest_free_bytes;
        outcome
    }

    fn audit_locked(&self, capacity_bytes: u64, shift: u32) -> Result<Audit, String> {
        let (mut live, mut in_use, mut free, mut reserved, mut free_nodes) =
            (0u64, 0u64, 0u64, 0u64, 0u64);
        let mut expect = 0u64;
        let mut cur = self.head;
        let mut prev = NIL;
        let mut prev_free = false;
        let mut steps = 0usize;
        while cur != NIL {
            steps += 1;
            if steps > self.nodes.len() {
                return Err("address chain has a cycle".into());
            }
            let n = &self.nodes[cur as usize];
            if n.offset != expect || n.size == 0 || n.nb_prev != prev {
                return Err(format!(
                    "node {cur} at {} (size {}) breaks the chain at {expect}",
                    n.offset, n.size
                ));
            }
            match n.state {
                NodeState::Free => {
                    if prev_free {
                        return Err(format!("free neighbours not merged at {}", n.offset));
                    }
                    free += n.size;
                    free_nodes += 1;
                }
                NodeState::Live | NodeState::Moving => {
                    live += 1;
                    in_use += n.size;
                }
                NodeState::MovingFreed | NodeState::Reserved => reserved += n.size,
                NodeState::Unused => return Err(format!("unused node {cur} in the chain")),
            }
            prev_free = n.state == NodeState::Free;
            expect += n.size;
            prev = cur;
            cur = n.nb_next;
        }
        if expect << shift != capacity_bytes {
            return Err(format!(
                "chain covers {} of {capacity_bytes} bytes",
                expect << shift
            ));
        }
        let mut listed = 0u64;
        for bin in 0..BINS {
            let mut cur = self.bin_heads[bin];
            let bit = self.groups[bin >> MANT_BITS] & (1 << (bin & 31)) != 0;
            if bit != (cur != NIL) {
                return Err(format!("bitmap wrong for bin {bin}"));
            }
            while cur != NIL {
                let n = &self.nodes[cur as usize];
                if n.state != NodeState::Free || bin_round_down(n.size) != bin {
                    return Err(format!("node {cur} misfiled in bin {bin}"));
                }
                listed += 1;
                cur = n.bin_next;
            }
        }
        if listed != free_nodes || free != self.free_units || reserved != self.reserved_units {
            return Err(format!(
                "free nodes listed {listed} vs chained {free_nodes}; free units {free} vs {}; reserved {reserved} vs {}",
                self.free_units, self.reserved_units
            ));
        }
        let audit = Audit {
            stats: self.stats_locked(capacity_bytes, shift),
            walked_live_blocks: live,
            walked_in_use_bytes: in_use << shift,
            walked_free_bytes: free << shift,
        };
        audit.check()?;
        Ok(audit)
    }
}

impl OffsetAllocator for BinnedAllocator {
    fn allocate(&self, bytes: u64) -> Result<Block, AllocError> {
        BinnedAllocator::allocate(self, bytes)
    }
    fn free(&self, block: Block) -> Result<(), AllocError> {
        BinnedAllocator::free(self, block)
    }
    fn capacity_bytes(&self) -> u64 {
        self.capacity_bytes
    }
    fn usage(&self) -> ArenaUsage {
        let inner = self.inner.lock();
        ArenaUsage {
            capacity_bytes: self.capacity_bytes,
            in_use_bytes: inner.counters.in_use_bytes,
            free_bytes: inner.free_units << self.unit_shift,
            largest_free_bytes: inner.largest_free_units() << self.unit_shift,
        }
    }
}

#[cfg(all(test, not(vlmem_loom)))]
mod tests {
    use super::*;

    fn binned(capacity_bytes: u64, granule_bytes: u64) -> BinnedAllocator {
        BinnedAllocator::new(BinnedConfig {
            capacity_bytes,
            granule_bytes,
            kind: Some(TensorKind::Activation),
        })
        .unwrap()
    }

    #[test]
    fn bins_are_monotone_and_bracket_sizes() {
        let mut last = 0;
        for s in 1..200_000u64 {
            let down = bin_round_down(s);
            let up = bin_round_up(s);
            assert!(bin_size(down) <= s && s <= bin_size(up), "size {s}");
            assert!(up == down || up == down + 1);
            assert!(down >= last);
            last = down;
            // Waste from rounding up is at most 1/32.
            assert!((bin_size(up) - s) * 32 <= s, "size {s}");
        }
        for s in [1u64 << 40, (1 << 61) + 1, MAX_UNITS] {
            assert!(bin_size(bin_round_up(s)) >= s);
            assert!(bin_round_up(s) < BINS);
        }
    }

    #[test]
    fn allocate_free_merge_errors() {
        let a = binned(1 << 20, 256);
        assert_eq!(a.allocate(0), Err(AllocError::ZeroSize));
        assert!(matches!(
            a.allocate((1 << 20) + 1),
            Err(AllocError::TooLarge { .. })
        ));
        let x = a.allocate(1000).unwrap();
        assert_eq!((x.offset_bytes(), x.len_bytes()), (0, 1024));
        let y = a.allocate(33 * 256 + 1).unwrap(); // 34 granules -> bin size 34
        assert_eq!(y.len_bytes(), 34 * 256);
        let z = a.allocate(65 * 256).unwrap(); // 65 granules -> rounds up to 66
        assert_eq!(z.len_bytes(), 66 * 256);
        a.free(y).unwrap();
        assert_eq!(
            a.free(y),
            Err(AllocError::DoubleFree {
                offset_bytes: y.offset_bytes()
            })
        );
        let y2 = a.allocate(34 * 256).unwrap();
        assert_eq!(y2.offset_bytes(), y.offset_bytes(), "same-size hole reused");
        assert_eq!(
            a.free(y),
            Err(AllocError::Stale {
                offset_bytes: y.offset_bytes()
            })
        );
        let other = binned(1 << 20, 256);
        assert!(matches!(other.free(x), Err(AllocError::Foreign { .. })));
        let forged = Block::from_parts(a.id(), x.slot(), x.generation(), x.offset_bytes(), 256);
        assert!(matches!(a.free(forged), Err(AllocError::Foreign { .. })));
        let bad_slot = Block::from_parts(a.id(), 9999, 0, 0, 256);
        assert!(matches!(a.free(bad_slot), Err(AllocError::Foreign { .. })));
        for b in [x, y2, z] {
            a.free(b).unwrap();
        }
        let audit = a.audit().unwrap();
        assert_eq!(audit.walked_free_bytes, 1 << 20);
        let f = a.fragmentation();
        assert_eq!((f.free_extents, f.largest_free_bytes), (1, 1 << 20));
    }

    #[test]
    fn whole_arena_and_odd_sizes_fit() {
        // 1000 granules is not a bin size: the near-full scan must still serve it whole.
        let a = binned(1000 * 256, 256);
        let all = a.allocate(1000 * 256).unwrap();
        assert_eq!(all.len_bytes(), 1000 * 256);
        let e = a.allocate(1).unwrap_err();
        assert!(matches!(
            e,
            AllocError::OutOfMemory {
                kind: Some(TensorKind::Activation),
                free_bytes: 0,
                ..
            }
        ));
        a.free(all).unwrap();
        let b = a.allocate(999 * 256).unwrap();
        a.free(b).unwrap();
        assert_eq!(a.stats().failures, 1);
        a.audit().unwrap();
    }

    #[test]
    fn same_size_run_fills_arena() {
        // 4097-granule requests: OffsetAllocator-style bins without round-up fill ~0.68.
        let granule = 4096u64;
        let cap_units = 16u64 << 20;
        let a = binned(cap_units * granule, granule);
        let mut live = Vec::new();
        while let Ok(b) = a.allocate(4097 * granule) {
            live.push(b);
        }
        for round in 0..50 {
            // free every 10th, refill to failure
            let mut keep = Vec::new();
            for (i, b) in live.drain(..).enumerate() {
                if (i + round) % 10 == 0 {
                    a.free(b).unwrap();
                } else {
                    keep.push(b);
                }
            }
            live = keep;
            while let Ok(b) = a.allocate(4097 * granule) {
                live.push(b);
            }
            let used = live.len() as u64 * 4097;
            assert!(
                used as f64 / cap_units as f64 >= 0.95,
                "round {round}: {}",
                used as f64 / cap_units as f64
            );
        }
        a.audit().unwrap();
    }

    #[test]
    fn compaction_makes_free_space_contiguous() {
        let a = binned(64 * 256, 256);
        let blocks: Vec<Block> = (0..8).map(|_| a.allocate(4 * 256).unwrap()).collect();
        // Free every other block: four 4-granule holes plus the 32-granule tail.
        for b in blocks.iter().step_by(2) {
            a.free(*b).unwrap();
        }
        let before = a.fragmentation();
        assert_eq!(before.free_extents, 5);
        assert!(before.external_fragmentation > 0.0);
        let plan = a.plan_compaction().unwrap();
        assert!(matches!(
            a.plan_compaction(),
            Err(CompactionError::PlanInProgress)
        ));
        assert_eq!(plan.moves().len(), 4);
        assert_eq!(plan.bytes_to_copy(), 4 * 4 * 256);
        // While the plan is in flight, allocations cannot land in the region.
        let region_end = plan
            .moves()
            .last()
            .map(|m| m.from_offset_bytes + m.len_bytes)
            .unwrap();
        let during = a.allocate(256).unwrap();
        assert!(during.offset_bytes() >= region_end);
        let s = a.stats();
        assert!(s.is_consistent());
        assert_eq!(s.compaction_reserved_bytes, 4 * 4 * 256);
        a.audit().unwrap();
        // The owner of one moving block frees it meanwhile.
        let gone = plan.moves()[1].block;
        a.free(gone).unwrap();
        assert_eq!(
            a.free(gone),
            Err(AllocError::DoubleFree {
                offset_bytes: gone.offset_bytes()
            })
        );
        let out = a.commit_compaction(plan).unwrap();
        assert_eq!(out.moved.len(), 3);
        assert_eq!(out.freed_during_plan, vec![gone]);
        for (old, new) in &out.moved {
            assert!(new.offset_bytes() < old.offset_bytes());
            assert!(matches!(a.free(*old), Err(AllocError::Stale { .. })));
        }
        a.audit().unwrap();
        a.free(during).unwrap();
        // The skipped move left a hole; a second pass closes it.
        let plan2 = a.plan_compaction().unwrap();
        let out2 = a.commit_compaction(plan2).unwrap();
        let f = a.fragmentation();
        assert_eq!(f.free_extents, 1, "{out2:?}");
        assert_eq!(f.external_fragmentation, 0.0);
        assert_eq!(f.free_bytes, 64 * 256 - 3 * 4 * 256);
        // Nothing left to do: an empty plan commits trivially.
        let empty = a.plan_compaction().unwrap();
        assert!(empty.is_empty());
        a.commit_compaction(empty).unwrap();
        for (_, new) in out.moved {
            let cur = out2
                .moved
                .iter()
                .find(|(o, _)| *o == new)
                .map(|(_, n)| *n)
                .unwrap_or(new);
            a.free(cur).unwrap();
        }
        assert_eq!(a.stats().in_use_bytes, 0);
        a.audit().unwrap();
    }

    #[test]
    fn abort_keeps_handles() {
        let a = binned(16 * 256, 256);
        let x = a.allocate(256).unwrap();
        let y = a.allocate(256).unwrap();
        a.free(x).unwrap();
        let plan = a.plan_compaction().unwrap();
        assert_eq!(plan.moves().len(), 1);
        let out = a.abort_compaction(plan).unwrap();
        assert!(out.moved.is_empty());
        a.audit().unwrap();
        a.free(y).unwrap();
        let stale = CompactionPlan {
            allocator_id: a.id(),
            plan_id: 42,
            moves: vec![],
        };
        assert!(matches!(
            a.commit_compaction(stale),
            Err(CompactionError::UnknownPlan { .. })
        ));
        assert_eq!(a.fragmentation().free_extents, 1);
    }
}
