//! Pressure: whole sequences swapped out and back, and room made on the compute tier.

use super::{KvError, KvPool, KvResult, SeqId, Sequence, Tables};
use crate::manager::{PinGuard, TensorHandle};
use std::collections::{HashMap, HashSet};
use vlmem_core::sync::atomic::Ordering;
use vlmem_core::sync::wait_guard;

/// The blocks that a sequence other than `except` holds while it is in use: not swapped
/// out, or used (`busy`) or moved (`swapping`) by a call now. Those stay on the compute tier.
fn held_by_others_in_use(seqs: &HashMap<u64, Sequence>, except: u64) -> HashSet<u64> {
    seqs.iter()
        .filter(|(id, s)| **id != except && (!s.swapped || s.busy || s.swapping))
        .flat_map(|(_, s)| s.blocks.iter().copied())
        .collect()
}

/// Blocks a call is moving down (marked `leaving`); those whose placement it has not noted
/// when it returns or unwinds get their mark cleared, and the waiting uses are woken.
struct LeavingMarks<'a> {
    pool: &'a KvPool,
    blocks: Vec<u64>,
    /// Blocks from here on are still marked by this call.
    next: usize,
}

impl Drop for LeavingMarks<'_> {
    fn drop(&mut self) {
        let rest = self.blocks.get(self.next..).unwrap_or(&[]);
        if rest.is_empty() {
            return;
        }
        let mut t = self.pool.tables.lock();
        for b in rest {
            if let Some(m) = t.blocks.get_mut(b) {
                m.leaving = false;
            }
        }
        drop(t);
        self.pool.swapped_for_room.notify_all();
    }
}

/// What `make_room` does next.
enum Room {
    /// Swap out this other sequence (marked `swapping`).
    Sequence(u64),
    /// Move down this block of the calling sequence (marked `leaving`).
    Own(u64, TensorHandle),
}

impl KvPool {
    /// Swaps the whole sequence out of the compute tier: every block on the tier that no
    /// running sequence holds moves one tier down: the blocks it holds alone, and those it
    /// shares only with sequences that are swapped out and idle (also when it is swapped
    /// already: blocks left to it, or to it and other swapped sequences, since their running
    /// holders finished or went out). Returns the bytes freed on the compute tier.
    pub fn swap_out(&self, seq: SeqId) -> KvResult<u64> {
        let _claim = self.claim(seq)?;
        self.swap_out_claimed(seq.0)
    }

    /// [`KvPool::swap_out`] of a sequence this thread has claimed or marked `swapping`. The
    /// other holders of a block it moves are marked `swapping` meanwhile, so none of them is
    /// used (or finished) while its block is on the way down; the blocks themselves are
    /// marked `leaving` when the list is made, so a sequence started on them meanwhile starts
    /// swapped and its uses wait for the move.
    fn swap_out_claimed(&self, seq: u64) -> KvResult<u64> {
        let (own, was_swapped, others): (Vec<(u64, TensorHandle)>, bool, Vec<u64>) = {
            let mut t = self.tables.lock();
            let Tables { seqs, blocks, .. } = &mut *t;
            let held = held_by_others_in_use(seqs, seq);
            let s = seqs.get_mut(&seq).ok_or(KvError::UnknownSequence(seq))?;
            let was_swapped = std::mem::replace(&mut s.swapped, true);
            let own: Vec<(u64, TensorHandle)> = s
                .blocks
                .iter()
                .filter_map(|b| {
                    let m = blocks.get_mut(b)?;
                    let go = m.resident && !m.leaving && !held.contains(b);
                    m.leaving |= go;
                    go.then_some((*b, m.handle))
                })
                .collect();
            let shared: Vec<u64> = own
                .iter()
                .filter(|(b, _)| blocks.get(b).is_some_and(|m| m.refs > 1))
                .map(|(b, _)| *b)
                .collect();
            let mut others = Vec::new();
            if !shared.is_empty() {
                for (id, o) in seqs.iter_mut() {
                    if *id != seq && o.blocks.iter().any(|b| shared.contains(b)) {
                        // Swapped and idle (`held_by_others_in_use` left its blocks out).
                        o.swapping = true;
                        others.push(*id);
                    }
                }
            }
            (own, was_swapped, others)
        };
        let freed = self.move_down(seq, own);
        if !others.is_empty() {
            let mut t = self.tables.lock();
            for id in others {
                if let Some(o) = t.seqs.get_mut(&id) {
                    o.swapping = false;
                }
            }
            drop(t);
            self.swapped_for_room.notify_all();
        }
        if !was_swapped {
            self.swap_outs.fetch_add(1, Ordering::Relaxed);
        }
        freed
    }

