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

use crate::config::{Budgets, ManagerConfig};
use crate::entry::{Copy, DemoteStep, PinStep, remove_span};
use crate::error::{ManagerError, Result};
use crate::stats::{Counters, ManagerStats, TierKindBytes};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc as StdArc;
use std::time::{Duration, Instant};
use vlmem_core::sync::atomic::{AtomicU64, Ordering};
use vlmem_core::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock, wait_guard_until};
use vlmem_core::{TensorKind, Tier};
use vlmem_tier::{
    DiskTier, MemoryTier, Move, Priority, Reservation, TierBackend, TierError, TransferEngine,
};

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

#[derive(Debug, Default)]
struct PrefetchQueue {
    /// (tensor, tier, clock tick when hinted).
    jobs: std::collections::VecDeque<(TensorHandle, Tier, u64)>,
    workers: usize,
}

/// Where weights are used next: a cyclic access order (layer order), for the weights policy.
#[derive(Debug, Default)]
struct AccessPlan {
    position: HashMap<(u32, u32), usize>,
    len: usize,
}

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

/// The result of [`MemoryManager::audit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Audit {
    /// Pairs of live copies on one tier whose blocks overlap (must be 0).
    pub overlaps: u64,
    /// Entries with a move or write in flight.
    pub busy_entries: u64,
    /// Pins held.
    pub pins: u64,
    /// Entries with no copy at all (must be 0: a lost tensor).
    pub entries_without_copy: u64,
    /// Whether the budget counters equal the recount of live copies.
    pub charged_matches_resident: bool,
}

/// A pin: the tensor stays on its tier until the guard drops. Reads see its bytes.
#[must_use = "a pin is released when the guard drops"]
pub struct PinGuard {
    inner: Arc<Inner>,
    handle: TensorHandle,
    tier: Tier,
    res: Reservation,
    len_bytes: u64,
}

impl std::fmt::Debug for PinGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PinGuard")
            .field("handle", &self.handle)
            .field("tier", &self.tier)
            .field("len_bytes", &self.len_bytes)
            .finish()
    }
}

impl PinGuard {
    /// The tier the tensor is pinned on.
    pub fn tier(&self) -> Tier {
        self.tier
    }
    /// The tensor's size.
    pub fn len_bytes(&self) -> u64 {
        self.len_bytes
    }
    /// Copies `dst.len()` bytes from `offset_bytes` of the tensor. A tensor never written
    /// has no bytes to read: [`ManagerError::Uninitialized`] (a write through any pin, or a
    /// lend, counts from the moment it ends). While another thread writes an overlapping
    /// range through its pin ([`PinGuard::write`], [`PinGuard::with_bytes_mut`]), the read
    /// waits for that write to end and then reads its bytes; ranges that do not overlap are
    /// read at once. The wait is bounded by `ManagerConfig::max_call_wait`
    /// ([`ManagerError::Busy`] past it).
    pub fn read(&self, offset_bytes: u64, dst: &mut [u8]) -> Result<()> {
        check_range(offset_bytes, dst.len() as u64, self.len_bytes)?;
        let waits = self.inner.waits();
        let _read = self
            .inner
            .begin_read(self.handle, offset_bytes, dst.len() as u64, &waits)?;
        if !dst.is_empty() {
            self.inner.tiers[self.tier.index()].read(&self.res, offset_bytes, dst)?;
        }
        Ok(())
    }
    /// Writes `src` at `offset_bytes` into the pinned copy, in place. Only for a tensor whose
    /// pinned copy is its only one (one allocated on this tier and never copied elsewhere,
    /// such as a step arena): otherwise [`ManagerError::NotExclusive`], since the other copies
    /// would go stale. Reads of an overlapping range (through any pin, or
    /// [`MemoryManager::read`]) wait until it ends, then see the new bytes; so do other
    /// writes through pins of an overlapping range, and moves of the tensor. Waiting for
    /// those already in flight is bounded by `ManagerConfig::max_call_wait`.
    ///
    /// An empty `src` writes nothing and does not make a never-written tensor written.
    pub fn write(&self, offset_bytes: u64, src: &[u8]) -> Result<()> {
        check_range(offset_bytes, src.len() as u64, self.len_bytes)?;
        if src.is_empty() {
            return Ok(());
        }
        let end = offset_bytes + src.len() as u64;
        let tier = &self.inner.tiers[self.tier.index()];
        self.inner.lend(
            self.handle,
            self.tier,
            &self.res,
            &[(offset_bytes, end)],
            |_| tier.write(&self.res, offset_bytes, src).map_err(Into::into),
        )
    }

    /// Lends `len_bytes` bytes at `offset_bytes` of the pinned copy to `f` for writing, in
    /// place (no copy). Only for a tensor whose pinned copy is its only one, as for
    /// [`PinGuard::write`]: otherwise [`ManagerError::NotExclusive`]. Only the lent range is
    /// locked while `f` runs: other threads' reads and writes of an overlapping range wait
    /// (bounded by `ManagerConfig::max_call_wait`) and then see the bytes `f` left; other
    /// ranges are read and written at once; moves of the tensor wait. No lock is held while
    /// `f` runs, and a panic in `f` releases the range. A tier that cannot lend its bytes to
    /// the CPU (GPU memory): [`ManagerError::InvalidConfig`]. Afterwards the tensor counts as
    /// written.
    pub fn with_bytes_mut<R>(
        &self,
        offset_bytes: u64,
        len_bytes: u64,
        f: impl FnOnce(&mut [u8]) -> R,
    ) -> Result<R> {
        self.with_ranges_mut(&[(offset_bytes, len_bytes)], |views| {
            f(std::mem::take(&mut views[0]))
        })
    }

