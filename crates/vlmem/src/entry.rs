//! One tensor's entry in the handle table and its state machine, kept apart from the
//! manager's I/O so loom can check it (see the `loom` tests below).
//!
//! Invariants (each transition keeps them; the manager changes entries only through these
//! methods or under the same shard lock):
//! 1. A live entry has at least one copy, and every copy holds the tensor's current bytes.
//! 2. A copy with `pins > 0` is never removed.
//! 3. While `busy` (a move or a write in flight, with the shard unlocked), no other thread
//!    changes the entry: pins, demotions and writes wait on the shard's condition variable.
//! 4. The last copy is never dropped: demoting it means writing it back one tier down first.
//! 5. Byte ranges in flight through pins: a range lent for writing in place (`lends`)
//!    overlaps no other lend and no read in flight (`reads`); while a lend waits for reads
//!    to finish (`lends_waiting`), new reads of its range wait, so a writer is not starved.
//!    Ranges that do not overlap proceed together. A lend needs a pin on the tensor's only
//!    copy, so a move never reads a copy under a lend: a miss waits while any lend runs. A
//!    read in flight without a pin (`MemoryManager::read`) keeps its copy as a pin does: no
//!    demotion or relocation takes it, and writes and frees of the tensor wait for it; while
//!    one waits (`writers_waiting`), new plain reads wait in turn, so writers are not starved.

use vlmem_core::{TensorKind, Tier};

/// One tier's copy of a tensor; `R` is the tier's reservation (generic for the models).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Copy<R> {
    pub res: R,
    pub pins: u32,
}

/// A tensor in the handle table.
#[derive(Debug)]
pub(crate) struct Entry<R> {
    pub id: u64,
    pub kind: TensorKind,
    pub len_bytes: u64,
    /// One copy per tier at most.
    pub copies: [Option<Copy<R>>; 3],
    /// A move or a write is in flight: others wait.
    pub busy: bool,
    /// Whether any bytes were ever written (an unwritten tensor moves without a copy).
    pub written: bool,
    /// A checkpoint extent: never written, its disk copy is the file.
    pub read_only: bool,
    pub last_use: u64,
    /// Byte ranges `[start, end)` lent for writing in place through pins.
    pub lends: Vec<(u64, u64)>,
    /// Byte ranges being read through pins.
    pub reads: Vec<(u64, u64)>,
    /// Byte ranges of lends waiting for reads to finish.
    pub lends_waiting: Vec<(u64, u64)>,
    /// Writes and frees (`MemoryManager::write`, `deallocate`) waiting for plain reads to
    /// finish: new plain reads wait for them, so a writer is not starved.
    pub writers_waiting: u32,
}

/// Whether `[start, end)` overlaps any range of `list`. An empty range overlaps nothing.
pub(crate) fn overlaps(list: &[(u64, u64)], start: u64, end: u64) -> bool {
    start < end && list.iter().any(|&(s, e)| s < e && s < end && start < e)
}

/// Removes one range equal to `span` from `list` (ranges may repeat: any one goes).
pub(crate) fn remove_span(list: &mut Vec<(u64, u64)>, span: (u64, u64)) {
    if let Some(i) = list.iter().position(|&x| x == span) {
        list.swap_remove(i);
    }
}

/// What a pin finds.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum PinStep<R> {
    /// Another thread moves or writes the entry: wait and look again.
    Wait,
    /// The copy is on the tier (and pinned, if asked).
    Hit(R),
    /// The entry is now busy; copy from `src`, then call [`Entry::finish_bring`].
    Miss { src: R },
}

/// What a demotion finds.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum DemoteStep<R> {
    /// Nothing to do: no copy there, pinned, busy, or the last copy on the slowest tier.
    Skip,
    /// The copy was removed (another copy holds the bytes): release `R`.
    Dropped(R),
    /// The entry is now busy; write `src` back one tier down, then call
    /// [`Entry::finish_demote`].
    WriteBack { src: R },
}

