//! The disk tier at every integrity unit its configuration accepts: whole and partial reads
//! at many offsets, copies inside the tier, and moves through the engine, with and without
//! encryption; every other unit is refused with a typed error.
mod common;

use common::*;
use std::sync::Arc;
use vlmem_tier::disk::{MAX_UNIT_BYTES, MIN_UNIT_BYTES};
use vlmem_tier::{
    DiskOptions, DiskTier, EngineConfig, Move, Priority, TierBackend, TierError, TransferEngine,
};

/// Test bytes, fast to make for large tensors: one seeded pattern word per 8 bytes.
fn bytes(len: u64, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(len as usize + 8);
    while (v.len() as u64) < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len as usize);
    v
}

fn disk(unit: u64, capacity: u64, encrypt: bool, dir: &std::path::Path) -> DiskTier {
    DiskTier::new(
        alloc(capacity),
        DiskOptions {
            dir: Some(dir.to_path_buf()),
            preallocate: false,
            encrypt,
            unit_bytes: unit,
            ..DiskOptions::default()
        },
    )
    .unwrap_or_else(|e| panic!("a disk with {unit}-byte units: {e}"))
}

/// Tensor lengths for a unit: within one unit, across units with unaligned tails (fewer
/// and shorter for the largest units, to keep the run short).
fn lengths(unit: u64) -> Vec<u64> {
    if unit <= 4 << 20 {
        vec![3, unit / 2 + 5, unit + 4097, 2 * unit + 5]
    } else {
        vec![unit / 2 + 5, unit + 5]
    }
}

/// Offsets of partial reads: both sides of every unit boundary, the ends, and a spread.
fn read_ranges(len: u64, unit: u64) -> Vec<(u64, u64)> {
    let mut offs = vec![0, 1, len / 3, len / 2, len.saturating_sub(1)];
    let mut b = unit;
    while b < len {
        offs.extend([b - 1, b, b + 1]);
        b += unit;
    }
    let mut out = Vec::new();
    for off in offs.into_iter().filter(|&o| o < len) {
        let wants: &[u64] = if unit <= 4 << 20 {
            &[1, 10, 4096, unit + 3]
        } else {
            &[1, unit + 3]
        };
        for &want in wants {
            out.push((off, want.min(len - off)));
        }
    }
    out
}

fn check_unit(unit: u64, encrypt: bool) {
    let dir = tempfile::tempdir().unwrap();
    let max_len = *lengths(unit).iter().max().unwrap();
    let slot = max_len.next_multiple_of(4096);
    let d = Arc::new(disk(unit, 2 * slot + 4096, encrypt, dir.path()));
    assert_eq!(d.unit_bytes(), unit);
    for (i, len) in lengths(unit).into_iter().enumerate() {
        let ctx = format!("unit {unit}, encrypt {encrypt}, tensor of {len} bytes");
        let data = bytes(len, i as u64 + unit);
        let a = d.reserve(len, "a").unwrap();
        d.write(&a, 0, &data)
            .unwrap_or_else(|e| panic!("{ctx}: write: {e}"));
        let mut whole = vec![0u8; len as usize];
        d.read(&a, 0, &mut whole)
            .unwrap_or_else(|e| panic!("{ctx}: whole read: {e}"));
        assert!(whole == data, "{ctx}: whole read differs");
        for (off, n) in read_ranges(len, unit) {
            let mut part = vec![0u8; n as usize];
            d.read(&a, off, &mut part)
                .unwrap_or_else(|e| panic!("{ctx}: read {off}+{n}: {e}"));
            assert!(
                part[..] == data[off as usize..(off + n) as usize],
                "{ctx}: read {off}+{n} differs"
            );
        }
        // A copy inside the tier (compaction), then the copy reads back whole and in part.
        let b = d.reserve(len, "b").unwrap();
        d.copy_range(&a, 0, &b, 0, len)
            .unwrap_or_else(|e| panic!("{ctx}: copy_range: {e}"));
        d.release(a).unwrap();
        let mut back = vec![0u8; len as usize];
        d.read(&b, 0, &mut back)
            .unwrap_or_else(|e| panic!("{ctx}: read of the copy: {e}"));
        assert!(back == data, "{ctx}: the copy differs");
        let (off, n) = (len / 2, (len - len / 2).min(7));
        let mut part = vec![0u8; n as usize];
        d.read(&b, off, &mut part).unwrap();
        assert_eq!(&part[..], &data[off as usize..(off + n) as usize], "{ctx}");
        d.release(b).unwrap();
    }
    assert_eq!(d.usage().in_use_bytes, 0);
}

