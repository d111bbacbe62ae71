//! The memory manager: one thread-safe front for every tensor, over the device, host and
//! disk tiers.
//!
//! ## State
//! A sharded handle table (lock striping: a tensor's slot picks its shard). Each entry holds
//! up to one copy per tier, each with a pin count and a validity flag, and a `busy` flag set
//! while a move or a write is in flight. Threads that need a busy entry wait on its shard's
//! condition variable; no lock is held across a copy or an I/O (moves go through the
//! transfer engine with the shard unlocked).
//!
//! ## Cache levels: inclusive for clean copies
//! Promoting a tensor to a faster tier keeps the slower copy: weights, which dominate and are
//! read-only, can then be demoted by just dropping the fast copy. A write goes to the host
//! copy and drops every other copy, so written data has exactly one home until it is
//! promoted again. Demotion of a tensor whose only copy is on the tier being freed writes it
//! back one tier down first. The disk copy of a checkpoint weight is the file itself (a
//! read-only extent), never a swap copy.
//!
//! ## Locks (docs/ARCHITECTURE.md)
//! Level 1: the budgets `RwLock`. Level 3: one shard `Mutex` at a time, except the stats
//! recount, which takes all shards in ascending index order. Tier and engine locks are
//! leaves. Every public method locks its shard once and passes `&mut` state to helpers.

mod alloc;
mod audit;
mod claims;
mod compact;
mod evict;
mod io;
mod moves;
mod pin;
mod prefetch;
mod reserve;
mod waits;

pub use audit::Audit;
pub use compact::{CompactionReport, fragmentation};
pub use pin::PinGuard;

use crate::config::{Budgets, ManagerConfig};
use crate::error::{ManagerError, Result};
use crate::stats::Counters;
use evict::AccessPlan;
use prefetch::PrefetchQueue;
use std::sync::Arc as StdArc;
use std::time::Duration;
use vlmem_core::sync::atomic::{AtomicU64, Ordering};
use vlmem_core::sync::{Arc, Condvar, Mutex, RwLock};
use vlmem_core::{TensorKind, Tier};
use vlmem_tier::{DiskTier, MemoryTier, Reservation, TierBackend, TransferEngine};
use waits::Waits;

// A plain std atomic: ids need no model checking, and loom atomics cannot live in a static.
static NEXT_MANAGER_ID: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(1);

/// A tensor owned by a [`MemoryManager`]. Copyable; checked on every use: a handle of a
/// deallocated tensor is refused as stale, a handle of another manager as foreign.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TensorHandle {
    manager_id: u32,
    slot: u32,
    generation: u32,
}

impl TensorHandle {
    /// The handle's slot (for display).
    pub fn slot(&self) -> u32 {
        self.slot
    }
}

type Entry = crate::entry::Entry<Reservation>;

#[derive(Debug, Default)]
struct Slot {
    generation: u32,
    entry: Option<Entry>,
}

#[derive(Debug, Default)]
struct ShardState {
    slots: Vec<Slot>,
    free: Vec<u32>,
}

#[derive(Debug, Default)]
struct Shard {
    state: Mutex<ShardState>,
    cond: Condvar,
}

/// Prefetch workers at most (each brings one tensor at a time through the transfer engine).
pub const PREFETCH_WORKERS: usize = 2;

pub(crate) struct Inner {
    id: u32,
    tiers: [StdArc<dyn TierBackend>; 3],
    disk: StdArc<DiskTier>,
    engine: TransferEngine,
    shards: Box<[Shard]>,
    next_shard: AtomicU64,
    budgets: RwLock<Budgets>,
    used: [[AtomicU64; 5]; 3],
    clock: AtomicU64,
    plan: RwLock<AccessPlan>,
    plan_cursor: AtomicU64,
    prefetches_in_flight: AtomicU64,
    max_prefetches_in_flight: u64,
    /// Prefetch hints waiting for a worker, and the number of workers running (level 3, a
    /// leaf: never held with a shard lock or across a move).
    prefetch_queue: Mutex<PrefetchQueue>,
    prefetch_ready: Condvar,
    zero_on_free: bool,
    verify_write_backs: bool,
    max_call_wait: Duration,
    /// Bytes of each tier's arena that only KV blocks can take (the KV slab).
    kv_slab_bytes: [u64; 3],
    /// The KV slab's block size (`ManagerConfig::kv_block_bytes`).
    kv_block_bytes: Option<u64>,
    pub(crate) counters: Counters,
}