impl<R: std::marker::Copy> Entry<R> {
    pub fn new(id: u64, kind: TensorKind, len_bytes: u64, tier: Tier, res: R) -> Self {
        let mut copies = [None, None, None];
        copies[tier.index()] = Some(Copy { res, pins: 0 });
        Entry {
            id,
            kind,
            len_bytes,
            copies,
            busy: false,
            written: false,
            read_only: false,
            last_use: 0,
            lends: Vec::new(),
            reads: Vec::new(),
            lends_waiting: Vec::new(),
            writers_waiting: 0,
        }
    }

    /// Whether [`Entry::begin_bring`] would miss now (no copy on `tier`, nothing in the
    /// way): the caller can find room on the tier before claiming the entry.
    pub fn needs_bring(&self, tier: Tier) -> bool {
        self.copies[tier.index()].is_none()
            && !self.busy
            && self.lends.is_empty()
            && self.lends_waiting.is_empty()
            && self.fastest().is_some()
    }

    /// Whether a read of `[start, end)` must wait: a lend of an overlapping range runs or
    /// waits to run.
    pub fn read_must_wait(&self, start: u64, end: u64) -> bool {
        overlaps(&self.lends, start, end) || overlaps(&self.lends_waiting, start, end)
    }

    /// Whether a lend of `spans` must wait: a move or write of the entry is in flight, or
    /// another lend or a read of an overlapping range.
    pub fn lend_must_wait(&self, spans: &[(u64, u64)]) -> bool {
        self.busy
            || spans
                .iter()
                .any(|&(s, e)| overlaps(&self.lends, s, e) || overlaps(&self.reads, s, e))
    }

    /// Pins held on all copies.
    pub fn pins(&self) -> u32 {
        self.copies.iter().flatten().map(|c| c.pins).sum()
    }

    /// The fastest tier holding a copy.
    pub fn fastest(&self) -> Option<Tier> {
        Tier::ALL
            .into_iter()
            .find(|t| self.copies[t.index()].is_some())
    }

    /// A copy on a tier other than `tier`.
    pub fn has_other_copy(&self, tier: Tier) -> bool {
        Tier::ALL
            .into_iter()
            .any(|t| t != tier && self.copies[t.index()].is_some())
    }

    /// First half of bringing the tensor to `tier` (pinning it when `pin`). A miss waits
    /// while a lend writes the tensor in place (the copy would read half-written bytes, and
    /// the lend needs its copy to stay the only one).
    pub fn begin_bring(&mut self, tier: Tier, pin: bool) -> PinStep<R> {
        if self.busy {
            return PinStep::Wait;
        }
        if let Some(c) = self.copies[tier.index()].as_mut() {
            if pin {
                c.pins += 1;
            }
            return PinStep::Hit(c.res);
        }
        if !self.lends.is_empty() || !self.lends_waiting.is_empty() {
            return PinStep::Wait;
        }
        match self.fastest().and_then(|t| self.copies[t.index()]) {
            Some(src) => {
                self.busy = true;
                PinStep::Miss { src: src.res }
            }
            // Invariant 1 makes this unreachable; waiting would hang, so report a hit-less
            // wait and let the caller's invariant check fire.
            None => PinStep::Wait,
        }
    }

    /// Second half: installs the new copy (`Some`) or gives up (`None`); clears `busy`.
    pub fn finish_bring(&mut self, tier: Tier, dst: Option<R>, pin: bool) {
        self.busy = false;
        if let Some(res) = dst {
            self.copies[tier.index()] = Some(Copy {
                res,
                pins: u32::from(pin),
            });
        }
    }

    /// Drops one pin on `tier`.
    pub fn unpin(&mut self, tier: Tier) {
        if let Some(c) = self.copies[tier.index()].as_mut() {
            c.pins = c.pins.saturating_sub(1);
        }
    }

    /// First half of demoting the copy on `tier`. A copy that `keep` says must stay (a
    /// checkpoint extent: the file itself, which costs nothing to keep) is never dropped.
    pub fn begin_demote(&mut self, tier: Tier, keep: impl Fn(&R) -> bool) -> DemoteStep<R> {
        let Some(c) = self.copies[tier.index()] else {
            return DemoteStep::Skip;
        };
        if self.busy
            || c.pins > 0
            || keep(&c.res)
            || !self.lends.is_empty()
            || !self.reads.is_empty()
        {
            return DemoteStep::Skip;
        }
        if self.has_other_copy(tier) {
            self.copies[tier.index()] = None;
            return DemoteStep::Dropped(c.res);
        }
        if tier.below().is_none() {
            return DemoteStep::Skip;
        }
        self.busy = true;
        DemoteStep::WriteBack { src: c.res }
    }

