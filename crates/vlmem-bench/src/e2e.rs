//! `vlmem bench e2e`: text decode of a full-size Qwen3-VL-2B (random bf16 weights, synthesized
//! once into a cache folder and reused) through the memory manager, beside the machine's own
//! bounds measured in the same run.
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
//!   `/proc/self/io` count of bytes read from storage) and time to first token;
//! - how the disk was used over the decode steps: the read-ahead's own count of time with a
//!   read in flight and how many (`read_ahead_busy_share`, `read_ahead_mean_depth`), and the
//!   block device's counters (`disk_*@sysfs`: busy share, requests in flight, mean request
//!   size, read rate; Linux, when the checkpoint is on a block device).
//!
//! The checkpoint goes to `$VLMEM_CACHE/qwen3-vl-2b-synth` (default
//! `~/.cache/vlmem/qwen3-vl-2b-synth`). `--quick` uses a scaled-down config (4 layers,
//! hidden 1024, vocab 32768; a 96 MiB RAM budget) so CI can smoke it in seconds.

use crate::{BenchOptions, BenchResult, SuiteReport};
use candle_core::Device;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;
use vlmem::{Budgets, ManagerConfig, MemoryManager, TensorKind, Tier};
use vlmem_qwen3vl::Qwen3VlConfig;
use vlmem_qwen3vl::checkpoint::Checkpoint;
use vlmem_qwen3vl::synth::{SynthOptions, synth_config};
use vlmem_runner::{GenerateOptions, ManagedWeights, Qwen3Vl, kernels};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// The model of the full run.
pub const MODEL: &str = "qwen3-vl-2b";

/// What one setting of the suite runs.
struct Setup {
    name: &'static str,
    cfg: Qwen3VlConfig,
    streamed_host_bytes: u64,
    new_tokens: usize,
    membw_buffer_bytes: usize,
    dd_bytes: u64,
    /// Bytes the O_DIRECT probe reads at each depth.
    probe_bytes: u64,
}

fn setup(opts: BenchOptions) -> Option<Setup> {
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
        Some(Setup {
            name: "qwen3-vl-2b-quick-synth",
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
            cfg,
            streamed_host_bytes: GIB,
            new_tokens: 8,
            membw_buffer_bytes: 2 << 30,
            dd_bytes: 2 * GIB,
            probe_bytes: GIB,
        })
    }
}

/// `$VLMEM_CACHE`, else `~/.cache/vlmem`, else the temp folder.
pub fn cache_root() -> PathBuf {
    if let Some(d) = std::env::var_os("VLMEM_CACHE") {
        return PathBuf::from(d);
    }
    match std::env::var_os("HOME") {
        Some(h) => PathBuf::from(h).join(".cache").join("vlmem"),
        None => std::env::temp_dir().join("vlmem-cache"),
    }
}

/// The synthesized checkpoint in `dir`, made once: a folder with a `complete` marker is
/// reused; anything else there is replaced.
fn ensure_checkpoint(dir: &Path, cfg: &Qwen3VlConfig) -> Result<(Checkpoint, String), String> {
    let marker = dir.join("complete");
    if marker.exists()
        && let Ok(c) = Checkpoint::open(dir)
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

/// Bytes this process has read from storage (`read_bytes` of /proc/self/io: block-layer
/// reads, O_DIRECT included, page-cache hits excluded); `None` where unavailable.
fn proc_read_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/io").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("read_bytes:"))
        .and_then(|v| v.trim().parse().ok())
}

/// The block device's own counters (`/sys/dev/block/MAJ:MIN/stat`, Linux) for the device
/// holding `file`: what the kernel saw the disk do, whoever asked.
#[derive(Debug, Clone, Copy, Default)]
struct BlockStat {
    /// Read requests completed (after the block layer merged or split them).
    reads: u64,
    /// Bytes read (sectors of 512 bytes).
    read_bytes: u64,
    /// Milliseconds reads spent in flight, summed over reads (so the mean depth of the reads
    /// in flight is `read_ms / busy_ms`).
    read_ms: u64,
    /// Milliseconds with at least one request in flight (`io_ticks`).
    busy_ms: u64,
}

