//! Weights owned by the memory manager: every checkpoint tensor is registered in place as a
//! read-only extent on the disk tier (start-up copies nothing), and each use pins it on the
//! compute tier, which brings it up through the tiers and lets the manager's weights policy
//! (the access plan in model order) decide what stays. When the compute tier has no room for
//! a tensor at all (`--host-mem 0`, or a budget smaller than one tensor), the tensor streams
//! from its fastest copy, and nothing is kept: the outputs are the same whatever the tiering.
//!
//! Streamed tensors are read ahead in pieces of about 4 MiB, each into its own buffer of a
//! small staging area (a few buffers on huge pages, reused round after round), and the
//! decode kernel multiplies each piece's rows as the piece lands: the reads land in few MiB
//! of memory, which this project's test VM's disk serves faster than reads spread over a
//! tensor-sized area (docs/BENCHMARKS.md, "Streamed tensors piece by piece").

use crate::error::{Result, RunnerError};
use crate::kernels::{self, WeightType};
use crate::text::{EMBED_TOKENS, LM_HEAD};
use crate::weights::{
    WeightSource, check_expert, check_outputs, matvec_each_into, widen_into, widen_to_f32,
};
use candle_core::{Device, Tensor};
use std::collections::{HashMap, HashSet, VecDeque};
use std::ops::Range;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use vlmem::{
    ManagerError, MemoryManager, StagingArea, StagingStats, TensorHandle, TensorKind, Tier,
};
use vlmem_qwen3vl::checkpoint::{Checkpoint, TensorInfo};
use vlmem_qwen3vl::tensors::expected_tensors;
use vlmem_tier::{AlignedBuf, IO_ALIGN_BYTES};

/// Layers prefetched ahead of the one computing, unless told otherwise.
pub const DEFAULT_PREFETCH_LAYERS: usize = 2;

/// One read-ahead buffer: a piece of a streamed tensor ([`piece_ranges`]) at its file phase
/// ([`phase_range`]). A multiple of the huge page, so each buffer is two whole huge pages.
const STAGE_BUF_BYTES: usize = 4 << 20;

/// Buffers in the staging area: two per reader (one being read into, one read and waiting),
/// and the one the kernel is reading. Reads landing in a few buffers reused round after round
/// run at about the disk's probe speed on the test VM, and reads spread over a 64 MiB area
/// about 25% slower; 9 buffers kept the disk busier than 6 (0.96-0.97 of the decode time
/// against 0.92-0.95) and did better than 12 (docs/BENCHMARKS.md, "Streamed tensors piece by piece").
const STAGING_BUFFERS: usize = 2 * STREAM_READERS + 1;

/// A [`WeightSource`] over a [`MemoryManager`].
pub struct ManagedWeights {
    manager: MemoryManager,
    index: HashMap<String, (TensorHandle, TensorInfo)>,
    compute_tier: Tier,
    device: Device,
    prefetch: Arc<PrefetchShared>,
    prefetcher: Mutex<Option<Prefetcher>>,
    staged_bytes: AtomicU64,
    expert_bytes: AtomicU64,
    /// Weight bytes the decode kernels read and the nanoseconds they took (pin and staging
    /// excluded): the kernels' own read speed.
    kernel_bytes: AtomicU64,
    kernel_ns: AtomicU64,
}

/// The streaming plan of a [`ManagedWeights`] and its staging area's counters.
#[derive(Debug, Clone, Copy)]
pub struct StagingReport {
    /// The staging area's capacity (0 when every decoder weight fits the budget).
    pub capacity_bytes: u64,
    /// Decoder weight bytes the plan keeps on the compute tier.
    pub kept_bytes: u64,
    /// Decoder weight bytes the plan streams (read ahead into the area, or on demand).
    pub streamed_bytes: u64,
    /// How many tensors the plan streams.
    pub streamed_tensors: usize,
    /// How many pieces they are read in (each one read-ahead buffer).
    pub streamed_pieces: usize,
    /// The size of each read-ahead buffer (0: the area is too small, and streamed tensors
    /// are read on demand).
    pub buffer_bytes: usize,
    /// The area's counters.
    pub stats: StagingStats,
}

/// A streamed tensor's place in the read-ahead.
struct Streamed {
    /// Its unit (decoder layer, or the final unit).
    unit: usize,
    /// The index of its first piece among the unit's streamed pieces, in use order.
    first: usize,
    /// Its offset in its checkpoint file (pieces are read at their file phase, no copy).
    file_offset: u64,
    /// Its pieces ([`piece_ranges`]), relative to the tensor.
    pieces: Vec<Range<usize>>,
}

/// A key of the staging area: piece `piece` of streamed tensor `tensor`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct PieceKey {
    tensor: TensorHandle,
    piece: usize,
}

/// What the prefetch thread shares with the compute thread.
struct PrefetchShared {
    manager: MemoryManager,
    tier: Tier,
    /// Per decoder layer, then one unit for the final norm and lm_head, in use order: the
    /// handles (and sizes) a prefetch of that unit hints. Fused expert stacks are left out:
    /// decode reads only the routed experts' slices of them.
    units: Vec<Vec<(TensorHandle, u64)>>,
    /// Per unit, whether it has streamed tensors.
    streams: Vec<bool>,
    /// The compute tier's weight budget when registered: larger tensors are never hinted.
    budget_bytes: u64,

    /// The bounded staging area streamed tensors' pieces are read ahead into.
    area: Arc<StagingArea<PieceKey, AlignedBuf>>,
    /// The size of each of its buffers ([`stage_buf_bytes`]; 0: nothing is read ahead).
    buf_bytes: usize,
    /// Bytes read into `area`.
    area_read_bytes: AtomicU64,
    ahead: AtomicUsize,
    /// Where the compute thread is: its unit in the high 32 bits, and in the low 32 bits one
    /// more than the index (within the unit) of the last streamed piece it asked for (0:
    /// none yet in this unit).
    cursor: AtomicU64,
    /// The tensors the plan does not keep on the compute tier, and where their pieces are in
    /// the read-ahead's order: they are read ahead into `area` (or read on demand) and never
    /// enter the tier, so they never evict a kept tensor.
    positions: HashMap<TensorHandle, Streamed>,
    hints: AtomicU64,
    /// Reader threads the read-ahead pool starts with.
    readers: AtomicUsize,
}

impl PrefetchShared {
    fn on_tier(&self, h: TensorHandle) -> bool {
        self.manager
            .residency(h)
            .is_ok_and(|(tiers, _)| tiers.contains(&self.tier))
    }

    /// How many units unit `u` lies ahead of the compute thread (0: it is computing it), and
    /// the compute thread's position in its unit (see `cursor`).
    fn distance(&self, u: usize) -> (usize, usize) {
        let n = self.units.len();
        let c = self.cursor.load(Ordering::Acquire);
        let (cur, at) = ((c >> 32) as usize, (c & 0xffff_ffff) as usize);
        ((u + n - cur % n) % n, at)
    }

    /// Whether unit `u` is still ahead of the compute thread, within the lookahead.
    fn still_ahead(&self, u: usize) -> bool {
        let (dist, _) = self.distance(u);
        dist > 0 && dist <= self.ahead.load(Ordering::Relaxed)
    }

    /// How many units ahead of the compute thread streamed tensors are read ahead: the
    /// lookahead counts only units that stream, so a run of units kept whole (the final
    /// unit and the first layers, under the streaming plan) does not leave the disk idle
    /// while they compute; at least the lookahead itself.
    fn window(&self) -> usize {
        let n = self.units.len();
        let ahead = self.ahead.load(Ordering::Relaxed).min(n.saturating_sub(1));
        let cur = (self.cursor.load(Ordering::Acquire) >> 32) as usize;
        let (mut w, mut found) = (0, 0);
        while found < ahead && w + 1 < n {
            w += 1;
            if self.streams[(cur + w) % n] {
                found += 1;
            }
        }
        if found == 0 { ahead } else { w.max(ahead) }
    }

    /// Whether streamed piece `i` of unit `u` is still to be taken by the compute thread
    /// (the one it is asking for now included: it waits for a fill of it that is coming or
    /// in flight), within the lookahead ([`Self::window`]): worth reading ahead. (A fill
    /// begun after the compute thread asked for the piece is refused by the area itself.)
    fn wanted(&self, u: usize, i: usize) -> bool {
        match self.distance(u) {
            (0, at) => i + 1 >= at,
            (dist, _) => dist <= self.window(),
        }
    }

    /// Whether a staged buffer of piece `i` of unit `u` will not be taken any more: the
    /// compute thread has passed it (the one it is asking for now is not stale).
    fn stale(&self, u: usize, i: usize) -> bool {
        !self.wanted(u, i)
    }

