//! Pins: a tensor held on a tier while its guard lives, and reads and in-place writes
//! through it.

use super::{Inner, MemoryManager, TensorHandle, check_range};
use crate::error::{ManagerError, Result};
use std::time::Instant;
use vlmem_core::Tier;
use vlmem_core::sync::Arc;
use vlmem_tier::{Priority, Reservation};

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

impl MemoryManager {
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
}

impl Inner {
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

    fn unpin(&self, h: TensorHandle, tier: Tier) {
        let Ok(shard) = self.shard_of(h) else { return };
        let mut st = shard.state.lock();
        if let Ok(e) = self.entry(&mut st, h) {
            e.unpin(tier);
        }
        shard.cond.notify_all();
    }
}
