//! Thread-safe offset allocators and typed memory pools.
//!
//! The allocators hand out offsets into an arena (device memory the CPU cannot touch, pinned
//! host memory, a swap file's extents), never pointers, and keep all bookkeeping outside the
//! managed memory:
//!
//! - [`BuddyAllocator`]: power-of-two blocks, O(1) split and merge; for granule management.
//! - [`SlabPool`]: fixed-size blocks (KV cache) with bounded per-thread caches and reference
//!   counts for shared (prefix) blocks.
//! - [`BinnedAllocator`]: a TLSF-like O(1) allocator for variable sizes, rounding requests
//!   to its bins, with compaction that runs while other threads allocate and free.
//! - [`TypedPools`]: one of those per [`TensorKind`], each with its
//!   own budget and stats.
//!
//! All three implement [`vlmem_core::OffsetAllocator`]. Errors are values
//! ([`vlmem_core::AllocError`]); stale, double and foreign frees are detected with a
//! generation per slot. No code here uses `unsafe`.
//!
//! ## No reentrant locks
//! Each allocator keeps its state in one `Inner` behind one lock (the slab: per-cache locks
//! and a shared-stack lock). A public method locks once at its top and passes `&mut Inner`
//! to private `*_locked` helpers, which never lock: a thread therefore cannot take a lock it
//! already holds, by construction, and recursion (splitting, merging) is plain method
//! recursion on `&mut`. The lock order is in docs/ARCHITECTURE.md ("Allocators").

mod binned;
mod buddy;
mod handle;
mod pools;
mod slab;
mod split;
mod stats;

#[cfg(all(test, vlmem_loom))]
mod loom_tests;

pub use binned::{
    BinnedAllocator, BinnedConfig, CompactionMove, CompactionOutcome, CompactionPlan,
};
pub use buddy::{BuddyAllocator, BuddyConfig};
pub use pools::{PoolAllocator, PoolConfig, PoolsStats, Strategy, TypedPools};
pub use slab::{Released, SlabConfig, SlabPool};
pub use split::SplitAllocator;
pub use stats::{AllocStats, FragmentationReport, UnusableIndex, external_fragmentation};

use thiserror::Error;
use vlmem_core::TensorKind;

/// Why a compaction could not be planned or committed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CompactionError {
    /// Another plan of this allocator is in flight; commit or abort it first.
    #[error("a compaction plan is already in flight: commit or abort it first")]
    PlanInProgress,
    /// The plan is not this allocator's in-flight plan (already committed, aborted, or
    /// another allocator's).
    #[error("compaction plan {plan_id} is not in flight here (already committed or aborted?)")]
    UnknownPlan {
        /// The plan's id.
        plan_id: u64,
    },
    /// The pool's strategy does not compact.
    #[error(
        "the {kind} pool uses the {strategy} strategy, which does not compact (only binned pools do)"
    )]
    Unsupported {
        /// The pool's kind.
        kind: TensorKind,
        /// Its strategy's name.
        strategy: &'static str,
    },
    /// No pool is configured for that kind.
    #[error("no pool is configured for {kind}")]
    NoPool {
        /// The kind asked for.
        kind: TensorKind,
    },
}

/// The result of walking an allocator's whole structure under its lock(s): the counters
/// next to the sums the walk found. [`Audit::check`] says whether they agree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Audit {
    /// The counters' snapshot, taken under the same lock(s) as the walk.
    pub stats: AllocStats,
    /// Live blocks found by the walk.
    pub walked_live_blocks: u64,
    /// Bytes in live blocks found by the walk.
    pub walked_in_use_bytes: u64,
    /// Free bytes found by the walk.
    pub walked_free_bytes: u64,
}

impl Audit {
    /// Ok when the counters equal what the walk found and the snapshot is self-consistent.
    pub fn check(&self) -> Result<(), String> {
        let s = &self.stats;
        if s.in_use_bytes != self.walked_in_use_bytes
            || s.live_blocks != self.walked_live_blocks
            || s.free_bytes != self.walked_free_bytes
            || !s.is_consistent()
        {
            return Err(format!("counters disagree with the walk: {self:?}"));
        }
        Ok(())
    }
}
