//! Continuous batching: many requests sharing one engine, decoded together.
//!
//! A [`Scheduler`] owns one worker thread that runs the engine in steps. Each step:
//! 1. drops the sequences that finished or whose caller went away (their KV blocks return to
//!    the pool at once, or stay for sharing: see below);
//! 2. brings back sequences set aside for room (see below), the earliest admitted first,
//!    while the host's KV room allows;
//! 3. runs prompt pieces, [`SchedulerConfig::prefill_chunk_tokens`] tokens in all (an image
//!    is never split at a piece's end), so a long prompt or a large image delays the
//!    running sequences by one budget's worth per step while short prompts join several per
//!    step: the piece of the request whose prompt pass is under way, else of the oldest
//!    waiting request, admitted when none is set aside, fewer than
//!    [`SchedulerConfig::max_seqs`] run, the KV budget holds its whole context beside what
//!    the running ones reserved, and the host's KV room holds its prompt beside the running
//!    ones (it takes the prefix the pool already holds and gets [`SeqEvent::Started`]);
//!    after its last piece a request's first token is chosen and it joins the batch;
//! 4. sets aside the newest running sequences while the host's KV room cannot hold the
//!    others' next tokens (see below), then decodes every running sequence's next token in
//!    one pass over the weights ([`crate::model::Qwen3Vl::decode_batch`]), each with its own
//!    sampler.
//!
//! **Prefix sharing.** A prompt's tokens are keyed by their ids, and an image's pads by the
//! image's content hash ([`crate::kv::prefix_keys`]), so a prompt that starts like a running
//! request's prompt (a system prompt, an image) takes those whole KV blocks from the pool
//! instead of computing them ([`Finished::cached_tokens`]). A finished request's whole prompt
//! blocks stay in the pool for later requests ([`SchedulerConfig::kept_prompts`] of them, the
//! oldest let go first, and all before a request would wait for KV room).
//!
//! **Preemption.** When the running sequences' next tokens would not fit the host's KV room,
//! the newest is set aside: its KV is swapped out to the tier below, and it resumes unchanged
//! when there is room (one sequence always runs). A request is never dropped or cut for lack
//! of memory: its whole context was in the KV budget (host and disk) when it was admitted.
//!
//! Requests are prepared (tokenized, images preprocessed and hashed) and checked on the
//! caller's thread by [`Scheduler::submit`], which refuses at once what can never run (a bad
//! request, a KV cache larger than the budgets) and what the bounded queue has no room for.
//! Events reach the caller through its sink, called on the worker thread: a sink that
//! returns false cancels its request (a client that disconnected), as does
//! [`Ticket::cancel`]. A request's output does not depend on what else runs (see
//! [`crate::text::BatchRow`]), nor on the pieces its prompt runs in or the prefix it shares,
//! within rounding (`tests/prefill_pieces.rs`, `tests/scheduler.rs`).
//!
//! Locks: the queue's mutex is held only to push, pop or count, never across model work or a
//! sink call; the worker holds the engine's turn lock for each step's model work, so
//! [`Engine::generate`] callers interleave with the steps. Invariant: every submitted
//! request ends with exactly one [`SeqEvent::Finished`] or [`SeqEvent::Failed`], after
//! which its sink is dropped and its KV blocks are freed (or kept for sharing, until the
//! worker ends); `queued + running` never exceeds `max_queue + max_seqs` (`running` counts
//! the admitted requests not ended: in their prompt pass, decoding or set aside).

use super::queue::{Refused, RequestQueue};
use super::spans::ImageSpans;
use super::{Engine, EngineError, EngineResult, Request};
use crate::kv::{KvStore, prefix_keys};
use crate::model::{FinishReason, PrefillOptions};
use crate::preprocess::ImageInput;
use crate::rope::MropePositions;
use crate::sample::Sampler;
use crate::text::BatchRow;
use crate::text::LogitsFor;
use std::collections::VecDeque;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::{Duration, Instant};
use vlmem_core::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use vlmem_core::sync::thread::{self, JoinHandle};
use vlmem_core::sync::{Arc, Mutex};

/// How many requests a [`Scheduler`] runs and holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// Sequences decoded together at most.
    pub max_seqs: usize,
    /// Requests waiting to start at most; beyond it [`Scheduler::submit`] refuses
    /// ([`SubmitError::QueueFull`]).
    pub max_queue: usize,
    /// Prompt tokens one step's prompt pass takes at most, so a long prompt delays the
    /// running sequences by one such piece per step. An image is never split: a piece that
    /// would end inside one runs on to its end. 0 counts as 1.
    pub prefill_chunk_tokens: usize,
    /// Finished requests whose whole prompt blocks stay in the KV pool for later requests
    /// with the same prefix to take (the oldest let go first, and all of them before a new
    /// request waits for KV room). 0 keeps none. Stores that share nothing keep nothing.
    pub kept_prompts: usize,
}

