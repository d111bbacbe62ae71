//! `vlmem stress`: many threads run a mixed workload over every kind and tier of one manager;
//! every tensor's content is checksummed; at the end a ledger check.
//!
//! Each thread owns some tensors (a random kind, 4 to 256 KiB, filled with a pattern from
//! its seed) and shares a set of weights with the others. Operations: allocate and write,
//! read back and verify, rewrite, pin on a random tier and verify, prefetch, evict, free. A
//! `OutOfMemory` while every byte of a tier is pinned by others is an expected answer, not
//! a failure. Two checks for deadlocks: parking_lot's deadlock detector (a thread calling
//! `check_deadlock()` every 100 ms; only in builds with the `deadlock-detection` feature,
//! which `deadlock_detector` reports), and a watchdog that counts a stall when no operation
//! completes for [`StressOptions::stall_limit`] while threads still run (a deadlock on a
//! condition variable, or a livelock, which the detector cannot see).
//!
//! The report: `ops`, `overlaps` (pairs of live copies on one tier whose blocks overlap),
//! `lost` (a tensor that could not be read back, or that has no copy), `corrupted` (read back
//! with other bytes), `stats_mismatch` (budget counters differ from the recount at the end),
//! `deadlocks` (cycles found by parking_lot's detector; always 0 when `deadlock_detector` is
//! false), `stalls` (watchdog), and the error counts by kind.

use crate::config::ManagerConfig;
use crate::error::ManagerError;
use crate::manager::{MemoryManager, TensorHandle};
use crate::policy::trace::SplitMix64;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use vlmem_core::bytes::MIB;
use vlmem_core::sync::deadlock::{self, Detector};
use vlmem_core::{TensorKind, Tier};

/// How to stress.
#[derive(Debug, Clone)]
pub struct StressOptions {
    /// Worker threads.
    pub threads: usize,
    /// Stop after this many operations in all (if set).
    pub ops: Option<u64>,
    /// Stop after this long (if set; default 5 s when neither is set).
    pub seconds: Option<f64>,
    /// Seed of every random choice.
    pub seed: u64,
    /// No operation completing for this long counts as a stall.
    pub stall_limit: Duration,
    /// Host tier bytes (default 32 MiB; less means more swapping to disk).
    pub host_bytes: u64,
    /// Swap folder (created 0700 if missing; default: a private temp folder).
    pub disk_dir: Option<PathBuf>,
}

impl Default for StressOptions {
    fn default() -> Self {
        StressOptions {
            threads: 8,
            ops: None,
            seconds: None,
            seed: 1,
            stall_limit: Duration::from_secs(20),
            host_bytes: 32 * MIB,
            disk_dir: None,
        }
    }
}

/// What a stress run found.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct StressReport {
    /// Worker threads.
    pub threads: usize,
    /// Operations completed.
    pub ops: u64,
    /// Wall time in milliseconds.
    pub wall_ms: u64,
    /// Pairs of live copies on one tier whose blocks overlap.
    pub overlaps: u64,
    /// Tensors that could not be read back, or have no copy.
    pub lost: u64,
    /// Tensors read back with other bytes than written.
    pub corrupted: u64,
    /// 1 if the budget counters differ from the recount of live copies at the end.
    pub stats_mismatch: u64,
    /// Deadlock cycles found by parking_lot's detector (0 when it is off: see
    /// `deadlock_detector`).
    pub deadlocks: u64,
    /// Whether parking_lot's deadlock detector ran (builds with `deadlock-detection`).
    pub deadlock_detector: bool,
    /// Watchdog stalls: no operation completed for the stall limit while threads ran.
    pub stalls: u64,
    /// Tensors written back from the host to the disk tier (swap-outs).
    pub swap_outs: u64,
    /// Bytes moved into the disk tier.
    pub swap_out_bytes: u64,
    /// Tensors checked at the end.
    pub tensors_verified: u64,
    /// Expected refusals (`OutOfMemory` with everything pinned, `Pinned`) by kind.
    pub refusals: BTreeMap<String, u64>,
    /// Unexpected errors by kind (each also counted as lost when it lost a tensor).
    pub errors: BTreeMap<String, u64>,
}

impl StressReport {
    /// Whether nothing was lost, corrupted, overlapping, mismatched or stuck.
    pub fn ok(&self) -> bool {
        self.overlaps == 0
            && self.lost == 0
            && self.corrupted == 0
            && self.stats_mismatch == 0
            && self.deadlocks == 0
            && self.stalls == 0
            && self.errors.is_empty()
    }
}

/// Uniform in `0..n` (0 when `n` is 0).
fn below(rng: &mut SplitMix64, n: u64) -> u64 {
    rng.next_u64() % n.max(1)
}

/// The content of tensor `seed`: a cheap pattern every byte of which depends on the seed.
fn fill(seed: u64, buf: &mut [u8]) {
    let mut x = seed | 1;
    for chunk in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let bytes = x.to_le_bytes();
        chunk.copy_from_slice(&bytes[..chunk.len()]);
    }
}

