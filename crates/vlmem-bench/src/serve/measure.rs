//! The runs of one engine: greedy text requests through its [`Scheduler`] N at a time, and
//! the same kind of requests one after another through [`Engine::generate`], in rounds.
//!
//! Every case gets prompts no other case had (a prompt the scheduler keeps for prefix
//! sharing would otherwise skip a later case's prompt pass), except the sequential case,
//! which runs the first prompts of its round's largest concurrent case: each of those
//! requests has then run both ways, and their ids must agree (greedy, so a request's ids do
//! not depend on what else runs).

use super::progress;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, Instant};
use vlmem::{TensorKind, Tier};
use vlmem_qwen3vl::checkpoint::Checkpoint;
use vlmem_runner::{
    Engine, Request, SamplingParams, Scheduler, SchedulerConfig, SchedulerStats, SeqEvent, Sink,
};

/// Longest wait for the next event of a concurrent case before it counts as stuck.
const EVENT_TIMEOUT: Duration = Duration::from_secs(20 * 60);

/// What one engine runs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub(crate) struct RunSpec {
    /// `resident` or `streamed`: the figures' engine label.
    pub(crate) label: String,
    pub(crate) checkpoint: PathBuf,
    /// The host memory to build the engine with; `None`: the one whose weight class holds
    /// `weight_bytes` ([`crate::e2e::decode::engine_with_host_weights`]).
    pub(crate) host_mem_bytes: Option<u64>,
    /// The host budget for weights asked for.
    pub(crate) weight_bytes: u64,
    pub(crate) prefetch_layers: usize,
    pub(crate) prompt_tokens: usize,
    /// Ids each request generates (greedy; fewer only when a stop id comes first).
    pub(crate) gen_tokens: usize,
    /// Requests submitted at once, one case each, every round.
    pub(crate) concurrency: Vec<usize>,
    pub(crate) rounds: usize,
    /// Requests the sequential case runs one after another each round.
    pub(crate) sequential_requests: usize,
    /// The scheduler's [`SchedulerConfig::max_seqs`].
    pub(crate) max_seqs: usize,
}

impl RunSpec {
    /// A request that sizes the engine: its context is every sequence's whole blocks at
    /// once, so that the host's KV budget holds `max_seqs` requests side by side.
    pub(crate) fn sizing_request(&self) -> Request {
        let block = vlmem_qwen3vl::placement::KV_BLOCK_TOKENS as usize;
        let per_seq = (self.prompt_tokens + self.gen_tokens).div_ceil(block) * block;
        let context = per_seq * self.max_seqs.max(1);
        Request::ids(vec![1; self.prompt_tokens])
            .max_new_tokens(context.saturating_sub(self.prompt_tokens))
            .sampling(SamplingParams::greedy())
    }
}

/// Which case.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) enum CaseKind {
    /// One request after another through [`Engine::generate`].
    Sequential,
    /// This many requests submitted at once to the scheduler.
    Concurrent(usize),
}

impl CaseKind {
    /// The figure-name suffix: `sequential` or the number of requests.
    pub(crate) fn suffix(self) -> String {
        match self {
            CaseKind::Sequential => "sequential".into(),
            CaseKind::Concurrent(n) => n.to_string(),
        }
    }
}

/// What one case measured.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub(crate) struct Case {
    pub(crate) kind: CaseKind,
    pub(crate) round: usize,
    /// Each request's prompt (by index, see [`prompt`]) and generated ids.
    pub(crate) prompts: Vec<u64>,
    pub(crate) ids: Vec<Vec<u32>>,
    /// Ids generated in all (first tokens included).
    pub(crate) generated_tokens: u64,
    /// Sequence-steps of the decode steps (one per id after each request's first), their
    /// count and wall time: the scheduler's counters over the case; for the sequential case
    /// each request's decode time.
    pub(crate) decode_rows: u64,
    pub(crate) decode_steps: u64,
    pub(crate) decode_ns: u64,
    pub(crate) prefill_ns: u64,
    /// Prompt tokens taken from the KV pool instead of computed (0 expected: every prompt
    /// is new).
    pub(crate) cached_tokens: u64,
    /// From the first submission to the last request's end.
    pub(crate) wall_ns: u64,
    /// Each request's time to first token: from its submission (the scheduler's count); in
    /// the sequential case from the case's start, as if all had arrived at once.
    pub(crate) ttft_ns: Vec<u64>,
}

