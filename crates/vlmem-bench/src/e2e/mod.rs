//! `vlmem bench e2e`: text decode of a full-size Qwen3-VL-2B (random bf16 weights, synthesized
//! once into a cache folder and reused) through the engine `vlmem run` and `vlmem chat` use
//! ([`vlmem_runner::Engine`]: the memory manager, the managed weights, the paged KV pool, the
//! vision cache, the step arena), beside the machine's own bounds measured in the same run.
//! Each decode run builds an engine for the checkpoint with no GPU (`gpu_mem(0)`) and the host
//! memory (`host_mem`) whose weight class is the run's weight budget (the engine sizes the
//! other classes itself), and runs one greedy request of prompt ids.
//!
//! Figures:
//! - `decode_tok_s.resident`: every weight in host RAM (the manager's host tier), decode
//!   through the bf16 kernel on the pinned bytes;
//! - `decode_tok_s.streamed`: 1 GiB of host RAM for weights, the rest read every token from
//!   the checkpoint on the disk tier (O_DIRECT, so the page cache does not help), with the
//!   next 2 layers prefetched while one computes; `decode_tok_s.streamed_noprefetch`: the same
//!   without prefetch;
//! - `decode_tok_s.bound`: the streamed case's disk bound, the disk's best read bandwidth
//!   over the bytes read from disk per token. The disk is measured in the same run, before
//!   and after the streamed runs, with the disk tier's own O_DIRECT reads of 4 MiB (the
//!   read-ahead's piece size) from 1, 2, 4 and 8 threads at once (queue depth) and with
//!   `dd iflag=direct` (depth 1); the best of all of them counts, and `@dd` keeps the bound
//!   from `dd` alone (the first bound used, which understates a disk that serves more at
//!   depth), `@depth_mean` the one from the best depth's mean of before and after;
//!   `@streamed_extents` the one from the disk read over exactly the streamed tensors'
//!   extents, in the read-ahead's order, at depths 1 and 4, right after the streamed run and
//!   after the run without prefetch (`streamed_over_extents_bound` sets streamed against
//!   min(that, resident): the read-ahead against the disk on the same bytes);
//!   `decode_tok_s.overlap_bound`: min(bound, resident), the speed of a step whose disk reads
//!   and compute fully overlap (the target: streamed >= 85% of it);
//! - `decode_tok_s.resident@membw_bound`: memory read bandwidth (vectorized reads on all
//!   cores, in the same run) over the weight bytes one decode step reads (target: resident
//!   >= 70% of it);
//! - the ratios, the bandwidths, bytes per token (the manager's count and the kernel's
//!   `/proc/self/io` count of bytes read from storage), time to first token, and the KV
//!   blocks each request held in the engine's paged pool (`kv_blocks`);
//! - how the disk was used over the decode steps: the read-ahead's own count of time with a
//!   read in flight and how many (`read_ahead_busy_share`, `read_ahead_mean_depth`), and the
//!   block device's counters (`disk_*@sysfs`: busy share, requests in flight, mean request
//!   size, read rate; Linux, when the checkpoint is on a block device);
//! - the weight formats side by side, resident ([`formats`]): `decode_tok_s.{bf16,q8_0,q4_k}`,
//!   `prefill_tok_s.{bf16,q8_0,q4_k}` (a 512-id prompt) and `ttft_s.image_1024` (one
//!   1024 x 1024 image, q8_0), the quantized copies written once into the cache folder;
//! - with `--peers` ([`run_with_peers`]), llama.cpp on the same text decoder's shapes and
//!   threads (`decode_tok_s.FMT@llama_cpp`, `prefill_tok_s.FMT@llama_cpp` for bf16, q8_0 and
//!   q4_k) and vlmem / llama.cpp where vlmem has the figure (`FIGURE.FMT_over_llama_cpp`),
//!   through a Python environment kept under the cache folder ([`peers`]).
//!
//! The checkpoint goes to `$VLMEM_CACHE/qwen3-vl-2b-synth` (default
//! `~/.cache/vlmem/qwen3-vl-2b-synth`). `--quick` uses a scaled-down config (4 layers,
//! hidden 1024, vocab 32768; a 96 MiB RAM budget) so CI can smoke it in seconds.

