//! Weight read-ahead: the runner says what it will need, in order, and this facility reads
//! it ahead while the runner computes.
//!
//! The plan is a cycle of *units* (a decoder layer, the final norm and lm_head), each a list
//! of [`Need`]s in use order: a tensor's handle, its size and file offset, and whether the
//! plan *streams* it (it does not fit the compute tier's budget beside the kept set) or
//! *keeps* it there. A [`ReadAhead`] over that plan owns a scheduler thread and a pool of
//! reader threads ([`STREAM_READERS`] by default), started on the first
//! [`Cursor::begin_unit`] and stopped when the facility is dropped (or [`ReadAhead::stop`]):
//!
//! - a streamed tensor is cut into pieces ([`piece_ranges`], one buffer of the staging area
//!   each); the scheduler claims a buffer for each piece in use order, as far ahead as the
//!   lookahead reaches, and queues its read on the pool, which reads it at its file phase
//!   ([`phase_range`], O_DIRECT into place) and publishes it. The runner takes the pieces
//!   in order ([`Cursor::take_pieces`]) and reads what was not read ahead itself. Streamed
//!   tensors never enter the compute tier, so they never evict a kept one.
//! - a kept tensor of a unit ahead that is not on the compute tier is brought there, one at
//!   a time, each waited for ([`MemoryManager::prefetch_wait`], bounded by a deadline).
//!
//! The read-ahead position belongs to the request, not to the facility: each request holds
//! a [`Cursor`] ([`ReadAhead::cursor`]) and moves it as it computes. Requests run one at a
//! time, so the facility follows the cursor that moved last; a cursor that takes over from
//! another one makes the scheduler walk again from its place.
//!
//! Invariants:
//! - *Area*: the staging area never holds more than its capacity, and every fill begun is
//!   finished exactly once (published, or its room given back): a fill travels as a
//!   `PendingFill`, which gives the room back when it is dropped unfinished.
//! - *Queue*: every read submitted to the pool runs exactly once, or is dropped unrun once
//!   the pool is closed (which fails its fill).
//! - *Cursor*: only the pieces the cursor that moved last has not passed, within the
//!   lookahead, are wanted. A piece no longer wanted is not read (a reader checks before
//!   reading), a fill waiting for room for it gives up, and its ready buffer is stale (the
//!   next claim drops it). When the cursor that moved last is dropped, nothing is wanted:
//!   the ready buffers are dropped and every buffer comes back to the area, so a request
//!   that ends leaves no fill holding room. Taken pieces are always the bytes of the
//!   tensor's range they are keyed by, whichever cursor's read-ahead read them.
//!
//! Lock order: the scheduler's inbox and the pool's queue are leaves, the area's lock is a
//! leaf (its predicates read atomics only), and no lock is held across a read, a wait for a
//! kept tensor, or the runner's use of a piece.

mod pieces;
mod queue;

pub use pieces::{
    STAGE_BUF_BYTES, STAGING_BUFFERS, STREAM_READERS, phase_range, piece_bytes, piece_ranges,
    stage_buf_bytes,
};
pub use queue::ReaderActivity;

use crate::error::{ManagerError, Result};
use crate::manager::{MemoryManager, TensorHandle};
use crate::staging::{Staged, StagingArea, StagingStats};
use queue::JobQueue;
use std::collections::HashMap;
use std::ops::Range;
use std::time::{Duration, Instant};
use vlmem_core::Tier;
use vlmem_core::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use vlmem_core::sync::thread::{JoinHandle, spawn_named};
use vlmem_core::sync::{Arc, Condvar, Mutex, wait_guard};
use vlmem_tier::AlignedBuf;

/// How long the scheduler waits for one kept tensor to land on the compute tier before it
/// goes on with the next.
const KEPT_WAIT: Duration = Duration::from_millis(500);

/// Bits of a unit's index and of a position within a unit in the published position.
const FIELD_BITS: u32 = 24;
const FIELD_MASK: u64 = (1 << FIELD_BITS) - 1;
/// Cursor ids: 16 bits above the unit and the position, never 0 (0: no cursor).
const ID_SHIFT: u32 = 2 * FIELD_BITS;
const ID_MASK: u64 = 0xffff;