    /// Moves blocks of `holder` that this call marked `leaving` one tier down, noting where
    /// each one is afterwards (which clears its mark); stops at the first error (the marks
    /// of the blocks not moved are cleared). Returns the bytes freed on the compute tier.
    fn move_down(&self, holder: u64, blocks: Vec<(u64, TensorHandle)>) -> KvResult<u64> {
        let mut marks = LeavingMarks {
            pool: self,
            blocks: blocks.iter().map(|(b, _)| *b).collect(),
            next: 0,
        };
        let mut freed = 0;
        for (b, h) in blocks {
            let moved = self.manager.swap_out(h, self.config.compute_tier);
            // Where the block is now, not what was asked, decides whether it is counted on
            // the tier (the manager leaves a pinned block where it is).
            let on_tier = self.on_compute_tier(h);
            self.note_placement(b, on_tier, Some(holder));
            marks.next += 1;
            freed += moved?;
        }
        Ok(freed)
    }

    /// Waits while `block` is being moved down by another call; then, when it is not
    /// counted on the compute tier, makes room for it (the caller brings it there next and
    /// counts it).
    pub(super) fn count_in(&self, seq: u64, block: u64) -> KvResult<()> {
        let mut t = self.tables.lock();
        loop {
            let m = t
                .blocks
                .get(&block)
                .ok_or_else(|| KvError::InvalidConfig(format!("block {block} vanished")))?;
            if m.leaving {
                t = wait_guard(&self.swapped_for_room, t);
                continue;
            }
            if m.resident {
                return Ok(());
            }
            break;
        }
        drop(t);
        // Without room (every other block in use), the pin or write that follows lets the
        // manager evict, and the count follows it at the next reconciliation.
        self.make_room(seq, &[block])?;
        Ok(())
    }

    /// Pins a block of the claimed sequence `seq` on the compute tier, counted there (room
    /// made first when it was not).
    pub(super) fn pin_counted(&self, seq: u64, block: u64) -> KvResult<PinGuard> {
        self.count_in(seq, block)?;
        let handle = self.handle_of(block)?;
        let guard = self.manager.pin(handle, self.config.compute_tier)?;
        // Counted while the pin holds it there.
        self.note_placement(block, Some(true), Some(seq));
        Ok(guard)
    }

    /// Brings a swapped sequence back whole (making room by swapping out others): every
    /// block it holds that is not counted on the compute tier is pinned there and counted.
    /// The sequence is marked back in only once none is left away (a block taken from it
    /// meanwhile is brought back in the next round). Waits while a block of it is being
    /// moved down. A sequence with more blocks than the tier holds, or for which no other
    /// sequence gives room now, stays swapped: its uses bring the blocks they touch back one
    /// by one ([`KvPool::pin_counted`]).
    pub(super) fn ensure_resident(&self, seq: SeqId) -> KvResult<()> {
        loop {
            let (away, all): (Vec<(u64, TensorHandle)>, Vec<u64>) = {
                let mut t = self.tables.lock();
                loop {
                    let s = t.seqs.get(&seq.0).ok_or(KvError::UnknownSequence(seq.0))?;
                    if s.blocks
                        .iter()
                        .any(|b| t.blocks.get(b).is_some_and(|m| m.leaving))
                    {
                        t = wait_guard(&self.swapped_for_room, t);
                        continue;
                    }
                    break;
                }
                let Tables { seqs, blocks, .. } = &mut *t;
                let s = seqs
                    .get_mut(&seq.0)
                    .ok_or(KvError::UnknownSequence(seq.0))?;
                if !s.swapped {
                    return Ok(());
                }
                let away: Vec<_> = s
                    .blocks
                    .iter()
                    .filter_map(|b| {
                        let m = blocks.get(b)?;
                        (!m.resident).then_some((*b, m.handle))
                    })
                    .collect();
                if away.is_empty() {
                    s.swapped = false;
                    drop(t);
                    self.swap_ins.fetch_add(1, Ordering::Relaxed);
                    return Ok(());
                }
                if s.blocks.len() as u64 > self.max_resident_blocks {
                    return Ok(());
                }
                (away, s.blocks.clone())
            };
            for (b, h) in away {
                // Room from other sequences only: moving its own blocks down would not
                // bring it back whole.
                if !self.make_room(seq.0, &all)? {
                    return Ok(());
                }
                let guard = self.manager.pin(h, self.config.compute_tier)?;
                // Counted while the pin still holds it there.
                self.note_placement(b, Some(true), Some(seq.0));
                drop(guard);
            }
        }
    }

