//! Behaviour of the three tiers on their own.
mod common;

use common::*;
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use vlmem_core::Tier;
use vlmem_tier::{DiskOptions, DiskTier, TierBackend, TierError};

#[test]
fn host_round_trip_and_capacity_is_not_rounded_to_a_power_of_two() {
    let cap = 3 * MIB + 4096 * 5; // not a power of two
    let h = host(cap);
    assert_eq!(h.capacity_bytes(), cap);
    assert_eq!(h.tier(), Tier::Host);
    assert!(!h.is_simulated());
    let r = h.reserve(100_000, "t").unwrap();
    let data = pattern(100_000, 1);
    h.write(&r, 0, &data).unwrap();
    assert_eq!(read_all(&*h, &r), data);
    // Partial range.
    let mut part = vec![0u8; 10];
    h.read(&r, 500, &mut part).unwrap();
    assert_eq!(&part[..], &data[500..510]);
    // Out of range is refused.
    assert!(matches!(
        h.write(&r, 99_995, &[0u8; 10]),
        Err(TierError::OutOfRange { .. })
    ));
    assert_eq!(h.usage().in_use_bytes, 102_400);
    h.release(r).unwrap();
    // A released reservation is stale.
    assert!(matches!(
        h.read(&r, 0, &mut part),
        Err(TierError::InvalidReservation { .. })
    ));
    assert!(matches!(
        h.release(r),
        Err(TierError::InvalidReservation { .. })
    ));
    assert_eq!(h.usage().in_use_bytes, 0);
}

#[test]
fn host_out_of_memory_is_a_typed_error() {
    let h = host(MIB);
    let _a = h.reserve(MIB, "a").unwrap();
    match h.reserve(4096, "b") {
        Err(TierError::Alloc {
            tier: Tier::Host, ..
        }) => {}
        other => panic!("expected Alloc error, got {other:?}"),
    }
}

#[test]
fn conflicting_access_is_refused_not_raced() {
    let h = host(MIB);
    let r = h.reserve(4096, "t").unwrap();
    // While a lent read is running, a write to the same block is Busy and a release too.
    let res = h.read_with(&r, 0, 4096, &mut |_s| {
        assert!(matches!(
            h.write(&r, 0, &[1u8; 16]),
            Err(TierError::Busy { .. })
        ));
        assert!(matches!(h.release(r), Err(TierError::Busy { .. })));
        Ok(())
    });
    res.unwrap().unwrap();
    h.write(&r, 0, &[1u8; 16]).unwrap();
}

#[test]
fn copy_range_within_a_tier() {
    let h = host(MIB);
    let a = h.reserve(8192, "a").unwrap();
    let b = h.reserve(8192, "b").unwrap();
    let data = pattern(8192, 2);
    h.write(&a, 0, &data).unwrap();
    h.copy_range(&a, 100, &b, 0, 4000).unwrap();
    let got = read_all(&*h, &b);
    assert_eq!(&got[..4000], &data[100..4100]);
    // Overlapping copy inside one reservation (memmove semantics).
    h.copy_range(&a, 0, &a, 1, 100).unwrap();
    let got = read_all(&*h, &a);
    assert_eq!(&got[1..101], &data[0..100]);
}

#[test]
fn simulated_device_says_simulated_and_caps_bandwidth() {
    let cap_bytes_per_s = 200_000_000; // 200 MB/s
    let d = device(64 * MIB, Some(cap_bytes_per_s));
    assert!(d.is_simulated());
    assert!(d.describe().contains("simulated"));
    assert_eq!(d.tier(), Tier::Device);
    let r = d.reserve(20 * MIB, "w").unwrap();
    let data = pattern((20 * MIB) as usize, 3);
    let t0 = std::time::Instant::now();
    d.write(&r, 0, &data).unwrap();
    let secs = t0.elapsed().as_secs_f64();
    let expected = (20 * MIB) as f64 / cap_bytes_per_s as f64; // ~0.105 s
    assert!(
        secs >= expected * 0.95,
        "write took {secs} s, cap implies {expected} s"
    );
    assert_eq!(read_all(&*d, &r), data);
    // Zero cap is refused.
    assert!(vlmem_tier::MemoryTier::simulated_device(alloc(MIB), Some(0)).is_err());
}

