//! `vlmem bench serve --stress`: many concurrent clients against a real server on loopback.
//!
//! [`stress`] builds an engine for a checkpoint (by default the repository's tiny fixture:
//! [`default_model`]) and serves it as `vlmem serve` does: continuous batching through
//! [`SchedulerBackend`] ([`StressConfig::max_seqs`] sequences together, a bounded queue of
//! [`StressConfig::max_queue`]) on `127.0.0.1:0`. Then:
//!
//! 1. **Alone.** Each distinct well-formed request (text and image chats, text completions,
//!    greedy) is asked once whole and once streamed by a single client: its reply, the
//!    reference every later answer is held to.
//! 2. **Load.** [`StressConfig::clients`] clients (tokio tasks, each with its own
//!    connections) send requests back to back for [`StressConfig::duration`]: the distinct
//!    requests, streamed or whole; a share ([`StressConfig::cancel_share`]) of long streamed
//!    chats dropped after 0 to 3 events (the connection closed mid-stream); a share
//!    ([`StressConfig::malformed_share`]) of malformed ones: bad JSON, bad base64, bytes that
//!    are no image, a PNG whose header claims 50,000 x 50,000 pixels, a negative
//!    `max_tokens`. Every request has a deadline ([`StressConfig::request_timeout`]) and so
//!    has the whole load. A client refused with 429 or 503 waits the `Retry-After` it was
//!    given, doubled with each refusal in a row (at most 8 s), and goes on.
//! 3. **Checks**, each broken rule a line of [`StressReport::violations`]: every well-formed,
//!    uncancelled request answered 200 with exactly its reply alone (text, finish reason,
//!    token counts; a stream well formed, ending in `[DONE]`); every malformed one its 4xx
//!    with OpenAI's error object; a refusal (429/503) carries `Retry-After` and OpenAI's error
//!    object, and refusals are not the majority; no request timed out and no connection
//!    failed; the process's resident memory grew by less than
//!    [`StressConfig::rss_growth_bound_mib`] after the warm-up
//!    ([`StressConfig::warmup`]); the scheduler batched; a dropped stream stopped its
//!    sequence (the server counted it cancelled, and the tokens generated for dropped
//!    streams stay well under what they asked for); no lock cycle was found (with
//!    `vlmem-core/deadlock-detection`).
//! 4. **After shutdown**: the queue drained, the server stopped within its grace, the
//!    scheduler's worker ended; the scheduler's counters add up (`completed` equals the
//!    requests the server accepted, none running or queued, the server's own counters of
//!    completed, cancelled and failed requests sum to it, none failed, the refusals counted
//!    equal the 429s seen); the KV pool holds no sequence and no block, the manager holds no
//!    KV bytes on any tier, and its audit is clean (no overlap, nothing busy or pinned, no
//!    tensor without a copy, the budget counters equal the recount).
//!
//! [`run`] is the bench form: the fixture for 60 s (10 s with `--quick`), its figures named
//! `stress_*`; `stress_violations` is 0 on a clean run, and each violation is a note.

use crate::{BenchOptions, BenchResult, SuiteReport};
use base64::Engine as _;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use vlmem::Audit;
use vlmem_core::profile::HardwareProfile;
use vlmem_core::sync::atomic::{AtomicBool, Ordering};
use vlmem_core::sync::deadlock::Detector;
use vlmem_core::sync::{Arc, Mutex};
use vlmem_core::{TensorKind, Tier};
use vlmem_runner::{Engine, SchedulerConfig, SchedulerStats};
use vlmem_server::{Backend, SchedulerBackend, Server, ServerConfig};

/// The repository's tiny checkpoint, relative to the repository's root.
pub const FIXTURE: &str = "fixtures/qwen3-vl-tiny";

/// The hardware profile the engine is sized for (the tests' own).
pub const PROFILE: &str = "laptop-i5-10210u-mx250";

/// `max_tokens` of the streams that are dropped mid-way: long enough that a stream that
/// is not stopped when its client leaves shows in the tokens generated.
pub const CANCEL_MAX_TOKENS: u64 = 1000;

/// The tiny checkpoint: the repository's `fixtures/qwen3-vl-tiny`, found from where this
/// crate was built, else from the working folder.
pub fn default_model() -> Result<PathBuf, String> {
    let candidates = [
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../..")
            .join(FIXTURE),
        PathBuf::from(FIXTURE),
    ];
    candidates
        .iter()
        .find(|p| p.join("config.json").is_file() && p.join("tokenizer.json").is_file())
        .map(|p| p.canonicalize().unwrap_or_else(|_| p.clone()))
        .ok_or_else(|| {
            format!(
                "the serve stress needs the repository's {FIXTURE} (looked in {} and in the working folder): run it from a clone of the repository",
                candidates[0].display()
            )
        })
}

/// How a stress runs.
#[derive(Debug, Clone, PartialEq)]
pub struct StressConfig {
    /// Clients sending requests at once.
    pub clients: usize,
    /// How long clients start new requests (the ones started finish after).
    pub duration: Duration,
    /// The first part of the load, after which resident memory may grow by
    /// [`StressConfig::rss_growth_bound_mib`] at most.
    pub warmup: Duration,
    /// The share of requests that are streams dropped mid-way.
    pub cancel_share: f64,
    /// The share of requests that are malformed.
    pub malformed_share: f64,
    /// Seeds each client's choice of requests.
    pub seed: u64,
    /// Sequences decoded together (the scheduler's `max_seqs`).
    pub max_seqs: usize,
    /// Requests waiting for the engine at most (the scheduler's `max_queue`); more are
    /// refused with 429.
    pub max_queue: usize,
    /// The longest a request may take, from sending it to its last byte: longer is a hang.
    pub request_timeout: Duration,
    /// How much resident memory may grow after the warm-up, in MiB.
    pub rss_growth_bound_mib: f64,
    /// Worker threads of the runtime the server and the clients share.
    pub runtime_threads: usize,
}

impl Default for StressConfig {
    /// 64 clients for 30 s (8 of warm-up), 10% dropped streams, 5% malformed, 8
    /// sequences and 48 waiting (so that up to 8 clients find the queue full), 120 s per
    /// request, 64 MiB of growth.
    fn default() -> Self {
        StressConfig {
            clients: 64,
            duration: Duration::from_secs(30),
            warmup: Duration::from_secs(8),
            cancel_share: 0.10,
            malformed_share: 0.05,
            seed: 0x5eed_cafe,
            max_seqs: 8,
            max_queue: 48,
            request_timeout: Duration::from_secs(120),
            rss_growth_bound_mib: 64.0,
            runtime_threads: 4,
        }
    }
}

/// What kind of request a client sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// A text chat.
    Text,
    /// A chat with an image (a PNG as a data URL).
    Image,
    /// A text completion (`/v1/completions`).
    Completion,
    /// A long streamed chat dropped after a few events.
    Cancel,
    /// A body that is not JSON.
    BadJson,
    /// An image data URL whose base64 is not.
    BadBase64,
    /// An image data URL of bytes that are no image.
    NotAnImage,
    /// A PNG whose header claims 50,000 x 50,000 pixels.
    HugeImage,
    /// `max_tokens` below 1.
    NegativeMaxTokens,
}

impl Kind {
    /// The malformed kinds, in the order clients draw them.
    pub const MALFORMED: [Kind; 5] = [
        Kind::BadJson,
        Kind::BadBase64,
        Kind::NotAnImage,
        Kind::HugeImage,
        Kind::NegativeMaxTokens,
    ];

    /// Its name in reports.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Text => "text",
            Kind::Image => "image",
            Kind::Completion => "completion",
            Kind::Cancel => "cancel",
            Kind::BadJson => "bad_json",
            Kind::BadBase64 => "bad_base64",
            Kind::NotAnImage => "not_an_image",
            Kind::HugeImage => "huge_image",
            Kind::NegativeMaxTokens => "negative_max_tokens",
        }
    }

    /// Whether it is malformed.
    pub fn is_malformed(self) -> bool {
        Self::MALFORMED.contains(&self)
    }

    /// The status a malformed request must get.
    fn refusal_status(self) -> Option<u16> {
        match self {
            Kind::HugeImage => Some(413),
            k if k.is_malformed() => Some(400),
            _ => None,
        }
    }
}