    /// Claims a buffer in the staging area for piece `k` of streamed tensor `h` (index `i`
    /// of unit `u`), waiting while the area is full and the compute thread has not passed
    /// it, then queues its read on the reader pool, behind the pieces claimed before it, and
    /// returns: a reader reads it straight into the buffer at its file phase and publishes
    /// it.
    fn stage(self: &Arc<Self>, pool: &JobQueue, h: TensorHandle, s: &Streamed, k: usize) {
        let (u, i) = (s.unit, s.first + k);
        let piece = s.pieces[k].clone();
        if self.buf_bytes == 0 {
            return;
        }
        let key = PieceKey {
            tensor: h,
            piece: k,
        };
        let Some(buf) = self.area.begin_fill(
            key,
            self.buf_bytes,
            || self.wanted(u, i),
            |tag| self.stale((tag >> 32) as usize, (tag & 0xffff_ffff) as usize),
        ) else {
            return;
        };
        let tag = ((u as u64) << 32) | i as u64;
        let range = phase_range(
            buf.as_slice(),
            s.file_offset + piece.start as u64,
            piece.len(),
        );
        if range.end > buf.len() {
            // A piece larger than a buffer (not made by `piece_ranges`): read on demand.
            return self.area.finish_fill(key, tag, buf, range, false);
        }
        if k == 0 {
            self.hints.fetch_add(1, Ordering::Relaxed);
        }
        let mut fill = PendingFill::new(self.area.clone(), key, tag, buf, range);
        let shared = self.clone();
        pool.submit(Box::new(move || {
            // A piece the compute thread has passed is not worth reading any more. A failed
            // read publishes nothing: the compute thread reads the piece itself and reports
            // the error.
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
}

/// A claimed buffer on its way through the reader pool: [`PendingFill::finish`] publishes
/// its range (or gives the room back), and one dropped unfinished (a job a closed queue
/// drops unrun, or a read that panics) gives the room back, so every begun fill is handed
/// back to the area exactly once.
struct PendingFill<K: Eq + std::hash::Hash + Copy> {
    area: Arc<StagingArea<K, AlignedBuf>>,
    key: K,
    tag: u64,
    buf: Option<AlignedBuf>,
    range: Range<usize>,
}

impl<K: Eq + std::hash::Hash + Copy> PendingFill<K> {
    /// `range` must lie in `buf`.
    fn new(
        area: Arc<StagingArea<K, AlignedBuf>>,
        key: K,
        tag: u64,
        buf: AlignedBuf,
        range: Range<usize>,
    ) -> Self {
        debug_assert!(range.start <= range.end && range.end <= buf.len());
        PendingFill {
            area,
            key,
            tag,
            buf: Some(buf),
            range,
        }
    }

    /// The bytes to read into.
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
        if let Some(buf) = self.buf.take() {
            self.area
                .finish_fill(self.key, self.tag, buf, self.range.clone(), ok);
        }
    }
}

impl<K: Eq + std::hash::Hash + Copy> Drop for PendingFill<K> {
    fn drop(&mut self) {
        if let Some(buf) = self.buf.take() {
            self.area
                .finish_fill(self.key, self.tag, buf, self.range.clone(), false);
        }
    }
}

impl PrefetchShared {
    /// The prefetch thread (the read-ahead's scheduler): for each layer start (the latest
    /// one when several queued), walks the next units' tensors in use order, as far as the
    /// lookahead of streamed units ([`Self::window`]) reaches. A streamed one
    /// has each of its pieces staged ([`PrefetchShared::stage`]: a buffer claimed, the read
    /// queued on the reader pool, no wait for the read), so the pool reads across tensor
    /// boundaries as far ahead as the area has buffers. A kept one (within the next `ahead` units) is hinted to the compute
    /// tier one at a time, each after
    /// checking the compute thread has not reached its layer yet and that it is not on the
    /// tier already, waiting for it to land before the next: one hint in flight keeps a late
    /// hint from loading a tensor that was already used (and evicted), and prefetches from
    /// racing each other's evictions.
    fn run(self: &Arc<Self>, rx: &Receiver<usize>, pool: &JobQueue) {
        while let Ok(mut layer) = rx.recv() {
            while let Ok(l) = rx.try_recv() {
                layer = l;
            }
            let n = self.units.len();
            // Streamed tensors from the rest of the current unit on (the compute thread may
            // have caught up with the reads: it then waits for each instead of reading it a
            // second time), kept ones from the next unit on.
            'units: for step in 0..=self.window() {
                let u = (layer + step) % n;
                for &(h, bytes) in &self.units[u] {
                    // Out of the window (the compute thread moved past this unit: the walk
                    // starts again from its layer).
                    if self.distance(u).0 > self.window() {
                        break 'units;
                    }
                    if let Some(s) = self.positions.get(&h) {
                        for k in 0..s.pieces.len() {
                            if self.wanted(u, s.first + k) {
                                self.stage(pool, h, s, k);
                            }
                        }
                        continue;
                    }
                    if step == 0 || !self.still_ahead(u) {
                        continue;
                    }
                    if bytes > self.budget_bytes || self.on_tier(h) {
                        continue;
                    }
                    self.manager.prefetch(h, self.tier);
                    self.hints.fetch_add(1, Ordering::Relaxed);
                    let started = Instant::now();
                    while !self.on_tier(h)
                        && self.still_ahead(u)
                        && started.elapsed() < Duration::from_millis(500)
                    {
                        std::thread::sleep(Duration::from_micros(200));
                    }
                }
            }
        }
    }
}

/// The `len` bytes of `buf` (which has [`IO_ALIGN_BYTES`] to spare) whose address is
/// congruent to `file_offset` modulo [`IO_ALIGN_BYTES`]: the disk tier then reads the
/// tensor's aligned middle straight into them with O_DIRECT, with no copy.
fn phase_range(buf: &[u8], file_offset: u64, len: usize) -> std::ops::Range<usize> {
    let align = IO_ALIGN_BYTES;
    let want = (file_offset % align as u64) as usize;
    let have = buf.as_ptr() as usize % align;
    let start = (want + align - have) % align;
    start..start + len
}

/// The read-ahead's buffer size for a staging area of `area_bytes`: [`STAGE_BUF_BYTES`] (4
/// MiB: about the request size this kind of disk serves fastest, ../shared/research/peers.md:
/// `dd iflag=direct` at 4 MiB beat 1, 16 and 64 MiB; fio on the development VM: 4 MiB at depth 4 beat
/// 1 MiB at depth 8 and 16 MiB at depth 1), or in an area too small for [`STAGING_BUFFERS`]
/// of them (a budget of a few MiB) an even share of it, else of half of it; at least three
/// alignment units, so a piece of at least one fits at any file phase. 0 when the area has
/// no room for two such buffers: nothing is read ahead.
fn stage_buf_bytes(area_bytes: u64) -> usize {
    let align = IO_ALIGN_BYTES as u64;
    let fit = |n: u64| (area_bytes / n / align * align).min(STAGE_BUF_BYTES as u64);
    let share = match fit(STAGING_BUFFERS as u64) {
        b if b >= 3 * align => b,
        _ => fit(2),
    };
    if share >= 3 * align {
        share as usize
    } else {
        0
    }
}

/// Bytes per piece of a streamed tensor, at most, with read-ahead buffers of `buf_bytes`: a
/// piece at its file phase fits one buffer ([`piece_ranges`] cuts pieces up to one
/// alignment unit longer than this, at a phase of up to one unit). With no buffers (0), the
/// largest size the buffers ever have: pieces are then only the points where a read on
/// demand may start.
fn piece_bytes(buf_bytes: usize) -> usize {
    if buf_bytes == 0 {
        STAGE_BUF_BYTES - 2 * IO_ALIGN_BYTES
    } else {
        buf_bytes
            .saturating_sub(2 * IO_ALIGN_BYTES)
            .max(IO_ALIGN_BYTES)
    }
}

/// Reader threads of the read-ahead pool: reads in flight while pieces are queued (fio on
/// the development VM: 4 MiB reads at depth 1 1.09 GB/s, depth 2 1.66, depth 4 1.79; on the
/// same VM, `stream_sweep` example, 3 alternating rounds: the streamed decode read 1.16 GB/s
/// with 1 reader, 1.23 with 2, 1.32 with 4, on a disk that swung 0.87-1.5 GB/s).
pub const STREAM_READERS: usize = 4;

/// The pieces a streamed tensor of `len` bytes at `file_offset` is read in: about
/// `piece_max` bytes each, at most ([`piece_bytes`]; the tensor split evenly), every boundary between two pieces
/// on a multiple of [`IO_ALIGN_BYTES`] in the file. In a phase-aligned buffer
/// ([`phase_range`]) each piece's aligned middle is then read with O_DIRECT straight into
/// place, and only the tensor's own unaligned head and tail go through the disk tier's
/// bounce buffer (not every piece's). Ranges are relative to the tensor, in order, and
/// cover `0..len`.
fn piece_ranges(file_offset: u64, len: usize, piece_max: usize) -> Vec<Range<usize>> {
    let align = IO_ALIGN_BYTES;
    let n = len.div_ceil(piece_max.max(1)).max(1);
    let target = len.div_ceil(n);
    // Bytes from the tensor's start to the first aligned file offset.
    let head = (align - (file_offset % align as u64) as usize) % align;
    let mut out = Vec::with_capacity(n);
    let mut start = 0;
    for k in 1..n {
        // The first aligned file offset at or after the even split point.
        let cut = head + (k * target).saturating_sub(head).div_ceil(align) * align;
        if cut > start && cut < len {
            out.push(start..cut);
            start = cut;
        }
    }
    out.push(start..len);
    out
}

/// A job of the reader pool (one piece of a streamed tensor).
type Job = Box<dyn FnOnce() + Send>;

/// The reader pool's queue: jobs run in the order they were submitted, by [`STREAM_READERS`]
/// persistent threads, so with pieces queued in use order across tensor boundaries that
/// many reads stay in flight until the queue is empty (one tensor's tail no longer drains
/// the disk's queue before the next tensor starts).
///
/// Invariant: every submitted job is run exactly once, or dropped unrun once the queue is
/// closed (a piece dropped unread fails its fill, which gives the area its room back). The
/// lock is a leaf: jobs run, and are dropped, outside it.
struct JobQueue {
    state: Mutex<JobState>,
    more: Condvar,
}

struct JobState {
    jobs: VecDeque<Job>,
    closed: bool,
    /// Reader threads serving the queue (0: the submitter runs each job itself).
    readers: usize,
    /// Jobs the readers are running now, and since when that count holds.
    running: usize,
    since: Instant,
    /// The readers' activity so far (see [`ReaderActivity`]).
    activity: ReaderActivity,
}

impl JobState {
    /// Accounts the time since the last change of `running`, then sets it to `running`.
    fn set_running(&mut self, running: usize) {
        let now = Instant::now();
        let ns = now.duration_since(self.since).as_nanos() as u64;
        if self.running > 0 {
            self.activity.busy_ns += ns;
            self.activity.depth_ns += ns * self.running as u64;
        }
        self.running = running;
        self.since = now;
    }
}

/// How busy the read-ahead's reader threads have been since they started: the time at least
/// one read was in flight, and the integral of the number in flight over time (so
/// `depth_ns / busy_ns` is the mean queue depth while busy). Taken twice, the difference
/// tells how much of an interval the disk was kept busy, and how deep.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReaderActivity {
    /// Nanoseconds with at least one read in flight.
    pub busy_ns: u64,
    /// Reads in flight, integrated over time (read-nanoseconds).
    pub depth_ns: u64,
}

impl JobQueue {
    fn new() -> Self {
        JobQueue {
            state: Mutex::new(JobState {
                jobs: VecDeque::new(),
                closed: false,
                readers: 0,
                running: 0,
                since: Instant::now(),
                activity: ReaderActivity::default(),
            }),
            more: Condvar::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, JobState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `job` behind the others; runs it here when no reader thread serves the
    /// queue, drops it unrun when the queue is closed.
    fn submit(&self, job: Job) {
        let mut st = self.lock();
        if st.closed {
            drop(st);
            drop(job);
        } else if st.readers == 0 {
            drop(st);
            job();
        } else {
            st.jobs.push_back(job);
            drop(st);
            self.more.notify_one();
        }
    }

    /// A reader thread: runs jobs in order until the queue is closed.
    fn serve(&self) {
        loop {
            let mut st = self.lock();
            let job = loop {
                if st.closed {
                    return;
                }
                if let Some(job) = st.jobs.pop_front() {
                    break job;
                }
                st = self.more.wait(st).unwrap_or_else(|p| p.into_inner());
            };
            let running = st.running + 1;
            st.set_running(running);
            drop(st);
            // Counts the job as finished when it returns or unwinds.
            let _done = Finished(self);
            job();
        }
    }

    /// The readers' activity so far, the read in flight now counted up to now.
    fn activity(&self) -> ReaderActivity {
        let mut st = self.lock();
        let running = st.running;
        st.set_running(running);
        st.activity
    }

    /// Starts up to `threads` reader threads (fewer when the system refuses some).
    fn start(self: &Arc<Self>, threads: usize) -> Vec<JoinHandle<()>> {
        let handles: Vec<JoinHandle<()>> = (0..threads)
            .filter_map(|_| {
                let q = self.clone();
                std::thread::Builder::new()
                    .name("vlmem-read".into())
                    .spawn(move || q.serve())
                    .ok()
            })
            .collect();
        self.lock().readers = handles.len();
        handles
    }

    /// Closes the queue: jobs still queued are dropped unrun, readers stop after the job
    /// they are running.
    fn close(&self) {
        let mut st = self.lock();
        st.closed = true;
        let dropped: Vec<Job> = st.jobs.drain(..).collect();
        drop(st);
        self.more.notify_all();
        drop(dropped);
    }
}

/// Takes a finished job off the queue's count of running ones when dropped.
struct Finished<'a>(&'a JobQueue);

impl Drop for Finished<'_> {
    fn drop(&mut self) {
        let mut st = self.0.lock();
        let running = st.running.saturating_sub(1);
        st.set_running(running);
    }
}

/// The read-ahead threads: the scheduler (fed with layer starts) and the reader pool.
struct Prefetcher {
    layers: Sender<usize>,
    scheduler: JoinHandle<()>,
    queue: Arc<JobQueue>,
    readers: Vec<JoinHandle<()>>,
}

impl Prefetcher {
    /// Stops the scheduler (the area must be closed first: it may wait there for room),
    /// then the readers; pieces still queued are dropped, which fails their fills.
    fn stop(self) {
        drop(self.layers);
        let _ = self.scheduler.join();
        self.queue.close();
        for r in self.readers {
            let _ = r.join();
        }
    }
}

/// The streaming plan for a compute-tier weight budget: when the decoder's tensors do not all
/// fit, a staging area of [`STAGING_BUFFERS`] read-ahead buffers (at most a quarter of the
/// budget: below one buffer, every streamed tensor is read on demand) is set apart, and the
/// rest of the budget keeps first the `vectors` (the norms' weights: a few KiB each, which
/// streamed would each cost a read request and a whole read-ahead buffer), then the other
/// tensors in this order: the final unit (norm and lm_head: the largest tensor), then layers
/// from the first. Everything else is streamed: read ahead into the area, or on demand. The
/// plan does not depend on the prefetch depth, so runs with and without prefetch read the
/// same bytes. Returns the area's capacity and the streamed handles.
fn plan_streaming(
    units: &[Vec<(TensorHandle, u64)>],
    budget_bytes: u64,
    vectors: &HashSet<TensorHandle>,
) -> (u64, HashSet<TensorHandle>) {
    let total: u64 = units.iter().flatten().map(|&(_, b)| b).sum();
    if total <= budget_bytes {
        return (0, HashSet::new());
    }
    let layers = units.len().saturating_sub(1);
    let area = (STAGING_BUFFERS as u64 * STAGE_BUF_BYTES as u64).min(budget_bytes / 4);
    let mut room = budget_bytes - area;
    let mut streamed = HashSet::new();
    let order = || units.len().checked_sub(1).into_iter().chain(0..layers);
    for vectors_pass in [true, false] {
        for u in order() {
            for &(h, bytes) in &units[u] {
                if vectors.contains(&h) != vectors_pass {
                    continue;
                }
                if bytes <= room {
                    room -= bytes;
                } else {
                    streamed.insert(h);
                }
            }
        }
    }
    (area, streamed)
}

/// Use order of a decoder layer's tensors (attention, then the MLP).
fn use_order(name: &str) -> usize {
    const ORDER: [&str; 12] = [
        "input_layernorm",
        "q_proj",
        "k_proj",
        "v_proj",
        "q_norm",
        "k_norm",
        "o_proj",
        "post_attention_layernorm",
        "mlp.gate.",
        "gate_proj",
        "up_proj",
        "down_proj",
    ];
    ORDER
        .iter()
        .position(|k| name.contains(k))
        .unwrap_or(ORDER.len())
}

impl Drop for ManagedWeights {
    fn drop(&mut self) {
        let worker = self
            .prefetcher
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        // Close the area first: the scheduler may be waiting in it for room.
        self.prefetch.area.close();
        if let Some(worker) = worker {
            worker.stop();
        }
    }
}

impl std::fmt::Debug for ManagedWeights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ManagedWeights")
            .field("tensors", &self.index.len())
            .field("compute_tier", &self.compute_tier)
            .field("prefetch_layers", &self.prefetch_layers())
            .finish_non_exhaustive()
    }
}

