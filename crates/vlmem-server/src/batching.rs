//! The [`Backend`] with continuous batching: requests go to a
//! [`vlmem_runner::Scheduler`], which decodes every running sequence in one pass over the
//! weights per step and admits a waiting request one prompt pass at a time. Its sink turns
//! each id into a text delta ([`TextStream`], stop strings included) on the scheduler's
//! worker thread and sends it on the request's [`EventStream`]; a closed stream (the client
//! left) or a stop string returns false from the sink, which ends the sequence at once and
//! frees its KV blocks.

use crate::backend::{
    Backend, BackendError, Event, EventStream, Finish, GenerationParams, Load, PrepareInput,
    Prepared, Usage, prepare_with,
};
use crate::text::TextStream;
use std::fmt::Write as _;
use std::time::Duration;
use vlmem_core::sync::Arc;
use vlmem_core::sync::atomic::{AtomicU64, Ordering};
use vlmem_runner::{
    Engine, FinishReason, SamplingParams, Scheduler, SchedulerConfig, SeqEvent, SubmitError,
};

/// Requests ended, by how.
#[derive(Debug, Default)]
struct Counters {
    completed: AtomicU64,
    cancelled: AtomicU64,
    failed: AtomicU64,
}

/// Continuous batching over one engine: see the module documentation.
pub struct SchedulerBackend {
    engine: Arc<Engine>,
    scheduler: Scheduler,
    config: SchedulerConfig,
    counters: Arc<Counters>,
}

impl std::fmt::Debug for SchedulerBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SchedulerBackend")
            .field("config", &self.config)
            .field("load", &self.load())
            .finish_non_exhaustive()
    }
}

impl SchedulerBackend {
    /// Starts the scheduler's worker for `engine`: at most `config.max_seqs` sequences
    /// decoded together and `config.max_queue` waiting.
    pub fn new(engine: Arc<Engine>, config: SchedulerConfig) -> Self {
        let scheduler = Scheduler::start(engine.clone(), config);
        SchedulerBackend {
            engine,
            scheduler,
            config,
            counters: Arc::new(Counters::default()),
        }
    }

    /// The scheduler requests run on.
    pub fn scheduler(&self) -> &Scheduler {
        &self.scheduler
    }
}

/// What a request's sink keeps between events.
struct SinkState {
    engine: Arc<Engine>,
    events: tokio::sync::mpsc::UnboundedSender<Event>,
    text: TextStream,
    ids: Vec<u32>,
    prompt_tokens: usize,
    /// Prompt tokens the scheduler took from the KV pool (prefix sharing).
    cached_tokens: usize,
    /// The last event was sent (a stop string, a failure, the client gone): ignore the rest.
    done: bool,
    counters: Arc<Counters>,
}

impl SinkState {
    fn decode(&self, ids: &[u32]) -> Result<String, BackendError> {
        Ok(self.engine.decode(ids)?.unwrap_or_default())
    }

    /// Ends the request with `event` (its last), counted under `counter`.
    fn end(&mut self, event: Event, counter: fn(&Counters) -> &AtomicU64) {
        self.done = true;
        counter(&self.counters).fetch_add(1, Ordering::Relaxed);
        let _ = self.events.send(event);
    }

    /// Hands out the text so far and the usage: the request ended for `reason`.
    fn finish(&mut self, reason: FinishReason) {
        let last = match self.decode(&self.ids) {
            Ok(full) => self.text.finish(&full),
            Err(e) => return self.end(Event::Error(e), |c| &c.failed),
        };
        let reason = if last.stopped || self.text.stopped() {
            FinishReason::Stop
        } else {
            reason
        };
        let event = Event::Finish {
            text: last.delta,
            finish: Finish {
                reason,
                usage: Usage {
                    prompt_tokens: self.prompt_tokens,
                    completion_tokens: self.ids.len(),
                    cached_tokens: self.cached_tokens,
                },
            },
        };
        self.end(event, |c| &c.completed);
    }

    /// One event from the scheduler; false cancels the request.
    fn on_event(&mut self, event: SeqEvent) -> bool {
        if self.done {
            return false;
        }
        match event {
            SeqEvent::Started { cached_tokens } => {
                self.cached_tokens = cached_tokens;
                true
            }
            SeqEvent::Token(id) => {
                self.ids.push(id);
                let engine = self.engine.clone();
                let step = self.text.push(&self.ids, &mut |window: &[u32]| {
                    engine
                        .decode(window)
                        .map(Option::unwrap_or_default)
                        .map_err(BackendError::from)
                });
                let step = match step {
                    Ok(s) => s,
                    Err(e) => {
                        self.end(Event::Error(e), |c| &c.failed);
                        return false;
                    }
                };
                if self
                    .events
                    .send(Event::Token {
                        id,
                        text: step.delta,
                    })
                    .is_err()
                {
                    // The client went away.
                    self.done = true;
                    self.counters.cancelled.fetch_add(1, Ordering::Relaxed);
                    return false;
                }
                if step.stopped {
                    self.finish(FinishReason::Stop);
                    return false;
                }
                true
            }
            SeqEvent::Finished(f) => {
                if f.cancelled {
                    self.end(
                        Event::Error(BackendError::Unavailable(
                            "the server is shutting down: the request was stopped".into(),
                        )),
                        |c| &c.cancelled,
                    );
                } else {
                    self.finish(f.finish_reason);
                }
                false
            }
            SeqEvent::Failed(e) => {
                self.end(Event::Error(e.into()), |c| &c.failed);
                false
            }
        }
    }
}

