//! Every configuration constructor of the tier crate, fed arbitrary values (zero, absurd,
//! overflowing, misaligned): what it accepts works, everything else is a typed
//! `InvalidConfig`, and nothing panics.
mod common;

use common::*;
use proptest::prelude::*;
use std::sync::Arc;
use std::time::Duration;
use vlmem_tier::disk::{MAX_SWAP_FILES, MAX_UNIT_BYTES, MIN_UNIT_BYTES};
use vlmem_tier::engine::{MAX_CHUNK_BYTES, MAX_WORKERS};
use vlmem_tier::{
    DiskOptions, DiskTier, EngineConfig, FirstFitAllocator, IoPoint, Move, Priority, TierBackend,
    TierError, TransferEngine,
};

/// Sizes around the interesting values: any, zero, powers of two, multiples of 4 KiB, and
/// their neighbours.
fn size() -> impl Strategy<Value = u64> {
    prop_oneof![
        any::<u64>(),
        Just(0u64),
        (0u32..64).prop_map(|s| 1u64 << s),
        (0u32..64, -1i64..=1).prop_map(|(s, d)| (1u64 << s).wrapping_add_signed(d)),
        (1u64..=16_384).prop_map(|k| k * 4096),
        (1u64..=64, 1u64..4096).prop_map(|(k, r)| k * 4096 + r),
    ]
}

fn is_typed_io(e: &TierError) -> bool {
    matches!(
        e,
        TierError::Io {
            point: IoPoint::Open | IoPoint::Allocate,
            ..
        } | TierError::NoSpace { .. }
    )
}