mod bounds;
pub(crate) mod decode;
mod formats;
pub mod peers;

pub use peers::{PeerError, peer_table};

use crate::{BenchOptions, BenchResult, SuiteReport};
use bounds::DiskBest;
use decode::Cases;
use std::path::Path;
use std::time::Instant;
use vlmem_qwen3vl::Qwen3VlConfig;
use vlmem_qwen3vl::checkpoint::Checkpoint;
use vlmem_qwen3vl::synth::{SynthOptions, synth_config};
use vlmem_runner::kernels;

pub(crate) const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// The model of the full run.
pub const MODEL: &str = "qwen3-vl-2b";

/// What one setting of the suite runs (`vlmem bench serve` runs the same checkpoints).
pub(crate) struct Setup {
    pub(crate) name: &'static str,
    /// The scaled-down setting (`--quick`).
    quick: bool,
    pub(crate) cfg: Qwen3VlConfig,
    /// The streamed runs' host budget for weights (the engine's host memory is sized so that
    /// its weight class holds this).
    pub(crate) streamed_host_bytes: u64,
    new_tokens: usize,
    membw_buffer_bytes: usize,
    dd_bytes: u64,
    /// Bytes the O_DIRECT probe reads at each depth.
    probe_bytes: u64,
}

pub(crate) fn setup(opts: BenchOptions) -> Option<Setup> {
    let mut cfg = vlmem_qwen3vl::catalog::config(MODEL)?;
    if opts.quick {
        let t = &mut cfg.text;
        t.num_hidden_layers = 4;
        t.hidden_size = 1024;
        t.intermediate_size = 3072;
        t.num_attention_heads = 8;
        t.num_key_value_heads = 4;
        t.vocab_size = 32768;
        cfg.vision.depth = 1;
        cfg.vision.deepstack_visual_indexes = vec![0];
        cfg.vision.out_hidden_size = 1024;
        // The vision tokens inside the smaller vocabulary, so the image request runs.
        let top = t.vocab_size as u32;
        (
            cfg.vision_start_token_id,
            cfg.vision_end_token_id,
            cfg.image_token_id,
            cfg.video_token_id,
        ) = (top - 4, top - 3, top - 2, top - 1);
        Some(Setup {
            name: "qwen3-vl-2b-quick-synth",
            quick: true,
            cfg,
            // Above the 64 MiB lm_head, which at a 64 MiB budget would fill it alone each
            // token and leave nothing kept.
            streamed_host_bytes: 96 * MIB,
            new_tokens: 4,
            membw_buffer_bytes: 256 << 20,
            dd_bytes: 128 * MIB,
            probe_bytes: 64 * MIB,
        })
    } else {
        Some(Setup {
            name: "qwen3-vl-2b-synth",
            quick: false,
            cfg,
            streamed_host_bytes: GIB,
            new_tokens: 8,
            membw_buffer_bytes: 2 << 30,
            dd_bytes: 2 * GIB,
            probe_bytes: GIB,
        })
    }
}

/// The cache folder the engine's quantized copies also use: `$VLMEM_CACHE`, else
/// `~/.cache/vlmem`, else the temp folder.
pub use vlmem_qwen3vl::quantize::cache_root;

