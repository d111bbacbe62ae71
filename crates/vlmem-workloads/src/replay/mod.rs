//! `vlmem replay`: workloads generated from the real Qwen3-VL shapes, run through the real
//! manager with real bytes (scaled to fit this machine), every figure beside Belady's OPT and
//! LRU simulated on the same trace.
//!
//! Workloads ([`Workload`]):
//! - `weights-stream`: decode steps over every decoder weight in layer order with a device
//!   tier smaller than the model; the manager has the access plan and prefetches the next
//!   chunks. Reported: hit ratio (1 - loads / accesses) beside OPT, the planned-stream model
//!   and LRU on the same trace; bytes moved; stall time (time in `pin`); step time beside the
//!   bandwidth bound measured in the same run.
//! - `kv-growth`: many concurrent requests with growing contexts; KV blocks are manager
//!   tensors of kind KV cache; the scheduler preempts whole sequences (youngest first) when
//!   the device's KV budget cannot hold the running set, and resumes them later.
//! - `image-cache`: Zipf-distributed repeated images through [`vlmem::vision_cache`];
//!   hit ratio beside OPT and LRU on the same trace.
//! - `mixed`: all three at once on one manager, from several threads.
//!
//! Sizes: tier capacities come from the hardware profile and every byte size (tiers, weights,
//! KV blocks, embeddings) is multiplied by `scale` (1/64 by default). Bandwidths are not
//! scaled, so times shrink by the same factor. Every tensor's bytes are checked at the end.

mod images;
mod kv;
mod svg;
mod weights;

pub use images::ImageReport;
pub use kv::KvReport;
pub use svg::{OccupancySample, render_svg};
pub use weights::WeightsReport;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use vlmem::stats::CounterSnapshot;
use vlmem::{ManagerConfig, ManagerError, MemoryManager, Result};
use vlmem_core::profile::{HardwareProfile, simulated_gpu};
use vlmem_core::sync::Arc;
use vlmem_core::sync::atomic::{AtomicBool, Ordering};
use vlmem_qwen3vl::config::Qwen3VlConfig;

/// Which workload to replay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Workload {
    /// Decode steps over all weights with a device smaller than the model.
    WeightsStream,
    /// Concurrent requests with growing KV and preemption.
    KvGrowth,
    /// Zipf-repeated images through the vision cache.
    ImageCache,
    /// All three together from several threads.
    Mixed,
}

impl Workload {
    /// Every workload.
    pub const ALL: [Workload; 4] = [
        Workload::WeightsStream,
        Workload::KvGrowth,
        Workload::ImageCache,
        Workload::Mixed,
    ];

    /// The CLI name.
    pub fn name(self) -> &'static str {
        match self {
            Workload::WeightsStream => "weights-stream",
            Workload::KvGrowth => "kv-growth",
            Workload::ImageCache => "image-cache",
            Workload::Mixed => "mixed",
        }
    }

    /// Parses a CLI name.
    pub fn parse(name: &str) -> Option<Workload> {
        Workload::ALL.into_iter().find(|w| w.name() == name)
    }
}

impl std::fmt::Display for Workload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Parses `--scale`: a fraction (`0.015625`) or a ratio (`1/64`), in (0, 1].
pub fn parse_scale(text: &str) -> std::result::Result<f64, String> {
    let t = text.trim();
    let v = match t.split_once('/') {
        Some((a, b)) => {
            let a: f64 = a.trim().parse().map_err(|_| format!("bad scale '{t}'"))?;
            let b: f64 = b.trim().parse().map_err(|_| format!("bad scale '{t}'"))?;
            a / b
        }
        None => t.parse().map_err(|_| format!("bad scale '{t}'"))?,
    };
    if v.is_finite() && v > 0.0 && v <= 1.0 {
        Ok(v)
    } else {
        Err(format!("scale '{t}' must be in (0, 1], e.g. 1/64"))
    }
}

