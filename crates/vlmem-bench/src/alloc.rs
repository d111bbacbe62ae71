//! `vlmem bench alloc`: the allocators of vlmem-alloc against their baselines, all in this
//! process.
//!
//! - **KV churn**: 256 sequences decode; a sequence takes a 64 KiB block (16 tokens of one
//!   layer's K+V for Qwen3-VL-8B) every 16 tokens, its prompt's blocks at once when it starts,
//!   and frees all its blocks (newest first) when it finishes, then a new one starts. One seeded
//!   trace is replayed against every allocator; the figure is ns per operation (one allocation
//!   or one free), best of three runs. Ours is the slab's per-step batch API (one cache lock
//!   per sequence per step, as a decode step calls it) and, separately, the single-block API.
//!   Baselines: mimalloc and the system allocator doing malloc/free of 64 KiB, and a
//!   `Mutex<Vec<usize>>` free list.
//! - **Mixed sizes**: vision embeddings (1-32 MiB) and activations (256 KiB-48 MiB) in a
//!   4 GiB arena with 4 KiB granules; free-one/allocate-one at about 60% occupancy, each op
//!   timed alone (`Instant` pairs, minus the measured cost of an empty pair); p50 and p99.
//!   Utilization at first failure: fill to the first failure, then 30 rounds of "free 10% at
//!   random, refill to the first failure", requested bytes live / arena at each failure
//!   (mean over the rounds); for same-size runs the minimum over four sizes that are not bin
//!   sizes. Baselines: the plain buddy and the `offset-allocator` crate (raw sizes; it has no
//!   lock, ours include their mutex).
//! - **Contention**: 1, 2, 4, 8 threads allocating and freeing on one slab pool and on one
//!   binned allocator; total throughput, and its ratio to one thread.

use crate::{BenchOptions, BenchResult, SuiteReport};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vlmem_alloc::{
    BinnedAllocator, BinnedConfig, BuddyAllocator, BuddyConfig, SlabConfig, SlabPool,
};
use vlmem_core::{Block, OffsetAllocator};

const KV_BLOCK_BYTES: u64 = 64 << 10;
const KV_SEQUENCES: usize = 256;
const KV_TOKENS_PER_BLOCK: u32 = 16;
const MIB: u64 = 1 << 20;
const GRANULE: u64 = 4096;

/// Runs the suite.
pub fn run(opts: BenchOptions) -> SuiteReport {
    let mut results = Vec::new();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut notes = vec![
        "all figures measured in one process; baselines beside ours".to_string(),
        format!("load average at start: {}", load.split_whitespace().take(3).collect::<Vec<_>>().join(" ")),
        "latencies are single-op Instant pairs minus an empty pair's cost; no multi-core scaling is claimed".to_string(),
    ];
    floors(&mut results);
    kv_churn(opts, &mut results, &mut notes);
    mixed(opts, &mut results, &mut notes);
    contention(opts, &mut results);
    SuiteReport {
        suite: "alloc".into(),
        results,
        notes,
    }
}

// ---------------------------------------------------------------- machine floors

/// What this machine gives right now: the cost of one uncontended atomic read-modify-write
/// (a mutex lock plus unlock is two), and of a `Vec<u32>` pop plus push (a free stack's
/// floor). Allocator figures are judged against these, measured in the same run.
fn floors(results: &mut Vec<BenchResult>) {
    use std::sync::atomic::{AtomicU64, Ordering};
    let n = 5_000_000u32;
    let a = AtomicU64::new(0);
    let t = Instant::now();
    for _ in 0..n {
        a.fetch_add(1, Ordering::AcqRel);
    }
    let rmw = t.elapsed().as_nanos() as f64 / f64::from(n);
    std::hint::black_box(a.load(Ordering::Relaxed));
    let mut v: Vec<u32> = (0..1024).collect();
    let t = Instant::now();
    for i in 0..n {
        let x = v.pop().unwrap_or(i);
        v.push(std::hint::black_box(x ^ (i & 1)));
    }
    let stack = t.elapsed().as_nanos() as f64 / f64::from(n);
    let m = Mutex::new(0u64);
    let t = Instant::now();
    for _ in 0..n {
        *m.lock().unwrap_or_else(|e| e.into_inner()) += 1;
    }
    let lock = t.elapsed().as_nanos() as f64 / f64::from(n);
    results.push(BenchResult::new("floor_atomic_rmw_ns", rmw, "ns"));
    results.push(BenchResult::new("floor_mutex_lock_unlock_ns", lock, "ns"));
    results.push(BenchResult::new("floor_vec_pop_push_ns", stack, "ns"));
}

