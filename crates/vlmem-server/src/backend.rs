//! The seam between HTTP and generation.
//!
//! A [`Backend`] prepares a request (tokenizes the prompt, preprocesses the images, checks
//! that it can run) on the caller's blocking thread, then takes it with its generation
//! settings ([`Backend::submit`]) and answers with an [`EventStream`]: a text delta per
//! generated id, then one [`Event::Finish`] with the usage (or one [`Event::Error`]).
//! Dropping the stream cancels the request: a queued one never starts, a running one stops
//! at its next token.
//!
//! [`EngineBackend`] is today's implementation: one worker thread runs the requests one at
//! a time through a [`Generator`] (the [`Engine`]), fed by a bounded queue; a full queue is
//! [`BackendError::QueueFull`] at once. A panic while generating is caught on the worker:
//! that request gets [`BackendError::Internal`] and the worker takes the next. A batching
//! scheduler takes the same place later: it implements [`Backend`] with its own loop.

use crate::text::TextStream;
use crossbeam_channel::{Receiver, Sender, TrySendError};
use std::fmt::Write as _;
use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use vlmem_core::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use vlmem_core::sync::thread::{JoinHandle, spawn_named};
use vlmem_core::sync::{Arc, Mutex};
use vlmem_runner::{
    Engine, EngineError, FinishReason, Message, Prompt, Request, RequestImage, SamplingParams,
};

/// A prompt as a client sends it.
#[derive(Debug, Clone, PartialEq)]
pub enum PromptInput {
    /// A conversation rendered with the checkpoint's chat template (the assistant's reply
    /// opened); its image parts take the request's images in order.
    Chat(Vec<Message>),
    /// Text tokenized as it is, no template (`/v1/completions`).
    Raw(String),
    /// Token ids as they are.
    Ids(Vec<u32>),
}

/// A request before preparation: its prompt and its images, decoded.
#[derive(Debug, Clone)]
pub struct PrepareInput {
    /// The prompt.
    pub prompt: PromptInput,
    /// The images, in prompt order.
    pub images: Vec<image::RgbImage>,
}

/// A request ready to run: its prompt as ids, its images preprocessed.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// The engine's request (prompt as ids, images preprocessed).
    pub request: Request,
    /// The prompt's tokens (image tokens included).
    pub prompt_tokens: usize,
}

/// How a prepared request is generated.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationParams {
    /// Tokens to generate at most (> 0).
    pub max_new_tokens: usize,
    /// How each token is chosen.
    pub sampling: SamplingParams,
    /// Strings that end the reply, cut from it.
    pub stop: Vec<String>,
    /// Ids that end the reply besides the model's own.
    pub stop_ids: Vec<u32>,
}

/// Token counts of a finished request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    /// The prompt's tokens.
    pub prompt_tokens: usize,
    /// Generated tokens.
    pub completion_tokens: usize,
    /// Prompt tokens whose keys and values came from a cache.
    pub cached_tokens: usize,
}

/// How a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Finish {
    /// A stop id or a stop string ([`FinishReason::Stop`]), or the token limit.
    pub reason: FinishReason,
    /// Its token counts.
    pub usage: Usage,
}

/// What a running request reports.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// One generated id and the text it adds (empty while a character or a possible stop
    /// string is incomplete; never a split character).
    Token {
        /// The id.
        id: u32,
        /// New text.
        text: String,
    },
    /// The text the last ids held back, released at the end (may be empty), and how the
    /// request ended. The last event.
    Finish {
        /// Text not yet handed out.
        text: String,
        /// Why it ended, and its usage.
        finish: Finish,
    },
    /// The request failed. The last event.
    Error(BackendError),
}

