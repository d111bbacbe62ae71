//! The transfer engine: asynchronous moves of tensors between tiers.
//!
//! `submit` queues a [`Move`] (or a batch of small ones) and returns a [`Ticket`] to wait on.
//! A pool of workers (the I/O queue depth, 4 by default) executes jobs chunk by chunk
//! (`chunk_bytes`, 4 MiB by default): a worker takes one chunk of the most urgent job
//! (demand before prefetch before write-back; round-robin among jobs of one priority) and
//! comes back for the next, so a huge write-back delays an urgent demand fetch by at most
//! one chunk per worker. Chunks of one job run in parallel on several workers: a worker that
//! takes a chunk of a job with chunks left wakes another idle worker, so one large move on an
//! idle engine keeps every worker busy.
//!
//! Anti-starvation: a prefetch or write-back not served for `max_starve` gets the next chunk
//! even while more urgent jobs wait, but such a starved pick is never followed by another:
//! the chunk handed out after it goes by strict priority. So starved jobs get at most every
//! other chunk, and a demand fetch at the head of its queue is handed a chunk within two
//! hand-outs of being queued, however many starved jobs wait (with one worker: after the
//! chunk running and at most one starved chunk).
//!
//! Queues are bounded (`max_queued_jobs`): `submit` blocks when they are full
//! (back-pressure), `try_submit` returns [`TierError::QueueFull`]. Memory is bounded too: each
//! worker owns one staging buffer of `chunk_bytes` (used only when neither tier can lend its
//! bytes) and one of `max_batch_bytes` for batches.
//!
//! A move never modifies its source. When it fails or is cancelled, the ticket says so with a
//! typed error, the destination holds no valid copy (the caller releases it), the source is
//! intact, and the engine goes on serving other jobs.
//!
//! Locks: the scheduler lock and each job's status lock are leaves, never held across a copy,
//! an I/O or a wait on another lock; the scheduler lock may be taken before a job's status
//! lock, never after.

use crate::align::AlignedBuf;
use crate::backend::{Reservation, TierBackend};
use crate::error::{Result, TierError};
use crate::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use crate::sync::thread::{self, JoinHandle};
use crate::sync::{Arc, Condvar, Mutex, wait_guard};
use std::collections::VecDeque;
use std::time::{Duration, Instant};
use vlmem_core::Tier;

/// How urgent a transfer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Priority {
    /// A tensor needed now (a pin that missed): served first.
    Demand,
    /// A tensor needed soon (the next layer's weights).
    Prefetch,
    /// A demotion to a slower tier: served last.
    WriteBack,
}

impl Priority {
    /// Every priority, most urgent first.
    pub const ALL: [Priority; 3] = [Priority::Demand, Priority::Prefetch, Priority::WriteBack];
    fn index(self) -> usize {
        match self {
            Priority::Demand => 0,
            Priority::Prefetch => 1,
            Priority::WriteBack => 2,
        }
    }
}

/// Copy a whole tensor from one reservation to another (of the same length).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Move {
    /// Where the bytes are.
    pub src: Reservation,
    /// Where they go.
    pub dst: Reservation,
}

/// Most worker threads an engine starts ([`EngineConfig::workers`]).
pub const MAX_WORKERS: usize = 256;

/// Largest chunk ([`EngineConfig::chunk_bytes`]): each worker may hold a staging buffer of
/// one chunk.
pub const MAX_CHUNK_BYTES: u64 = 1 << 30;

/// Engine settings. [`TransferEngine::new`] refuses values it cannot serve with
/// [`TierError::InvalidConfig`].
#[derive(Debug, Clone, Copy)]
pub struct EngineConfig {
    /// Worker threads, i.e. the I/O queue depth (1 to [`MAX_WORKERS`]; 4 by default).
    pub workers: usize,
    /// Bytes per chunk (1 to [`MAX_CHUNK_BYTES`], a multiple of every tier's I/O unit;
    /// 4 MiB by default).
    pub chunk_bytes: u64,
    /// Jobs that may wait in the queues before `submit` blocks (at least 1).
    pub max_queued_jobs: usize,
    /// Largest batch of small tensors (sum of their lengths); a larger batch is refused at
    /// submit.
    pub max_batch_bytes: u64,
    /// Anti-starvation: a lower-priority job that has not been served for this long gets
    /// the next chunk even while more urgent jobs wait (strict priority could otherwise
    /// starve write-backs for ever under a steady stream of demand fetches). Starved jobs
    /// get at most every other chunk handed out, so they delay a demand fetch by at most one
    /// chunk each time (see the module documentation).
    pub max_starve: Duration,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            workers: 4,
            chunk_bytes: 4 << 20,
            max_queued_jobs: 256,
            max_batch_bytes: 16 << 20,
            max_starve: Duration::from_millis(200),
        }
    }
}