/// The unified memory manager. Cheap to clone (an `Arc`); every method takes `&self` and is
/// safe to call from many threads.
#[derive(Clone)]
pub struct MemoryManager {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for MemoryManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryManager")
            .field("id", &self.inner.id)
            .finish_non_exhaustive()
    }
}

/// Most handle-table shards a manager takes (`ManagerConfig::shards`).
pub const MAX_SHARDS: usize = 1 << 16;

fn check_shards(shards: usize) -> Result<()> {
    if (1..=MAX_SHARDS).contains(&shards) {
        Ok(())
    } else {
        Err(ManagerError::InvalidConfig(format!(
            "shards must be 1 to {MAX_SHARDS}, not {shards}"
        )))
    }
}

fn check_range(offset_bytes: u64, len_bytes: u64, tensor_bytes: u64) -> Result<()> {
    match offset_bytes.checked_add(len_bytes) {
        Some(end) if end <= tensor_bytes => Ok(()),
        _ => Err(ManagerError::OutOfRange {
            offset_bytes,
            len_bytes,
            tensor_bytes,
        }),
    }
}

impl MemoryManager {
    /// Builds the tiers and the engine.
    pub fn new(config: ManagerConfig) -> Result<Self> {
        check_shards(config.shards)?;
        let mk = |cap: u64, granule: u64| (config.allocator)(cap, granule);
        let slab_bytes = std::cell::Cell::new([0u64; 3]);
        // Device and host arenas: a slab region for KV blocks at the bottom when the block
        // size is known, the configured allocator above it.
        let mk_memory = |tier: Tier, cap: u64| -> Result<StdArc<dyn vlmem_core::OffsetAllocator>> {
            const GRANULE: u64 = 256;
            let kv_budget = config.budgets.get(tier, TensorKind::KvCache).min(cap);
            match config.kv_block_bytes {
                Some(bb) if bb > 0 && bb % GRANULE == 0 && kv_budget >= bb => {
                    let blocks = (kv_budget / bb).min(vlmem_alloc::SlabPool::MAX_BLOCKS) as u32;
                    let slab = vlmem_alloc::SlabPool::new(vlmem_alloc::SlabConfig {
                        block_bytes: bb,
                        capacity_blocks: blocks,
                        cache_blocks: 8,
                        caches: 4,
                        kind: Some(TensorKind::KvCache),
                    })?;
                    let rest_bytes = cap - u64::from(blocks) * bb;
                    let mut slabs = slab_bytes.get();
                    slabs[tier.index()] = u64::from(blocks) * bb;
                    slab_bytes.set(slabs);
                    let rest = match rest_bytes {
                        0 => StdArc::new(vlmem_tier::FirstFitAllocator::new(0, GRANULE)?) as _,
                        n => mk(n, GRANULE)?,
                    };
                    Ok(StdArc::new(vlmem_alloc::SplitAllocator::try_new(
                        slab, rest,
                    )?))
                }
                Some(bb) if bb % GRANULE != 0 => Err(ManagerError::InvalidConfig(format!(
                    "kv_block_bytes {bb} is not a multiple of {GRANULE}"
                ))),
                _ => Ok(mk(cap, GRANULE)?),
            }
        };
        let device_alloc = mk_memory(Tier::Device, config.device_bytes)?;
        let device: StdArc<dyn TierBackend> = match config.gpu_ordinal {
            Some(ordinal) => {
                vlmem_tier::detect_device(device_alloc, config.device_link_bytes_per_s, ordinal)?
            }
            None => StdArc::new(MemoryTier::simulated_device(
                device_alloc,
                config.device_link_bytes_per_s,
            )?),
        };
        let host: StdArc<dyn TierBackend> = StdArc::new(MemoryTier::host(
            mk_memory(Tier::Host, config.host_bytes)?,
            vlmem_tier::HostOptions {
                huge_pages: config.host_huge_pages,
            },
        )?);
        let disk = StdArc::new(DiskTier::new(
            mk(config.disk_bytes, 4096)?,
            config.disk.clone(),
        )?);
        Self::build(config, device, host, disk, slab_bytes.get())
    }