// ---------------------------------------------------------------- KV churn

/// One decode step: sequences that finish (free all blocks), then (sequence, blocks) to add.
struct KvStep {
    finish: Vec<u16>,
    grow: Vec<(u16, u32)>,
}

fn kv_trace(steps: usize, seed: u64) -> (Vec<KvStep>, u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    // (tokens so far, tokens at which it finishes)
    let mut seqs: Vec<(u32, u32)> = (0..KV_SEQUENCES).map(|_| (0, 0)).collect();
    let mut trace = Vec::with_capacity(steps);
    let mut ops = 0u64;
    let mut blocks = vec![0u32; KV_SEQUENCES];
    for _ in 0..steps {
        let mut step = KvStep {
            finish: Vec::new(),
            grow: Vec::new(),
        };
        for (i, s) in seqs.iter_mut().enumerate() {
            if s.0 >= s.1 {
                if s.1 > 0 {
                    step.finish.push(i as u16);
                    ops += u64::from(blocks[i]);
                    blocks[i] = 0;
                }
                let prompt = rng.gen_range(64..=512);
                *s = (prompt, prompt + rng.gen_range(16..=256));
                let n = prompt.div_ceil(KV_TOKENS_PER_BLOCK);
                step.grow.push((i as u16, n));
                blocks[i] += n;
                ops += u64::from(n);
            } else {
                s.0 += 1;
                if s.0 % KV_TOKENS_PER_BLOCK == 1 {
                    step.grow.push((i as u16, 1));
                    blocks[i] += 1;
                    ops += 1;
                }
            }
        }
        trace.push(step);
    }
    (trace, ops)
}

trait KvBackend {
    type H: Copy;
    fn alloc_n(&mut self, n: u32, out: &mut Vec<Self::H>);
    fn free_all(&mut self, blocks: &mut Vec<Self::H>);
}

fn replay<B: KvBackend>(backend: &mut B, trace: &[KvStep]) -> Duration {
    let mut seqs: Vec<Vec<B::H>> = (0..KV_SEQUENCES).map(|_| Vec::with_capacity(64)).collect();
    let start = Instant::now();
    for step in trace {
        for &s in &step.finish {
            backend.free_all(&mut seqs[s as usize]);
        }
        for &(s, n) in &step.grow {
            backend.alloc_n(n, &mut seqs[s as usize]);
        }
    }
    let elapsed = start.elapsed();
    for s in &mut seqs {
        backend.free_all(s);
    }
    elapsed
}

struct SlabBatched(SlabPool);
impl KvBackend for SlabBatched {
    type H = Block;
    fn alloc_n(&mut self, n: u32, out: &mut Vec<Block>) {
        if self
            .0
            .allocate_batch_with_cache(0, n as usize, out)
            .is_err()
        {
            panic!("KV pool too small for the trace");
        }
    }
    fn free_all(&mut self, blocks: &mut Vec<Block>) {
        if self.0.release_batch_with_cache(0, blocks).is_err() {
            panic!("KV release refused");
        }
        blocks.clear();
    }
}

struct SlabSingle(SlabPool);
impl KvBackend for SlabSingle {
    type H = Block;
    fn alloc_n(&mut self, n: u32, out: &mut Vec<Block>) {
        for _ in 0..n {
            match self.0.allocate_with_cache(0, KV_BLOCK_BYTES) {
                Ok(b) => out.push(b),
                Err(e) => panic!("KV pool too small for the trace: {e}"),
            }
        }
    }
    fn free_all(&mut self, blocks: &mut Vec<Block>) {
        while let Some(b) = blocks.pop() {
            if self.0.release_with_cache(0, b).is_err() {
                panic!("KV release refused");
            }
        }
    }
}