impl Case {
    /// Aggregate decode rate: decoded rows over the decode steps' wall time.
    pub(crate) fn decode_tok_s(&self) -> Option<f64> {
        (self.decode_rows > 0 && self.decode_ns > 0)
            .then(|| self.decode_rows as f64 / (self.decode_ns as f64 / 1e9))
    }

    /// End-to-end rate: every generated id over the wall time of the case.
    pub(crate) fn e2e_tok_s(&self) -> Option<f64> {
        (self.generated_tokens > 0 && self.wall_ns > 0)
            .then(|| self.generated_tokens as f64 / (self.wall_ns as f64 / 1e9))
    }

    /// The mean number of sequences a decode step held.
    pub(crate) fn mean_batch(&self) -> Option<f64> {
        (self.decode_steps > 0).then(|| self.decode_rows as f64 / self.decode_steps as f64)
    }

    /// The times to first token in seconds.
    pub(crate) fn ttft_s(&self) -> Vec<f64> {
        self.ttft_ns.iter().map(|&n| n as f64 / 1e9).collect()
    }
}

/// One engine's cases and how it was built.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub(crate) struct EngineRun {
    pub(crate) label: String,
    pub(crate) host_mem_bytes: u64,
    pub(crate) weight_budget_bytes: u64,
    pub(crate) build_s: f64,
    /// The warm-up request (it pages in what the engine keeps in RAM).
    pub(crate) warmup_s: f64,
    pub(crate) cases: Vec<Case>,
    /// The most sequences one of the scheduler's decode steps held, over all cases.
    pub(crate) max_batch: u64,
    /// The process's peak resident set (VmHWM), when read.
    pub(crate) peak_rss_bytes: Option<u64>,
}

/// The prompt of index `index`: `len` distinct ids in `lo..hi`, the same for the same index.
pub(crate) fn prompt(index: u64, len: usize, lo: u32, hi: u32) -> Vec<u32> {
    let span = u64::from(hi.saturating_sub(lo).max(1));
    let mut x = index
        .wrapping_add(1)
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .max(1);
    let mut out: Vec<u32> = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let id = lo + (x % span) as u32;
        // Distinct while the range allows it.
        if !out.contains(&id) || out.len() as u64 >= span {
            out.push(id);
        }
    }
    out
}

/// Text ids for prompts: above the low ids (special-looking) and below the vision tokens.
pub(crate) fn text_id_range(engine: &Engine) -> (u32, u32) {
    let cfg = engine.runner().model().config();
    let hi = cfg
        .text
        .vocab_size
        .min(u64::from(cfg.image_token_id))
        .min(u64::from(cfg.vision_start_token_id))
        .min(u64::from(cfg.vision_end_token_id))
        .min(u64::from(cfg.video_token_id)) as u32;
    (1000.min(hi / 2), hi)
}

/// The greedy request of prompt `index`.
fn request(spec: &RunSpec, range: (u32, u32), index: u64, gen_tokens: usize) -> Request {
    Request::ids(prompt(index, spec.prompt_tokens, range.0, range.1))
        .max_new_tokens(gen_tokens)
        .sampling(SamplingParams::greedy())
}

/// Builds the engine of `spec` for checkpoint `c`: its engine, host memory and build time.
pub(crate) fn build_engine(c: &Checkpoint, spec: &RunSpec) -> Result<(Engine, u64, f64), String> {
    let started = Instant::now();
    let sizing = spec.sizing_request();
    let (engine, host) = match spec.host_mem_bytes {
        Some(host) => {
            let (engine, _) = Engine::builder(&c.dir)
                .gpu_mem(0)
                .host_mem(host)
                .prefetch_layers(spec.prefetch_layers)
                .build_for(&sizing)
                .map_err(|e| e.to_string())?;
            (engine, host)
        }
        None => {
            let (engine, _, host) = crate::e2e::decode::engine_with_host_weights(
                c,
                spec.weight_bytes,
                spec.prefetch_layers,
                &sizing,
            )?;
            (engine, host)
        }
    };
    let got = weight_budget(&engine);
    if got < spec.weight_bytes {
        return Err(format!(
            "the engine built with {host} B of host memory holds {got} B of weights, not the {} B asked for",
            spec.weight_bytes
        ));
    }
    Ok((engine, host, started.elapsed().as_secs_f64()))
}

/// The engine's host budget for weights.
pub(crate) fn weight_budget(engine: &Engine) -> u64 {
    engine
        .manager()
        .stats()
        .budgets
        .get(Tier::Host, TensorKind::Weight)
}

