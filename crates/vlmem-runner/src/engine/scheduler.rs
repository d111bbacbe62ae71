//! Continuous batching: many requests sharing one engine, decoded together.
//!
//! A [`Scheduler`] owns one worker thread that runs the engine in steps. Each step:
//! 1. drops the sequences that finished or whose caller went away (their KV blocks return to
//!    the pool at once);
//! 2. admits at most one waiting request, if fewer than [`SchedulerConfig::max_seqs`] run and
//!    the KV budget holds its whole context beside what the running ones reserved, and runs
//!    its prompt pass (so a new prompt delays the running sequences by one prompt pass at
//!    most), choosing its first token;
//! 3. decodes every running sequence's next token in one pass over the weights
//!    ([`crate::model::Qwen3Vl::decode_batch`]), each with its own sampler.
//!
//! Requests are prepared (tokenized, images preprocessed) and checked on the caller's
//! thread by [`Scheduler::submit`], which refuses at once what can never run (a bad request,
//! a KV cache larger than the budgets) and what the bounded queue has no room for. Events
//! reach the caller through its sink, called on the worker thread: a sink that returns
//! false cancels its request (a client that disconnected), as does
//! [`Ticket::cancel`]. A request's output does not depend on what else runs (see
//! [`crate::text::BatchRow`]).
//!
//! Locks: the queue's mutex is held only to push, pop or count, never across model work or a
//! sink call; the worker holds the engine's turn lock for each step, so
//! [`Engine::generate`] callers interleave with the steps. Invariant: every submitted
//! request ends with exactly one [`SeqEvent::Finished`] or [`SeqEvent::Failed`], after
//! which its sink is dropped and its KV blocks are freed; `queued + running` never exceeds
//! `max_queue + max_seqs`.

use super::{Engine, EngineError, Request};
use crate::kv::KvStore;
use crate::model::{FinishReason, PrefillOptions};
use crate::preprocess::ImageInput;
use crate::sample::Sampler;
use crate::text::BatchRow;
use std::collections::VecDeque;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::{Duration, Instant};
use vlmem_core::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use vlmem_core::sync::thread::{self, JoinHandle};
use vlmem_core::sync::{Arc, Condvar, Mutex, wait_guard};

/// How many requests a [`Scheduler`] runs and holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// Sequences decoded together at most.
    pub max_seqs: usize,
    /// Requests waiting to start at most; beyond it [`Scheduler::submit`] refuses
    /// ([`SubmitError::QueueFull`]).
    pub max_queue: usize,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            max_seqs: 8,
            max_queue: 64,
        }
    }
}

/// What a request's sink receives, in order: its tokens, then one end.
#[derive(Debug)]
pub enum SeqEvent {
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
    /// Ids generated.
    pub generated_tokens: u64,
    /// Batched decode steps run.
    pub decode_steps: u64,
    /// Sequences those steps decoded in all (`decoded_rows / decode_steps`: the mean batch).
    pub decoded_rows: u64,
    /// The most sequences one decode step held.
    pub max_batch: u64,
}

/// A request waiting to start.
struct Waiting {
    ids: Vec<u32>,
    images: Vec<ImageInput>,
    sampler: Sampler,
    max_new_tokens: usize,
    stop_ids: Vec<u32>,
    need_bytes: u64,
    sink: Sink,
    cancel: Arc<AtomicBool>,
    submitted: Instant,
}

/// A sequence being decoded.
struct Running {
    w: Waiting,
    kv: Box<dyn KvStore + Send>,
    generated: Vec<u32>,
    position: i64,
    queued: Duration,
    first_token: Duration,
}

struct Queue {
    waiting: VecDeque<Waiting>,
    accepting: bool,
}