/// No allocator at all: the replay's own cost (trace walk, per-sequence handle vectors).
struct NullHarness(usize);
impl KvBackend for NullHarness {
    type H = usize;
    fn alloc_n(&mut self, n: u32, out: &mut Vec<usize>) {
        for _ in 0..n {
            self.0 += 1;
            out.push(std::hint::black_box(self.0));
        }
    }
    fn free_all(&mut self, blocks: &mut Vec<usize>) {
        while let Some(b) = blocks.pop() {
            std::hint::black_box(b);
        }
    }
}

struct MutexVec(Mutex<Vec<usize>>);
impl KvBackend for MutexVec {
    type H = usize;
    fn alloc_n(&mut self, n: u32, out: &mut Vec<usize>) {
        for _ in 0..n {
            let id = self.0.lock().unwrap_or_else(|e| e.into_inner()).pop();
            out.push(id.unwrap_or_else(|| panic!("free list too small")));
        }
    }
    fn free_all(&mut self, blocks: &mut Vec<usize>) {
        while let Some(b) = blocks.pop() {
            self.0.lock().unwrap_or_else(|e| e.into_inner()).push(b);
        }
    }
}

struct System;
impl KvBackend for System {
    type H = ();
    fn alloc_n(&mut self, _n: u32, _out: &mut Vec<()>) {
        unreachable!("System uses SystemBoxes")
    }
    fn free_all(&mut self, _blocks: &mut Vec<()>) {}
}

/// The system allocator through `Box<[MaybeUninit<u8>]>` (malloc/free, memory untouched).
struct SystemBoxes {
    seqs_boxes: Vec<Vec<Box<[std::mem::MaybeUninit<u8>]>>>,
}

fn replay_system(trace: &[KvStep]) -> Duration {
    let mut sb = SystemBoxes {
        seqs_boxes: (0..KV_SEQUENCES).map(|_| Vec::with_capacity(64)).collect(),
    };
    let _ = System;
    let start = Instant::now();
    for step in trace {
        for &s in &step.finish {
            let v = &mut sb.seqs_boxes[s as usize];
            while let Some(b) = v.pop() {
                drop(std::hint::black_box(b));
            }
        }
        for &(s, n) in &step.grow {
            let v = &mut sb.seqs_boxes[s as usize];
            for _ in 0..n {
                v.push(std::hint::black_box(Box::new_uninit_slice(
                    KV_BLOCK_BYTES as usize,
                )));
            }
        }
    }
    start.elapsed()
}

#[allow(unsafe_code)]
mod mi {
    //! mimalloc as a baseline in this process: its `GlobalAlloc` is called directly (it is
    //! not this binary's global allocator). The only unsafe code in the bench crate.
    use std::alloc::{GlobalAlloc, Layout};

    /// A 64 KiB block from mimalloc, returned on drop.
    pub struct MiBlock(*mut u8);

    const LAYOUT: Layout = match Layout::from_size_align(super::KV_BLOCK_BYTES as usize, 64) {
        Ok(l) => l,
        Err(_) => panic!("bad layout"),
    };

    impl MiBlock {
        /// Allocates one block (aborts through handle_alloc_error if mimalloc is out).
        pub fn new() -> Self {
            // SAFETY: LAYOUT has a non-zero size, as GlobalAlloc::alloc requires.
            let p = unsafe { mimalloc::MiMalloc.alloc(LAYOUT) };
            if p.is_null() {
                std::alloc::handle_alloc_error(LAYOUT);
            }
            MiBlock(p)
        }
    }

    impl Drop for MiBlock {
        fn drop(&mut self) {
            // SAFETY: self.0 came from MiMalloc.alloc(LAYOUT) in new() and is freed only here,
            // once, with the same layout.
            unsafe { mimalloc::MiMalloc.dealloc(self.0, LAYOUT) }
        }
    }
}