/// The prompts of each case of one round: fresh ones for every concurrent case (numbered
/// from `next`), and the first of the largest concurrent case's for the sequential one.
pub(crate) fn round_prompts(spec: &RunSpec, next: &mut u64) -> Vec<(CaseKind, Vec<u64>)> {
    let mut cases: Vec<(CaseKind, Vec<u64>)> = spec
        .concurrency
        .iter()
        .map(|&n| {
            let first = *next;
            *next += n as u64;
            (CaseKind::Concurrent(n), (first..first + n as u64).collect())
        })
        .collect();
    if spec.sequential_requests > 0 {
        let largest = cases
            .iter()
            .max_by_key(|(_, p)| p.len())
            .map(|(_, p)| p.clone())
            .unwrap_or_default();
        let mut seq: Vec<u64> = largest.into_iter().take(spec.sequential_requests).collect();
        while seq.len() < spec.sequential_requests {
            seq.push(*next);
            *next += 1;
        }
        cases.insert(0, (CaseKind::Sequential, seq));
    }
    cases
}

/// Runs every round of `spec` on `engine` (after one warm-up request): the cases in order
/// on even rounds and in reverse on odd ones, so that no case always runs first.
pub(crate) fn run_cases(
    engine: std::sync::Arc<Engine>,
    spec: &RunSpec,
) -> Result<(Vec<Case>, f64, u64), String> {
    let range = text_id_range(&engine);
    let started = Instant::now();
    engine
        .generate(
            &request(spec, range, 0, spec.gen_tokens.min(4)),
            &mut |_| {},
        )
        .map_err(|e| format!("warm-up: {e}"))?;
    let warmup_s = started.elapsed().as_secs_f64();
    let scheduler = Scheduler::start(
        engine.clone(),
        SchedulerConfig {
            max_seqs: spec.max_seqs,
            ..Default::default()
        },
    );
    let mut next = 1;
    let mut cases = Vec::new();
    for round in 0..spec.rounds {
        let mut plan = round_prompts(spec, &mut next);
        if round % 2 == 1 {
            plan.reverse();
        }
        for (kind, prompts) in plan {
            let requests: Vec<Request> = prompts
                .iter()
                .map(|&i| request(spec, range, i, spec.gen_tokens))
                .collect();
            let case = match kind {
                CaseKind::Sequential => sequential_case(&engine, &requests, &prompts, round),
                CaseKind::Concurrent(_) => {
                    concurrent_case(&scheduler, &requests, &prompts, round, kind)
                }
            }
            .map_err(|e| format!("{} {}, round {round}: {e}", spec.label, kind.suffix()))?;
            progress(&format!(
                "{} @{} round {round}: {:.3} tok/s decode, {:.3} end to end, mean batch {:.1}",
                spec.label,
                kind.suffix(),
                case.decode_tok_s().unwrap_or(f64::NAN),
                case.e2e_tok_s().unwrap_or(f64::NAN),
                case.mean_batch().unwrap_or(f64::NAN),
            ));
            cases.push(case);
        }
    }
    let max_batch = scheduler.stats().max_batch;
    scheduler.shutdown(Duration::from_secs(1));
    Ok((cases, warmup_s, max_batch))
}

/// The requests one after another through [`Engine::generate`] (the path without the
/// scheduler).
fn sequential_case(
    engine: &Engine,
    requests: &[Request],
    prompts: &[u64],
    round: usize,
) -> Result<Case, String> {
    let started = Instant::now();
    let mut case = empty_case(CaseKind::Sequential, round, prompts);
    for r in requests {
        let before = started.elapsed();
        let reply = engine.generate(r, &mut |_| {}).map_err(|e| e.to_string())?;
        let t = &reply.timings;
        let n = reply.ids.len() as u64;
        case.generated_tokens += n;
        case.decode_rows += n.saturating_sub(1);
        case.decode_steps += n.saturating_sub(1);
        case.decode_ns += t.decode.as_nanos() as u64;
        case.prefill_ns += t.time_to_first_token.as_nanos() as u64;
        case.ttft_ns
            .push((before + t.prepare + t.queued + t.time_to_first_token).as_nanos() as u64);
        case.ids.push(reply.ids);
    }
    case.wall_ns = started.elapsed().as_nanos() as u64;
    Ok(case)
}

fn empty_case(kind: CaseKind, round: usize, prompts: &[u64]) -> Case {
    Case {
        kind,
        round,
        prompts: prompts.to_vec(),
        ids: Vec::new(),
        generated_tokens: 0,
        decode_rows: 0,
        decode_steps: 0,
        decode_ns: 0,
        prefill_ns: 0,
        cached_tokens: 0,
        wall_ns: 0,
        ttft_ns: Vec::new(),
    }
}