/// One tensor the runner will need, in its unit's use order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Need {
    /// The tensor.
    pub handle: TensorHandle,
    /// Its size.
    pub len_bytes: u64,
    /// Its offset in its checkpoint file (a streamed tensor's pieces are read at their file
    /// phase, so the disk tier reads them in place).
    pub file_offset_bytes: u64,
    /// Streamed (read ahead into the staging area, never entering the compute tier), or
    /// kept (brought to the compute tier ahead of its use).
    pub streamed: bool,
}

/// What a [`ReadAhead`] reads ahead.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    /// The units, in use order (the last is followed by the first: decode cycles), each its
    /// tensors in use order.
    pub units: Vec<Vec<Need>>,
    /// The staging area's capacity for streamed pieces (0: streamed tensors are read on
    /// demand).
    pub area_bytes: u64,
    /// The compute tier's budget for kept tensors: larger ones are never brought there.
    pub budget_bytes: u64,
}

/// A streamed tensor's place in the read-ahead.
#[derive(Debug, Clone)]
pub struct Streamed {
    unit: usize,
    /// The index of its first piece among its unit's streamed pieces, in use order.
    first: usize,
    file_offset_bytes: u64,
    pieces: Vec<Range<usize>>,
}

impl Streamed {
    /// Its unit.
    pub fn unit(&self) -> usize {
        self.unit
    }
    /// Its offset in its checkpoint file.
    pub fn file_offset_bytes(&self) -> u64 {
        self.file_offset_bytes
    }
    /// Its pieces ([`piece_ranges`]), relative to the tensor, in order.
    pub fn pieces(&self) -> &[Range<usize>] {
        &self.pieces
    }
    /// Its size.
    pub fn len_bytes(&self) -> usize {
        self.pieces.last().map_or(0, |p| p.end)
    }
}

/// A key of the staging area: piece `piece` of streamed tensor `tensor`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct PieceKey {
    tensor: TensorHandle,
    piece: usize,
}

/// Counters of a [`ReadAhead`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReadAheadStats {
    /// Fills of the staging area begun (a buffer claimed for a piece).
    pub fills_begun: u64,
    /// Fills finished: published, or their room given back (read failed, not wanted any
    /// more, or dropped unread). Equal to `fills_begun` once nothing is in flight.
    pub fills_finished: u64,
    /// Bytes read into the staging area.
    pub area_read_bytes: u64,
    /// Hints: kept tensors brought to the compute tier, and streamed tensors whose first
    /// piece was queued.
    pub hints: u64,
    /// Bytes the area holds now (ready, being filled, lent to the runner).
    pub held_bytes: u64,
    /// The area's counters.
    pub area: StagingStats,
}

/// The scheduler's inbox: the unit to walk from (the latest one given), and whether the
/// cursor moved last changed since the last walk.
#[derive(Debug, Default)]
struct Inbox {
    unit: Option<usize>,
    switched: bool,
    closed: bool,
}

/// What the facility's threads share with the cursors.
struct Shared {
    manager: MemoryManager,
    tier: Tier,
    units: Vec<Vec<Need>>,
    /// Per unit, whether it has streamed tensors.
    streams: Vec<bool>,
    budget_bytes: u64,
    positions: HashMap<TensorHandle, Streamed>,
    /// Any streamed tensor (the sweep's key is one of its pieces that does not exist).
    sweep_tensor: Option<TensorHandle>,
    area: StagingArea<PieceKey, AlignedBuf>,
    /// The size of each of the area's buffers ([`stage_buf_bytes`]; 0: nothing is read
    /// ahead).
    buf_bytes: usize,
    /// How many units ahead are read ahead (0: off).
    ahead: AtomicUsize,
    /// Reader threads the pool starts with.
    readers: AtomicUsize,
    /// The cursor that moved last and where it is: its id (bits 48-63), its unit (bits
    /// 24-47) and one more than the index, within the unit, of the last streamed piece it
    /// asked for (bits 0-23; 0: none yet in this unit). 0: no cursor.
    position: AtomicU64,
    next_cursor: AtomicU64,
    /// Set when the facility stops: nothing is wanted any more.
    stopping: AtomicBool,
    area_read_bytes: AtomicU64,
    hints: AtomicU64,
    fills_begun: AtomicU64,
    fills_finished: AtomicU64,
    inbox: Mutex<Inbox>,
    inbox_changed: Condvar,
}

