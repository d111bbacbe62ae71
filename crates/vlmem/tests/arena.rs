//! Per-step arenas: bump allocation with alignment, a full arena is an error (nothing is
//! evicted for it), slices of an ended step are refused, the arena is never swapped, and
//! eight threads writing their own slices each read back their own bytes.

use std::sync::Arc;
use vlmem::arena::ARENA_ALIGN_BYTES;
use vlmem::{ManagerError, MemoryManager, StepArena, TensorKind, Tier};

mod common;
use common::{KIB, MIB};

fn manager() -> MemoryManager {
    common::manager_with([4 * MIB, 16 * MIB, 64 * MIB])
}

#[test]
fn slices_are_aligned_disjoint_and_end_with_the_step() {
    let m = manager();
    let mut a = StepArena::new(&m, TensorKind::Activation, Tier::Host, 64 * KIB).unwrap();
    let s1 = a.alloc(100).unwrap();
    let s2 = a.alloc(1).unwrap();
    assert_eq!(s1.offset_bytes(), 0);
    assert_eq!(s2.offset_bytes(), ARENA_ALIGN_BYTES * 2);
    // Fresh slices read as zeros, never as a previous tensor's bytes.
    let mut buf = vec![1u8; 100];
    a.read(&s1, 0, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    a.write(&s1, 0, &[7u8; 100]).unwrap();
    a.write(&s2, 0, &[9u8]).unwrap();
    a.read(&s1, 0, &mut buf).unwrap();
    assert_eq!(buf, vec![7u8; 100]);
    // Out of the slice, zero and absurd sizes.
    assert!(matches!(
        a.write(&s2, 0, &[1, 2]),
        Err(ManagerError::OutOfRange { .. })
    ));
    assert!(matches!(
        a.read(&s1, u64::MAX, &mut [0u8; 2]),
        Err(ManagerError::OutOfRange { .. })
    ));
    assert!(matches!(a.alloc(0), Err(ManagerError::ZeroSize)));
    assert!(matches!(
        a.alloc(u64::MAX),
        Err(ManagerError::TooLarge { .. })
    ));
    // Full: an error, nothing evicted.
    assert!(matches!(
        a.alloc(64 * KIB),
        Err(ManagerError::OutOfMemory { .. })
    ));
    assert_eq!(a.used_bytes(), 3 * ARENA_ALIGN_BYTES);
    // The step ends: everything goes, old slices are refused.
    a.reset();
    assert_eq!(a.used_bytes(), 0);
    assert!(matches!(
        a.read(&s1, 0, &mut buf),
        Err(ManagerError::Stale { .. })
    ));
    let whole = a.alloc(64 * KIB).unwrap();
    assert_eq!(whole.offset_bytes(), 0);
    assert_eq!(a.peak_bytes(), 64 * KIB);
    assert_eq!(a.steps(), 1);
    // Only activations and scratch.
    assert!(matches!(
        StepArena::new(&m, TensorKind::Weight, Tier::Host, KIB),
        Err(ManagerError::InvalidConfig(_))
    ));
    drop(a);
    let s = m.stats();
    assert_eq!((s.tensors, s.pins), (0, 0), "the arena freed its tensor");
    assert_eq!(s.resident, s.charged);
}

#[test]
fn an_arena_is_never_swapped_and_counts_as_pinned() {
    let m = manager();
    let a = StepArena::new(&m, TensorKind::Scratch, Tier::Device, MIB).unwrap();
    let s = a.alloc(1000).unwrap();
    a.write(&s, 0, &[5u8; 1000]).unwrap();
    // Pressure on the device: the arena stays.
    m.evict(Tier::Device, u64::MAX).unwrap();
    let st = m.stats();
    assert_eq!(st.resident.get(Tier::Device, TensorKind::Scratch), MIB);
    assert_eq!(st.pins, 1);
    let mut buf = vec![0u8; 1000];
    a.read(&s, 0, &mut buf).unwrap();
    assert_eq!(buf, vec![5u8; 1000]);
    // An arena larger than the kind's budget is refused up front.
    assert!(matches!(
        StepArena::new(&m, TensorKind::Scratch, Tier::Device, 8 * MIB),
        Err(ManagerError::TooLarge { .. })
    ));
}

#[test]
fn a_pinned_write_needs_the_only_copy() {
    let m = manager();
    let h = m.allocate(4096, TensorKind::Activation, 1).unwrap();
    m.write(h, 0, &[1u8; 4096]).unwrap();
    // Promote to the device: the host copy stays (inclusive), so the device pin is shared.
    let g = m.pin(h, Tier::Device).unwrap();
    assert!(matches!(
        g.write(0, &[2u8; 16]),
        Err(ManagerError::NotExclusive { .. })
    ));
    drop(g);
    let mut buf = vec![0u8; 4096];
    m.read(h, 0, &mut buf).unwrap();
    assert!(
        buf.iter().all(|&b| b == 1),
        "the refused write changed nothing"
    );
}

#[test]
fn eight_threads_fill_one_step_without_overlap() {
    let m = manager();
    for _step in 0..3 {
        let a = Arc::new(StepArena::new(&m, TensorKind::Activation, Tier::Host, 4 * MIB).unwrap());
        let threads: Vec<_> = (0..8u8)
            .map(|t| {
                let a = a.clone();
                std::thread::spawn(move || {
                    let mut mine = Vec::new();
                    for i in 0..50u64 {
                        let len = 100 + (u64::from(t) * 37 + i * 11) % 5000;
                        let s = a.alloc(len).unwrap();
                        a.write(&s, 0, &vec![t.wrapping_add(i as u8); len as usize])
                            .unwrap();
                        mine.push((s, t.wrapping_add(i as u8)));
                    }
                    for (s, v) in mine {
                        let mut buf = vec![0u8; s.len_bytes() as usize];
                        a.read(&s, 0, &mut buf).unwrap();
                        assert!(buf.iter().all(|&b| b == v), "thread {t} slice overwritten");
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert!(a.used_bytes() <= 4 * MIB);
    }
    let s = m.stats();
    assert_eq!((s.tensors, s.pins), (0, 0));
}

#[test]
fn f32_views_are_lent_in_place_in_the_callers_order() {
    let m = manager();
    let mut a = StepArena::new(&m, TensorKind::Activation, Tier::Host, 64 * KIB).unwrap();
    let x = a.alloc(4 * 10).unwrap();
    let y = a.alloc(4 * 3).unwrap();
    let z = a.alloc(4 * 5).unwrap();
    // Given out of offset order: the views follow the order asked for.
    let lens = a
        .with_f32(&[z, x, y], |v| {
            v[1].iter_mut().enumerate().for_each(|(i, e)| *e = i as f32);
            v[2].fill(-1.5);
            let (z, rest) = v.split_at_mut(1);
            for (o, i) in z[0].iter_mut().zip(rest[0].iter()) {
                *o = i * 2.0;
            }
            v.iter().map(|s| s.len()).collect::<Vec<_>>()
        })
        .unwrap();
    assert_eq!(lens, vec![5, 10, 3]);
    // The bytes landed in the arena: a plain read sees them.
    let mut buf = vec![0u8; 40];
    a.read(&x, 0, &mut buf).unwrap();
    let xs: Vec<f32> = buf
        .chunks(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    assert_eq!(xs, (0..10).map(|i| i as f32).collect::<Vec<_>>());
    let mut buf = vec![0u8; 20];
    a.read(&z, 0, &mut buf).unwrap();
    assert_eq!(&buf[4..8], &2f32.to_le_bytes());
    let mut buf = vec![0u8; 12];
    a.read(&y, 0, &mut buf).unwrap();
    assert_eq!(&buf[8..12], &(-1.5f32).to_le_bytes());
    // A second view sees what the first wrote (same memory, no copy).
    let seen = a.with_f32(&[x], |v| v[0][9]).unwrap();
    assert_eq!(seen, 9.0);
    // No slice twice, whole f32s only, nothing of an ended step.
    assert!(matches!(
        a.with_f32(&[x, y, x], |_| ()),
        Err(ManagerError::InvalidConfig(_))
    ));
    let odd = a.alloc(6).unwrap();
    assert!(matches!(
        a.with_f32(&[odd], |_| ()),
        Err(ManagerError::InvalidConfig(_))
    ));
    assert_eq!(a.with_f32(&[], |v| v.len()).unwrap(), 0);
    a.reset();
    assert!(matches!(
        a.with_f32(&[x], |_| ()),
        Err(ManagerError::Stale { .. })
    ));
    drop(a);
    let s = m.stats();
    assert_eq!((s.tensors, s.pins), (0, 0));
    assert_eq!(m.audit().busy_entries, 0);
}

#[test]
fn threads_lending_their_own_views_keep_their_values() {
    let m = manager();
    let a = Arc::new(StepArena::new(&m, TensorKind::Scratch, Tier::Host, MIB).unwrap());
    let threads: Vec<_> = (0..4u32)
        .map(|t| {
            let a = a.clone();
            std::thread::spawn(move || {
                let mine: Vec<_> = (0..20u32)
                    .map(|i| (a.alloc(4 * u64::from(1 + (t * 7 + i) % 50)).unwrap(), i))
                    .collect();
                for &(s, i) in &mine {
                    a.with_f32(&[s], |v| v[0].fill((t * 1000 + i) as f32))
                        .unwrap();
                }
                for &(s, i) in &mine {
                    let ok = a
                        .with_f32(&[s], |v| v[0].iter().all(|&e| e == (t * 1000 + i) as f32))
                        .unwrap();
                    assert!(ok, "thread {t} view {i} overwritten");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(m.audit().busy_entries, 0);
}