/// What a finished transfer did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TransferReport {
    /// Bytes moved.
    pub bytes: u64,
    /// Chunks (or 1 for a batch).
    pub chunks: u64,
    /// Its priority.
    pub priority: Priority,
    /// Time from submit to the first chunk started.
    pub queued: Duration,
    /// Time from submit to the end.
    pub elapsed: Duration,
}

/// Counters of the engine (approximate while transfers run: each is exact on its own).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EngineStats {
    /// Jobs accepted.
    pub jobs_submitted: u64,
    /// Jobs finished successfully.
    pub jobs_succeeded: u64,
    /// Jobs finished with an error (cancellations excluded).
    pub jobs_failed: u64,
    /// Jobs cancelled.
    pub jobs_cancelled: u64,
    /// Bytes moved by successful chunks.
    pub bytes_moved: u64,
}

#[derive(Debug)]
enum Work {
    Single(Move),
    Batch(Vec<Move>),
}

#[derive(Debug, Default)]
struct Status {
    finished_chunks: u64,
    bytes_done: u64,
    started: Option<Instant>,
    /// The destination tier's [flush epoch](TierBackend::flush_epoch), taken before the
    /// job's first write.
    flush_epoch: Option<u64>,
    error: Option<TierError>,
    outcome: Option<Result<TransferReport>>,
}

#[derive(Debug)]
struct Job {
    priority: Priority,
    work: Work,
    len_bytes: u64,
    total_chunks: u64,
    /// The next chunk to hand out; changed only under the scheduler lock.
    next_chunk: AtomicU64,
    cancelled: AtomicBool,
    failed: AtomicBool,
    submitted: Instant,
    /// When a chunk of this job was last handed out, in nanoseconds since `submitted`
    /// (0: never); read and written under the scheduler lock.
    last_served_ns: AtomicU64,
    status: Mutex<Status>,
    done: Condvar,
}

impl Job {
    fn stopped(&self) -> bool {
        self.cancelled.load(Ordering::Acquire) || self.failed.load(Ordering::Acquire)
    }
}

#[derive(Debug, Default)]
struct Sched {
    queues: [VecDeque<Arc<Job>>; 3],
    queued_jobs: usize,
    shutdown: bool,
    /// The last chunk handed out went to a starved job: the next goes by strict priority.
    after_starved: bool,
}

#[derive(Debug, Default)]
struct Counters {
    submitted: AtomicU64,
    succeeded: AtomicU64,
    failed: AtomicU64,
    cancelled: AtomicU64,
    bytes: AtomicU64,
}

#[derive(Debug)]
struct Shared {
    tiers: [Option<std::sync::Arc<dyn TierBackend>>; 3],
    config: EngineConfig,
    sched: Mutex<Sched>,
    work_ready: Condvar,
    space_ready: Condvar,
    counters: Counters,
}

/// A submitted transfer. Wait on it, poll it, or cancel it. Dropping a ticket does not
/// cancel the transfer.
#[derive(Debug)]
#[must_use = "a ticket is how you learn whether the transfer succeeded"]
pub struct Ticket {
    job: Arc<Job>,
    shared: Arc<Shared>,
}

impl Ticket {
    /// Blocks until the transfer has finished; its report, or why it failed.
    pub fn wait(self) -> Result<TransferReport> {
        let mut st = self.job.status.lock();
        loop {
            if let Some(outcome) = st.outcome.take() {
                return outcome;
            }
            st = wait_guard(&self.job.done, st);
        }
    }