/// Rows and columns of the 2-D table `name` (an embedding); a shape error otherwise.
fn table_dims(name: &str, info: &TensorInfo) -> Result<(usize, usize)> {
    match info.shape.as_slice() {
        [r, c] => Ok((usize_of(name, *r)?, usize_of(name, *c)?)),
        _ => Err(RunnerError::TensorShape {
            name: name.to_string(),
            expected: "a 2-D table".into(),
            found: info.shape.iter().map(|&d| d as usize).collect(),
        }),
    }
}

/// One input row through one expert's matrix `[a, b]`: `W x` when `transposed` (`W: [out,
/// in]`), `x W` otherwise (the released layout).
fn expert_kernel(
    bytes: &[u8],
    ty: WeightType,
    (a, b): (usize, usize),
    transposed: bool,
    x: &[f32],
    y: &mut [f32],
) -> Result<()> {
    if transposed {
        kernels::matvec_into(bytes, ty, a, b, x, y)
    } else {
        kernels::vecmat_into(bytes, ty, a, b, x, y)
    }
}

fn manager_error(name: &str, e: ManagerError) -> RunnerError {
    RunnerError::Weights(format!("{name}: {e}"))
}

fn weight_type(name: &str, info: &TensorInfo) -> Result<WeightType> {
    WeightType::from_dtype(info.dtype).ok_or_else(|| RunnerError::UnsupportedDtype {
        name: name.to_string(),
        dtype: info.dtype.safetensors_name().to_string(),
    })
}