/// Why a request could not be taken or did not finish.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BackendError {
    /// The request cannot run as asked (a bad prompt or image, sampling out of range).
    #[error("{0}")]
    BadRequest(String),
    /// The prompt and the reply asked for do not fit the context the engine holds.
    #[error("{0}")]
    ContextTooLong(String),
    /// The queue is full.
    #[error("the queue is full ({queued} waiting)")]
    QueueFull {
        /// Requests waiting.
        queued: usize,
    },
    /// The backend no longer takes requests (shutting down), or stopped this one.
    #[error("{0}")]
    Unavailable(String),
    /// The backend failed (a computation, an I/O error, a panic): not the client's fault.
    #[error("{0}")]
    Internal(String),
}

impl From<EngineError> for BackendError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::BadRequest(_) => BackendError::BadRequest(e.to_string()),
            EngineError::OutOfMemory { .. } => BackendError::ContextTooLong(e.to_string()),
            _ => BackendError::Internal(e.to_string()),
        }
    }
}

/// Requests waiting and running.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Load {
    /// Being generated.
    pub running: usize,
    /// Waiting for the engine.
    pub queued: usize,
    /// The most that may wait.
    pub max_queue: usize,
}

/// The events of one request; dropping it cancels the request.
pub struct EventStream {
    rx: mpsc::UnboundedReceiver<Event>,
    /// Called when the stream is dropped (see [`EventStream::on_drop`]).
    on_drop: Option<Box<dyn FnOnce() + Send>>,
}

impl std::fmt::Debug for EventStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventStream")
            .field("rx", &self.rx)
            .field("on_drop", &self.on_drop.is_some())
            .finish()
    }
}

impl Drop for EventStream {
    fn drop(&mut self) {
        if let Some(f) = self.on_drop.take() {
            f();
        }
    }
}

impl EventStream {
    /// A stream and the sender its events go through (for other [`Backend`]s).
    pub fn channel() -> (mpsc::UnboundedSender<Event>, EventStream) {
        let (tx, rx) = mpsc::unbounded_channel();
        (tx, EventStream { rx, on_drop: None })
    }

    /// Calls `f` when the stream is dropped: how a backend takes a request whose client left
    /// out of its queue at once, rather than when the request's first event finds the
    /// stream closed. Called after the last event too, where it must do nothing.
    pub fn on_drop(mut self, f: impl FnOnce() + Send + 'static) -> Self {
        self.on_drop = Some(Box::new(f));
        self
    }

    /// The next event; `None` after the last one.
    pub async fn next(&mut self) -> Option<Event> {
        self.rx.recv().await
    }

    /// The next event if one is ready now.
    pub fn try_next(&mut self) -> Option<Event> {
        self.rx.try_recv().ok()
    }
}

/// What generates replies: see the module documentation.
pub trait Backend: Send + Sync + 'static {
    /// The prompt's ids and the images preprocessed, checked against the model; blocking
    /// (call it on a blocking thread). Errors are the client's ([`BackendError::BadRequest`],
    /// [`BackendError::ContextTooLong`]) or the server's.
    fn prepare(&self, input: PrepareInput) -> Result<Prepared, BackendError>;

    /// Takes a prepared request; its events come on the stream. Never blocks:
    /// [`BackendError::QueueFull`] when the queue is full, [`BackendError::Unavailable`]
    /// after [`Backend::close`].
    fn submit(
        &self,
        prepared: Prepared,
        params: GenerationParams,
    ) -> Result<EventStream, BackendError>;

    /// Requests running and waiting.
    fn load(&self) -> Load;

    /// The sampling a request gets for the fields it does not set (the checkpoint's
    /// generation_config.json).
    fn default_sampling(&self) -> SamplingParams;

    /// The longest context (prompt and reply, tokens) a request may have.
    fn max_context_tokens(&self) -> u64;

    /// Appends the backend's own statistics in Prometheus text format.
    fn write_metrics(&self, out: &mut String);

    /// Takes no more requests; those queued and running go on.
    fn close(&self);

    /// Stops every running request at its next token and drops the queued ones (each gets
    /// [`BackendError::Unavailable`]).
    fn cancel_all(&self);

    /// Waits at most `timeout` for the work to end after [`Backend::close`]; true when it has.
    fn join(&self, timeout: Duration) -> bool;
}