/// What to replay.
#[derive(Debug, Clone)]
pub struct ReplayOptions {
    /// The workload.
    pub workload: Workload,
    /// A catalog model name (`vlmem_qwen3vl::catalog::NAMES`).
    pub model: String,
    /// The machine whose tiers are modelled.
    pub profile: HardwareProfile,
    /// Every byte size is multiplied by this (default 1/64).
    pub scale: f64,
    /// Fewer steps, requests and lookups (seconds; CI smoke runs).
    pub quick: bool,
    /// Seed of every random choice.
    pub seed: u64,
    /// Where swap files and the scaled weights file go (default: a private temp directory).
    pub dir: Option<PathBuf>,
    /// Writes the tier-occupancy chart here.
    pub svg: Option<PathBuf>,
    /// Shows a progress bar (only when stderr is a terminal).
    pub progress: bool,
    /// Decode steps of `weights-stream` (default 48, quick 6).
    pub steps: Option<usize>,
    /// Chunks prefetched ahead of use (default 3).
    pub lookahead: usize,
    /// weights-stream: prefetch hints outstanding at once (1: the next is given once the
    /// previous landed).
    pub hints_in_flight: usize,
    /// Real (unscaled) bytes of a weights chunk (default 8 MiB; scaled like every size).
    pub chunk_bytes: u64,
    /// Pins the plan's prefix on the device for the whole run (default true); false leaves
    /// every chunk to the manager's weights policy.
    pub pin_prefix: bool,
    /// At the end, compact every tier and keep the manager's full statistics in the report
    /// (`vlmem inspect`).
    pub inspect: bool,
}

impl ReplayOptions {
    /// Defaults: scale 1/64, seed 1, no SVG, progress bar on a terminal.
    pub fn new(workload: Workload, model: &str, profile: HardwareProfile) -> Self {
        ReplayOptions {
            workload,
            model: model.to_string(),
            profile,
            scale: 1.0 / 64.0,
            quick: false,
            seed: 1,
            dir: None,
            svg: None,
            progress: true,
            steps: None,
            lookahead: 3,
            hints_in_flight: 1,
            chunk_bytes: 8 << 20,
            pin_prefix: true,
            inspect: false,
        }
    }
}

/// The manager's statistics during a run (at the moment the most bytes were resident; the
/// Prometheus text at the end), and the compaction passes made while it ran.
#[derive(Debug, Clone, Serialize)]
pub struct Inspection {
    /// [`vlmem::ManagerStats::to_text`].
    pub table: String,
    /// [`vlmem::ManagerStats::to_prometheus`].
    pub prometheus: String,
    /// Per tier: compaction passes, mean fragmentation before and after them, copies moved,
    /// bytes copied, seconds spent.
    pub compaction: Vec<CompactionLine>,
}

/// One tier's compaction pass in an [`Inspection`].
#[derive(Debug, Clone, Serialize)]
pub struct CompactionLine {
    /// The tier.
    pub tier: String,
    /// Passes made.
    pub passes: u64,
    /// 1 - largest free run / free bytes, before a pass (mean over passes).
    pub fragmentation_before: f64,
    /// The same after.
    pub fragmentation_after: f64,
    /// Copies relocated.
    pub moved: u64,
    /// Bytes copied.
    pub bytes_moved: u64,
    /// Wall time.
    pub seconds: f64,
}

/// Compacts every tier periodically while a workload runs (compaction under load) and keeps
/// the manager's statistics at the moment the most bytes were resident.
struct Compactor {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Result<Inspection>>,
}