/// How one request ended, as the client saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Outcome {
    /// Well-formed: 200 with exactly its reply alone.
    Ok,
    /// Well-formed: 200 with another reply than alone.
    Mismatch,
    /// 429 or 503 with `Retry-After` and OpenAI's error object (legal under pressure).
    Rejected,
    /// Malformed: its 4xx with OpenAI's error object.
    Refused,
    /// A stream dropped after a few events, as planned.
    Cancelled,
    /// A stream meant to be dropped ended first.
    EndedBeforeCancel,
    /// Anything else: an unexpected status, a malformed answer or stream, an error event.
    WrongAnswer,
    /// No answer within [`StressConfig::request_timeout`]: a hang.
    Timeout,
    /// The connection failed.
    Transport,
}

impl Outcome {
    /// Its name in reports.
    pub fn name(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Mismatch => "mismatch",
            Outcome::Rejected => "rejected",
            Outcome::Refused => "refused",
            Outcome::Cancelled => "cancelled",
            Outcome::EndedBeforeCancel => "ended_before_cancel",
            Outcome::WrongAnswer => "wrong_answer",
            Outcome::Timeout => "timeout",
            Outcome::Transport => "transport_error",
        }
    }
}

/// The server's own counters, read from `/metrics` when the load had drained and from the
/// backend after shutdown.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ServerCounters {
    /// Requests the engine finished (`vlmem_server_engine_requests_completed_total`).
    pub completed: u64,
    /// Requests stopped early: a client gone (`..._cancelled_total`).
    pub cancelled: u64,
    /// Requests that failed in the engine (`..._failed_total`).
    pub failed: u64,
    /// Requests refused with 429 (`vlmem_server_requests_rejected_total`).
    pub rejected: u64,
    /// Responses ended before their last event (`vlmem_server_disconnects_total`).
    pub disconnects: u64,
}

/// What a stress found.
#[derive(Debug, Clone)]
pub struct StressReport {
    /// The checkpoint served.
    pub model: PathBuf,
    /// How it ran.
    pub config: StressConfig,
    /// Distinct well-formed requests (each asked alone first).
    pub distinct_requests: usize,
    /// Requests of the load by kind and outcome.
    pub outcomes: BTreeMap<(Kind, Outcome), u64>,
    /// Requests of the load in all.
    pub requests: u64,
    /// Requests the server accepted (a 200 from a generation endpoint), the alone phase's
    /// included.
    pub accepted: u64,
    /// Well-formed requests whose reply differed from their reply alone (must be 0).
    pub mismatches: u64,
    /// Requests with an illegal answer (must be 0).
    pub wrong_answers: u64,
    /// Requests refused with 429 or 503.
    pub rejected: u64,
    /// Of those, the 429s (the queue full).
    pub rejected_429: u64,
    /// Requests that timed out, and clients that did not end within the load's bound (must
    /// be 0).
    pub hung: u64,
    /// Connections that failed (must be 0).
    pub transport_errors: u64,
    /// Up to 20 descriptions of mismatches and illegal answers.
    pub examples: Vec<String>,
    /// Median time of the well-formed requests answered as alone, from sending to the last
    /// byte.
    pub latency_p50: Duration,
    /// Their 99th percentile.
    pub latency_p99: Duration,
    /// Their generated tokens.
    pub completion_tokens: u64,
    /// From the first request of the load to the end of the last one.
    pub load_time: Duration,
    /// `completion_tokens` over `load_time`.
    pub tokens_per_s: f64,
    /// The highest resident memory sampled (VmRSS, bytes; 0 where it cannot be read).
    pub peak_rss_bytes: u64,
    /// The highest resident memory of each 5 s of the load (from its start), bytes: a leak
    /// climbs to the end, fragmentation levels off.
    pub rss_timeline: Vec<u64>,
    /// The highest resident memory during the warm-up.
    pub warmup_rss_bytes: u64,
    /// The highest resident memory after the warm-up less [`StressReport::warmup_rss_bytes`]
    /// (0 when lower).
    pub rss_growth_bytes: u64,
    /// The scheduler's counters after shutdown.
    pub scheduler: SchedulerStats,
    /// The server's counters.
    pub server: ServerCounters,
    /// Tokens the load's answered requests reported (every one but the dropped streams).
    pub answered_tokens: u64,
    /// Tokens generated for streams dropped mid-way (all generated tokens less those of
    /// the answered requests).
    pub cancel_generated_tokens: u64,
    /// KV sequences and blocks left in the pool after shutdown (must be 0).
    pub kv_left: (u64, u64),
    /// KV bytes the manager holds on any tier after shutdown (must be 0).
    pub kv_bytes_left: u64,
    /// The manager's audit after shutdown.
    pub audit: Audit,
    /// Lock cycles found while it ran (0; always 0 without `deadlock-detection`).
    pub deadlocks: u64,
    /// Every broken rule, one line each (empty on a clean run).
    pub violations: Vec<String>,
}

impl StressReport {
    /// Requests of `kind` that ended as `outcome`.
    pub fn count(&self, kind: Kind, outcome: Outcome) -> u64 {
        self.outcomes.get(&(kind, outcome)).copied().unwrap_or(0)
    }

    /// Requests that ended as `outcome`, of any kind.
    pub fn count_outcome(&self, outcome: Outcome) -> u64 {
        self.outcomes
            .iter()
            .filter(|((_, o), _)| *o == outcome)
            .map(|(_, n)| n)
            .sum()
    }

    /// Requests of `kind`, however they ended.
    pub fn count_kind(&self, kind: Kind) -> u64 {
        self.outcomes
            .iter()
            .filter(|((k, _), _)| *k == kind)
            .map(|(_, n)| n)
            .sum()
    }

    /// A table of the requests by kind and outcome, then the figures.
    pub fn summary(&self) -> String {
        let mut out = format!(
            "{} requests in {:.1} s by {} clients ({} distinct well-formed)\n",
            self.requests,
            self.load_time.as_secs_f64(),
            self.config.clients,
            self.distinct_requests
        );
        for ((k, o), n) in &self.outcomes {
            out.push_str(&format!("  {:20} {:20} {n}\n", k.name(), o.name()));
        }
        let timeline: Vec<String> = self
            .rss_timeline
            .iter()
            .map(|&b| format!("{:.0}", mib(b)))
            .collect();
        out.push_str(&format!("resident MiB per 5 s: {}\n", timeline.join(" ")));
        out.push_str(&format!(
            "latency p50 {:.3} s p99 {:.3} s; {:.1} tokens/s; peak RSS {:.1} MiB, growth {:.1} MiB after warm-up; scheduler {:?}; server {:?}; tokens for dropped streams {}\n",
            self.latency_p50.as_secs_f64(),
            self.latency_p99.as_secs_f64(),
            self.tokens_per_s,
            mib(self.peak_rss_bytes),
            mib(self.rss_growth_bytes),
            self.scheduler,
            self.server,
            self.cancel_generated_tokens,
        ));
        for v in &self.violations {
            out.push_str(&format!("VIOLATION: {v}\n"));
        }
        for e in &self.examples {
            out.push_str(&format!("example: {e}\n"));
        }
        out
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// A reply as the client compares it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Reply {
    text: String,
    finish_reason: String,
    prompt_tokens: u64,
    completion_tokens: u64,
    total_tokens: u64,
}

/// One distinct well-formed request and its reply alone.
#[derive(Debug, Clone)]
struct Distinct {
    kind: Kind,
    body: Value,
    alone: Option<Reply>,
}

/// Everything the clients share.
struct Ctx {
    base: String,
    config: StressConfig,
    distinct: Vec<Distinct>,
    /// The bodies of the dropped streams (a text chat, an image chat).
    cancel_bodies: [String; 2],
    /// A body per malformed kind, in [`Kind::MALFORMED`] order.
    malformed_bodies: Vec<String>,
}

impl Ctx {
    fn url(&self, kind: Kind) -> String {
        match kind {
            Kind::Completion => format!("{}/v1/completions", self.base),
            _ => format!("{}/v1/chat/completions", self.base),
        }
    }
}

/// One request's end.
#[derive(Debug)]
struct Record {
    kind: Kind,
    outcome: Outcome,
    /// The server answered 200 from a generation endpoint (the request reached the
    /// scheduler).
    accepted: bool,
    /// For [`Outcome::Ok`]: sending to the last byte.
    latency: Option<Duration>,
    /// Generated tokens the answer reported (an answered request's usage).
    completion_tokens: u64,
    /// A 429 or 503: its status and wait.
    retry_after: Option<(u16, Duration)>,
    /// What was wrong.
    detail: Option<String>,
}

impl Record {
    fn new(kind: Kind, outcome: Outcome) -> Self {
        Record {
            kind,
            outcome,
            accepted: false,
            latency: None,
            completion_tokens: 0,
            retry_after: None,
            detail: None,
        }
    }