/// [`SchedulerConfig::prefill_chunk_tokens`] unless told otherwise.
pub const DEFAULT_PREFILL_CHUNK_TOKENS: usize = 512;

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            max_seqs: 8,
            max_queue: 64,
            prefill_chunk_tokens: DEFAULT_PREFILL_CHUNK_TOKENS,
            kept_prompts: 16,
        }
    }
}

/// What a request's sink receives, in order: [`SeqEvent::Started`], its tokens, then one
/// end (a request cancelled or refused before it started gets only the end).
#[derive(Debug)]
pub enum SeqEvent {
    /// Its prompt pass begins: `cached_tokens` leading prompt tokens were found in the KV
    /// pool (another request's prompt blocks) and are not computed again.
    Started {
        /// Prompt tokens taken from the pool.
        cached_tokens: usize,
    },
    /// The next generated id.
    Token(u32),
    /// The request ended.
    Finished(Finished),
    /// The request failed; nothing follows.
    Failed(EngineError),
}

/// How a request ended.
#[derive(Debug, Clone, PartialEq)]
pub struct Finished {
    /// Why generation ended ([`FinishReason::Length`] also when cancelled).
    pub finish_reason: FinishReason,
    /// The caller cancelled it.
    pub cancelled: bool,
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Of those, the ones taken from the KV pool instead of computed.
    pub cached_tokens: usize,
    /// Generated ids.
    pub generated_tokens: usize,
    /// From submission to the first id (zero when none was generated).
    pub time_to_first_token: Duration,
    /// From submission to the start of its prompt pass.
    pub queued: Duration,
}

/// Why [`Scheduler::submit`] refused a request.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// The request cannot run (bad input, or a KV cache no budget holds).
    #[error(transparent)]
    Refused(#[from] EngineError),
    /// The queue is full; try again later.
    #[error("the queue is full ({queued} requests waiting)")]
    QueueFull {
        /// Requests waiting.
        queued: usize,
    },
    /// The scheduler is shutting down.
    #[error("the server is shutting down")]
    ShuttingDown,
}

/// A sink: called on the worker thread with each event; returns false to cancel.
pub type Sink = Box<dyn FnMut(SeqEvent) -> bool + Send>;

/// A submitted request: its prompt length and a way to cancel it.
#[derive(Debug, Clone)]
pub struct Ticket {
    cancel: Arc<AtomicBool>,
    prompt_tokens: usize,
}

impl Ticket {
    /// Asks the scheduler to end the request at its next step.
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::Release);
    }

    /// The prompt's tokens (image pads included).
    pub fn prompt_tokens(&self) -> usize {
        self.prompt_tokens
    }
}

/// Counters of a [`Scheduler`] (monotonic except `running` and `queued`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SchedulerStats {
    /// Sequences being decoded.
    pub running: u64,
    /// Requests waiting to start.
    pub queued: u64,
    /// Requests refused by [`Scheduler::submit`] because the queue was full.
    pub rejected: u64,
    /// Requests that ended (finished, cancelled or failed).
    pub completed: u64,
    /// Prompt tokens run through prompt passes.
    pub prompt_tokens: u64,
    /// Prompt tokens taken from the KV pool instead (prefix sharing).
    pub cached_tokens: u64,
    /// Prompt passes run (a long prompt takes several pieces).
    pub prefill_chunks: u64,
    /// Finished requests' prompts kept in the pool for sharing.
    pub kept_prompts: u64,
    /// Sequences set aside now: their KV swapped out of the host for lack of room, to
    /// resume when there is room again.
    pub preempted: u64,
    /// Times a sequence was set aside so.
    pub preemptions: u64,
    /// Ids generated.
    pub generated_tokens: u64,
    /// Batched decode steps run.
    pub decode_steps: u64,
    /// Sequences those steps decoded in all (`decoded_rows / decode_steps`: the mean batch).
    pub decoded_rows: u64,
    /// The most sequences one decode step held.
    pub max_batch: u64,
    /// Wall time spent in decode steps, in nanoseconds (`decoded_rows` over it: the
    /// aggregate decode rate, prompt passes left out).
    pub decode_ns: u64,
    /// Wall time spent in prompt passes, in nanoseconds.
    pub prefill_ns: u64,
}

/// A request waiting to start.
struct Waiting {
    ids: Vec<u32>,
    images: Vec<ImageInput>,
    sampler: Sampler,
    max_new_tokens: usize,
    stop_ids: Vec<u32>,
    need_bytes: u64,
    /// The prompt's sharing keys ([`crate::kv::prefix_keys`]); empty where the KV is not
    /// pooled.
    keys: Vec<u32>,
    /// Where its prompt may be cut.
    spans: ImageSpans,
    sink: Sink,
    cancel: Arc<AtomicBool>,
    submitted: Instant,
}

