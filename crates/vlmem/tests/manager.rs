//! The manager's observable behaviour: placement, eviction and write-back with data checked
//! byte for byte, the everything-pinned case, handle misuse, extents, and a multi-threaded
//! run that ends with a checksum of every tensor and a stats recount.

use std::sync::Arc;
use vlmem::{ManagerError, MemoryManager, TensorKind, Tier};

mod common;
use common::{MIB, pattern, read_all};

/// Device 4 MiB, host 16 MiB, disk 64 MiB; each tier's whole capacity for every kind.
fn manager() -> MemoryManager {
    common::manager_with([4 * MIB, 16 * MIB, 64 * MIB])
}

#[test]
fn write_pin_read_round_trip_on_every_tier() {
    let m = manager();
    let len = 300_000usize;
    let h = m.allocate(len as u64, TensorKind::Activation, 1).unwrap();
    let data = pattern(1, len);
    m.write(h, 0, &data).unwrap();
    assert_eq!(read_all(&m, h, len), data);
    for tier in [Tier::Device, Tier::Host, Tier::Disk] {
        let g = m.pin(h, tier).unwrap();
        assert_eq!(g.tier(), tier);
        let mut buf = vec![0u8; len];
        g.read(0, &mut buf).unwrap();
        assert_eq!(buf, data, "{tier}");
        let sum: u64 = g.with_bytes(|b| b.iter().map(|&x| x as u64).sum()).unwrap();
        assert_eq!(sum, data.iter().map(|&x| x as u64).sum::<u64>());
    }
    // Inclusive for clean copies: all three tiers hold it now.
    assert_eq!(
        m.residency(h).unwrap().0,
        vec![Tier::Device, Tier::Host, Tier::Disk]
    );
    // A write keeps only the host copy.
    m.write(h, 10, &[7, 7, 7]).unwrap();
    assert_eq!(m.residency(h).unwrap(), (vec![Tier::Host], 0));
    let mut expect = data.clone();
    expect[10..13].copy_from_slice(&[7, 7, 7]);
    assert_eq!(read_all(&m, h, len), expect);
    m.deallocate(h).unwrap();
}

#[test]
fn device_pressure_evicts_least_recently_used_and_keeps_data() {
    let m = manager();
    let len = MIB as usize;
    let handles: Vec<_> = (0..8)
        .map(|i| {
            let h = m.allocate(len as u64, TensorKind::Weight, i).unwrap();
            m.write(h, 0, &pattern(i, len)).unwrap();
            h
        })
        .collect();
    // The device holds 4 MiB: pinning 8 tensors in turn evicts the oldest.
    for &h in &handles {
        drop(m.pin(h, Tier::Device).unwrap());
    }
    let on_device = handles
        .iter()
        .filter(|&&h| m.residency(h).unwrap().0.contains(&Tier::Device))
        .count();
    assert_eq!(on_device, 4);
    assert!(m.residency(handles[0]).unwrap().0 == vec![Tier::Host]);
    assert!(m.residency(handles[7]).unwrap().0.contains(&Tier::Device));
    for (i, &h) in handles.iter().enumerate() {
        assert_eq!(read_all(&m, h, len), pattern(i as u64, len));
    }
    let s = m.stats();
    assert!(s.counters.evictions[Tier::Device.index()] >= 4);
    assert_eq!(s.resident, s.charged);
}

#[test]
fn host_pressure_writes_back_to_disk() {
    let m = manager();
    let len = 2 * MIB as usize;
    // 16 MiB of host: the 9th..12th tensors push the oldest to disk.
    let handles: Vec<_> = (0..12)
        .map(|i| {
            let h = m
                .allocate(len as u64, TensorKind::KvCache, 100 + i)
                .unwrap();
            m.write(h, 0, &pattern(100 + i, len)).unwrap();
            h
        })
        .collect();
    let s = m.stats();
    assert!(
        s.counters.write_backs[Tier::Host.index()] >= 4,
        "{:?}",
        s.counters
    );
    assert!(s.resident.tier_total(Tier::Disk) >= 4 * len as u64);
    for (i, &h) in handles.iter().enumerate() {
        assert_eq!(
            read_all(&m, h, len),
            pattern(100 + i as u64, len),
            "tensor {i}"
        );
    }
    // Pinning an evicted one on host brings it back (evicting another).
    let g = m.pin(handles[0], Tier::Host).unwrap();
    let mut buf = vec![0u8; len];
    g.read(0, &mut buf).unwrap();
    assert_eq!(buf, pattern(100, len));
}

