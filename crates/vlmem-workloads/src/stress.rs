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
//! false), `stalls` (watchdog), `leaked_bytes` (arena bytes still in use once every tensor is
//! freed), and the error counts by operation and kind.
//!
//! Switches widen the configuration and the mix (each off by default): a KV slab
//! ([`StressOptions::kv_block_bytes`]: KV tensors are then one block each), `zero_on_free`,
//! checkpoint extents in a temporary file (pinned on every tier, read, swapped out),
//! a small disk ([`StressOptions::disk_bytes`]) with another integrity unit, explicit
//! swap-outs of shared, own and extent tensors on every tier plus compaction of every tier,
//! and pinned writes: pins of shared weights held across operations, and tensors rewritten
//! through a held pin (`PinGuard::write` or a lend) while other threads read them through
//! pins of their own and `MemoryManager::read`; each such read must succeed and show one
//! whole version of the ledger (the last one before the read began, or a newer one).

use serde::Serialize;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use vlmem::PinGuard;
use vlmem::config::ManagerConfig;
use vlmem::error::ManagerError;
use vlmem::policy::trace::SplitMix64;
use vlmem::{MemoryManager, TensorHandle};
use vlmem_core::bytes::{KIB, MIB};
use vlmem_core::sync::Arc;
use vlmem_core::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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
    /// Disk tier bytes (default 128 MiB; a few MiB makes write-backs find it full).
    pub disk_bytes: u64,
    /// The disk's integrity unit (default: `vlmem_tier::DiskOptions`'s, 1 MiB). The
    /// transfer engine's chunk is then a whole number of units, about 4 MiB.
    pub disk_unit_bytes: Option<u64>,
    /// A KV slab of blocks of this size on the device and the host; KV tensors are then one
    /// block each.
    pub kv_block_bytes: Option<u64>,
    /// Zero every freed block.
    pub zero_on_free: bool,
    /// Checkpoint extents registered over a temporary file (pinned, read, swapped out).
    pub extents: usize,
    /// Explicit swap-outs of shared, own and extent tensors on every tier, and compaction
    /// of every tier, in the mix.
    pub swap_outs: bool,
    /// Pins held across operations, writes through held pins, and reads of those tensors
    /// through other pins and `MemoryManager::read` in the mix.
    pub pinned_writes: bool,
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
            disk_bytes: 128 * MIB,
            disk_unit_bytes: None,
            kv_block_bytes: None,
            zero_on_free: false,
            extents: 0,
            swap_outs: false,
            pinned_writes: false,
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
    /// Tensors checked at the end (shared weights, extents, tensors written through pins).
    pub tensors_verified: u64,
    /// Arena bytes still in use on any tier once every tensor is freed (a leak).
    pub leaked_bytes: u64,
    /// Reads of a tensor being written through a pin that failed or showed no whole version
    /// of it (also counted as errors or as corrupted).
    pub pinned_write_read_failures: u64,
    /// Writes through held pins.
    pub pinned_writes: u64,
    /// Explicit swap-outs that moved bytes.
    pub explicit_swap_outs: u64,
    /// Expected refusals (`OutOfMemory` with everything pinned, `Pinned`) by kind.
    pub refusals: BTreeMap<String, u64>,
    /// Unexpected errors by operation and kind (`"read: Busy"`; each also counted as lost
    /// when it lost a tensor).
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
            && self.leaked_bytes == 0
            && self.pinned_write_read_failures == 0
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
    pinned_write_read_failures: u64,
    pinned_writes: u64,
    swap_outs: u64,
    refusals: BTreeMap<String, u64>,
    errors: BTreeMap<String, u64>,
}

/// The error's variant, with the tier error's variant for tier errors (`Tier(Busy)`).
fn error_kind(e: &ManagerError) -> String {
    let debug = format!("{e:?}");
    let mut words = debug
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty());
    match (words.next(), matches!(e, ManagerError::Tier(_))) {
        (Some(outer), true) => format!("{outer}({})", words.next().unwrap_or("Unknown")),
        (Some(outer), false) => outer.to_string(),
        (None, _) => "Unknown".into(),
    }
}