/// A sequence in its prompt pass or being decoded.
struct Running {
    w: Waiting,
    kv: Box<dyn KvStore + Send>,
    generated: Vec<u32>,
    /// The multimodal position of the next generated token (after the prompt, then after
    /// each generated id).
    position: i64,
    /// The whole prompt's positions, while its pieces run.
    positions: MropePositions,
    /// Prompt tokens in the KV so far (all of them once it decodes).
    prefilled: usize,
    /// Prompt tokens taken from the pool.
    cached_tokens: usize,
    /// The order of admission (the newest is set aside first under pressure).
    admitted: u64,
    queued: Duration,
    first_token: Duration,
}

impl Running {
    fn new(w: Waiting, kv: Box<dyn KvStore + Send>) -> Self {
        Running {
            queued: w.submitted.elapsed(),
            w,
            kv,
            generated: Vec::new(),
            position: 0,
            positions: MropePositions::text(0, 0),
            prefilled: 0,
            cached_tokens: 0,
            admitted: 0,
            first_token: Duration::ZERO,
        }
    }
}

/// A finished request's KV store cut to its whole prompt blocks, kept for sharing.
struct Kept {
    /// Dropping it returns the blocks no other sequence holds.
    _kv: Box<dyn KvStore + Send>,
    /// What it takes of the KV budget.
    bytes: u64,
}

struct Shared {
    /// The engine, shared as its callers share it (std's `Arc`, as [`Engine`]'s API takes).
    engine: std::sync::Arc<Engine>,
    config: SchedulerConfig,
    /// The waiting requests (`cancel_all` raises its abort flag).
    queue: RequestQueue<Waiting>,
    /// Set by the worker as it returns.
    stopped: AtomicBool,
    running: AtomicU64,
    rejected: AtomicU64,
    completed: AtomicU64,
    prompt_tokens: AtomicU64,
    cached_tokens: AtomicU64,
    prefill_chunks: AtomicU64,
    kept_prompts: AtomicU64,
    preempted: AtomicU64,
    preemptions: AtomicU64,
    generated_tokens: AtomicU64,
    decode_steps: AtomicU64,
    decoded_rows: AtomicU64,
    max_batch: AtomicU64,
    decode_ns: AtomicU64,
    prefill_ns: AtomicU64,
}

/// Continuous batching over one engine: see the module documentation.
pub struct Scheduler {
    shared: Arc<Shared>,
    worker: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for Scheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scheduler")
            .field("config", &self.shared.config)
            .field("stats", &self.stats())
            .finish()
    }
}

impl Scheduler {
    /// Starts the worker thread for `engine`. `max_seqs` and `max_queue` of 0 count as 1
    /// and 0.
    pub fn start(engine: std::sync::Arc<Engine>, config: SchedulerConfig) -> Self {
        let config = SchedulerConfig {
            max_seqs: config.max_seqs.max(1),
            prefill_chunk_tokens: config.prefill_chunk_tokens.max(1),
            ..config
        };
        let shared = Arc::new(Shared {
            engine,
            config,
            queue: RequestQueue::new(config.max_queue),
            stopped: AtomicBool::new(false),
            running: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            completed: AtomicU64::new(0),
            prompt_tokens: AtomicU64::new(0),
            cached_tokens: AtomicU64::new(0),
            prefill_chunks: AtomicU64::new(0),
            kept_prompts: AtomicU64::new(0),
            preempted: AtomicU64::new(0),
            preemptions: AtomicU64::new(0),
            generated_tokens: AtomicU64::new(0),
            decode_steps: AtomicU64::new(0),
            decoded_rows: AtomicU64::new(0),
            max_batch: AtomicU64::new(0),
            decode_ns: AtomicU64::new(0),
            prefill_ns: AtomicU64::new(0),
        });
        let worker_shared = shared.clone();
        let worker = thread::spawn(move || {
            let mut w = Worker::new(worker_shared);
            w.run();
            w.shared.stopped.store(true, Ordering::Release);
        });
        Scheduler {
            shared,
            worker: Mutex::new(Some(worker)),
        }
    }

    /// The engine it runs.
    pub fn engine(&self) -> &std::sync::Arc<Engine> {
        &self.shared.engine
    }