    /// Waits at most `timeout`: the outcome, or the ticket back if still running. (Not under
    /// the model checkers, whose condition variables have no timed wait.) A timeout too
    /// large to be a point in time waits like [`Ticket::wait`].
    #[cfg(not(any(vlmem_loom, vlmem_shuttle)))]
    pub fn wait_timeout(
        self,
        timeout: Duration,
    ) -> std::result::Result<Result<TransferReport>, Ticket> {
        let Some(deadline) = Instant::now().checked_add(timeout) else {
            return Ok(self.wait());
        };
        let outcome = {
            let mut st = self.job.status.lock();
            loop {
                if let Some(outcome) = st.outcome.take() {
                    break Some(outcome);
                }
                if self.job.done.wait_until(&mut st, deadline).timed_out() {
                    break st.outcome.take();
                }
            }
        };
        outcome.ok_or(self)
    }

    /// Bytes moved so far, and the transfer's total.
    pub fn progress_bytes(&self) -> (u64, u64) {
        (self.job.status.lock().bytes_done, self.job.len_bytes)
    }

    /// Whether the transfer has finished (successfully or not).
    pub fn is_finished(&self) -> bool {
        self.job.status.lock().outcome.is_some()
    }

    /// The transfer's priority.
    pub fn priority(&self) -> Priority {
        self.job.priority
    }

    /// Asks the transfer to stop. Chunks already running finish; no new one starts. The
    /// ticket then reports [`TierError::Cancelled`] (the destination holds no valid copy,
    /// the source is untouched), unless every chunk had already started: then the transfer
    /// ends exactly as if it had not been cancelled, flush included. So a cancelled transfer
    /// reports `Ok` only with every byte copied and, on a tier that
    /// [needs a flush](TierBackend::needs_flush) (a buffered disk), only after that flush
    /// succeeded; a failed flush reports its error. Never `Ok` without the durability an
    /// uncancelled transfer gives.
    pub fn cancel(&self) {
        self.job.cancelled.store(true, Ordering::Release);
        let skipped = {
            let mut sched = self.shared.sched.lock();
            let q = &mut sched.queues[self.job.priority.index()];
            match q.iter().position(|j| Arc::ptr_eq(j, &self.job)) {
                Some(pos) => {
                    q.remove(pos);
                    sched.queued_jobs -= 1;
                    let next = self
                        .job
                        .next_chunk
                        .swap(self.job.total_chunks, Ordering::AcqRel);
                    self.shared.space_ready.notify_one();
                    self.job.total_chunks - next
                }
                None => 0,
            }
        };
        if skipped > 0 {
            self.shared.finish_chunks(&self.job, skipped, Ok(0));
        }
    }
}

/// The transfer engine. See the module documentation. Dropping it lets queued jobs finish,
/// then stops the workers.
#[derive(Debug)]
pub struct TransferEngine {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
}

impl TransferEngine {
    /// An engine moving bytes between `tiers` (at most one backend per tier).
    pub fn new(tiers: &[std::sync::Arc<dyn TierBackend>], config: EngineConfig) -> Result<Self> {
        if config.workers == 0 || config.chunk_bytes == 0 || config.max_queued_jobs == 0 {
            return Err(TierError::InvalidConfig(format!(
                "workers ({}), chunk_bytes ({}) and max_queued_jobs ({}) must be at least 1",
                config.workers, config.chunk_bytes, config.max_queued_jobs
            )));
        }
        if config.workers > MAX_WORKERS {
            return Err(TierError::InvalidConfig(format!(
                "workers ({}) must be at most {MAX_WORKERS}",
                config.workers
            )));
        }
        if config.chunk_bytes > MAX_CHUNK_BYTES {
            return Err(TierError::InvalidConfig(format!(
                "chunk_bytes ({}) must be at most {MAX_CHUNK_BYTES}",
                config.chunk_bytes
            )));
        }
        let mut slots: [Option<std::sync::Arc<dyn TierBackend>>; 3] = [None, None, None];
        for t in tiers {
            let unit = t.io_unit_bytes().max(1);
            if !config.chunk_bytes.is_multiple_of(unit) {
                return Err(TierError::InvalidConfig(format!(
                    "chunk_bytes {} is not a multiple of the {:?} tier's I/O unit of {unit} bytes",
                    config.chunk_bytes,
                    t.tier()
                )));
            }
            let slot = &mut slots[t.tier().index()];
            if slot.is_some() {
                return Err(TierError::InvalidConfig(format!(
                    "two backends for the {:?} tier",
                    t.tier()
                )));
            }
            *slot = Some(t.clone());
        }
        let shared = Arc::new(Shared {
            tiers: slots,
            config,
            sched: Mutex::new(Sched::default()),
            work_ready: Condvar::new(),
            space_ready: Condvar::new(),
            counters: Counters::default(),
        });
        let workers = (0..config.workers)
            .map(|_| {
                let s = shared.clone();
                thread::spawn(move || s.worker_loop())
            })
            .collect();
        Ok(TransferEngine { shared, workers })
    }