#[test]
fn everything_pinned_is_an_error_not_a_hang_and_recovers() {
    let m = manager();
    let handles: Vec<_> = (0..5)
        .map(|i| {
            let h = m.allocate(MIB, TensorKind::Weight, i).unwrap();
            m.write(h, 0, &pattern(i, MIB as usize)).unwrap();
            h
        })
        .collect();
    let guards: Vec<_> = handles[..4]
        .iter()
        .map(|&h| m.pin(h, Tier::Device).unwrap())
        .collect();
    let err = m.pin(handles[4], Tier::Device).unwrap_err();
    assert!(
        matches!(err, ManagerError::OutOfMemory { tier: Tier::Device, pinned_bytes, .. } if pinned_bytes == 4 * MIB),
        "{err}"
    );
    drop(guards);
    let g = m.pin(handles[4], Tier::Device).unwrap();
    assert_eq!(g.tier(), Tier::Device);
}

#[test]
fn handle_misuse_is_typed() {
    let m = manager();
    let other = manager();
    assert!(matches!(
        m.allocate(0, TensorKind::Scratch, 0),
        Err(ManagerError::ZeroSize)
    ));
    assert!(matches!(
        m.allocate(1 << 40, TensorKind::Scratch, 0),
        Err(ManagerError::TooLarge { .. })
    ));
    let h = m.allocate(4096, TensorKind::Scratch, 1).unwrap();
    // Foreign: a handle of another manager.
    let foreign = other.allocate(4096, TensorKind::Scratch, 1).unwrap();
    assert!(matches!(
        m.pin(foreign, Tier::Host),
        Err(ManagerError::Foreign { .. })
    ));
    // Pinned: no deallocation.
    let g = m.pin(h, Tier::Host).unwrap();
    assert!(matches!(
        m.deallocate(h),
        Err(ManagerError::Pinned { pins: 1, .. })
    ));
    assert!(matches!(
        m.write(h, 0, &[1]),
        Err(ManagerError::Pinned { .. })
    ));
    drop(g);
    // Out of range and uninitialised.
    let mut buf = [0u8; 8];
    assert!(matches!(
        m.read(h, 0, &mut buf),
        Err(ManagerError::Uninitialized { .. })
    ));
    assert!(matches!(
        m.write(h, 4090, &[0; 8]),
        Err(ManagerError::OutOfRange { .. })
    ));
    m.deallocate(h).unwrap();
    // Stale after free; double free; pin after free.
    assert!(matches!(m.deallocate(h), Err(ManagerError::Stale { .. })));
    assert!(matches!(
        m.pin(h, Tier::Host),
        Err(ManagerError::Stale { .. })
    ));
    // The slot is reused, the old handle stays stale.
    // (Shards are picked round robin: one of the next four reuses the freed slot.)
    let next: Vec<_> = (0..4)
        .map(|i| m.allocate(4096, TensorKind::Scratch, 2 + i).unwrap())
        .collect();
    assert!(next.iter().any(|h2| h2.slot() == h.slot()));
    assert!(matches!(
        m.read(h, 0, &mut buf),
        Err(ManagerError::Stale { .. })
    ));
    let s = m.stats();
    assert_eq!(s.tensors, 4);
    assert_eq!(s.resident, s.charged);
}