#[derive(Default)]
struct Tally {
    lost: u64,
    corrupted: u64,
    refusals: BTreeMap<String, u64>,
    errors: BTreeMap<String, u64>,
}

fn error_kind(e: &ManagerError) -> String {
    let debug = format!("{e:?}");
    debug
        .split(|c: char| !c.is_alphanumeric())
        .next()
        .unwrap_or("Unknown")
        .to_string()
}

impl Tally {
    fn refusal(&mut self, e: &ManagerError) {
        *self.refusals.entry(error_kind(e)).or_default() += 1;
    }
    fn error(&mut self, e: &ManagerError) {
        *self.errors.entry(error_kind(e)).or_default() += 1;
    }
    /// Reads `h` back and compares with pattern `seed`.
    fn verify(&mut self, m: &MemoryManager, h: TensorHandle, seed: u64, len: usize) {
        let mut got = vec![0u8; len];
        let mut want = vec![0u8; len];
        fill(seed, &mut want);
        match m.read(h, 0, &mut got) {
            Ok(()) if got == want => {}
            Ok(()) => self.corrupted += 1,
            Err(e) => {
                self.lost += 1;
                self.error(&e);
            }
        }
    }
}

/// Runs the stress workload on a manager of small tiers (device 8 MiB, host
/// [`StressOptions::host_bytes`], disk 128 MiB, swap in [`StressOptions::disk_dir`] or a
/// private temp folder).
pub fn run(opts: &StressOptions) -> Result<StressReport, ManagerError> {
    let mut config = ManagerConfig::with_capacities(8 * MIB, opts.host_bytes, 128 * MIB);
    config.disk.preallocate = false;
    config.disk.dir = opts.disk_dir.clone();
    run_with(config, opts)
}