    /// Whether [`Entry::begin_demote`] would ask for a write-back now (the copy on `tier` is
    /// the last one, idle and unpinned, and a tier lies below): the caller can find room
    /// below before claiming the entry.
    pub fn needs_write_back(&self, tier: Tier, keep: impl Fn(&R) -> bool) -> bool {
        let Some(c) = self.copies[tier.index()] else {
            return false;
        };
        !(self.busy
            || c.pins > 0
            || keep(&c.res)
            || !self.lends.is_empty()
            || !self.reads.is_empty()
            || self.has_other_copy(tier)
            || tier.below().is_none())
    }

    /// Second half: on success (`Some(dst)` on `below`) the copy on `tier` moves down and its
    /// old reservation is returned for release; on failure the entry is unchanged.
    pub fn finish_demote(&mut self, tier: Tier, below: Tier, dst: Option<R>) -> Option<R> {
        self.busy = false;
        let res = dst?;
        self.copies[below.index()] = Some(Copy { res, pins: 0 });
        self.copies[tier.index()].take().map(|c| c.res)
    }

    /// First half of relocating the copy on `tier` inside that tier (compaction): the copy
    /// must be unpinned, the entry idle, and the copy its own (not a checkpoint extent,
    /// which `movable` rules out). Marks the entry busy and returns the copy to move from.
    pub fn begin_relocate(&mut self, tier: Tier, movable: impl Fn(&R) -> bool) -> Option<R> {
        let c = self.copies[tier.index()]?;
        if self.busy || c.pins > 0 || !self.reads.is_empty() || !movable(&c.res) {
            return None;
        }
        self.busy = true;
        Some(c.res)
    }

    /// Second half: on success (`Some(dst)`) the copy on `tier` now lives in `dst` and the
    /// old reservation is returned for release; on failure the entry is unchanged.
    pub fn finish_relocate(&mut self, tier: Tier, dst: Option<R>) -> Option<R> {
        self.busy = false;
        let res = dst?;
        let c = self.copies[tier.index()].as_mut()?;
        Some(std::mem::replace(&mut c.res, res))
    }
}

#[cfg(all(test, vlmem_loom))]
mod loom_models {
    //! Loom models of the entry state machine under its shard lock, with the real
    //! transitions. Run: `RUSTFLAGS="--cfg vlmem_loom" cargo test -p vlmem --release loom`.

    use super::*;
    use vlmem_core::sync::atomic::{AtomicBool, AtomicU32, Ordering};
    use vlmem_core::sync::{Arc, Condvar, Mutex, thread, wait_guard};

    struct Shard {
        entry: Mutex<Entry<u32>>,
        cond: Condvar,
        /// Reservations released so far (bit per reservation id).
        freed: [AtomicBool; 6],
    }

    fn shard(entry: Entry<u32>) -> Arc<Shard> {
        Arc::new(Shard {
            entry: Mutex::new(entry),
            cond: Condvar::new(),
            freed: Default::default(),
        })
    }

    /// Pins on `tier` like `Inner::bring`, "copying" into reservation `dst_id`.
    fn pin(s: &Shard, tier: Tier, dst_id: u32) -> u32 {
        let mut e = s.entry.lock();
        loop {
            match e.begin_bring(tier, true) {
                PinStep::Wait => e = wait_guard(&s.cond, e),
                PinStep::Hit(res) => return res,
                PinStep::Miss { src } => {
                    drop(e);
                    assert!(
                        !s.freed[src as usize].load(Ordering::SeqCst),
                        "copying from a freed copy"
                    );
                    let mut e2 = s.entry.lock();
                    e2.finish_bring(tier, Some(dst_id), true);
                    s.cond.notify_all();
                    return dst_id;
                }
            }
        }
    }

    fn unpin(s: &Shard, tier: Tier) {
        let mut e = s.entry.lock();
        e.unpin(tier);
        s.cond.notify_all();
    }

