//! loom models of the transfer engine (run with
//! `RUSTFLAGS="--cfg vlmem_loom" cargo test -p vlmem-tier --test loom_engine --release`).
//! One worker, a two-chunk move, and a racing cancel or second submitter: every ticket
//! completes exactly once, with a coherent outcome, and shutdown joins the worker.
#![cfg(vlmem_loom)]

use std::sync::Arc;
use vlmem_tier::{
    EngineConfig, FirstFitAllocator, HostOptions, MemoryTier, Move, Priority, TierBackend,
    TierError, TransferEngine,
};

/// Explores every interleaving with up to three preemptions (unbounded runs for minutes).
fn model(f: impl Fn() + Sync + Send + 'static) {
    let mut b = loom::model::Builder::new();
    b.preemption_bound = Some(3);
    b.check(f);
}

fn setup() -> (Arc<MemoryTier>, Arc<MemoryTier>, TransferEngine) {
    let a = Arc::new(FirstFitAllocator::new(64 * 1024, 4096).unwrap());
    let b = Arc::new(FirstFitAllocator::new(64 * 1024, 4096).unwrap());
    let h = Arc::new(MemoryTier::host(a, HostOptions::default()).unwrap());
    let d = Arc::new(MemoryTier::simulated_device(b, None).unwrap());
    let cfg = EngineConfig {
        workers: 1,
        chunk_bytes: 4096,
        max_queued_jobs: 1,
        ..EngineConfig::default()
    };
    let tiers: [Arc<dyn TierBackend>; 2] = [h.clone(), d.clone()];
    let e = TransferEngine::new(&tiers, cfg).unwrap();
    (h, d, e)
}

#[test]
fn cancel_races_the_worker() {
    model(|| {
        let (h, d, e) = setup();
        let src = h.reserve(8192, "s").unwrap();
        h.write(&src, 0, &[7u8; 8192]).unwrap();
        let dst = d.reserve(8192, "d").unwrap();
        let t = e.submit(Move { src, dst }, Priority::Demand).unwrap();
        t.cancel();
        match t.wait() {
            Ok(r) => assert_eq!(r.bytes, 8192),
            Err(TierError::Cancelled) => {}
            Err(other) => panic!("{other:?}"),
        }
        // The source is untouched either way.
        let mut back = [0u8; 8192];
        h.read(&src, 0, &mut back).unwrap();
        assert!(back.iter().all(|&b| b == 7));
        drop(e);
    });
}

#[test]
fn back_pressure_and_shutdown_with_two_submitters() {
    model(|| {
        let (h, d, e) = setup();
        let e = loom::sync::Arc::new(e);
        let s1 = h.reserve(4096, "a").unwrap();
        let s2 = h.reserve(4096, "b").unwrap();
        let d1 = d.reserve(4096, "a").unwrap();
        let d2 = d.reserve(4096, "b").unwrap();
        let e2 = e.clone();
        let other = loom::thread::spawn(move || {
            e2.submit(Move { src: s2, dst: d2 }, Priority::WriteBack)
                .unwrap()
                .wait()
                .unwrap();
        });
        e.submit(Move { src: s1, dst: d1 }, Priority::Demand)
            .unwrap()
            .wait()
            .unwrap();
        other.join().unwrap();
        assert_eq!(e.stats().jobs_succeeded, 2);
    });
}
