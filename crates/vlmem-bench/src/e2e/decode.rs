//! The decode cases: an engine built for the synthesized checkpoint with the host memory
//! whose weight class is the case's weight budget, one greedy request run through it, and
//! what it measured.

use super::bounds::{self, BlockStat, proc_read_bytes};
use super::{MIB, Setup, push};
use crate::SuiteReport;
use std::path::PathBuf;
use vlmem::{TensorKind, Tier};
use vlmem_qwen3vl::checkpoint::Checkpoint;
use vlmem_runner::{Activations, Engine, FinishReason, Request, SamplingParams};

/// One decode measurement.
pub(super) struct Decode {
    pub(super) tok_s: f64,
    /// Seconds of the timed decode steps.
    pub(super) decode_s: f64,
    pub(super) ttft_s: f64,
    /// Bytes of the step arena the decode steps used at most (0: they ran outside it).
    pub(super) arena_peak_bytes: u64,
    /// Bytes into the host tier plus bytes staged, per decode step.
    pub(super) streamed_bytes_per_token: f64,
    /// /proc/self/io read_bytes per decode step.
    pub(super) proc_bytes_per_token: Option<f64>,
    pub(super) prefetch_hints: u64,
    /// The decode kernels' read speed over the decode steps (GB/s) and their share of them.
    pub(super) kernel_gbps: f64,
    pub(super) kernel_share: f64,
    /// Streamed tensors read ahead into the staging area and taken, and read on demand.
    pub(super) staged_taken: u64,
    pub(super) staged_on_demand: u64,
    /// Most fills in flight at once in the staging area.
    pub(super) staged_max_filling: u64,
    /// Staging buffers allocated over the whole run (prompt included), and their bytes.
    pub(super) staged_allocated: u64,
    pub(super) staged_allocated_bytes: u64,
    /// Share of the decode steps during which the read-ahead had a read in flight, and the
    /// mean number in flight while it had (0 when nothing was read ahead).
    pub(super) reader_busy_share: f64,
    pub(super) reader_mean_depth: f64,
    /// The disk's own counters over the decode steps (see [`BlockStat`]).
    pub(super) block: Option<BlockStat>,
    /// The streamed weights' extents in the checkpoint (file, offset, bytes), in use order.
    pub(super) streamed_extents: Vec<(PathBuf, u64, u64)>,
    /// The host memory the engine was built with, and its host budget for weights.
    pub(super) host_mem_bytes: u64,
    pub(super) host_weight_budget_bytes: u64,
    /// KV blocks the request held in the engine's paged pool (`None`: its KV cache was in
    /// process).
    pub(super) kv_blocks: Option<u64>,
    pub(super) finish_reason: FinishReason,
    pub(super) ids: Vec<u32>,
}

pub(super) fn decode_run(
    c: &Checkpoint,
    host_weight_bytes: u64,
    prefetch_layers: usize,
    new_tokens: usize,
) -> Result<Decode, String> {
    let readers = std::env::var("VLMEM_E2E_STREAM_READERS")
        .ok()
        .and_then(|v| v.parse().ok());
    decode_run_with(c, host_weight_bytes, prefetch_layers, new_tokens, readers)
}