#[test]
fn disk_round_trip_with_unaligned_lengths_and_partial_reads() {
    let dir = tempfile::tempdir().unwrap();
    let d = disk_in(dir.path(), 16 * MIB, Arc::new(vlmem_tier::io::RealFileIo));
    assert_eq!(d.tier(), Tier::Disk);
    // Files are unlinked: the directory stays empty.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    let len = 3 * MIB as usize + 123;
    let r = d.reserve(len as u64, "layer.0.q_proj").unwrap();
    let data = pattern(len, 4);
    d.write(&r, 0, &data).unwrap();
    assert_eq!(read_all(&d, &r), data);
    // An unaligned partial read (verified on the units it covers).
    let mut part = vec![0u8; 5000];
    d.read(&r, MIB + 17, &mut part).unwrap();
    assert_eq!(&part[..], &data[(MIB as usize + 17)..(MIB as usize + 5017)]);
    // Writes must start on a unit and end on a unit or at the tensor's end.
    assert!(matches!(
        d.write(&r, 17, &data[..100]),
        Err(TierError::Misaligned { .. })
    ));
    // Unit-aligned rewrite of the middle unit.
    let unit = d.unit_bytes() as usize;
    let new_mid = pattern(unit, 5);
    d.write(&r, unit as u64, &new_mid).unwrap();
    let got = read_all(&d, &r);
    assert_eq!(&got[unit..2 * unit], &new_mid[..]);
    assert_eq!(&got[..unit], &data[..unit]);
    d.release(r).unwrap();
}

#[test]
fn disk_read_of_unwritten_tensor_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = disk_in(dir.path(), 4 * MIB, Arc::new(vlmem_tier::io::RealFileIo));
    let r = d.reserve(10_000, "never").unwrap();
    let mut buf = vec![0u8; 10_000];
    match d.read(&r, 0, &mut buf) {
        Err(TierError::NotWritten { tensor, .. }) => assert_eq!(tensor, "never"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn swap_dir_is_private_and_default_dir_is_removed() {
    let parent = tempfile::tempdir().unwrap();
    let named = parent.path().join("a/b/swap");
    let d = disk_in(&named, MIB, Arc::new(vlmem_tier::io::RealFileIo));
    let mode = std::fs::metadata(&named).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);
    drop(d);
    // A world-writable directory is refused.
    let open = parent.path().join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    let r = DiskTier::new(
        alloc(MIB),
        DiskOptions {
            dir: Some(open),
            ..DiskOptions::default()
        },
    );
    assert!(matches!(r, Err(TierError::InvalidConfig(_))));
    // Default: a private temp dir that disappears with the tier.
    let d = DiskTier::new(alloc(MIB), DiskOptions::default()).unwrap();
    let p = d.dir().to_path_buf();
    assert!(p.exists());
    drop(d);
    assert!(!p.exists());
}

#[test]
fn swap_files_are_0600_and_unlinked() {
    let dir = tempfile::tempdir().unwrap();
    let d = disk_in(dir.path(), 2 * MIB, Arc::new(vlmem_tier::io::RealFileIo));
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    // Find our open swap file through /proc/self/fd: it is "(deleted)" or an O_TMPFILE.
    let mut found = 0;
    for e in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
        if let Ok(target) = std::fs::read_link(e.path()) {
            let t = target.to_string_lossy();
            if t.starts_with(&*dir.path().to_string_lossy()) {
                assert!(t.ends_with("(deleted)"), "{t}");
                let m = std::fs::metadata(e.path()).unwrap();
                assert_eq!(m.permissions().mode() & 0o777, 0o600);
                found += 1;
            }
        }
    }
    assert_eq!(found, d.file_count());
}

