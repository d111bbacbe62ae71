//! loom models of the allocators' races (run with `RUSTFLAGS="--cfg vlmem_loom"
//! LOOM_MAX_PREEMPTIONS=2 cargo test -p vlmem-alloc --release loom`). Tiny capacities make the
//! interesting states (empty cache, refill, flush, split, merge, last reference) appear within
//! one or two operations per thread.

use crate::{
    BinnedAllocator, BinnedConfig, BuddyAllocator, BuddyConfig, Released, SlabConfig, SlabPool,
};
use loom::sync::Arc;
use loom::thread;
use vlmem_core::{AllocError, Block};

fn slab(capacity_blocks: u32, cache_blocks: u32) -> SlabPool {
    let pool = SlabPool::new(SlabConfig {
        block_bytes: 64,
        capacity_blocks,
        cache_blocks,
        caches: 2,
        kind: None,
    });
    pool.unwrap_or_else(|e| panic!("{e}"))
}

fn overlap(a: &Block, b: &Block) -> bool {
    a.offset_bytes() < b.end_bytes() && b.offset_bytes() < a.end_bytes()
}

/// A block allocated through one thread's cache is freed through another's; both threads
/// allocate and free meanwhile, so blocks move cache -> shared stack -> cache. No block is
/// handed out twice, none is lost, and the counters match at the end.
#[test]
fn loom_slab_free_stack_cache_exchange() {
    loom::model(|| {
        let pool = Arc::new(slab(3, 1));
        let first = pool
            .allocate_with_cache(0, 64)
            .unwrap_or_else(|e| panic!("{e}"));
        let p1 = pool.clone();
        let t1 = thread::spawn(move || {
            // Cross-thread free into cache 1 (over its bound of 1 after a second free: flush).
            p1.release_with_cache(1, first)
                .unwrap_or_else(|e| panic!("{e}"));
            let b = p1
                .allocate_with_cache(1, 64)
                .unwrap_or_else(|e| panic!("{e}"));
            p1.release_with_cache(1, b)
                .unwrap_or_else(|e| panic!("{e}"));
        });
        let p2 = pool.clone();
        let t2 = thread::spawn(move || {
            let a = p2.allocate_with_cache(0, 64);
            let b = p2.allocate_with_cache(0, 64);
            if let (Ok(a), Ok(b)) = (&a, &b) {
                assert_ne!(a.slot(), b.slot());
            }
            for r in [a, b] {
                match r {
                    Ok(blk) => {
                        p2.release_with_cache(0, blk)
                            .unwrap_or_else(|e| panic!("{e}"));
                    }
                    // Capacity 3: t1's block plus two here can never exhaust it.
                    Err(e) => panic!("unexpected {e}"),
                }
            }
        });
        t1.join().unwrap_or_else(|_| panic!("t1"));
        t2.join().unwrap_or_else(|_| panic!("t2"));
        let audit = pool.audit().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(audit.walked_live_blocks, 0);
        assert_eq!(audit.stats.allocations, 4);
        assert_eq!(audit.stats.frees, 4);
    });
}