    /// Demotes like `Inner::demote`, writing back into reservation `dst_id`.
    fn demote(s: &Shard, tier: Tier, dst_id: u32) {
        let mut e = s.entry.lock();
        match e.begin_demote(tier, |_| false) {
            DemoteStep::Skip => {}
            DemoteStep::Dropped(res) => {
                drop(e);
                s.freed[res as usize].store(true, Ordering::SeqCst);
            }
            DemoteStep::WriteBack { src } => {
                drop(e);
                assert!(!s.freed[src as usize].load(Ordering::SeqCst));
                let below = tier.below().unwrap_or(Tier::Disk);
                let old = {
                    let mut e = s.entry.lock();
                    let old = e.finish_demote(tier, below, Some(dst_id));
                    s.cond.notify_all();
                    old
                };
                if let Some(old) = old {
                    s.freed[old as usize].store(true, Ordering::SeqCst);
                }
            }
        }
    }

    fn check_invariants(e: &Entry<u32>, freed: &[AtomicBool; 6]) {
        assert!(!e.busy);
        assert!(e.fastest().is_some(), "the entry lost its last copy");
        for c in e.copies.iter().flatten() {
            assert!(
                !freed[c.res as usize].load(Ordering::SeqCst),
                "a live copy was freed"
            );
        }
    }

    #[test]
    fn loom_pin_versus_evict_never_frees_a_pinned_copy() {
        loom::model(|| {
            // Device copy 0 and host copy 1.
            let mut e = Entry::new(1, TensorKind::Weight, 64, Tier::Device, 0u32);
            e.copies[Tier::Host.index()] = Some(Copy { res: 1, pins: 0 });
            let s = shard(e);
            let s2 = s.clone();
            let pinner = thread::spawn(move || {
                let res = pin(&s2, Tier::Device, 2);
                // While pinned, the copy we read must not be freed.
                assert!(
                    !s2.freed[res as usize].load(Ordering::SeqCst),
                    "pinned copy freed"
                );
                unpin(&s2, Tier::Device);
            });
            demote(&s, Tier::Device, 3);
            pinner.join().unwrap();
            check_invariants(&s.entry.lock(), &s.freed);
        });
    }

    #[test]
    fn loom_miss_and_write_back_race_keep_one_valid_copy() {
        loom::model(|| {
            // Only a host copy: a device pin misses (busy) while the host copy is demoted
            // (write-back to disk, busy too).
            let e = Entry::new(1, TensorKind::KvCache, 64, Tier::Host, 0u32);
            let s = shard(e);
            let s2 = s.clone();
            let pinner = thread::spawn(move || {
                let res = pin(&s2, Tier::Device, 1);
                assert!(!s2.freed[res as usize].load(Ordering::SeqCst));
                unpin(&s2, Tier::Device);
            });
            demote(&s, Tier::Host, 2);
            pinner.join().unwrap();
            let e = s.entry.lock();
            check_invariants(&e, &s.freed);
            assert_eq!(e.pins(), 0);
        });
    }

    #[test]
    fn loom_two_pins_on_a_miss_install_one_copy() {
        loom::model(|| {
            let e = Entry::new(1, TensorKind::Weight, 64, Tier::Disk, 0u32);
            let s = shard(e);
            let s2 = s.clone();
            let t = thread::spawn(move || {
                let r = pin(&s2, Tier::Host, 1);
                unpin(&s2, Tier::Host);
                r
            });
            let mine = pin(&s, Tier::Host, 2);
            unpin(&s, Tier::Host);
            let theirs = t.join().unwrap();
            // Whoever missed first installed the copy; the other hit it.
            assert_eq!(mine, theirs);
            let e = s.entry.lock();
            assert_eq!(e.copies[Tier::Host.index()].map(|c| c.pins), Some(0));
            check_invariants(&e, &s.freed);
        });
    }