#[test]
fn disk_striped_over_several_files() {
    let dir = tempfile::tempdir().unwrap();
    let d = DiskTier::new(
        alloc(8 * MIB),
        DiskOptions {
            dir: Some(dir.path().to_path_buf()),
            file_bytes: Some(3 * MIB),
            ..DiskOptions::default()
        },
    )
    .unwrap();
    assert_eq!(d.file_count(), 3);
    // 2 + 4 MiB tensors: the second one crosses a file boundary at 3 MiB.
    let a = d.reserve(2 * MIB, "a").unwrap();
    let b = d.reserve(4 * MIB + 1, "b").unwrap();
    let da = pattern((2 * MIB) as usize, 6);
    let db = pattern((4 * MIB + 1) as usize, 7);
    d.write(&a, 0, &da).unwrap();
    d.write(&b, 0, &db).unwrap();
    assert_eq!(read_all(&d, &a), da);
    assert_eq!(read_all(&d, &b), db);
}

#[test]
fn encrypted_disk_round_trip_and_tamper_detection() {
    let dir = tempfile::tempdir().unwrap();
    let (d, plan) = faulty_disk(
        8 * MIB,
        DiskOptions {
            dir: Some(dir.path().to_path_buf()),
            encrypt: true,
            ..DiskOptions::default()
        },
    );
    assert!(d.is_encrypted());
    let r = d.reserve(2 * MIB + 77, "kv.7").unwrap();
    let data = pattern((2 * MIB + 77) as usize, 8);
    d.write(&r, 0, &data).unwrap();
    assert_eq!(read_all(&d, &r), data);
    plan.add(vlmem_tier::FaultRule::once(
        vlmem_tier::IoPoint::Read,
        vlmem_tier::FaultKind::BitFlip,
    ));
    let mut buf = vec![0u8; data.len()];
    match d.read(&r, 0, &mut buf) {
        Err(TierError::Corrupt { tensor, detail, .. }) => {
            assert_eq!(tensor, "kv.7");
            assert!(detail.contains("authentication"), "{detail}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(read_all(&d, &r), data);
}

#[test]
fn read_only_extent_reads_in_place_at_unaligned_offsets() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    let file_data = pattern(3 * MIB as usize + 999, 9);
    std::fs::write(&path, &file_data).unwrap();
    let d = disk_in(dir.path(), MIB, Arc::new(vlmem_tier::io::RealFileIo));
    let used_before = d.usage().in_use_bytes;
    let off = 12_345u64;
    let len = 2 * MIB + 4321;
    let r = d
        .register_extent(&path, off, len, "model.layers.0.mlp.up_proj.weight")
        .unwrap();
    assert!(r.is_in_place());
    assert_eq!(d.usage().in_use_bytes, used_before, "no copy into swap");
    let got = read_all(&d, &r);
    assert_eq!(&got[..], &file_data[off as usize..(off + len) as usize]);
    // Reads up to the end of the file (the aligned span passes EOF).
    let tail = d
        .register_extent(&path, file_data.len() as u64 - 10, 10, "tail")
        .unwrap();
    assert_eq!(read_all(&d, &tail), &file_data[file_data.len() - 10..]);
    // Writes are refused; out-of-file extents too.
    assert!(matches!(
        d.write(&r, 0, &[0u8; 4]),
        Err(TierError::ReadOnly { .. })
    ));
    assert!(
        d.register_extent(&path, file_data.len() as u64, 1, "x")
            .is_err()
    );
    d.release(r).unwrap();
    assert!(d.read(&r, 0, &mut [0u8; 4]).is_err());
}

/// A destination whose address is congruent to the extent's file offset modulo 4096 gets
/// the aligned middle read straight into it (O_DIRECT, no copy; head and tail through the
/// bounce buffer): every byte equals the file's, at many offsets and lengths, to the end of
/// the file, and with a destination out of phase.
#[test]
fn extent_reads_into_phase_aligned_buffers_are_exact() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    let file_data = pattern(3 * MIB as usize + 999, 5);
    std::fs::write(&path, &file_data).unwrap();
    let d = disk_in(dir.path(), MIB, Arc::new(vlmem_tier::io::RealFileIo));
    let a = vlmem_tier::IO_ALIGN_BYTES;
    let cases: [(u64, u64); 7] = [
        (0, 8192),
        (1, 3 * 4096),
        (4095, 4097),
        (12_345, 2 * MIB + 4321),
        (4096, MIB),
        (100, 4000),
        (file_data.len() as u64 - 9000, 9000),
    ];
    for (off, len) in cases {
        let r = d.register_extent(&path, off, len, "w").unwrap();
        for shift in [0usize, 1] {
            let mut buf = vec![0u8; len as usize + a + 1];
            let have = buf.as_ptr() as usize % a;
            let start = ((off as usize % a) + a - have) % a + shift;
            let dst = &mut buf[start..start + len as usize];
            d.read(&r, 0, dst).unwrap();
            assert!(
                dst[..] == file_data[off as usize..(off + len) as usize],
                "offset {off}, length {len}, phase shift {shift}"
            );
            // A sub-range at an offset inside the extent, in phase too.
            if len > 5000 {
                let sub = 777u64;
                let n = (len - sub) as usize - 100;
                let have = buf.as_ptr() as usize % a;
                let start = (((off + sub) as usize % a) + a - have) % a;
                let dst = &mut buf[start..start + n];
                d.read(&r, sub, dst).unwrap();
                assert!(dst[..] == file_data[(off + sub) as usize..(off + sub) as usize + n]);
            }
        }
        d.release(r).unwrap();
    }
}

#[test]
fn batched_small_tensors_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let d = disk_in(dir.path(), 8 * MIB, Arc::new(vlmem_tier::io::RealFileIo));
    let lens = [65_536usize, 1000, 70_000, 4096, 65_536];
    let res: Vec<_> = lens
        .iter()
        .enumerate()
        .map(|(i, &l)| d.reserve(l as u64, &format!("t{i}")).unwrap())
        .collect();
    let datas: Vec<Vec<u8>> = lens
        .iter()
        .enumerate()
        .map(|(i, &l)| pattern(l, 10 + i as u64))
        .collect();
    let items: Vec<_> = res.iter().zip(&datas).map(|(r, v)| (*r, &v[..])).collect();
    d.write_batch(&items).unwrap();
    for (r, v) in res.iter().zip(&datas) {
        assert_eq!(&read_all(&d, r), v);
    }
    let mut outs: Vec<Vec<u8>> = lens.iter().map(|&l| vec![0u8; l]).collect();
    let mut reads: Vec<_> = res
        .iter()
        .zip(outs.iter_mut())
        .map(|(r, o)| (*r, &mut o[..]))
        .collect();
    d.read_batch(&mut reads).unwrap();
    assert_eq!(outs, datas);
}