impl Backend for SchedulerBackend {
    fn prepare(&self, input: PrepareInput) -> Result<Prepared, BackendError> {
        prepare_with(&*self.engine, input)
    }

    fn submit(
        &self,
        prepared: Prepared,
        params: GenerationParams,
    ) -> Result<EventStream, BackendError> {
        let (tx, stream) = EventStream::channel();
        let mut request = prepared.request;
        request.max_new_tokens = params.max_new_tokens;
        request.sampling = Some(params.sampling);
        request.stop_ids = params.stop_ids;
        let mut state = SinkState {
            engine: self.engine.clone(),
            events: tx,
            text: TextStream::new(params.stop),
            ids: Vec::new(),
            prompt_tokens: prepared.prompt_tokens,
            cached_tokens: 0,
            done: false,
            counters: self.counters.clone(),
        };
        let sink = Box::new(move |e: SeqEvent| state.on_event(e));
        match self.scheduler.submit(&request, sink) {
            // A client that leaves while its request waits takes it out of the queue: it
            // never takes a sequence slot nor runs its prompt pass.
            Ok(ticket) => Ok(stream.on_drop(move || ticket.cancel())),
            Err(SubmitError::Refused(e)) => Err(e.into()),
            Err(SubmitError::QueueFull { queued }) => Err(BackendError::QueueFull { queued }),
            Err(SubmitError::ShuttingDown) => Err(BackendError::Unavailable(
                "the server is shutting down".into(),
            )),
        }
    }

    fn load(&self) -> Load {
        let s = self.scheduler.stats();
        Load {
            running: s.running as usize,
            queued: s.queued as usize,
            max_queue: self.config.max_queue,
        }
    }

    fn default_sampling(&self) -> SamplingParams {
        self.engine.generation_config().sampling()
    }

    fn max_context_tokens(&self) -> u64 {
        self.engine.plan().context_tokens
    }

    fn write_metrics(&self, out: &mut String) {
        let s = self.scheduler.stats();
        let c = &self.counters;
        for (name, kind, help, value) in [
            (
                "vlmem_server_engine_requests_completed_total",
                "counter",
                "requests the engine finished",
                c.completed.load(Ordering::Relaxed),
            ),
            (
                "vlmem_server_engine_requests_cancelled_total",
                "counter",
                "requests stopped early (client gone, shutdown)",
                c.cancelled.load(Ordering::Relaxed),
            ),
            (
                "vlmem_server_engine_requests_failed_total",
                "counter",
                "requests that failed in the engine",
                c.failed.load(Ordering::Relaxed),
            ),
            (
                "vlmem_scheduler_decode_steps_total",
                "counter",
                "batched decode steps",
                s.decode_steps,
            ),
            (
                "vlmem_scheduler_decoded_rows_total",
                "counter",
                "sequences decoded by those steps",
                s.decoded_rows,
            ),
            (
                "vlmem_scheduler_max_batch",
                "gauge",
                "the most sequences one step decoded",
                s.max_batch,
            ),
            (
                "vlmem_scheduler_max_seqs",
                "gauge",
                "sequences decoded together at most",
                self.config.max_seqs as u64,
            ),
            (
                "vlmem_scheduler_prompt_tokens_cached_total",
                "counter",
                "prompt tokens taken from other requests' KV blocks instead of computed",
                s.cached_tokens,
            ),
            (
                "vlmem_scheduler_prefill_chunks_total",
                "counter",
                "prompt pieces run (a long prompt takes several steps)",
                s.prefill_chunks,
            ),
            (
                "vlmem_scheduler_kept_prompts_total",
                "counter",
                "finished requests whose prompt blocks were kept for sharing",
                s.kept_prompts,
            ),
            (
                "vlmem_scheduler_preempted",
                "gauge",
                "sequences set aside now, their KV swapped out for lack of host room",
                s.preempted,
            ),
            (
                "vlmem_scheduler_preemptions_total",
                "counter",
                "times a sequence was set aside for lack of host KV room",
                s.preemptions,
            ),
        ] {
            let _ = write!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
            );
        }
        crate::backend::engine_metrics(&self.engine, out);
    }

    fn close(&self) {
        self.scheduler.close();
    }

    fn cancel_all(&self) {
        self.scheduler.cancel_all();
    }

    fn join(&self, timeout: Duration) -> bool {
        self.scheduler.join(timeout)
    }
}