/// Two threads split and merge one 4-unit buddy arena: one takes a 1-unit block, the other a
/// 2-unit block; while both are live they do not overlap, and after both frees the arena has
/// merged back into one block.
#[test]
fn loom_buddy_split_merge_two_threads() {
    loom::model(|| {
        let buddy = Arc::new(
            BuddyAllocator::new(BuddyConfig {
                capacity_bytes: 4 * 64,
                min_block_bytes: 64,
                kind: None,
            })
            .unwrap_or_else(|e| panic!("{e}")),
        );
        let ledger = Arc::new(vlmem_core::sync::Mutex::new(Vec::<Block>::new()));
        let handles: Vec<_> = [64u64, 128]
            .into_iter()
            .map(|bytes| {
                let (buddy, ledger) = (buddy.clone(), ledger.clone());
                thread::spawn(move || {
                    let b = buddy.allocate(bytes).unwrap_or_else(|e| panic!("{e}"));
                    {
                        let mut l = ledger.lock();
                        assert!(l.iter().all(|o| !overlap(o, &b)), "overlap");
                        l.push(b);
                    }
                    {
                        let mut l = ledger.lock();
                        l.retain(|o| *o != b);
                    }
                    buddy.free(b).unwrap_or_else(|e| panic!("{e}"));
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap_or_else(|_| panic!("join"));
        }
        let f = buddy.fragmentation();
        assert_eq!(
            (f.free_bytes, f.largest_free_bytes, f.free_extents),
            (256, 256, 1)
        );
        buddy.audit().unwrap_or_else(|e| panic!("{e}"));
    });
}

/// Two racing frees of one buddy block: exactly one wins, the other gets DoubleFree.
#[test]
fn loom_buddy_double_free_race_exactly_one_wins() {
    loom::model(|| {
        let buddy = Arc::new(
            BuddyAllocator::new(BuddyConfig {
                capacity_bytes: 2 * 64,
                min_block_bytes: 64,
                kind: None,
            })
            .unwrap_or_else(|e| panic!("{e}")),
        );
        let b = buddy.allocate(64).unwrap_or_else(|e| panic!("{e}"));
        let hs: Vec<_> = (0..2)
            .map(|_| {
                let buddy = buddy.clone();
                thread::spawn(move || buddy.free(b))
            })
            .collect();
        let rs: Vec<_> = hs
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| panic!("join")))
            .collect();
        assert_eq!(rs.iter().filter(|r| r.is_ok()).count(), 1);
        assert!(rs.contains(&Err(AllocError::DoubleFree {
            offset_bytes: b.offset_bytes()
        })));
        assert_eq!(buddy.stats().in_use_bytes, 0);
    });
}

/// A block shared by two sequences is released by both concurrently (through different
/// caches): exactly one release frees it, and a third release is refused.
#[test]
fn loom_slab_shared_refcount_release() {
    loom::model(|| {
        let pool = Arc::new(slab(2, 1));
        let b = pool
            .allocate_with_cache(0, 1)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(pool.retain(b), Ok(2));
        let hs: Vec<_> = (0..2)
            .map(|i| {
                let pool = pool.clone();
                thread::spawn(move || pool.release_with_cache(i, b))
            })
            .collect();
        let rs: Vec<_> = hs
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| panic!("join"))
                    .unwrap_or_else(|e| panic!("{e}"))
            })
            .collect();
        assert_eq!(rs.iter().filter(|r| **r == Released::Freed).count(), 1);
        assert!(rs.contains(&Released::StillShared { refs_left: 1 }));
        assert_eq!(
            pool.release(b),
            Err(AllocError::DoubleFree {
                offset_bytes: b.offset_bytes()
            })
        );
        let audit = pool.audit().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((audit.walked_live_blocks, audit.stats.frees), (0, 1));
    });
}

/// A retain racing the last release: either the retain comes first (the block survives with
/// one reference) or it is refused (the block is freed); never both, never a live block in a
/// free list.
#[test]
fn loom_slab_retain_races_last_release() {
    loom::model(|| {
        let pool = Arc::new(slab(1, 1));
        let b = pool
            .allocate_with_cache(0, 1)
            .unwrap_or_else(|e| panic!("{e}"));
        let p1 = pool.clone();
        let t = thread::spawn(move || p1.retain(b));
        let released = pool
            .release_with_cache(1, b)
            .unwrap_or_else(|e| panic!("{e}"));
        let retained = t.join().unwrap_or_else(|_| panic!("join"));
        match (released, retained) {
            (Released::StillShared { refs_left: 1 }, Ok(2)) => {
                assert_eq!(pool.refs(b), 1);
                assert_eq!(pool.release(b), Ok(Released::Freed));
            }
            (Released::Freed, Err(AllocError::DoubleFree { .. })) => {}
            other => panic!("impossible outcome {other:?}"),
        }
        pool.audit().unwrap_or_else(|e| panic!("{e}"));
    });
}

/// The stats snapshot under churn: one thread allocates and frees (splitting and merging)
/// while another takes snapshots; every snapshot's in-use bytes equal the live blocks walked
/// under the same lock, and `in_use + free == capacity`.
#[test]
fn loom_stats_snapshot_consistent() {
    loom::model(|| {
        let a = Arc::new(
            BinnedAllocator::new(BinnedConfig {
                capacity_bytes: 4 * 256,
                granule_bytes: 256,
                kind: None,
            })
            .unwrap_or_else(|e| panic!("{e}")),
        );
        let a1 = a.clone();
        let t = thread::spawn(move || {
            let x = a1.allocate(256).unwrap_or_else(|e| panic!("{e}"));
            let y = a1.allocate(512).unwrap_or_else(|e| panic!("{e}"));
            a1.free(x).unwrap_or_else(|e| panic!("{e}"));
            a1.free(y).unwrap_or_else(|e| panic!("{e}"));
        });
        for _ in 0..2 {
            let audit = a.audit().unwrap_or_else(|e| panic!("{e}"));
            let s = audit.stats;
            assert!(
                s.in_use_bytes == 0
                    || s.in_use_bytes == 256
                    || s.in_use_bytes == 768
                    || s.in_use_bytes == 512
            );
            assert!(s.is_consistent());
        }
        t.join().unwrap_or_else(|_| panic!("join"));
        assert_eq!(a.stats().in_use_bytes, 0);
    });
}