impl Compactor {
    fn start(m: &MemoryManager, every: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (m, flag) = (m.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut lines: Vec<CompactionLine> = vlmem::Tier::ALL
                .iter()
                .map(|t| CompactionLine {
                    tier: t.to_string(),
                    passes: 0,
                    fragmentation_before: 0.0,
                    fragmentation_after: 0.0,
                    moved: 0,
                    bytes_moved: 0,
                    seconds: 0.0,
                })
                .collect();
            let mut peak: Option<(u64, vlmem::ManagerStats)> = None;
            loop {
                let last = flag.load(Ordering::Relaxed);
                let stats = m.stats();
                let resident: u64 = vlmem::Tier::ALL
                    .iter()
                    .map(|&t| stats.resident.tier_total(t))
                    .sum();
                if peak.as_ref().is_none_or(|(r, _)| resident >= *r) {
                    peak = Some((resident, stats));
                }
                for (line, r) in lines.iter_mut().zip(m.compact()?) {
                    // Running means of the fragmentation seen before and left after.
                    let n = line.passes as f64;
                    line.fragmentation_before = (line.fragmentation_before * n
                        + vlmem::fragmentation(&r.before))
                        / (n + 1.0);
                    line.fragmentation_after =
                        (line.fragmentation_after * n + vlmem::fragmentation(&r.after)) / (n + 1.0);
                    line.passes += 1;
                    line.moved += r.moved;
                    line.bytes_moved += r.bytes_moved;
                    line.seconds += r.elapsed.as_secs_f64();
                }
                if last {
                    break;
                }
                std::thread::sleep(every);
            }
            let (_, at_peak) =
                peak.ok_or_else(|| ManagerError::InvalidConfig("no sample".into()))?;
            let end = m.stats();
            Ok(Inspection {
                table: at_peak.to_text(),
                prometheus: end.to_prometheus(),
                compaction: lines,
            })
        });
        Compactor { stop, thread }
    }

    fn stop(self) -> Result<Inspection> {
        self.stop.store(true, Ordering::Relaxed);
        join(self.thread.join())
    }
}

/// The manager's counters over a run.
#[derive(Debug, Clone, Serialize)]
pub struct ManagerSummary {
    /// Tier capacities (scaled).
    pub capacity_bytes: [u64; 3],
    /// Budgets per tier and kind (`[tier][kind]`, kinds in `TensorKind::ALL` order).
    pub budgets: [[u64; 5]; 3],
    /// Pins served in place per tier.
    pub hits: [u64; 3],
    /// Moves into each tier (each one a load).
    pub misses: [u64; 3],
    /// Bytes copied into each tier.
    pub bytes_in: [u64; 3],
    /// Bytes evicted out of each tier.
    pub bytes_out: [u64; 3],
    /// Evictions per tier.
    pub evictions: [u64; 3],
    /// Of those, written back one tier down first.
    pub write_backs: [u64; 3],
    /// Time in `pin`, all threads.
    pub pin_wait_s: f64,
    /// Move latency p50 / p99 (upper bucket bounds, µs).
    pub move_latency_p50_us: u64,
    /// See `move_latency_p50_us`.
    pub move_latency_p99_us: u64,
    /// Prefetch hints and how many failed.
    pub prefetches: u64,
    /// See `prefetches`.
    pub prefetch_failures: u64,
    /// Demotions that failed (data kept in place).
    pub demote_failures: u64,
    /// One line per tier.
    pub tiers: Vec<String>,
}

/// What a replay measured.
#[derive(Debug, Clone, Serialize)]
pub struct ReplayReport {
    /// The workload.
    pub workload: Workload,
    /// The model.
    pub model: String,
    /// The profile's name.
    pub profile: String,
    /// The scale of every byte size.
    pub scale: f64,
    /// Whether this was a quick run.
    pub quick: bool,
    /// Wall time of the whole replay.
    pub wall_s: f64,
    /// The weights stream, if run.
    pub weights: Option<WeightsReport>,
    /// The KV workload, if run.
    pub kv: Option<KvReport>,
    /// The image cache, if run.
    pub images: Option<ImageReport>,
    /// The manager over the run.
    pub manager: ManagerSummary,
    /// Tensors whose bytes were checked (by checksum against what was written).
    pub checksums_verified: u64,
    /// Of those, the ones that did not match (must be 0).
    pub checksum_failures: u64,
    /// Occupancy samples taken (the SVG's points).
    pub occupancy_samples: usize,
    /// The SVG written, if any.
    pub svg: Option<PathBuf>,
    /// With [`ReplayOptions::inspect`]: the manager's statistics after the run.
    pub inspection: Option<Inspection>,
    /// Assumptions and caveats.
    pub notes: Vec<String>,
}