fn replay_mimalloc(trace: &[KvStep]) -> Duration {
    let mut seqs: Vec<Vec<mi::MiBlock>> =
        (0..KV_SEQUENCES).map(|_| Vec::with_capacity(64)).collect();
    let start = Instant::now();
    for step in trace {
        for &s in &step.finish {
            let v = &mut seqs[s as usize];
            while let Some(b) = v.pop() {
                drop(std::hint::black_box(b));
            }
        }
        for &(s, n) in &step.grow {
            let v = &mut seqs[s as usize];
            for _ in 0..n {
                v.push(std::hint::black_box(mi::MiBlock::new()));
            }
        }
    }
    start.elapsed()
}

fn kv_pool() -> SlabPool {
    let pool = SlabPool::new(SlabConfig {
        block_bytes: KV_BLOCK_BYTES,
        capacity_blocks: 65_536,
        cache_blocks: 256,
        caches: 4,
        kind: None,
    });
    pool.unwrap_or_else(|e| panic!("{e}"))
}

fn best_of<F: FnMut() -> Duration>(reps: usize, mut f: F) -> Duration {
    (0..reps).map(|_| f()).min().unwrap_or_default()
}

fn kv_churn(opts: BenchOptions, results: &mut Vec<BenchResult>, notes: &mut Vec<String>) {
    let steps = if opts.quick { 400 } else { 8_000 };
    let reps = if opts.quick { 1 } else { 3 };
    let (trace, ops) = kv_trace(steps, 42);
    let per_op = |d: Duration| d.as_nanos() as f64 / ops as f64;
    let mut batched = SlabBatched(kv_pool());
    let ours = per_op(best_of(reps, || replay(&mut batched, &trace)));
    let mut single = SlabSingle(kv_pool());
    let ours_single = per_op(best_of(reps, || replay(&mut single, &trace)));
    let mut mv = MutexVec(Mutex::new((0..65_536usize).rev().collect()));
    let mutex_vec = per_op(best_of(reps, || replay(&mut mv, &trace)));
    let mimalloc = per_op(best_of(reps, || replay_mimalloc(&trace)));
    let null = per_op(best_of(reps, || replay(&mut NullHarness(0), &trace)));
    let system = per_op(best_of(reps, || replay_system(&trace)));
    results.push(BenchResult::new("kv_churn_ns_per_op", ours, "ns/op"));
    results.push(BenchResult::new(
        "kv_churn_single_op_ns_per_op",
        ours_single,
        "ns/op",
    ));
    results.push(BenchResult::new(
        "kv_churn_ns_per_op@mimalloc",
        mimalloc,
        "ns/op",
    ));
    results.push(BenchResult::new(
        "kv_churn_ns_per_op@system",
        system,
        "ns/op",
    ));
    results.push(BenchResult::new(
        "kv_churn_ns_per_op@mutex_vec",
        mutex_vec,
        "ns/op",
    ));
    results.push(BenchResult::new(
        "kv_churn_ns_per_op@null_harness",
        null,
        "ns/op",
    ));
    results.push(BenchResult::new(
        "kv_churn_speedup_vs_mimalloc",
        mimalloc / ours,
        "ratio",
    ));
    results.push(BenchResult::new(
        "kv_churn_single_op_speedup_vs_mimalloc",
        mimalloc / ours_single,
        "ratio",
    ));
    notes.push(format!(
        "kv churn: {KV_SEQUENCES} sequences, {steps} decode steps, {ops} ops (allocs + frees) of 64 KiB blocks; best of {reps}"
    ));
}

// ---------------------------------------------------------------- mixed sizes

/// The arena for mixed-size work, in bytes (offset-allocator counts 4 KiB units in a u32).
const MIXED_ARENA: u64 = 4 << 30;

trait VarAlloc {
    type H: Copy;
    fn alloc(&mut self, bytes: u64) -> Option<Self::H>;
    fn free(&mut self, h: Self::H);
}

struct Ours<'a, A: OffsetAllocator>(&'a A);
impl<A: OffsetAllocator> VarAlloc for Ours<'_, A> {
    type H = Block;
    fn alloc(&mut self, bytes: u64) -> Option<Block> {
        self.0.allocate(bytes).ok()
    }
    fn free(&mut self, h: Block) {
        if self.0.free(h).is_err() {
            panic!("free refused");
        }
    }
}