impl Shared {
    /// The unit and position of the cursor that moved last (`None`: no cursor, or stopping).
    fn at(&self) -> Option<(usize, usize)> {
        let p = self.position.load(Ordering::Acquire);
        if p == 0 || self.stopping.load(Ordering::Acquire) {
            return None;
        }
        Some((
            ((p >> FIELD_BITS) & FIELD_MASK) as usize,
            (p & FIELD_MASK) as usize,
        ))
    }

    /// How many units unit `u` lies ahead of `cur` (0: it is computing it).
    fn distance(&self, u: usize, cur: usize) -> usize {
        let n = self.units.len().max(1);
        (u + n - cur % n) % n
    }

    /// How many units ahead of unit `cur` streamed tensors are read ahead: the lookahead
    /// counts only units that stream, so a run of units kept whole (the final unit and the
    /// first layers, under a streaming plan) does not leave the disk idle while they
    /// compute; at least the lookahead itself.
    fn window(&self, cur: usize) -> usize {
        let n = self.units.len();
        let ahead = self.ahead.load(Ordering::Relaxed).min(n.saturating_sub(1));
        let (mut w, mut found) = (0, 0);
        while found < ahead && w + 1 < n {
            w += 1;
            if self.streams[(cur + w) % n] {
                found += 1;
            }
        }
        if found == 0 { ahead } else { w.max(ahead) }
    }

    /// Whether unit `u` is still ahead of the cursor, within the lookahead.
    fn still_ahead(&self, u: usize) -> bool {
        self.at().is_some_and(|(cur, _)| {
            let dist = self.distance(u, cur);
            dist > 0 && dist <= self.ahead.load(Ordering::Relaxed)
        })
    }

    /// Whether unit `u` is within the window of the cursor that moved last (false when
    /// there is none).
    fn in_window(&self, u: usize) -> bool {
        self.at()
            .is_some_and(|(cur, _)| self.distance(u, cur) <= self.window(cur))
    }

    /// Whether streamed piece `i` of unit `u` is still to be taken by the cursor that moved
    /// last (the one it is asking for now included: it waits for a fill of it that is
    /// coming or in flight), within the lookahead ([`Self::window`]): worth reading ahead.
    fn wanted(&self, u: usize, i: usize) -> bool {
        let Some((cur, at)) = self.at() else {
            return false;
        };
        match self.distance(u, cur) {
            0 => i + 1 >= at,
            dist => dist <= self.window(cur),
        }
    }

    /// Whether a staged buffer tagged `tag` (unit in the high 32 bits, piece index in the
    /// low ones) will not be taken any more.
    fn stale(&self, tag: u64) -> bool {
        !self.wanted((tag >> 32) as usize, (tag & 0xffff_ffff) as usize)
    }

    fn on_tier(&self, h: TensorHandle) -> bool {
        self.manager
            .residency(h)
            .is_ok_and(|(tiers, _)| tiers.contains(&self.tier))
    }

    /// Tells the scheduler to walk from `unit` (`switched`: another cursor took over).
    fn tell(&self, unit: usize, switched: bool) {
        let mut inbox = self.inbox.lock();
        inbox.unit = Some(unit);
        inbox.switched |= switched;
        drop(inbox);
        self.inbox_changed.notify_one();
    }

    /// Gives back the room of every ready buffer no cursor will take (all of them when no
    /// cursor is left): one claim of a piece that does not exist, which drops stale buffers
    /// as every claim does, and whose buffer goes straight back. Waits for nothing: when
    /// the room stays held by fills in flight or lent buffers, it gives up after one
    /// wake-up (those come back by themselves).
    fn sweep(&self) {
        let Some(tensor) = self.sweep_tensor else {
            return;
        };
        if self.buf_bytes == 0 {
            return;
        }
        let key = PieceKey {
            tensor,
            piece: usize::MAX,
        };
        let first = std::cell::Cell::new(true);
        if let Some(buf) =
            self.area
                .begin_fill(key, 1, || first.replace(false), |tag| self.stale(tag))
        {
            self.area.finish_fill(key, 0, buf, 0..0, false);
        }
    }

