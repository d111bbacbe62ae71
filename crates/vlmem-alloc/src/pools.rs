//! Typed pools: one allocator per [`TensorKind`], each with its own arena, byte budget,
//! strategy and stats, so one kind cannot flush or fragment another.
//!
//! Locking (levels from docs/ARCHITECTURE.md, "Lock hierarchy"): the budget table is a
//! reader-writer lock (level 2: read on every allocation, written only by `set_budget`);
//! each pool's allocator has its own lock(s) (level 4). `allocate` reads the budget and drops
//! the read guard before it calls the allocator; `set_budget` holds the write guard while it
//! updates the allocator's limit (2 -> 4, downward). No method holds two pools' locks.
//! parking_lot 0.12's RwLock is task-fair (no reader or writer starves), and no code path
//! takes the read lock twice (a recursive read could deadlock behind a waiting writer).

use crate::binned::{BinnedAllocator, BinnedConfig, CompactionOutcome, CompactionPlan};
use crate::buddy::{BuddyAllocator, BuddyConfig};
use crate::slab::{Released, SlabConfig, SlabPool};
use crate::stats::{AllocStats, FragmentationReport};
use crate::{Audit, CompactionError};
use vlmem_core::sync::RwLock;
use vlmem_core::{AllocError, Block, TensorKind};

/// How a pool allocates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// Power-of-two buddy blocks (alignment equals size; up to 50% rounding waste).
    Buddy {
        /// The smallest block, a power of two.
        min_block_bytes: u64,
    },
    /// Fixed-size blocks with per-thread caches and reference counts (KV cache).
    Slab {
        /// Every block's size.
        block_bytes: u64,
        /// Bound on the free blocks one cache holds.
        cache_blocks: u32,
        /// Number of caches.
        caches: u32,
    },
    /// Binned TLSF-like allocation of variable sizes (vision embeddings, activations).
    Binned {
        /// Allocation unit and alignment, a power of two.
        granule_bytes: u64,
    },
}

impl Strategy {
    /// The strategy's name.
    pub const fn name(&self) -> &'static str {
        match self {
            Strategy::Buddy { .. } => "buddy",
            Strategy::Slab { .. } => "slab",
            Strategy::Binned { .. } => "binned",
        }
    }
}

/// One pool's configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolConfig {
    /// The kind it serves.
    pub kind: TensorKind,
    /// Size of its arena.
    pub arena_bytes: u64,
    /// Bytes it may have in use (at most `arena_bytes`).
    pub budget_bytes: u64,
    /// How it allocates.
    pub strategy: Strategy,
}

/// One pool's allocator.
// Five of these exist per TypedPools, built once: boxing the binned variant would only add a
// pointer chase to every allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum PoolAllocator {
    /// A buddy allocator.
    Buddy(BuddyAllocator),
    /// A slab of fixed-size blocks.
    Slab(SlabPool),
    /// A binned allocator.
    Binned(BinnedAllocator),
}

impl PoolAllocator {
    fn build(config: &PoolConfig) -> Result<Self, AllocError> {
        let kind = Some(config.kind);
        Ok(match config.strategy {
            Strategy::Buddy { min_block_bytes } => {
                PoolAllocator::Buddy(BuddyAllocator::new(BuddyConfig {
                    capacity_bytes: config.arena_bytes,
                    min_block_bytes,
                    kind,
                })?)
            }
            Strategy::Slab {
                block_bytes,
                cache_blocks,
                caches,
            } => {
                let blocks = config.arena_bytes / block_bytes.max(1);
                let capacity_blocks = u32::try_from(blocks).map_err(|_| {
                    AllocError::InvalidConfig(format!("{blocks} slab blocks is too many"))
                })?;
                PoolAllocator::Slab(SlabPool::new(SlabConfig {
                    block_bytes,
                    capacity_blocks,
                    cache_blocks,
                    caches,
                    kind,
                })?)
            }
            Strategy::Binned { granule_bytes } => {
                PoolAllocator::Binned(BinnedAllocator::new(BinnedConfig {
                    capacity_bytes: config.arena_bytes,
                    granule_bytes,
                    kind,
                })?)
            }
        })
    }

    /// The allocator's id.
    pub fn id(&self) -> u32 {
        match self {
            PoolAllocator::Buddy(a) => a.id(),
            PoolAllocator::Slab(a) => a.id(),
            PoolAllocator::Binned(a) => a.id(),
        }
    }

    /// Reserves at least `bytes`.
    pub fn allocate(&self, bytes: u64) -> Result<Block, AllocError> {
        match self {
            PoolAllocator::Buddy(a) => a.allocate(bytes),
            PoolAllocator::Slab(a) => a.allocate(bytes),
            PoolAllocator::Binned(a) => a.allocate(bytes),
        }
    }

