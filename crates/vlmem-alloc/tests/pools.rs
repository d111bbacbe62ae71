//! Typed pools under threads: no thread starves, pool stats stay exact under churn, and
//! compaction plans and commits while other threads allocate and free.
#![cfg(not(vlmem_loom))]

use rand::{Rng, SeedableRng, rngs::StdRng};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use vlmem_alloc::{BinnedAllocator, BinnedConfig, PoolConfig, Strategy, TypedPools};
use vlmem_core::sync::Mutex as FairMutex;
use vlmem_core::{AllocError, Block, TensorKind};

const MIB: u64 = 1 << 20;

fn pools() -> TypedPools {
    TypedPools::new(&[
        PoolConfig {
            kind: TensorKind::KvCache,
            arena_bytes: 64 * MIB,
            budget_bytes: 64 * MIB,
            strategy: Strategy::Slab {
                block_bytes: 64 << 10,
                cache_blocks: 32,
                caches: 4,
            },
        },
        PoolConfig {
            kind: TensorKind::Activation,
            arena_bytes: 64 * MIB,
            budget_bytes: 48 * MIB,
            strategy: Strategy::Binned {
                granule_bytes: 4096,
            },
        },
        PoolConfig {
            kind: TensorKind::Weight,
            arena_bytes: 64 * MIB,
            budget_bytes: 64 * MIB,
            strategy: Strategy::Buddy {
                min_block_bytes: 64 << 10,
            },
        },
    ])
    .unwrap()
}

/// 8 threads hammer one pool each (three pools: slab, binned, buddy, one at a time): every
/// thread finishes its quota, and no single operation waits anywhere near the bound. The
/// bound is generous (the 2-vCPU VM preempts for milliseconds); the point is progress.
#[test]
fn eight_threads_on_one_pool_all_make_progress() {
    let p = Arc::new(pools());
    for kind in [
        TensorKind::KvCache,
        TensorKind::Activation,
        TensorKind::Weight,
    ] {
        let quota = 20_000u32;
        let start = Instant::now();
        let hs: Vec<_> = (0..8)
            .map(|t| {
                let p = p.clone();
                std::thread::spawn(move || {
                    let mut rng = StdRng::seed_from_u64(t);
                    let mut worst = Duration::ZERO;
                    let mut held = Vec::new();
                    for _ in 0..quota {
                        let max_bytes = if kind == TensorKind::KvCache {
                            64 << 10
                        } else {
                            256 << 10
                        };
                        let bytes = rng.gen_range(1..=max_bytes);
                        let t0 = Instant::now();
                        let r = p.allocate(kind, bytes);
                        worst = worst.max(t0.elapsed());
                        match r {
                            Ok(b) => held.push(b),
                            Err(AllocError::OutOfMemory { .. }) => {}
                            Err(e) => panic!("{e}"),
                        }
                        if held.len() > 8 {
                            let b = held.swap_remove(0);
                            let t0 = Instant::now();
                            p.free(b).unwrap();
                            worst = worst.max(t0.elapsed());
                        }
                    }
                    for b in held {
                        p.free(b).unwrap();
                    }
                    (worst, Instant::now())
                })
            })
            .collect();
        let results: Vec<_> = hs.into_iter().map(|h| h.join().unwrap()).collect();
        let elapsed = start.elapsed();
        let worst = results.iter().map(|r| r.0).max().unwrap();
        let first_done = results.iter().map(|r| r.1).min().unwrap();
        let last_done = results.iter().map(|r| r.1).max().unwrap();
        eprintln!(
            "{kind}: 8 x {quota} ops in {elapsed:?}; worst single op {worst:?}; finish spread {:?}",
            last_done - first_done
        );
        assert!(
            elapsed < Duration::from_secs(60),
            "{kind}: took {elapsed:?}"
        );
        assert!(
            worst < Duration::from_secs(2),
            "{kind}: an op waited {worst:?}"
        );
        let s = p.stats(kind).unwrap();
        assert_eq!((s.in_use_bytes, s.live_blocks), (0, 0));
        assert_eq!(s.allocations, s.frees);
        p.allocator(kind).unwrap().audit().unwrap();
    }
}

/// Pool stats under churn of several pools: each pool's snapshot is self-consistent and
/// matches a walk of its allocator taken under the same lock; at the end the totals equal
/// the sum of what the threads recorded.
#[test]
fn pool_stats_exact_under_churn() {
    let p = Arc::new(pools());
    let stop = Arc::new(AtomicBool::new(false));
    let monitor = {
        let (p, stop) = (p.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut n = 0;
            while !stop.load(Ordering::Acquire) {
                for k in [
                    TensorKind::KvCache,
                    TensorKind::Activation,
                    TensorKind::Weight,
                ] {
                    let a = p
                        .allocator(k)
                        .unwrap()
                        .audit()
                        .unwrap_or_else(|e| panic!("{k}: {e}"));
                    assert!(a.stats.is_consistent());
                    assert!(a.stats.in_use_bytes <= a.stats.limit_bytes);
                }
                assert!(p.stats_all().total.is_consistent());
                n += 1;
            }
            n
        })
    };
    let hs: Vec<_> = (0..4)
        .map(|t| {
            let p = p.clone();
            std::thread::spawn(move || {
                let mut rng = StdRng::seed_from_u64(100 + t);
                let kinds = [
                    TensorKind::KvCache,
                    TensorKind::Activation,
                    TensorKind::Weight,
                ];
                let mut held: Vec<Block> = Vec::new();
                let mut allocs = [0u64; 5];
                for _ in 0..20_000 {
                    if rng.gen_bool(0.55) {
                        let k = kinds[rng.gen_range(0..3)];
                        if let Ok(b) = p.allocate(k, rng.gen_range(1..=1 << 20)) {
                            allocs[k.index()] += 1;
                            held.push(b);
                        }
                    } else if !held.is_empty() {
                        let b = held.swap_remove(rng.gen_range(0..held.len()));
                        p.free(b).unwrap();
                    }
                }
                for b in held {
                    p.free(b).unwrap();
                }
                allocs
            })
        })
        .collect();
    let mut allocs = [0u64; 5];
    for h in hs {
        for (a, x) in allocs.iter_mut().zip(h.join().unwrap()) {
            *a += x;
        }
    }
    stop.store(true, Ordering::Release);
    assert!(monitor.join().unwrap() > 0);
    let all = p.stats_all();
    for (k, s) in &all.per_kind {
        assert_eq!(s.allocations, allocs[k.index()], "{k}");
        assert_eq!(s.frees, s.allocations);
        assert_eq!(s.in_use_bytes, 0);
    }
    assert_eq!(all.total.allocations, allocs.iter().sum::<u64>());
}

