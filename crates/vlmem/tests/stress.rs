//! The stress workload: 8 and 64 threads over every kind and tier, ending with the ledger
//! check (no overlap, nothing lost or corrupted, counters equal to the recount, no stall).

use vlmem::stress::{StressOptions, run};

#[test]
fn stress_8_threads_loses_nothing() {
    let r = run(&StressOptions {
        threads: 8,
        ops: Some(4_000),
        ..Default::default()
    })
    .unwrap();
    assert!(r.ok(), "{r:#?}");
    assert_eq!(r.ops, 4_000);
    assert_eq!(r.tensors_verified, 32);
    // parking_lot's detector ran exactly when built with the feature.
    assert_eq!(r.deadlock_detector, cfg!(feature = "deadlock-detection"));
}

#[test]
fn stress_64_threads_loses_nothing() {
    let r = run(&StressOptions {
        threads: 64,
        ops: Some(4_000),
        ..Default::default()
    })
    .unwrap();
    assert!(r.ok(), "{r:#?}");
}