    /// Claims a buffer in the staging area for piece `k` of streamed tensor `h`, waiting
    /// while the area is full and the cursor has not passed it, then queues its read on the
    /// reader pool behind the pieces claimed before it, and returns: a reader reads it
    /// straight into the buffer at its file phase and publishes it.
    fn stage(this: &Arc<Self>, pool: &JobQueue, h: TensorHandle, s: &Streamed, k: usize) {
        let (u, i) = (s.unit, s.first + k);
        let piece = s.pieces[k].clone();
        if this.buf_bytes == 0 {
            return;
        }
        let key = PieceKey {
            tensor: h,
            piece: k,
        };
        let Some(buf) = this.area.begin_fill(
            key,
            this.buf_bytes,
            || this.wanted(u, i),
            |tag| this.stale(tag),
        ) else {
            return;
        };
        this.fills_begun.fetch_add(1, Ordering::Relaxed);
        let tag = ((u as u64) << 32) | i as u64;
        let range = phase_range(
            buf.as_slice(),
            s.file_offset_bytes + piece.start as u64,
            piece.len(),
        );
        let mut fill = PendingFill::new(this.clone(), key, tag, buf, range);
        if fill.range.end > fill.buf.as_ref().map_or(0, |b| b.len()) {
            // A piece larger than a buffer (not made by `piece_ranges`): read on demand.
            return fill.finish(false);
        }
        if k == 0 {
            this.hints.fetch_add(1, Ordering::Relaxed);
        }
        let shared = this.clone();
        pool.submit(Box::new(move || {
            // A piece the cursor has passed is not worth reading any more. A failed read
            // publishes nothing: the runner reads the piece itself and reports the error.
            let ok = shared.wanted(u, i)
                && shared
                    .manager
                    .read(h, piece.start as u64, fill.bytes_mut())
                    .is_ok();
            if ok {
                shared
                    .area_read_bytes
                    .fetch_add(piece.len() as u64, Ordering::Relaxed);
            }
            fill.finish(ok);
        }));
    }

    /// The scheduler thread: for each unit given (the latest one when several came), walks
    /// the next units' tensors in use order, as far as the lookahead of streamed units
    /// ([`Self::window`]) reaches. A streamed one has each of its pieces staged
    /// ([`Self::stage`]: a buffer claimed, the read queued, no wait for the read), so the
    /// pool reads across tensor boundaries as far ahead as the area has buffers. A kept one
    /// (within the next `ahead` units) is brought to the compute tier one at a time, each
    /// after checking the cursor has not reached its unit yet and that it is not on the
    /// tier already, and waited for before the next: one bring at a time keeps a late one
    /// from loading a tensor that was already used (and evicted), and brings from racing
    /// each other's evictions.
    fn run(this: &Arc<Self>, pool: &JobQueue) {
        loop {
            let (unit, switched) = {
                let mut inbox = this.inbox.lock();
                loop {
                    if inbox.closed {
                        return;
                    }
                    if let Some(u) = inbox.unit.take() {
                        break (u, std::mem::take(&mut inbox.switched));
                    }
                    inbox = wait_guard(&this.inbox_changed, inbox);
                }
            };
            if switched {
                // The buffers read ahead for the cursor that moved before go first.
                this.sweep();
            }
            Self::walk(this, pool, unit);
        }
    }

    fn walk(this: &Arc<Self>, pool: &JobQueue, unit: usize) {
        let n = this.units.len();
        let Some((cur, _)) = this.at() else {
            return;
        };
        // Streamed tensors from the rest of the current unit on (the runner may have caught
        // up with the reads: it then waits for each instead of reading it a second time),
        // kept ones from the next unit on.
        for step in 0..=this.window(cur) {
            let u = (unit + step) % n;
            for need in &this.units[u] {
                // Out of the window (the cursor moved past this unit, or is gone: the walk
                // starts again from its unit when told).
                if !this.in_window(u) {
                    return;
                }
                let h = need.handle;
                if let Some(s) = this.positions.get(&h) {
                    for k in 0..s.pieces.len() {
                        if this.wanted(u, s.first + k) {
                            Self::stage(this, pool, h, s, k);
                        }
                    }
                    continue;
                }
                if step == 0 || !this.still_ahead(u) {
                    continue;
                }
                if need.len_bytes > this.budget_bytes || this.on_tier(h) {
                    continue;
                }
                this.hints.fetch_add(1, Ordering::Relaxed);
                this.manager
                    .prefetch_wait(h, this.tier, Instant::now() + KEPT_WAIT);
            }
        }
    }
}