/// Compaction while 4 threads allocate and free: a handle table (level 3) maps ids to blocks;
/// threads free through it, the compactor commits under it and swaps in the moved blocks.
/// After every commit no two live blocks overlap; at quiescence one last pass leaves the
/// free space in one extent.
#[test]
fn compaction_under_concurrent_churn() {
    let unit = 4096u64;
    let a = Arc::new(
        BinnedAllocator::new(BinnedConfig {
            capacity_bytes: 2048 * unit,
            granule_bytes: unit,
            kind: None,
        })
        .unwrap(),
    );
    // parking_lot (through the sync switch): eventually fair, so the compactor gets the table.
    let table: Arc<FairMutex<HashMap<u64, Block>>> = Arc::new(FairMutex::new(HashMap::new()));
    let moved_total = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let check_no_overlap = |t: &HashMap<u64, Block>| {
        let mut v: Vec<Block> = t.values().copied().collect();
        v.sort_by_key(|b| b.offset_bytes());
        for w in v.windows(2) {
            assert!(
                w[0].end_bytes() <= w[1].offset_bytes(),
                "overlap {:?} {:?}",
                w[0],
                w[1]
            );
        }
    };
    let compactor = {
        let (a, table, stop, moved_total) =
            (a.clone(), table.clone(), stop.clone(), moved_total.clone());
        std::thread::spawn(move || {
            let (mut plans, mut moved, mut skipped, mut nonempty) = (0u64, 0u64, 0u64, 0u64);
            while !stop.load(Ordering::Acquire) {
                let plan = a.plan_compaction().unwrap();
                nonempty += u64::from(!plan.is_empty());
                // (The bytes would be copied here, with no allocator lock held.)
                std::thread::yield_now();
                let mut t = table.lock();
                let out = a.commit_compaction(plan).unwrap();
                moved_total.fetch_add(out.moved.len() as u64, Ordering::AcqRel);
                for (old, new) in &out.moved {
                    let id = t
                        .iter()
                        .find(|(_, b)| *b == old)
                        .map(|(id, _)| *id)
                        .expect("moved block is in the table");
                    t.insert(id, *new);
                }
                check_no_overlap(&t);
                drop(t);
                plans += 1;
                moved += out.moved.len() as u64;
                skipped += out.freed_during_plan.len() as u64;
            }
            eprintln!("non-empty plans: {nonempty}");
            (plans, moved, skipped)
        })
    };
    let hs: Vec<_> = (0..4u64)
        .map(|tid| {
            let (a, table, moved_total) = (a.clone(), table.clone(), moved_total.clone());
            std::thread::spawn(move || {
                let mut rng = StdRng::seed_from_u64(7 + tid);
                let mut mine: Vec<u64> = Vec::new();
                let mut next = tid << 40;
                let started = Instant::now();
                let mut ops = 0u64;
                // At least 20,000 ops, and on until the compactor has moved 100 blocks (10 s cap).
                while ops < 20_000
                    || moved_total.load(Ordering::Acquire) < 100
                        && started.elapsed() < Duration::from_secs(10)
                {
                    ops += 1;
                    if ops.is_multiple_of(64) {
                        std::thread::yield_now();
                    }
                    if rng.gen_bool(0.5) {
                        // Allocate under the table lock too: a block the compactor moves
                        // must already be in the table.
                        let mut t = table.lock();
                        match a.allocate(rng.gen_range(1..=40) * unit) {
                            Ok(b) => {
                                next += 1;
                                t.insert(next, b);
                                mine.push(next);
                            }
                            Err(AllocError::OutOfMemory { .. }) => {}
                            Err(e) => panic!("{e}"),
                        }
                    } else if !mine.is_empty() {
                        let id = mine.swap_remove(rng.gen_range(0..mine.len()));
                        // Free under the table lock (3 -> 4), so the compactor cannot swap
                        // the handle between the lookup and the free.
                        let mut t = table.lock();
                        let b = t.remove(&id).unwrap();
                        a.free(b).unwrap_or_else(|e| panic!("free {b:?}: {e}"));
                    }
                }
                let mut t = table.lock();
                for id in mine {
                    let b = t.remove(&id).unwrap();
                    a.free(b).unwrap();
                }
            })
        })
        .collect();
    for h in hs {
        h.join().unwrap();
    }
    stop.store(true, Ordering::Release);
    let (plans, moved, skipped) = compactor.join().unwrap();
    eprintln!(
        "compaction under churn: {plans} plans, {moved} blocks moved, {skipped} freed mid-plan"
    );
    assert!(plans > 0);
    assert!(
        moved > 0,
        "no block was ever moved: the test did not exercise compaction"
    );
    let audit = a.audit().unwrap();
    assert_eq!(audit.walked_live_blocks, 0);
    assert_eq!(a.fragmentation().free_extents, 1);
}