    fn wrong(kind: Kind, detail: String) -> Self {
        Record {
            detail: Some(detail),
            ..Record::new(kind, Outcome::WrongAnswer)
        }
    }

    fn failed(kind: Kind, e: &reqwest::Error) -> Self {
        let mut what = e.to_string();
        let mut source = std::error::Error::source(e);
        while let Some(s) = source {
            what.push_str(&format!(": {s}"));
            source = s.source();
        }
        let (outcome, what) = if e.is_timeout() {
            (Outcome::Timeout, format!("timed out ({what})"))
        } else {
            (Outcome::Transport, what)
        };
        Record {
            detail: Some(format!("{}: {what}", kind.name())),
            ..Record::new(kind, outcome)
        }
    }
}

/// The bench: the tiny fixture under 64 clients for 60 s (10 s with `quick`).
pub fn run(opts: BenchOptions) -> Result<SuiteReport, String> {
    run_with_model(&default_model()?, opts)
}

/// [`run`] on another checkpoint (a folder with a tokenizer; image chats need its vision
/// tower).
pub fn run_with_model(model: &Path, opts: BenchOptions) -> Result<SuiteReport, String> {
    let config = if opts.quick {
        StressConfig {
            duration: Duration::from_secs(10),
            warmup: Duration::from_secs(4),
            ..StressConfig::default()
        }
    } else {
        StressConfig {
            duration: Duration::from_secs(60),
            warmup: Duration::from_secs(15),
            ..StressConfig::default()
        }
    };
    let r = stress(model, &config)?;
    Ok(suite_report(&r))
}

/// The figures of a stress.
pub fn suite_report(r: &StressReport) -> SuiteReport {
    let mut results = Vec::new();
    let mut push = |name: &str, value: f64, unit: &str| {
        results.push(BenchResult::new(name, value, unit));
    };
    let c = &r.config;
    push("stress_clients", c.clients as f64, "clients");
    push("stress_duration_s", c.duration.as_secs_f64(), "s");
    push("stress_requests", r.requests as f64, "requests");
    push("stress_ok", r.count_outcome(Outcome::Ok) as f64, "requests");
    push(
        "stress_cancelled",
        r.count_outcome(Outcome::Cancelled) as f64,
        "requests",
    );
    push(
        "stress_malformed",
        Kind::MALFORMED
            .iter()
            .map(|&k| r.count_kind(k))
            .sum::<u64>() as f64,
        "requests",
    );
    push(
        "stress_malformed_refused",
        r.count_outcome(Outcome::Refused) as f64,
        "requests",
    );
    push("stress_rejected", r.rejected as f64, "requests");
    push("stress_mismatches", r.mismatches as f64, "requests");
    push("stress_wrong_answers", r.wrong_answers as f64, "requests");
    push("stress_hung", r.hung as f64, "requests");
    push(
        "stress_transport_errors",
        r.transport_errors as f64,
        "requests",
    );
    push("stress_latency_p50_s", r.latency_p50.as_secs_f64(), "s");
    push("stress_latency_p99_s", r.latency_p99.as_secs_f64(), "s");
    push("stress_tokens_per_s", r.tokens_per_s, "tokens/s");
    push("stress_peak_rss_mib", mib(r.peak_rss_bytes), "MiB");
    push("stress_rss_growth_mib", mib(r.rss_growth_bytes), "MiB");
    push(
        "stress_max_batch",
        r.scheduler.max_batch as f64,
        "sequences",
    );
    push(
        "stress_mean_batch",
        r.scheduler.decoded_rows as f64 / r.scheduler.decode_steps.max(1) as f64,
        "sequences",
    );
    push(
        "stress_cancel_tokens_per_stream",
        r.cancel_generated_tokens as f64 / r.count_outcome(Outcome::Cancelled).max(1) as f64,
        "tokens",
    );
    push("stress_kv_sequences_left", r.kv_left.0 as f64, "sequences");
    push("stress_kv_blocks_left", r.kv_left.1 as f64, "blocks");
    push("stress_deadlocks", r.deadlocks as f64, "cycles");
    push("stress_violations", r.violations.len() as f64, "rules");
    for ((k, o), n) in &r.outcomes {
        push(
            &format!("stress_requests_{}_{}", k.name(), o.name()),
            *n as f64,
            "requests",
        );
    }
    let mut notes = vec![format!(
        "{} on 127.0.0.1 (SchedulerBackend: max_seqs {}, max_queue {}); {} clients for {:.0} s, {:.0}% dropped streams, {:.0}% malformed; profile {PROFILE}; RSS growth bound {} MiB after {:.0} s of warm-up",
        r.model.display(),
        c.max_seqs,
        c.max_queue,
        c.clients,
        c.duration.as_secs_f64(),
        c.cancel_share * 100.0,
        c.malformed_share * 100.0,
        c.rss_growth_bound_mib,
        c.warmup.as_secs_f64(),
    )];
    notes.push(format!(
        "resident MiB, the highest of each 5 s of the load: {}",
        r.rss_timeline
            .iter()
            .map(|&b| format!("{:.0}", mib(b)))
            .collect::<Vec<_>>()
            .join(" ")
    ));
    notes.extend(r.violations.iter().map(|v| format!("VIOLATION: {v}")));
    notes.extend(r.examples.iter().map(|e| format!("example: {e}")));
    SuiteReport {
        suite: "serve-stress".into(),
        results,
        notes,
    }
}

/// Builds the engine for `model`, serves it on loopback and runs the load of `config`:
/// see the module documentation. An error when it cannot start (no checkpoint, no port,
/// a request alone refused); what the load broke is in [`StressReport::violations`].
pub fn stress(model: &Path, config: &StressConfig) -> Result<StressReport, String> {
    let loaded = load_engine(model)?;
    let engine = loaded.engine.clone();
    let backend = Arc::new(SchedulerBackend::new(
        engine.clone(),
        SchedulerConfig {
            max_seqs: config.max_seqs,
            max_queue: config.max_queue,
            ..SchedulerConfig::default()
        },
    ));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.runtime_threads.max(1))
        .thread_name("vlmem-stress")
        .enable_all()
        .build()
        .map_err(|e| format!("a runtime: {e}"))?;
    let detector = Detector::start(Duration::from_millis(500));
    let result = runtime.block_on(drive(model, config, &backend));
    let deadlocks = detector.finish();
    runtime.shutdown_timeout(Duration::from_secs(5));
    let mut report = result?;
    report.deadlocks = deadlocks;
    if deadlocks > 0 {
        report
            .violations
            .push(format!("{deadlocks} lock cycle(s) found while it ran"));
    }
    // The engine after shutdown: nothing of any request is left.
    check_engine(&engine, &mut report);
    drop(backend);
    drop(loaded);
    Ok(report)
}