    /// The backend of `tier`, if configured.
    pub fn tier(&self, tier: Tier) -> Option<&std::sync::Arc<dyn TierBackend>> {
        self.shared.tiers[tier.index()].as_ref()
    }

    /// The configuration.
    pub fn config(&self) -> EngineConfig {
        self.shared.config
    }

    /// Counters.
    pub fn stats(&self) -> EngineStats {
        let c = &self.shared.counters;
        EngineStats {
            jobs_submitted: c.submitted.load(Ordering::Relaxed),
            jobs_succeeded: c.succeeded.load(Ordering::Relaxed),
            jobs_failed: c.failed.load(Ordering::Relaxed),
            jobs_cancelled: c.cancelled.load(Ordering::Relaxed),
            bytes_moved: c.bytes.load(Ordering::Relaxed),
        }
    }

    /// Queues a move, blocking while the queues are full.
    pub fn submit(&self, mv: Move, priority: Priority) -> Result<Ticket> {
        let job = self.make_single(mv, priority)?;
        self.enqueue(job, true)
    }

    /// Queues a move, or returns [`TierError::QueueFull`] at once when the queues are full.
    pub fn try_submit(&self, mv: Move, priority: Priority) -> Result<Ticket> {
        let job = self.make_single(mv, priority)?;
        self.enqueue(job, false)
    }

    /// Queues a batch of small moves, all from one tier to one tier, executed as one job
    /// with coalesced I/O on disk (adjacent reservations become one read or write).
    pub fn submit_batch(&self, moves: Vec<Move>, priority: Priority) -> Result<Ticket> {
        let (Some(first), true) = (moves.first(), !moves.is_empty()) else {
            return Err(TierError::InvalidConfig("an empty batch".into()));
        };
        let (src_tier, dst_tier) = (first.src.tier(), first.dst.tier());
        let mut total = 0u64;
        for mv in &moves {
            self.check_move(mv)?;
            if mv.src.tier() != src_tier || mv.dst.tier() != dst_tier {
                return Err(TierError::InvalidConfig(
                    "a batch moves from one tier to one tier".into(),
                ));
            }
            total = total.saturating_add(mv.src.len_bytes());
        }
        if total > self.shared.config.max_batch_bytes {
            return Err(TierError::InvalidConfig(format!(
                "a batch of {total} bytes exceeds max_batch_bytes {}; split it or submit moves one by one",
                self.shared.config.max_batch_bytes
            )));
        }
        let job = Arc::new(Job::new(priority, Work::Batch(moves), total, 1));
        self.enqueue(job, true)
    }

    fn check_move(&self, mv: &Move) -> Result<()> {
        for t in [mv.src.tier(), mv.dst.tier()] {
            if self.shared.tiers[t.index()].is_none() {
                return Err(TierError::NoSuchTier(t));
            }
        }
        if mv.src.len_bytes() != mv.dst.len_bytes() {
            return Err(TierError::LengthMismatch {
                src_bytes: mv.src.len_bytes(),
                dst_bytes: mv.dst.len_bytes(),
            });
        }
        if mv.dst.is_in_place() {
            return Err(TierError::ReadOnly {
                tensor: format!("extent at file offset {}", mv.dst.offset_bytes()),
            });
        }
        Ok(())
    }

    fn make_single(&self, mv: Move, priority: Priority) -> Result<Arc<Job>> {
        self.check_move(&mv)?;
        let len = mv.src.len_bytes();
        let chunks = len.div_ceil(self.shared.config.chunk_bytes).max(1);
        Ok(Arc::new(Job::new(priority, Work::Single(mv), len, chunks)))
    }