    /// Like [`PinGuard::with_bytes_mut`] for several disjoint ranges at once, each
    /// `(offset_bytes, len_bytes)`: `f` gets one view per range, in the order given. Only
    /// these ranges are locked (not the bytes between them). Overlapping ranges are refused
    /// ([`ManagerError::InvalidConfig`]).
    ///
    /// A lend of a tensor never written shows zeros, never a previous owner's bytes (the
    /// lent ranges are zeroed before `f` runs). Empty ranges lend empty views and lock
    /// nothing; a lend of only empty ranges does not make the tensor written.
    pub fn with_ranges_mut<R>(
        &self,
        ranges: &[(u64, u64)],
        f: impl FnOnce(&mut [&mut [u8]]) -> R,
    ) -> Result<R> {
        let mut spans = Vec::with_capacity(ranges.len());
        for &(offset_bytes, len_bytes) in ranges {
            check_range(offset_bytes, len_bytes, self.len_bytes)?;
            spans.push((offset_bytes, offset_bytes + len_bytes));
        }
        spans.retain(|&(start, end)| start < end);
        let mut sorted = spans.clone();
        sorted.sort_unstable();
        if sorted.windows(2).any(|w| w[1].0 < w[0].1) {
            return Err(ManagerError::InvalidConfig(
                "overlapping ranges lent at once".into(),
            ));
        }
        if spans.is_empty() {
            let mut views: Vec<&mut [u8]> = ranges.iter().map(|_| &mut [][..]).collect();
            return Ok(f(&mut views));
        }
        let tier = &self.inner.tiers[self.tier.index()];
        self.inner
            .lend(self.handle, self.tier, &self.res, &spans, |clean| {
                let mut f = Some(f);
                let mut out = None;
                let lent = tier.write_ranges_with(&self.res, ranges, &mut |views| {
                    if !clean {
                        for v in views.iter_mut() {
                            v.fill(0);
                        }
                    }
                    if let Some(f) = f.take() {
                        out = Some(f(views));
                    }
                    Ok(())
                });
                match (lent, out) {
                    (Some(Ok(())), Some(r)) => Ok(r),
                    (Some(Err(e)), _) => Err(e.into()),
                    _ => Err(ManagerError::InvalidConfig(format!(
                        "the {} tier cannot lend its bytes to the CPU",
                        self.tier
                    ))),
                }
            })
    }

    /// The GPU address of the pinned copy's first byte when it lives in GPU memory (the
    /// CUDA device tier), for kernels that read it in place; `None` on other tiers. The
    /// address is valid while this guard lives: a pinned copy is never moved, evicted or
    /// freed. A tensor never written: [`ManagerError::Uninitialized`].
    pub fn device_address(&self) -> Result<Option<u64>> {
        self.inner.check_written(self.handle)?;
        Ok(self.inner.tiers[self.tier.index()].device_address(&self.res))
    }

    /// Lends the tensor's bytes to `f` without a copy where the tier allows it (host and
    /// simulated device), else through a buffer. Waits like [`PinGuard::read`] while a write
    /// through another pin is in flight; writes through pins wait while `f` runs.
    pub fn with_bytes<R>(&self, f: impl FnOnce(&[u8]) -> R) -> Result<R> {
        let waits = self.inner.waits();
        let _read = self
            .inner
            .begin_read(self.handle, 0, self.len_bytes, &waits)?;
        let tier = &self.inner.tiers[self.tier.index()];
        let mut f = Some(f);
        let mut out = None;
        let lent = tier.read_with(&self.res, 0, self.len_bytes, &mut |bytes| {
            if let Some(f) = f.take() {
                out = Some(f(bytes));
            }
            Ok(())
        });
        match (lent, out) {
            (Some(Ok(())), Some(r)) => Ok(r),
            (Some(Err(e)), _) => Err(e.into()),
            _ => {
                let mut buf = vec![0u8; self.len_bytes as usize];
                tier.read(&self.res, 0, &mut buf)?;
                let f = f.ok_or_else(|| {
                    ManagerError::InvalidConfig("tier lent bytes without calling back".into())
                })?;
                Ok(f(&buf))
            }
        }
    }
}

impl Drop for PinGuard {
    fn drop(&mut self) {
        self.inner.unpin(self.handle, self.tier);
    }
}

/// Victims in a row an eviction pass tries after the tier below refused them for want of
/// room, before it takes the tier below as full.
const MAX_REFUSED_BELOW: u32 = 4;

/// What one eviction pass did.
struct Eviction {
    /// Bytes freed on the tier.
    freed: u64,
    /// Candidates skipped because their tensors were moving.
    moving: u64,
    /// A demotion failed (the tier below fails, or is full of pinned data).
    failed: bool,
    /// Bytes of the kind's copies on the tier that stay: by rule (pinned, last copies on the
    /// disk, this call's own moves) or because the tier below refused them now.
    settled_bytes: u64,
}

/// Eviction rounds a reservation still makes once its call's waiting is spent, while they
/// free room (the call's own work, not a wait; bounded, since other threads may take the
/// room each time).
const MAX_ROUNDS_AFTER_SPENT: u32 = 64;

/// Pauses for moving tensors one call may make under loom and shuttle, whose clocks stand
/// still (real builds bound the call's waits by time).
#[cfg(any(vlmem_loom, vlmem_shuttle))]
const MODEL_PAUSES_PER_CALL: u32 = 20;

/// What one public call may still wait for other threads: one budget shared by every wait
/// and reservation the call nests (`ManagerConfig::max_call_wait`), so a pin that demotes
/// that writes back that demotes waits no longer than a plain pin. Passed down by
/// reference: one call, one thread.
pub(crate) struct Waits {
    started: Instant,
    until: Instant,
    /// Tensors this call holds busy (its own moves and writes): never waited for as "in
    /// flight" by its own nested reservations.
    own: std::cell::RefCell<Vec<TensorHandle>>,
    #[cfg(any(vlmem_loom, vlmem_shuttle))]
    pauses_left: std::cell::Cell<u32>,
}

impl Waits {
    fn new(max: Duration) -> Self {
        let started = Instant::now();
        Waits {
            started,
            own: std::cell::RefCell::new(Vec::new()),
            until: started
                .checked_add(max)
                .unwrap_or(started + Duration::from_secs(1 << 30)),
            #[cfg(any(vlmem_loom, vlmem_shuttle))]
            pauses_left: std::cell::Cell::new(MODEL_PAUSES_PER_CALL),
        }
    }

    /// Whether this call holds `h` busy itself.
    fn is_own(&self, h: TensorHandle) -> bool {
        self.own.borrow().contains(&h)
    }

    /// `h` is no longer held busy by this call.
    fn disown(&self, h: TensorHandle) {
        let mut own = self.own.borrow_mut();
        if let Some(i) = own.iter().rposition(|&x| x == h) {
            own.swap_remove(i);
        }
    }

    /// The error of a call that gave up waiting for tensor `id`.
    fn busy(&self, id: u64) -> ManagerError {
        ManagerError::Busy {
            id,
            waited_ms: self.started.elapsed().as_millis() as u64,
        }
    }

    /// Whether the call has no waiting left.
    fn spent(&self) -> bool {
        #[cfg(not(any(vlmem_loom, vlmem_shuttle)))]
        return Instant::now() >= self.until;
        #[cfg(any(vlmem_loom, vlmem_shuttle))]
        return self.pauses_left.get() == 0;
    }