/// An engine for a checkpoint, its swap in a temporary folder that lives as long.
#[derive(Debug)]
pub struct LoadedEngine {
    /// The engine.
    pub engine: Arc<Engine>,
    _swap: tempfile::TempDir,
}

/// Builds the engine for `model` as the server's tests do: the [`PROFILE`] budgets, the swap
/// in a temporary folder.
pub fn load_engine(model: &Path) -> Result<LoadedEngine, String> {
    let swap = tempfile::tempdir().map_err(|e| format!("a swap folder: {e}"))?;
    let profile = HardwareProfile::resolve(PROFILE).map_err(|e| e.to_string())?;
    let engine = Engine::builder(model)
        .profile(profile)
        .disk_path(swap.path())
        .build()
        .map_err(|e| format!("{}: {e}", model.display()))?;
    if engine.tokenizer().is_none() {
        return Err(format!("{}: no tokenizer.json", model.display()));
    }
    Ok(LoadedEngine {
        engine: Arc::new(engine),
        _swap: swap,
    })
}

/// A server on `127.0.0.1:0` over a [`SchedulerBackend`], as `vlmem serve` runs it, until
/// [`Loopback::stop`] (or dropped: then it is told to stop and not waited for).
#[derive(Debug)]
pub struct Loopback {
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    /// The served model's id (the checkpoint folder's name).
    pub model_id: String,
    /// What it serves.
    pub backend: Arc<SchedulerBackend>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), String>>>,
}

impl Loopback {
    /// Binds, serves `backend` (a 10 s shutdown grace) and returns once `/health` answers
    /// 200. Call it on a multi-threaded tokio runtime.
    pub async fn start(model: &Path, backend: Arc<SchedulerBackend>) -> Result<Self, String> {
        Self::start_with_grace(model, backend, Duration::from_secs(10)).await
    }