    /// Prepares and checks `request` on this thread, then queues it; `sink` receives its
    /// events on the worker thread (see [`SeqEvent`]). Refuses a request that cannot run,
    /// one the queue has no room for, and any after [`Scheduler::shutdown`] began.
    pub fn submit(&self, request: &Request, sink: Sink) -> Result<Ticket, SubmitError> {
        let engine = &self.shared.engine;
        let prepared = engine.prepare(request)?;
        engine.check_prepared(&prepared)?;
        let ids = prepared.prompt_ids().unwrap_or_default().to_vec();
        let images = prepared.preprocessed_images().unwrap_or_default();
        let opts = engine.options(
            prepared.max_new_tokens,
            prepared.sampling.as_ref(),
            &prepared.stop_ids,
        )?;
        let sampler = Sampler::new(opts.sampling).map_err(EngineError::from)?;
        let context = super::request::context_of(&prepared, prepared.max_new_tokens);
        let config = engine.runner.model().config();
        let pads: Vec<usize> = images
            .iter()
            .map(|i| i.num_tokens(config.vision.spatial_merge_size.max(1) as usize))
            .collect();
        let spans = ImageSpans::of(&ids, config.image_token_id, &pads);
        let keys = if engine.kv_pool.is_some() {
            let hashes: Vec<u64> = images.iter().map(ImageInput::content_hash).collect();
            prefix_keys(&ids, config.image_token_id, &hashes, &pads)
        } else {
            Vec::new()
        };
        let cancel = Arc::new(AtomicBool::new(false));
        let ticket = Ticket {
            cancel: cancel.clone(),
            prompt_tokens: ids.len(),
        };
        let waiting = Waiting {
            ids,
            images,
            sampler,
            max_new_tokens: opts.max_new_tokens,
            stop_ids: opts.stop_ids,
            need_bytes: engine.shape.need_bytes(context),
            keys,
            spans,
            sink,
            cancel,
            submitted: Instant::now(),
        };
        match self.shared.queue.push(waiting) {
            Ok(()) => Ok(ticket),
            Err(Refused::Closed(_)) => Err(SubmitError::ShuttingDown),
            Err(Refused::Full(_, queued)) => {
                self.shared.rejected.fetch_add(1, Ordering::Relaxed);
                Err(SubmitError::QueueFull { queued })
            }
        }
    }

    /// The counters now.
    pub fn stats(&self) -> SchedulerStats {
        let s = &self.shared;
        SchedulerStats {
            running: s.running.load(Ordering::Relaxed),
            queued: s.queue.len() as u64,
            rejected: s.rejected.load(Ordering::Relaxed),
            completed: s.completed.load(Ordering::Relaxed),
            prompt_tokens: s.prompt_tokens.load(Ordering::Relaxed),
            cached_tokens: s.cached_tokens.load(Ordering::Relaxed),
            prefill_chunks: s.prefill_chunks.load(Ordering::Relaxed),
            kept_prompts: s.kept_prompts.load(Ordering::Relaxed),
            preempted: s.preempted.load(Ordering::Relaxed),
            preemptions: s.preemptions.load(Ordering::Relaxed),
            generated_tokens: s.generated_tokens.load(Ordering::Relaxed),
            decode_steps: s.decode_steps.load(Ordering::Relaxed),
            decoded_rows: s.decoded_rows.load(Ordering::Relaxed),
            max_batch: s.max_batch.load(Ordering::Relaxed),
            decode_ns: s.decode_ns.load(Ordering::Relaxed),
            prefill_ns: s.prefill_ns.load(Ordering::Relaxed),
        }
    }

    /// Stops accepting requests ([`SubmitError::ShuttingDown`] from then on); the queued and
    /// running ones go on, and the worker ends when none is left.
    pub fn close(&self) {
        self.shared.queue.close();
    }

    /// Cancels every queued and running request at the worker's next step (each gets its
    /// [`SeqEvent::Finished`] with `cancelled`). Requests submitted afterwards run.
    pub fn cancel_all(&self) {
        self.shared.queue.cancel_all();
    }

    /// Waits up to `timeout` for the worker to end (after [`Scheduler::close`], once no
    /// request is left); true when it has.
    pub fn join(&self, timeout: Duration) -> bool {
        let deadline = Instant::now().checked_add(timeout);
        while !self.shared.stopped.load(Ordering::Acquire) {
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return false;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        if let Some(worker) = self.worker.lock().take() {
            // The worker's panics are caught per step; a join error would be a bug in the
            // loop itself, and there is nothing left to clean up then.
            let _ = worker.join();
        }
        true
    }

    /// [`Scheduler::close`], then lets the queued and running requests finish for up to
    /// `grace`, then cancels the rest and waits for the worker to end. Later calls return at
    /// once.
    pub fn shutdown(&self, grace: Duration) {
        self.close();
        if !self.join(grace) {
            self.cancel_all();
            self.join(Duration::MAX);
        }
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        self.shutdown(Duration::ZERO);
    }
}

/// The worker thread's state.
struct Worker {
    shared: Arc<Shared>,
    running: Vec<Running>,
    /// The admitted request whose prompt pass runs, a piece per step.
    prefilling: Option<Running>,
    /// Sequences set aside for lack of host KV room, their KV swapped out.
    preempted: Vec<Running>,
    /// Admissions so far.
    admissions: u64,
    /// Finished requests' prompt blocks, oldest first.
    kept: VecDeque<Kept>,
    /// KV bytes the running sequences' whole contexts and the kept prompts take at most.
    reserved_bytes: u64,
}

impl Worker {
    fn new(shared: Arc<Shared>) -> Self {
        Worker {
            shared,
            running: Vec::new(),
            prefilling: None,
            preempted: Vec::new(),
            admissions: 0,
            kept: VecDeque::new(),
            reserved_bytes: 0,
        }
    }