/// What [`EngineBackend`] runs requests on: the [`Engine`], or a wrapper around it.
pub trait Generator: Send + Sync + 'static {
    /// [`Engine::prepare`] and [`Engine::check_request`].
    fn prepare(&self, request: &Request) -> Result<Request, EngineError>;
    /// Text tokenized as it is (no template, no special tokens added).
    fn encode(&self, text: &str) -> Result<Vec<u32>, EngineError>;
    /// [`Engine::generate_until`].
    fn generate(
        &self,
        request: &Request,
        on_token: &mut dyn FnMut(u32) -> bool,
    ) -> Result<Generated, EngineError>;
    /// Ids to text, special tokens dropped.
    fn decode(&self, ids: &[u32]) -> Result<String, EngineError>;
    /// The checkpoint's sampling.
    fn default_sampling(&self) -> SamplingParams;
    /// The longest context the engine was built for.
    fn max_context_tokens(&self) -> u64;
    /// Appends the engine's statistics in Prometheus text format.
    fn write_metrics(&self, out: &mut String);
}

/// What a generation gave.
#[derive(Debug, Clone, PartialEq)]
pub struct Generated {
    /// The prompt's tokens.
    pub prompt_tokens: usize,
    /// The generated ids.
    pub ids: Vec<u32>,
    /// Why it ended (when it was not stopped by `on_token`).
    pub finish_reason: FinishReason,
    /// `on_token` stopped it.
    pub cancelled: bool,
    /// Prompt tokens whose keys and values came from a cache.
    pub cached_tokens: usize,
}

impl Generator for Engine {
    fn prepare(&self, request: &Request) -> Result<Request, EngineError> {
        let prepared = Engine::prepare(self, request)?;
        self.check_request(&prepared)?;
        Ok(prepared)
    }

    fn encode(&self, text: &str) -> Result<Vec<u32>, EngineError> {
        let tokenizer = self.tokenizer().ok_or_else(|| {
            EngineError::BadRequest(format!(
                "{} has no tokenizer.json: prompts must be token ids",
                self.model_dir().display()
            ))
        })?;
        Ok(tokenizer.encode(text)?)
    }

    fn generate(
        &self,
        request: &Request,
        on_token: &mut dyn FnMut(u32) -> bool,
    ) -> Result<Generated, EngineError> {
        let reply = self.generate_until(request, on_token)?;
        Ok(Generated {
            prompt_tokens: reply.prompt_ids.len(),
            ids: reply.ids,
            finish_reason: reply.finish_reason,
            cancelled: reply.cancelled,
            cached_tokens: reply.stats.reused_tokens,
        })
    }

    fn decode(&self, ids: &[u32]) -> Result<String, EngineError> {
        Ok(Engine::decode(self, ids)?.unwrap_or_default())
    }

    fn default_sampling(&self) -> SamplingParams {
        self.generation_config().sampling()
    }

    fn max_context_tokens(&self) -> u64 {
        self.plan().context_tokens
    }

    fn write_metrics(&self, out: &mut String) {
        engine_metrics(self, out);
    }
}

