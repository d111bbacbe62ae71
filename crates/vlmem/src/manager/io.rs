//! Plain reads and writes of a tensor (not through a pin).

use super::claims::BusyClaim;
use super::{Inner, MemoryManager, TensorHandle, check_range};
use crate::entry::Copy;
use crate::error::{ManagerError, Result};
use vlmem_core::Tier;
use vlmem_tier::{Priority, Reservation};

impl MemoryManager {
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
}

impl Inner {
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
}