    /// Builds the manager over tiers made by the caller (for fault injection: wrap a tier in
    /// `vlmem_tier::FaultyTier`, or give the disk tier a faulty file layer). The tiers'
    /// arenas are theirs; `config`'s capacities and allocator are not used here, its budgets,
    /// shards, engine and prefetch settings are.
    pub fn with_tiers(
        config: ManagerConfig,
        device: StdArc<dyn TierBackend>,
        host: StdArc<dyn TierBackend>,
        disk: StdArc<DiskTier>,
    ) -> Result<Self> {
        Self::build(config, device, host, disk, [0; 3])
    }

    /// The manager over its tiers; `kv_slab_bytes` per tier is the region of the arena only
    /// KV blocks can take.
    fn build(
        config: ManagerConfig,
        device: StdArc<dyn TierBackend>,
        host: StdArc<dyn TierBackend>,
        disk: StdArc<DiskTier>,
        kv_slab_bytes: [u64; 3],
    ) -> Result<Self> {
        check_shards(config.shards)?;
        let disk_dyn: StdArc<dyn TierBackend> = disk.clone();
        let tiers = [device, host, disk_dyn];
        let engine = TransferEngine::new(&tiers, config.engine)?;
        let shards = (0..config.shards).map(|_| Shard::default()).collect();
        Ok(MemoryManager {
            inner: Arc::new(Inner {
                id: NEXT_MANAGER_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
                tiers,
                disk,
                engine,
                shards,
                next_shard: AtomicU64::new(0),
                budgets: RwLock::new(config.budgets),
                used: Default::default(),
                clock: AtomicU64::new(1),
                plan: RwLock::new(AccessPlan::default()),
                plan_cursor: AtomicU64::new(0),
                prefetches_in_flight: AtomicU64::new(0),
                prefetch_queue: Mutex::new(PrefetchQueue::default()),
                prefetch_ready: Condvar::new(),
                max_prefetches_in_flight: config.max_prefetches_in_flight as u64,
                zero_on_free: config.zero_on_free,
                verify_write_backs: config.verify_write_backs,
                max_call_wait: config.max_call_wait,
                kv_slab_bytes,
                kv_block_bytes: config.kv_block_bytes,
                counters: Counters::default(),
            }),
        })
    }

    /// The transfer engine's counters.
    pub fn engine_stats(&self) -> vlmem_tier::EngineStats {
        self.inner.engine.stats()
    }

    /// One line per tier describing its backend ("simulated device ..." where simulated).
    pub fn describe_tiers(&self) -> Vec<String> {
        self.inner.tiers.iter().map(|t| t.describe()).collect()
    }

    /// Whether the device tier is a real GPU (see [`ManagerConfig::gpu_ordinal`]) rather
    /// than the simulated device.
    pub fn device_is_gpu(&self) -> bool {
        !self.inner.tiers[Tier::Device.index()].is_simulated()
    }
}

impl Inner {
    fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::Relaxed)
    }

    /// The waiting budget of one public call.
    fn waits(&self) -> Waits {
        Waits::new(self.max_call_wait)
    }

    fn shard_of(&self, h: TensorHandle) -> Result<&Shard> {
        if h.manager_id != self.id {
            return Err(ManagerError::Foreign { slot: h.slot });
        }
        Ok(&self.shards[h.slot as usize % self.shards.len()])
    }

    /// The live entry of `h` in its (locked) shard.
    fn entry<'a>(&self, st: &'a mut ShardState, h: TensorHandle) -> Result<&'a mut Entry> {
        let local = h.slot as usize / self.shards.len();
        match st.slots.get_mut(local) {
            Some(slot) if slot.generation == h.generation => {
                slot.entry.as_mut().ok_or(ManagerError::Stale {
                    slot: h.slot,
                    generation: h.generation,
                })
            }
            Some(_) => Err(ManagerError::Stale {
                slot: h.slot,
                generation: h.generation,
            }),
            None => Err(ManagerError::Foreign { slot: h.slot }),
        }
    }

    fn insert(&self, entry: Entry) -> TensorHandle {
        let n = self.shards.len();
        let shard_index = (self.next_shard.fetch_add(1, Ordering::Relaxed) % n as u64) as usize;
        let shard = &self.shards[shard_index];
        let mut st = shard.state.lock();
        let local = match st.free.pop() {
            Some(l) => l as usize,
            None => {
                st.slots.push(Slot::default());
                st.slots.len() - 1
            }
        };
        let slot = &mut st.slots[local];
        slot.entry = Some(entry);
        TensorHandle {
            manager_id: self.id,
            slot: (local * n + shard_index) as u32,
            generation: slot.generation,
        }
    }
}