/// A buffer for a tensor read on demand: page-aligned, and on huge pages when large (reads
/// into it reach the disk in few segments; see [`vlmem_tier::AlignedBuf`]).
fn staging_buf(name: &str, len: usize) -> Result<AlignedBuf> {
    AlignedBuf::new(len).map_err(|e| RunnerError::Weights(format!("{name}: {e}")))
}

fn usize_of(name: &str, v: u64) -> Result<usize> {
    usize::try_from(v).map_err(|_| {
        RunnerError::BadRequest(format!("tensor {name} is too large for this machine"))
    })
}

/// The decoder layer a tensor name belongs to (`model.language_model.layers.N.`).
fn text_layer(name: &str) -> Option<usize> {
    let rest = name.strip_prefix("model.language_model.layers.")?;
    rest.split('.').next()?.parse().ok()
}

impl ManagedWeights {
    /// Registers every weight of `checkpoint` with `manager` (in place, on the disk tier) and
    /// gives the manager the model's access order. Tensors are pinned on `compute_tier`
    /// (the host tier for CPU compute) and staged on `device`. Prefetch of the next
    /// [`DEFAULT_PREFETCH_LAYERS`] layers is on ([`ManagedWeights::set_prefetch_layers`]).
    pub fn register(
        manager: MemoryManager,
        checkpoint: &Checkpoint,
        compute_tier: Tier,
        device: &Device,
    ) -> Result<Self> {
        Self::register_except(
            manager,
            checkpoint,
            compute_tier,
            device,
            &std::collections::BTreeSet::new(),
        )
    }

    /// [`ManagedWeights::register`], leaving the tensors named in `elsewhere` out of the
    /// compute tier's plan: they are computed on another tier (the first decoder layers on
    /// the GPU, [`crate::gpu::GpuLayerPlan`]), so they are neither kept in RAM, nor streamed,
    /// nor prefetched here. They stay registered, and a call for one still works (it pins
    /// it like any tensor outside the plan).
    pub fn register_except(
        manager: MemoryManager,
        checkpoint: &Checkpoint,
        compute_tier: Tier,
        device: &Device,
        elsewhere: &std::collections::BTreeSet<String>,
    ) -> Result<Self> {
        let mut index = HashMap::with_capacity(checkpoint.tensors.len());
        for (i, t) in checkpoint.tensors.iter().enumerate() {
            let h = manager
                .register_extent(
                    &t.file,
                    t.file_offset_bytes,
                    t.bytes,
                    TensorKind::Weight,
                    i as u64,
                )
                .map_err(|e| manager_error(&t.name, e))?;
            index.insert(t.name.clone(), (h, t.clone()));
        }
        // Model order: vision tower, then the decoder layer by layer, then lm_head.
        let plan: Vec<TensorHandle> =
            expected_tensors(&checkpoint.config, vlmem_qwen3vl::tensors::Dtype::BF16)
                .iter()
                .filter_map(|spec| index.get(&spec.name).map(|(h, _)| *h))
                .collect();
        manager.set_access_plan(&plan);
        let layers = checkpoint.config.text.num_hidden_layers as usize;
        let mut units: Vec<Vec<(TensorHandle, u64)>> = vec![Vec::new(); layers + 1];
        let mut names: Vec<&String> = index.keys().collect();
        names.sort_by_key(|n| (use_order(n), n.to_string()));
        for name in names {
            let (h, info) = &index[name];
            match text_layer(name) {
                Some(l)
                    if l < layers
                        && !name.contains(".mlp.experts.")
                        && !elsewhere.contains(name) =>
                {
                    units[l].push((*h, info.bytes))
                }
                _ => {}
            }
        }
        let head = if checkpoint.config.text.tie_word_embeddings {
            EMBED_TOKENS
        } else {
            LM_HEAD
        };
        for name in ["model.language_model.norm.weight", head] {
            if let Some((h, info)) = index.get(name) {
                units[layers].push((*h, info.bytes));
            }
        }
        let budget_bytes = manager
            .stats()
            .budgets
            .get(compute_tier, TensorKind::Weight);
        let vectors: HashSet<TensorHandle> = index
            .values()
            .filter(|(_, info)| info.shape.len() == 1)
            .map(|(h, _)| *h)
            .collect();
        let (area_bytes, streamed) = plan_streaming(&units, budget_bytes, &vectors);
        let buf_bytes = stage_buf_bytes(area_bytes);
        let file_offsets: HashMap<TensorHandle, u64> = index
            .values()
            .map(|(h, info)| (*h, info.file_offset_bytes))
            .collect();
        let mut positions = HashMap::new();
        for (u, unit) in units.iter().enumerate() {
            let mut first = 0;
            for &(h, bytes) in unit.iter().filter(|(h, _)| streamed.contains(h)) {
                let file_offset = file_offsets.get(&h).copied().unwrap_or(0);
                let len = usize::try_from(bytes).map_err(|_| {
                    RunnerError::BadRequest(format!("tensor {h:?} is too large for this machine"))
                })?;
                let pieces = piece_ranges(file_offset, len, piece_bytes(buf_bytes));
                let n = pieces.len();
                positions.insert(
                    h,
                    Streamed {
                        unit: u,
                        first,
                        file_offset,
                        pieces,
                    },
                );
                first += n;
            }
        }
        let streams = units
            .iter()
            .map(|unit| unit.iter().any(|(h, _)| positions.contains_key(h)))
            .collect();
        let prefetch = Arc::new(PrefetchShared {
            manager: manager.clone(),
            tier: compute_tier,
            units,
            streams,
            budget_bytes,
            positions,
            area: Arc::new(StagingArea::new(area_bytes)),
            buf_bytes,
            area_read_bytes: AtomicU64::new(0),
            ahead: AtomicUsize::new(DEFAULT_PREFETCH_LAYERS),
            cursor: AtomicU64::new(0),
            hints: AtomicU64::new(0),
            readers: AtomicUsize::new(STREAM_READERS),
        });
        Ok(ManagedWeights {
            manager,
            index,
            compute_tier,
            device: device.clone(),
            prefetch,
            prefetcher: Mutex::new(None),
            staged_bytes: AtomicU64::new(0),
            expert_bytes: AtomicU64::new(0),
            kernel_bytes: AtomicU64::new(0),
            kernel_ns: AtomicU64::new(0),
        })
    }

    /// The manager's handle of weight `name`.
    pub fn handle(&self, name: &str) -> Option<TensorHandle> {
        self.index.get(name).map(|(h, _)| *h)
    }

    /// The manager (for stats).
    pub fn manager(&self) -> &MemoryManager {
        &self.manager
    }

    /// Reads in flight when streamed tensors are read ahead: the reader pool's threads
    /// (default [`STREAM_READERS`]; at least 1). Takes effect when the read-ahead starts (the
    /// first layer of the first step), so set it before generating.
    pub fn set_stream_readers(&self, readers: usize) {
        self.prefetch
            .readers
            .store(readers.max(1), Ordering::Relaxed);
    }

    /// Prefetch the weights of the next `layers` layers (the final norm and lm_head count as
    /// one, and the first layers follow them, as decode cycles) when a layer starts; 0 turns
    /// prefetch off. Streamed tensors are read ahead over the next `layers` layers that
    /// stream: layers kept whole in between do not count.
    pub fn set_prefetch_layers(&self, layers: usize) {
        self.prefetch.ahead.store(layers, Ordering::Relaxed);
    }