    fn run(&mut self) {
        loop {
            if self.shared.queue.take_abort() {
                self.cancel_all();
            }
            self.drop_cancelled();
            let mut worked = self.resume_preempted();
            // Prompt pieces up to the step's token budget: short prompts join several per
            // step, a long one takes the whole budget.
            let mut budget = self.shared.config.prefill_chunk_tokens;
            while budget > 0 {
                if self.prefilling.is_none() && !(self.preempted.is_empty() && self.admit_one()) {
                    break;
                }
                if self.prefilling.is_none() {
                    // Admitted and failed at once.
                    worked = true;
                    continue;
                }
                budget = budget.saturating_sub(self.prefill_piece(budget));
                worked = true;
                if self.prefilling.is_some() {
                    break;
                }
            }
            self.preempt_for_room();
            if !self.running.is_empty() {
                self.decode_step();
            }
            // Sequences set aside resume at the next step, even when none runs now.
            if worked || !self.running.is_empty() || !self.preempted.is_empty() {
                continue;
            }
            if !self.shared.queue.wait_for_work() {
                // Closed and empty: nothing will come to share the kept prompts.
                self.let_go_of_kept(u64::MAX);
                return;
            }
        }
    }

    /// Returns a sequence's KV reservation, keeping its whole prompt blocks for sharing when
    /// its prompt pass ended.
    fn release(&mut self, r: &mut Running) {
        self.reserved_bytes = self.reserved_bytes.saturating_sub(r.w.need_bytes);
        let kv = std::mem::replace(&mut r.kv, Box::new(crate::kv::KvCache::new(0)));
        let prompt = r.w.ids.len();
        let Some(block) = kv.block_tokens().filter(|b| *b > 0) else {
            return;
        };
        // Only blocks of prompt tokens are shareable: cut before the first generated one.
        let whole = prompt / block * block;
        if self.shared.config.kept_prompts == 0 || whole == 0 || r.prefilled < prompt {
            return;
        }
        let mut kv = kv;
        if kv.truncate(whole).is_err() {
            return;
        }
        let bytes = self.shared.engine.shape.need_bytes(whole as u64);
        self.reserved_bytes = self.reserved_bytes.saturating_add(bytes);
        self.kept.push_back(Kept { _kv: kv, bytes });
        self.shared.kept_prompts.fetch_add(1, Ordering::Relaxed);
        while self.kept.len() > self.shared.config.kept_prompts {
            self.drop_oldest_kept();
        }
    }

    fn drop_oldest_kept(&mut self) {
        if let Some(k) = self.kept.pop_front() {
            self.reserved_bytes = self.reserved_bytes.saturating_sub(k.bytes);
        }
    }

    /// Lets go of the oldest kept prompts until `need_bytes` more fit the KV budget (or
    /// none is left).
    fn let_go_of_kept(&mut self, need_bytes: u64) {
        let budget = self.kv_budget_bytes();
        while !self.kept.is_empty() && self.reserved_bytes.saturating_add(need_bytes) > budget {
            self.drop_oldest_kept();
        }
    }

    fn ended(&mut self, mut r: Running, finish_reason: FinishReason, cancelled: bool) {
        // The KV blocks return to the pool (or are kept for sharing) before the caller hears
        // of the end.
        self.release(&mut r);
        let Running {
            mut w,
            generated,
            queued,
            first_token,
            cached_tokens,
            ..
        } = r;
        self.shared.running.fetch_sub(1, Ordering::Relaxed);
        self.shared.completed.fetch_add(1, Ordering::Relaxed);
        (w.sink)(SeqEvent::Finished(Finished {
            finish_reason,
            cancelled,
            prompt_tokens: w.ids.len(),
            cached_tokens,
            generated_tokens: generated.len(),
            time_to_first_token: first_token,
            queued,
        }));
    }

    fn failed(&mut self, r: Running, e: EngineError) {
        let Running { mut w, kv, .. } = r;
        drop(kv);
        self.reserved_bytes = self.reserved_bytes.saturating_sub(w.need_bytes);
        self.shared.running.fetch_sub(1, Ordering::Relaxed);
        self.shared.completed.fetch_add(1, Ordering::Relaxed);
        (w.sink)(SeqEvent::Failed(e));
    }

