//! Criterion benches: vlmem-alloc's allocators beside their baselines.
//! `cargo bench -p vlmem-alloc` (the summary with ratios is `vlmem bench alloc`).
//!
//! - `kv/*`: one 64 KiB KV block allocated and freed (and a batch of 16, as a decode step
//!   frees and takes them): our slab; a `Mutex<Vec<usize>>` free list; mimalloc and the
//!   system allocator doing malloc/free of 64 KiB.
//! - `mixed/*`: free one random live block and allocate one of a random size (256 KiB to
//!   48 MiB) with about 150 live in a 4 GiB arena: our binned allocator; the plain buddy; the
//!   offset-allocator crate (no lock).
#![allow(unsafe_code)] // mimalloc's GlobalAlloc is called directly (the only unsafe here).

use criterion::{Criterion, criterion_group, criterion_main};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::alloc::{GlobalAlloc, Layout};
use std::hint::black_box;
use std::sync::Mutex;
use std::time::Duration;
use vlmem_alloc::{
    BinnedAllocator, BinnedConfig, BuddyAllocator, BuddyConfig, SlabConfig, SlabPool,
};
use vlmem_core::{Block, OffsetAllocator};

const KV: u64 = 64 << 10;
const ARENA: u64 = 4 << 30;
const GRANULE: u64 = 4096;

fn kv(c: &mut Criterion) {
    let mut g = c.benchmark_group("kv");
    let pool = SlabPool::new(SlabConfig {
        block_bytes: KV,
        capacity_blocks: 65_536,
        cache_blocks: 256,
        caches: 4,
        kind: None,
    })
    .expect("pool");
    g.bench_function("slab_alloc_free", |b| {
        b.iter(|| {
            let blk = pool.allocate_with_cache(0, KV).expect("alloc");
            pool.release_with_cache(0, black_box(blk)).expect("free");
        })
    });
    let mut v = Vec::with_capacity(16);
    g.bench_function("slab_batch16_alloc_free", |b| {
        b.iter(|| {
            pool.allocate_batch_with_cache(0, 16, &mut v)
                .expect("alloc");
            pool.release_batch_with_cache(0, black_box(&v))
                .expect("free");
            v.clear();
        })
    });
    let free_list = Mutex::new((0..65_536usize).collect::<Vec<_>>());
    g.bench_function("mutex_vec_alloc_free", |b| {
        b.iter(|| {
            let id = free_list.lock().expect("lock").pop().expect("id");
            free_list.lock().expect("lock").push(black_box(id));
        })
    });
    let layout = Layout::from_size_align(KV as usize, 64).expect("layout");
    g.bench_function("mimalloc_alloc_free", |b| {
        b.iter(|| {
            // SAFETY: the layout is non-zero-sized; the pointer is freed once, with the same
            // layout, by the allocator that made it.
            unsafe {
                let p = mimalloc::MiMalloc.alloc(layout);
                assert!(!p.is_null());
                mimalloc::MiMalloc.dealloc(black_box(p), layout);
            }
        })
    });
    g.bench_function("system_alloc_free", |b| {
        b.iter(|| drop(black_box(Box::<[u8]>::new_uninit_slice(KV as usize))))
    });
    g.finish();
}

fn size(rng: &mut StdRng) -> u64 {
    rng.gen_range(256 << 10..=48 << 20)
}

fn churn<H>(
    c: &mut Criterion,
    name: &str,
    mut alloc: impl FnMut(u64) -> Option<H>,
    mut free: impl FnMut(H),
) {
    let mut rng = StdRng::seed_from_u64(1);
    let mut live: Vec<H> = Vec::new();
    for _ in 0..150 {
        if let Some(h) = alloc(size(&mut rng)) {
            live.push(h);
        }
    }
    c.bench_function(name, |b| {
        b.iter(|| {
            if !live.is_empty() {
                let i = rng.gen_range(0..live.len());
                free(live.swap_remove(i));
            }
            if let Some(h) = alloc(size(&mut rng)) {
                live.push(h);
            }
        })
    });
    for h in live {
        free(h);
    }
}

fn mixed(c: &mut Criterion) {
    let binned = BinnedAllocator::new(BinnedConfig {
        capacity_bytes: ARENA,
        granule_bytes: GRANULE,
        kind: None,
    })
    .expect("binned");
    churn::<Block>(
        c,
        "mixed/binned_free_alloc",
        |s| binned.allocate(s).ok(),
        |h| binned.free(h).expect("free"),
    );
    let buddy = BuddyAllocator::new(BuddyConfig {
        capacity_bytes: ARENA,
        min_block_bytes: GRANULE,
        kind: None,
    })
    .expect("buddy");
    churn::<Block>(
        c,
        "mixed/buddy_free_alloc",
        |s| OffsetAllocator::allocate(&buddy, s).ok(),
        |h| buddy.free(h).expect("free"),
    );
    let oa = std::cell::RefCell::new(offset_allocator::Allocator::<u32>::with_max_allocs(
        (ARENA / GRANULE) as u32,
        1 << 16,
    ));
    churn(
        c,
        "mixed/offset_allocator_free_alloc",
        |s| oa.borrow_mut().allocate(s.div_ceil(GRANULE) as u32),
        |h| oa.borrow_mut().free(h),
    );
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(2)).warm_up_time(Duration::from_millis(500));
    targets = kv, mixed
}
criterion_main!(benches);