    /// How many layers ahead are prefetched (0: off).
    pub fn prefetch_layers(&self) -> usize {
        self.prefetch.ahead.load(Ordering::Relaxed)
    }

    /// Weight bytes read by the decode kernels and the seconds they took, since registration.
    pub fn kernel_read(&self) -> (u64, f64) {
        (
            self.kernel_bytes.load(Ordering::Relaxed),
            self.kernel_ns.load(Ordering::Relaxed) as f64 * 1e-9,
        )
    }

    /// Rows, columns and element type of the 2-D weight `name`; a shape error otherwise.
    fn matrix(&self, name: &str) -> Result<(usize, usize, WeightType)> {
        let (_, info) = self.entry(name)?;
        match info.shape.as_slice() {
            [r, c] => Ok((
                usize_of(name, *r)?,
                usize_of(name, *c)?,
                weight_type(name, info)?,
            )),
            _ => Err(RunnerError::TensorShape {
                name: name.to_string(),
                expected: "a 2-D matrix".into(),
                found: info.shape.iter().map(|&d| d as usize).collect(),
            }),
        }
    }

    /// Lends the stored bytes of every weight in `names` to `f` at once (each pinned, or
    /// staged), by nesting [`ManagedWeights::with_stored`]; the borrows end with the call.
    fn lend_all<R>(
        &self,
        names: &[&str],
        held: &[&[u8]],
        f: &mut dyn FnMut(&[&[u8]]) -> Result<R>,
    ) -> Result<R> {
        match names.split_first() {
            None => f(held),
            Some((name, rest)) => self.with_stored(name, |bytes| {
                let mut inner = held.to_vec();
                inner.push(bytes);
                self.lend_all(rest, &inner, f)
            }),
        }
    }

    /// Runs a kernel over `len_bytes` of weights, counting them and its time.
    fn timed<R>(&self, len_bytes: usize, f: impl FnOnce() -> Result<R>) -> Result<R> {
        let t = Instant::now();
        let r = f();
        let ns = u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.kernel_ns.fetch_add(ns, Ordering::Relaxed);
        self.kernel_bytes
            .fetch_add(len_bytes as u64, Ordering::Relaxed);
        r
    }

    /// Bytes read from a weight's fastest copy into a staging buffer without being kept on
    /// the compute tier (tensors that do not fit it, embedding rows, expert slices). With
    /// the manager's `bytes_in` of the compute tier, this is what was streamed.
    pub fn staged_bytes(&self) -> u64 {
        self.staged_bytes.load(Ordering::Relaxed)
            + self.prefetch.area_read_bytes.load(Ordering::Relaxed)
    }

    /// The streaming plan and the staging area's counters.
    pub fn staging(&self) -> StagingReport {
        let p = &self.prefetch;
        let (mut kept_bytes, mut streamed_bytes) = (0, 0);
        for &(h, bytes) in p.units.iter().flatten() {
            if p.positions.contains_key(&h) {
                streamed_bytes += bytes;
            } else {
                kept_bytes += bytes;
            }
        }
        StagingReport {
            capacity_bytes: p.area.capacity_bytes(),
            kept_bytes,
            streamed_bytes,
            streamed_tensors: p.positions.len(),
            streamed_pieces: p.positions.values().map(|s| s.pieces.len()).sum(),
            buffer_bytes: p.buf_bytes,
            stats: p.area.stats(),
        }
    }