impl BlockStat {
    /// The counters of the device `file` lives on; `None` off Linux, for a file on no block
    /// device (tmpfs, overlay), or when the counters cannot be read.
    fn of(file: &Path) -> Option<BlockStat> {
        use std::os::unix::fs::MetadataExt;
        let dev = std::fs::metadata(file).ok()?.dev();
        // glibc's gnu_dev_major / gnu_dev_minor.
        let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
        let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
        let text = std::fs::read_to_string(format!("/sys/dev/block/{major}:{minor}/stat")).ok()?;
        let f: Vec<u64> = text
            .split_whitespace()
            .map(|v| v.parse().ok())
            .collect::<Option<_>>()?;
        Some(BlockStat {
            reads: *f.first()?,
            read_bytes: f.get(2)?.saturating_mul(512),
            read_ms: *f.get(3)?,
            busy_ms: *f.get(9)?,
        })
    }

    /// The share of `secs` the device had a request in flight.
    fn busy_share(self, secs: f64) -> f64 {
        self.busy_ms as f64 / (secs * 1e3)
    }

    /// GB/s read while the device was busy.
    fn gbps_while_busy(self) -> f64 {
        self.read_bytes as f64 / (self.busy_ms.max(1) as f64 * 1e6)
    }

    fn since(self, earlier: BlockStat) -> BlockStat {
        BlockStat {
            reads: self.reads.saturating_sub(earlier.reads),
            read_bytes: self.read_bytes.saturating_sub(earlier.read_bytes),
            read_ms: self.read_ms.saturating_sub(earlier.read_ms),
            busy_ms: self.busy_ms.saturating_sub(earlier.busy_ms),
        }
    }
}

/// Memory read bandwidth in GB/s: the best of several vectorized reads (with software
/// prefetch) of a buffer much larger than the caches, on all cores, on huge pages like the
/// host arena's.
fn mem_read_gbps(len: usize) -> f64 {
    let mut mem = match vlmem_tier::HostBuffer::new(len, true) {
        Ok(m) => m,
        Err(_) => return 0.0,
    };
    for (i, b) in mem.as_mut_slice().iter_mut().enumerate() {
        *b = (i as u8) | 1;
    }
    let buf = mem.as_slice();
    let mut best = 0f64;
    let mut check = 0u64;
    for _ in 0..10 {
        let t = Instant::now();
        check = check.wrapping_add(kernels::read_bandwidth_probe(buf));
        let s = t.elapsed().as_secs_f64();
        best = best.max(len as f64 / s / 1e9);
    }
    std::hint::black_box(check);
    best
}