/// Host -> disk -> host through the engine, with chunks of one and of two units.
fn check_engine(unit: u64) {
    let dir = tempfile::tempdir().unwrap();
    let len = if unit <= 4 << 20 {
        3 * unit + 77
    } else {
        unit + 77
    };
    let slot = len.next_multiple_of(4096);
    let d: Arc<dyn TierBackend> = Arc::new(disk(unit, slot + 4096, false, dir.path()));
    let h = host(2 * slot + 8192);
    for chunk in [unit, 2 * unit] {
        let cfg = EngineConfig {
            chunk_bytes: chunk,
            ..EngineConfig::default()
        };
        let e = TransferEngine::new(&[h.clone(), d.clone()], cfg)
            .unwrap_or_else(|err| panic!("engine with {chunk}-byte chunks over {unit}: {err}"));
        let data = bytes(len, unit ^ chunk);
        let src = h.reserve(len, "w").unwrap();
        h.write(&src, 0, &data).unwrap();
        let on_disk = d.reserve(len, "w").unwrap();
        e.submit(Move { src, dst: on_disk }, Priority::WriteBack)
            .unwrap()
            .wait()
            .unwrap_or_else(|err| panic!("unit {unit}, chunk {chunk}: write-back: {err}"));
        let back = h.reserve(len, "back").unwrap();
        e.submit(
            Move {
                src: on_disk,
                dst: back,
            },
            Priority::Demand,
        )
        .unwrap()
        .wait()
        .unwrap_or_else(|err| panic!("unit {unit}, chunk {chunk}: fetch: {err}"));
        assert!(read_all(&*h, &back) == data, "unit {unit}, chunk {chunk}");
        let mut part = vec![0u8; 10];
        d.read(&on_disk, 100, &mut part).unwrap();
        assert_eq!(&part[..], &data[100..110]);
        for r in [src, back] {
            h.release(r).unwrap();
        }
        d.release(on_disk).unwrap();
    }
}

/// Every unit size the configuration accepts: the powers of two from the least to the most.
fn accepted_units() -> Vec<u64> {
    let mut v = Vec::new();
    let mut u = MIN_UNIT_BYTES;
    while u <= MAX_UNIT_BYTES {
        v.push(u);
        u *= 2;
    }
    v
}

#[test]
fn every_accepted_unit_reads_copies_and_moves_intact() {
    for unit in accepted_units() {
        for encrypt in [false, true] {
            check_unit(unit, encrypt);
        }
        check_engine(unit);
    }
}

#[test]
fn units_that_are_not_powers_of_two_or_out_of_bounds_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    for unit in [
        0,
        1,
        1000,
        2048,
        12288,
        3 << 19,
        3 << 20,
        MAX_UNIT_BYTES + 4096,
        2 * MAX_UNIT_BYTES,
        1 << 63,
        u64::MAX,
    ] {
        let r = DiskTier::new(
            alloc(16 * MIB),
            DiskOptions {
                dir: Some(dir.path().to_path_buf()),
                preallocate: false,
                unit_bytes: unit,
                ..DiskOptions::default()
            },
        );
        assert!(
            matches!(r, Err(TierError::InvalidConfig(_))),
            "unit {unit}: {r:?}"
        );
    }
}