    /// [`Loopback::start`] with another shutdown grace: how long running requests may go on
    /// after the signal before they are stopped.
    pub async fn start_with_grace(
        model: &Path,
        backend: Arc<SchedulerBackend>,
        grace: Duration,
    ) -> Result<Self, String> {
        let mut config = ServerConfig::for_model(model);
        config.shutdown_grace = grace;
        let model_id = config.model_id.clone();
        let server = Server::bind("127.0.0.1:0".parse().expect("an address"), config)
            .await
            .map_err(|e| format!("binding 127.0.0.1:0: {e}"))?;
        let url = format!("http://{}", server.local_addr());
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let served: Arc<dyn Backend> = backend.clone();
        let task = tokio::spawn(async move {
            let shutdown = async move {
                let _ = stop_rx.await;
            };
            server
                .run(move || Ok::<_, String>(served), |_| {}, shutdown)
                .await
                .map_err(|e| e.to_string())
        });
        let server = Loopback {
            url,
            model_id,
            backend,
            stop: Some(stop_tx),
            task: Some(task),
        };
        let probe = http_client(Duration::from_secs(10));
        let ready = async {
            loop {
                if let Ok(r) = probe.get(format!("{}/health", server.url)).send().await
                    && r.status() == 200
                {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(60), ready)
            .await
            .map_err(|_| "the server did not become ready within 60 s".to_string())?;
        Ok(server)
    }

    /// `GET /metrics`.
    pub async fn metrics(&self) -> Result<String, String> {
        let r = http_client(Duration::from_secs(30))
            .get(format!("{}/metrics", self.url))
            .send()
            .await
            .map_err(|e| e.to_string())?;
        r.text().await.map_err(|e| e.to_string())
    }

    /// Stops it as SIGTERM stops `vlmem serve` and waits: the server within 30 s, then the
    /// scheduler's worker within 30 s. What went wrong, one line each.
    pub async fn stop(mut self) -> Vec<String> {
        let mut problems = Vec::new();
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(mut task) = self.task.take() {
            match tokio::time::timeout(Duration::from_secs(30), &mut task).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => problems.push(format!("the server stopped with an error: {e}")),
                Ok(Err(e)) => problems.push(format!("the server's task failed: {e}")),
                Err(_) => {
                    task.abort();
                    problems.push("the server did not stop within 30 s of the signal".into());
                }
            }
        }
        let b = self.backend.clone();
        let joined = tokio::task::spawn_blocking(move || b.join(Duration::from_secs(30)))
            .await
            .unwrap_or(false);
        if !joined {
            problems.push("the scheduler's worker did not end within 30 s of shutdown".into());
        }
        problems
    }
}

impl Drop for Loopback {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// The load and the server, on the runtime.
async fn drive(
    model: &Path,
    config: &StressConfig,
    backend: &Arc<SchedulerBackend>,
) -> Result<StressReport, String> {
    let server = Loopback::start(model, backend.clone()).await?;
    let base = server.url.clone();
    let model_id = server.model_id.clone();
    let mut violations = Vec::new();

    // Alone: each distinct request, whole then streamed, one at a time.
    let images = [fixture_image_url(model)?, generated_image_url()?];
    let mut distinct = distinct_requests(&model_id, &images);
    let alone_client = http_client(config.request_timeout);
    let mut accepted = 0u64;
    let mut alone_tokens = 0u64;
    for d in &mut distinct {
        let url = match d.kind {
            Kind::Completion => format!("{base}/v1/completions"),
            _ => format!("{base}/v1/chat/completions"),
        };
        let whole = alone_reply(&alone_client, &url, d.kind, &d.body, false).await?;
        let streamed = alone_reply(&alone_client, &url, d.kind, &d.body, true).await?;
        accepted += 2;
        alone_tokens += whole.completion_tokens + streamed.completion_tokens;
        if streamed != whole {
            violations.push(format!(
                "alone, a {} request streamed answered {streamed:?}, whole {whole:?}: {}",
                d.kind.name(),
                d.body
            ));
        }
        d.alone = Some(whole);
    }
    let cancel_bodies = [
        chat_body(
            &model_id,
            json!("Tell me a very long story about the sea."),
            CANCEL_MAX_TOKENS,
            true,
        )
        .to_string(),
        chat_body(
            &model_id,
            json!([
                {"type": "image_url", "image_url": {"url": images[0]}},
                {"type": "text", "text": "Describe every detail of this image."}
            ]),
            CANCEL_MAX_TOKENS,
            true,
        )
        .to_string(),
    ];
    let ctx = Arc::new(Ctx {
        base: base.clone(),
        config: config.clone(),
        distinct,
        cancel_bodies,
        malformed_bodies: malformed_bodies(&model_id),
    });

    // The load.
    let rss = RssSampler::start();
    let started = Instant::now();
    let deadline = started + config.duration;
    let mut clients = tokio::task::JoinSet::new();
    for i in 0..config.clients {
        clients.spawn(client_loop(ctx.clone(), i, deadline));
    }
    let bound = config.duration + config.request_timeout + Duration::from_secs(30);
    let mut records = Vec::new();
    let mut unfinished = 0u64;
    let all = async {
        while let Some(done) = clients.join_next().await {
            match done {
                Ok(r) => records.extend(r),
                Err(e) => violations.push(format!("a client task failed: {e}")),
            }
        }
    };
    if tokio::time::timeout_at((started + bound).into(), all)
        .await
        .is_err()
    {
        unfinished = clients.len() as u64;
        violations.push(format!(
            "{unfinished} client(s) still waiting {:.0} s after the load began (the bound): a hang",
            bound.as_secs_f64()
        ));
        clients.abort_all();
    }
    let load_time = started.elapsed();

    // The queue drains: dropped streams end at their next token.
    let drain_started = Instant::now();
    loop {
        let load = backend.load();
        if load.running == 0 && load.queued == 0 {
            break;
        }
        if drain_started.elapsed() > Duration::from_secs(60) {
            violations.push(format!(
                "60 s after the last client ended, {} request(s) still run and {} wait",
                load.running, load.queued
            ));
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let samples = rss.finish();
    let metrics_text = match server.metrics().await {
        Ok(t) => t,
        Err(e) => {
            violations.push(format!("GET /metrics failed after the load: {e}"));
            String::new()
        }
    };
    for gauge in [
        "vlmem_server_requests_running",
        "vlmem_server_requests_queued",
    ] {
        match metric(&metrics_text, gauge) {
            Some(0.0) => {}
            other => violations.push(format!("after the load, /metrics says {gauge} {other:?}")),
        }
    }

    // Shutdown.
    violations.extend(server.stop().await);

    let mut report = tally(
        model,
        config,
        ctx.distinct.len(),
        records,
        load_time,
        unfinished,
    );
    report.accepted += accepted;
    report.violations.splice(0..0, violations);
    rss_figures(&mut report, &samples, config);
    let after = backend.scheduler().stats();
    report.scheduler = after;
    let mut engine_text = String::new();
    backend.write_metrics(&mut engine_text);
    report.server = ServerCounters {
        completed: metric_u64(&engine_text, "vlmem_server_engine_requests_completed_total"),
        cancelled: metric_u64(&engine_text, "vlmem_server_engine_requests_cancelled_total"),
        failed: metric_u64(&engine_text, "vlmem_server_engine_requests_failed_total"),
        rejected: metric_u64(&metrics_text, "vlmem_server_requests_rejected_total"),
        disconnects: metric_u64(&metrics_text, "vlmem_server_disconnects_total"),
    };
    let answered_tokens = alone_tokens + report.answered_tokens;
    report.cancel_generated_tokens = after.generated_tokens.saturating_sub(answered_tokens);
    check_counters(&mut report);
    Ok(report)
}

/// A client: requests back to back until `deadline`.
async fn client_loop(ctx: Arc<Ctx>, index: usize, deadline: Instant) -> Vec<Record> {
    let mut rng = StdRng::seed_from_u64(
        ctx.config
            .seed
            .wrapping_add((index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)),
    );
    let http = http_client(ctx.config.request_timeout);
    let mut out = Vec::new();
    // Malformed kinds in turn (each client from its own), so that every kind is sent.
    let mut next_malformed = index;
    // Refusals in a row: the wait doubles with each, as OpenAI's clients back off.
    let mut refused_in_a_row = 0u32;
    while Instant::now() < deadline {
        let plan = Plan::draw(&ctx, &mut rng, &mut next_malformed);
        let kind = plan.kind(&ctx);
        // reqwest's timeout covers the body too; this one covers everything else.
        let bound = ctx.config.request_timeout + Duration::from_secs(5);
        let record = match tokio::time::timeout(bound, one_request(&ctx, &http, plan)).await {
            Ok(r) => r,
            Err(_) => Record {
                detail: Some(format!("{}: no answer within {bound:?}", kind.name())),
                ..Record::new(kind, Outcome::Timeout)
            },
        };
        if let Some((_, wait)) = record.retry_after {
            refused_in_a_row += 1;
            let backoff = wait.max(Duration::from_millis(500)) * (1 << refused_in_a_row.min(4)) / 2;
            tokio::time::sleep(backoff.min(Duration::from_secs(8))).await;
        } else {
            refused_in_a_row = 0;
        }
        out.push(record);
    }
    out
}

/// What a client sends next.
enum Plan {
    WellFormed { index: usize, stream: bool },
    Cancel { image: bool, after_events: usize },
    Malformed(usize),
}

impl Plan {
    fn draw(ctx: &Ctx, rng: &mut StdRng, next_malformed: &mut usize) -> Plan {
        let u: f64 = rng.gen_range(0.0..1.0);
        let c = &ctx.config;
        if u < c.malformed_share {
            *next_malformed += 1;
            Plan::Malformed(*next_malformed % Kind::MALFORMED.len())
        } else if u < c.malformed_share + c.cancel_share {
            Plan::Cancel {
                image: rng.gen_bool(0.5),
                after_events: rng.gen_range(0..=3),
            }
        } else {
            Plan::WellFormed {
                index: rng.gen_range(0..ctx.distinct.len()),
                stream: rng.gen_bool(0.5),
            }
        }
    }

    fn kind(&self, ctx: &Ctx) -> Kind {
        match self {
            Plan::WellFormed { index, .. } => ctx.distinct[*index].kind,
            Plan::Cancel { .. } => Kind::Cancel,
            Plan::Malformed(i) => Kind::MALFORMED[*i],
        }
    }
}

async fn one_request(ctx: &Ctx, http: &reqwest::Client, plan: Plan) -> Record {
    match plan {
        Plan::WellFormed { index, stream } => well_formed(ctx, http, index, stream).await,
        Plan::Cancel {
            image,
            after_events,
        } => cancelled(ctx, http, image, after_events).await,
        Plan::Malformed(i) => malformed(ctx, http, Kind::MALFORMED[i]).await,
    }
}

fn post(http: &reqwest::Client, url: &str, body: String) -> reqwest::RequestBuilder {
    http.post(url)
        .header("content-type", "application/json")
        .body(body)
}

/// A 429 or 503: legal with `Retry-After` and OpenAI's error object.
async fn rejection(kind: Kind, response: reqwest::Response) -> Record {
    let status = response.status().as_u16();
    let retry = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let body = match response.text().await {
        Ok(t) => t,
        Err(e) => return Record::failed(kind, &e),
    };
    let Some(retry) = retry else {
        return Record::wrong(kind, format!("{status} without Retry-After: {body}"));
    };
    if let Err(e) = error_shape(&body) {
        return Record::wrong(kind, format!("{status}: {e}"));
    }
    Record {
        retry_after: Some((status, Duration::from_secs(retry))),
        ..Record::new(kind, Outcome::Rejected)
    }
}

async fn well_formed(ctx: &Ctx, http: &reqwest::Client, index: usize, stream: bool) -> Record {
    let d = &ctx.distinct[index];
    let kind = d.kind;
    let mut body = d.body.clone();
    if stream {
        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": true});
    }
    let sent = Instant::now();
    let response = match post(http, &ctx.url(kind), body.to_string()).send().await {
        Ok(r) => r,
        Err(e) => return Record::failed(kind, &e),
    };
    let status = response.status().as_u16();
    if matches!(status, 429 | 503) {
        return rejection(kind, response).await;
    }
    let text = match response.text().await {
        Ok(t) => t,
        Err(e) => return Record::failed(kind, &e),
    };
    let latency = sent.elapsed();
    if status != 200 {
        return Record::wrong(kind, format!("{} answered {status}: {text}", kind.name()));
    }
    let parsed = if stream {
        parse_stream(kind, &text)
    } else {
        parse_whole(kind, &text)
    };
    let reply = match parsed {
        Ok(r) => r,
        Err(e) => {
            return Record {
                accepted: true,
                ..Record::wrong(kind, format!("{} (stream {stream}): {e}", kind.name()))
            };
        }
    };
    let alone = d.alone.as_ref().expect("every distinct request ran alone");
    let completion_tokens = reply.completion_tokens;
    if &reply != alone {
        return Record {
            accepted: true,
            completion_tokens,
            detail: Some(format!(
                "{} (stream {stream}) {}: alone {alone:?}, under load {reply:?}",
                kind.name(),
                d.body
            )),
            ..Record::new(kind, Outcome::Mismatch)
        };
    }
    Record {
        accepted: true,
        latency: Some(latency),
        completion_tokens,
        ..Record::new(kind, Outcome::Ok)
    }
}

/// A long stream dropped after `after_events` events (0: as soon as the headers came).
async fn cancelled(ctx: &Ctx, http: &reqwest::Client, image: bool, after_events: usize) -> Record {
    let kind = Kind::Cancel;
    let body = ctx.cancel_bodies[usize::from(image)].clone();
    let mut response = match post(http, &ctx.url(kind), body).send().await {
        Ok(r) => r,
        Err(e) => return Record::failed(kind, &e),
    };
    let status = response.status().as_u16();
    if matches!(status, 429 | 503) {
        return rejection(kind, response).await;
    }
    if status != 200 {
        let text = response.text().await.unwrap_or_default();
        return Record::wrong(kind, format!("a stream answered {status}: {text}"));
    }
    let mut seen = String::new();
    while seen.matches("\n\n").count() < after_events {
        match response.chunk().await {
            Ok(Some(bytes)) => seen.push_str(&String::from_utf8_lossy(&bytes)),
            Ok(None) => break,
            Err(e) => {
                return Record {
                    accepted: true,
                    ..Record::failed(kind, &e)
                };
            }
        }
        if seen.contains("[DONE]") {
            break;
        }
    }
    if seen.contains("[DONE]") {
        // It ended first (a reply shorter than the events waited for).
        return match parse_stream(Kind::Text, &seen) {
            Ok(r) => Record {
                accepted: true,
                completion_tokens: r.completion_tokens,
                ..Record::new(kind, Outcome::EndedBeforeCancel)
            },
            Err(e) => Record {
                accepted: true,
                ..Record::wrong(kind, format!("a stream meant to be dropped: {e}"))
            },
        };
    }
    if seen.matches("\n\n").count() < after_events {
        return Record {
            accepted: true,
            ..Record::wrong(kind, format!("a stream ended without [DONE]: {seen}"))
        };
    }
    drop(response);
    Record {
        accepted: true,
        ..Record::new(kind, Outcome::Cancelled)
    }
}

async fn malformed(ctx: &Ctx, http: &reqwest::Client, kind: Kind) -> Record {
    let i = Kind::MALFORMED
        .iter()
        .position(|&k| k == kind)
        .expect("a malformed kind");
    let body = ctx.malformed_bodies[i].clone();
    let response = match post(http, &ctx.url(kind), body).send().await {
        Ok(r) => r,
        Err(e) => return Record::failed(kind, &e),
    };
    let status = response.status().as_u16();
    if matches!(status, 429 | 503) {
        return rejection(kind, response).await;
    }
    let text = match response.text().await {
        Ok(t) => t,
        Err(e) => return Record::failed(kind, &e),
    };
    let expected = kind.refusal_status().expect("a malformed kind");
    if status != expected {
        return Record {
            accepted: status == 200,
            ..Record::wrong(
                kind,
                format!("{} answered {status}, not {expected}: {text}", kind.name()),
            )
        };
    }
    match error_shape(&text) {
        Ok(()) => Record::new(kind, Outcome::Refused),
        Err(e) => Record::wrong(kind, format!("{}: {e}", kind.name())),
    }
}

/// Whether `body` is OpenAI's error object (`Err` says why not).
pub fn error_shape(body: &str) -> Result<(), String> {
    let v: Value = serde_json::from_str(body)
        .map_err(|e| format!("an error that is not JSON ({e}): {body}"))?;
    let e = &v["error"];
    if e["message"].is_string()
        && e["type"].is_string()
        && e.get("param").is_some()
        && e.get("code").is_some()
    {
        Ok(())
    } else {
        Err(format!("not OpenAI's error object: {body}"))
    }
}

fn usage_reply(text: String, finish_reason: String, usage: &Value) -> Result<Reply, String> {
    let n = |k: &str| {
        usage[k]
            .as_u64()
            .ok_or_else(|| format!("no usage.{k} in {usage}"))
    };
    Ok(Reply {
        text,
        finish_reason,
        prompt_tokens: n("prompt_tokens")?,
        completion_tokens: n("completion_tokens")?,
        total_tokens: n("total_tokens")?,
    })
}

/// A whole answer's reply.
fn parse_whole(kind: Kind, body: &str) -> Result<Reply, String> {
    let v: Value = serde_json::from_str(body).map_err(|e| format!("not JSON ({e}): {body}"))?;
    let choice = &v["choices"][0];
    let text = match kind {
        Kind::Completion => choice["text"].as_str(),
        _ => choice["message"]["content"].as_str(),
    }
    .ok_or_else(|| format!("no text in {body}"))?;
    let finish = choice["finish_reason"]
        .as_str()
        .ok_or_else(|| format!("no finish_reason in {body}"))?;
    usage_reply(text.to_string(), finish.to_string(), &v["usage"])
}

/// The `data:` payloads of a server-sent event stream, in order.
pub fn sse_data(text: &str) -> Vec<&str> {
    text.split("\n\n")
        .flat_map(|event| event.lines())
        .filter_map(|l| l.strip_prefix("data: ").or(l.strip_prefix("data:")))
        .collect()
}

/// A stream's reply: its chunks' text, its one finish reason and its usage chunk; the chunks
/// share one id, no error event, `[DONE]` last.
fn parse_stream(kind: Kind, body: &str) -> Result<Reply, String> {
    let data = sse_data(body);
    let Some((&last, chunks)) = data.split_last() else {
        return Err("an empty stream".into());
    };
    if last != "[DONE]" {
        return Err(format!("a stream not ending in [DONE]: {body}"));
    }
    let mut id = None;
    let mut text = String::new();
    let mut finish = None;
    let mut usage = None;
    for d in chunks {
        let v: Value =
            serde_json::from_str(d).map_err(|e| format!("a chunk that is not JSON ({e}): {d}"))?;
        if v.get("error").is_some() {
            return Err(format!("an error event: {d}"));
        }
        match (&id, v["id"].as_str()) {
            (None, Some(x)) => id = Some(x.to_string()),
            (Some(a), Some(b)) if a == b => {}
            _ => return Err(format!("a chunk of another id: {d}")),
        }
        let choices = v["choices"]
            .as_array()
            .ok_or_else(|| format!("a chunk without choices: {d}"))?;
        let Some(c) = choices.first() else {
            usage = Some(v["usage"].clone());
            continue;
        };
        if usage.is_some() {
            return Err(format!("a chunk after the usage chunk: {d}"));
        }
        let piece = match kind {
            Kind::Completion => c["text"].as_str(),
            _ => c["delta"]["content"].as_str(),
        };
        text.push_str(piece.unwrap_or_default());
        if let Some(f) = c["finish_reason"].as_str() {
            if finish.is_some() {
                return Err(format!("a second finishing chunk: {d}"));
            }
            finish = Some(f.to_string());
        }
    }
    let finish = finish.ok_or("a stream without a finishing chunk")?;
    let usage = usage.ok_or("a stream without its usage chunk")?;
    usage_reply(text, finish, &usage)
}

/// A request alone: its reply, or why the stress cannot go on.
async fn alone_reply(
    http: &reqwest::Client,
    url: &str,
    kind: Kind,
    body: &Value,
    stream: bool,
) -> Result<Reply, String> {
    let mut body = body.clone();
    if stream {
        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": true});
    }
    let r = post(http, url, body.to_string())
        .send()
        .await
        .map_err(|e| format!("a request alone: {e}"))?;
    let status = r.status().as_u16();
    let text = r
        .text()
        .await
        .map_err(|e| format!("a request alone: {e}"))?;
    if status != 200 {
        return Err(format!(
            "a request alone answered {status}: {text} ({body})"
        ));
    }
    if stream {
        parse_stream(kind, &text)
    } else {
        parse_whole(kind, &text)
    }
    .map_err(|e| format!("a request alone ({body}): {e}"))
}

/// An HTTP client whose requests end after `timeout` (body included).
pub fn http_client(timeout: Duration) -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(Duration::from_secs(30))
        .build()
        .expect("an HTTP client")
}

fn chat_body(model: &str, content: Value, max_tokens: u64, stream: bool) -> Value {
    let mut body = json!({
        "model": model,
        "messages": [
            {"role": "system", "content": "You answer briefly and precisely."},
            {"role": "user", "content": content}
        ],
        "max_tokens": max_tokens,
        "temperature": 0
    });
    if stream {
        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": true});
    }
    body
}

/// The distinct well-formed requests: text chats of several lengths (a shared system
/// message: a shared prefix), image chats over two images, text completions.
fn distinct_requests(model: &str, images: &[String; 2]) -> Vec<Distinct> {
    let mut out = Vec::new();
    for (i, max_tokens) in [1u64, 3, 8, 16, 24, 32, 48, 64].into_iter().enumerate() {
        let text = format!("Question {i}: what comes after {}?", i * 7 + 3);
        out.push(Distinct {
            kind: Kind::Text,
            body: chat_body(model, json!(text), max_tokens, false),
            alone: None,
        });
    }
    for (i, max_tokens) in [4u64, 12, 20, 32].into_iter().enumerate() {
        let content = json!([
            {"type": "image_url", "image_url": {"url": images[i % 2]}},
            {"type": "text", "text": format!("What is in picture {i}?")}
        ]);
        out.push(Distinct {
            kind: Kind::Image,
            body: chat_body(model, content, max_tokens, false),
            alone: None,
        });
    }
    for (prompt, max_tokens) in [
        ("Once upon a time", 5u64),
        ("The number twelve is", 10),
        ("A memory manager moves", 20),
        ("1, 2, 3,", 40),
    ] {
        out.push(Distinct {
            kind: Kind::Completion,
            body: json!({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}),
            alone: None,
        });
    }
    out
}

/// A body per malformed kind, in [`Kind::MALFORMED`] order.
fn malformed_bodies(model: &str) -> Vec<String> {
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::STANDARD.encode(bytes);
    let image = |url: String| {
        chat_body(
            model,
            json!([
                {"type": "image_url", "image_url": {"url": url}},
                {"type": "text", "text": "What is it?"}
            ]),
            8,
            false,
        )
        .to_string()
    };
    Kind::MALFORMED
        .iter()
        .map(|k| match k {
            Kind::BadJson => format!(
                "{{\"model\": \"{model}\", \"messages\": [{{\"role\": \"user\", \"content\": \"unfinished"
            ),
            Kind::BadBase64 => image("data:image/png;base64,@@@@ this is not base64 @@@@".into()),
            Kind::NotAnImage => image(format!(
                "data:image/png;base64,{}",
                b64(b"these bytes are text, not a picture")
            )),
            Kind::HugeImage => image(format!(
                "data:image/png;base64,{}",
                b64(&vlmem_server::media::png_claiming(50_000, 50_000))
            )),
            Kind::NegativeMaxTokens => {
                let mut body = chat_body(model, json!("Hi"), 8, false);
                body["max_tokens"] = json!(-5);
                body.to_string()
            }
            _ => unreachable!("not a malformed kind"),
        })
        .collect()
}

/// The checkpoint's own image (`image0.png`) as a data URL, else a generated one.
fn fixture_image_url(model: &Path) -> Result<String, String> {
    match std::fs::read(model.join("image0.png")) {
        Ok(bytes) => Ok(format!(
            "data:image/png;base64,{}",
            base64::engine::general_purpose::STANDARD.encode(bytes)
        )),
        Err(_) => png_url(96, 64, 7),
    }
}

/// A small generated PNG (48 x 32 gradient) as a data URL.
fn generated_image_url() -> Result<String, String> {
    png_url(48, 32, 3)
}

fn png_url(w: u32, h: u32, step: u32) -> Result<String, String> {
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([
            (x * step % 256) as u8,
            (y * step % 256) as u8,
            ((x + y) * 2 % 256) as u8,
        ])
    });
    let mut bytes = std::io::Cursor::new(Vec::new());
    image::DynamicImage::ImageRgb8(img)
        .write_to(&mut bytes, image::ImageFormat::Png)
        .map_err(|e| format!("encoding a PNG: {e}"))?;
    Ok(format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(bytes.into_inner())
    ))
}