/// The slab's snapshot across caches: a thread allocates and frees through two caches while
/// another takes `stats()`; live blocks are always 0 or 1 and match the walk.
#[test]
fn loom_slab_stats_snapshot_across_caches() {
    loom::model(|| {
        let pool = Arc::new(slab(2, 1));
        let p1 = pool.clone();
        let t = thread::spawn(move || {
            let b = p1
                .allocate_with_cache(0, 1)
                .unwrap_or_else(|e| panic!("{e}"));
            p1.release_with_cache(1, b)
                .unwrap_or_else(|e| panic!("{e}"));
        });
        let s = pool.stats();
        assert!(s.live_blocks <= 1 && s.is_consistent());
        assert_eq!(s.allocations - s.frees, s.live_blocks);
        t.join().unwrap_or_else(|_| panic!("join"));
        let audit = pool.audit().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(audit.walked_live_blocks, 0);
    });
}

/// Compaction racing a free of a block being moved: the commit skips that move and releases
/// the space exactly once; the structure stays whole either way.
#[test]
fn loom_compaction_commit_races_free() {
    loom::model(|| {
        let a = Arc::new(
            BinnedAllocator::new(BinnedConfig {
                capacity_bytes: 4 * 256,
                granule_bytes: 256,
                kind: None,
            })
            .unwrap_or_else(|e| panic!("{e}")),
        );
        let hole = a.allocate(256).unwrap_or_else(|e| panic!("{e}"));
        let moving = a.allocate(256).unwrap_or_else(|e| panic!("{e}"));
        a.free(hole).unwrap_or_else(|e| panic!("{e}"));
        let plan = a.plan_compaction().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(plan.moves().len(), 1);
        let a1 = a.clone();
        let t = thread::spawn(move || a1.free(moving));
        let out = a.commit_compaction(plan).unwrap_or_else(|e| panic!("{e}"));
        let freed = t.join().unwrap_or_else(|_| panic!("join"));
        match (out.moved.as_slice(), freed) {
            // The free came first: the move was skipped.
            ([], Ok(())) => assert_eq!(out.freed_during_plan, vec![moving]),
            // The commit came first: the old handle is stale, free the new one.
            ([(old, new)], Err(AllocError::Stale { .. })) => {
                assert_eq!(*old, moving);
                a.free(*new).unwrap_or_else(|e| panic!("{e}"));
            }
            other => panic!("impossible outcome {other:?}"),
        }
        let audit = a.audit().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(audit.walked_free_bytes, 4 * 256);
    });
}

/// Three threads on a two-block pool with one-block caches: the slow path (every cache lock,
/// then the shared stack) runs, out of memory is the only refusal, no block is handed out twice,
/// and nothing leaks.
#[test]
fn loom_slab_slow_path_three_threads_no_duplicate() {
    loom::model(|| {
        let pool = Arc::new(slab(2, 1));
        let ledger = Arc::new(vlmem_core::sync::Mutex::new(Vec::<u32>::new()));
        let hs: Vec<_> = (0..3usize)
            .map(|t| {
                let (pool, ledger) = (pool.clone(), ledger.clone());
                thread::spawn(move || match pool.allocate_with_cache(t, 64) {
                    Ok(b) => {
                        {
                            let mut l = ledger.lock();
                            assert!(!l.contains(&b.slot()), "block handed out twice");
                            l.push(b.slot());
                        }
                        ledger.lock().retain(|s| *s != b.slot());
                        pool.release_with_cache(t + 1, b)
                            .unwrap_or_else(|e| panic!("{e}"));
                        true
                    }
                    Err(AllocError::OutOfMemory { free_bytes: 0, .. }) => false,
                    Err(e) => panic!("unexpected {e}"),
                })
            })
            .collect();
        let ok = hs
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| panic!("join")))
            .filter(|ok| *ok)
            .count();
        // Two blocks for three threads: at least two succeed (a block freed before the third
        // asks is reused), and at most one is refused.
        assert!(ok >= 2);
        let audit = pool.audit().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(audit.walked_live_blocks, 0);
        assert_eq!(audit.stats.allocations, ok as u64);
    });
}
