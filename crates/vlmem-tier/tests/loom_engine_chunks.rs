//! loom models of one transfer split over several workers (run with
//! `RUSTFLAGS="--cfg vlmem_loom" cargo test -p vlmem-tier --test loom_engine_chunks --release`).
//! Two workers, a two-chunk move: the second chunk's worker is woken by the first (no lost
//! wake-up leaves a chunk unrun), a racing cancel ends the ticket exactly once with a
//! coherent outcome, and shutdown joins both workers.
#![cfg(vlmem_loom)]

use std::sync::Arc;
use vlmem_tier::{
    EngineConfig, FirstFitAllocator, HostOptions, MemoryTier, Move, Priority, TierBackend,
    TierError, TransferEngine,
};

fn model(f: impl Fn() + Sync + Send + 'static) {
    let mut b = loom::model::Builder::new();
    b.preemption_bound = Some(2);
    b.check(f);
}

fn setup() -> (Arc<MemoryTier>, Arc<MemoryTier>, TransferEngine) {
    let a = Arc::new(FirstFitAllocator::new(64 * 1024, 4096).unwrap());
    let b = Arc::new(FirstFitAllocator::new(64 * 1024, 4096).unwrap());
    let h = Arc::new(MemoryTier::host(a, HostOptions::default()).unwrap());
    let d = Arc::new(MemoryTier::simulated_device(b, None).unwrap());
    let cfg = EngineConfig {
        workers: 2,
        chunk_bytes: 4096,
        max_queued_jobs: 1,
        ..EngineConfig::default()
    };
    let tiers: [Arc<dyn TierBackend>; 2] = [h.clone(), d.clone()];
    let e = TransferEngine::new(&tiers, cfg).unwrap();
    (h, d, e)
}

#[test]
fn two_workers_finish_a_two_chunk_move() {
    model(|| {
        let (h, d, e) = setup();
        let src = h.reserve(8192, "s").unwrap();
        h.write(&src, 0, &[7u8; 8192]).unwrap();
        let dst = d.reserve(8192, "d").unwrap();
        let r = e
            .submit(Move { src, dst }, Priority::Demand)
            .unwrap()
            .wait()
            .unwrap();
        assert_eq!((r.bytes, r.chunks), (8192, 2));
        let mut back = [0u8; 8192];
        d.read(&dst, 0, &mut back).unwrap();
        assert!(back.iter().all(|&b| b == 7));
        drop(e);
    });
}

#[test]
fn cancel_races_two_workers() {
    model(|| {
        let (h, d, e) = setup();
        let src = h.reserve(8192, "s").unwrap();
        h.write(&src, 0, &[7u8; 8192]).unwrap();
        let dst = d.reserve(8192, "d").unwrap();
        let t = e.submit(Move { src, dst }, Priority::Demand).unwrap();
        t.cancel();
        match t.wait() {
            Ok(r) => {
                assert_eq!(r.bytes, 8192);
                let mut back = [0u8; 8192];
                d.read(&dst, 0, &mut back).unwrap();
                assert!(back.iter().all(|&b| b == 7));
            }
            Err(TierError::Cancelled) => {}
            Err(other) => panic!("{other:?}"),
        }
        drop(e);
    });
}