impl ReplayReport {
    /// Whether every checked tensor matched.
    pub fn ok(&self) -> bool {
        self.checksum_failures == 0
    }

    /// The report as JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// The report as text for a terminal.
    pub fn to_text(&self) -> String {
        let mut o = String::new();
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        let pct = |x: f64| x * 100.0;
        o.push_str(&format!(
            "replay {} on {} ({}), scale {:.5}{}: {:.2} s\n",
            self.workload,
            self.model,
            self.profile,
            self.scale,
            if self.quick { ", quick" } else { "" },
            self.wall_s
        ));
        let c = &self.manager.capacity_bytes;
        o.push_str(&format!(
            "tiers: device {:.1} MiB, host {:.1} MiB, disk {:.1} MiB\n",
            mib(c[0]),
            mib(c[1]),
            mib(c[2])
        ));
        if let Some(w) = &self.weights {
            o.push_str(&format!(
                "weights-stream: {} chunks ({:.1} MiB, {} pinned) from {}, device weights budget {:.1} MiB, {} steps, lookahead {}\n",
                w.chunks,
                mib(w.model_bytes),
                w.pinned_prefix_chunks,
                w.source,
                mib(w.device_budget_bytes),
                w.steps,
                w.lookahead
            ));
            o.push_str(&format!(
                "  hit ratio {:.2}%{} (opt {:.2}%, opt with bypass {:.2}%, planned {:.2}%, lru {:.2}%); demand hits {:.2}%\n",
                pct(w.hit_ratio),
                if w.loads_exact {
                    ""
                } else {
                    " [demand pins only: prefetched loads uncounted, not comparable with opt]"
                },
                pct(w.opt.hit_ratio),
                pct(w.opt_bypass.hit_ratio),
                pct(w.planned.hit_ratio),
                pct(w.lru.hit_ratio),
                pct(w.demand_hit_ratio)
            ));
            o.push_str(&format!(
                "  step {:.3} ms (bound {:.3} ms: link {:.2} GB/s, disk {:.2} GB/s), stall {:.3} ms/step, {:.1} MiB moved/step\n",
                w.step_s * 1e3,
                w.bound_step_s * 1e3,
                w.link_gbps,
                w.disk_gbps,
                w.stall_s_per_step * 1e3,
                w.bytes_loaded_per_step / (1u64 << 20) as f64
            ));
        }
        if let Some(k) = &self.kv {
            o.push_str(&format!(
                "kv-growth: {} requests, {} tokens in {:.2} s ({:.0} tok/s), block {:.1} KiB, device KV budget {:.1} MiB\n",
                k.requests,
                k.tokens_generated,
                k.wall_s,
                k.tokens_per_s,
                k.block_bytes as f64 / 1024.0,
                mib(k.device_budget_bytes)
            ));
            o.push_str(&format!(
                "  preemptions {}, resumes {}, peak running {}, device hit ratio {:.2}%, round p50 {:.3} ms p99 {:.3} ms\n",
                k.preemptions,
                k.resumes,
                k.peak_running,
                pct(k.device_hit_ratio),
                k.round_p50_s * 1e3,
                k.round_p99_s * 1e3
            ));
        }
        if let Some(i) = &self.images {
            o.push_str(&format!(
                "image-cache: {} lookups over {} images (zipf {}), budget {:.1} MiB of {:.1} MiB\n",
                i.lookups,
                i.distinct_images,
                i.zipf_s,
                mib(i.budget_bytes),
                mib(i.working_set_bytes)
            ));
            o.push_str(&format!(
                "  hit ratio {:.2}% (opt {:.2}%, static oracle {:.2}%, s3fifo sim {:.2}%, lru {:.2}%), vision tower skipped {} times\n",
                pct(i.hit_ratio),
                pct(i.opt.hit_ratio),
                pct(i.static_oracle.hit_ratio),
                pct(i.s3fifo_sim.hit_ratio),
                pct(i.lru.hit_ratio),
                i.hits
            ));
        }
        let m = &self.manager;
        o.push_str(&format!(
            "moved in: device {:.1} MiB, host {:.1} MiB, disk {:.1} MiB; evictions {:?}, write-backs {:?}; pin wait {:.3} s; move p50 {} us p99 {} us\n",
            mib(m.bytes_in[0]),
            mib(m.bytes_in[1]),
            mib(m.bytes_in[2]),
            m.evictions,
            m.write_backs,
            m.pin_wait_s,
            m.move_latency_p50_us,
            m.move_latency_p99_us
        ));
        o.push_str(&format!(
            "checksums: {} verified, {} failed\n",
            self.checksums_verified, self.checksum_failures
        ));
        for n in &self.notes {
            o.push_str(&format!("note: {n}\n"));
        }
        o
    }
}