#[test]
fn disk_arena_rejects_bad_configs() {
    let dir = tempfile::tempdir().unwrap();
    let bad = DiskTier::new(
        Arc::new(vlmem_tier::FirstFitAllocator::new(1000, 8).unwrap()),
        DiskOptions {
            dir: Some(dir.path().to_path_buf()),
            ..DiskOptions::default()
        },
    );
    assert!(matches!(bad, Err(TierError::InvalidConfig(_))));
    let bad_unit = DiskTier::new(
        alloc(MIB),
        DiskOptions {
            dir: Some(dir.path().to_path_buf()),
            unit_bytes: 1000,
            ..DiskOptions::default()
        },
    );
    assert!(matches!(bad_unit, Err(TierError::InvalidConfig(_))));
}

#[test]
fn host_arena_with_huge_pages_advised_works_and_says_so() {
    let t = vlmem_tier::MemoryTier::host(
        alloc(6 * MIB + 8192),
        vlmem_tier::HostOptions { huge_pages: true },
    )
    .unwrap();
    assert!(t.describe().contains("2 MiB pages"), "{}", t.describe());
    assert_eq!(t.capacity_bytes(), 6 * MIB + 8192);
    let r = t.reserve(5 * MIB, "x").unwrap();
    let data = pattern((5 * MIB) as usize, 3);
    t.write(&r, 0, &data).unwrap();
    assert_eq!(read_all(&t, &r), data);
}