/// The engine's statistics: the manager's (bytes per tier and kind, hits, moves), the KV
/// pool's blocks and the vision cache's hits and misses.
pub fn engine_metrics(engine: &Engine, out: &mut String) {
    out.push_str(&engine.manager().stats().to_prometheus());
    if let Some(pool) = engine.kv_pool() {
        let s = pool.stats();
        for (name, kind, help, value) in [
            (
                "vlmem_kv_pool_sequences",
                "gauge",
                "live KV sequences",
                s.sequences,
            ),
            ("vlmem_kv_pool_blocks", "gauge", "live KV blocks", s.blocks),
            (
                "vlmem_kv_pool_shared_blocks",
                "gauge",
                "KV blocks shared by several sequences",
                s.shared_blocks,
            ),
            (
                "vlmem_kv_pool_resident_blocks",
                "gauge",
                "KV blocks on the compute tier",
                s.resident_blocks,
            ),
            (
                "vlmem_kv_pool_prefix_hit_tokens_total",
                "counter",
                "prompt tokens served from shared blocks",
                s.prefix_hit_tokens,
            ),
            (
                "vlmem_kv_pool_swap_outs_total",
                "counter",
                "whole-sequence swap-outs",
                s.swap_outs,
            ),
            (
                "vlmem_kv_pool_swap_ins_total",
                "counter",
                "whole-sequence swap-ins",
                s.swap_ins,
            ),
        ] {
            let _ = write!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
            );
        }
    }
    if let Some(cache) = engine.vision_cache() {
        let s = cache.stats();
        for (name, kind, help, value) in [
            (
                "vlmem_vision_cache_hits_total",
                "counter",
                "image embeddings served from the cache",
                s.hits,
            ),
            (
                "vlmem_vision_cache_misses_total",
                "counter",
                "image embeddings computed",
                s.misses,
            ),
            (
                "vlmem_vision_cache_inserts_total",
                "counter",
                "image embeddings admitted",
                s.inserts,
            ),
            (
                "vlmem_vision_cache_evictions_total",
                "counter",
                "image embeddings evicted",
                s.evictions,
            ),
            (
                "vlmem_vision_cache_resident_bytes",
                "gauge",
                "bytes the vision cache holds",
                s.resident_bytes,
            ),
        ] {
            let _ = write!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
            );
        }
    }
}

/// One request on its way through [`EngineBackend`].
struct Job {
    request: Request,
    params: GenerationParams,
    events: mpsc::UnboundedSender<Event>,
}

/// What the worker and the front share.
struct Shared<G> {
    generator: Arc<G>,
    running: AtomicUsize,
    /// Raised by [`Backend::cancel_all`]: every request stops at its next token.
    cancel: AtomicBool,
    completed: AtomicU64,
    cancelled: AtomicU64,
    failed: AtomicU64,
    panics: AtomicU64,
}

/// [`Backend::prepare`] on `generator`: the prompt as ids (a chat rendered with the template,
/// raw text tokenized as it is), the images preprocessed, checked for one new token (the
/// reply's length is checked when it is known).
pub(crate) fn prepare_with<G: Generator + ?Sized>(
    generator: &G,
    input: PrepareInput,
) -> Result<Prepared, BackendError> {
    let prompt = match input.prompt {
        PromptInput::Chat(messages) => Prompt::Messages(messages),
        PromptInput::Raw(text) => Prompt::Ids(generator.encode(&text)?),
        PromptInput::Ids(ids) => Prompt::Ids(ids),
    };
    if matches!(&prompt, Prompt::Ids(ids) if ids.is_empty()) {
        return Err(BackendError::BadRequest("the prompt is empty".into()));
    }
    let mut request = Request::new(prompt);
    request.images = input.images.into_iter().map(RequestImage::Rgb).collect();
    // Sized for one new token here; the reply's length is checked when it is known.
    request.max_new_tokens = 1;
    let request = generator.prepare(&request)?;
    let prompt_tokens = match &request.prompt {
        Prompt::Ids(ids) => ids.len(),
        _ => 0,
    };
    Ok(Prepared {
        request,
        prompt_tokens,
    })
}

/// Today's [`Backend`]: see the module documentation.
pub struct EngineBackend<G: Generator> {
    shared: Arc<Shared<G>>,
    /// `None` once closed: the worker ends when the queue is empty.
    queue: Mutex<Option<Sender<Job>>>,
    /// Reads the queue length (and drains it on [`Backend::cancel_all`]).
    queue_rx: Receiver<Job>,
    max_queue: usize,
    worker: Mutex<Option<JoinHandle<()>>>,
}

impl<G: Generator> std::fmt::Debug for EngineBackend<G> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineBackend")
            .field("load", &self.load())
            .finish_non_exhaustive()
    }
}