/// The synthesized checkpoint in `dir`, made once: a folder with a `complete` marker and the
/// configuration asked for is reused; anything else there is replaced.
fn ensure_checkpoint(dir: &Path, cfg: &Qwen3VlConfig) -> Result<(Checkpoint, String), String> {
    let marker = dir.join("complete");
    if marker.exists()
        && let Ok(c) = Checkpoint::open(dir)
        && c.config == *cfg
    {
        return Ok((c, format!("checkpoint {} (reused)", dir.display())));
    }
    let started = Instant::now();
    let tmp = dir.with_extension("partial");
    let _ = std::fs::remove_dir_all(&tmp);
    synth_config(cfg.clone(), &tmp, &SynthOptions::default()).map_err(|e| e.to_string())?;
    let _ = std::fs::remove_dir_all(dir);
    std::fs::rename(&tmp, dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    std::fs::write(&marker, b"synthesized by vlmem bench e2e\n")
        .map_err(|e| format!("{}: {e}", marker.display()))?;
    let c = Checkpoint::open(dir).map_err(|e| e.to_string())?;
    Ok((
        c,
        format!(
            "checkpoint {} (synthesized in {:.1} s)",
            dir.display(),
            started.elapsed().as_secs_f64()
        ),
    ))
}

/// Weight bytes one decode step reads: every text layer (for MoE layers only the routed
/// experts' share), the final norm and lm_head (the embedding when tied).
fn step_bytes(c: &Checkpoint) -> u64 {
    let t = &c.config.text;
    let head = if t.tie_word_embeddings {
        "model.language_model.embed_tokens.weight"
    } else {
        "lm_head.weight"
    };
    c.tensors
        .iter()
        .map(|info| {
            let n = &info.name;
            if n == head || n == "model.language_model.norm.weight" {
                info.bytes
            } else if n.starts_with("model.language_model.layers.") {
                match (&t.moe, n.contains(".mlp.experts.")) {
                    (Some(m), true) => info.bytes / m.num_experts.max(1) * m.num_experts_per_tok,
                    _ => info.bytes,
                }
            } else {
                0
            }
        })
        .sum()
}

/// Adds the figure `name` to `r`.
fn push(r: &mut SuiteReport, name: &str, value: f64, unit: &str) {
    r.results.push(BenchResult::new(name, value, unit));
}

/// Runs the suite.
pub fn run(opts: BenchOptions) -> SuiteReport {
    let mut report = SuiteReport {
        suite: "e2e".into(),
        results: Vec::new(),
        notes: Vec::new(),
    };
    let Some((s, ckpt)) = open(opts, &mut report) else {
        return report;
    };
    let step = step_bytes(&ckpt);
    describe(&mut report, &s, &ckpt, step);
    let membw = bounds::mem_read_gbps(s.membw_buffer_bytes);
    push(&mut report, "mem_read_gbps", membw, "GB/s");
    let direct_before = bounds::direct_probe(&mut report, &ckpt, s.probe_bytes, "before");
    let dd_before = bounds::dd_read_gbps(&ckpt, s.dd_bytes);
    let cases = decode::run_cases(&mut report, &ckpt, &s);
    let dd_after = bounds::dd_read_gbps(&ckpt, s.dd_bytes);
    let direct_after = bounds::direct_probe(&mut report, &ckpt, s.probe_bytes, "after");
    let disk = bounds::disk_best(
        &mut report,
        dd_before,
        dd_after,
        &direct_before,
        &direct_after,
    );
    cases.push_figures(&mut report);
    push_bounds(&mut report, &cases, &disk, membw, step);
    formats::run_formats(&mut report, &ckpt, &s, &cache_root());
    report
}

/// The suite with llama.cpp measured in the same run (`--peers`, [`peers`]): the Python
/// environment and the GGUF files are made (or reused) first, so that a missing Python or a
/// failed install stops the suite before minutes of measuring; llama.cpp runs after vlmem's
/// cases, and its figures are set against vlmem's of the same names.
pub fn run_with_peers(opts: BenchOptions) -> Result<SuiteReport, PeerError> {
    let Some(s) = setup(opts) else {
        return Ok(run(opts));
    };
    let prepared = peers::prepare(&s.cfg, s.name, opts.quick)?;
    let mut report = run(opts);
    peers::measure(&prepared, &mut report);
    Ok(report)
}

/// The setting of `opts` and its checkpoint, synthesized or reused (a note in `report`);
/// `None`, with a note saying why, when there is none.
pub(crate) fn open(opts: BenchOptions, report: &mut SuiteReport) -> Option<(Setup, Checkpoint)> {
    let Some(s) = setup(opts) else {
        report.notes.push(format!("{MODEL} is not in the catalog"));
        return None;
    };
    let dir = cache_root().join(s.name);
    if let Err(e) = std::fs::create_dir_all(cache_root()) {
        report
            .notes
            .push(format!("{}: {e}", cache_root().display()));
        return None;
    }
    let (ckpt, note) = match ensure_checkpoint(&dir, &s.cfg) {
        Ok(x) => x,
        Err(e) => {
            report.notes.push(format!("synth failed: {e}"));
            return None;
        }
    };
    report.notes.push(note);
    Some((s, ckpt))
}

/// The checkpoint's and the kernels' note, and the weight bytes a decode step reads.
fn describe(report: &mut SuiteReport, s: &Setup, ckpt: &Checkpoint, step: u64) {
    let total = ckpt.total_bytes();
    report.notes.push(format!(
        "{} text layers, {:.3} GB of weights, {:.3} GB read per decode step; {} decode tokens per run after the first; kernels: {} on {} threads",
        ckpt.config.text.num_hidden_layers,
        total as f64 / 1e9,
        step as f64 / 1e9,
        s.new_tokens - 1,
        kernels::isa(),
        bounds::threads(),
    ));
    push(report, "weight_bytes_per_token", step as f64, "B");
}

/// The bounds the decodes are set against (memory bandwidth, the disk's) and the ratios of
/// the measured speeds to them, into `report`.
fn push_bounds(report: &mut SuiteReport, cases: &Cases, disk: &DiskBest, membw: f64, step: u64) {
    let Cases {
        resident,
        streamed,
        noprefetch,
        extent_gbps,
    } = cases;
    let (disk_gbps, dd_gbps, depth_mean) = (disk.gbps, disk.dd_gbps, disk.depth_mean_gbps);
    let membw_bound = membw * 1e9 / step as f64;
    push(
        report,
        "decode_tok_s.resident@membw_bound",
        membw_bound,
        "tok/s",
    );
    if let Ok(r) = &resident {
        let ratio = r.tok_s / membw_bound;
        push(report, "resident_over_membw_bound", ratio, "ratio");
        report.notes.push(format!(
            "resident: {:.2} tok/s = {:.0}% of the memory-bandwidth bound {:.2} tok/s (target >= 70%): {}",
            r.tok_s,
            ratio * 100.0,
            membw_bound,
            if ratio >= 0.70 { "met" } else { "MISSED" }
        ));
    }
    if let (Ok(st), Ok(res)) = (&streamed, &resident)
        && disk_gbps.is_finite()
        && st.streamed_bytes_per_token > 0.0
    {
        let bound = disk_gbps * 1e9 / st.streamed_bytes_per_token;
        push(report, "decode_tok_s.bound", bound, "tok/s");
        if dd_gbps.is_finite() {
            push(
                report,
                "decode_tok_s.bound@dd",
                dd_gbps * 1e9 / st.streamed_bytes_per_token,
                "tok/s",
            );
        }
        if depth_mean.is_finite() {
            push(
                report,
                "decode_tok_s.bound@depth_mean",
                depth_mean * 1e9 / st.streamed_bytes_per_token,
                "tok/s",
            );
        }
        // The bound if only what cannot fit the budget were read (no staging area set apart).
        let min_bytes = step.saturating_sub(st.host_weight_budget_bytes).max(1) as f64;
        push(
            report,
            "decode_tok_s.bound@min_bytes",
            disk_gbps * 1e9 / min_bytes,
            "tok/s",
        );
        let overlap = bound.min(res.tok_s);
        push(report, "decode_tok_s.overlap_bound", overlap, "tok/s");
        let ratio = st.tok_s / overlap;
        push(report, "streamed_over_overlap_bound", ratio, "ratio");
        report.notes.push(format!(
            "streamed: {:.3} tok/s = {:.0}% of min(bound {:.3}, resident {:.2}) tok/s (target >= 85%): {}; {:.3} GB from disk per token at {:.2} GB/s (the disk's best, depth {}), read at {:.2} GB/s",
            st.tok_s,
            ratio * 100.0,
            bound,
            res.tok_s,
            if ratio >= 0.85 { "met" } else { "MISSED" },
            st.streamed_bytes_per_token / 1e9,
            disk_gbps,
            disk.depth,
            st.streamed_bytes_per_token * st.tok_s / 1e9,
        ));
        let extent_best = extent_gbps.iter().copied().fold(f64::NAN, f64::max);
        if extent_best.is_finite() {
            let extent_bound = extent_best * 1e9 / st.streamed_bytes_per_token;
            push(
                report,
                "decode_tok_s.bound@streamed_extents",
                extent_bound,
                "tok/s",
            );
            let ratio = st.tok_s / extent_bound.min(res.tok_s);
            push(report, "streamed_over_extents_bound", ratio, "ratio");
            report.notes.push(format!(
                "streamed against the disk on its own bytes (the streamed tensors' extents, in use order, best of depths {:?} after each streamed run: {:.2} GB/s): {:.0}%",
                bounds::EXTENT_PROBE_DEPTHS,
                extent_best,
                ratio * 100.0
            ));
        }
        if let Ok(np) = &noprefetch {
            push(
                report,
                "streamed_over_noprefetch",
                st.tok_s / np.tok_s,
                "ratio",
            );
            // How well reads and compute overlapped, whatever the disk's speed: the share of
            // the decode steps the disk had a request in flight, by the kernel's own count.
            if let (Some(a), Some(b)) = (st.block, np.block)
                && a.read_bytes > 0
                && b.read_bytes > 0
            {
                report.notes.push(format!(
                    "the disk was busy {:.0}% of the streamed decode with prefetch ({:.2} GB/s while busy), {:.0}% without",
                    a.busy_share(st.decode_s) * 100.0,
                    a.gbps_while_busy(),
                    b.busy_share(np.decode_s) * 100.0,
                ));
            }
        }
    }
}

/// The streamed case (1 GiB for weights, prefetch on) with each number of read-ahead
/// readers in `readers`, `rounds` times over, alternating; before each decode, the disk
/// tier's O_DIRECT probe at the same depth. One line per run: readers, decode tok/s, the
/// read-ahead's GB/s, the probe's GB/s. For choosing `STREAM_READERS` on a disk whose speed
/// moves from one second to the next (`cargo run --release -p vlmem-bench --example
/// stream_sweep`).
pub fn reader_sweep(readers: &[usize], rounds: usize) -> Vec<String> {
    let Some(s) = setup(BenchOptions { quick: false }) else {
        return vec![format!("{MODEL} is not in the catalog")];
    };
    let (ckpt, note) = match ensure_checkpoint(&cache_root().join(s.name), &s.cfg) {
        Ok(x) => x,
        Err(e) => return vec![format!("synth failed: {e}")],
    };
    let mut out = vec![note];
    for round in 0..rounds {
        for &n in readers {
            let probe = bounds::direct_read_gbps(&ckpt, n, s.probe_bytes).unwrap_or(f64::NAN);
            match decode::decode_run_with(&ckpt, s.streamed_host_bytes, 2, s.new_tokens, Some(n)) {
                Ok(d) => out.push(format!(
                    "round {round} readers {n}: {:.3} tok/s, read {:.3} GB/s, probe at depth {n} {probe:.3} GB/s, on demand {}",
                    d.tok_s,
                    d.streamed_bytes_per_token * d.tok_s / 1e9,
                    d.staged_on_demand
                )),
                Err(e) => out.push(format!("round {round} readers {n}: {e}")),
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::bounds::{EXTENT_PROBE_DEPTHS, direct_read_gbps, extents_read_gbps, mem_read_gbps};
    use super::decode::decode_run;
    use super::*;
    use vlmem_runner::FinishReason;

    /// The quick suite synthesizes its small checkpoint (or reuses it), reports every named
    /// figure with sane values, streams from disk only in the streamed runs, and the three
    /// runs agree on the generated ids.
    #[test]
    fn quick_e2e_reports_every_figure() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ckpt");
        let s = setup(BenchOptions { quick: true }).unwrap();
        let (c, _) = ensure_checkpoint(&dir, &s.cfg).unwrap();
        let (_, note) = ensure_checkpoint(&dir, &s.cfg).unwrap();
        assert!(note.contains("reused"), "{note}");
        assert!(step_bytes(&c) < c.total_bytes());
        let resident = decode_run(&c, c.total_bytes().div_ceil(MIB) * MIB, 2, 3).unwrap();
        let streamed = decode_run(&c, s.streamed_host_bytes, 2, 3).unwrap();
        let plain = decode_run(&c, s.streamed_host_bytes, 0, 3).unwrap();
        assert_eq!(resident.ids, streamed.ids);
        assert_eq!(resident.ids, plain.ids);
        assert!(resident.tok_s > 0.0 && streamed.tok_s > 0.0);
        // Every run goes through the engine: its activations in the manager's step arena,
        // its KV cache in the paged pool, the whole request generated.
        for d in [&resident, &streamed, &plain] {
            assert!(d.arena_peak_bytes > 0);
            assert!(d.kv_blocks.is_some_and(|b| b > 0), "{:?}", d.kv_blocks);
            assert_eq!(d.ids.len(), 3);
            assert_eq!(d.finish_reason, FinishReason::Length);
        }
        // The engine's weight class holds what each run asked for, and no more than a MiB
        // over it for the streamed runs (so they stream what they did with the hand-made
        // split).
        assert!(resident.host_weight_budget_bytes >= c.total_bytes());
        for d in [&streamed, &plain] {
            assert!(d.host_weight_budget_bytes >= s.streamed_host_bytes);
            assert!(d.host_weight_budget_bytes < s.streamed_host_bytes + MIB);
        }
        assert_eq!(resident.streamed_bytes_per_token, 0.0);
        // The streamed runs read what does not fit: at least the step's bytes beyond the
        // budget, every token.
        let beyond = step_bytes(&c) as f64 - s.streamed_host_bytes as f64;
        assert!(streamed.streamed_bytes_per_token >= beyond * 0.9);
        assert!(plain.streamed_bytes_per_token >= beyond * 0.9);
        assert!(streamed.prefetch_hints > 0);
        assert_eq!(plain.prefetch_hints, 0);
        assert!(mem_read_gbps(64 << 20) > 0.1);
        for depth in [1, 4] {
            let v = direct_read_gbps(&c, depth, 16 * MIB).unwrap();
            assert!(v > 0.0 && v.is_finite(), "depth {depth}: {v}");
        }
        // The streamed extents are what a step reads from disk: none when all is resident;
        // when streamed, at least what does not fit and at most a whole step, each inside
        // its file, and the probe reads them at every depth.
        assert!(resident.streamed_extents.is_empty());
        let extents = &streamed.streamed_extents;
        let sum: u64 = extents.iter().map(|e| e.2).sum();
        assert!(sum as f64 >= beyond * 0.9 && sum <= step_bytes(&c), "{sum}");
        for (file, offset, len) in extents {
            assert!(offset + len <= std::fs::metadata(file).unwrap().len());
        }
        assert_eq!(
            &plain.streamed_extents, extents,
            "the plan does not depend on prefetch"
        );
        for depth in EXTENT_PROBE_DEPTHS {
            let v = extents_read_gbps(extents, depth).unwrap();
            assert!(v > 0.0 && v.is_finite(), "depth {depth}: {v}");
        }
        assert!(extents_read_gbps(&[], 1).is_err());
        // The read-ahead's activity: none when nothing streams or prefetch is off; when it
        // reads ahead, busy for part of the decode, never deeper than its readers. The
        // staging area allocates its buffers once (the quick run's area holds a few).
        assert_eq!(
            (resident.reader_busy_share, plain.reader_busy_share),
            (0.0, 0.0)
        );
        assert!(
            streamed.reader_busy_share > 0.0 && streamed.reader_busy_share <= 1.05,
            "{}",
            streamed.reader_busy_share
        );
        let readers = vlmem_runner::managed::STREAM_READERS as f64;
        assert!(
            streamed.reader_mean_depth >= 1.0 && streamed.reader_mean_depth <= readers + 1e-9,
            "{}",
            streamed.reader_mean_depth
        );
        assert_eq!(resident.staged_allocated, 0);
        assert!(streamed.staged_allocated > 0 && streamed.staged_allocated_bytes > 0);
        assert!(
            streamed.staged_allocated < streamed.staged_taken,
            "buffers are reused"
        );
    }
}