struct Shared {
    /// The engine, shared as its callers share it (std's `Arc`, as [`Engine`]'s API takes).
    engine: std::sync::Arc<Engine>,
    config: SchedulerConfig,
    queue: Mutex<Queue>,
    wake: Condvar,
    /// Set by [`Scheduler::shutdown`] when the grace time ends: cancel what still runs.
    abort: AtomicBool,
    /// Set by the worker as it returns.
    stopped: AtomicBool,
    running: AtomicU64,
    rejected: AtomicU64,
    completed: AtomicU64,
    prompt_tokens: AtomicU64,
    generated_tokens: AtomicU64,
    decode_steps: AtomicU64,
    decoded_rows: AtomicU64,
    max_batch: AtomicU64,
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
            ..config
        };
        let shared = Arc::new(Shared {
            engine,
            config,
            queue: Mutex::new(Queue {
                waiting: VecDeque::new(),
                accepting: true,
            }),
            wake: Condvar::new(),
            abort: AtomicBool::new(false),
            stopped: AtomicBool::new(false),
            running: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            completed: AtomicU64::new(0),
            prompt_tokens: AtomicU64::new(0),
            generated_tokens: AtomicU64::new(0),
            decode_steps: AtomicU64::new(0),
            decoded_rows: AtomicU64::new(0),
            max_batch: AtomicU64::new(0),
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
            sink,
            cancel,
            submitted: Instant::now(),
        };
        let mut q = self.shared.queue.lock();
        if !q.accepting {
            return Err(SubmitError::ShuttingDown);
        }
        if q.waiting.len() >= self.shared.config.max_queue {
            self.shared.rejected.fetch_add(1, Ordering::Relaxed);
            return Err(SubmitError::QueueFull {
                queued: q.waiting.len(),
            });
        }
        q.waiting.push_back(waiting);
        drop(q);
        self.shared.wake.notify_one();
        Ok(ticket)
    }

    /// The counters now.
    pub fn stats(&self) -> SchedulerStats {
        let s = &self.shared;
        SchedulerStats {
            running: s.running.load(Ordering::Relaxed),
            queued: s.queue.lock().waiting.len() as u64,
            rejected: s.rejected.load(Ordering::Relaxed),
            completed: s.completed.load(Ordering::Relaxed),
            prompt_tokens: s.prompt_tokens.load(Ordering::Relaxed),
            generated_tokens: s.generated_tokens.load(Ordering::Relaxed),
            decode_steps: s.decode_steps.load(Ordering::Relaxed),
            decoded_rows: s.decoded_rows.load(Ordering::Relaxed),
            max_batch: s.max_batch.load(Ordering::Relaxed),
        }
    }

    /// Stops accepting requests ([`SubmitError::ShuttingDown`] from then on); the queued and
    /// running ones go on, and the worker ends when none is left.
    pub fn close(&self) {
        self.shared.queue.lock().accepting = false;
        self.shared.wake.notify_all();
    }

    /// Cancels every queued and running request at the worker's next step (each gets its
    /// [`SeqEvent::Finished`] with `cancelled`). Requests submitted afterwards run.
    pub fn cancel_all(&self) {
        // Set under the queue's lock, which the worker holds from its last look at the flag
        // to its wait: the wake-up cannot fall between the two.
        let q = self.shared.queue.lock();
        self.shared.abort.store(true, Ordering::Release);
        drop(q);
        self.shared.wake.notify_all();
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
    /// KV bytes the running sequences' whole contexts take at most.
    reserved_bytes: u64,
}

impl Worker {
    fn new(shared: Arc<Shared>) -> Self {
        Worker {
            shared,
            running: Vec::new(),
            reserved_bytes: 0,
        }
    }

    fn run(&mut self) {
        loop {
            if self.shared.abort.swap(false, Ordering::AcqRel) {
                self.cancel_all();
            }
            self.drop_cancelled();
            let admitted = self.admit_one();
            if !self.running.is_empty() {
                self.decode_step();
            }
            if admitted || !self.running.is_empty() {
                continue;
            }
            let q = self.shared.queue.lock();
            if q.waiting.is_empty() && !self.shared.abort.load(Ordering::Acquire) {
                if !q.accepting {
                    return;
                }
                drop(wait_guard(&self.shared.wake, q));
            }
        }
    }