impl<G: Generator> EngineBackend<G> {
    /// A backend over `generator` whose queue holds at most `max_queue` waiting requests
    /// (0: a request is taken only when the engine is idle); starts the worker thread.
    pub fn new(generator: Arc<G>, max_queue: usize) -> std::io::Result<Self> {
        let (tx, rx) = crossbeam_channel::bounded::<Job>(max_queue);
        let shared = Arc::new(Shared {
            generator,
            running: AtomicUsize::new(0),
            cancel: AtomicBool::new(false),
            completed: AtomicU64::new(0),
            cancelled: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            panics: AtomicU64::new(0),
        });
        let worker = {
            let shared = shared.clone();
            let rx = rx.clone();
            spawn_named("vlmem-engine", move || worker(&shared, &rx))?
        };
        Ok(EngineBackend {
            shared,
            queue: Mutex::new(Some(tx)),
            queue_rx: rx,
            max_queue,
            worker: Mutex::new(Some(worker)),
        })
    }

    /// The generator requests run on.
    pub fn generator(&self) -> &Arc<G> {
        &self.shared.generator
    }
}

impl<G: Generator> Backend for EngineBackend<G> {
    fn prepare(&self, input: PrepareInput) -> Result<Prepared, BackendError> {
        prepare_with(&*self.shared.generator, input)
    }

    fn submit(
        &self,
        prepared: Prepared,
        params: GenerationParams,
    ) -> Result<EventStream, BackendError> {
        let (tx, stream) = EventStream::channel();
        let mut request = prepared.request;
        request.max_new_tokens = params.max_new_tokens;
        request.sampling = Some(params.sampling.clone());
        request.stop_ids = params.stop_ids.clone();
        let job = Job {
            request,
            params,
            events: tx,
        };
        let queue = self.queue.lock();
        let Some(sender) = queue.as_ref() else {
            return Err(BackendError::Unavailable(
                "the server is shutting down".into(),
            ));
        };
        match sender.try_send(job) {
            Ok(()) => Ok(stream),
            Err(TrySendError::Full(_)) => Err(BackendError::QueueFull {
                queued: sender.len(),
            }),
            Err(TrySendError::Disconnected(_)) => Err(BackendError::Unavailable(
                "the engine's worker has stopped".into(),
            )),
        }
    }

    fn load(&self) -> Load {
        Load {
            running: self.shared.running.load(Ordering::SeqCst),
            queued: self.queue_rx.len(),
            max_queue: self.max_queue,
        }
    }

    fn default_sampling(&self) -> SamplingParams {
        self.shared.generator.default_sampling()
    }

    fn max_context_tokens(&self) -> u64 {
        self.shared.generator.max_context_tokens()
    }

