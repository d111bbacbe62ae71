//! Stress: 8 threads of mixed allocations and frees (some frees cross threads) per allocator,
//! checked against an interval ledger (one owner tag per arena unit, claimed and released
//! with atomic swaps: any overlap between two live blocks is caught at once), while a monitor
//! thread audits the allocator (counters equal the walked live blocks under churn). At the
//! end every block is freed: zero leaks, all space merged.
//!
//! Operations per thread: `VLMEM_STRESS_OPS` (default 200,000; the full run is
//! 1,000,000: `VLMEM_STRESS_OPS=1000000 cargo test -p vlmem-alloc --release --test stress`, or
//! the ignored `stress_full_million_*` tests).
#![cfg(not(vlmem_loom))]

use rand::{Rng, SeedableRng, rngs::StdRng};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vlmem_alloc::{
    Audit, BinnedAllocator, BinnedConfig, BuddyAllocator, BuddyConfig, SlabConfig, SlabPool,
};
use vlmem_core::{AllocError, Block, OffsetAllocator};

const THREADS: usize = 8;

fn ops_per_thread() -> u64 {
    std::env::var("VLMEM_STRESS_OPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200_000)
}

struct Ledger {
    unit_bytes: u64,
    owner: Vec<AtomicU64>,
}

impl Ledger {
    fn claim(&self, b: &Block, tag: u64) {
        for u in b.offset_bytes() / self.unit_bytes..b.end_bytes() / self.unit_bytes {
            let prev = self.owner[u as usize].swap(tag, Ordering::AcqRel);
            assert_eq!(prev, 0, "overlap: {b:?} claims unit {u} held by {prev:#x}");
        }
    }
    fn unclaim(&self, b: &Block, tag: u64) {
        for u in b.offset_bytes() / self.unit_bytes..b.end_bytes() / self.unit_bytes {
            let prev = self.owner[u as usize].swap(0, Ordering::AcqRel);
            assert_eq!(prev, tag, "unit {u} of {b:?} was not held by its owner");
        }
    }
}

fn stress(
    alloc: Arc<dyn OffsetAllocator>,
    audit: Arc<dyn Fn() -> Result<Audit, String> + Send + Sync>,
    unit_bytes: u64,
    max_units: u64,
    ops: u64,
) -> u64 {
    let capacity = alloc.capacity_bytes();
    let ledger = Arc::new(Ledger {
        unit_bytes,
        owner: (0..capacity / unit_bytes)
            .map(|_| AtomicU64::new(0))
            .collect(),
    });
    let exchange: Arc<Mutex<Vec<(Block, u64)>>> = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let monitor = {
        let (audit, stop) = (audit.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut samples = 0u64;
            while !stop.load(Ordering::Acquire) {
                let a = audit().unwrap_or_else(|e| panic!("audit under churn: {e}"));
                assert!(a.stats.in_use_bytes <= a.stats.capacity_bytes);
                samples += 1;
                std::thread::sleep(Duration::from_millis(2));
            }
            samples
        })
    };
    let workers: Vec<_> = (0..THREADS)
        .map(|t| {
            let (alloc, ledger, exchange) = (alloc.clone(), ledger.clone(), exchange.clone());
            std::thread::spawn(move || {
                let mut rng = StdRng::seed_from_u64(0x5EED + t as u64);
                let mut live: Vec<(Block, u64)> = Vec::new();
                let mut serial = 0u64;
                let mut ooms = 0u64;
                for _ in 0..ops {
                    let roll = rng.gen_range(0..100);
                    if roll < 48 || live.is_empty() && roll < 90 {
                        let units = rng.gen_range(1..=max_units);
                        match alloc.allocate(units * unit_bytes - rng.gen_range(0..unit_bytes)) {
                            Ok(b) => {
                                serial += 1;
                                let tag = ((t as u64 + 1) << 48) | serial;
                                ledger.claim(&b, tag);
                                live.push((b, tag));
                            }
                            Err(AllocError::OutOfMemory { .. }) => ooms += 1,
                            Err(e) => panic!("unexpected {e}"),
                        }
                    } else if roll < 94 && !live.is_empty() {
                        let (b, tag) = live.swap_remove(rng.gen_range(0..live.len()));
                        ledger.unclaim(&b, tag);
                        alloc.free(b).unwrap_or_else(|e| panic!("free: {e}"));
                    } else if roll < 97 && !live.is_empty() {
                        // Hand a block to another thread.
                        let entry = live.swap_remove(rng.gen_range(0..live.len()));
                        exchange.lock().unwrap().push(entry);
                    } else {
                        // Free a block another thread allocated.
                        let theirs = exchange.lock().unwrap().pop();
                        if let Some((b, tag)) = theirs {
                            ledger.unclaim(&b, tag);
                            alloc
                                .free(b)
                                .unwrap_or_else(|e| panic!("cross-thread free: {e}"));
                        }
                    }
                }
                for (b, tag) in live {
                    ledger.unclaim(&b, tag);
                    alloc.free(b).unwrap_or_else(|e| panic!("final free: {e}"));
                }
                ooms
            })
        })
        .collect();
    let ooms: u64 = workers.into_iter().map(|w| w.join().unwrap()).sum();
    for (b, tag) in exchange.lock().unwrap().drain(..) {
        ledger.unclaim(&b, tag);
        alloc.free(b).unwrap();
    }
    stop.store(true, Ordering::Release);
    let samples = monitor.join().unwrap();
    assert!(samples > 0);
    // Zero leaks: nothing in use, every unit unclaimed, counters balanced.
    let a = audit().unwrap();
    assert_eq!(a.walked_live_blocks, 0);
    assert_eq!(a.stats.in_use_bytes, 0);
    assert_eq!(a.walked_free_bytes, capacity);
    assert_eq!(a.stats.allocations, a.stats.frees);
    assert!(ledger.owner.iter().all(|o| o.load(Ordering::Acquire) == 0));
    ooms
}