    fn ended(&mut self, r: Running, finish_reason: FinishReason, cancelled: bool) {
        let Running {
            mut w,
            kv,
            generated,
            queued,
            first_token,
            ..
        } = r;
        // The KV blocks return to the pool before the caller hears of the end.
        drop(kv);
        self.reserved_bytes = self.reserved_bytes.saturating_sub(w.need_bytes);
        self.shared.running.fetch_sub(1, Ordering::Relaxed);
        self.shared.completed.fetch_add(1, Ordering::Relaxed);
        (w.sink)(SeqEvent::Finished(Finished {
            finish_reason,
            cancelled,
            prompt_tokens: w.ids.len(),
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
        // Cancelled while waiting: end them without running.
        let cancelled: VecDeque<Waiting> = {
            let mut q = self.shared.queue.lock();
            let is_cancelled = |w: &Waiting| w.cancel.load(Ordering::Acquire);
            // Most steps find none: no rebuilding of the queue then.
            if !q.waiting.iter().any(is_cancelled) {
                return;
            }
            let (gone, kept) = std::mem::take(&mut q.waiting)
                .into_iter()
                .partition(is_cancelled);
            q.waiting = kept;
            gone
        };
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
            generated_tokens: 0,
            time_to_first_token: Duration::ZERO,
            queued: w.submitted.elapsed(),
        }));
    }

    fn cancel_all(&mut self) {
        for r in std::mem::take(&mut self.running) {
            self.ended(r, FinishReason::Length, true);
        }
        let waiting = std::mem::take(&mut self.shared.queue.lock().waiting);
        for w in waiting {
            self.end_waiting(w);
        }
    }

    /// The KV budget (host and disk) the pool may fill.
    fn kv_budget_bytes(&self) -> u64 {
        self.shared.engine.room.budget_bytes()
    }

    /// Starts the oldest waiting request when a sequence slot and its KV are free: its
    /// prompt pass and first token. Returns whether one was started.
    fn admit_one(&mut self) -> bool {
        if self.running.len() >= self.shared.config.max_seqs {
            return false;
        }
        let budget = self.kv_budget_bytes();
        let in_process = self.shared.engine.kv_pool.is_none();
        let w = {
            let mut q = self.shared.queue.lock();
            match q.waiting.front() {
                // The first waiting request fits beside the running ones (or nothing runs: it
                // was checked against the whole budget when submitted).
                Some(f)
                    if in_process
                        || self.running.is_empty()
                        || self.reserved_bytes.saturating_add(f.need_bytes) <= budget =>
                {
                    q.waiting.pop_front()
                }
                _ => None,
            }
        };
        let Some(w) = w else {
            return false;
        };
        let queued = w.submitted.elapsed();
        self.reserved_bytes = self.reserved_bytes.saturating_add(w.need_bytes);
        self.shared.running.fetch_add(1, Ordering::Relaxed);
        let engine = self.shared.engine.clone();
        let kv = match engine.new_kv_store() {
            Ok(kv) => kv,
            Err(e) => {
                let r = Running {
                    w,
                    kv: Box::new(crate::kv::KvCache::new(0)),
                    generated: Vec::new(),
                    position: 0,
                    queued,
                    first_token: Duration::ZERO,
                };
                self.failed(r, e);
                return true;
            }
        };
        let mut r = Running {
            w,
            kv,
            generated: Vec::new(),
            position: 0,
            queued,
            first_token: Duration::ZERO,
        };
        let step = {
            let _turn = engine.turn.lock();
            catch_unwind(AssertUnwindSafe(|| {
                let model = engine.runner.model();
                let pre = model.prefill(
                    &r.w.ids,
                    &r.w.images,
                    r.kv.as_mut(),
                    PrefillOptions::default(),
                )?;
                let logits = pre
                    .logits
                    .ok_or_else(|| {
                        crate::error::RunnerError::BadRequest("prefill returned no logits".into())
                    })?
                    .squeeze(0)?
                    .to_vec1::<f32>()?;
                Ok::<_, crate::error::RunnerError>((logits, pre.positions.next_position))
            }))
        };
        match step {
            Ok(Ok((logits, position))) => {
                self.shared
                    .prompt_tokens
                    .fetch_add(r.w.ids.len() as u64, Ordering::Relaxed);
                r.position = position;
                // Images are not needed past the prompt pass.
                r.w.images = Vec::new();
                self.push_token(r, &logits);
            }
            Ok(Err(e)) => self.failed(r, e.into()),
            Err(panic) => self.failed(r, panicked(panic)),
        }
        true
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