    fn enqueue(&self, job: Arc<Job>, block: bool) -> Result<Ticket> {
        let mut sched = self.shared.sched.lock();
        loop {
            if sched.shutdown {
                return Err(TierError::ShutDown);
            }
            if sched.queued_jobs < self.shared.config.max_queued_jobs {
                break;
            }
            if !block {
                return Err(TierError::QueueFull {
                    queued_jobs: sched.queued_jobs,
                    max_queued_jobs: self.shared.config.max_queued_jobs,
                });
            }
            sched = wait_guard(&self.shared.space_ready, sched);
        }
        sched.queues[job.priority.index()].push_back(job.clone());
        sched.queued_jobs += 1;
        drop(sched);
        self.shared
            .counters
            .submitted
            .fetch_add(1, Ordering::Relaxed);
        self.shared.work_ready.notify_one();
        tracing::debug!(bytes = job.len_bytes, priority = ?job.priority, "transfer submitted");
        Ok(Ticket {
            job,
            shared: self.shared.clone(),
        })
    }
}

impl Drop for TransferEngine {
    fn drop(&mut self) {
        self.shared.sched.lock().shutdown = true;
        self.shared.work_ready.notify_all();
        self.shared.space_ready.notify_all();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

impl Job {
    fn new(priority: Priority, work: Work, len_bytes: u64, total_chunks: u64) -> Self {
        Job {
            priority,
            work,
            len_bytes,
            total_chunks,
            next_chunk: AtomicU64::new(0),
            cancelled: AtomicBool::new(false),
            failed: AtomicBool::new(false),
            submitted: Instant::now(),
            last_served_ns: AtomicU64::new(0),
            status: Mutex::new(Status::default()),
            done: Condvar::new(),
        }
    }
}

/// The typed error of a panic caught in a tier call.
fn panicked(payload: &(dyn std::any::Any + Send)) -> TierError {
    let detail = if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic with a non-text payload".to_string()
    };
    TierError::Panicked { detail }
}

struct Staging {
    chunk: Option<AlignedBuf>,
    batch: Option<AlignedBuf>,
}

fn staging_buf(slot: &mut Option<AlignedBuf>, len: usize) -> Result<&mut AlignedBuf> {
    let fits = slot.as_ref().is_some_and(|b| b.capacity_bytes() >= len);
    if !fits {
        *slot = Some(AlignedBuf::new(len)?);
    }
    match slot.as_mut() {
        Some(b) => {
            let _ = b.set_len(len);
            Ok(b)
        }
        None => Err(TierError::InvalidConfig("staging buffer".into())),
    }
}

impl Shared {
    fn backend(&self, tier: Tier) -> Result<&std::sync::Arc<dyn TierBackend>> {
        self.tiers[tier.index()]
            .as_ref()
            .ok_or(TierError::NoSuchTier(tier))
    }