/// Scales a byte size, keeping at least `min` and rounding up to a multiple of 256.
pub(crate) fn scaled(bytes: u64, scale: f64, min: u64) -> u64 {
    let b = ((bytes as f64 * scale).ceil() as u64).max(min);
    b.div_ceil(256) * 256
}

/// Fills `buf` with the deterministic stream of `seed` (SplitMix64 words).
pub(crate) fn fill(seed: u64, buf: &mut [u8]) {
    let mut rng = vlmem::policy::trace::SplitMix64::new(seed);
    let mut chunks = buf.chunks_exact_mut(8);
    for c in &mut chunks {
        c.copy_from_slice(&rng.next_u64().to_le_bytes());
    }
    let rest = chunks.into_remainder();
    let last = rng.next_u64().to_le_bytes();
    let n = rest.len();
    rest.copy_from_slice(&last[..n]);
}

/// The deterministic bytes of `seed`, `len` long.
pub(crate) fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    fill(seed, &mut v);
    v
}

/// The manager for a run: the profile's tiers times `scale`, the default budget split.
pub(crate) fn manager_config(
    opts: &ReplayOptions,
    notes: &mut Vec<String>,
) -> Result<(ManagerConfig, Option<tempdir::TempDir>)> {
    let p = &opts.profile;
    let gpu = match &p.gpu {
        Some(g) => g.clone(),
        None => {
            notes.push(
                "the profile has no GPU: a simulated 2 GiB device on a PCIe 3.0 x4 link is assumed"
                    .into(),
            );
            simulated_gpu(2 << 30)
        }
    };
    let s = opts.scale;
    let device = scaled(gpu.usable_bytes(), s, 4 << 20);
    let host = scaled(p.host.usable_bytes(), s, 16 << 20);
    let disk = scaled(
        p.disk.free_bytes.min(vlmem::config::DEFAULT_MAX_SWAP_BYTES),
        s,
        32 << 20,
    );
    let mut c = ManagerConfig::with_capacities(device, host, disk);
    c.device_link_bytes_per_s = Some(gpu.link.bytes_per_s as u64);
    let dir = tempdir::TempDir::new(opts.dir.as_deref())?;
    c.disk.dir = Some(dir.path().join("swap"));
    // The files are small; preallocation only costs time here.
    c.disk.preallocate = false;
    Ok((c, Some(dir)))
}

/// A private directory removed on drop.
pub(crate) mod tempdir {
    use std::path::{Path, PathBuf};
    use vlmem::{ManagerError, Result};