    /// Frees a block (for a slab: drops one reference).
    pub fn free(&self, block: Block) -> Result<(), AllocError> {
        match self {
            PoolAllocator::Buddy(a) => a.free(block),
            PoolAllocator::Slab(a) => a.release(block).map(|_| ()),
            PoolAllocator::Binned(a) => a.free(block),
        }
    }

    /// A consistent snapshot of the counters.
    pub fn stats(&self) -> AllocStats {
        match self {
            PoolAllocator::Buddy(a) => a.stats(),
            PoolAllocator::Slab(a) => a.stats(),
            PoolAllocator::Binned(a) => a.stats(),
        }
    }

    /// Fragmentation metrics.
    pub fn fragmentation(&self) -> FragmentationReport {
        match self {
            PoolAllocator::Buddy(a) => a.fragmentation(),
            PoolAllocator::Slab(a) => a.fragmentation(),
            PoolAllocator::Binned(a) => a.fragmentation(),
        }
    }

    /// Walks the structure and checks its invariants.
    pub fn audit(&self) -> Result<Audit, String> {
        match self {
            PoolAllocator::Buddy(a) => a.audit(),
            PoolAllocator::Slab(a) => a.audit(),
            PoolAllocator::Binned(a) => a.audit(),
        }
    }

    fn set_limit_bytes(&self, limit_bytes: u64) {
        match self {
            PoolAllocator::Buddy(a) => a.set_limit_bytes(limit_bytes),
            PoolAllocator::Slab(a) => a.set_limit_bytes(limit_bytes),
            PoolAllocator::Binned(a) => a.set_limit_bytes(limit_bytes),
        }
    }
}

#[derive(Debug)]
struct Pool {
    config: PoolConfig,
    base_offset_bytes: u64,
    allocator: PoolAllocator,
}

/// Per-kind stats and their total.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolsStats {
    /// One exact snapshot per configured pool, in [`TensorKind::ALL`] order.
    pub per_kind: Vec<(TensorKind, AllocStats)>,
    /// The sum. Each pool's part is exact; the pools are read one after another, so under
    /// churn the total mixes instants (it is exact at quiescence).
    pub total: AllocStats,
}

/// One pool per [`TensorKind`], each with its own budget, strategy and stats.
#[derive(Debug)]
pub struct TypedPools {
    /// Level 2: budgets per kind (read-mostly).
    budgets: RwLock<[u64; TensorKind::ALL.len()]>,
    pools: [Option<Pool>; TensorKind::ALL.len()],
}

impl TypedPools {
    /// Builds the pools. Their arenas are laid out one after another in `configs` order
    /// (see [`TypedPools::base_offset_bytes`]); block offsets are relative to each pool's arena.
    pub fn new(configs: &[PoolConfig]) -> Result<Self, AllocError> {
        let mut pools: [Option<Pool>; 5] = Default::default();
        let mut budgets = [0u64; 5];
        let mut base = 0u64;
        for c in configs {
            let i = c.kind.index();
            if pools[i].is_some() {
                return Err(AllocError::InvalidConfig(format!(
                    "two pools for {}",
                    c.kind
                )));
            }
            if c.budget_bytes > c.arena_bytes {
                return Err(AllocError::InvalidConfig(format!(
                    "{} pool: budget {} bytes exceeds its arena of {} bytes",
                    c.kind, c.budget_bytes, c.arena_bytes
                )));
            }
            let allocator = PoolAllocator::build(c)?;
            allocator.set_limit_bytes(c.budget_bytes);
            budgets[i] = c.budget_bytes;
            pools[i] = Some(Pool {
                config: *c,
                base_offset_bytes: base,
                allocator,
            });
            base = base.checked_add(c.arena_bytes).ok_or_else(|| {
                AllocError::InvalidConfig("the pools' arenas add up to more than 2^64 bytes".into())
            })?;
        }
        Ok(TypedPools {
            budgets: RwLock::new(budgets),
            pools,
        })
    }

    fn pool(&self, kind: TensorKind) -> Result<&Pool, AllocError> {
        self.pools[kind.index()]
            .as_ref()
            .ok_or_else(|| AllocError::InvalidConfig(format!("no pool is configured for {kind}")))
    }

    /// The allocator of `kind`'s pool (for strategy-specific calls such as slab batches).
    pub fn allocator(&self, kind: TensorKind) -> Option<&PoolAllocator> {
        self.pools[kind.index()].as_ref().map(|p| &p.allocator)
    }

    /// The pool's configuration as built (budget as configured; see [`Self::budget_bytes`]).
    pub fn config(&self, kind: TensorKind) -> Option<PoolConfig> {
        self.pools[kind.index()].as_ref().map(|p| p.config)
    }