struct Oa(offset_allocator::Allocator);
impl VarAlloc for Oa {
    type H = offset_allocator::Allocation;
    fn alloc(&mut self, bytes: u64) -> Option<Self::H> {
        self.0.allocate(bytes.div_ceil(GRANULE) as u32)
    }
    fn free(&mut self, h: Self::H) {
        self.0.free(h);
    }
}

/// The offset-allocator crate behind a mutex, as a thread-safe allocator would need it.
struct OaMutex(Mutex<offset_allocator::Allocator>);
impl VarAlloc for OaMutex {
    type H = offset_allocator::Allocation;
    fn alloc(&mut self, bytes: u64) -> Option<Self::H> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .allocate(bytes.div_ceil(GRANULE) as u32)
    }
    fn free(&mut self, h: Self::H) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).free(h);
    }
}

fn new_oa() -> Oa {
    let units = (MIXED_ARENA / GRANULE) as u32;
    Oa(offset_allocator::Allocator::with_max_allocs(units, 1 << 16))
}

fn new_binned() -> BinnedAllocator {
    BinnedAllocator::new(BinnedConfig {
        capacity_bytes: MIXED_ARENA,
        granule_bytes: GRANULE,
        kind: None,
    })
    .unwrap_or_else(|e| panic!("{e}"))
}

fn new_buddy() -> BuddyAllocator {
    BuddyAllocator::new(BuddyConfig {
        capacity_bytes: MIXED_ARENA,
        min_block_bytes: GRANULE,
        kind: None,
    })
    .unwrap_or_else(|e| panic!("{e}"))
}

fn mixed_size(rng: &mut StdRng) -> u64 {
    if rng.gen_bool(0.5) {
        rng.gen_range(MIB..=32 * MIB)
    } else {
        rng.gen_range(256 << 10..=48 * MIB)
    }
}

/// Per-op latencies (ns) of free-one/allocate-one at steady occupancy.
fn latencies<A: VarAlloc>(a: &mut A, ops: usize, seed: u64, timer_ns: f64) -> Vec<f64> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut live: Vec<A::H> = Vec::new();
    let mut live_bytes = 0u64;
    let mut sizes: Vec<u64> = Vec::new();
    // Warm up to ~60% requested occupancy.
    while live_bytes < MIXED_ARENA * 6 / 10 {
        let s = mixed_size(&mut rng);
        match a.alloc(s) {
            Some(h) => {
                live.push(h);
                sizes.push(s);
                live_bytes += s;
            }
            None => break,
        }
    }
    let mut out = Vec::with_capacity(ops * 2);
    for _ in 0..ops {
        if !live.is_empty() {
            let i = rng.gen_range(0..live.len());
            let h = live.swap_remove(i);
            sizes.swap_remove(i);
            let t = Instant::now();
            a.free(h);
            out.push(t.elapsed().as_nanos() as f64 - timer_ns);
        }
        let s = mixed_size(&mut rng);
        let t = Instant::now();
        let r = a.alloc(s);
        out.push(t.elapsed().as_nanos() as f64 - timer_ns);
        if let Some(h) = r {
            live.push(h);
            sizes.push(s);
        }
    }
    for h in live {
        a.free(h);
    }
    out
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v.get(i).copied().unwrap_or(0.0).max(0.0)
}

fn timer_overhead_ns() -> f64 {
    let mut v: Vec<f64> = (0..10_000)
        .map(|_| {
            let t = Instant::now();
            t.elapsed().as_nanos() as f64
        })
        .collect();
    percentile(&mut v, 0.5)
}