/// An engine for `c` with no GPU, built for `request`, whose host weight class (the staging
/// area included) holds at least `weight_bytes` and less than a MiB more: what a user gets
/// with the host memory (`--host-mem`) it was built with, returned beside it. The engine
/// sizes its classes itself (weights, the KV pool, activations, the vision cache), so the host
/// memory is found by building: from a guess, each next guess corrects the last by the weight
/// class's shortfall over its slope in host memory (building registers the checkpoint's
/// extents and reads no weight).
pub(crate) fn engine_with_host_weights(
    c: &Checkpoint,
    weight_bytes: u64,
    prefetch_layers: usize,
    request: &Request,
) -> Result<(Engine, Request, u64), String> {
    let whole_mib = |b: f64| (b.max(MIB as f64) as u64).div_ceil(MIB) * MIB;
    let mut host_bytes = whole_mib(weight_bytes as f64 + (64 * MIB) as f64);
    let mut last: Option<(u64, u64)> = None;
    let mut tried = Vec::new();
    for _ in 0..8 {
        let (engine, prepared) = Engine::builder(&c.dir)
            .gpu_mem(0)
            .host_mem(host_bytes)
            .prefetch_layers(prefetch_layers)
            .build_for(request)
            .map_err(|e| e.to_string())?;
        let got = engine
            .manager()
            .stats()
            .budgets
            .get(Tier::Host, TensorKind::Weight);
        if got >= weight_bytes && got < weight_bytes + MIB {
            return Ok((engine, prepared, host_bytes));
        }
        tried.push(format!("{} MiB: {} MiB", host_bytes / MIB, got / MIB));
        drop(engine);
        let slope = match last {
            Some((h, g)) if h != host_bytes => {
                (got as f64 - g as f64) / (host_bytes as f64 - h as f64)
            }
            _ => 1.0,
        };
        let slope = if slope.is_finite() && slope > 0.01 {
            slope.min(1.0)
        } else {
            1.0
        };
        last = Some((host_bytes, got));
        let shortfall = weight_bytes as f64 - got as f64;
        let next = whole_mib(host_bytes as f64 + shortfall / slope);
        // Less than a MiB of host memory short: one MiB more.
        host_bytes = if next == host_bytes && got < weight_bytes {
            host_bytes + MIB
        } else {
            next
        };
    }
    Err(format!(
        "no host memory gives the engine's weight class {} MiB (host memory: weight class tried {})",
        weight_bytes as f64 / MIB as f64,
        tried.join(", ")
    ))
}

/// The prompt of every decode run: a short chat-like prompt, as ids within the vocabulary.
fn prompt_ids(c: &Checkpoint) -> Vec<u32> {
    let vocab = c.config.text.vocab_size as u32;
    [151644u32, 872, 198, 9707, 11, 1879, 13, 151645]
        .iter()
        .map(|id| id % vocab)
        .collect()
}

/// One greedy text decode of `new_tokens` through the engine `vlmem run` uses, built for the
/// checkpoint with no GPU and the host memory whose weight class holds `host_weight_bytes`
/// ([`engine_with_host_weights`]; the engine sizes the other classes itself: the paged KV
/// pool, the vision cache and the step arena's activations), prefetching `prefetch_layers`
/// layers ahead, with `readers` read-ahead readers (default: the runner's).
pub(super) fn decode_run_with(
    c: &Checkpoint,
    host_weight_bytes: u64,
    prefetch_layers: usize,
    new_tokens: usize,
    readers: Option<usize>,
) -> Result<Decode, String> {
    let request = Request::ids(prompt_ids(c))
        .max_new_tokens(new_tokens)
        .sampling(SamplingParams::greedy());
    let (engine, request, host_mem_bytes) =
        engine_with_host_weights(c, host_weight_bytes, prefetch_layers, &request)?;
    let weights = engine.weights();
    if let Some(n) = readers {
        weights.set_stream_readers(n);
    }
    let snapshot = || {
        (
            proc_read_bytes(),
            weights.reader_activity(),
            c.files.first().and_then(|f| BlockStat::of(f)),
        )
    };
    let mut first = None;
    let reply = engine
        .generate(&request, &mut |_| {
            if first.is_none() {
                first = Some(snapshot());
            }
        })
        .map_err(|e| e.to_string())?;
    let last = snapshot();
    let (p0, a0, disk0) = first.ok_or("no token generated")?;
    let block = match (last.2, disk0) {
        (Some(b), Some(a)) => Some(b.since(a)),
        _ => None,
    };
    let busy_ns = last.1.busy_ns.saturating_sub(a0.busy_ns) as f64;
    let depth_ns = last.1.depth_ns.saturating_sub(a0.depth_ns) as f64;
    let steps = reply.ids.len().saturating_sub(1).max(1) as f64;
    let decode_s = reply.timings.decode.as_secs_f64();
    let staging = weights.staging();
    let stats = &reply.stats;
    Ok(Decode {
        tok_s: reply.decode_tokens_per_s(),
        decode_s,
        ttft_s: reply.timings.time_to_first_token.as_secs_f64(),
        arena_peak_bytes: match stats.activations {
            Activations::Arena { peak_bytes, .. } => peak_bytes,
            Activations::InProcess { .. } => 0,
        },
        streamed_bytes_per_token: stats.streamed_bytes_per_decode_token,
        proc_bytes_per_token: match (p0, last.0) {
            (Some(a), Some(b)) => Some(b.saturating_sub(a) as f64 / steps),
            _ => None,
        },
        prefetch_hints: weights.prefetch_hints(),
        kernel_gbps: stats.kernel_read_gb_per_s,
        kernel_share: stats.kernel_share_of_decode,
        staged_taken: staging.stats.hits,
        staged_on_demand: staging.stats.misses,
        staged_max_filling: staging.stats.max_filling,
        staged_allocated: staging.stats.allocated,
        staged_allocated_bytes: staging.stats.allocated_bytes,
        reader_busy_share: if decode_s > 0.0 {
            busy_ns / 1e9 / decode_s
        } else {
            0.0
        },
        reader_mean_depth: if busy_ns > 0.0 {
            depth_ns / busy_ns
        } else {
            0.0
        },
        block,
        streamed_extents: weights
            .streamed_tensors()
            .into_iter()
            .map(|t| (t.file.clone(), t.file_offset_bytes, t.bytes))
            .collect(),
        host_mem_bytes,
        host_weight_budget_bytes: engine
            .manager()
            .stats()
            .budgets
            .get(Tier::Host, TensorKind::Weight),
        kv_blocks: stats.kv_pool.map(|k| k.blocks),
        finish_reason: reply.finish_reason,
        ids: reply.ids,
    })
}