    /// Relocates the copy on `tier` into reservation `dst_id` like `Inner::relocate`.
    fn relocate(s: &Shard, tier: Tier, dst_id: u32) {
        let src = {
            let mut e = s.entry.lock();
            match e.begin_relocate(tier, |_| true) {
                Some(src) => src,
                None => return,
            }
        };
        assert!(!s.freed[src as usize].load(Ordering::SeqCst));
        let old = {
            let mut e = s.entry.lock();
            let old = e.finish_relocate(tier, Some(dst_id));
            s.cond.notify_all();
            old
        };
        if let Some(old) = old {
            s.freed[old as usize].store(true, Ordering::SeqCst);
        }
    }

    #[test]
    fn loom_pin_versus_compaction_never_reads_a_moved_away_copy() {
        loom::model(|| {
            // A host copy 0 is relocated to 1 while another thread pins it and a third
            // demotes it (write-back to disk copy 2).
            let e = Entry::new(1, TensorKind::Activation, 64, Tier::Host, 0u32);
            let s = shard(e);
            let s2 = s.clone();
            let pinner = thread::spawn(move || {
                let res = pin(&s2, Tier::Host, 3);
                assert!(
                    !s2.freed[res as usize].load(Ordering::SeqCst),
                    "pinned a relocated-away copy"
                );
                unpin(&s2, Tier::Host);
            });
            let s3 = s.clone();
            let evictor = thread::spawn(move || demote(&s3, Tier::Host, 2));
            relocate(&s, Tier::Host, 1);
            pinner.join().unwrap();
            evictor.join().unwrap();
            check_invariants(&s.entry.lock(), &s.freed);
        });
    }

    /// A lend of `span` like `Inner::lend`: registers as waiting, waits, then lends.
    fn lend(s: &Shard, span: (u64, u64), writing: &AtomicBool, readers: &AtomicU32) {
        let mut e = s.entry.lock();
        let mut waiting = false;
        while e.lend_must_wait(&[span]) {
            if !waiting {
                e.lends_waiting.push(span);
                waiting = true;
            }
            e = wait_guard(&s.cond, e);
        }
        if waiting {
            remove_span(&mut e.lends_waiting, span);
        }
        e.lends.push(span);
        drop(e);
        writing.store(true, Ordering::SeqCst);
        assert_eq!(
            readers.load(Ordering::SeqCst),
            0,
            "a lend overlapped a read"
        );
        writing.store(false, Ordering::SeqCst);
        let mut e = s.entry.lock();
        remove_span(&mut e.lends, span);
        s.cond.notify_all();
    }

    /// A read of `span` like `Inner::begin_read` and its claim's drop.
    fn read(s: &Shard, span: (u64, u64), writing: &AtomicBool, readers: &AtomicU32) {
        let mut e = s.entry.lock();
        while e.read_must_wait(span.0, span.1) {
            e = wait_guard(&s.cond, e);
        }
        e.reads.push(span);
        drop(e);
        readers.fetch_add(1, Ordering::SeqCst);
        assert!(!writing.load(Ordering::SeqCst), "a read overlapped a lend");
        readers.fetch_sub(1, Ordering::SeqCst);
        let mut e = s.entry.lock();
        remove_span(&mut e.reads, span);
        s.cond.notify_all();
    }

    #[test]
    fn loom_reads_and_lends_of_overlapping_ranges_exclude_each_other() {
        loom::model(|| {
            let s = shard(Entry::new(1, TensorKind::Activation, 64, Tier::Host, 0u32));
            let flags = Arc::new((AtomicBool::new(false), AtomicU32::new(0)));
            let (s2, f2) = (s.clone(), flags.clone());
            let lender = thread::spawn(move || lend(&s2, (0, 32), &f2.0, &f2.1));
            let (s3, f3) = (s.clone(), flags.clone());
            let reader = thread::spawn(move || read(&s3, (16, 48), &f3.0, &f3.1));
            // A range the lend does not cover never waits for it.
            {
                let mut e = s.entry.lock();
                assert!(!e.read_must_wait(32, 64));
                e.reads.push((32, 64));
                drop(e);
                let mut e = s.entry.lock();
                remove_span(&mut e.reads, (32, 64));
                s.cond.notify_all();
            }
            lender.join().unwrap();
            reader.join().unwrap();
            let e = s.entry.lock();
            assert!(e.lends.is_empty() && e.reads.is_empty() && e.lends_waiting.is_empty());
        });
    }
}