/// A claimed buffer on its way through the reader pool: [`PendingFill::finish`] publishes
/// its range (or gives the room back), and one dropped unfinished (a job a closed queue
/// drops unrun, or a read that panics) gives the room back, so every begun fill is handed
/// back to the area exactly once.
struct PendingFill {
    shared: Arc<Shared>,
    key: PieceKey,
    tag: u64,
    buf: Option<AlignedBuf>,
    range: Range<usize>,
}

impl PendingFill {
    fn new(
        shared: Arc<Shared>,
        key: PieceKey,
        tag: u64,
        buf: AlignedBuf,
        range: Range<usize>,
    ) -> Self {
        PendingFill {
            shared,
            key,
            tag,
            buf: Some(buf),
            range,
        }
    }

    /// The bytes to read into (empty when the range does not lie in the buffer).
    fn bytes_mut(&mut self) -> &mut [u8] {
        match self.buf.as_mut() {
            Some(b) => b
                .as_mut_slice()
                .get_mut(self.range.clone())
                .unwrap_or_default(),
            None => &mut [],
        }
    }

    /// Publishes the bytes when `ok`, else gives the room back.
    fn finish(mut self, ok: bool) {
        self.hand_back(ok);
    }

    fn hand_back(&mut self, ok: bool) {
        let Some(buf) = self.buf.take() else {
            return;
        };
        let s = &self.shared;
        s.area
            .finish_fill(self.key, self.tag, buf, self.range.clone(), ok);
        s.fills_finished.fetch_add(1, Ordering::Release);
        if ok && s.at().is_none() {
            // Published after the last cursor went (and swept): nobody will take it.
            s.sweep();
        }
    }
}

impl Drop for PendingFill {
    fn drop(&mut self) {
        self.hand_back(false);
    }
}

/// The facility's threads.
struct Threads {
    scheduler: JoinHandle<()>,
    queue: Arc<JobQueue>,
    readers: Vec<JoinHandle<()>>,
}

enum Run {
    /// Not started yet.
    Idle,
    Running(Threads),
    /// Stopped for good (or no thread could be had).
    Stopped,
}

/// What the facility and its cursors hold.
struct Control {
    shared: Arc<Shared>,
    run: Mutex<Run>,
}

impl Control {
    /// Starts the threads unless started or stopped; `false` when they are not running.
    fn ensure_running(&self) -> bool {
        let mut run = self.run.lock();
        match &*run {
            Run::Running(_) => return true,
            Run::Stopped => return false,
            Run::Idle => {}
        }
        let queue = Arc::new(JobQueue::new());
        // Readers first: with none the scheduler reads each piece itself.
        let readers = JobQueue::start(&queue, self.shared.readers.load(Ordering::Relaxed));
        let (s, q) = (self.shared.clone(), queue.clone());
        match spawn_named("vlmem-prefetch", move || Shared::run(&s, &q)) {
            Ok(scheduler) => {
                *run = Run::Running(Threads {
                    scheduler,
                    queue,
                    readers,
                });
                true
            }
            // No thread, no read-ahead: reads on demand still serve every tensor.
            Err(_) => {
                *run = Run::Stopped;
                drop(run);
                queue.close();
                for r in readers {
                    let _ = r.join();
                }
                false
            }
        }
    }

    /// Stops the threads for good: nothing is wanted any more (a claim waiting for room
    /// gives up, a queued read is not made), the scheduler ends, then the pool closes
    /// (reads still queued are dropped, which fails their fills) and its readers end.
    fn stop(&self) {
        let threads = match std::mem::replace(&mut *self.run.lock(), Run::Stopped) {
            Run::Running(t) => Some(t),
            Run::Idle | Run::Stopped => None,
        };
        let s = &self.shared;
        s.stopping.store(true, Ordering::Release);
        s.inbox.lock().closed = true;
        s.inbox_changed.notify_all();
        // A claim waiting for room re-checks `wanted`.
        s.area.wake();
        if let Some(t) = threads {
            let _ = t.scheduler.join();
            t.queue.close();
            for r in t.readers {
                let _ = r.join();
            }
        }
        s.sweep();
    }
}