/// `dd if=FILE of=/dev/null bs=4M iflag=direct` over `bytes` of the largest weight file:
/// the disk's sequential O_DIRECT read speed in GB/s.
fn dd_read_gbps(c: &Checkpoint, bytes: u64) -> Result<f64, String> {
    let (file, len) = c
        .files
        .iter()
        .filter_map(|f| std::fs::metadata(f).ok().map(|m| (f, m.len())))
        .max_by_key(|(_, l)| *l)
        .ok_or("no weight file")?;
    let block = 4 * MIB;
    let count = (bytes.min(len) / block).max(1);
    let t = Instant::now();
    let out = Command::new("dd")
        .arg(format!("if={}", file.display()))
        .arg("of=/dev/null")
        .arg("bs=4M")
        .arg(format!("count={count}"))
        .arg("iflag=direct")
        .output()
        .map_err(|e| format!("dd: {e}"))?;
    let s = t.elapsed().as_secs_f64();
    if !out.status.success() {
        return Err(format!(
            "dd: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok((count * block) as f64 / s / 1e9)
}

/// Queue depths of the O_DIRECT disk probe.
const PROBE_DEPTHS: [usize; 4] = [1, 2, 4, 8];

/// Queue depths of the probe over the streamed tensors' own extents: one reader, and the
/// read-ahead's four.
const EXTENT_PROBE_DEPTHS: [usize; 2] = [1, 4];

/// Bytes per read of the O_DIRECT disk probe: the read-ahead's piece size.
const PROBE_READ_BYTES: u64 = 4 * MIB;

/// The disk's O_DIRECT sequential read speed in GB/s at queue depth `depth`, measured with
/// the disk tier's own reads (the read-ahead's path): the first `bytes` of the largest weight
/// file registered as one extent, read in [`PROBE_READ_BYTES`] pieces (in file order, each
/// to the next free thread) by `depth` threads into page-aligned buffers.
fn direct_read_gbps(c: &Checkpoint, depth: usize, bytes: u64) -> Result<f64, String> {
    let (file, len) = c
        .files
        .iter()
        .filter_map(|f| std::fs::metadata(f).ok().map(|m| (f, m.len())))
        .max_by_key(|(_, l)| *l)
        .ok_or("no weight file")?;
    let span = bytes.min(len) / PROBE_READ_BYTES * PROBE_READ_BYTES;
    if span == 0 {
        return Err(format!("{} is too small", file.display()));
    }
    extents_read_gbps(&[(file.clone(), 0, span)], depth)
}

/// [`direct_read_gbps`] over the given extents (file, offset, bytes) in their order, each cut
/// into [`PROBE_READ_BYTES`] pieces: the disk's speed on exactly the bytes a streamed decode
/// step reads, in the order the read-ahead reads them.
fn extents_read_gbps(extents: &[(PathBuf, u64, u64)], depth: usize) -> Result<f64, String> {
    let manager = MemoryManager::new(ManagerConfig::with_capacities(0, 64 * MIB, 64 * MIB))
        .map_err(|e| e.to_string())?;
    let mut pieces = Vec::new();
    for (file, offset, len) in extents {
        let h = manager
            .register_extent(file, *offset, *len, TensorKind::Weight, 0)
            .map_err(|e| e.to_string())?;
        let mut at = 0;
        while at < *len {
            let n = PROBE_READ_BYTES.min(len - at);
            pieces.push((h, at, n as usize, offset + at));
            at += n;
        }
    }
    let total: u64 = extents.iter().map(|e| e.2).sum();
    if total == 0 {
        return Err("nothing to read".into());
    }
    let next = AtomicUsize::new(0);
    let t = Instant::now();
    let ok = std::thread::scope(|scope| {
        let readers: Vec<_> = (0..depth)
            .map(|_| {
                scope.spawn(|| -> Result<(), String> {
                    // Like the read-ahead's buffers: on huge pages, and each read placed at
                    // its file offset's phase, so the disk tier reads straight into it.
                    let align = vlmem_tier::IO_ALIGN_BYTES;
                    let mut buf = vlmem_tier::AlignedBuf::new(PROBE_READ_BYTES as usize + align)
                        .map_err(|e| e.to_string())?;
                    loop {
                        let Some(&(h, at, n, file_at)) =
                            pieces.get(next.fetch_add(1, Ordering::Relaxed))
                        else {
                            return Ok(());
                        };
                        let phase = (file_at % align as u64) as usize;
                        manager
                            .read(h, at, &mut buf.as_mut_slice()[phase..phase + n])
                            .map_err(|e| e.to_string())?;
                    }
                })
            })
            .collect();
        readers
            .into_iter()
            .map(|r| r.join().unwrap_or_else(|_| Err("reader panicked".into())))
            .collect::<Result<Vec<()>, String>>()
    });
    let s = t.elapsed().as_secs_f64();
    ok?;
    Ok(total as f64 / s / 1e9)
}

/// One decode measurement.
struct Decode {
    tok_s: f64,
    /// Seconds of the timed decode steps.
    decode_s: f64,
    ttft_s: f64,
    /// Bytes of the step arena the decode steps used at most (0: they ran outside it).
    arena_peak_bytes: u64,
    /// Bytes into the host tier plus bytes staged, per decode step.
    streamed_bytes_per_token: f64,
    /// /proc/self/io read_bytes per decode step.
    proc_bytes_per_token: Option<f64>,
    prefetch_hints: u64,
    /// The decode kernels' read speed over the decode steps (GB/s) and their share of them.
    kernel_gbps: f64,
    kernel_share: f64,
    /// Streamed tensors read ahead into the staging area and taken, and read on demand.
    staged_taken: u64,
    staged_on_demand: u64,
    /// Most fills in flight at once in the staging area.
    staged_max_filling: u64,
    /// Staging buffers allocated over the whole run (prompt included), and their bytes.
    staged_allocated: u64,
    staged_allocated_bytes: u64,
    /// Share of the decode steps during which the read-ahead had a read in flight, and the
    /// mean number in flight while it had (0 when nothing was read ahead).
    reader_busy_share: f64,
    reader_mean_depth: f64,
    /// The disk's own counters over the decode steps (see [`BlockStat`]).
    block: Option<BlockStat>,
    /// The streamed weights' extents in the checkpoint (file, offset, bytes), in use order.
    streamed_extents: Vec<(PathBuf, u64, u64)>,
    ids: Vec<u32>,
}

fn decode_run(
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

fn decode_run_with(
    c: &Checkpoint,
    host_weight_bytes: u64,
    prefetch_layers: usize,
    new_tokens: usize,
    readers: Option<usize>,
) -> Result<Decode, String> {
    let host_bytes = (host_weight_bytes + 64 * MIB).div_ceil(MIB) * MIB;
    let disk_bytes = 64 * MIB;
    let mut config = ManagerConfig::with_capacities(0, host_bytes, disk_bytes);
    config.budgets = Budgets::default_split([0, host_bytes, disk_bytes]);
    config.budgets.bytes[Tier::Host.index()][TensorKind::Weight.index()] = host_weight_bytes;
    let manager = MemoryManager::new(config).map_err(|e| e.to_string())?;
    let weights = Arc::new(
        ManagedWeights::register(manager.clone(), c, Tier::Host, &Device::Cpu)
            .map_err(|e| e.to_string())?,
    );
    weights.set_prefetch_layers(prefetch_layers);
    if let Some(n) = readers {
        weights.set_stream_readers(n);
    }
    let model =
        Qwen3Vl::new(c.config.clone(), weights.clone(), &Device::Cpu).map_err(|e| e.to_string())?;
    // Decode steps keep their activations in a step arena on the host, as `vlmem run` does.
    model.use_step_arena(manager.clone(), Tier::Host);
    let vocab = c.config.text.vocab_size as u32;
    let prompt: Vec<u32> = [151644u32, 872, 198, 9707, 11, 1879, 13, 151645]
        .iter()
        .map(|id| id % vocab)
        .collect();
    let host = Tier::Host.index();
    let snapshot = || {
        (
            manager.stats().counters.bytes_in[host] + weights.staged_bytes(),
            proc_read_bytes(),
            weights.kernel_read(),
            weights.reader_activity(),
            c.files.first().and_then(|f| BlockStat::of(f)),
        )
    };
    let mut first = None;
    let g = model
        .generate(
            &prompt,
            &[],
            &GenerateOptions {
                max_new_tokens: new_tokens,
                stop_ids: vec![],
                ..Default::default()
            },
            &mut |_| {
                if first.is_none() {
                    first = Some(snapshot());
                }
            },
        )
        .map_err(|e| e.to_string())?;
    let last = snapshot();
    let (b0, p0, (kb0, ks0), a0, disk0) = first.ok_or("no token generated")?;
    let block = match (last.4, disk0) {
        (Some(b), Some(a)) => Some(b.since(a)),
        _ => None,
    };
    let busy_ns = last.3.busy_ns.saturating_sub(a0.busy_ns) as f64;
    let depth_ns = last.3.depth_ns.saturating_sub(a0.depth_ns) as f64;
    let steps = g.generated_ids.len().saturating_sub(1).max(1) as f64;
    let (kb, ks) = (last.2.0.saturating_sub(kb0) as f64, last.2.1 - ks0);
    let decode_s = g.decode_time.as_secs_f64();
    let staging = weights.staging();
    Ok(Decode {
        tok_s: g.decode_tokens_per_s(),
        decode_s,
        ttft_s: g.time_to_first_token.as_secs_f64(),
        arena_peak_bytes: match g.activations {
            vlmem_runner::Activations::Arena { peak_bytes, .. } => peak_bytes,
            vlmem_runner::Activations::InProcess { .. } => 0,
        },
        streamed_bytes_per_token: (last.0 - b0) as f64 / steps,
        proc_bytes_per_token: match (p0, last.1) {
            (Some(a), Some(b)) => Some(b.saturating_sub(a) as f64 / steps),
            _ => None,
        },
        prefetch_hints: weights.prefetch_hints(),
        kernel_gbps: if ks > 0.0 { kb / ks / 1e9 } else { 0.0 },
        kernel_share: if decode_s > 0.0 { ks / decode_s } else { 0.0 },
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
        ids: g.generated_ids,
    })
}

/// Runs the suite.
pub fn run(opts: BenchOptions) -> SuiteReport {
    let mut report = SuiteReport {
        suite: "e2e".into(),
        results: Vec::new(),
        notes: Vec::new(),
    };
    let Some(s) = setup(opts) else {
        report.notes.push(format!("{MODEL} is not in the catalog"));
        return report;
    };
    let dir = cache_root().join(s.name);
    if let Err(e) = std::fs::create_dir_all(cache_root()) {
        report
            .notes
            .push(format!("{}: {e}", cache_root().display()));
        return report;
    }
    let (ckpt, note) = match ensure_checkpoint(&dir, &s.cfg) {
        Ok(x) => x,
        Err(e) => {
            report.notes.push(format!("synth failed: {e}"));
            return report;
        }
    };
    report.notes.push(note);
    let push = |r: &mut SuiteReport, name: &str, value: f64, unit: &str| {
        r.results.push(BenchResult::new(name, value, unit));
    };
    let total = ckpt.total_bytes();
    let step = step_bytes(&ckpt);
    report.notes.push(format!(
        "{} text layers, {:.3} GB of weights, {:.3} GB read per decode step; {} decode tokens per run after the first; kernels: {} on {} threads",
        ckpt.config.text.num_hidden_layers,
        total as f64 / 1e9,
        step as f64 / 1e9,
        s.new_tokens - 1,
        kernels::isa(),
        threads(),
    ));
    push(&mut report, "weight_bytes_per_token", step as f64, "B");

    let membw = mem_read_gbps(s.membw_buffer_bytes);
    push(&mut report, "mem_read_gbps", membw, "GB/s");
    let probe = |r: &mut SuiteReport, when: &str| -> Vec<(usize, f64)> {
        let mut got = Vec::new();
        for depth in PROBE_DEPTHS {
            match direct_read_gbps(&ckpt, depth, s.probe_bytes) {
                Ok(v) => got.push((depth, v)),
                Err(e) => r
                    .notes
                    .push(format!("O_DIRECT probe {when}, depth {depth}: {e}")),
            }
        }
        got
    };
    let direct_before = probe(&mut report, "before");
    let dd_before = dd_read_gbps(&ckpt, s.dd_bytes);

    // All resident: the host budget holds every weight.
    let resident = decode_run(&ckpt, total.div_ceil(MIB) * MIB, 2, s.new_tokens);
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
    let streamed = decode_run(&ckpt, s.streamed_host_bytes, ahead, s.new_tokens);
    // The disk on exactly the bytes a streamed step reads, in the read-ahead's order, right
    // after the streamed run and after the run without prefetch.
    let extents = streamed
        .as_ref()
        .map(|d| d.streamed_extents.clone())
        .unwrap_or_default();
    let extent_probe = |r: &mut SuiteReport, when: &str| -> Vec<f64> {
        let mut got = Vec::new();
        if extents.is_empty() {
            return got;
        }
        for depth in EXTENT_PROBE_DEPTHS {
            match extents_read_gbps(&extents, depth) {
                Ok(v) => {
                    push(
                        r,
                        &format!("disk_read_gbps@streamed_extents_depth{depth}_{when}"),
                        v,
                        "GB/s",
                    );
                    got.push(v);
                }
                Err(e) => r
                    .notes
                    .push(format!("streamed-extents probe {when}, depth {depth}: {e}")),
            }
        }
        got
    };
    let mut extent_gbps = extent_probe(&mut report, "after_streamed");
    let noprefetch = decode_run(&ckpt, s.streamed_host_bytes, 0, s.new_tokens);
    extent_gbps.extend(extent_probe(&mut report, "after_noprefetch"));
    let dd_after = dd_read_gbps(&ckpt, s.dd_bytes);
    let direct_after = probe(&mut report, "after");

    let mut dd = Vec::new();
    for (when, r) in [("before", &dd_before), ("after", &dd_after)] {
        match r {
            Ok(v) => {
                push(
                    &mut report,
                    &format!("disk_read_gbps@dd_{when}"),
                    *v,
                    "GB/s",
                );
                dd.push(*v);
            }
            Err(e) => report.notes.push(format!("dd {when}: {e}")),
        }
    }
    let dd_gbps = dd.iter().copied().fold(f64::NAN, f64::max);
    // The disk's best: every depth of the O_DIRECT probe, before and after, and dd.
    let mut best = (dd_gbps, 1usize);
    for (when, got) in [("before", &direct_before), ("after", &direct_after)] {
        for &(depth, v) in got {
            push(
                &mut report,
                &format!("disk_read_gbps@direct_depth{depth}_{when}"),
                v,
                "GB/s",
            );
            // (A NaN best, when dd failed, loses to any figure.)
            if best.0.is_nan() || v > best.0 {
                best = (v, depth);
            }
        }
    }
    let disk_gbps = best.0;
    // Beside it, a figure less swayed by this disk's second-to-second swings: at each depth
    // the mean of before and after, the best depth's.
    let depth_mean = PROBE_DEPTHS
        .iter()
        .filter_map(|d| {
            let v: Vec<f64> = [&direct_before, &direct_after]
                .iter()
                .filter_map(|got| got.iter().find(|(dd, _)| dd == d).map(|(_, v)| *v))
                .collect();
            (v.len() == 2).then(|| v.iter().sum::<f64>() / 2.0)
        })
        .fold(f64::NAN, f64::max);
    if disk_gbps.is_finite() {
        push(&mut report, "disk_read_gbps.best", disk_gbps, "GB/s");
        push(
            &mut report,
            "disk_read_gbps.best_depth",
            best.1 as f64,
            "count",
        );
        report.notes.push(format!(
            "disk: best {disk_gbps:.2} GB/s at depth {} (O_DIRECT 4 MiB reads, before/after: {}; dd before/after: {})",
            best.1,
            PROBE_DEPTHS
                .iter()
                .map(|d| {
                    let at = |got: &Vec<(usize, f64)>| {
                        got.iter()
                            .find(|(dd, _)| dd == d)
                            .map_or("-".to_string(), |(_, v)| format!("{v:.2}"))
                    };
                    format!("d{d} {}/{}", at(&direct_before), at(&direct_after))
                })
                .collect::<Vec<_>>()
                .join(", "),
            dd.iter()
                .map(|v| format!("{v:.2}"))
                .collect::<Vec<_>>()
                .join("/"),
        ));
    }

    let mut ok = Vec::new();
    for (label, r) in [
        ("resident", &resident),
        ("streamed", &streamed),
        ("streamed_noprefetch", &noprefetch),
    ] {
        match r {
            Ok(d) => {
                push(
                    &mut report,
                    &format!("decode_tok_s.{label}"),
                    d.tok_s,
                    "tok/s",
                );
                push(&mut report, &format!("ttft_s.{label}"), d.ttft_s, "s");
                push(
                    &mut report,
                    &format!("step_arena_peak_bytes.{label}"),
                    d.arena_peak_bytes as f64,
                    "B",
                );
                push(
                    &mut report,
                    &format!("streamed_bytes_per_token.{label}"),
                    d.streamed_bytes_per_token,
                    "B",
                );
                if let Some(p) = d.proc_bytes_per_token {
                    push(
                        &mut report,
                        &format!("storage_read_bytes_per_token@procfs.{label}"),
                        p,
                        "B",
                    );
                }
                push(
                    &mut report,
                    &format!("prefetch_hints.{label}"),
                    d.prefetch_hints as f64,
                    "count",
                );
                push(
                    &mut report,
                    &format!("kernel_read_gbps.{label}"),
                    d.kernel_gbps,
                    "GB/s",
                );
                push(
                    &mut report,
                    &format!("kernel_share_of_decode.{label}"),
                    d.kernel_share,
                    "ratio",
                );
                push(
                    &mut report,
                    &format!("staged_read_ahead.{label}"),
                    d.staged_taken as f64,
                    "count",
                );
                push(
                    &mut report,
                    &format!("staged_on_demand.{label}"),
                    d.staged_on_demand as f64,
                    "count",
                );
                push(
                    &mut report,
                    &format!("staged_max_fills_in_flight.{label}"),
                    d.staged_max_filling as f64,
                    "count",
                );
                push(
                    &mut report,
                    &format!("staging_buffers_allocated.{label}"),
                    d.staged_allocated as f64,
                    "count",
                );
                push(
                    &mut report,
                    &format!("staging_bytes_allocated.{label}"),
                    d.staged_allocated_bytes as f64,
                    "B",
                );
                push(
                    &mut report,
                    &format!("read_ahead_busy_share.{label}"),
                    d.reader_busy_share,
                    "ratio",
                );
                push(
                    &mut report,
                    &format!("read_ahead_mean_depth.{label}"),
                    d.reader_mean_depth,
                    "reads",
                );
                if let Some(b) = d.block.filter(|b| b.read_bytes > 0) {
                    push(
                        &mut report,
                        &format!("disk_busy_share@sysfs.{label}"),
                        b.busy_share(d.decode_s),
                        "ratio",
                    );
                    push(
                        &mut report,
                        &format!("disk_mean_depth@sysfs.{label}"),
                        b.read_ms as f64 / (b.busy_ms.max(1)) as f64,
                        "reads",
                    );
                    push(
                        &mut report,
                        &format!("disk_request_kib@sysfs.{label}"),
                        b.read_bytes as f64 / b.reads.max(1) as f64 / 1024.0,
                        "KiB",
                    );
                    push(
                        &mut report,
                        &format!("disk_read_gbps@sysfs.{label}"),
                        b.read_bytes as f64 / d.decode_s / 1e9,
                        "GB/s",
                    );
                }
                push(
                    &mut report,
                    &format!("streamed_read_gbps.{label}"),
                    d.streamed_bytes_per_token * d.tok_s / 1e9,
                    "GB/s",
                );
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
    let membw_bound = membw * 1e9 / step as f64;
    push(
        &mut report,
        "decode_tok_s.resident@membw_bound",
        membw_bound,
        "tok/s",
    );
    if let Ok(r) = &resident {
        let ratio = r.tok_s / membw_bound;
        push(&mut report, "resident_over_membw_bound", ratio, "ratio");
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
        push(&mut report, "decode_tok_s.bound", bound, "tok/s");
        if dd_gbps.is_finite() {
            push(
                &mut report,
                "decode_tok_s.bound@dd",
                dd_gbps * 1e9 / st.streamed_bytes_per_token,
                "tok/s",
            );
        }
        if depth_mean.is_finite() {
            push(
                &mut report,
                "decode_tok_s.bound@depth_mean",
                depth_mean * 1e9 / st.streamed_bytes_per_token,
                "tok/s",
            );
        }
        // The bound if only what cannot fit the budget were read (no staging area set apart).
        let min_bytes = step.saturating_sub(s.streamed_host_bytes).max(1) as f64;
        push(
            &mut report,
            "decode_tok_s.bound@min_bytes",
            disk_gbps * 1e9 / min_bytes,
            "tok/s",
        );
        let overlap = bound.min(res.tok_s);
        push(&mut report, "decode_tok_s.overlap_bound", overlap, "tok/s");
        let ratio = st.tok_s / overlap;
        push(&mut report, "streamed_over_overlap_bound", ratio, "ratio");
        report.notes.push(format!(
            "streamed: {:.3} tok/s = {:.0}% of min(bound {:.3}, resident {:.2}) tok/s (target >= 85%): {}; {:.3} GB from disk per token at {:.2} GB/s (the disk's best, depth {}), read at {:.2} GB/s",
            st.tok_s,
            ratio * 100.0,
            bound,
            res.tok_s,
            if ratio >= 0.85 { "met" } else { "MISSED" },
            st.streamed_bytes_per_token / 1e9,
            disk_gbps,
            best.1,
            st.streamed_bytes_per_token * st.tok_s / 1e9,
        ));
        let extent_best = extent_gbps.iter().copied().fold(f64::NAN, f64::max);
        if extent_best.is_finite() {
            let extent_bound = extent_best * 1e9 / st.streamed_bytes_per_token;
            push(
                &mut report,
                "decode_tok_s.bound@streamed_extents",
                extent_bound,
                "tok/s",
            );
            let ratio = st.tok_s / extent_bound.min(res.tok_s);
            push(&mut report, "streamed_over_extents_bound", ratio, "ratio");
            report.notes.push(format!(
                "streamed against the disk on its own bytes (the streamed tensors' extents, in use order, best of depths {:?} after each streamed run: {:.2} GB/s): {:.0}%",
                EXTENT_PROBE_DEPTHS,
                extent_best,
                ratio * 100.0
            ));
        }
        if let Ok(np) = &noprefetch {
            push(
                &mut report,
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
    report
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
            let probe = direct_read_gbps(&ckpt, n, s.probe_bytes).unwrap_or(f64::NAN);
            match decode_run_with(&ckpt, s.streamed_host_bytes, 2, s.new_tokens, Some(n)) {
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

fn threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

#[cfg(test)]
mod tests {
    use super::*;

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
        // Every run decodes with its activations in the manager's step arena.
        for d in [&resident, &streamed, &plain] {
            assert!(d.arena_peak_bytes > 0);
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