    /// A private directory removed on drop.
    #[derive(Debug)]
    pub struct TempDir(PathBuf);

    impl TempDir {
        /// A new directory under `parent` (or the system temp dir), mode 0700.
        pub fn new(parent: Option<&Path>) -> Result<Self> {
            use std::os::unix::fs::PermissionsExt;
            let base = parent
                .map(Path::to_path_buf)
                .unwrap_or_else(std::env::temp_dir);
            use vlmem_core::sync::atomic::{AtomicU64, Ordering};
            static N: AtomicU64 = AtomicU64::new(0);
            let n = N.fetch_add(1, Ordering::Relaxed);
            let dir = base.join(format!("vlmem-replay-{}-{n}", std::process::id()));
            std::fs::create_dir_all(&dir)
                .and_then(|()| {
                    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
                })
                .map_err(|e| {
                    ManagerError::InvalidConfig(format!("cannot create {}: {e}", dir.display()))
                })?;
            Ok(TempDir(dir))
        }
        /// Its path.
        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// A progress bar on stderr when it is a terminal and asked for, else hidden.
pub(crate) fn progress_bar(opts: &ReplayOptions, total: u64, what: &str) -> ProgressBar {
    use std::io::IsTerminal;
    if !opts.progress || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let b = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    if let Ok(style) =
        ProgressStyle::with_template("{prefix:>14} [{bar:40}] {pos}/{len} {elapsed_precise}")
    {
        b.set_style(style.progress_chars("=> "));
    }
    b.set_prefix(what.to_string());
    b
}

fn model_config(name: &str) -> Result<Qwen3VlConfig> {
    vlmem_qwen3vl::catalog::config(name).ok_or_else(|| {
        ManagerError::InvalidConfig(format!(
            "unknown model '{name}': use one of {}",
            vlmem_qwen3vl::catalog::NAMES.join(", ")
        ))
    })
}

fn summary(m: &MemoryManager, c: &ManagerConfig, before: &CounterSnapshot) -> ManagerSummary {
    let s = m.stats();
    let a = &s.counters;
    let d = |x: [u64; 3], y: [u64; 3]| [x[0] - y[0], x[1] - y[1], x[2] - y[2]];
    let mut lat = a.clone();
    for (l, b) in lat.latency_us.iter_mut().zip(before.latency_us.iter()) {
        *l -= b;
    }
    ManagerSummary {
        capacity_bytes: [c.device_bytes, c.host_bytes, c.disk_bytes],
        budgets: s.budgets.bytes,
        hits: d(a.hits, before.hits),
        misses: d(a.misses, before.misses),
        bytes_in: d(a.bytes_in, before.bytes_in),
        bytes_out: d(a.bytes_out, before.bytes_out),
        evictions: d(a.evictions, before.evictions),
        write_backs: d(a.write_backs, before.write_backs),
        pin_wait_s: (a.pin_wait_ns - before.pin_wait_ns) as f64 / 1e9,
        move_latency_p50_us: lat.latency_percentile_us(0.5),
        move_latency_p99_us: lat.latency_percentile_us(0.99),
        prefetches: a.prefetches - before.prefetches,
        prefetch_failures: a.prefetch_failures - before.prefetch_failures,
        demote_failures: a.demote_failures - before.demote_failures,
        tiers: m.describe_tiers(),
    }
}

fn join<T>(r: std::thread::Result<Result<T>>) -> Result<T> {
    r.unwrap_or_else(|_| {
        Err(ManagerError::InvalidConfig(
            "a workload thread panicked".into(),
        ))
    })
}

/// Runs a replay.
pub fn run(opts: &ReplayOptions) -> Result<ReplayReport> {
    let cfg = model_config(&opts.model)?;
    let mut notes = Vec::new();
    let (mcfg, dir) = manager_config(opts, &mut notes)?;
    let dir = dir.ok_or_else(|| ManagerError::InvalidConfig("no directory".into()))?;
    let m = MemoryManager::new(mcfg.clone())?;
    let started = Instant::now();
    let before = m.stats().counters;
    let sampler = svg::Sampler::start(&m, Duration::from_millis(if opts.quick { 5 } else { 20 }));
    let compactor = opts
        .inspect
        .then(|| Compactor::start(&m, Duration::from_millis(if opts.quick { 10 } else { 50 })));
    let exclusive = opts.workload != Workload::Mixed;
    let mut report = ReplayReport {
        workload: opts.workload,
        model: opts.model.clone(),
        profile: opts.profile.name.clone(),
        scale: opts.scale,
        quick: opts.quick,
        wall_s: 0.0,
        weights: None,
        kv: None,
        images: None,
        manager: summary(&m, &mcfg, &before),
        checksums_verified: 0,
        checksum_failures: 0,
        occupancy_samples: 0,
        svg: None,
        inspection: None,
        notes: Vec::new(),
    };
    let run_weights = |m: &MemoryManager| weights::run(m, &mcfg, &cfg, opts, dir.path(), exclusive);
    let run_kv = |m: &MemoryManager| kv::run(m, &cfg, opts);
    let run_images = |m: &MemoryManager| images::run(m, &cfg, opts);
    match opts.workload {
        Workload::WeightsStream => report.weights = Some(run_weights(&m)?),
        Workload::KvGrowth => report.kv = Some(run_kv(&m)?),
        Workload::ImageCache => report.images = Some(run_images(&m)?),
        Workload::Mixed => {
            let (w, k, i) = std::thread::scope(|s| {
                let k = s.spawn(|| run_kv(&m));
                let i = s.spawn(|| run_images(&m));
                let w = run_weights(&m);
                (w, join(k.join()), join(i.join()))
            });
            report.weights = Some(w?);
            report.kv = Some(k?);
            report.images = Some(i?);
            notes.push(
                "mixed: the manager's counters are shared by the three workloads; the weights hit ratio is counted by residency before each pin".into(),
            );
        }
    }
    let samples = sampler.stop();
    report.wall_s = started.elapsed().as_secs_f64();
    report.manager = summary(&m, &mcfg, &before);
    for (v, f) in [
        report
            .weights
            .as_ref()
            .map(|w| (w.checksums_verified, w.checksum_failures)),
        report
            .kv
            .as_ref()
            .map(|k| (k.checksums_verified, k.checksum_failures)),
        report
            .images
            .as_ref()
            .map(|i| (i.checksums_verified, i.checksum_failures)),
    ]
    .into_iter()
    .flatten()
    {
        report.checksums_verified += v;
        report.checksum_failures += f;
    }
    report.occupancy_samples = samples.len();
    if let Some(path) = &opts.svg {
        let title = format!(
            "vlmem replay {} — {} on {} (scale {:.5})",
            opts.workload, opts.model, opts.profile.name, opts.scale
        );
        let text = render_svg(&samples, report.manager.capacity_bytes, &title);
        std::fs::write(path, text).map_err(|e| {
            ManagerError::InvalidConfig(format!("cannot write {}: {e}", path.display()))
        })?;
        report.svg = Some(path.clone());
    }
    notes.push(format!(
        "every byte size is the real one times {:.5}; bandwidths are not scaled, so times shrink by the same factor",
        opts.scale
    ));
    if opts.profile.gpu.is_some() {
        notes.push(format!(
            "the device tier is simulated in host memory with its link capped at the profile's {:.2} GB/s",
            opts.profile.gpu.as_ref().map_or(0.0, |g| g.link.bytes_per_s / 1e9)
        ));
    }
    if let Some(c) = compactor {
        report.inspection = Some(c.stop()?);
    }
    report.notes = notes;
    drop(m);
    drop(dir);
    Ok(report)
}
