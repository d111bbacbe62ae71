//! The stress workload: 8 and 64 threads over every kind and tier, ending with the ledger
//! check (no overlap, nothing lost or corrupted, counters equal to the recount, no stall).

use vlmem_workloads::stress::{StressOptions, run};

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

/// Every switch at once: a KV slab, zero-on-free, checkpoint extents, a 16 MiB disk of
/// 64 KiB units, explicit swap-outs and compaction, pins held across operations and writes
/// through them read by other threads. Nothing lost, corrupted or leaked; every read of a
/// tensor being written through a pin succeeds and shows a whole version.
#[test]
fn stress_with_every_switch_loses_nothing() {
    let r = run(&StressOptions {
        threads: 16,
        ops: Some(8_000),
        kv_block_bytes: Some(4096),
        zero_on_free: true,
        extents: 8,
        disk_bytes: 16 << 20,
        disk_unit_bytes: Some(64 << 10),
        swap_outs: true,
        pinned_writes: true,
        ..Default::default()
    })
    .unwrap();
    assert!(r.ok(), "{r:#?}");
    assert_eq!(r.tensors_verified, 32 + 8 + 8);
    assert!(r.pinned_writes > 0 && r.explicit_swap_outs > 0, "{r:#?}");
}

/// A small, full disk of 1 MiB units with zero-on-free: write-backs are refused for room,
/// and every freed block still comes back.
#[test]
fn stress_on_a_full_disk_with_zero_on_free_leaks_nothing() {
    let r = run(&StressOptions {
        threads: 8,
        ops: Some(4_000),
        zero_on_free: true,
        extents: 4,
        disk_bytes: 8 << 20,
        swap_outs: true,
        ..Default::default()
    })
    .unwrap();
    assert!(r.ok(), "{r:#?}");
}