/// Runs the stress workload on a manager built from `config`.
pub fn run_with(config: ManagerConfig, opts: &StressOptions) -> Result<StressReport, ManagerError> {
    let threads = opts.threads.max(1);
    let m = MemoryManager::new(config)?;
    let len_shared = 128 * 1024usize;
    let shared: Arc<Vec<(TensorHandle, u64)>> = Arc::new(
        (0..32u64)
            .map(|i| {
                let seed = opts.seed.wrapping_mul(1_000_003).wrapping_add(i);
                let h = m.allocate(len_shared as u64, TensorKind::Weight, i)?;
                let mut buf = vec![0u8; len_shared];
                fill(seed, &mut buf);
                m.write(h, 0, &buf)?;
                Ok((h, seed))
            })
            .collect::<Result<_, ManagerError>>()?,
    );
    let done_ops = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let detector = Detector::start(Duration::from_millis(100));
    let deadline = match (opts.ops, opts.seconds) {
        (None, None) => Some(Duration::from_secs(5)),
        (_, Some(s)) => Some(Duration::from_secs_f64(s.max(0.0))),
        (Some(_), None) => None,
    };
    let budget_ops = opts.ops;

    let workers: Vec<_> = (0..threads)
        .map(|t| {
            let m = m.clone();
            let shared = shared.clone();
            let done_ops = done_ops.clone();
            let stop = stop.clone();
            let seed0 = opts.seed ^ ((t as u64 + 1) << 32);
            std::thread::spawn(move || {
                let mut rng = SplitMix64::new(seed0);
                let mut tally = Tally::default();
                let mut own: Vec<(TensorHandle, u64, usize)> = Vec::new();
                let mut next_seed = seed0;
                loop {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    if let Some(limit) = budget_ops
                        && done_ops.fetch_add(1, Ordering::Relaxed) >= limit
                    {
                        break;
                    }
                    let tier = Tier::ALL[below(&mut rng, 3) as usize];
                    match below(&mut rng, 8) {
                        0 | 1 if own.len() < 16 => {
                            let kind = TensorKind::ALL[below(&mut rng, 5) as usize];
                            let len = (4096 + below(&mut rng, 252 * 1024)) as usize;
                            next_seed = next_seed.wrapping_add(0x1_0000_0001);
                            match m.allocate(len as u64, kind, next_seed) {
                                Ok(h) => {
                                    let mut buf = vec![0u8; len];
                                    fill(next_seed, &mut buf);
                                    match m.write(h, 0, &buf) {
                                        Ok(()) => own.push((h, next_seed, len)),
                                        Err(e) => {
                                            tally.refusal(&e);
                                            let _ = m.deallocate(h);
                                        }
                                    }
                                }
                                Err(
                                    e @ (ManagerError::OutOfMemory { .. }
                                    | ManagerError::TooLarge { .. }),
                                ) => tally.refusal(&e),
                                Err(e) => tally.error(&e),
                            }
                        }
                        2 if !own.is_empty() => {
                            let (h, seed, len) = own[below(&mut rng, own.len() as u64) as usize];
                            tally.verify(&m, h, seed, len);
                        }
                        3 if !own.is_empty() => {
                            // Rewrite with a new pattern.
                            let i = below(&mut rng, own.len() as u64) as usize;
                            let (h, _, len) = own[i];
                            next_seed = next_seed.wrapping_add(0x1_0000_0001);
                            let mut buf = vec![0u8; len];
                            fill(next_seed, &mut buf);
                            match m.write(h, 0, &buf) {
                                Ok(()) => own[i].1 = next_seed,
                                Err(e @ ManagerError::OutOfMemory { .. }) => tally.refusal(&e),
                                Err(e) => tally.error(&e),
                            }
                        }
                        4 if !own.is_empty() => {
                            let i = below(&mut rng, own.len() as u64) as usize;
                            let (h, seed, len) = own.swap_remove(i);
                            tally.verify(&m, h, seed, len);
                            if let Err(e) = m.deallocate(h) {
                                tally.error(&e);
                            }
                        }
                        5 => {
                            let (h, seed) = shared[below(&mut rng, shared.len() as u64) as usize];
                            match m.pin(h, tier) {
                                Ok(g) => {
                                    let mut got = vec![0u8; len_shared];
                                    let mut want = vec![0u8; len_shared];
                                    fill(seed, &mut want);
                                    match g.read(0, &mut got) {
                                        Ok(()) if got == want => {}
                                        Ok(()) => tally.corrupted += 1,
                                        Err(e) => tally.error(&e),
                                    }
                                }
                                Err(e @ ManagerError::OutOfMemory { .. }) => tally.refusal(&e),
                                Err(e) => tally.error(&e),
                            }
                        }
                        6 => {
                            let (h, _) = shared[below(&mut rng, shared.len() as u64) as usize];
                            m.prefetch(h, tier);
                        }
                        _ => {
                            if let Err(e) = m.evict(tier, 256 * 1024) {
                                tally.error(&e);
                            }
                        }
                    }
                    if budget_ops.is_none() {
                        done_ops.fetch_add(1, Ordering::Relaxed);
                    }
                }
                // Hand back: verify and free every tensor this thread still owns.
                for (h, seed, len) in own {
                    tally.verify(&m, h, seed, len);
                    if let Err(e) = m.deallocate(h) {
                        tally.error(&e);
                    }
                }
                tally
            })
        })
        .collect();

    // Watchdog: stop at the deadline; count a stall when no op completes for the limit.
    let mut stalls = 0u64;
    let mut last_ops = 0u64;
    let mut last_change = Instant::now();
    while !workers.iter().all(|w| w.is_finished()) {
        std::thread::sleep(Duration::from_millis(20));
        if deadline.is_some_and(|d| started.elapsed() >= d) {
            stop.store(true, Ordering::Relaxed);
        }
        let now_ops = done_ops.load(Ordering::Relaxed);
        if now_ops != last_ops {
            last_ops = now_ops;
            last_change = Instant::now();
        } else if last_change.elapsed() >= opts.stall_limit {
            stalls += 1;
            stop.store(true, Ordering::Relaxed);
            last_change = Instant::now();
            if stalls > 3 {
                // Threads that never come back: report rather than hang forever.
                break;
            }
        }
    }
    let mut tally = Tally::default();
    let mut joined_all = true;
    for w in workers {
        if !w.is_finished() {
            joined_all = false;
            continue;
        }
        match w.join() {
            Ok(t) => {
                tally.lost += t.lost;
                tally.corrupted += t.corrupted;
                for (k, v) in t.refusals {
                    *tally.refusals.entry(k).or_default() += v;
                }
                for (k, v) in t.errors {
                    *tally.errors.entry(k).or_default() += v;
                }
            }
            Err(_) => *tally.errors.entry("worker panicked".into()).or_default() += 1,
        }
    }
    // Let in-flight prefetches settle, then verify the shared tensors and the ledger.
    let settle = Instant::now();
    while m.audit().busy_entries > 0 && settle.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(10));
    }
    for &(h, seed) in shared.iter() {
        tally.verify(&m, h, seed, len_shared);
    }
    let audit = m.audit();
    let deadlocks = detector.finish();
    let counters = m.stats().counters;
    let ops = match budget_ops {
        Some(limit) => done_ops.load(Ordering::Relaxed).min(limit),
        None => done_ops.load(Ordering::Relaxed),
    };
    Ok(StressReport {
        threads,
        ops,
        wall_ms: started.elapsed().as_millis() as u64,
        overlaps: audit.overlaps,
        lost: tally.lost + audit.entries_without_copy,
        corrupted: tally.corrupted,
        stats_mismatch: u64::from(!audit.charged_matches_resident && joined_all),
        deadlocks,
        deadlock_detector: deadlock::ENABLED,
        stalls,
        swap_outs: counters.write_backs[Tier::Host.index()],
        swap_out_bytes: counters.bytes_in[Tier::Disk.index()],
        tensors_verified: shared.len() as u64,
        refusals: tally.refusals,
        errors: tally.errors,
    })
}
