//! What a call holds in flight: byte ranges read or lent through pins, and the busy mark
//! of a move or a write.

use super::waits::Waits;
use super::{Entry, Inner, TensorHandle, check_range};
use crate::entry::remove_span;
use crate::error::{ManagerError, Result};
use vlmem_core::Tier;
use vlmem_tier::Reservation;

/// A byte range in flight through a pin: a read, or a lend for writing in place. Released
/// when dropped, also when the code holding it unwinds (a caller's closure that panics), so
/// a panic never leaves a range locked.
pub(super) struct SpanClaim<'a> {
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
pub(super) struct BusyClaim<'a> {
    pub(super) inner: &'a Inner,
    pub(super) handle: TensorHandle,
    pub(super) armed: bool,
}

impl BusyClaim<'_> {
    /// The owner is about to clear `busy` itself.
    pub(super) fn disarm(mut self) {
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

impl Inner {
    /// Registers a read of `[offset, offset + len)` through a pin the caller holds: waits
    /// while a write through a pin of an overlapping range runs or waits to run. A tensor
    /// never written: [`ManagerError::Uninitialized`].
    pub(super) fn begin_read(
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
    pub(super) fn begin_fastest_read(
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
    pub(super) fn lend<R>(
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
}