/// One metric's value in Prometheus text (the first sample whose name and labels match).
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (key, value) = l.rsplit_once(' ')?;
        (key == name).then(|| value.parse::<f64>().ok())?
    })
}

/// [`metric`] as a count (0 when absent).
fn metric_u64(text: &str, name: &str) -> u64 {
    metric(text, name).map_or(0, |v| v as u64)
}

/// The records counted, the latencies' percentiles, the per-record rules.
fn tally(
    model: &Path,
    config: &StressConfig,
    distinct: usize,
    records: Vec<Record>,
    load_time: Duration,
    unfinished: u64,
) -> StressReport {
    let mut outcomes = BTreeMap::new();
    let mut latencies = Vec::new();
    let mut examples = Vec::new();
    let mut accepted = 0u64;
    let mut answered_tokens = 0u64;
    let mut completion_tokens = 0u64;
    for r in &records {
        *outcomes.entry((r.kind, r.outcome)).or_insert(0u64) += 1;
        accepted += u64::from(r.accepted);
        answered_tokens += r.completion_tokens;
        if r.outcome == Outcome::Ok {
            completion_tokens += r.completion_tokens;
        }
        if let Some(l) = r.latency {
            latencies.push(l);
        }
        if let Some(d) = &r.detail
            && examples.len() < 20
        {
            examples.push(d.clone());
        }
    }
    latencies.sort_unstable();
    let pct = |q: f64| {
        if latencies.is_empty() {
            Duration::ZERO
        } else {
            latencies[((latencies.len() - 1) as f64 * q).round() as usize]
        }
    };
    let count = |o: Outcome| records.iter().filter(|r| r.outcome == o).count() as u64;
    let requests = records.len() as u64;
    let mut report = StressReport {
        model: model.to_path_buf(),
        config: config.clone(),
        distinct_requests: distinct,
        outcomes,
        requests,
        accepted,
        mismatches: count(Outcome::Mismatch),
        wrong_answers: count(Outcome::WrongAnswer),
        rejected: count(Outcome::Rejected),
        rejected_429: records
            .iter()
            .filter(|r| matches!(r.retry_after, Some((429, _))))
            .count() as u64,
        hung: count(Outcome::Timeout) + unfinished,
        transport_errors: count(Outcome::Transport),
        examples,
        latency_p50: pct(0.5),
        latency_p99: pct(0.99),
        completion_tokens,
        load_time,
        tokens_per_s: completion_tokens as f64 / load_time.as_secs_f64().max(1e-9),
        peak_rss_bytes: 0,
        rss_timeline: Vec::new(),
        warmup_rss_bytes: 0,
        rss_growth_bytes: 0,
        scheduler: SchedulerStats::default(),
        server: ServerCounters::default(),
        cancel_generated_tokens: 0,
        answered_tokens,
        kv_left: (0, 0),
        kv_bytes_left: 0,
        audit: Audit {
            overlaps: 0,
            busy_entries: 0,
            pins: 0,
            entries_without_copy: 0,
            charged_matches_resident: true,
        },
        deadlocks: 0,
        violations: Vec::new(),
    };
    let answered = report.count_outcome(Outcome::Ok);
    let v = &mut report.violations;
    if report.mismatches > 0 {
        v.push(format!(
            "{} well-formed request(s) answered otherwise than alone",
            report.mismatches
        ));
    }
    if report.wrong_answers > 0 {
        v.push(format!(
            "{} request(s) got an illegal answer",
            report.wrong_answers
        ));
    }
    if report.hung > 0 {
        v.push(format!(
            "{} request(s) got no answer within {:?} (hung)",
            report.hung, config.request_timeout
        ));
    }
    if report.transport_errors > 0 {
        v.push(format!(
            "{} request(s) lost their connection",
            report.transport_errors
        ));
    }
    if answered == 0 {
        v.push("no well-formed request was answered".into());
    }
    if report.rejected * 2 > requests {
        v.push(format!(
            "{} of {requests} requests were refused (429/503): the majority",
            report.rejected
        ));
    }
    report
}