/// What a sink passes on.
enum Event {
    Token(u32),
    Done {
        ttft: Duration,
        at: Instant,
        cancelled: bool,
    },
    Failed(String),
}

/// The requests submitted at once to `scheduler`, waited for; the scheduler's counters over
/// the case.
fn concurrent_case(
    scheduler: &Scheduler,
    requests: &[Request],
    prompts: &[u64],
    round: usize,
    kind: CaseKind,
) -> Result<Case, String> {
    let n = requests.len();
    let (tx, rx) = mpsc::channel::<(usize, Event)>();
    let before = scheduler.stats();
    let started = Instant::now();
    let mut tickets = Vec::with_capacity(n);
    for (i, r) in requests.iter().enumerate() {
        let tx = tx.clone();
        let sink: Sink = Box::new(move |e| {
            let event = match e {
                SeqEvent::Token(id) => Event::Token(id),
                SeqEvent::Finished(f) => Event::Done {
                    ttft: f.time_to_first_token,
                    at: Instant::now(),
                    cancelled: f.cancelled,
                },
                SeqEvent::Failed(e) => Event::Failed(e.to_string()),
                _ => return true,
            };
            tx.send((i, event)).is_ok()
        });
        match scheduler.submit(r, sink) {
            Ok(t) => tickets.push(t),
            Err(e) => {
                tickets.iter().for_each(|t| t.cancel());
                return Err(format!("submit {i}: {e}"));
            }
        }
    }
    drop(tx);
    let mut ids = vec![Vec::new(); n];
    let mut ttft = vec![0u64; n];
    let mut ended = 0;
    let mut last = started;
    while ended < n {
        let (i, event) = match rx.recv_timeout(EVENT_TIMEOUT) {
            Ok(x) => x,
            Err(e) => {
                tickets.iter().for_each(|t| t.cancel());
                return Err(format!("{ended} of {n} requests ended, then: {e}"));
            }
        };
        match event {
            Event::Token(id) => ids[i].push(id),
            Event::Done {
                ttft: t,
                at,
                cancelled,
            } => {
                if cancelled {
                    return Err(format!("request {i} was cancelled"));
                }
                ttft[i] = t.as_nanos() as u64;
                last = last.max(at);
                ended += 1;
            }
            Event::Failed(e) => {
                tickets.iter().for_each(|t| t.cancel());
                return Err(format!("request {i} failed: {e}"));
            }
        }
    }
    let after = scheduler.stats();
    let mut case = empty_case(kind, round, prompts);
    let d = |f: fn(&SchedulerStats) -> u64| f(&after).saturating_sub(f(&before));
    case.generated_tokens = ids.iter().map(|v| v.len() as u64).sum();
    case.decode_rows = d(|s| s.decoded_rows);
    case.decode_steps = d(|s| s.decode_steps);
    case.decode_ns = d(|s| s.decode_ns);
    case.prefill_ns = d(|s| s.prefill_ns);
    case.cached_tokens = d(|s| s.cached_tokens);
    case.ids = ids;
    case.ttft_ns = ttft;
    case.wall_ns = last.duration_since(started).as_nanos() as u64;
    Ok(case)
}

/// This process's peak resident set, from /proc/self/status (`VmHWM`).
pub(crate) fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status.lines().find_map(|l| {
        let kb: u64 = l
            .strip_prefix("VmHWM:")?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some(kb * 1024)
    })
}

/// Builds the engine of `spec` and runs its cases.
pub(crate) fn run_engine(c: &Checkpoint, spec: &RunSpec) -> Result<EngineRun, String> {
    let (engine, host_mem_bytes, build_s) = build_engine(c, spec)?;
    let weight_budget_bytes = weight_budget(&engine);
    let engine = std::sync::Arc::new(engine);
    let (cases, warmup_s, max_batch) = run_cases(engine, spec)?;
    Ok(EngineRun {
        label: spec.label.clone(),
        host_mem_bytes,
        weight_budget_bytes,
        build_s,
        warmup_s,
        cases,
        max_batch,
        peak_rss_bytes: peak_rss_bytes(),
    })
}