/// The read-ahead facility; see the module documentation.
pub struct ReadAhead {
    control: Arc<Control>,
}

impl std::fmt::Debug for ReadAhead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = &self.control.shared;
        f.debug_struct("ReadAhead")
            .field("units", &s.units.len())
            .field("streamed", &s.positions.len())
            .field("buffer_bytes", &s.buf_bytes)
            .field("ahead", &s.ahead.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl ReadAhead {
    /// A read-ahead of `plan` for `manager`, bringing kept tensors to `tier`. Reads ahead
    /// `ahead` units (0: off); threads start on the first [`Cursor::begin_unit`].
    /// [`ManagerError::InvalidConfig`] when the plan has more units than a position can
    /// name (2^24) or a tensor larger than this machine can address.
    pub fn new(manager: MemoryManager, tier: Tier, plan: Plan, ahead: usize) -> Result<Self> {
        let Plan {
            units,
            area_bytes,
            budget_bytes,
        } = plan;
        if units.len() as u64 > FIELD_MASK {
            return Err(ManagerError::InvalidConfig(format!(
                "a read-ahead plan of {} units (at most {FIELD_MASK})",
                units.len()
            )));
        }
        let buf_bytes = stage_buf_bytes(area_bytes);
        let mut positions = HashMap::new();
        for (u, unit) in units.iter().enumerate() {
            let mut first = 0;
            for need in unit.iter().filter(|n| n.streamed) {
                let len = usize::try_from(need.len_bytes).map_err(|_| {
                    ManagerError::InvalidConfig(format!(
                        "a streamed tensor of {} bytes is too large for this machine",
                        need.len_bytes
                    ))
                })?;
                let pieces = piece_ranges(need.file_offset_bytes, len, piece_bytes(buf_bytes));
                let n = pieces.len();
                positions.insert(
                    need.handle,
                    Streamed {
                        unit: u,
                        first,
                        file_offset_bytes: need.file_offset_bytes,
                        pieces,
                    },
                );
                first += n;
            }
        }
        let streams = units.iter().map(|u| u.iter().any(|n| n.streamed)).collect();
        let sweep_tensor = units
            .iter()
            .flatten()
            .find(|n| n.streamed)
            .map(|n| n.handle);
        let shared = Arc::new(Shared {
            manager,
            tier,
            units,
            streams,
            budget_bytes,
            positions,
            sweep_tensor,
            area: StagingArea::new(area_bytes),
            buf_bytes,
            ahead: AtomicUsize::new(ahead),
            readers: AtomicUsize::new(STREAM_READERS),
            position: AtomicU64::new(0),
            next_cursor: AtomicU64::new(0),
            stopping: AtomicBool::new(false),
            area_read_bytes: AtomicU64::new(0),
            hints: AtomicU64::new(0),
            fills_begun: AtomicU64::new(0),
            fills_finished: AtomicU64::new(0),
            inbox: Mutex::new(Inbox::default()),
            inbox_changed: Condvar::new(),
        });
        Ok(ReadAhead {
            control: Arc::new(Control {
                shared,
                run: Mutex::new(Run::Idle),
            }),
        })
    }

    /// A new request's position, before its first unit: it takes effect when it moves.
    pub fn cursor(&self) -> Cursor {
        let s = &self.control.shared;
        let id = s.next_cursor.fetch_add(1, Ordering::Relaxed) % ID_MASK + 1;
        Cursor {
            control: self.control.clone(),
            id,
            local: AtomicU64::new(0),
        }
    }

    /// Reads ahead the next `units` units (0: off). Streamed tensors are read ahead over
    /// the next `units` units that stream: units kept whole in between do not count.
    pub fn set_ahead(&self, units: usize) {
        self.control.shared.ahead.store(units, Ordering::Relaxed);
    }

    /// How many units ahead are read ahead (0: off).
    pub fn ahead(&self) -> usize {
        self.control.shared.ahead.load(Ordering::Relaxed)
    }

    /// Reader threads of the pool (at least 1); takes effect when the threads start.
    pub fn set_readers(&self, readers: usize) {
        self.control
            .shared
            .readers
            .store(readers.max(1), Ordering::Relaxed);
    }

    /// The plan's units.
    pub fn units(&self) -> &[Vec<Need>] {
        &self.control.shared.units
    }

    /// Where streamed tensor `h` is in the read-ahead (`None`: not streamed).
    pub fn streamed(&self, h: TensorHandle) -> Option<&Streamed> {
        self.control.shared.positions.get(&h)
    }

    /// How many tensors the plan streams.
    pub fn streamed_tensors(&self) -> usize {
        self.control.shared.positions.len()
    }

    /// How many pieces they are read in.
    pub fn streamed_pieces(&self) -> usize {
        self.control
            .shared
            .positions
            .values()
            .map(|s| s.pieces.len())
            .sum()
    }

    /// The staging area's capacity.
    pub fn capacity_bytes(&self) -> u64 {
        self.control.shared.area.capacity_bytes()
    }

    /// The size of each read-ahead buffer (0: nothing is read ahead).
    pub fn buffer_bytes(&self) -> usize {
        self.control.shared.buf_bytes
    }

    /// The counters.
    pub fn stats(&self) -> ReadAheadStats {
        let s = &self.control.shared;
        ReadAheadStats {
            fills_begun: s.fills_begun.load(Ordering::Relaxed),
            fills_finished: s.fills_finished.load(Ordering::Acquire),
            area_read_bytes: s.area_read_bytes.load(Ordering::Relaxed),
            hints: s.hints.load(Ordering::Relaxed),
            held_bytes: s.area.held_bytes(),
            area: s.area.stats(),
        }
    }

    /// Bytes read into the staging area so far.
    pub fn area_read_bytes(&self) -> u64 {
        self.control.shared.area_read_bytes.load(Ordering::Relaxed)
    }

    /// Hints given so far (see [`ReadAheadStats::hints`]).
    pub fn hints(&self) -> u64 {
        self.control.shared.hints.load(Ordering::Relaxed)
    }

    /// The staging area's counters.
    pub fn area_stats(&self) -> StagingStats {
        self.control.shared.area.stats()
    }

    /// How busy the readers have been so far (zero before they start).
    pub fn reader_activity(&self) -> ReaderActivity {
        match &*self.control.run.lock() {
            Run::Running(t) => t.queue.activity(),
            Run::Idle | Run::Stopped => ReaderActivity::default(),
        }
    }

    /// Stops the threads for good (they are not started again) and gives back every
    /// buffer not lent out; reads on demand still work. Dropping the facility does this.
    pub fn stop(&self) {
        self.control.stop();
    }
}

impl Drop for ReadAhead {
    fn drop(&mut self) {
        self.control.stop();
        // Buffers kept for reuse go too; buffers still lent come back and are freed.
        self.control.shared.area.close();
    }
}

/// A request's read-ahead position ([`ReadAhead::cursor`]): the request moves it as it
/// computes (a unit starts, a streamed tensor's pieces are taken), and the facility reads
/// ahead of the cursor that moved last. Dropping the cursor that moved last gives every
/// buffer read ahead for it back to the area.
pub struct Cursor {
    control: Arc<Control>,
    id: u64,
    /// This cursor's place: unit in the high 32 bits, position in the unit in the low ones.
    local: AtomicU64,
}

impl std::fmt::Debug for Cursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let l = self.local.load(Ordering::Relaxed);
        f.debug_struct("Cursor")
            .field("id", &self.id)
            .field("unit", &(l >> 32))
            .field("at", &(l & 0xffff_ffff))
            .finish()
    }
}