    /// Waits on a shard's condition variable for another thread's move, write or lend;
    /// `Err` (with the guard) when the call's waiting is spent.
    fn wait<'a>(
        &self,
        cond: &Condvar,
        st: MutexGuard<'a, ShardState>,
    ) -> std::result::Result<MutexGuard<'a, ShardState>, MutexGuard<'a, ShardState>> {
        if self.spent() {
            return Err(st);
        }
        match wait_guard_until(cond, st, self.until) {
            (st, false) => Ok(st),
            (st, true) => Err(st),
        }
    }

    /// Lets the threads that move tensors run a little (no lock is held by the caller);
    /// false, without pausing, when the call's waiting is spent.
    fn pause(&self) -> bool {
        if self.spent() {
            return false;
        }
        vlmem_core::sync::thread::yield_now();
        #[cfg(not(any(vlmem_loom, vlmem_shuttle)))]
        std::thread::sleep(Duration::from_micros(500));
        #[cfg(any(vlmem_loom, vlmem_shuttle))]
        self.pauses_left.set(self.pauses_left.get() - 1);
        true
    }
}

/// A byte range in flight through a pin: a read, or a lend for writing in place. Released
/// when dropped, also when the code holding it unwinds (a caller's closure that panics), so
/// a panic never leaves a range locked.
struct SpanClaim<'a> {
    inner: &'a Inner,
    handle: TensorHandle,
    spans: Vec<(u64, u64)>,
    lend: bool,
    /// Set when a lend's body succeeded: the tensor counts as written.
    written: bool,
}

impl Drop for SpanClaim<'_> {
    fn drop(&mut self) {
        let Ok(shard) = self.inner.shard_of(self.handle) else {
            return;
        };
        let mut st = shard.state.lock();
        // The end of a lend may let anyone go on; the end of a read only a lend, write or
        // free that registered as waiting for reads (a read is the hot path: no wake-up and
        // no clock tick for nobody).
        let mut wake = true;
        if let Ok(e) = self.inner.entry(&mut st, self.handle) {
            let list = if self.lend {
                &mut e.lends
            } else {
                &mut e.reads
            };
            for &span in &self.spans {
                remove_span(list, span);
            }
            if self.written {
                e.written = true;
                e.last_use = self.inner.tick();
            }
            wake = self.lend || !e.lends_waiting.is_empty() || e.writers_waiting > 0;
        }
        drop(st);
        if wake {
            shard.cond.notify_all();
        }
    }
}

/// Marks a move or a write of an entry in flight (`busy`). The owner clears it when done;
/// if the code unwinds first, dropping the claim clears it, so the tensor is not busy for
/// ever.
struct BusyClaim<'a> {
    inner: &'a Inner,
    handle: TensorHandle,
    armed: bool,
}

impl BusyClaim<'_> {
    /// The owner is about to clear `busy` itself.
    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for BusyClaim<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let Ok(shard) = self.inner.shard_of(self.handle) else {
            return;
        };
        let mut st = shard.state.lock();
        if let Ok(e) = self.inner.entry(&mut st, self.handle) {
            e.busy = false;
        }
        drop(st);
        shard.cond.notify_all();
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