    fn write_metrics(&self, out: &mut String) {
        let s = &self.shared;
        for (name, help, value) in [
            (
                "vlmem_server_engine_requests_completed_total",
                "requests the engine finished",
                s.completed.load(Ordering::Relaxed),
            ),
            (
                "vlmem_server_engine_requests_cancelled_total",
                "requests stopped early (client gone, shutdown) or dropped from the queue",
                s.cancelled.load(Ordering::Relaxed),
            ),
            (
                "vlmem_server_engine_requests_failed_total",
                "requests that failed in the engine",
                s.failed.load(Ordering::Relaxed),
            ),
            (
                "vlmem_server_engine_panics_total",
                "panics caught on the engine's worker",
                s.panics.load(Ordering::Relaxed),
            ),
        ] {
            let _ = write!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}\n"
            );
        }
        s.generator.write_metrics(out);
    }

    fn close(&self) {
        self.queue.lock().take();
    }

    fn cancel_all(&self) {
        self.shared.cancel.store(true, Ordering::SeqCst);
        while let Ok(job) = self.queue_rx.try_recv() {
            self.shared.cancelled.fetch_add(1, Ordering::Relaxed);
            let _ = job.events.send(Event::Error(BackendError::Unavailable(
                "the server is shutting down".into(),
            )));
        }
    }

    fn join(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let finished = self
                .worker
                .lock()
                .as_ref()
                .is_none_or(JoinHandle::is_finished);
            if finished {
                if let Some(handle) = self.worker.lock().take() {
                    let _ = handle.join();
                }
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// The worker: each job in turn until the queue is closed and empty.
fn worker<G: Generator>(shared: &Shared<G>, rx: &Receiver<Job>) {
    while let Ok(job) = rx.recv() {
        if job.events.is_closed() {
            // The client left while it waited.
            shared.cancelled.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        if shared.cancel.load(Ordering::SeqCst) {
            shared.cancelled.fetch_add(1, Ordering::Relaxed);
            let _ = job.events.send(Event::Error(BackendError::Unavailable(
                "the server is shutting down".into(),
            )));
            continue;
        }
        shared.running.fetch_add(1, Ordering::SeqCst);
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| run(shared, &job)));
        shared.running.fetch_sub(1, Ordering::SeqCst);
        let event = match outcome {
            Ok(Outcome::Finished(event)) => {
                shared.completed.fetch_add(1, Ordering::Relaxed);
                event
            }
            Ok(Outcome::Cancelled(event)) => {
                shared.cancelled.fetch_add(1, Ordering::Relaxed);
                event
            }
            Ok(Outcome::Failed(event)) => {
                shared.failed.fetch_add(1, Ordering::Relaxed);
                event
            }
            Err(panic) => {
                shared.panics.fetch_add(1, Ordering::Relaxed);
                shared.failed.fetch_add(1, Ordering::Relaxed);
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a panic".into());
                tracing::error!("the engine panicked on a request: {what}");
                Event::Error(BackendError::Internal(format!(
                    "the engine failed on this request ({what}); the server goes on"
                )))
            }
        };
        let _ = job.events.send(event);
    }
}

/// How one job ended, and its last event.
enum Outcome {
    Finished(Event),
    Cancelled(Event),
    Failed(Event),
}

fn run<G: Generator>(shared: &Shared<G>, job: &Job) -> Outcome {
    let generator = &*shared.generator;
    let mut text = TextStream::new(job.params.stop.clone());
    let mut ids = Vec::new();
    let mut client_gone = false;
    let mut failure = None;
    let result = generator.generate(&job.request, &mut |id| {
        ids.push(id);
        let step = match text.push(&ids, &mut |window: &[u32]| generator.decode(window)) {
            Ok(step) => step,
            Err(e) => {
                failure = Some(e);
                return false;
            }
        };
        if job
            .events
            .send(Event::Token {
                id,
                text: step.delta,
            })
            .is_err()
        {
            client_gone = true;
            return false;
        }
        !step.stopped && !shared.cancel.load(Ordering::SeqCst)
    });
    let generated = match (result, failure) {
        (Err(e), _) | (Ok(_), Some(e)) => {
            return Outcome::Failed(Event::Error(e.into()));
        }
        (Ok(g), None) => g,
    };
    if client_gone {
        return Outcome::Cancelled(Event::Error(BackendError::Unavailable(
            "the client went away".into(),
        )));
    }
    let stopped_by_string = text.stopped();
    if generated.cancelled && !stopped_by_string {
        return Outcome::Cancelled(Event::Error(BackendError::Unavailable(
            "the server is shutting down: the request was stopped".into(),
        )));
    }
    let full = match generator.decode(&generated.ids) {
        Ok(t) => t,
        Err(e) => return Outcome::Failed(Event::Error(e.into())),
    };
    let last = text.finish(&full);
    let reason = if stopped_by_string || last.stopped {
        FinishReason::Stop
    } else {
        generated.finish_reason
    };
    Outcome::Finished(Event::Finish {
        text: last.delta,
        finish: Finish {
            reason,
            usage: Usage {
                prompt_tokens: generated.prompt_tokens,
                completion_tokens: generated.ids.len(),
                cached_tokens: generated.cached_tokens,
            },
        },
    })
}