/// The suite's three decode runs, and the disk's speed (GB/s) over the streamed tensors'
/// extents after each streamed run.
pub(super) struct Cases {
    pub(super) resident: Result<Decode, String>,
    pub(super) streamed: Result<Decode, String>,
    pub(super) noprefetch: Result<Decode, String>,
    pub(super) extent_gbps: Vec<f64>,
}

/// The decode cases in the suite's order: every weight resident, streamed with prefetch, and
/// streamed without it; after each streamed run, the disk over the streamed tensors' extents
/// (its figures and notes go to `report`).
pub(super) fn run_cases(report: &mut SuiteReport, ckpt: &Checkpoint, s: &Setup) -> Cases {
    let total = ckpt.total_bytes();
    // All resident: the host budget holds every weight.
    let resident = decode_run(ckpt, total.div_ceil(MIB) * MIB, 2, s.new_tokens);
    // Layers prefetched ahead in the streamed run: the runner's default unless
    // $VLMEM_E2E_PREFETCH_LAYERS says otherwise.
    let ahead = std::env::var("VLMEM_E2E_PREFETCH_LAYERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&k| k > 0)
        .unwrap_or(vlmem_runner::managed::DEFAULT_PREFETCH_LAYERS);
    report
        .notes
        .push(format!("streamed run prefetches {ahead} layer(s) ahead"));
    let streamed = decode_run(ckpt, s.streamed_host_bytes, ahead, s.new_tokens);
    // The disk on exactly the bytes a streamed step reads, in the read-ahead's order, right
    // after the streamed run and after the run without prefetch.
    let extents = streamed
        .as_ref()
        .map(|d| d.streamed_extents.clone())
        .unwrap_or_default();
    let mut extent_gbps = bounds::extent_probe(report, &extents, "after_streamed");
    let noprefetch = decode_run(ckpt, s.streamed_host_bytes, 0, s.new_tokens);
    extent_gbps.extend(bounds::extent_probe(report, &extents, "after_noprefetch"));
    Cases {
        resident,
        streamed,
        noprefetch,
        extent_gbps,
    }
}

impl Cases {
    /// Every run's figures into `report`, a note for each failed run, and a note when the
    /// runs generated different ids.
    pub(super) fn push_figures(&self, report: &mut SuiteReport) {
        let mut ok = Vec::new();
        for (label, r) in [
            ("resident", &self.resident),
            ("streamed", &self.streamed),
            ("streamed_noprefetch", &self.noprefetch),
        ] {
            match r {
                Ok(d) => {
                    push_decode_figures(report, label, d);
                    ok.push(d.ids.clone());
                }
                Err(e) => report.notes.push(format!("{label} failed: {e}")),
            }
        }
        if ok.len() == 3 && !ok.windows(2).all(|w| w[0] == w[1]) {
            report
                .notes
                .push("MISMATCH: the three runs generated different ids".into());
        }
    }
}

/// One run's figures (named `FIGURE.label`) into `report`, and a note on how its engine was
/// built.
fn push_decode_figures(report: &mut SuiteReport, label: &str, d: &Decode) {
    push(report, &format!("decode_tok_s.{label}"), d.tok_s, "tok/s");
    push(report, &format!("ttft_s.{label}"), d.ttft_s, "s");
    push(
        report,
        &format!("step_arena_peak_bytes.{label}"),
        d.arena_peak_bytes as f64,
        "B",
    );
    push(
        report,
        &format!("streamed_bytes_per_token.{label}"),
        d.streamed_bytes_per_token,
        "B",
    );
    if let Some(p) = d.proc_bytes_per_token {
        push(
            report,
            &format!("storage_read_bytes_per_token@procfs.{label}"),
            p,
            "B",
        );
    }
    push(
        report,
        &format!("prefetch_hints.{label}"),
        d.prefetch_hints as f64,
        "count",
    );
    push(
        report,
        &format!("kernel_read_gbps.{label}"),
        d.kernel_gbps,
        "GB/s",
    );
    push(
        report,
        &format!("kernel_share_of_decode.{label}"),
        d.kernel_share,
        "ratio",
    );
    push(
        report,
        &format!("staged_read_ahead.{label}"),
        d.staged_taken as f64,
        "count",
    );
    push(
        report,
        &format!("staged_on_demand.{label}"),
        d.staged_on_demand as f64,
        "count",
    );
    push(
        report,
        &format!("staged_max_fills_in_flight.{label}"),
        d.staged_max_filling as f64,
        "count",
    );
    push(
        report,
        &format!("staging_buffers_allocated.{label}"),
        d.staged_allocated as f64,
        "count",
    );
    push(
        report,
        &format!("staging_bytes_allocated.{label}"),
        d.staged_allocated_bytes as f64,
        "B",
    );
    push(
        report,
        &format!("read_ahead_busy_share.{label}"),
        d.reader_busy_share,
        "ratio",
    );
    push(
        report,
        &format!("read_ahead_mean_depth.{label}"),
        d.reader_mean_depth,
        "reads",
    );
    if let Some(b) = d.block.filter(|b| b.read_bytes > 0) {
        push(
            report,
            &format!("disk_busy_share@sysfs.{label}"),
            b.busy_share(d.decode_s),
            "ratio",
        );
        push(
            report,
            &format!("disk_mean_depth@sysfs.{label}"),
            b.read_ms as f64 / (b.busy_ms.max(1)) as f64,
            "reads",
        );
        push(
            report,
            &format!("disk_request_kib@sysfs.{label}"),
            b.read_bytes as f64 / b.reads.max(1) as f64 / 1024.0,
            "KiB",
        );
        push(
            report,
            &format!("disk_read_gbps@sysfs.{label}"),
            b.read_bytes as f64 / d.decode_s / 1e9,
            "GB/s",
        );
    }
    push(
        report,
        &format!("streamed_read_gbps.{label}"),
        d.streamed_bytes_per_token * d.tok_s / 1e9,
        "GB/s",
    );
    if let Some(blocks) = d.kv_blocks {
        push(
            report,
            &format!("kv_blocks.{label}"),
            blocks as f64,
            "count",
        );
    }
    report.notes.push(format!(
        "{label}: the engine built with {} MiB of host memory, {:.1} MiB of it for weights; KV cache {}; finished by {}",
        d.host_mem_bytes / MIB,
        d.host_weight_budget_bytes as f64 / MIB as f64,
        match d.kv_blocks {
            Some(b) => format!("in the paged pool ({b} blocks)"),
            None => "in process".into(),
        },
        d.finish_reason.as_str(),
    ));
}