    fn drop_cancelled(&mut self) {
        let mut i = 0;
        while i < self.running.len() {
            if self.running[i].w.cancel.load(Ordering::Acquire) {
                let r = self.running.swap_remove(i);
                self.ended(r, FinishReason::Length, true);
            } else {
                i += 1;
            }
        }
        let mut i = 0;
        while i < self.preempted.len() {
            if self.preempted[i].w.cancel.load(Ordering::Acquire) {
                let r = self.preempted.remove(i);
                self.shared.preempted.fetch_sub(1, Ordering::Relaxed);
                self.ended(r, FinishReason::Length, true);
            } else {
                i += 1;
            }
        }
        if self
            .prefilling
            .as_ref()
            .is_some_and(|r| r.w.cancel.load(Ordering::Acquire))
            && let Some(r) = self.prefilling.take()
        {
            self.ended(r, FinishReason::Length, true);
        }
        // Cancelled while waiting: end them without running.
        let cancelled = self
            .shared
            .queue
            .take_where(|w| w.cancel.load(Ordering::Acquire));
        for w in cancelled {
            self.end_waiting(w);
        }
    }

    /// Ends a request cancelled before it started.
    fn end_waiting(&self, mut w: Waiting) {
        self.shared.completed.fetch_add(1, Ordering::Relaxed);
        (w.sink)(SeqEvent::Finished(Finished {
            finish_reason: FinishReason::Length,
            cancelled: true,
            prompt_tokens: w.ids.len(),
            cached_tokens: 0,
            generated_tokens: 0,
            time_to_first_token: Duration::ZERO,
            queued: w.submitted.elapsed(),
        }));
    }

    fn cancel_all(&mut self) {
        for r in std::mem::take(&mut self.running) {
            self.ended(r, FinishReason::Length, true);
        }
        if let Some(r) = self.prefilling.take() {
            self.ended(r, FinishReason::Length, true);
        }
        for r in std::mem::take(&mut self.preempted) {
            self.shared.preempted.fetch_sub(1, Ordering::Relaxed);
            self.ended(r, FinishReason::Length, true);
        }
        for w in self.shared.queue.take_all() {
            self.end_waiting(w);
        }
    }

    /// The KV budget (host and disk) the pool may fill.
    fn kv_budget_bytes(&self) -> u64 {
        self.shared.engine.room.budget_bytes()
    }

    /// Admits the oldest waiting request when a sequence slot and its KV are free: its KV
    /// store, the prompt prefix the pool already holds, then [`SeqEvent::Started`]; its
    /// prompt pass follows in [`Worker::prefill_piece`]. Returns whether one was admitted.
    fn admit_one(&mut self) -> bool {
        if self.running.len() >= self.shared.config.max_seqs {
            return false;
        }
        let in_process = self.shared.engine.kv_pool.is_none();
        let Some(need) = self.shared.queue.peek(|f| f.need_bytes) else {
            return false;
        };
        if !in_process {
            self.let_go_of_kept(need);
        }
        let budget = self.kv_budget_bytes();
        let host_room = self.host_blocks();
        let running_need = self.running_need_blocks();
        // The first waiting request fits beside the running ones, in the KV budget for its
        // whole context and on the host for its prompt (or nothing runs: it was checked
        // against the whole budget when submitted).
        let w = self.shared.queue.pop_if(|f| {
            in_process
                || self.running.is_empty()
                || (self.reserved_bytes.saturating_add(f.need_bytes) <= budget
                    && host_room.is_none_or(|room| {
                        running_need.saturating_add(self.blocks_for(f.ids.len() + 1)) <= room
                    }))
        });
        let Some(w) = w else {
            return false;
        };
        self.reserved_bytes = self.reserved_bytes.saturating_add(w.need_bytes);
        self.shared.running.fetch_add(1, Ordering::Relaxed);
        let engine = self.shared.engine.clone();
        let kv = match engine.new_kv_store() {
            Ok(kv) => kv,
            Err(e) => {
                let r = Running::new(w, Box::new(crate::kv::KvCache::new(0)));
                self.failed(r, e);
                return true;
            }
        };
        let mut r = Running::new(w, kv);
        self.admissions += 1;
        r.admitted = self.admissions;
        let shared = {
            let _turn = engine.turn.lock();
            catch_unwind(AssertUnwindSafe(|| start_prompt(&engine, &mut r)))
        };
        match shared {
            Ok(Ok(())) => {
                self.shared
                    .cached_tokens
                    .fetch_add(r.cached_tokens as u64, Ordering::Relaxed);
                let go_on = (r.w.sink)(SeqEvent::Started {
                    cached_tokens: r.cached_tokens,
                });
                if go_on && !r.w.cancel.load(Ordering::Acquire) {
                    self.prefilling = Some(r);
                } else {
                    // The caller went away as it started: no prompt pass.
                    self.ended(r, FinishReason::Length, true);
                }
            }
            Ok(Err(e)) => self.failed(r, e),
            Err(panic) => self.failed(r, panicked(panic)),
        }
        true
    }