/// Pairs of requests that ran the same prompt and generated different ids: (prompt, the
/// two cases' suffixes). Also how many prompts ran in more than one case.
pub(crate) fn id_mismatches(cases: &[Case]) -> (usize, Vec<(u64, String, String)>) {
    let mut first: std::collections::BTreeMap<u64, (&[u32], CaseKind)> = Default::default();
    let mut shared = std::collections::BTreeSet::new();
    let mut bad = Vec::new();
    for c in cases {
        for (p, ids) in c.prompts.iter().zip(&c.ids) {
            match first.get(p) {
                Some((seen, kind)) => {
                    shared.insert(*p);
                    if *seen != ids.as_slice() {
                        bad.push((*p, kind.suffix(), c.kind.suffix()));
                    }
                }
                None => {
                    first.insert(*p, (ids, c.kind));
                }
            }
        }
    }
    (shared.len(), bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Prompts: the asked length, distinct ids inside the range, the same for the same
    /// index and different for another.
    #[test]
    fn prompts_are_distinct_and_reproducible() {
        let a = prompt(3, 16, 1000, 151_000);
        assert_eq!(a.len(), 16);
        assert!(a.iter().all(|&x| (1000..151_000).contains(&x)));
        let mut d = a.clone();
        d.sort_unstable();
        d.dedup();
        assert_eq!(d.len(), 16, "{a:?}");
        assert_eq!(a, prompt(3, 16, 1000, 151_000));
        assert_ne!(a, prompt(4, 16, 1000, 151_000));
        // A range narrower than the prompt still gives a prompt.
        assert_eq!(prompt(0, 8, 5, 8).len(), 8);
    }

    /// Each concurrent case gets fresh prompts; the sequential one re-runs the largest
    /// case's first prompts (padded with fresh ones when it asks for more).
    #[test]
    fn round_prompts_share_only_with_the_sequential_case() {
        let spec = RunSpec {
            label: "resident".into(),
            checkpoint: PathBuf::new(),
            host_mem_bytes: None,
            weight_bytes: 0,
            prefetch_layers: 0,
            prompt_tokens: 16,
            gen_tokens: 8,
            concurrency: vec![1, 4, 16],
            rounds: 2,
            sequential_requests: 3,
            max_seqs: 16,
        };
        let mut next = 1;
        let r0 = round_prompts(&spec, &mut next);
        let kinds: Vec<String> = r0.iter().map(|(k, _)| k.suffix()).collect();
        assert_eq!(kinds, ["sequential", "1", "4", "16"]);
        assert_eq!(r0[1].1, vec![1]);
        assert_eq!(r0[2].1, vec![2, 3, 4, 5]);
        assert_eq!(r0[3].1, (6..22).collect::<Vec<u64>>());
        assert_eq!(r0[0].1, vec![6, 7, 8]);
        let r1 = round_prompts(&spec, &mut next);
        assert_eq!(r1[1].1, vec![22]);
        let long = RunSpec {
            sequential_requests: 20,
            ..spec.clone()
        };
        let mut next = 1;
        let r = round_prompts(&long, &mut next);
        assert_eq!(r[0].1.len(), 20);
        assert_eq!(r[0].1[16..], [22, 23, 24, 25]);
        assert_eq!(next, 26);
        // The sizing request holds every sequence's whole blocks: 16 x 32 tokens.
        let sizing = spec.sizing_request();
        assert_eq!(sizing.max_new_tokens, 16 * 32 - 16);
    }

    /// Ids are compared wherever a prompt ran twice.
    #[test]
    fn mismatched_ids_are_found() {
        let mut a = empty_case(CaseKind::Concurrent(2), 0, &[1, 2]);
        a.ids = vec![vec![5, 6], vec![7]];
        let mut s = empty_case(CaseKind::Sequential, 0, &[1, 2]);
        s.ids = vec![vec![5, 6], vec![8]];
        let (shared, bad) = id_mismatches(&[a.clone(), s]);
        assert_eq!(shared, 2);
        assert_eq!(bad, vec![(2, "2".to_string(), "sequential".to_string())]);
        let (shared, bad) = id_mismatches(&[a]);
        assert_eq!((shared, bad.len()), (0, 0));
    }

    /// Rates: rows over the decode time, ids over the wall time; none when nothing ran.
    #[test]
    fn case_rates() {
        let mut c = empty_case(CaseKind::Concurrent(4), 0, &[]);
        assert_eq!(c.decode_tok_s(), None);
        c.decode_rows = 30;
        c.decode_steps = 10;
        c.decode_ns = 2_000_000_000;
        c.generated_tokens = 34;
        c.wall_ns = 4_000_000_000;
        assert_eq!(c.decode_tok_s(), Some(15.0));
        assert_eq!(c.e2e_tok_s(), Some(8.5));
        assert_eq!(c.mean_batch(), Some(3.0));
    }
}