/// Mean utilization at first failure over `rounds` rounds of "free 10%, refill to failure".
fn utilization<A: VarAlloc>(
    a: &mut A,
    mut size: impl FnMut(&mut StdRng) -> u64,
    rounds: usize,
    seed: u64,
) -> f64 {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut live: Vec<(A::H, u64)> = Vec::new();
    let mut live_bytes = 0u64;
    let mut sum = 0.0;
    for _ in 0..=rounds {
        loop {
            let s = size(&mut rng);
            match a.alloc(s) {
                Some(h) => {
                    live.push((h, s));
                    live_bytes += s;
                }
                None => break,
            }
        }
        sum += live_bytes as f64 / MIXED_ARENA as f64;
        let n = live.len() / 10;
        for _ in 0..n.max(1).min(live.len()) {
            let (h, s) = live.swap_remove(rng.gen_range(0..live.len()));
            a.free(h);
            live_bytes -= s;
        }
    }
    for (h, _) in live {
        a.free(h);
    }
    sum / (rounds + 1) as f64
}

const SAME_SIZES: [u64; 4] = [3_274_752, 2_359_297, 8_392_704, 16_781_313];

fn min_over_same_sizes(mut f: impl FnMut(u64) -> f64) -> f64 {
    SAME_SIZES
        .iter()
        .map(|&s| f(s))
        .fold(f64::INFINITY, f64::min)
}

fn mixed(opts: BenchOptions, results: &mut Vec<BenchResult>, notes: &mut Vec<String>) {
    let ops = if opts.quick { 20_000 } else { 300_000 };
    let rounds = if opts.quick { 5 } else { 30 };
    let timer = timer_overhead_ns();
    let binned = new_binned();
    let buddy = new_buddy();
    let mut lat_ours = latencies(&mut Ours(&binned), ops, 1, timer);
    let mut lat_buddy = latencies(&mut Ours(&buddy), ops, 1, timer);
    let mut lat_oa = latencies(&mut new_oa(), ops, 1, timer);
    let mut lat_oa_mutex = latencies(&mut OaMutex(Mutex::new(new_oa().0)), ops, 1, timer);
    for (suffix, v) in [
        ("", &mut lat_ours),
        ("@buddy", &mut lat_buddy),
        ("@offset_allocator", &mut lat_oa),
        ("@offset_allocator_mutex", &mut lat_oa_mutex),
    ] {
        results.push(BenchResult::new(
            format!("mixed_p50_ns{suffix}"),
            percentile(v, 0.5),
            "ns",
        ));
        results.push(BenchResult::new(
            format!("mixed_p99_ns{suffix}"),
            percentile(v, 0.99),
            "ns",
        ));
        results.push(BenchResult::new(
            format!("mixed_p999_ns{suffix}"),
            percentile(v, 0.999),
            "ns",
        ));
    }
    let u_same = min_over_same_sizes(|s| utilization(&mut Ours(&new_binned()), |_| s, rounds, 7));
    let u_same_buddy =
        min_over_same_sizes(|s| utilization(&mut Ours(&new_buddy()), |_| s, rounds, 7));
    let u_same_oa = min_over_same_sizes(|s| utilization(&mut new_oa(), |_| s, rounds, 7));
    let u_mixed = utilization(&mut Ours(&binned), mixed_size, rounds, 9);
    let u_mixed_buddy = utilization(&mut Ours(&buddy), mixed_size, rounds, 9);
    let u_mixed_oa = utilization(&mut new_oa(), mixed_size, rounds, 9);
    results.push(BenchResult::new("utilization_same_size", u_same, "ratio"));
    results.push(BenchResult::new(
        "utilization_same_size@buddy",
        u_same_buddy,
        "ratio",
    ));
    results.push(BenchResult::new(
        "utilization_same_size@offset_allocator",
        u_same_oa,
        "ratio",
    ));
    results.push(BenchResult::new("utilization_mixed", u_mixed, "ratio"));
    results.push(BenchResult::new(
        "utilization_mixed@buddy",
        u_mixed_buddy,
        "ratio",
    ));
    results.push(BenchResult::new(
        "utilization_mixed@offset_allocator",
        u_mixed_oa,
        "ratio",
    ));
    notes.push(format!(
        "mixed: 4 GiB arena, 4 KiB granules, {ops} free+alloc pairs at ~60% occupancy; timer pair cost {timer:.0} ns subtracted; utilization over {rounds} rounds, same-size = min over {SAME_SIZES:?} bytes"
    ));
}

// ---------------------------------------------------------------- contention