#[test]
fn checkpoint_extents_are_read_in_place_and_read_only() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("weights.bin");
    let data = pattern(9, 100_000);
    std::fs::write(&path, &data).unwrap();
    let m = manager();
    // A tensor at an unaligned offset inside the file.
    let h = m
        .register_extent(&path, 1234, 50_000, TensorKind::Weight, 42)
        .unwrap();
    assert_eq!(read_all(&m, h, 50_000), data[1234..51_234]);
    let g = m.pin(h, Tier::Device).unwrap();
    let mut buf = vec![0u8; 50_000];
    g.read(0, &mut buf).unwrap();
    assert_eq!(buf, data[1234..51_234]);
    drop(g);
    assert!(matches!(
        m.write(h, 0, &[1]),
        Err(ManagerError::ReadOnly { .. })
    ));
    // Extents cost no disk budget.
    assert_eq!(m.stats().resident.tier_total(Tier::Disk), 0);
    // Dropping the fast copies loses nothing.
    m.evict(Tier::Device, u64::MAX).unwrap();
    m.evict(Tier::Host, u64::MAX).unwrap();
    assert_eq!(m.residency(h).unwrap().0, vec![Tier::Disk]);
    assert_eq!(read_all(&m, h, 50_000), data[1234..51_234]);
}

#[test]
fn eight_threads_share_tensors_and_nothing_is_lost() {
    let m = Arc::new(manager());
    let len = 256 * 1024usize;
    // 24 shared tensors of 256 KiB = 6 MiB: more than the device, less than the host.
    let shared: Arc<Vec<_>> = Arc::new(
        (0..24u64)
            .map(|i| {
                let h = m.allocate(len as u64, TensorKind::Weight, i).unwrap();
                m.write(h, 0, &pattern(i, len)).unwrap();
                h
            })
            .collect(),
    );
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            let m = m.clone();
            let shared = shared.clone();
            std::thread::spawn(move || {
                let mut rng = t * 7 + 1;
                let mut next = move || {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    rng
                };
                let mut own = Vec::new();
                for op in 0..300u64 {
                    let i = (next() % shared.len() as u64) as usize;
                    match next() % 6 {
                        0 | 1 => {
                            let tier =
                                [Tier::Device, Tier::Host, Tier::Disk][(next() % 3) as usize];
                            match m.pin(shared[i], tier) {
                                Ok(g) => {
                                    let mut buf = vec![0u8; len];
                                    g.read(0, &mut buf).unwrap();
                                    assert_eq!(buf, pattern(i as u64, len), "shared {i} on {tier}");
                                }
                                // Every device byte can be pinned by others at once.
                                Err(ManagerError::OutOfMemory { .. }) => {}
                                Err(e) => panic!("{e}"),
                            }
                        }
                        2 => m.prefetch(shared[i], Tier::Device),
                        3 => {
                            let id = 1000 + t * 1000 + op;
                            let h = m.allocate(64 * 1024, TensorKind::Activation, id).unwrap();
                            m.write(h, 0, &pattern(id, 64 * 1024)).unwrap();
                            own.push((h, id));
                        }
                        4 => {
                            if let Some((h, id)) = own.pop() {
                                assert_eq!(read_all(&m, h, 64 * 1024), pattern(id, 64 * 1024));
                                m.deallocate(h).unwrap();
                            }
                        }
                        _ => {
                            let _ = m.evict(Tier::Device, 512 * 1024);
                        }
                    }
                }
                for (h, id) in own {
                    assert_eq!(read_all(&m, h, 64 * 1024), pattern(id, 64 * 1024));
                    m.deallocate(h).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    // Let stray prefetch threads finish, then check every byte and the ledger.
    std::thread::sleep(std::time::Duration::from_millis(200));
    for (i, &h) in shared.iter().enumerate() {
        assert_eq!(read_all(&m, h, len), pattern(i as u64, len));
    }
    let s = m.stats();
    assert_eq!(s.tensors, 24);
    assert_eq!(s.pins, 0);
    assert_eq!(
        s.resident, s.charged,
        "budget counters agree with the recount"
    );
    assert_eq!(s.counters.demote_failures, 0);
}