    /// Blocks the pool keeps on the host at most (`None` for KV outside the manager).
    fn host_blocks(&self) -> Option<u64> {
        self.shared
            .engine
            .kv_pool
            .as_ref()
            .map(|p| p.max_resident_blocks())
    }

    /// Blocks a sequence of `tokens` tokens takes, every layer (counted as if it shared
    /// none).
    fn blocks_for(&self, tokens: usize) -> u64 {
        let block = self
            .shared
            .engine
            .kv_pool
            .as_ref()
            .map_or(1, |p| u64::from(p.config().block_tokens).max(1));
        (tokens as u64).div_ceil(block) * self.shared.engine.shape.layers as u64
    }

    /// Blocks the running sequences hold after their next token.
    fn running_need_blocks(&self) -> u64 {
        self.running
            .iter()
            .map(|r| self.blocks_for(r.kv.len_tokens() + 1))
            .sum()
    }

    /// Sets the newest running sequences aside while the running ones' next tokens would
    /// not fit the host's KV room (one always runs: a sequence alone larger than the host
    /// pages its own blocks through the pool). A sequence set aside has its KV swapped out
    /// to the tier below and resumes, unchanged, when there is room.
    fn preempt_for_room(&mut self) {
        let Some(room) = self.host_blocks() else {
            return;
        };
        while self.running.len() > 1 && self.running_need_blocks() > room {
            let newest = (0..self.running.len())
                .max_by_key(|&i| self.running[i].admitted)
                .unwrap_or(0);
            let mut r = self.running.swap_remove(newest);
            let swapped = {
                let _turn = self.shared.engine.turn.lock();
                catch_unwind(AssertUnwindSafe(|| r.kv.swap_out()))
            };
            match swapped {
                Ok(Ok(_)) => {
                    self.shared.preempted.fetch_add(1, Ordering::Relaxed);
                    self.shared.preemptions.fetch_add(1, Ordering::Relaxed);
                    self.preempted.push(r);
                }
                Ok(Err(e)) => self.failed(r, e.into()),
                Err(panic) => self.failed(r, panicked(panic)),
            }
        }
    }

    /// Brings set-aside sequences back, the earliest admitted first, while a slot and the
    /// host's KV room allow (always one when nothing runs). Returns whether one came back.
    fn resume_preempted(&mut self) -> bool {
        let mut resumed = false;
        while !self.preempted.is_empty() && self.running.len() < self.shared.config.max_seqs {
            let oldest = (0..self.preempted.len())
                .min_by_key(|&i| self.preempted[i].admitted)
                .unwrap_or(0);
            let need = self.blocks_for(self.preempted[oldest].kv.len_tokens() + 1);
            let fits = self
                .host_blocks()
                .is_none_or(|room| self.running_need_blocks().saturating_add(need) <= room);
            if !self.running.is_empty() && !fits {
                break;
            }
            // Its KV comes back from the tier below on first use.
            let r = self.preempted.remove(oldest);
            self.shared.preempted.fetch_sub(1, Ordering::Relaxed);
            self.running.push(r);
            resumed = true;
        }
        resumed
    }

    /// Runs the next piece of the admitted request's prompt pass; after the last one, its
    /// first token is chosen and it joins the decoding sequences.
    /// Returns the tokens it ran (at least `budget`'s worth unless the prompt ended, more
    /// when the piece runs on to an image's end).
    fn prefill_piece(&mut self, budget: usize) -> usize {
        let Some(mut r) = self.prefilling.take() else {
            return 0;
        };
        let engine = self.shared.engine.clone();
        let start = r.prefilled;
        let len = r.w.ids.len();
        let end =
            r.w.spans
                .cut_at_or_after(start.saturating_add(budget.max(1)).min(len));
        let last = end >= len;
        let (images, skip_rows) = r.w.spans.images_in(start, end);
        let positions = MropePositions {
            thw: std::array::from_fn(|axis| {
                r.positions.thw[axis]
                    .get(start..end)
                    .unwrap_or_default()
                    .to_vec()
            }),
            next_position: r.positions.next_position,
        };
        let started = Instant::now();
        let step = {
            let _turn = engine.turn.lock();
            catch_unwind(AssertUnwindSafe(|| {
                let model = engine.runner.model();
                let pre = model.prefill_piece(
                    &r.w.ids[start..end],
                    positions,
                    r.w.images.get(images).unwrap_or_default(),
                    skip_rows,
                    r.kv.as_mut(),
                    PrefillOptions {
                        logits: if last {
                            LogitsFor::Last
                        } else {
                            LogitsFor::Skip
                        },
                        ..PrefillOptions::default()
                    },
                )?;
                let logits = match pre.logits {
                    Some(l) if last => Some(l.squeeze(0)?.to_vec1::<f32>()?),
                    None if last => {
                        return Err(crate::error::RunnerError::BadRequest(
                            "prefill returned no logits".into(),
                        ));
                    }
                    _ => None,
                };
                Ok::<_, crate::error::RunnerError>(logits)
            }))
        };
        add_ns(&self.shared.prefill_ns, started);
        self.shared.prefill_chunks.fetch_add(1, Ordering::Relaxed);
        match step {
            Ok(Ok(logits)) => {
                self.shared
                    .prompt_tokens
                    .fetch_add((end - start) as u64, Ordering::Relaxed);
                r.prefilled = end;
                match logits {
                    Some(logits) => {
                        // Images and positions are not needed past the prompt pass.
                        r.w.images = Vec::new();
                        r.positions = MropePositions::text(0, 0);
                        self.push_token(r, &logits);
                    }
                    None => self.prefilling = Some(r),
                }
            }
            Ok(Err(e)) => self.failed(r, e.into()),
            Err(panic) => self.failed(r, panicked(panic)),
        }
        end - start
    }