    /// Where `kind`'s arena starts when all pools share one address space.
    pub fn base_offset_bytes(&self, kind: TensorKind) -> Option<u64> {
        self.pools[kind.index()]
            .as_ref()
            .map(|p| p.base_offset_bytes)
    }

    /// Reserves at least `bytes` in `kind`'s pool, within its budget.
    pub fn allocate(&self, kind: TensorKind, bytes: u64) -> Result<Block, AllocError> {
        let pool = self.pool(kind)?;
        let budget_bytes = self.budgets.read()[kind.index()];
        if bytes > budget_bytes {
            return Err(AllocError::TooLarge {
                requested_bytes: bytes,
                capacity_bytes: budget_bytes,
            });
        }
        pool.allocator.allocate(bytes)
    }

    /// Frees a block of any pool (routed by the block's allocator id).
    pub fn free(&self, block: Block) -> Result<(), AllocError> {
        self.owner(block)?.allocator.free(block)
    }

    /// Adds a reference to a shared block of a slab pool.
    pub fn retain(&self, block: Block) -> Result<u32, AllocError> {
        match &self.owner(block)?.allocator {
            PoolAllocator::Slab(s) => s.retain(block),
            _ => Err(AllocError::InvalidConfig(
                "reference counts exist only in slab pools".into(),
            )),
        }
    }

    /// Drops one reference to a block of a slab pool (frees other pools' blocks).
    pub fn release(&self, block: Block) -> Result<Released, AllocError> {
        match &self.owner(block)?.allocator {
            PoolAllocator::Slab(s) => s.release(block),
            other => other.free(block).map(|_| Released::Freed),
        }
    }

    fn owner(&self, block: Block) -> Result<&Pool, AllocError> {
        self.pools
            .iter()
            .flatten()
            .find(|p| p.allocator.id() == block.allocator_id())
            .ok_or(AllocError::Foreign {
                allocator_id: block.allocator_id(),
                offset_bytes: block.offset_bytes(),
            })
    }

    /// The current budget of `kind`'s pool.
    pub fn budget_bytes(&self, kind: TensorKind) -> u64 {
        self.budgets.read()[kind.index()]
    }

    /// Changes `kind`'s budget (at most its arena). Lowering it below the bytes in use only
    /// refuses new allocations until enough is freed.
    pub fn set_budget(&self, kind: TensorKind, budget_bytes: u64) -> Result<(), AllocError> {
        let pool = self.pool(kind)?;
        if budget_bytes > pool.config.arena_bytes {
            return Err(AllocError::InvalidConfig(format!(
                "{kind} pool: budget {budget_bytes} bytes exceeds its arena of {} bytes",
                pool.config.arena_bytes
            )));
        }
        let mut budgets = self.budgets.write();
        budgets[kind.index()] = budget_bytes;
        pool.allocator.set_limit_bytes(budget_bytes);
        Ok(())
    }

    /// An exact snapshot of one pool's counters.
    pub fn stats(&self, kind: TensorKind) -> Option<AllocStats> {
        self.allocator(kind).map(PoolAllocator::stats)
    }

    /// Every pool's snapshot and the total.
    pub fn stats_all(&self) -> PoolsStats {
        let mut total = AllocStats::default();
        let mut per_kind = Vec::new();
        for p in self.pools.iter().flatten() {
            let s = p.allocator.stats();
            total.accumulate(&s);
            per_kind.push((p.config.kind, s));
        }
        PoolsStats { per_kind, total }
    }

    /// Fragmentation metrics of one pool.
    pub fn fragmentation(&self, kind: TensorKind) -> Option<FragmentationReport> {
        self.allocator(kind).map(PoolAllocator::fragmentation)
    }

    /// Plans a compaction of `kind`'s pool (binned pools; see
    /// [`BinnedAllocator::plan_compaction`] for the protocol).
    pub fn plan_compaction(&self, kind: TensorKind) -> Result<CompactionPlan, CompactionError> {
        self.binned(kind)?.plan_compaction()
    }

    /// Commits a plan of `kind`'s pool.
    pub fn commit_compaction(
        &self,
        kind: TensorKind,
        plan: CompactionPlan,
    ) -> Result<CompactionOutcome, CompactionError> {
        self.binned(kind)?.commit_compaction(plan)
    }

    /// Aborts a plan of `kind`'s pool.
    pub fn abort_compaction(
        &self,
        kind: TensorKind,
        plan: CompactionPlan,
    ) -> Result<CompactionOutcome, CompactionError> {
        self.binned(kind)?.abort_compaction(plan)
    }

    fn binned(&self, kind: TensorKind) -> Result<&BinnedAllocator, CompactionError> {
        match self.allocator(kind) {
            Some(PoolAllocator::Binned(b)) => Ok(b),
            Some(other) => Err(CompactionError::Unsupported {
                kind,
                strategy: match other {
                    PoolAllocator::Buddy(_) => "buddy",
                    _ => "slab",
                },
            }),
            None => Err(CompactionError::NoPool { kind }),
        }
    }
}