    /// Makes room for one more block on the compute tier; `Ok(false)` when none can be
    /// had now. At the limit, the count first follows the manager's placement (blocks it
    /// moved on its own). Then the room taken by blocks that only swapped-out idle
    /// sequences hold (left to them by a running holder that finished or went out): such a
    /// sequence is swapped out again, which moves them down and preempts nobody. Then whole
    /// idle running sequences are swapped out, latest started first. With no other
    /// sequence to swap, the calling sequence's own counted blocks (it is claimed by the
    /// caller), oldest first, except `keep` and blocks a running sequence also holds, go
    /// one tier down.
    pub(super) fn make_room(&self, for_seq: u64, keep: &[u64]) -> KvResult<bool> {
        // Sequences swapped out and own blocks moved by this call (each once: a block the
        // manager left in place must not make it try for ever).
        let mut tried: Vec<u64> = Vec::new();
        let mut tried_blocks: Vec<u64> = Vec::new();
        let mut reconciled = false;
        loop {
            let step = {
                let mut t = self.tables.lock();
                if t.resident_blocks < self.max_resident_blocks {
                    return Ok(true);
                }
                if !reconciled {
                    drop(t);
                    self.reconcile();
                    reconciled = true;
                    continue;
                }
                let idle = |id: &u64, s: &Sequence| {
                    *id != for_seq && !s.busy && !s.swapping && !tried.contains(id)
                };
                let held = held_by_others_in_use(&t.seqs, u64::MAX);
                let left_behind = t
                    .seqs
                    .iter()
                    .filter(|(id, s)| {
                        idle(id, s)
                            && s.swapped
                            && s.blocks.iter().any(|b| {
                                !held.contains(b) && t.blocks.get(b).is_some_and(|m| m.resident)
                            })
                    })
                    .max_by_key(|(_, s)| s.started)
                    .map(|(id, _)| *id);
                let victim = left_behind.or_else(|| {
                    t.seqs
                        .iter()
                        .filter(|(id, s)| idle(id, s) && !s.swapped)
                        .max_by_key(|(_, s)| s.started)
                        .map(|(id, _)| *id)
                });
                match victim {
                    Some(v) => {
                        if let Some(s) = t.seqs.get_mut(&v) {
                            s.swapping = true;
                        }
                        Room::Sequence(v)
                    }
                    None => {
                        let held = held_by_others_in_use(&t.seqs, for_seq);
                        let Tables { seqs, blocks, .. } = &mut *t;
                        let own = seqs.get(&for_seq).and_then(|s| {
                            s.blocks.iter().copied().find(|b| {
                                !keep.contains(b)
                                    && !tried_blocks.contains(b)
                                    && !held.contains(b)
                                    && blocks.get(b).is_some_and(|m| m.resident && !m.leaving)
                            })
                        });
                        let Some(b) = own else {
                            return Ok(false);
                        };
                        let m = blocks.get_mut(&b).expect("found above");
                        m.leaving = true;
                        Room::Own(b, m.handle)
                    }
                }
            };
            match step {
                Room::Sequence(victim) => {
                    tried.push(victim);
                    let r = self.swap_out_claimed(victim);
                    if let Some(s) = self.tables.lock().seqs.get_mut(&victim) {
                        s.swapping = false;
                    }
                    self.swapped_for_room.notify_all();
                    r?;
                }
                Room::Own(b, h) => {
                    tried_blocks.push(b);
                    self.move_down(for_seq, vec![(b, h)])?;
                }
            }
        }
    }
}