fn run_buddy(ops: u64) {
    let unit = 4096;
    let b = Arc::new(
        BuddyAllocator::new(BuddyConfig {
            capacity_bytes: 3000 * unit,
            min_block_bytes: unit,
            kind: None,
        })
        .unwrap(),
    );
    let b2 = b.clone();
    let started = Instant::now();
    stress(b.clone(), Arc::new(move || b2.audit()), unit, 16, ops);
    let f = b.fragmentation();
    assert_eq!(f.free_bytes, 3000 * unit);
    assert_eq!(
        f.free_extents,
        u64::from(3000u32.count_ones()),
        "not fully merged"
    );
    eprintln!("buddy: {THREADS} x {ops} ops in {:?}", started.elapsed());
}

fn run_binned(ops: u64) {
    let unit = 256;
    let b = Arc::new(
        BinnedAllocator::new(BinnedConfig {
            capacity_bytes: 4000 * unit,
            granule_bytes: unit,
            kind: None,
        })
        .unwrap(),
    );
    let b2 = b.clone();
    let started = Instant::now();
    stress(b.clone(), Arc::new(move || b2.audit()), unit, 40, ops);
    let f = b.fragmentation();
    assert_eq!(
        (f.free_bytes, f.free_extents),
        (4000 * unit, 1),
        "not fully merged"
    );
    eprintln!("binned: {THREADS} x {ops} ops in {:?}", started.elapsed());
}

fn run_slab(ops: u64) {
    let unit = 65536;
    let s = Arc::new(
        SlabPool::new(SlabConfig {
            block_bytes: unit,
            capacity_blocks: 300,
            cache_blocks: 16,
            caches: 4,
            kind: None,
        })
        .unwrap(),
    );
    let s2 = s.clone();
    let started = Instant::now();
    stress(s.clone(), Arc::new(move || s2.audit()), unit, 1, ops);
    eprintln!("slab: {THREADS} x {ops} ops in {:?}", started.elapsed());
}

#[test]
fn stress_buddy_ledger() {
    run_buddy(ops_per_thread());
}

#[test]
fn stress_binned_ledger() {
    run_binned(ops_per_thread());
}

#[test]
fn stress_slab_ledger() {
    run_slab(ops_per_thread());
}

#[test]
#[ignore = "the full run: 8 threads x 1,000,000 ops; run with --release --ignored"]
fn stress_full_million_buddy() {
    run_buddy(1_000_000);
}

#[test]
#[ignore = "the full run: 8 threads x 1,000,000 ops; run with --release --ignored"]
fn stress_full_million_binned() {
    run_binned(1_000_000);
}

#[test]
#[ignore = "the full run: 8 threads x 1,000,000 ops; run with --release --ignored"]
fn stress_full_million_slab() {
    run_slab(1_000_000);
}
