//! Moving tensors between tiers: promotion, demotion and write-back.

use super::claims::BusyClaim;
use super::waits::Waits;
use super::{Inner, TensorHandle};
use crate::entry::{DemoteStep, PinStep};
use crate::error::{ManagerError, Result};
use std::time::Instant;
use vlmem_core::{TensorKind, Tier};
use vlmem_tier::{Move, Priority, Reservation, TierError};

impl Inner {
    /// Copies a tensor between reservations through the engine (nothing to copy if it was
    /// never written).
    pub(super) fn copy(
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
    pub(super) fn bring(
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

    /// Drops `h`'s copy on `tier`, writing it back one tier down first when it is the only
    /// copy. Returns the bytes freed on `tier` (0 if it became pinned or busy meanwhile).
    pub(super) fn demote(&self, h: TensorHandle, tier: Tier, waits: &Waits) -> Result<u64> {
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
}