/// Whether `spans` together cover `[0, len_bytes)`.
fn covers(spans: &[(u64, u64)], len_bytes: u64) -> bool {
    let mut sorted = spans.to_vec();
    sorted.sort_unstable();
    let mut reached = 0u64;
    for (start, end) in sorted {
        if start > reached {
            return false;
        }
        reached = reached.max(end);
    }
    reached >= len_bytes
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

    /// A tensor of `bytes` bytes of `kind`, named `id` (for errors and traces), placed on the
    /// host tier (or, when the kind's host budget is full of pinned tensors, refused).
    pub fn allocate(&self, bytes: u64, kind: TensorKind, id: u64) -> Result<TensorHandle> {
        self.allocate_on(bytes, kind, id, Tier::Host)
    }

    /// Like [`MemoryManager::allocate`], on a chosen tier.
    pub fn allocate_on(
        &self,
        bytes: u64,
        kind: TensorKind,
        id: u64,
        tier: Tier,
    ) -> Result<TensorHandle> {
        if bytes == 0 {
            return Err(ManagerError::ZeroSize);
        }
        let res = self
            .inner
            .reserve_on(tier, kind, bytes, id, &self.inner.waits())?;
        let mut e = Entry::new(id, kind, bytes, tier, res);
        e.last_use = self.inner.tick();
        Ok(self.inner.insert(e))
    }

    /// Registers a tensor that already lies in a file (a checkpoint weight) as resident on the
    /// disk tier, read in place: no copy, no swap space.
    pub fn register_extent(
        &self,
        path: &Path,
        file_offset_bytes: u64,
        len_bytes: u64,
        kind: TensorKind,
        id: u64,
    ) -> Result<TensorHandle> {
        if len_bytes == 0 {
            return Err(ManagerError::ZeroSize);
        }
        let res = self.inner.disk.register_extent(
            path,
            file_offset_bytes,
            len_bytes,
            &format!("tensor {id}"),
        )?;
        let mut e = Entry::new(id, kind, len_bytes, Tier::Disk, res);
        e.written = true;
        e.read_only = true;
        e.last_use = self.inner.tick();
        Ok(self.inner.insert(e))
    }

    /// Frees a tensor and every copy of it. Refused while it is pinned; a stale or
    /// double-freed handle is an error and changes nothing.
    pub fn deallocate(&self, handle: TensorHandle) -> Result<()> {
        let inner = &self.inner;
        let waits = inner.waits();
        let shard = inner.shard_of(handle)?;
        let mut st = shard.state.lock();
        // Registered in `writers_waiting` (undone on every way out of the loop).
        let mut waiting = false;
        let entry = loop {
            let e = inner.entry(&mut st, handle)?;
            if waiting && (e.busy || e.pins() > 0) {
                e.writers_waiting -= 1;
                waiting = false;
                shard.cond.notify_all();
            }
            if e.busy {
                let id = e.id;
                st = waits.wait(&shard.cond, st).map_err(|_| waits.busy(id))?;
                continue;
            }
            let pins = e.pins();
            if pins > 0 {
                return Err(ManagerError::Pinned { id: e.id, pins });
            }
            if !e.reads.is_empty() {
                // A plain read in flight (not a pin): wait for it to end, holding off new
                // ones meanwhile.
                if !waiting {
                    e.writers_waiting += 1;
                    waiting = true;
                }
                let id = e.id;
                match waits.wait(&shard.cond, st) {
                    Ok(g) => st = g,
                    Err(mut g) => {
                        if let Ok(e) = inner.entry(&mut g, handle) {
                            e.writers_waiting -= 1;
                        }
                        drop(g);
                        shard.cond.notify_all();
                        return Err(waits.busy(id));
                    }
                }
                continue;
            }
            let local = (handle.slot as usize) / inner.shards.len();
            let slot = &mut st.slots[local];
            slot.generation = slot.generation.wrapping_add(1);
            let entry = slot.entry.take();
            st.free.push(local as u32);
            break entry;
        };
        drop(st);
        // Readers that waited for this free find the tensor gone.
        shard.cond.notify_all();
        if let Some(e) = entry {
            for t in Tier::ALL {
                if let Some(c) = e.copies[t.index()] {
                    inner.release(t, e.kind, c.res);
                }
            }
        }
        Ok(())
    }

    /// Brings the tensor to `tier` (swapping in if needed, making room by demoting unpinned
    /// tensors of the same kind) and holds it there until the guard drops. When everything
    /// of that kind on the tier is pinned, returns [`ManagerError::OutOfMemory`] at once.
    /// Waits for other threads (a move of this tensor, tensors being moved that could make
    /// room) at most `ManagerConfig::max_call_wait` in all.
    pub fn pin(&self, handle: TensorHandle, tier: Tier) -> Result<PinGuard> {
        let inner = &self.inner;
        let started = Instant::now();
        let waits = inner.waits();
        // The plan's cursor moves to this weight before any eviction its pin causes, so
        // "next use" is measured from the demand position (a weight used early must not make
        // the one needed next look farthest).
        inner.note_plan_use(handle);
        let (res, _written, _id) = inner.bring(handle, tier, Priority::Demand, true, &waits)?;
        inner.counters.add_pin_wait(started.elapsed());
        let len_bytes = res.len_bytes();
        Ok(PinGuard {
            inner: inner.clone(),
            handle,
            tier,
            res,
            len_bytes,
        })
    }

    /// A hint: start bringing the tensor to `tier` soon, on a prefetch worker (the caller
    /// never waits). Hints queue in order for at most [`PREFETCH_WORKERS`] workers, which
    /// start on demand and stop when the queue stays empty; at most
    /// `max_prefetches_in_flight` hints are queued or running, further ones are dropped. A
    /// hint whose tensor was used after the hint was given, or is already on the tier, is
    /// skipped (a late hint must not load again what the caller already loaded and may have
    /// let go). Errors are counted, not returned: the tensor stays where it was.
    pub fn prefetch(&self, handle: TensorHandle, tier: Tier) {
        let inner = &self.inner;
        let admitted = inner
            .prefetches_in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < inner.max_prefetches_in_flight).then_some(n + 1)
            })
            .is_ok();
        if !admitted {
            inner
                .counters
                .prefetches_dropped
                .fetch_add(1, Ordering::Relaxed);
            return;
        }
        inner.counters.prefetches.fetch_add(1, Ordering::Relaxed);
        let tick = inner.tick();
        let mut q = inner.prefetch_queue.lock();
        q.jobs.push_back((handle, tier, tick));
        if q.workers < PREFETCH_WORKERS {
            q.workers += 1;
            drop(q);
            let inner = inner.clone();
            vlmem_core::sync::thread::spawn(move || inner.prefetch_worker());
        } else {
            drop(q);
            inner.prefetch_ready.notify_one();
        }
    }

    /// A prefetch its caller waits for: brings the tensor to `tier` on the calling thread,
    /// as a prefetch worker would (the prefetch priority; nothing to do when it is there
    /// already), waiting for other threads (a move of it, room being made) until `deadline`
    /// at most, and no longer than a call may (`ManagerConfig::max_call_wait`). Returns
    /// whether the tensor is on `tier` when the call returns: false when the bring failed
    /// (no room, a foreign or freed handle) or the waiting ran out. Counted as a prefetch,
    /// and as a failed one when it returns false. For a thread that reads ahead in order,
    /// one tensor at a time: it learns when each landed without polling, and nothing of the
    /// prefetch goes on after the call.
    pub fn prefetch_wait(&self, handle: TensorHandle, tier: Tier, deadline: Instant) -> bool {
        let inner = &self.inner;
        inner.counters.prefetches.fetch_add(1, Ordering::Relaxed);
        let left = deadline.saturating_duration_since(Instant::now());
        let waits = Waits::new(left.min(inner.max_call_wait));
        let landed = match inner.prefetch_is_stale(handle, tier, inner.tick()) {
            Ok(false) => inner
                .bring(handle, tier, Priority::Prefetch, false, &waits)
                .is_ok(),
            Ok(true) | Err(_) => self
                .residency(handle)
                .is_ok_and(|(tiers, _)| tiers.contains(&tier)),
        };
        if !landed {
            inner
                .counters
                .prefetch_failures
                .fetch_add(1, Ordering::Relaxed);
        }
        landed
    }

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

    /// Writes `src` at `offset_bytes`. The write lands on the host copy (brought there if
    /// needed) and every other copy is dropped. Refused while the tensor is pinned.
    pub fn write(&self, handle: TensorHandle, offset_bytes: u64, src: &[u8]) -> Result<()> {
        self.inner.write(handle, offset_bytes, src)
    }

    /// Reads `dst.len()` bytes at `offset_bytes` from the fastest copy, without moving it.
    /// Waits while the tensor is moved or written, or while a write through a pin of an
    /// overlapping range runs, and then reads the new bytes (at most
    /// `ManagerConfig::max_call_wait`, then [`ManagerError::Busy`]).
    pub fn read(&self, handle: TensorHandle, offset_bytes: u64, dst: &mut [u8]) -> Result<()> {
        let inner = &self.inner;
        let waits = inner.waits();
        let (tier, res, _read) =
            inner.begin_fastest_read(handle, offset_bytes, dst.len() as u64, &waits)?;
        if !dst.is_empty() {
            inner.tiers[tier.index()].read(&res, offset_bytes, dst)?;
        }
        Ok(())
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

    /// Where the tensor has copies now (fastest first), and its pin count.
    pub fn residency(&self, handle: TensorHandle) -> Result<(Vec<Tier>, u32)> {
        let inner = &self.inner;
        let shard = inner.shard_of(handle)?;
        let mut st = shard.state.lock();
        let e = inner.entry(&mut st, handle)?;
        let tiers = Tier::ALL
            .into_iter()
            .filter(|t| e.copies[t.index()].is_some())
            .collect();
        Ok((tiers, e.pins()))
    }

    /// Sets the byte budget of `kind` on `tier`. Lowering it below what is in use takes
    /// effect as tensors leave.
    pub fn set_budget(&self, tier: Tier, kind: TensorKind, bytes: u64) {
        self.inner.budgets.write().bytes[tier.index()][kind.index()] = bytes;
    }

    /// A consistent snapshot of the manager's state and counters (see [`ManagerStats`]).
    pub fn stats(&self) -> ManagerStats {
        self.inner.stats()
    }

    /// Checks the ledger under all shard locks: no two live copies on one tier overlap, no
    /// copy is marked busy or pinned when nothing runs, and the budget counters equal the
    /// recount. Meant for quiescent moments (tests, the end of `vlmem stress`).
    pub fn audit(&self) -> Audit {
        self.inner.audit()
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

    /// Whether the tensor was ever written (now, not when a pin was taken: a write through
    /// another pin counts at once).
    fn check_written(&self, h: TensorHandle) -> Result<()> {
        let shard = self.shard_of(h)?;
        let mut st = shard.state.lock();
        let e = self.entry(&mut st, h)?;
        if e.written {
            Ok(())
        } else {
            Err(ManagerError::Uninitialized { id: e.id })
        }
    }

    /// Registers a read of `[offset, offset + len)` through a pin the caller holds: waits
    /// while a write through a pin of an overlapping range runs or waits to run. A tensor
    /// never written: [`ManagerError::Uninitialized`].
    fn begin_read(
        &self,
        h: TensorHandle,
        offset_bytes: u64,
        len_bytes: u64,
        waits: &Waits,
    ) -> Result<SpanClaim<'_>> {
        let span = (offset_bytes, offset_bytes + len_bytes);
        let shard = self.shard_of(h)?;
        let mut st = shard.state.lock();
        loop {
            let e = self.entry(&mut st, h)?;
            if !e.written {
                return Err(ManagerError::Uninitialized { id: e.id });
            }
            if e.read_must_wait(span.0, span.1) {
                let id = e.id;
                st = waits.wait(&shard.cond, st).map_err(|_| waits.busy(id))?;
                continue;
            }
            e.reads.push(span);
            return Ok(SpanClaim {
                inner: self,
                handle: h,
                spans: vec![span],
                lend: false,
                written: false,
            });
        }
    }

    /// Registers a read of `[offset, offset + len)` of the fastest copy, released with the
    /// claim: (tier, reservation, claim). A read in flight is not a pin (writes and frees
    /// are not refused for it, they wait for it), but no copy is dropped or moved from
    /// under it. Waits while the tensor moves or an overlapping write through a pin runs.
    fn begin_fastest_read(
        &self,
        h: TensorHandle,
        offset_bytes: u64,
        len_bytes: u64,
        waits: &Waits,
    ) -> Result<(Tier, Reservation, SpanClaim<'_>)> {
        let shard = self.shard_of(h)?;
        let mut st = shard.state.lock();
        loop {
            let e = self.entry(&mut st, h)?;
            // An empty read waits for nothing: it reads no byte.
            let settled = !e.busy || len_bytes == 0;
            if settled && !e.written {
                return Err(ManagerError::Uninitialized { id: e.id });
            }
            if settled {
                check_range(offset_bytes, len_bytes, e.len_bytes)?;
            }
            let end = offset_bytes.saturating_add(len_bytes);
            if len_bytes > 0
                && (e.busy || e.writers_waiting > 0 || e.read_must_wait(offset_bytes, end))
            {
                let id = e.id;
                st = waits.wait(&shard.cond, st).map_err(|_| waits.busy(id))?;
                continue;
            }
            let tier = e
                .fastest()
                .ok_or_else(|| ManagerError::InvalidConfig("no copy".into()))?;
            let c = e.copies[tier.index()]
                .as_mut()
                .ok_or_else(|| ManagerError::InvalidConfig("no copy".into()))?;
            let res = c.res;
            e.reads.push((offset_bytes, end));
            let claim = SpanClaim {
                inner: self,
                handle: h,
                spans: vec![(offset_bytes, end)],
                lend: false,
                written: false,
            };
            return Ok((tier, res, claim));
        }
    }

    /// Runs `body`, which writes the pinned copy `res` on `tier` in place at `spans`, with
    /// those ranges lent: reads and writes of overlapping ranges wait, moves wait, other
    /// ranges proceed. Refused unless that copy is the tensor's only one and it is writable.
    /// No lock is held while `body` runs; on success the tensor counts as written.
    ///
    /// The first lend of a never-written tensor lends the whole tensor and zeroes it first
    /// unless its spans cover it all, so no byte of a block's previous owner is ever seen
    /// through the tensor. `body` is told whether the lent bytes are clean (written before,
    /// or zeroed now); if not, its spans cover the whole tensor and it must not show their
    /// old bytes.
    fn lend<R>(
        &self,
        h: TensorHandle,
        tier: Tier,
        res: &Reservation,
        spans: &[(u64, u64)],
        body: impl FnOnce(bool) -> Result<R>,
    ) -> Result<R> {
        let waits = self.waits();
        let shard = self.shard_of(h)?;
        let mut st = shard.state.lock();
        // The spans registered as waiting, if any.
        let mut waiting: Option<Vec<(u64, u64)>> = None;
        let unwait = |e: &mut Entry, registered: &[(u64, u64)]| {
            for &span in registered {
                remove_span(&mut e.lends_waiting, span);
            }
        };
        let (lent, was_written, len_bytes) = loop {
            let e = self.entry(&mut st, h)?;
            let refused = if e.read_only {
                Some(ManagerError::ReadOnly { id: e.id })
            } else if Tier::ALL
                .iter()
                .any(|&t| t != tier && e.copies[t.index()].is_some())
            {
                Some(ManagerError::NotExclusive { id: e.id })
            } else {
                None
            };
            if let Some(err) = refused {
                if let Some(reg) = waiting.take() {
                    unwait(e, &reg);
                    shard.cond.notify_all();
                }
                return Err(err);
            }
            let want: Vec<(u64, u64)> = if e.written || covers(spans, e.len_bytes) {
                spans.to_vec()
            } else {
                vec![(0, e.len_bytes)]
            };
            if let Some(reg) = waiting.as_ref()
                && *reg != want
            {
                unwait(e, reg);
                waiting = None;
            }
            if e.lend_must_wait(&want) {
                if waiting.is_none() {
                    e.lends_waiting.extend_from_slice(&want);
                    waiting = Some(want);
                }
                let id = e.id;
                match waits.wait(&shard.cond, st) {
                    Ok(g) => st = g,
                    Err(mut g) => {
                        if let (Ok(e), Some(reg)) = (self.entry(&mut g, h), waiting.as_ref()) {
                            unwait(e, reg);
                        }
                        drop(g);
                        shard.cond.notify_all();
                        return Err(waits.busy(id));
                    }
                }
                continue;
            }
            if let Some(reg) = waiting.take() {
                unwait(e, &reg);
            }
            e.lends.extend_from_slice(&want);
            break (want, e.written, e.len_bytes);
        };
        drop(st);
        let mut claim = SpanClaim {
            inner: self,
            handle: h,
            spans: lent,
            lend: true,
            written: false,
        };
        let zeroed = !was_written && !covers(spans, len_bytes);
        if zeroed {
            self.write_zeros(tier, res)?;
        }
        let r = body(was_written || zeroed);
        claim.written = r.is_ok();
        drop(claim);
        r
    }

    /// Overwrites a whole reservation with zeros, in pieces of whole I/O units of the tier
    /// (the disk's integrity unit), at least 64 KiB, so every piece is a write the tier
    /// accepts.
    fn write_zeros(&self, tier: Tier, res: &Reservation) -> Result<()> {
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
    fn release(&self, tier: Tier, kind: TensorKind, res: Reservation) {
        if !res.is_in_place() {
            self.uncharge(tier, kind, res.len_bytes());
        }
        self.free_block(tier, res);
    }

    /// Returns a reservation to its tier's arena, zeroing it first when so configured
    /// ([`Inner::write_zeros`]). A block that cannot be zeroed is not freed (it stays
    /// reserved, so its bytes cannot reach a new owner).
    fn free_block(&self, tier: Tier, res: Reservation) {
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
    fn reserve_on(
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

    /// Copies a tensor between reservations through the engine (nothing to copy if it was
    /// never written).
    fn copy(
        &self,
        src: Reservation,
        dst: Reservation,
        written: bool,
        priority: Priority,
    ) -> Result<()> {
        if !written {
            return Ok(());
        }
        let started = Instant::now();
        let ticket = self.engine.submit(Move { src, dst }, priority)?;
        let report = ticket.wait()?;
        self.counters
            .record_move(src.tier(), dst.tier(), report.bytes, started.elapsed());
        Ok(())
    }

    /// Brings `h` to `tier`; pins it there when `pin`. Returns the copy, whether the tensor
    /// was ever written, and its id. Waits (on the shard's condition
    /// variable, never spinning) while another thread moves or writes the tensor.
    fn bring(
        &self,
        h: TensorHandle,
        tier: Tier,
        priority: Priority,
        pin: bool,
        waits: &Waits,
    ) -> Result<(Reservation, bool, u64)> {
        let shard = self.shard_of(h)?;
        // Room on the tier is found before the entry is claimed, as for a write-back: a pin
        // that waits for room must not hold the tensor busy meanwhile, or its readers would
        // wait as long. (Two threads racing to bring one tensor may both reserve; the loser
        // gives its room back.)
        let needs = {
            let mut st = shard.state.lock();
            let e = self.entry(&mut st, h)?;
            e.needs_bring(tier).then_some((e.kind, e.len_bytes, e.id))
        };
        let mut room = match needs {
            Some((kind, len_bytes, id)) => {
                match self.reserve_on(tier, kind, len_bytes, id, waits) {
                    Ok(dst) => Some((kind, dst)),
                    // Another thread may have brought it meanwhile: look again before failing.
                    Err(err) => {
                        let mut st = shard.state.lock();
                        let e = self.entry(&mut st, h)?;
                        if e.copies[tier.index()].is_none() {
                            return Err(err);
                        }
                        None
                    }
                }
            }
            None => None,
        };
        let give_back = |room: Option<(TensorKind, Reservation)>| {
            if let Some((kind, dst)) = room {
                self.release(tier, kind, dst);
            }
        };
        let (src, kind, len_bytes, written, id) = {
            let mut st = shard.state.lock();
            loop {
                let tick = self.tick();
                let e = match self.entry(&mut st, h) {
                    Ok(e) => e,
                    Err(err) => {
                        drop(st);
                        give_back(room);
                        return Err(err);
                    }
                };
                if e.fastest().is_none() {
                    return Err(ManagerError::InvalidConfig(format!(
                        "tensor {} has no copy (invariant broken)",
                        e.id
                    )));
                }
                match e.begin_bring(tier, pin) {
                    PinStep::Wait => {
                        let id = e.id;
                        match waits.wait(&shard.cond, st) {
                            Ok(g) => st = g,
                            Err(g) => {
                                drop(g);
                                give_back(room);
                                return Err(waits.busy(id));
                            }
                        }
                    }
                    PinStep::Hit(res) => {
                        e.last_use = tick;
                        self.counters.hit(tier);
                        let out = (res, e.written, e.id);
                        drop(st);
                        give_back(room);
                        return Ok(out);
                    }
                    PinStep::Miss { src } => {
                        e.last_use = tick;
                        self.counters.miss(tier);
                        break (src, e.kind, e.len_bytes, e.written, e.id);
                    }
                }
            }
        };
        // Unlocked (the entry is busy): copy into the room found above (or, when the entry
        // changed in between, reserve now), maybe demoting others.
        let claim = BusyClaim {
            inner: self,
            handle: h,
            armed: true,
        };
        waits.own.borrow_mut().push(h);
        let dst = match room.take() {
            Some((_, dst)) => Ok(dst),
            None => self.reserve_on(tier, kind, len_bytes, id, waits),
        };
        let moved = dst.and_then(|dst| {
            // A copy made on the disk may later be the only one: check it like a write-back.
            let copied = self
                .copy(src, dst, written, priority)
                .and_then(|()| self.verify_write_back(&src, &dst, written, id));
            match copied {
                Ok(()) => Ok(dst),
                Err(e) => {
                    self.release(tier, kind, dst);
                    Err(e)
                }
            }
        });
        waits.disown(h);
        claim.disarm();
        let mut st = shard.state.lock();
        let e = self.entry(&mut st, h)?;
        e.finish_bring(tier, moved.as_ref().ok().copied(), pin);
        shard.cond.notify_all();
        moved.map(|res| (res, written, id))
    }

    /// A prefetch worker: takes hints in order until the queue stays empty, then stops (a
    /// worker holds the manager alive, so it must not outlive the queue's work).
    fn prefetch_worker(&self) {
        loop {
            let job = {
                let mut q = self.prefetch_queue.lock();
                if q.jobs.is_empty() {
                    // Hints come in bursts (a layer's tensors): linger briefly for the next.
                    #[cfg(not(any(vlmem_loom, vlmem_shuttle)))]
                    self.prefetch_ready
                        .wait_for(&mut q, std::time::Duration::from_millis(2));
                }
                match q.jobs.pop_front() {
                    Some(job) => job,
                    None => {
                        q.workers -= 1;
                        return;
                    }
                }
            };
            let (h, tier, hinted_at) = job;
            let failed = match self.prefetch_is_stale(h, tier, hinted_at) {
                Ok(true) => false,
                Ok(false) => self
                    .bring(h, tier, Priority::Prefetch, false, &self.waits())
                    .is_err(),
                // A foreign, stale or freed handle: the hint fails (and changes nothing).
                Err(_) => true,
            };
            if failed {
                self.counters
                    .prefetch_failures
                    .fetch_add(1, Ordering::Relaxed);
            }
            self.prefetches_in_flight.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Whether a hint has nothing left to do: the tensor is gone, already on the tier, or
    /// was used after the hint (its demand pin brought it, and may have let it go since).
    fn prefetch_is_stale(&self, h: TensorHandle, tier: Tier, hinted_at: u64) -> Result<bool> {
        let shard = self.shard_of(h)?;
        let mut st = shard.state.lock();
        let e = self.entry(&mut st, h)?;
        Ok(e.copies[tier.index()].is_some() || e.last_use > hinted_at)
    }

    fn unpin(&self, h: TensorHandle, tier: Tier) {
        let Ok(shard) = self.shard_of(h) else { return };
        let mut st = shard.state.lock();
        if let Ok(e) = self.entry(&mut st, h) {
            e.unpin(tier);
        }
        shard.cond.notify_all();
    }

    fn write(&self, h: TensorHandle, offset_bytes: u64, src: &[u8]) -> Result<()> {
        let waits = self.waits();
        let shard = self.shard_of(h)?;
        // Phase 1: claim the entry.
        let (host_res, kind, len_bytes, written, id, from) = {
            let mut st = shard.state.lock();
            // Registered in `writers_waiting` while waiting for plain reads to end.
            let mut waiting = false;
            loop {
                enum Step {
                    Wait,
                    WaitForReads,
                    Fail(ManagerError),
                    Nothing,
                    Go,
                }
                let e = self.entry(&mut st, h)?;
                let step = if e.busy {
                    Step::Wait
                } else if e.read_only {
                    Step::Fail(ManagerError::ReadOnly { id: e.id })
                } else if let Err(err) = check_range(offset_bytes, src.len() as u64, e.len_bytes) {
                    Step::Fail(err)
                } else if e.pins() > 0 {
                    Step::Fail(ManagerError::Pinned {
                        id: e.id,
                        pins: e.pins(),
                    })
                } else if !e.reads.is_empty() {
                    // A plain read in flight (not a pin): wait for it to end, holding off
                    // new ones meanwhile.
                    Step::WaitForReads
                } else if src.is_empty() {
                    // Nothing to write: the tensor does not become written by it.
                    Step::Nothing
                } else {
                    Step::Go
                };
                let for_reads = matches!(step, Step::WaitForReads);
                if for_reads && !waiting {
                    e.writers_waiting += 1;
                    waiting = true;
                } else if !for_reads && waiting {
                    e.writers_waiting -= 1;
                    waiting = false;
                    shard.cond.notify_all();
                }
                match step {
                    Step::Wait | Step::WaitForReads => {
                        let id = e.id;
                        match waits.wait(&shard.cond, st) {
                            Ok(g) => st = g,
                            Err(mut g) => {
                                if waiting && let Ok(e) = self.entry(&mut g, h) {
                                    e.writers_waiting -= 1;
                                }
                                drop(g);
                                shard.cond.notify_all();
                                return Err(waits.busy(id));
                            }
                        }
                        continue;
                    }
                    Step::Fail(err) => return Err(err),
                    Step::Nothing => return Ok(()),
                    Step::Go => {}
                }
                e.busy = true;
                let from = e.fastest();
                let host = e.copies[Tier::Host.index()].map(|c| c.res);
                let from_res = from.and_then(|t| e.copies[t.index()].map(|c| c.res));
                break (host, e.kind, e.len_bytes, e.written, e.id, from_res);
            }
        };
        // Phase 2, unlocked: make sure there is a host copy, then write into it.
        let claim = BusyClaim {
            inner: self,
            handle: h,
            armed: true,
        };
        waits.own.borrow_mut().push(h);
        let result = (|| -> Result<(Reservation, bool)> {
            let (res, fresh) = match host_res {
                Some(r) => (r, false),
                None => {
                    let dst = self.reserve_on(Tier::Host, kind, len_bytes, id, &waits)?;
                    let src_res = from.ok_or_else(|| ManagerError::InvalidConfig("no copy".into()));
                    // A write that covers the whole tensor needs none of its old bytes.
                    let whole = offset_bytes == 0 && src.len() as u64 == len_bytes;
                    let copied = src_res
                        .and_then(|s| self.copy(s, dst, written && !whole, Priority::Demand));
                    if let Err(e) = copied {
                        self.release(Tier::Host, kind, dst);
                        return Err(e);
                    }
                    (dst, true)
                }
            };
            if let Err(e) = self.tiers[Tier::Host.index()].write(&res, offset_bytes, src) {
                if fresh {
                    self.release(Tier::Host, kind, res);
                }
                return Err(e.into());
            }
            Ok((res, fresh))
        })();
        // Phase 3: install the host copy as the only one.
        waits.disown(h);
        claim.disarm();
        let mut dropped = Vec::new();
        {
            let mut st = shard.state.lock();
            let e = self.entry(&mut st, h)?;
            e.busy = false;
            shard.cond.notify_all();
            let (res, _) = result?;
            for t in [Tier::Device, Tier::Disk] {
                if let Some(c) = e.copies[t.index()].take() {
                    dropped.push((t, c.res));
                }
            }
            e.copies[Tier::Host.index()] = Some(Copy { res, pins: 0 });
            e.written = true;
            e.last_use = self.tick();
        }
        for (t, res) in dropped {
            self.release(t, kind, res);
        }
        Ok(())
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

    /// Records a use of a planned weight: the cursor of the cyclic access plan.
    fn note_plan_use(&self, h: TensorHandle) {
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

    /// Reads a write-back to the disk back and compares it with its source before the
    /// source copy may be dropped (a swap-out corrupted on its way down must not cost the
    /// only good copy). Off with `ManagerConfig::verify_write_backs = false`.
    fn verify_write_back(
        &self,
        src: &Reservation,
        dst: &Reservation,
        written: bool,
        id: u64,
    ) -> Result<()> {
        if !self.verify_write_backs || !written || dst.tier() != Tier::Disk {
            return Ok(());
        }
        const PIECE_BYTES: u64 = 4 << 20;
        let (from, to) = (
            &self.tiers[src.tier().index()],
            &self.tiers[dst.tier().index()],
        );
        let len = src.len_bytes();
        let mut a = vec![0u8; len.min(PIECE_BYTES) as usize];
        let mut b = vec![0u8; a.len()];
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(PIECE_BYTES) as usize;
            from.read(src, done, &mut a[..n])?;
            to.read(dst, done, &mut b[..n])?;
            if let Some(i) = a[..n].iter().zip(&b[..n]).position(|(x, y)| x != y) {
                return Err(TierError::Corrupt {
                    tier: dst.tier(),
                    tensor: format!("tensor {id}"),
                    offset_in_tensor_bytes: done + i as u64,
                    detail: "the write-back read back differently; the upper copy is kept".into(),
                }
                .into());
            }
            done += n as u64;
        }
        Ok(())
    }

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

    /// Demotes `kind`'s tensors from `tier` until `bytes` are freed; returns bytes freed.
    fn evict_kind(&self, tier: Tier, kind: TensorKind, bytes: u64, waits: &Waits) -> Result<u64> {
        Ok(self.evict_kind_counting(tier, kind, bytes, waits)?.freed)
    }

    /// [`Self::evict_kind`], also returning how many candidates were moving (skipped) and
    /// whether a demotion failed (the tier below is failing or full of pinned data).
    fn evict_kind_counting(
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

    /// Drops `h`'s copy on `tier`, writing it back one tier down first when it is the only
    /// copy. Returns the bytes freed on `tier` (0 if it became pinned or busy meanwhile).
    fn demote(&self, h: TensorHandle, tier: Tier, waits: &Waits) -> Result<u64> {
        let shard = self.shard_of(h)?;
        let below = tier.below().unwrap_or(Tier::Disk);
        // Room below is found before the entry is claimed: a write-back that waits for room
        // (a full tier below) must not hold the tensor busy meanwhile, or its readers would
        // wait as long.
        let needs = {
            let mut st = shard.state.lock();
            let e = self.entry(&mut st, h)?;
            e.needs_write_back(tier, Reservation::is_in_place)
                .then_some((e.kind, e.len_bytes, e.id))
        };
        let mut room = match needs {
            Some((kind, len_bytes, id)) => {
                Some((kind, self.reserve_on(below, kind, len_bytes, id, waits)?))
            }
            None => None,
        };
        let give_back = |room: Option<(TensorKind, Reservation)>| {
            if let Some((kind, dst)) = room {
                self.release(below, kind, dst);
            }
        };
        let (src, kind, len_bytes, written, id) = {
            let mut st = shard.state.lock();
            let e = match self.entry(&mut st, h) {
                Ok(e) => e,
                Err(err) => {
                    drop(st);
                    give_back(room);
                    return Err(err);
                }
            };
            match e.begin_demote(tier, Reservation::is_in_place) {
                DemoteStep::Skip => {
                    drop(st);
                    give_back(room);
                    return Ok(0);
                }
                DemoteStep::Dropped(res) => {
                    let kind = e.kind;
                    drop(st);
                    give_back(room);
                    self.release(tier, kind, res);
                    self.counters.eviction(tier, res.len_bytes(), false);
                    return Ok(res.len_bytes());
                }
                DemoteStep::WriteBack { src } => (src, e.kind, e.len_bytes, e.written, e.id),
            }
        };
        let claim = BusyClaim {
            inner: self,
            handle: h,
            armed: true,
        };
        // The room found above; none when the entry changed in between (rare: then the
        // reservation is made with the entry busy).
        waits.own.borrow_mut().push(h);
        let dst = match room.take() {
            Some((_, dst)) => Ok(dst),
            None => self.reserve_on(below, kind, len_bytes, id, waits),
        };
        let moved = dst.and_then(|dst| {
            let copied = self
                .copy(src, dst, written, Priority::WriteBack)
                .and_then(|()| self.verify_write_back(&src, &dst, written, id));
            match copied {
                Ok(()) => Ok(dst),
                Err(e) => {
                    self.release(below, kind, dst);
                    Err(e)
                }
            }
        });
        waits.disown(h);
        claim.disarm();
        let old = {
            let mut st = shard.state.lock();
            let e = self.entry(&mut st, h)?;
            let old = e.finish_demote(tier, below, moved.as_ref().ok().copied());
            shard.cond.notify_all();
            old
        };
        moved?;
        if let Some(old) = old {
            self.release(tier, kind, old);
        }
        self.counters.eviction(tier, len_bytes, true);
        Ok(len_bytes)
    }

    fn audit(&self) -> Audit {
        let guards: Vec<_> = self.shards.iter().map(|s| s.state.lock()).collect();
        let mut spans: [Vec<(u64, u64)>; 3] = Default::default();
        let mut busy = 0u64;
        let mut pins = 0u64;
        let mut copyless = 0u64;
        for st in &guards {
            for e in st.slots.iter().filter_map(|s| s.entry.as_ref()) {
                busy += u64::from(e.busy);
                pins += u64::from(e.pins());
                copyless += u64::from(e.fastest().is_none());
                for t in Tier::ALL {
                    if let Some(c) = e.copies[t.index()]
                        && !c.res.is_in_place()
                    {
                        let b = c.res.block();
                        spans[t.index()].push((b.offset_bytes(), b.end_bytes()));
                    }
                }
            }
        }
        drop(guards);
        let mut overlaps = 0u64;
        for list in spans.iter_mut() {
            list.sort_unstable();
            overlaps += list.windows(2).filter(|w| w[1].0 < w[0].1).count() as u64;
        }
        let stats = self.stats();
        Audit {
            overlaps,
            busy_entries: busy,
            pins,
            entries_without_copy: copyless,
            charged_matches_resident: stats.charged == stats.resident,
        }
    }

    /// Recounts every copy under all shard locks (taken in ascending order) and compares with
    /// the budget counters.
    fn stats(&self) -> ManagerStats {
        let guards: Vec<_> = self.shards.iter().map(|s| s.state.lock()).collect();
        let mut resident = TierKindBytes::default();
        let mut tensors = 0u64;
        let mut pinned = 0u64;
        for st in &guards {
            for e in st.slots.iter().filter_map(|s| s.entry.as_ref()) {
                tensors += 1;
                for t in Tier::ALL {
                    if let Some(c) = e.copies[t.index()] {
                        if !c.res.is_in_place() {
                            resident.add(t, e.kind, c.res.len_bytes());
                        }
                        pinned += u64::from(c.pins);
                    }
                }
            }
        }
        let mut charged = TierKindBytes::default();
        for t in Tier::ALL {
            for k in TensorKind::ALL {
                charged.add(
                    t,
                    k,
                    self.used[t.index()][k.index()].load(Ordering::Acquire),
                );
            }
        }
        drop(guards);
        ManagerStats {
            tensors,
            pins: pinned,
            resident,
            charged,
            budgets: *self.budgets.read(),
            counters: self.counters.snapshot(),
        }
    }
}