/// The counters of the scheduler and of the server after shutdown against what the clients
/// saw.
fn check_counters(r: &mut StressReport) {
    let s = r.scheduler;
    let dropped = r.count_outcome(Outcome::Cancelled);
    let v = &mut r.violations;
    if s.running != 0 || s.queued != 0 {
        v.push(format!(
            "after shutdown the scheduler still has {} running and {} queued",
            s.running, s.queued
        ));
    }
    // Exact only when every request's fate is known.
    if r.hung == 0 && r.transport_errors == 0 && s.completed != r.accepted {
        v.push(format!(
            "the scheduler completed {} requests; the server accepted {}",
            s.completed, r.accepted
        ));
    }
    let c = r.server;
    if c.completed + c.cancelled + c.failed != s.completed {
        v.push(format!(
            "the server's completed {} + cancelled {} + failed {} != the scheduler's completed {}",
            c.completed, c.cancelled, c.failed, s.completed
        ));
    }
    if c.failed != 0 {
        v.push(format!("{} request(s) failed in the engine", c.failed));
    }
    let refused_429 = r.rejected_429;
    if c.rejected != refused_429 {
        v.push(format!(
            "the server counted {} refusals; the clients saw {refused_429} 429s",
            c.rejected
        ));
    }
    if s.max_batch < 2 {
        v.push(format!(
            "the scheduler never decoded two sequences together (max batch {})",
            s.max_batch
        ));
    }
    if dropped > 0 {
        // A dropped stream ends at its next token once the server notices: most are counted
        // cancelled (a few may have been finishing), and their tokens stay far below what
        // they asked for.
        if c.cancelled * 2 < dropped {
            v.push(format!(
                "{dropped} streams were dropped, the server counted {} cancelled",
                c.cancelled
            ));
        }
        let per_stream = r.cancel_generated_tokens / dropped;
        if per_stream * 4 > CANCEL_MAX_TOKENS {
            v.push(format!(
                "dropped streams generated {per_stream} tokens each on average (of {CANCEL_MAX_TOKENS} asked): not stopped when their client left"
            ));
        }
    }
}