    /// How busy the read-ahead's readers have been so far (zero before the first streamed
    /// layer, and when nothing streams).
    pub fn reader_activity(&self) -> ReaderActivity {
        self.prefetcher
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|w| w.queue.activity())
            .unwrap_or_default()
    }

    /// The weights the plan streams, in use order (layer by layer, each layer's tensors in
    /// the order the forward pass takes them): what a decode step reads from the disk.
    pub fn streamed_tensors(&self) -> Vec<&TensorInfo> {
        let p = &self.prefetch;
        let by_handle: HashMap<TensorHandle, &TensorInfo> =
            self.index.values().map(|(h, info)| (*h, info)).collect();
        p.units
            .iter()
            .flatten()
            .filter(|(h, _)| p.positions.contains_key(h))
            .filter_map(|(h, _)| by_handle.get(h).copied())
            .collect()
    }

    /// Bytes of fused expert tensors read (routed experts' slices only).
    pub fn expert_bytes(&self) -> u64 {
        self.expert_bytes.load(Ordering::Relaxed)
    }

    /// Prefetch hints given to the manager.
    pub fn prefetch_hints(&self) -> u64 {
        self.prefetch.hints.load(Ordering::Relaxed)
    }

    fn entry(&self, name: &str) -> Result<&(TensorHandle, TensorInfo)> {
        self.index
            .get(name)
            .ok_or_else(|| RunnerError::MissingTensor {
                name: name.to_string(),
            })
    }

    /// Lends the tensor's stored bytes to `f`: pinned on the compute tier when it fits
    /// there (no copy), else read from its fastest copy into a staging buffer the size of
    /// the tensor, which is dropped afterwards (a streamed tensor's pieces are gathered into
    /// it from the read-ahead, [`ManagedWeights::take_pieces`], and the rest read in place).
    fn with_stored<R>(&self, name: &str, f: impl FnOnce(&[u8]) -> Result<R>) -> Result<R> {
        let (h, info) = self.entry(name)?;
        if let Some(s) = self.prefetch.positions.get(h) {
            // One buffer for the whole tensor, phase-aligned with its file offset: pieces read
            // ahead are copied in, and from the first that was not, the rest is read straight
            // into place (O_DIRECT, no second copy).
            let len = usize_of(name, info.bytes)?;
            let mut whole = staging_buf(name, len + IO_ALIGN_BYTES)?;
            let range = phase_range(whole.as_slice(), s.file_offset, len);
            let bytes = &mut whole.as_mut_slice()[range];
            let rest = self.take_pieces(*h, s, |start, piece| {
                bytes[start..start + piece.len()].copy_from_slice(piece);
                Ok(())
            })?;
            if let Some(start) = rest {
                self.read_rest(name, *h, start, &mut bytes[start..])?;
            }
            return f(bytes);
        }
        match self.manager.pin(*h, self.compute_tier) {
            Ok(guard) => guard.with_bytes(f).map_err(|e| manager_error(name, e))?,
            Err(ManagerError::TooLarge { .. } | ManagerError::OutOfMemory { .. }) => {
                let mut staging = staging_buf(name, usize_of(name, info.bytes)?)?;
                self.manager
                    .read(*h, 0, staging.as_mut_slice())
                    .map_err(|e| manager_error(name, e))?;
                self.staged_bytes.fetch_add(info.bytes, Ordering::Relaxed);
                f(staging.as_slice())
            }
            Err(e) => Err(manager_error(name, e)),
        }
    }

    /// Hands a streamed tensor's bytes to `f` in order, as `(offset in the tensor, bytes)`:
    /// each piece from the staging area when read ahead (waiting for a read in flight, or one
    /// the read-ahead waits room for), and from the first piece that was not, the rest of
    /// the tensor read now in one request (what the disk serves fastest when nothing reads
    /// ahead). Nothing enters the compute tier.
    ///
    /// The cursor moves before each take, so stale buffers can go; a miss is recorded by the
    /// area, so no fill of that piece starts after it, and the cursor then moves past the
    /// tensor, so none of its later pieces is read ahead either. Forward only within a unit:
    /// a tensor used out of the planned order (read twice, or before one planned ahead of
    /// it) must not make the read-ahead fetch again what was already taken.
    fn stream_pieces(
        &self,
        name: &str,
        h: TensorHandle,
        s: &Streamed,
        mut f: impl FnMut(usize, &[u8]) -> Result<()>,
    ) -> Result<()> {
        let Some(start) = self.take_pieces(h, s, &mut f)? else {
            return Ok(());
        };
        let len = s.pieces.last().map_or(0, |p| p.end) - start;
        let mut buf = staging_buf(name, len + IO_ALIGN_BYTES)?;
        let range = phase_range(buf.as_slice(), s.file_offset + start as u64, len);
        let buf = &mut buf.as_mut_slice()[range];
        self.read_rest(name, h, start, buf)?;
        f(start, buf)
    }

    /// The read-ahead half of [`ManagedWeights::stream_pieces`]: hands `f` the pieces taken
    /// from the staging area, in order, up to the first that was not read ahead, and returns
    /// that piece's offset in the tensor (`None`: every piece was taken). The caller reads
    /// the rest with [`ManagedWeights::read_rest`].
    fn take_pieces(
        &self,
        h: TensorHandle,
        s: &Streamed,
        mut f: impl FnMut(usize, &[u8]) -> Result<()>,
    ) -> Result<Option<usize>> {
        let advance = |at: usize| {
            let c = self.prefetch.cursor.load(Ordering::Acquire);
            let next = ((s.unit as u64) << 32) | at as u64;
            if c >> 32 != s.unit as u64 || c < next {
                self.prefetch.cursor.store(next, Ordering::Release);
            }
        };
        for (k, piece) in s.pieces.iter().enumerate() {
            advance(s.first + k + 1);
            let key = PieceKey {
                tensor: h,
                piece: k,
            };
            if let Some(staged) = self.prefetch.area.take(key) {
                f(piece.start, &staged)?;
                continue;
            }
            // One past the last piece: its fill is stale (not wanted) from here on.
            advance(s.first + s.pieces.len() + 1);
            return Ok(Some(piece.start));
        }
        Ok(None)
    }

    /// Reads the streamed tensor's bytes from `start` to its end into `dst` (their length),
    /// in one request, counted as staged. `dst` should be phase-aligned with the bytes' file
    /// offset ([`phase_range`]) for the disk tier to read into it directly.
    fn read_rest(&self, name: &str, h: TensorHandle, start: usize, dst: &mut [u8]) -> Result<()> {
        self.manager
            .read(h, start as u64, dst)
            .map_err(|e| manager_error(name, e))?;
        self.staged_bytes
            .fetch_add(dst.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// `W x` for a streamed matrix, row block by row block as its pieces arrive: the rows
    /// wholly inside a piece are multiplied from its buffer, and a row cut by a piece
    /// boundary (pieces end on aligned file offsets, not on rows) is put together in a
    /// small buffer first.
    fn matvec_streamed(
        &self,
        name: &str,
        h: TensorHandle,
        s: &Streamed,
        (rows, cols, ty): (usize, usize, WeightType),
        x: &[f32],
        y: &mut [f32],
    ) -> Result<()> {
        let row_bytes = cols * ty.size_bytes();
        if row_bytes == 0 || x.len() != cols || y.len() != rows {
            // Empty rows, or a wrong input or output: the kernel reports it (or fills zeros).
            return self.with_stored(name, |bytes| {
                kernels::matvec_into(bytes, ty, rows, cols, x, y)
            });
        }
        let mut carry: Vec<u8> = Vec::with_capacity(row_bytes);
        self.stream_pieces(name, h, s, |start, mut bytes| {
            let mut at = start;
            if !carry.is_empty() {
                let take = (row_bytes - carry.len()).min(bytes.len());
                carry.extend_from_slice(&bytes[..take]);
                bytes = &bytes[take..];
                at += take;
                if carry.len() == row_bytes {
                    let row = at / row_bytes - 1;
                    kernels::matvec_into(&carry, ty, 1, cols, x, &mut y[row..row + 1])?;
                    carry.clear();
                }
            }
            if bytes.is_empty() {
                return Ok(());
            }
            // `at` is on a row boundary here: a carried row was completed, or the piece
            // starts one (the tensor's start, or the end of the rows before it).
            let first = at / row_bytes;
            let whole = bytes.len() / row_bytes;
            if first + whole > rows {
                return Err(RunnerError::TensorShape {
                    name: name.to_string(),
                    expected: format!("{rows} rows of {row_bytes} bytes"),
                    found: vec![first + whole, cols],
                });
            }
            if whole > 0 {
                let block = &bytes[..whole * row_bytes];
                let out = &mut y[first..first + whole];
                self.timed(block.len(), || {
                    kernels::matvec_into(block, ty, whole, cols, x, out)
                })?;
            }
            carry.extend_from_slice(&bytes[whole * row_bytes..]);
            Ok(())
        })?;
        if !carry.is_empty() {
            return Err(RunnerError::TensorShape {
                name: name.to_string(),
                expected: format!("{rows} rows of {row_bytes} bytes"),
                found: vec![rows, cols],
            });
        }
        Ok(())
    }

    /// Reads `len` bytes at `offset` of `name`: from its copy on the compute tier when it has
    /// one, else from its fastest copy into the buffer (counted as staged). Nothing moves.
    fn read_range(&self, name: &str, offset: u64, len: usize) -> Result<Vec<u8>> {
        let (h, _) = self.entry(name)?;
        let mut buf = vec![0u8; len];
        let on_compute_tier = self
            .manager
            .residency(*h)
            .is_ok_and(|(tiers, _)| tiers.contains(&self.compute_tier));
        if on_compute_tier && let Ok(guard) = self.manager.pin(*h, self.compute_tier) {
            guard
                .read(offset, &mut buf)
                .map_err(|e| manager_error(name, e))?;
            return Ok(buf);
        }
        self.manager
            .read(*h, offset, &mut buf)
            .map_err(|e| manager_error(name, e))?;
        self.staged_bytes.fetch_add(len as u64, Ordering::Relaxed);
        Ok(buf)
    }

    /// The stored bytes of matrix `expert` of the stack `name`, and its two dimensions.
    fn expert_slice(
        &self,
        name: &str,
        expert: usize,
    ) -> Result<(Vec<u8>, WeightType, usize, usize)> {
        let (_, info) = self.entry(name)?;
        let shape: Vec<usize> = info
            .shape
            .iter()
            .map(|&d| usize_of(name, d))
            .collect::<Result<_>>()?;
        check_expert(name, &shape, expert)?;
        let ty = weight_type(name, info)?;
        let (a, b) = (shape[1], shape[2]);
        let slice = a * b * ty.size_bytes();
        let bytes = self.read_range(name, (expert * slice) as u64, slice)?;
        self.expert_bytes.fetch_add(slice as u64, Ordering::Relaxed);
        Ok((bytes, ty, a, b))
    }
}

impl WeightSource for ManagedWeights {
    fn tensor_f32(&self, name: &str) -> Result<Tensor> {
        let (_, info) = self.entry(name)?;
        let values = self.with_stored(name, |bytes| widen_to_f32(name, info.dtype, bytes))?;
        let shape: Vec<usize> = info.shape.iter().map(|&d| d as usize).collect();
        Ok(Tensor::from_vec(values, shape, &self.device)?)
    }

    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.index
            .get(name)
            .map(|(_, t)| t.shape.iter().map(|&d| d as usize).collect())
    }

    /// Reads only the rows asked for, from the table's fastest copy.
    fn rows_f32(&self, name: &str, ids: &[u32]) -> Result<Tensor> {
        let (_, info) = self.entry(name)?;
        let (_, cols) = table_dims(name, info)?;
        let mut values = vec![0f32; ids.len() * cols];
        for (position, &id) in ids.iter().enumerate() {
            let out = &mut values[position * cols..(position + 1) * cols];
            self.row_into(name, id, out).map_err(|e| match e {
                RunnerError::TokenOutOfVocab { id, vocab_size, .. } => {
                    RunnerError::TokenOutOfVocab {
                        id,
                        position,
                        vocab_size,
                    }
                }
                other => other,
            })?;
        }
        Ok(Tensor::from_vec(values, (ids.len(), cols), &self.device)?)
    }

    /// The bf16 kernel on the stored bytes (pinned in place, or staged when they do not fit).
    fn matvec(&self, name: &str, x: &[f32]) -> Result<Vec<f32>> {
        let (rows, _, _) = self.matrix(name)?;
        let mut y = vec![0f32; rows];
        self.matvec_into(name, x, &mut y)?;
        Ok(y)
    }

    fn matvec_into(&self, name: &str, x: &[f32], y: &mut [f32]) -> Result<()> {
        let (rows, cols, ty) = self.matrix(name)?;
        let (h, _) = self.entry(name)?;
        if let Some(s) = self.prefetch.positions.get(h) {
            return self.matvec_streamed(name, *h, s, (rows, cols, ty), x, y);
        }
        self.with_stored(name, |bytes| {
            self.timed(bytes.len(), || {
                kernels::matvec_into(bytes, ty, rows, cols, x, y)
            })
        })
    }

    fn matvec_many(&self, names: &[&str], x: &[f32]) -> Result<Vec<Vec<f32>>> {
        let mut ys = names
            .iter()
            .map(|name| Ok(vec![0f32; self.matrix(name)?.0]))
            .collect::<Result<Vec<_>>>()?;
        let mut views: Vec<&mut [f32]> = ys.iter_mut().map(|y| y.as_mut_slice()).collect();
        self.matvec_many_into(names, x, &mut views)?;
        Ok(ys)
    }

    /// The kernels on the stored bytes of all the weights at once (each pinned, or staged),
    /// in one parallel pass; one at a time when they differ in input width or one of them is
    /// streamed.
    fn matvec_many_into(&self, names: &[&str], x: &[f32], ys: &mut [&mut [f32]]) -> Result<()> {
        check_outputs(names.len(), ys.len())?;
        let mats = names
            .iter()
            .map(|name| self.matrix(name))
            .collect::<Result<Vec<_>>>()?;
        let cols = mats.first().map_or(0, |m| m.1);
        // Streamed weights go one at a time: the read-ahead thread fills them in order while
        // each computes, and taking several back to back would outrun it (each would then be
        // read a second time on demand). They are disk-bound: a fused pass buys nothing there.
        let streamed = names.iter().any(|n| {
            self.index
                .get(*n)
                .is_some_and(|(h, _)| self.prefetch.positions.contains_key(h))
        });
        if streamed || names.len() > 3 || mats.iter().any(|m| m.1 != cols) {
            return matvec_each_into(self, names, x, ys);
        }
        let mut run = |bytes: &[&[u8]]| -> Result<()> {
            let refs: Vec<(&[u8], WeightType, usize)> = bytes
                .iter()
                .zip(&mats)
                .map(|(b, &(rows, _, ty))| (*b, ty, rows))
                .collect();
            let total: usize = bytes.iter().map(|b| b.len()).sum();
            self.timed(total, || kernels::matvec_many_into(&refs, cols, x, ys))
        };
        self.lend_all(names, &[], &mut run)
    }

    /// The kernel on the stored bytes for a few input rows (a short prefill).
    fn matmul(&self, name: &str, x: &[f32], n: usize) -> Result<Vec<f32>> {
        let (rows, cols, ty) = self.matrix(name)?;
        self.with_stored(name, |bytes| kernels::matmul(bytes, ty, rows, cols, x, n))
    }

    fn expert_f32(&self, name: &str, expert: usize) -> Result<Tensor> {
        let (_, info) = self.entry(name)?;
        let (bytes, _, a, b) = self.expert_slice(name, expert)?;
        let values = widen_to_f32(name, info.dtype, &bytes)?;
        Ok(Tensor::from_vec(values, (a, b), &self.device)?)
    }

    fn expert_matvec(
        &self,
        name: &str,
        expert: usize,
        transposed: bool,
        x: &[f32],
    ) -> Result<Vec<f32>> {
        let (bytes, ty, a, b) = self.expert_slice(name, expert)?;
        let mut y = vec![0f32; if transposed { a } else { b }];
        self.timed(bytes.len(), || {
            expert_kernel(&bytes, ty, (a, b), transposed, x, &mut y)
        })?;
        Ok(y)
    }

    fn expert_matvec_into(
        &self,
        name: &str,
        expert: usize,
        transposed: bool,
        x: &[f32],
        y: &mut [f32],
    ) -> Result<()> {
        let (bytes, ty, a, b) = self.expert_slice(name, expert)?;
        self.timed(bytes.len(), || {
            expert_kernel(&bytes, ty, (a, b), transposed, x, y)
        })
    }

    /// Widens the stored bytes (pinned in place, or staged) straight into `out`.
    fn values_into(&self, name: &str, out: &mut [f32]) -> Result<()> {
        let (_, info) = self.entry(name)?;
        self.with_stored(name, |bytes| widen_into(name, info.dtype, bytes, out))
    }

    /// Reads only that row, from the table's fastest copy.
    fn row_into(&self, name: &str, id: u32, out: &mut [f32]) -> Result<()> {
        let (_, info) = self.entry(name)?;
        let (rows, cols) = table_dims(name, info)?;
        if id as usize >= rows {
            return Err(RunnerError::TokenOutOfVocab {
                id,
                position: 0,
                vocab_size: rows,
            });
        }
        let row_bytes = cols * weight_type(name, info)?.size_bytes();
        let bytes = self.read_range(name, id as u64 * row_bytes as u64, row_bytes)?;
        widen_into(name, info.dtype, &bytes, out)
    }

    /// Tells the prefetch thread (started on first use) that `layer` starts, so it brings
    /// the next layers' weights to the compute tier while this one computes.
    fn begin_layer(&self, layer: usize, layers: usize) {
        let shared = &self.prefetch;
        shared.cursor.store((layer as u64) << 32, Ordering::Release);
        // A read-ahead waiting for room re-checks what is still wanted.
        shared.area.wake();
        if self.prefetch_layers() == 0 || layers + 1 != shared.units.len() {
            return;
        }
        let mut worker = self.prefetcher.lock().unwrap_or_else(|p| p.into_inner());
        if worker.is_none() {
            let (tx, rx) = channel();
            let queue = Arc::new(JobQueue::new());
            // Readers first: with none the scheduler reads each piece itself.
            let readers = queue.start(shared.readers.load(Ordering::Relaxed));
            let (s, q) = (shared.clone(), queue.clone());
            match std::thread::Builder::new()
                .name("vlmem-prefetch".into())
                .spawn(move || s.run(&rx, &q))
            {
                Ok(scheduler) => {
                    *worker = Some(Prefetcher {
                        layers: tx,
                        scheduler,
                        queue,
                        readers,
                    })
                }
                // No thread, no prefetch: demand loads still serve every weight.
                Err(_) => {
                    queue.close();
                    for r in readers {
                        let _ = r.join();
                    }
                    return;
                }
            }
        }
        if let Some(w) = worker.as_ref() {
            let _ = w.layers.send(layer);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pieces cover the tensor in order, just under 4 MiB each (each fits a read-ahead
    /// buffer at its file phase), and every boundary between two pieces is a 4 KiB aligned
    /// file offset.
    #[test]
    fn pieces_cover_the_tensor_on_aligned_file_offsets() {
        let mib = 1usize << 20;
        for (offset, len, pieces) in [
            (0u64, 4 * mib - 8192, 1),
            (0u64, 4 * mib, 2),
            (123, 4 * mib, 2),
            (8_000, 8 * mib, 3),
            (4096 * 7 + 5, 24 * mib, 7),
            (77, 24 * mib + 3, 7),
            (4095, 10, 1),
            (1, 0, 1),
        ] {
            let r = piece_ranges(offset, len, piece_bytes(STAGE_BUF_BYTES));
            assert_eq!(r.len(), pieces, "{offset} {len}: {r:?}");
            assert_eq!(r[0].start, 0);
            assert_eq!(r.last().unwrap().end, len);
            for w in r.windows(2) {
                assert_eq!(w[0].end, w[1].start);
                assert_eq!((offset + w[0].end as u64) % IO_ALIGN_BYTES as u64, 0);
            }
            // Each piece fits one read-ahead buffer at its file phase.
            for p in &r {
                let phase = (offset + p.start as u64) % IO_ALIGN_BYTES as u64;
                assert!(phase as usize + p.len() <= STAGE_BUF_BYTES, "{p:?}");
            }
        }
    }

    /// The plan keeps the norms' weights first: with room for all of them but not for the
    /// first unit's large tensors in full, every vector is kept and only matrices stream;
    /// the area is set apart first, and what is kept fits the budget.
    #[test]
    fn the_plan_keeps_vectors_first() {
        let m =
            MemoryManager::new(vlmem::ManagerConfig::with_capacities(0, 1 << 20, 1 << 20)).unwrap();
        let h = |bytes: u64| m.allocate(bytes, TensorKind::Weight, 0).unwrap();
        // Two layers (norm, matrix, norm, matrix) and the final unit (norm, lm_head).
        let units: Vec<Vec<(TensorHandle, u64)>> = vec![
            vec![(h(64), 64), (h(4000), 4000), (h(64), 64), (h(4000), 4000)],
            vec![(h(64), 64), (h(4000), 4000), (h(64), 64), (h(4000), 4000)],
            vec![(h(64), 64), (h(9000), 9000)],
        ];
        let vectors: HashSet<TensorHandle> = units
            .iter()
            .flatten()
            .filter(|&&(_, b)| b == 64)
            .map(|&(h, _)| h)
            .collect();
        // 12,000 bytes: a quarter (3,000) for the area, 9,000 to keep.
        let (area, streamed) = plan_streaming(&units, 12_000, &vectors);
        assert_eq!(area, 3_000);
        assert!(
            vectors.iter().all(|v| !streamed.contains(v)),
            "{streamed:?}"
        );
        let kept: u64 = units
            .iter()
            .flatten()
            .filter(|(h, _)| !streamed.contains(h))
            .map(|&(_, b)| b)
            .sum();
        // The vectors (320), then lm_head does not fit (9,000 > 8,680): two layer matrices.
        assert_eq!(kept, 5 * 64 + 2 * 4000);
        // Everything fits: nothing streams and no area is set apart.
        assert_eq!(
            plan_streaming(&units, 30_000, &vectors),
            (0, HashSet::new())
        );
    }

    /// The read-ahead's buffers: 4 MiB each in an area with room for the full set, an even
    /// share of a smaller area (or of half of it), never less than three alignment units, and
    /// none when two of those do not fit; a piece cut for a buffer fits it at any phase.
    #[test]
    fn buffers_shrink_with_the_area_and_pieces_fit_them() {
        let (mib, kib) = (1u64 << 20, 1u64 << 10);
        let full = STAGING_BUFFERS as u64 * STAGE_BUF_BYTES as u64;
        assert_eq!(stage_buf_bytes(full), STAGE_BUF_BYTES);
        assert_eq!(stage_buf_bytes(256 * mib), STAGE_BUF_BYTES);
        assert_eq!(stage_buf_bytes(STAGING_BUFFERS as u64 * mib), mib as usize);
        // 50 KiB: a ninth is under 12 KiB, half of it is 24 KiB.
        assert_eq!(stage_buf_bytes(50 * kib), 24 * kib as usize);
        assert_eq!(stage_buf_bytes(23 * kib), 0);
        assert_eq!(stage_buf_bytes(0), 0);
        for buf in [
            12 * kib as usize,
            24 * kib as usize,
            mib as usize,
            STAGE_BUF_BYTES,
        ] {
            for offset in [0u64, 1, 4095, 4097, 123_456] {
                for len in [1, 4096, 4097, 3 * buf, 10 * buf + 17] {
                    for p in piece_ranges(offset, len, piece_bytes(buf)) {
                        let phase = (offset + p.start as u64) % IO_ALIGN_BYTES as u64;
                        assert!(
                            phase as usize + p.len() <= buf,
                            "{buf} {offset} {len} {p:?}"
                        );
                    }
                }
            }
        }
    }

    /// The read-ahead's pieces of 2,000 tensors (1-3 pieces each, 6,000 or so in all), each
    /// claimed in order as its own buffer of an area of five, read by a four-thread pool in
    /// any order (random delays, one piece in 101 failing) and published by the reader,
    /// while a consumer takes the pieces in order (sometimes before they were begun: a miss
    /// it serves itself). Every taken buffer carries its piece's bytes, the area's ledger
    /// holds after every take, every begun fill is handed back exactly once, fills
    /// overlapped, takes waited for fills in flight, and nothing is held at the end.
    #[test]
    fn pool_area_and_pieces_stress_keeps_the_ledger() {
        const TENSORS: u64 = 2000;
        const BUF: usize = IO_ALIGN_BYTES;
        // Piece `g` (numbered across tensors) and its length.
        let pieces: Vec<usize> = (0..TENSORS)
            .flat_map(|t| (0..=(t % 3)).map(move |p| BUF - 8 - ((t + p) % 50) as usize))
            .collect();
        let total = pieces.len() as u64;
        let area = Arc::new(StagingArea::<u64, AlignedBuf>::new(5 * BUF as u64));
        let cursor = Arc::new(AtomicU64::new(0));
        let queue = Arc::new(JobQueue::new());
        let readers = queue.start(4);
        assert_eq!(readers.len(), 4);
        let handed_back = Arc::new(AtomicU64::new(0));
        let published = Arc::new(AtomicU64::new(0));
        let scheduler = {
            let (area, cursor, queue) = (area.clone(), cursor.clone(), queue.clone());
            let (handed_back, published) = (handed_back.clone(), published.clone());
            let pieces = pieces.clone();
            std::thread::spawn(move || {
                let mut begun = 0u64;
                for (g, &len) in pieces.iter().enumerate() {
                    let g = g as u64;
                    let Some(buf) = area.begin_fill(
                        g,
                        BUF,
                        || cursor.load(Ordering::Acquire) <= g,
                        |t| t < cursor.load(Ordering::Acquire),
                    ) else {
                        continue;
                    };
                    begun += 1;
                    let base = (g % 8) as usize;
                    let mut fill = PendingFill::new(area.clone(), g, g, buf, base..base + len);
                    let (hb, pb) = (handed_back.clone(), published.clone());
                    queue.submit(Box::new(move || {
                        let x = (g * 31) % 101;
                        if x.is_multiple_of(7) {
                            std::thread::sleep(Duration::from_micros(x * 3));
                        }
                        fill.bytes_mut().fill(g as u8);
                        hb.fetch_add(1, Ordering::Relaxed);
                        if x != 0 {
                            pb.fetch_add(1, Ordering::Relaxed);
                        }
                        fill.finish(x != 0);
                    }));
                }
                begun
            })
        };
        let mut hits = 0;
        for (g, &len) in pieces.iter().enumerate() {
            let g = g as u64;
            cursor.store(g, Ordering::Release);
            area.wake();
            if g.is_multiple_of(89) {
                std::thread::sleep(Duration::from_micros(500));
            }
            if let Some(s) = area.take(g) {
                assert_eq!(s.len(), len);
                assert!(
                    s.iter().all(|&v| v == g as u8),
                    "piece {g} saw foreign bytes"
                );
                hits += 1;
            }
            area.check().unwrap();
        }
        cursor.store(total, Ordering::Release);
        area.wake();
        let begun = scheduler.join().unwrap();
        queue.close();
        for r in readers {
            r.join().unwrap();
        }
        assert_eq!(handed_back.load(Ordering::Relaxed), begun);
        let s = area.stats();
        assert_eq!(s.filled, published.load(Ordering::Relaxed));
        assert_eq!(s.hits, hits);
        assert_eq!(s.hits + s.misses, total);
        assert!(s.max_filling >= 2, "fills overlapped: {s:?}");
        assert!(
            s.hits > 0 && s.waits > 0,
            "takes waited for fills in flight: {s:?}"
        );
        assert!(s.allocated <= 5, "buffers are reused: {s:?}");
        area.close();
        assert_eq!(area.held_bytes(), 0);
        area.check().unwrap();
    }

    /// A closed queue drops what is still queued (a fill dropped unread gives its room
    /// back), and with no reader thread the submitter runs each job.
    #[test]
    fn a_closed_queue_drops_jobs_and_no_readers_runs_them_inline() {
        let area = Arc::new(StagingArea::<u64, AlignedBuf>::new(
            2 * IO_ALIGN_BYTES as u64,
        ));
        let queue = Arc::new(JobQueue::new());
        let ran = Arc::new(AtomicU64::new(0));
        let r = ran.clone();
        queue.submit(Box::new(move || {
            r.fetch_add(1, Ordering::Relaxed);
        }));
        assert_eq!(ran.load(Ordering::Relaxed), 1, "no readers: run inline");
        // A reader that is busy: the second job is still queued when the queue closes.
        let (gate_tx, gate_rx) = channel::<()>();
        let readers = queue.start(1);
        queue.submit(Box::new(move || {
            let _ = gate_rx.recv();
        }));
        let buf = area.begin_fill(1, 16, || true, |_| false).unwrap();
        let fill = PendingFill::new(area.clone(), 1, 1, buf, 0..16);
        let r = ran.clone();
        queue.submit(Box::new(move || {
            r.fetch_add(1, Ordering::Relaxed);
            fill.finish(true);
        }));
        assert_eq!(area.filling(), 1);
        queue.close();
        drop(gate_tx);
        for h in readers {
            h.join().unwrap();
        }
        assert_eq!(ran.load(Ordering::Relaxed), 1, "the queued job never ran");
        assert_eq!((area.filling(), area.held_bytes()), (0, 0));
        assert!(area.take(1).is_none());
        area.check().unwrap();
    }

    /// The readers' activity counts time with reads in flight and how many: two readers, four
    /// jobs of ~20 ms each, so at least ~40 ms busy at depth 2; never more reads in flight
    /// than readers, and nothing counted once they are idle.
    #[test]
    fn reader_activity_counts_busy_time_and_depth() {
        let queue = Arc::new(JobQueue::new());
        assert_eq!(queue.activity(), ReaderActivity::default());
        let readers = queue.start(2);
        let done = Arc::new((Mutex::new(0usize), Condvar::new()));
        for _ in 0..4 {
            let d = done.clone();
            queue.submit(Box::new(move || {
                std::thread::sleep(Duration::from_millis(20));
                *d.0.lock().unwrap() += 1;
                d.1.notify_all();
            }));
        }
        let mut n = done.0.lock().unwrap();
        while *n < 4 {
            n = done.1.wait(n).unwrap();
        }
        drop(n);
        // The last job's end is counted when its reader takes the lock after it returns.
        while queue.lock().running > 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
        let a = queue.activity();
        let ms = 1_000_000;
        assert!(a.busy_ns >= 38 * ms, "{a:?}");
        assert!(a.depth_ns >= 78 * ms, "four jobs of 20 ms: {a:?}");
        assert!(a.depth_ns <= 2 * a.busy_ns, "at most two in flight: {a:?}");
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(queue.activity(), a, "idle readers add nothing");
        queue.close();
        for h in readers {
            h.join().unwrap();
        }
    }
}