impl Cursor {
    /// Publishes this cursor's place `local` as the place to read ahead of; when another
    /// cursor moved last, this one takes over (the area's waiting claims re-check what is
    /// wanted, and the scheduler walks again from this cursor's unit).
    fn publish(&self, local: u64) {
        self.local.store(local, Ordering::Relaxed);
        let s = &self.control.shared;
        let unit = local >> 32;
        let at = (local & 0xffff_ffff).min(FIELD_MASK);
        let packed = (self.id << ID_SHIFT) | ((unit & FIELD_MASK) << FIELD_BITS) | at;
        let before = s.position.swap(packed, Ordering::AcqRel);
        if before >> ID_SHIFT != self.id {
            s.area.wake();
            if s.ahead.load(Ordering::Relaxed) > 0 && self.control.ensure_running() {
                s.tell(unit as usize, true);
            }
        }
    }

    /// Whether this is a cursor of `readahead`.
    pub fn of(&self, readahead: &ReadAhead) -> bool {
        Arc::ptr_eq(&self.control, &readahead.control)
    }

    /// Whether its read-ahead has stopped (dropped, or [`ReadAhead::stop`]): the cursor
    /// serves nothing any more.
    pub fn is_stopped(&self) -> bool {
        self.control.shared.stopping.load(Ordering::Acquire)
    }