    /// Chooses `r`'s next id from `logits`, tells its sink, and keeps it running unless it
    /// ended.
    fn push_token(&mut self, mut r: Running, logits: &[f32]) {
        let next = match r.w.sampler.sample(logits, &r.w.ids, &r.generated) {
            Ok(id) => id,
            Err(e) => return self.failed(r, e.into()),
        };
        r.generated.push(next);
        if r.generated.len() == 1 {
            r.first_token = r.w.submitted.elapsed();
        }
        self.shared.generated_tokens.fetch_add(1, Ordering::Relaxed);
        let go_on = (r.w.sink)(SeqEvent::Token(next));
        if r.w.stop_ids.contains(&next) {
            self.ended(r, FinishReason::Stop, false);
        } else if r.generated.len() >= r.w.max_new_tokens {
            self.ended(r, FinishReason::Length, false);
        } else if !go_on || r.w.cancel.load(Ordering::Acquire) {
            self.ended(r, FinishReason::Length, true);
        } else {
            self.running.push(r);
        }
    }

    /// One decode step over every running sequence.
    fn decode_step(&mut self) {
        let engine = self.shared.engine.clone();
        let mut batch = std::mem::take(&mut self.running);
        let n = batch.len() as u64;
        let started = Instant::now();
        let step = {
            let _turn = engine.turn.lock();
            catch_unwind(AssertUnwindSafe(|| {
                let mut rows: Vec<BatchRow<'_>> = batch
                    .iter_mut()
                    .map(|r| BatchRow {
                        token: *r.generated.last().unwrap_or(&0),
                        position: r.position,
                        kv: r.kv.as_mut(),
                    })
                    .collect();
                engine.runner.model().decode_batch(&mut rows)
            }))
        };
        add_ns(&self.shared.decode_ns, started);
        self.shared.decode_steps.fetch_add(1, Ordering::Relaxed);
        self.shared.decoded_rows.fetch_add(n, Ordering::Relaxed);
        self.shared.max_batch.fetch_max(n, Ordering::Relaxed);
        match step {
            Ok(Ok(logits)) => {
                for (mut r, l) in batch.into_iter().zip(logits) {
                    r.position += 1;
                    self.push_token(r, &l);
                }
            }
            Ok(Err(e)) => {
                let message = e.to_string();
                for r in batch {
                    self.failed(
                        r,
                        EngineError::Model(crate::error::RunnerError::BadRequest(format!(
                            "decode step failed: {message}"
                        ))),
                    );
                }
            }
            Err(panic) => {
                // The model's failure, not the request's: each request of the step gets it.
                let message = panicked(panic).to_string();
                for r in batch {
                    self.failed(
                        r,
                        EngineError::Model(crate::error::RunnerError::BadRequest(message.clone())),
                    );
                }
            }
        }
    }
}

/// Computes `r`'s prompt positions and takes the longest prefix of its prompt that the pool
/// already holds.
fn start_prompt(engine: &Engine, r: &mut Running) -> EngineResult<()> {
    let positions = engine.runner.model().positions(&r.w.ids, &r.w.images)?;
    r.position = positions.next_position;
    r.positions = positions;
    if r.w.keys.is_empty() {
        return Ok(());
    }
    let cached = r.kv.share_prefix(&r.w.keys)?;
    r.prefilled = cached;
    r.cached_tokens = cached;
    Ok(())
}

/// Adds the time since `started` to `counter`.
fn add_ns(counter: &AtomicU64, started: Instant) {
    let ns = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
    counter.fetch_add(ns, Ordering::Relaxed);
}

/// A panic in a step as an error for the requests it held.
fn panicked(panic: Box<dyn std::any::Any + Send>) -> EngineError {
    let what = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown".into());
    EngineError::Model(crate::error::RunnerError::BadRequest(format!(
        "the model panicked: {what}"
    )))
}