/// The engine after shutdown: no KV left, a clean audit.
fn check_engine(engine: &Engine, r: &mut StressReport) {
    if let Some(pool) = engine.kv_pool() {
        let s = pool.stats();
        r.kv_left = (s.sequences, s.blocks);
    }
    let stats = engine.manager().stats();
    r.kv_bytes_left = Tier::ALL
        .iter()
        .map(|&t| stats.resident.get(t, TensorKind::KvCache))
        .sum();
    r.audit = engine.manager().audit();
    r.violations.extend(
        engine_leftovers(engine)
            .into_iter()
            .map(|l| format!("after shutdown {l}")),
    );
}

/// What an engine holds of requests that ended, one line each (none when every request's
/// KV went back and the manager's audit is clean): call it once nothing runs.
pub fn engine_leftovers(engine: &Engine) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(pool) = engine.kv_pool() {
        let s = pool.stats();
        if s.sequences != 0 || s.blocks != 0 {
            out.push(format!(
                "the KV pool holds {} sequence(s) and {} block(s)",
                s.sequences, s.blocks
            ));
        }
    }
    let stats = engine.manager().stats();
    let kv_bytes: u64 = Tier::ALL
        .iter()
        .map(|&t| stats.resident.get(t, TensorKind::KvCache))
        .sum();
    if kv_bytes != 0 {
        out.push(format!("the manager holds {kv_bytes} KV bytes"));
    }
    let a = engine.manager().audit();
    if a.overlaps != 0
        || a.busy_entries != 0
        || a.pins != 0
        || a.entries_without_copy != 0
        || !a.charged_matches_resident
    {
        out.push(format!("the manager's audit: {a:?}"));
    }
    out
}

/// Resident memory sampled every 50 ms on a thread: (seconds since the start, bytes).
struct RssSampler {
    stop: Arc<AtomicBool>,
    samples: Arc<Mutex<Vec<(f64, u64)>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RssSampler {
    fn start() -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(Mutex::new(Vec::new()));
        let (s, out) = (stop.clone(), samples.clone());
        let started = Instant::now();
        let thread = vlmem_core::sync::thread::spawn_named("vlmem-stress-rss", move || {
            while !s.load(Ordering::Relaxed) {
                if let Some(b) = rss_bytes() {
                    out.lock().push((started.elapsed().as_secs_f64(), b));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        })
        .ok();
        RssSampler {
            stop,
            samples,
            thread,
        }
    }

    fn finish(mut self) -> Vec<(f64, u64)> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        std::mem::take(&mut *self.samples.lock())
    }
}

/// This process's resident memory (VmRSS), where /proc tells it.
fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Peak, warm-up and growth from the samples; the growth rule.
fn rss_figures(r: &mut StressReport, samples: &[(f64, u64)], config: &StressConfig) {
    let warm = config.warmup.as_secs_f64();
    r.peak_rss_bytes = samples.iter().map(|s| s.1).max().unwrap_or(0);
    for &(t, b) in samples {
        let i = (t / 5.0) as usize;
        if r.rss_timeline.len() <= i {
            r.rss_timeline.resize(i + 1, 0);
        }
        r.rss_timeline[i] = r.rss_timeline[i].max(b);
    }
    r.warmup_rss_bytes = samples
        .iter()
        .filter(|s| s.0 < warm)
        .map(|s| s.1)
        .max()
        .unwrap_or(0);
    let after = samples
        .iter()
        .filter(|s| s.0 >= warm)
        .map(|s| s.1)
        .max()
        .unwrap_or(0);
    r.rss_growth_bytes = after.saturating_sub(r.warmup_rss_bytes);
    if samples.is_empty() {
        r.violations
            .push("no resident memory sample (/proc/self/status unreadable)".into());
    } else if mib(r.rss_growth_bytes) > config.rss_growth_bound_mib {
        r.violations.push(format!(
            "resident memory grew by {:.1} MiB after the warm-up (bound {} MiB): from {:.1} to {:.1} MiB",
            mib(r.rss_growth_bytes),
            config.rss_growth_bound_mib,
            mib(r.warmup_rss_bytes),
            mib(after)
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_parse_into_replies() {
        let body = "data: {\"id\":\"a\",\"choices\":[{\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"finish_reason\":null}]}\n\n\
                    data: {\"id\":\"a\",\"choices\":[{\"delta\":{\"content\":\"Hel\"},\"finish_reason\":null}]}\n\n\
                    data: {\"id\":\"a\",\"choices\":[{\"delta\":{\"content\":\"lo\"},\"finish_reason\":null}]}\n\n\
                    data: {\"id\":\"a\",\"choices\":[{\"delta\":{},\"finish_reason\":\"length\"}]}\n\n\
                    data: {\"id\":\"a\",\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":2,\"total_tokens\":5}}\n\n\
                    data: [DONE]\n\n";
        let r = parse_stream(Kind::Text, body).unwrap();
        assert_eq!(r.text, "Hello");
        assert_eq!(r.finish_reason, "length");
        assert_eq!(
            (r.prompt_tokens, r.completion_tokens, r.total_tokens),
            (3, 2, 5)
        );
        // No [DONE], an error event, two ids: refused.
        assert!(parse_stream(Kind::Text, &body.replace("data: [DONE]\n\n", "")).is_err());
        let error = body.replace(
            "data: [DONE]",
            "data: {\"error\":{\"message\":\"x\"}}\n\ndata: [DONE]",
        );
        assert!(parse_stream(Kind::Text, &error).is_err());
        assert!(parse_stream(Kind::Text, &body.replacen("\"a\"", "\"b\"", 1)).is_err());
    }

    #[test]
    fn error_objects_are_recognised() {
        assert!(
            error_shape(r#"{"error":{"message":"m","type":"t","param":null,"code":null}}"#).is_ok()
        );
        assert!(error_shape(r#"{"error":{"message":"m"}}"#).is_err());
        assert!(error_shape("oops").is_err());
    }

    #[test]
    fn malformed_bodies_are_what_they_claim() {
        let bodies = malformed_bodies("m");
        assert!(serde_json::from_str::<Value>(&bodies[0]).is_err());
        let huge = vlmem_server::media::png_claiming(50_000, 50_000);
        let (w, h) = image::ImageReader::new(std::io::Cursor::new(&huge))
            .with_guessed_format()
            .unwrap()
            .into_dimensions()
            .unwrap();
        assert_eq!((w, h), (50_000, 50_000));
        assert_eq!(
            Kind::MALFORMED.map(|k| k.refusal_status()),
            [Some(400), Some(400), Some(400), Some(413), Some(400)]
        );
    }
}
