//! Per-step arenas for activations and scratch: one tensor of the manager, pinned on its
//! tier for the arena's whole life (so never swapped), handed out by bumping an offset and
//! taken back all at once when the step ends.
//!
//! A forward step allocates its activations in order and frees them all together; a bump
//! allocator is the cheapest exact fit for that (one atomic add per allocation, no free
//! list, no fragmentation). The arena's bytes count against the kind's budget on the tier
//! like any tensor, and `vlmem inspect` shows them as pinned.
//!
//! Slices carry the step they were made in: after [`StepArena::reset`] (which takes
//! `&mut self`, so no allocation races it) a slice of an earlier step is refused as stale.
//! Slices are disjoint, so threads may write different slices at once; the arena does not
//! order two writes to one slice.

use crate::error::{ManagerError, Result};
use crate::manager::{MemoryManager, PinGuard, TensorHandle};
use vlmem_core::sync::atomic::{AtomicU64, Ordering};
use vlmem_core::{TensorKind, Tier};

/// Alignment of every slice (a cache line; wide enough for any SIMD load).
pub const ARENA_ALIGN_BYTES: u64 = 64;

/// A range of a [`StepArena`], valid for the step it was made in and in that arena only
/// (another arena refuses it as foreign).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArenaSlice {
    arena: TensorHandle,
    offset_bytes: u64,
    len_bytes: u64,
    step: u64,
}

impl ArenaSlice {
    /// Offset inside the arena.
    pub fn offset_bytes(&self) -> u64 {
        self.offset_bytes
    }
    /// Length.
    pub fn len_bytes(&self) -> u64 {
        self.len_bytes
    }
}

/// A bump arena over one pinned tensor. See the module docs.
#[derive(Debug)]
pub struct StepArena {
    manager: MemoryManager,
    handle: TensorHandle,
    guard: Option<PinGuard>,
    kind: TensorKind,
    tier: Tier,
    capacity_bytes: u64,
    next_bytes: AtomicU64,
    peak_bytes: AtomicU64,
    step: u64,
}

impl StepArena {
    /// An arena of `capacity_bytes` for `kind` (activations or scratch) on `tier`, zeroed
    /// and pinned there until dropped.
    pub fn new(
        manager: &MemoryManager,
        kind: TensorKind,
        tier: Tier,
        capacity_bytes: u64,
    ) -> Result<Self> {
        if !matches!(kind, TensorKind::Activation | TensorKind::Scratch) {
            return Err(ManagerError::InvalidConfig(format!(
                "a step arena holds activations or scratch, not {kind}"
            )));
        }
        let handle = manager.allocate_on(capacity_bytes, kind, u64::MAX, tier)?;
        let made = (|| -> Result<PinGuard> {
            let guard = manager.pin(handle, tier)?;
            // Zero once, so no slice ever shows a previous owner's bytes.
            const ZEROS: usize = 64 << 10;
            let zeros = vec![0u8; ZEROS.min(capacity_bytes as usize)];
            let mut done = 0u64;
            while done < capacity_bytes {
                let n = (capacity_bytes - done).min(zeros.len() as u64) as usize;
                guard.write(done, &zeros[..n])?;
                done += n as u64;
            }
            Ok(guard)
        })();
        match made {
            Ok(guard) => Ok(StepArena {
                manager: manager.clone(),
                handle,
                guard: Some(guard),
                kind,
                tier,
                capacity_bytes,
                next_bytes: AtomicU64::new(0),
                peak_bytes: AtomicU64::new(0),
                step: 0,
            }),
            Err(e) => {
                let _ = manager.deallocate(handle);
                Err(e)
            }
        }
    }

    fn guard(&self) -> Result<&PinGuard> {
        self.guard
            .as_ref()
            .ok_or_else(|| ManagerError::InvalidConfig("arena without its pin".into()))
    }