    /// Unit `unit` starts: the read-ahead moves there, and the scheduler (started on the
    /// first call while read-ahead is on) reads ahead of it.
    pub fn begin_unit(&self, unit: usize) {
        let s = &self.control.shared;
        if s.units.is_empty() {
            return;
        }
        let unit = unit % s.units.len();
        let local = (unit as u64) << 32;
        self.local.store(local, Ordering::Relaxed);
        let packed = (self.id << ID_SHIFT) | ((unit as u64) << FIELD_BITS);
        let before = s.position.swap(packed, Ordering::AcqRel);
        // A claim waiting for room re-checks what is still wanted.
        s.area.wake();
        if s.ahead.load(Ordering::Relaxed) > 0 && self.control.ensure_running() {
            s.tell(unit, before >> ID_SHIFT != self.id);
        }
    }

    /// Moves to one more than piece index `at` of `unit` (the piece asked for now):
    /// forward only within a unit, so a tensor used out of the planned order (twice, or
    /// before one planned ahead of it) does not make the read-ahead fetch again what was
    /// already taken.
    fn advance(&self, unit: usize, at: usize) {
        let l = self.local.load(Ordering::Relaxed);
        let next = ((unit as u64) << 32) | at as u64;
        let moved = if l >> 32 != unit as u64 || l < next {
            next
        } else {
            l
        };
        let s = &self.control.shared;
        let mine = s.position.load(Ordering::Relaxed) >> ID_SHIFT == self.id;
        if moved != l || !mine {
            self.publish(moved);
        }
    }

    /// Hands streamed tensor `h`'s pieces taken from the staging area to `f` in order, as
    /// `(offset in the tensor, bytes)`, up to the first that was not read ahead (waiting
    /// for a read in flight, or one the read-ahead waits room for), and returns that piece's
    /// offset in the tensor (`None`: every piece was taken; also `Some(0)` for a tensor the
    /// plan does not stream). The caller reads the rest itself.
    ///
    /// The cursor moves before each take, so stale buffers can go; a miss is recorded by the
    /// area, so no fill of that piece starts after it, and the cursor then moves past the
    /// tensor, so none of its later pieces is read ahead either.
    pub fn take_pieces<E>(
        &self,
        h: TensorHandle,
        mut f: impl FnMut(usize, &[u8]) -> std::result::Result<(), E>,
    ) -> std::result::Result<Option<usize>, E> {
        let s = &self.control.shared;
        let Some(st) = s.positions.get(&h) else {
            return Ok(Some(0));
        };
        for (k, piece) in st.pieces.iter().enumerate() {
            self.advance(st.unit, st.first + k + 1);
            let key = PieceKey {
                tensor: h,
                piece: k,
            };
            let staged: Option<Staged<'_, PieceKey, AlignedBuf>> = s.area.take(key);
            if let Some(staged) = staged {
                f(piece.start, &staged)?;
                continue;
            }
            // One past the last piece: its fill is stale (not wanted) from here on.
            self.advance(st.unit, st.first + st.pieces.len() + 1);
            return Ok(Some(piece.start));
        }
        Ok(None)
    }
}

impl Drop for Cursor {
    /// The cursor that moved last leaves: nothing is wanted until another one moves, and
    /// what was read ahead for it is given back.
    fn drop(&mut self) {
        let s = &self.control.shared;
        let mut p = s.position.load(Ordering::Acquire);
        while p != 0 && p >> ID_SHIFT == self.id {
            match s
                .position
                .compare_exchange(p, 0, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => {
                    // Claims waiting for room give up; ready buffers go.
                    s.area.wake();
                    s.sweep();
                    return;
                }
                Err(now) => p = now,
            }
        }
    }
}

#[cfg(all(test, not(any(vlmem_loom, vlmem_shuttle))))]
mod tests;