impl Tally {
    fn refusal(&mut self, e: &ManagerError) {
        *self.refusals.entry(error_kind(e)).or_default() += 1;
    }
    /// An unexpected error of operation `op`, counted as `"op: Kind"`.
    fn error(&mut self, op: &str, e: &ManagerError) {
        *self
            .errors
            .entry(format!("{op}: {}", error_kind(e)))
            .or_default() += 1;
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
                self.error("read", &e);
            }
        }
    }
}

/// Runs the stress workload on a manager of small tiers (device 8 MiB, host
/// [`StressOptions::host_bytes`], disk [`StressOptions::disk_bytes`], swap in
/// [`StressOptions::disk_dir`] or a private temp folder), with the options' KV slab,
/// `zero_on_free` and disk unit.
pub fn run(opts: &StressOptions) -> Result<StressReport, ManagerError> {
    let mut config = ManagerConfig::with_capacities(8 * MIB, opts.host_bytes, opts.disk_bytes);
    config.disk.preallocate = false;
    config.disk.dir = opts.disk_dir.clone();
    config.kv_block_bytes = opts.kv_block_bytes;
    config.zero_on_free = opts.zero_on_free;
    if let Some(unit) = opts.disk_unit_bytes {
        if unit == 0 {
            return Err(ManagerError::InvalidConfig(
                "a disk integrity unit of 0 bytes".into(),
            ));
        }
        config.disk.unit_bytes = unit;
        config.engine.chunk_bytes = unit.saturating_mul((4 * MIB / unit).max(1));
    }
    run_with(config, opts)
}

/// The bytes of a checkpoint file holding `n` extents: extent `i` is `extent_len(i)` bytes
/// of pattern `extent_seed(i)`, back to back.
fn extent_len(i: usize) -> usize {
    64 * KIB as usize + i * 4099
}

fn extent_seed(i: usize) -> u64 {
    0xE47E_0000 + i as u64
}

/// A checkpoint file of extents: its folder, the file, and each extent's (offset, length,
/// seed).
struct Checkpoint {
    dir: PathBuf,
    path: PathBuf,
    extents: Vec<(u64, usize, u64)>,
}

/// A checkpoint file of `n` extents in a new private folder.
fn write_checkpoint(n: usize) -> Result<Checkpoint, ManagerError> {
    let io = |e: std::io::Error| ManagerError::InvalidConfig(format!("checkpoint file: {e}"));
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let dir = std::env::temp_dir().join(format!("vlmem-stress-{}-{stamp}", std::process::id()));
    std::fs::create_dir(&dir).map_err(io)?;
    let path = dir.join("checkpoint.bin");
    let mut bytes = Vec::new();
    let mut extents = Vec::with_capacity(n);
    for i in 0..n {
        let mut b = vec![0u8; extent_len(i)];
        fill(extent_seed(i), &mut b);
        extents.push((bytes.len() as u64, b.len(), extent_seed(i)));
        bytes.extend_from_slice(&b);
    }
    std::fs::write(&path, &bytes).map_err(io)?;
    Ok(Checkpoint { dir, path, extents })
}