    /// `bytes` bytes (aligned to [`ARENA_ALIGN_BYTES`]) for this step. When the arena is full
    /// the answer is `OutOfMemory`; nothing else is evicted for it.
    pub fn alloc(&self, bytes: u64) -> Result<ArenaSlice> {
        if bytes == 0 {
            return Err(ManagerError::ZeroSize);
        }
        let rounded =
            bytes
                .checked_next_multiple_of(ARENA_ALIGN_BYTES)
                .ok_or(ManagerError::TooLarge {
                    tier: self.tier,
                    kind: self.kind,
                    requested_bytes: bytes,
                    budget_bytes: self.capacity_bytes,
                })?;
        let cap = self.capacity_bytes;
        let offset = self
            .next_bytes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                n.checked_add(rounded).filter(|&end| end <= cap)
            })
            .map_err(|used| ManagerError::OutOfMemory {
                tier: self.tier,
                kind: self.kind,
                requested_bytes: bytes,
                free_bytes: cap.saturating_sub(used),
                pinned_bytes: cap,
            })?;
        self.peak_bytes
            .fetch_max(offset + rounded, Ordering::Relaxed);
        Ok(ArenaSlice {
            arena: self.handle,
            offset_bytes: offset,
            len_bytes: bytes,
            step: self.step,
        })
    }

    fn check(&self, s: &ArenaSlice, offset_bytes: u64, len: usize) -> Result<()> {
        if s.arena != self.handle {
            return Err(ManagerError::Foreign {
                slot: s.arena.slot(),
            });
        }
        if s.step != self.step {
            return Err(ManagerError::Stale {
                slot: self.handle.slot(),
                generation: s.step as u32,
            });
        }
        match offset_bytes.checked_add(len as u64) {
            Some(end) if end <= s.len_bytes => Ok(()),
            _ => Err(ManagerError::OutOfRange {
                offset_bytes,
                len_bytes: len as u64,
                tensor_bytes: s.len_bytes,
            }),
        }
    }

    /// Writes `src` at `offset_bytes` of the slice.
    pub fn write(&self, s: &ArenaSlice, offset_bytes: u64, src: &[u8]) -> Result<()> {
        self.check(s, offset_bytes, src.len())?;
        self.guard()?.write(s.offset_bytes + offset_bytes, src)
    }

    /// Reads `dst.len()` bytes at `offset_bytes` of the slice.
    pub fn read(&self, s: &ArenaSlice, offset_bytes: u64, dst: &mut [u8]) -> Result<()> {
        self.check(s, offset_bytes, dst.len())?;
        self.guard()?.read(s.offset_bytes + offset_bytes, dst)
    }

    /// Runs `f` with an f32 view of each slice in `slices`, in that order, lent in place (the
    /// arena's bytes, no copy). Each slice must be of this step and a whole number of f32s,
    /// and no slice may be given twice (slices never overlap otherwise); the views are
    /// disjoint, so `f` may fill several at once. Only these slices are locked while `f`
    /// runs (see [`PinGuard::with_ranges_mut`]): other threads' reads and writes of them
    /// wait, and then see what `f` left; other slices are read and written at once. The
    /// arena's bytes stay where they are.
    pub fn with_f32<R>(
        &self,
        slices: &[ArenaSlice],
        f: impl FnOnce(&mut [&mut [f32]]) -> R,
    ) -> Result<R> {
        let mut order: Vec<usize> = (0..slices.len()).collect();
        order.sort_by_key(|&i| slices[i].offset_bytes);
        let mut end_bytes = 0u64;
        for &i in &order {
            let s = &slices[i];
            self.check(s, 0, s.len_bytes as usize)?;
            if !s.len_bytes.is_multiple_of(4) {
                return Err(ManagerError::InvalidConfig(format!(
                    "an f32 view of {} bytes",
                    s.len_bytes
                )));
            }
            if s.offset_bytes < end_bytes {
                return Err(ManagerError::InvalidConfig(
                    "the same arena slice lent twice at once".into(),
                ));
            }
            end_bytes = s.offset_bytes + s.len_bytes;
        }
        let ranges: Vec<(u64, u64)> = slices
            .iter()
            .map(|s| (s.offset_bytes, s.len_bytes))
            .collect();
        self.guard()?.with_ranges_mut(&ranges, |bytes| {
            let mut views = Vec::with_capacity(bytes.len());
            for b in bytes.iter_mut() {
                match bytemuck::try_cast_slice_mut::<u8, f32>(std::mem::take(b)) {
                    Ok(v) => views.push(v),
                    Err(_) => {
                        return Err(ManagerError::InvalidConfig(
                            "the arena's memory is not aligned for f32".into(),
                        ));
                    }
                }
            }
            Ok(f(&mut views))
        })?
    }

    /// Ends the step: every slice goes at once (and is refused from now on).
    pub fn reset(&mut self) {
        self.next_bytes.store(0, Ordering::Release);
        self.step += 1;
    }

    /// Bytes handed out this step (after alignment).
    pub fn used_bytes(&self) -> u64 {
        self.next_bytes.load(Ordering::Acquire)
    }

    /// The most bytes any step used.
    pub fn peak_bytes(&self) -> u64 {
        self.peak_bytes.load(Ordering::Relaxed)
    }

    /// The tier the arena is pinned on.
    pub fn tier(&self) -> Tier {
        self.tier
    }

    /// The arena's size.
    pub fn capacity_bytes(&self) -> u64 {
        self.capacity_bytes
    }

    /// Steps ended so far.
    pub fn steps(&self) -> u64 {
        self.step
    }
}

impl Drop for StepArena {
    fn drop(&mut self) {
        drop(self.guard.take());
        if let Err(e) = self.manager.deallocate(self.handle) {
            tracing::warn!(error = %e, "freeing a step arena failed");
        }
    }
}