/// A short round trip on a disk tier that was accepted: whole and partial reads, a copy
/// inside the tier, and a move through an engine whose chunk is one unit.
fn exercise_disk(d: Arc<DiskTier>) {
    let unit = d.unit_bytes();
    let len = (2 * unit + 5).min(d.capacity_bytes() / 2).min(200_000);
    if len == 0 {
        return;
    }
    let data = pattern(len as usize, unit);
    let a = d.reserve(len, "a").unwrap();
    d.write(&a, 0, &data).unwrap();
    assert_eq!(read_all(&*d, &a), data);
    let mut part = vec![0u8; (len / 3).max(1) as usize];
    let off = len - part.len() as u64;
    d.read(&a, off, &mut part).unwrap();
    assert_eq!(&part[..], &data[off as usize..]);
    if let Ok(b) = d.reserve(len, "b") {
        d.copy_range(&a, 0, &b, 0, len).unwrap();
        assert_eq!(read_all(&*d, &b), data);
        d.release(b).unwrap();
    }
    let h = host(len.next_multiple_of(4096));
    let e = TransferEngine::new(
        &[h.clone(), d.clone() as Arc<dyn TierBackend>],
        EngineConfig {
            chunk_bytes: unit,
            ..EngineConfig::default()
        },
    )
    .unwrap();
    let back = h.reserve(len, "back").unwrap();
    e.submit(Move { src: a, dst: back }, Priority::Demand)
        .unwrap()
        .wait()
        .unwrap();
    assert_eq!(read_all(&*h, &back), data);
    d.release(a).unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn disk_options_are_served_or_refused_with_a_typed_error(
        capacity in prop_oneof![
            4 => (1u64..=8_192).prop_map(|k| k * 4096),
            1 => (1u64..=1 << 20).prop_map(|k| k * 8),
            1 => (1u64..1 << 40).prop_map(|k| k * 4096),
            1 => Just(!7u64), // the largest multiple of 8
        ],
        unit in prop_oneof![2 => (12u32..=26).prop_map(|s| 1u64 << s), 1 => size()],
        file_bytes in prop_oneof![
            2 => Just(None),
            1 => (1u64..=4096).prop_map(|k| Some(k * 4096)),
            1 => size().prop_map(Some),
        ],
        max_batch_bytes in size(),
        encrypt in any::<bool>(),
        direct_io in any::<bool>(),
        preallocate in any::<bool>(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let a = Arc::new(FirstFitAllocator::new(capacity, 8).unwrap());
        let opts = DiskOptions {
            dir: Some(dir.path().to_path_buf()),
            file_bytes,
            direct_io,
            // Preallocating a huge arena would fill the test machine's disk.
            preallocate: preallocate && capacity <= 64 * MIB,
            encrypt,
            unit_bytes: unit,
            max_batch_bytes,
        };
        let fb = file_bytes.unwrap_or(capacity);
        let servable = capacity > 0
            && capacity.is_multiple_of(4096)
            && unit.is_power_of_two()
            && (MIN_UNIT_BYTES..=MAX_UNIT_BYTES).contains(&unit)
            && fb > 0
            && fb.is_multiple_of(4096)
            && capacity.div_ceil(fb) <= MAX_SWAP_FILES;
        match DiskTier::new(a, opts) {
            Ok(d) => {
                prop_assert!(servable, "accepted capacity {capacity}, unit {unit}, file_bytes {file_bytes:?}");
                exercise_disk(Arc::new(d));
            }
            Err(TierError::InvalidConfig(_)) => {
                prop_assert!(!servable, "refused capacity {capacity}, unit {unit}, file_bytes {file_bytes:?}");
            }
            // The operating system may refuse a servable one (a file limit, a full disk).
            Err(e) if servable && is_typed_io(&e) => {}
            Err(e) => prop_assert!(false, "untyped refusal: {e:?}"),
        }
    }

    #[test]
    fn engine_configs_are_served_or_refused_with_a_typed_error(
        workers in prop_oneof![
            4 => 0usize..=6,
            1 => (MAX_WORKERS - 1)..=(MAX_WORKERS + 1),
            1 => any::<usize>(),
        ],
        chunk_bytes in prop_oneof![2 => (1u64..=64).prop_map(|k| k * 64 * 1024), 1 => size()],
        max_queued_jobs in prop_oneof![0usize..=3, any::<usize>()],
        max_batch_bytes in size(),
        max_starve in prop_oneof![
            Just(Duration::ZERO),
            Just(Duration::MAX),
            any::<u64>().prop_map(Duration::from_nanos),
            any::<u64>().prop_map(Duration::from_secs),
        ],
    ) {
        const UNIT: u64 = 64 * 1024;
        let dir = tempfile::tempdir().unwrap();
        let d = Arc::new(
            DiskTier::new(
                alloc(4 * MIB),
                DiskOptions {
                    dir: Some(dir.path().to_path_buf()),
                    preallocate: false,
                    unit_bytes: UNIT,
                    ..DiskOptions::default()
                },
            )
            .unwrap(),
        );
        let h = host(4 * MIB);
        let dev = device(4 * MIB, None);
        let cfg = EngineConfig { workers, chunk_bytes, max_queued_jobs, max_batch_bytes, max_starve };
        let servable = (1..=MAX_WORKERS).contains(&workers)
            && (1..=MAX_CHUNK_BYTES).contains(&chunk_bytes)
            && chunk_bytes.is_multiple_of(UNIT)
            && max_queued_jobs >= 1;
        let tiers: [Arc<dyn TierBackend>; 3] = [h.clone(), dev.clone(), d.clone()];
        match TransferEngine::new(&tiers, cfg) {
            Ok(e) => {
                prop_assert!(servable, "accepted {cfg:?}");
                let len = 3 * UNIT + 17;
                let data = pattern(len as usize, 1);
                let src = h.reserve(len, "s").unwrap();
                h.write(&src, 0, &data).unwrap();
                let on_disk = d.reserve(len, "s").unwrap();
                let t = e.submit(Move { src, dst: on_disk }, Priority::WriteBack).unwrap();
                // However long the timeout, waiting is no overflow.
                let r = t.wait_timeout(Duration::MAX).unwrap_or_else(|_| panic!("still running"));
                prop_assert_eq!(r.unwrap().bytes, len);
                let on_dev = dev.reserve(len, "s").unwrap();
                e.submit(Move { src: on_disk, dst: on_dev }, Priority::Demand)
                    .unwrap()
                    .wait()
                    .unwrap();
                prop_assert_eq!(read_all(&*dev, &on_dev), data);
                // A batch larger than max_batch_bytes is refused, typed; one within it runs.
                let small = h.reserve(4096, "b").unwrap();
                let small_dev = dev.reserve(4096, "b").unwrap();
                match e.submit_batch(vec![Move { src: small, dst: small_dev }], Priority::Prefetch) {
                    Ok(t) => {
                        prop_assert!(max_batch_bytes >= 4096);
                        t.wait().unwrap();
                    }
                    Err(TierError::InvalidConfig(_)) => prop_assert!(max_batch_bytes < 4096),
                    Err(other) => prop_assert!(false, "batch: {other:?}"),
                }
            }
            Err(TierError::InvalidConfig(_)) => prop_assert!(!servable, "refused {cfg:?}"),
            Err(other) => prop_assert!(false, "untyped refusal of {cfg:?}: {other:?}"),
        }
    }
}