impl Drop for Checkpoint {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// A tensor rewritten through held pins: its ledger version (the last whole write) and a
/// claim that lets one writer at a time hold it.
struct Rewritten {
    handle: TensorHandle,
    version: AtomicU64,
    claimed: AtomicBool,
}

/// The content of version `v` of rewritten tensor `i`.
fn rewritten_seed(i: usize, v: u64) -> u64 {
    0x5EED_0000_0000 ^ ((i as u64) << 24) ^ v.wrapping_mul(0x9E37_79B9)
}

const REWRITTEN_BYTES: usize = 64 * 1024;
const REWRITTEN_TENSORS: usize = 8;

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
    let checkpoint = match opts.extents {
        0 => None,
        n => Some(write_checkpoint(n)?),
    };
    let extents: Arc<Vec<(TensorHandle, u64, usize)>> = Arc::new(match &checkpoint {
        None => Vec::new(),
        Some(c) => c
            .extents
            .iter()
            .enumerate()
            .map(|(i, &(off, len, seed))| {
                let h = m.register_extent(
                    &c.path,
                    off,
                    len as u64,
                    TensorKind::Weight,
                    5000 + i as u64,
                )?;
                Ok((h, seed, len))
            })
            .collect::<Result<_, ManagerError>>()?,
    });
    let rewritten: Arc<Vec<Rewritten>> = Arc::new(if opts.pinned_writes {
        (0..REWRITTEN_TENSORS)
            .map(|i| {
                let h = m.allocate_on(
                    REWRITTEN_BYTES as u64,
                    TensorKind::Activation,
                    6000 + i as u64,
                    Tier::Host,
                )?;
                let mut buf = vec![0u8; REWRITTEN_BYTES];
                fill(rewritten_seed(i, 0), &mut buf);
                m.write(h, 0, &buf)?;
                Ok(Rewritten {
                    handle: h,
                    version: AtomicU64::new(0),
                    claimed: AtomicBool::new(false),
                })
            })
            .collect::<Result<_, ManagerError>>()?
    } else {
        Vec::new()
    });
    let kv_block_bytes = opts.kv_block_bytes;
    let (swap_outs_on, pinned_writes_on) = (opts.swap_outs, opts.pinned_writes);
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
            let extents = extents.clone();
            let rewritten = rewritten.clone();
            let done_ops = done_ops.clone();
            let stop = stop.clone();
            let seed0 = opts.seed ^ ((t as u64 + 1) << 32);
            std::thread::spawn(move || {
                let mut rng = SplitMix64::new(seed0);
                let mut tally = Tally::default();
                let mut own: Vec<(TensorHandle, u64, usize)> = Vec::new();
                // Pins of shared weights held across operations: (pin, seed).
                let mut held: Vec<(PinGuard, u64)> = Vec::new();
                // A rewritten tensor this thread holds pinned (its index and the pin).
                let mut writing: Option<(usize, PinGuard)> = None;
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
                    // The switched-on parts of the mix take one operation in two.
                    let extra = (!extents.is_empty() || swap_outs_on || pinned_writes_on)
                        && below(&mut rng, 2) == 0;
                    if extra {
                        extra_op(
                            &m,
                            &mut rng,
                            tier,
                            &mut tally,
                            Mix {
                                shared: &shared,
                                len_shared,
                                extents: &extents,
                                rewritten: &rewritten,
                                own: &own,
                                swap_outs: swap_outs_on,
                                pinned_writes: pinned_writes_on,
                            },
                            &mut held,
                            &mut writing,
                        );
                    } else {
                        match below(&mut rng, 8) {
                            0 | 1 if own.len() < 16 => {
                                let kind = TensorKind::ALL[below(&mut rng, 5) as usize];
                                let len = match kv_block_bytes {
                                    Some(b) if kind == TensorKind::KvCache => b as usize,
                                    _ => (4096 + below(&mut rng, 252 * 1024)) as usize,
                                };
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
                                    Err(e) => tally.error("allocate", &e),
                                }
                            }
                            2 if !own.is_empty() => {
                                let (h, seed, len) =
                                    own[below(&mut rng, own.len() as u64) as usize];
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
                                    Err(e) => tally.error("rewrite", &e),
                                }
                            }
                            4 if !own.is_empty() => {
                                let i = below(&mut rng, own.len() as u64) as usize;
                                let (h, seed, len) = own.swap_remove(i);
                                tally.verify(&m, h, seed, len);
                                if let Err(e) = m.deallocate(h) {
                                    tally.error("free", &e);
                                }
                            }
                            5 => {
                                let (h, seed) =
                                    shared[below(&mut rng, shared.len() as u64) as usize];
                                match m.pin(h, tier) {
                                    Ok(g) => {
                                        let mut got = vec![0u8; len_shared];
                                        let mut want = vec![0u8; len_shared];
                                        fill(seed, &mut want);
                                        match g.read(0, &mut got) {
                                            Ok(()) if got == want => {}
                                            Ok(()) => tally.corrupted += 1,
                                            Err(e) => tally.error("pinned read", &e),
                                        }
                                    }
                                    Err(e @ ManagerError::OutOfMemory { .. }) => tally.refusal(&e),
                                    Err(e) => tally.error("pin", &e),
                                }
                            }
                            6 => {
                                let (h, _) = shared[below(&mut rng, shared.len() as u64) as usize];
                                m.prefetch(h, tier);
                            }
                            _ => match m.evict(tier, 256 * 1024) {
                                Ok(_) => {}
                                // A full disk refuses write-backs.
                                Err(e @ ManagerError::OutOfMemory { .. }) => tally.refusal(&e),
                                Err(e) => tally.error("evict", &e),
                            },
                        }
                    }
                    if budget_ops.is_none() {
                        done_ops.fetch_add(1, Ordering::Relaxed);
                    }
                }
                // Hand back: let go of held pins, verify and free every tensor this thread
                // still owns.
                held.clear();
                if let Some((i, g)) = writing.take() {
                    drop(g);
                    rewritten[i].claimed.store(false, Ordering::Release);
                }
                for (h, seed, len) in own {
                    tally.verify(&m, h, seed, len);
                    if let Err(e) = m.deallocate(h) {
                        tally.error("free", &e);
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
                tally.pinned_write_read_failures += t.pinned_write_read_failures;
                tally.pinned_writes += t.pinned_writes;
                tally.swap_outs += t.swap_outs;
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
    for &(h, seed, len) in extents.iter() {
        tally.verify(&m, h, seed, len);
        // The checkpoint file stays an extent's disk copy for its whole life.
        match m.residency(h) {
            Ok((tiers, _)) if tiers.contains(&Tier::Disk) => {}
            Ok(_) => {
                tally.lost += 1;
                *tally
                    .errors
                    .entry("extent without its file copy".into())
                    .or_default() += 1;
            }
            Err(e) => tally.error("residency of an extent", &e),
        }
    }
    for (i, r) in rewritten.iter().enumerate() {
        tally.verify(
            &m,
            r.handle,
            rewritten_seed(i, r.version.load(Ordering::Acquire)),
            REWRITTEN_BYTES,
        );
    }
    // Every tier compacts (each block is freed by the allocator that made it).
    for tier in Tier::ALL {
        match m.compact_tier(tier) {
            Ok(r) if r.verify_failures == 0 => {}
            Ok(_) => tally.corrupted += 1,
            Err(e) => tally.error("compact", &e),
        }
    }
    let audit = m.audit();
    let deadlocks = detector.finish();
    let counters = m.stats().counters;
    let ops = match budget_ops {
        Some(limit) => done_ops.load(Ordering::Relaxed).min(limit),
        None => done_ops.load(Ordering::Relaxed),
    };
    let stats_mismatch = u64::from(!audit.charged_matches_resident && joined_all);
    // Free everything: every tier's arena must be empty again.
    let mut leaked_bytes = 0;
    if joined_all {
        let all = shared
            .iter()
            .map(|&(h, _)| h)
            .chain(extents.iter().map(|&(h, _, _)| h))
            .chain(rewritten.iter().map(|r| r.handle));
        for h in all {
            if let Err(e) = m.deallocate(h) {
                tally.error("free", &e);
            }
        }
        let settle = Instant::now();
        loop {
            leaked_bytes = Tier::ALL
                .iter()
                .map(|&t| m.tier_usage(t).in_use_bytes)
                .sum::<u64>();
            // Prefetch workers may still hold a tensor for a moment.
            if leaked_bytes == 0 || settle.elapsed() > Duration::from_secs(2) {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    drop(checkpoint);
    Ok(StressReport {
        threads,
        ops,
        wall_ms: started.elapsed().as_millis() as u64,
        overlaps: audit.overlaps,
        lost: tally.lost + audit.entries_without_copy,
        corrupted: tally.corrupted,
        stats_mismatch,
        deadlocks,
        deadlock_detector: deadlock::ENABLED,
        stalls,
        swap_outs: counters.write_backs[Tier::Host.index()],
        swap_out_bytes: counters.bytes_in[Tier::Disk.index()],
        tensors_verified: (shared.len() + extents.len() + rewritten.len()) as u64,
        leaked_bytes,
        pinned_write_read_failures: tally.pinned_write_read_failures,
        pinned_writes: tally.pinned_writes,
        explicit_swap_outs: tally.swap_outs,
        refusals: tally.refusals,
        errors: tally.errors,
    })
}

/// What the switched-on part of the mix works on.
struct Mix<'a> {
    shared: &'a [(TensorHandle, u64)],
    len_shared: usize,
    extents: &'a [(TensorHandle, u64, usize)],
    rewritten: &'a [Rewritten],
    own: &'a [(TensorHandle, u64, usize)],
    swap_outs: bool,
    pinned_writes: bool,
}

/// Whether `got` is the content of pattern `seed`.
fn matches(seed: u64, got: &[u8]) -> bool {
    let mut want = vec![0u8; got.len()];
    fill(seed, &mut want);
    want == got
}

/// Whether `got` is one whole version of rewritten tensor `i` from `from` on (a newer one
/// may have landed while it was read; a few more may land before the check).
fn is_version_from(i: usize, from: u64, r: &Rewritten, got: &[u8]) -> bool {
    let to = r.version.load(Ordering::Acquire) + 1;
    (from..=to).any(|v| matches(rewritten_seed(i, v), got))
}

/// One operation of the switched-on mix.
#[allow(clippy::too_many_arguments)]
fn extra_op(
    m: &MemoryManager,
    rng: &mut SplitMix64,
    tier: Tier,
    tally: &mut Tally,
    mix: Mix<'_>,
    held: &mut Vec<(PinGuard, u64)>,
    writing: &mut Option<(usize, PinGuard)>,
) {
    let mut choices: Vec<u8> = Vec::new();
    if !mix.extents.is_empty() {
        choices.extend([0, 0]);
    }
    if mix.swap_outs {
        choices.extend([1, 1, 2]);
    }
    if mix.pinned_writes {
        choices.extend([3, 4, 4, 5, 5]);
    }
    match choices[below(rng, choices.len() as u64) as usize] {
        0 => {
            // A checkpoint extent: pinned on a tier and read through the pin, or swapped out.
            let (h, seed, len) = mix.extents[below(rng, mix.extents.len() as u64) as usize];
            if mix.swap_outs && below(rng, 2) == 0 {
                match m.swap_out(h, tier) {
                    Ok(n) => tally.swap_outs += u64::from(n > 0),
                    Err(e @ ManagerError::OutOfMemory { .. }) => tally.refusal(&e),
                    Err(e) => tally.error("swap out extent", &e),
                }
                return;
            }
            match m.pin(h, tier) {
                Ok(g) => {
                    let mut got = vec![0u8; len];
                    match g.read(0, &mut got) {
                        Ok(()) if matches(seed, &got) => {}
                        Ok(()) => tally.corrupted += 1,
                        Err(e) => tally.error("pinned read of extent", &e),
                    }
                }
                Err(e @ ManagerError::OutOfMemory { .. }) => tally.refusal(&e),
                Err(e) => tally.error("pin extent", &e),
            }
        }
        1 => {
            // An explicit swap-out of a shared or an own tensor.
            let h = match (below(rng, 2), mix.own.is_empty()) {
                (0, false) => mix.own[below(rng, mix.own.len() as u64) as usize].0,
                _ => mix.shared[below(rng, mix.shared.len() as u64) as usize].0,
            };
            match m.swap_out(h, tier) {
                Ok(n) => tally.swap_outs += u64::from(n > 0),
                Err(e @ (ManagerError::OutOfMemory { .. } | ManagerError::TooLarge { .. })) => {
                    tally.refusal(&e)
                }
                Err(e) => tally.error("swap out", &e),
            }
        }
        2 => match m.compact_tier(tier) {
            Ok(r) if r.verify_failures == 0 => {}
            Ok(_) => tally.corrupted += 1,
            Err(e) => tally.error("compact", &e),
        },
        3 => {
            // Pins of shared weights held across operations: take one, or read and let go
            // of one.
            if held.len() < 2 && below(rng, 2) == 0 {
                let (h, seed) = mix.shared[below(rng, mix.shared.len() as u64) as usize];
                match m.pin(h, tier) {
                    Ok(g) => held.push((g, seed)),
                    Err(e @ ManagerError::OutOfMemory { .. }) => tally.refusal(&e),
                    Err(e) => tally.error("pin and hold", &e),
                }
            } else if !held.is_empty() {
                let (g, seed) = held.swap_remove(below(rng, held.len() as u64) as usize);
                let mut got = vec![0u8; mix.len_shared];
                match g.read(0, &mut got) {
                    Ok(()) if matches(seed, &got) => {}
                    Ok(()) => tally.corrupted += 1,
                    Err(e) => tally.error("pinned read of a held pin", &e),
                }
            }
        }
        4 => {
            // A write through a held pin: claim a rewritten tensor, pin it where its only
            // copy is, write the next version whole (plainly or through a lend), keep the
            // pin for a while, then let go.
            if let Some((i, g)) = writing.take() {
                let r = &mix.rewritten[i];
                let mut got = vec![0u8; REWRITTEN_BYTES];
                let v = r.version.load(Ordering::Acquire);
                match g.read(0, &mut got) {
                    Ok(()) if matches(rewritten_seed(i, v), &got) => {}
                    Ok(()) => tally.corrupted += 1,
                    Err(e) => tally.error("pinned read by the writer", &e),
                }
                if below(rng, 2) == 0 {
                    *writing = Some((i, g));
                    write_version(i, r, writing, rng, tally);
                } else {
                    drop(g);
                    r.claimed.store(false, Ordering::Release);
                }
                return;
            }
            let i = below(rng, mix.rewritten.len() as u64) as usize;
            let r = &mix.rewritten[i];
            if r.claimed.swap(true, Ordering::AcqRel) {
                return;
            }
            match m.pin(r.handle, Tier::Host) {
                Ok(g) => {
                    *writing = Some((i, g));
                    write_version(i, r, writing, rng, tally);
                }
                Err(e) => {
                    r.claimed.store(false, Ordering::Release);
                    tally.error("pin to write", &e);
                }
            }
        }
        _ => {
            // A read of a tensor that may be being written through another thread's pin:
            // through a pin of its own (on the tier of its only copy) or a plain read.
            let i = below(rng, mix.rewritten.len() as u64) as usize;
            let r = &mix.rewritten[i];
            let from = r.version.load(Ordering::Acquire);
            let mut got = vec![0u8; REWRITTEN_BYTES];
            let read = if below(rng, 2) == 0 {
                m.read(r.handle, 0, &mut got)
            } else {
                m.pin(r.handle, Tier::Host)
                    .and_then(|g| g.read(0, &mut got))
            };
            match read {
                Ok(()) if is_version_from(i, from, r, &got) => {}
                Ok(()) => {
                    tally.pinned_write_read_failures += 1;
                    tally.corrupted += 1;
                }
                Err(e) => {
                    tally.pinned_write_read_failures += 1;
                    tally.error("read of a tensor written through pins", &e);
                }
            }
        }
    }
}

/// Writes the next version of rewritten tensor `i` through the pin in `writing`, then bumps
/// its ledger version.
fn write_version(
    i: usize,
    r: &Rewritten,
    writing: &mut Option<(usize, PinGuard)>,
    rng: &mut SplitMix64,
    tally: &mut Tally,
) {
    let Some((_, g)) = writing.as_ref() else {
        return;
    };
    let v = r.version.load(Ordering::Acquire) + 1;
    let seed = rewritten_seed(i, v);
    let written = if below(rng, 2) == 0 {
        let mut buf = vec![0u8; REWRITTEN_BYTES];
        fill(seed, &mut buf);
        g.write(0, &buf)
    } else {
        g.with_bytes_mut(0, REWRITTEN_BYTES as u64, |bytes| fill(seed, bytes))
    };
    match written {
        Ok(()) => {
            r.version.store(v, Ordering::Release);
            tally.pinned_writes += 1;
        }
        Err(e) => tally.error("write through a pin", &e),
    }
}