fn contention(opts: BenchOptions, results: &mut Vec<BenchResult>) {
    let total_ops: u64 = if opts.quick { 200_000 } else { 4_000_000 };
    for (name, run) in [
        ("slab", contention_slab as fn(usize, u64) -> Duration),
        ("binned", contention_binned as fn(usize, u64) -> Duration),
    ] {
        let mut base = 0.0;
        for threads in [1usize, 2, 4, 8] {
            let d = run(threads, total_ops / threads as u64);
            let mops = total_ops as f64 / d.as_secs_f64() / 1e6;
            if threads == 1 {
                base = mops;
            }
            results.push(BenchResult::new(
                format!("contention_{name}_{threads}t_mops"),
                mops,
                "Mops/s",
            ));
            results.push(BenchResult::new(
                format!("contention_{name}_{threads}t_ratio"),
                mops / base,
                "ratio",
            ));
        }
    }
}

fn run_threads(threads: usize, f: impl Fn(usize) + Send + Sync + 'static) -> Duration {
    let f = Arc::new(f);
    let start = Instant::now();
    let hs: Vec<_> = (0..threads)
        .map(|t| {
            let f = f.clone();
            std::thread::spawn(move || f(t))
        })
        .collect();
    for h in hs {
        if h.join().is_err() {
            panic!("contention worker panicked");
        }
    }
    start.elapsed()
}

fn contention_slab(threads: usize, ops_per_thread: u64) -> Duration {
    let pool = Arc::new(kv_pool());
    run_threads(threads, move |t| {
        let mut held = Vec::with_capacity(32);
        let mut i = 0;
        while i < ops_per_thread {
            for _ in 0..16 {
                if let Ok(b) = pool.allocate_with_cache(t, KV_BLOCK_BYTES) {
                    held.push(b);
                }
            }
            for b in held.drain(..) {
                let _ = pool.release_with_cache(t, b);
            }
            i += 32;
        }
    })
}

fn contention_binned(threads: usize, ops_per_thread: u64) -> Duration {
    let a = Arc::new(new_binned());
    run_threads(threads, move |t| {
        let mut rng = StdRng::seed_from_u64(t as u64);
        let mut held = Vec::with_capacity(16);
        let mut i = 0;
        while i < ops_per_thread {
            for _ in 0..8 {
                if let Ok(b) = a.allocate(rng.gen_range(256 << 10..=8 * MIB)) {
                    held.push(b);
                }
            }
            for b in held.drain(..) {
                let _ = a.free(b);
            }
            i += 16;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quick_run_reports_every_figure() {
        let r = run(BenchOptions { quick: true });
        for name in [
            "kv_churn_ns_per_op",
            "kv_churn_ns_per_op@mimalloc",
            "kv_churn_ns_per_op@system",
            "kv_churn_ns_per_op@mutex_vec",
            "mixed_p50_ns",
            "mixed_p99_ns",
            "mixed_p50_ns@offset_allocator",
            "mixed_p99_ns@buddy",
            "utilization_same_size",
            "utilization_same_size@offset_allocator",
            "utilization_mixed",
            "utilization_mixed@buddy",
            "contention_slab_8t_ratio",
        ] {
            let v = r.value(name).unwrap_or_else(|| panic!("missing {name}"));
            assert!(v.is_finite() && v >= 0.0, "{name} = {v}");
        }
        assert_eq!(r.value("contention_slab_1t_ratio"), Some(1.0));
        // Rounding to bins must beat the raw offset allocator on same-size runs.
        assert!(
            r.value("utilization_same_size").unwrap()
                > r.value("utilization_same_size@offset_allocator").unwrap()
        );
    }

    /// The full run, printed: `cargo test -p vlmem-bench --release -- --ignored print_alloc_report --nocapture`.
    #[test]
    #[ignore = "full benchmark (about a minute); run in release"]
    fn print_alloc_report() {
        let r = run(BenchOptions { quick: false });
        for res in &r.results {
            println!("{:<45} {:>12.3} {}", res.name, res.value, res.unit);
        }
        for n in &r.notes {
            println!("note: {n}");
        }
    }
}