    fn worker_loop(&self) {
        let mut staging = Staging {
            chunk: None,
            batch: None,
        };
        while let Some((job, idx)) = self.next_chunk() {
            let r = if job.stopped() {
                Ok(0)
            } else {
                // A panicking backend fails this chunk (so its job) with a typed error; the
                // worker goes on. The registry's accesses are guards, released by the unwind;
                // the staging buffers are dropped, as their state is unknown.
                match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    // Taken before this chunk writes, outside the status lock (a tier call):
                    // the first chunk to start records it, before any chunk of the job writes.
                    let epoch = self.dst_backend(&job).map(|d| d.flush_epoch());
                    {
                        let mut st = job.status.lock();
                        if st.started.is_none() {
                            st.started = Some(Instant::now());
                            st.flush_epoch = epoch;
                        }
                    }
                    self.run_chunk(&job, idx, &mut staging)
                })) {
                    Ok(r) => r,
                    Err(payload) => {
                        staging = Staging {
                            chunk: None,
                            batch: None,
                        };
                        Err(panicked(payload.as_ref()))
                    }
                }
            };
            self.finish_chunks(&job, 1, r);
        }
    }

    /// The backend of a job's destination.
    fn dst_backend(&self, job: &Job) -> Option<&std::sync::Arc<dyn TierBackend>> {
        let mv = match &job.work {
            Work::Single(mv) => Some(mv),
            Work::Batch(m) => m.first(),
        }?;
        self.backend(mv.dst.tier()).ok()
    }

    /// The next chunk to run, or `None` when shut down and drained.
    fn next_chunk(&self) -> Option<(Arc<Job>, u64)> {
        let mut sched = self.sched.lock();
        loop {
            let mut skipped: Vec<(Arc<Job>, u64)> = Vec::new();
            let mut picked = None;
            let mut more_chunks = false;
            // A starved lower-priority queue goes first (the one waiting longest), unless the
            // previous chunk went to a starved job; otherwise strict priority.
            let now = Instant::now();
            let starved = if sched.after_starved {
                None
            } else {
                [Priority::WriteBack, Priority::Prefetch]
                    .into_iter()
                    .filter_map(|p| {
                        let j = sched.queues[p.index()].front()?;
                        let served = j.submitted
                            + Duration::from_nanos(j.last_served_ns.load(Ordering::Relaxed));
                        let waited = now.saturating_duration_since(served);
                        (waited > self.config.max_starve).then_some((p, waited))
                    })
                    .max_by_key(|&(_, waited)| waited)
                    .map(|(p, _)| p)
            };
            let order = match starved {
                Some(p) => [p, Priority::Demand, Priority::Prefetch, Priority::WriteBack],
                None => [
                    Priority::Demand,
                    Priority::Prefetch,
                    Priority::WriteBack,
                    Priority::WriteBack,
                ],
            };
            'outer: for p in order {
                let q = p.index();
                while let Some(job) = sched.queues[q].pop_front() {
                    if job.stopped() {
                        let next = job.next_chunk.swap(job.total_chunks, Ordering::AcqRel);
                        sched.queued_jobs -= 1;
                        self.space_ready.notify_one();
                        skipped.push((job.clone(), job.total_chunks - next));
                        continue;
                    }
                    let idx = job.next_chunk.fetch_add(1, Ordering::AcqRel);
                    let served_ns = now.saturating_duration_since(job.submitted).as_nanos();
                    job.last_served_ns.store(
                        u64::try_from(served_ns).unwrap_or(u64::MAX).max(1),
                        Ordering::Relaxed,
                    );
                    if idx + 1 < job.total_chunks {
                        sched.queues[q].push_back(job.clone());
                        more_chunks = true;
                    } else {
                        sched.queued_jobs -= 1;
                        self.space_ready.notify_one();
                    }
                    sched.after_starved = starved == Some(p);
                    picked = Some((job, idx));
                    break 'outer;
                }
            }
            if more_chunks {
                // The rest of the job is back in its queue: another idle worker takes the
                // next chunk now, in parallel with this one.
                self.work_ready.notify_one();
            }
            if !skipped.is_empty() {
                drop(sched);
                for (job, n) in skipped {
                    if n > 0 {
                        self.finish_chunks(&job, n, Ok(0));
                    }
                }
                if picked.is_some() {
                    return picked;
                }
                sched = self.sched.lock();
                continue;
            }
            if picked.is_some() {
                return picked;
            }
            if sched.shutdown {
                return None;
            }
            sched = wait_guard(&self.work_ready, sched);
        }
    }

    fn run_chunk(&self, job: &Job, idx: u64, staging: &mut Staging) -> Result<u64> {
        match &job.work {
            Work::Single(mv) => {
                let off = idx * self.config.chunk_bytes;
                let len = self
                    .config
                    .chunk_bytes
                    .min(job.len_bytes.saturating_sub(off));
                self.copy(mv, off, len, staging)?;
                Ok(len)
            }
            Work::Batch(moves) => {
                self.copy_batch(moves, job.len_bytes, staging)?;
                Ok(job.len_bytes)
            }
        }
    }

    fn copy(&self, mv: &Move, off: u64, len: u64, staging: &mut Staging) -> Result<()> {
        let src = self.backend(mv.src.tier())?;
        let dst = self.backend(mv.dst.tier())?;
        if let Some(r) = src.read_with(&mv.src, off, len, &mut |s| dst.write(&mv.dst, off, s)) {
            return r;
        }
        if let Some(r) = dst.write_with(&mv.dst, off, len, &mut |d| src.read(&mv.src, off, d)) {
            return r;
        }
        let buf = staging_buf(&mut staging.chunk, len as usize)?;
        src.read(&mv.src, off, buf.as_mut_slice())?;
        dst.write(&mv.dst, off, buf.as_slice())
    }

    fn copy_batch(&self, moves: &[Move], total: u64, staging: &mut Staging) -> Result<()> {
        let Some(first) = moves.first() else {
            return Ok(());
        };
        let src = self.backend(first.src.tier())?;
        let dst = self.backend(first.dst.tier())?;
        let srcs: Vec<Reservation> = moves.iter().map(|m| m.src).collect();
        let dsts: Vec<Reservation> = moves.iter().map(|m| m.dst).collect();
        // Two writes of one destination: refused on every tier, whatever it does itself.
        crate::backend::refuse_repeats(first.dst.tier(), dsts.iter())?;
        // No staging when a side can lend its bytes: one copy less per tensor.
        if let Some(r) = dst.write_many_with(&dsts, &mut |outs| {
            let mut items: Vec<(Reservation, &mut [u8])> = srcs
                .iter()
                .copied()
                .zip(outs.iter_mut().map(|o| &mut **o))
                .collect();
            src.read_batch(&mut items)
        }) {
            return r;
        }
        if let Some(r) = src.read_many_with(&srcs, &mut |ins| {
            let items: Vec<(Reservation, &[u8])> =
                dsts.iter().copied().zip(ins.iter().copied()).collect();
            dst.write_batch(&items)
        }) {
            return r;
        }
        let buf = staging_buf(&mut staging.batch, total as usize)?;
        let mut rest = buf.as_mut_slice();
        let mut reads: Vec<(Reservation, &mut [u8])> = Vec::with_capacity(moves.len());
        for mv in moves {
            let (head, tail) = rest.split_at_mut(mv.src.len_bytes() as usize);
            reads.push((mv.src, head));
            rest = tail;
        }
        src.read_batch(&mut reads)?;
        let writes: Vec<(Reservation, &[u8])> = reads
            .iter()
            .zip(moves)
            .map(|((_, data), mv)| (mv.dst, &**data))
            .collect();
        dst.write_batch(&writes)
    }

    /// Records `n` finished chunks of `job` (run, or skipped after a failure or a
    /// cancellation); the last one completes the ticket.
    fn finish_chunks(&self, job: &Job, n: u64, r: Result<u64>) {
        let (last, copied_all) = {
            let mut st = job.status.lock();
            st.finished_chunks += n;
            match r {
                Ok(bytes) => st.bytes_done += bytes,
                Err(e) => {
                    job.failed.store(true, Ordering::Release);
                    if st.error.is_none() {
                        st.error = Some(e);
                    }
                }
            }
            (
                st.finished_chunks == job.total_chunks,
                st.error.is_none() && st.bytes_done >= job.len_bytes,
            )
        };
        if !last {
            return;
        }
        // Flush outside every lock: a deferred write error fails this job (fsyncgate). Every
        // job whose bytes were all copied is flushed, cancelled or not: it reports `Ok` only
        // once they are durable. One stopped early reports its error or `Cancelled`.
        // The flush succeeds only if no flush that may have held the job's writes failed since
        // its first write (another job's failed flush invalidates them too).
        let mut flush_error = None;
        if copied_all && let Some(dst) = self.dst_backend(job) {
            let epoch = job.status.lock().flush_epoch;
            let flushed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                match (dst.needs_flush(), epoch) {
                    (false, _) => Ok(()),
                    (true, Some(epoch)) => dst.flush_since(epoch),
                    (true, None) => dst.flush(),
                }
            }));
            flush_error = match flushed {
                Ok(r) => r.err(),
                Err(payload) => Some(panicked(payload.as_ref())),
            };
        }
        let mut st = job.status.lock();
        if let Some(e) = flush_error
            && st.error.is_none()
        {
            st.error = Some(e);
        }
        let now = Instant::now();
        let outcome = if let Some(e) = st.error.take() {
            self.counters.failed.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(error = %e, priority = ?job.priority, "transfer failed");
            Err(e)
        } else if st.bytes_done < job.len_bytes {
            self.counters.cancelled.fetch_add(1, Ordering::Relaxed);
            Err(TierError::Cancelled)
        } else {
            self.counters.succeeded.fetch_add(1, Ordering::Relaxed);
            self.counters
                .bytes
                .fetch_add(st.bytes_done, Ordering::Relaxed);
            Ok(TransferReport {
                bytes: st.bytes_done,
                chunks: job.total_chunks,
                priority: job.priority,
                queued: st
                    .started
                    .unwrap_or(now)
                    .saturating_duration_since(job.submitted),
                elapsed: now.saturating_duration_since(job.submitted),
            })
        };
        st.outcome = Some(outcome);
        drop(st);
        job.done.notify_all();
    }
}