#[cfg(all(test, not(vlmem_loom)))]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn pools() -> TypedPools {
        TypedPools::new(&[
            PoolConfig {
                kind: TensorKind::Weight,
                arena_bytes: 64 * MIB,
                budget_bytes: 64 * MIB,
                strategy: Strategy::Buddy {
                    min_block_bytes: MIB,
                },
            },
            PoolConfig {
                kind: TensorKind::KvCache,
                arena_bytes: 16 * MIB,
                budget_bytes: 8 * MIB,
                strategy: Strategy::Slab {
                    block_bytes: MIB / 16,
                    cache_blocks: 8,
                    caches: 4,
                },
            },
            PoolConfig {
                kind: TensorKind::VisionEmbedding,
                arena_bytes: 32 * MIB,
                budget_bytes: 32 * MIB,
                strategy: Strategy::Binned {
                    granule_bytes: 4096,
                },
            },
        ])
        .unwrap()
    }

    #[test]
    fn routes_budgets_and_stats() {
        let p = pools();
        assert_eq!(p.base_offset_bytes(TensorKind::KvCache), Some(64 * MIB));
        assert!(matches!(
            p.allocate(TensorKind::Scratch, 1),
            Err(AllocError::InvalidConfig(_))
        ));
        let w = p.allocate(TensorKind::Weight, 3 * MIB).unwrap();
        assert_eq!(w.len_bytes(), 4 * MIB);
        let kv: Vec<Block> = (0..128)
            .map(|_| p.allocate(TensorKind::KvCache, 1).unwrap())
            .collect();
        // The KV budget is 8 MiB = 128 blocks of 64 KiB, half the arena.
        let e = p.allocate(TensorKind::KvCache, 1).unwrap_err();
        assert!(
            matches!(
                e,
                AllocError::OutOfMemory {
                    kind: Some(TensorKind::KvCache),
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(matches!(
            p.allocate(TensorKind::VisionEmbedding, 33 * MIB),
            Err(AllocError::TooLarge { .. })
        ));
        let v = p
            .allocate(TensorKind::VisionEmbedding, 5 * MIB + 1)
            .unwrap();
        assert_eq!(p.retain(kv[0]), Ok(2));
        assert!(p.retain(v).is_err());
        assert_eq!(p.release(kv[0]), Ok(Released::StillShared { refs_left: 1 }));
        let all = p.stats_all();
        assert_eq!(all.per_kind.len(), 3);
        assert_eq!(all.total.in_use_bytes, 4 * MIB + 8 * MIB + v.len_bytes());
        assert!(all.total.is_consistent());
        p.set_budget(TensorKind::KvCache, 16 * MIB).unwrap();
        assert!(p.set_budget(TensorKind::KvCache, 17 * MIB).is_err());
        let extra = p.allocate(TensorKind::KvCache, 1).unwrap();
        p.free(extra).unwrap();
        for b in kv {
            p.free(b).unwrap();
        }
        p.free(w).unwrap();
        assert_eq!(p.free(w), Err(AllocError::DoubleFree { offset_bytes: 0 }));
        p.free(v).unwrap();
        let foreign = Block::from_parts(u32::MAX, 0, 0, 0, 1);
        assert!(matches!(p.free(foreign), Err(AllocError::Foreign { .. })));
        assert_eq!(p.stats_all().total.in_use_bytes, 0);
        assert!(matches!(
            p.plan_compaction(TensorKind::Weight),
            Err(CompactionError::Unsupported { .. })
        ));
        assert!(matches!(
            p.plan_compaction(TensorKind::Scratch),
            Err(CompactionError::NoPool { .. })
        ));
        let plan = p.plan_compaction(TensorKind::VisionEmbedding).unwrap();
        assert!(plan.is_empty());
        p.commit_compaction(TensorKind::VisionEmbedding, plan)
            .unwrap();
        for k in [
            TensorKind::Weight,
            TensorKind::KvCache,
            TensorKind::VisionEmbedding,
        ] {
            p.allocator(k).unwrap().audit().unwrap();
        }
    }

    #[test]
    fn config_errors() {
        let c = PoolConfig {
            kind: TensorKind::Weight,
            arena_bytes: MIB,
            budget_bytes: 2 * MIB,
            strategy: Strategy::Buddy {
                min_block_bytes: 4096,
            },
        };
        assert!(TypedPools::new(&[c]).is_err());
        let ok = PoolConfig {
            budget_bytes: MIB,
            ..c
        };
        assert!(TypedPools::new(&[ok, ok]).is_err());
        assert!(TypedPools::new(&[ok]).is_ok());
    }
}
