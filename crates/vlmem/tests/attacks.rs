//! The manager's documented promises attacked from outside: zero-length ranges at the edges
//! of lends, lends of never-written tensors, calls that re-enter the manager from inside a
//! lend, panics in every closure on every tier, wait bounds of zero and of "for ever",
//! zeroing on free over every disk unit with and without encryption, checkpoint extents under
//! every demotion, split arenas with a KV slab, stale handles racing reuse, and compaction,
//! eviction and swap-outs racing reads and lends. Every test runs under a watchdog, so a hang
//! fails instead of stalling the suite.

mod common;

use common::{KIB, MIB, bounded, config, pattern};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Barrier, Mutex};
use std::time::{Duration, Instant};
use vlmem::{
    ManagerConfig, ManagerError, MemoryManager, StepArena, TensorHandle, TensorKind, Tier,
};

fn quiet_panic<R>(f: impl FnOnce() -> R) -> std::thread::Result<R> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
}

fn host_tensor(m: &MemoryManager, kind: TensorKind, len: usize, seed: u64) -> TensorHandle {
    let h = m.allocate(len as u64, kind, seed).unwrap();
    m.write(h, 0, &pattern(seed, len)).unwrap();
    h
}

fn manager(c: ManagerConfig) -> MemoryManager {
    MemoryManager::new(c).unwrap()
}

fn assert_quiet(m: &MemoryManager) {
    let a = m.audit();
    assert_eq!(a.overlaps, 0, "{a:?}");
    assert_eq!(a.busy_entries, 0, "{a:?}");
    assert_eq!(a.pins, 0, "{a:?}");
    assert_eq!(a.entries_without_copy, 0, "{a:?}");
    assert!(a.charged_matches_resident, "{a:?}");
}

// ---- Readers during a lend: they wait, never see a busy range, also for zero bytes. ----

#[test]
fn a_zero_length_read_at_a_lent_ranges_start_never_sees_busy() {
    bounded("zero-length read", Duration::from_secs(30), || {
        let m = manager(config([MIB, 8 * MIB, 16 * MIB]));
        let h = host_tensor(&m, TensorKind::Scratch, 8192, 1);
        let lender = m.pin(h, Tier::Host).unwrap();
        let reader = m.pin(h, Tier::Host).unwrap();
        let lent = Barrier::new(2);
        std::thread::scope(|s| {
            s.spawn(|| {
                lender
                    .with_bytes_mut(0, 4096, |b| {
                        lent.wait();
                        std::thread::sleep(Duration::from_millis(300));
                        b.fill(9);
                    })
                    .unwrap();
            });
            lent.wait();
            let through_pin = reader.read(0, &mut []);
            let through_manager = m.read(h, 0, &mut []);
            assert!(
                through_pin.is_ok(),
                "PinGuard::read of 0 bytes at the lend's start: {through_pin:?}"
            );
            assert!(
                through_manager.is_ok(),
                "MemoryManager::read of 0 bytes at the lend's start: {through_manager:?}"
            );
        });
    });
}

#[test]
fn a_zero_length_pinned_write_never_makes_a_reader_see_busy() {
    bounded("zero-length write", Duration::from_secs(60), || {
        let m = manager(config([MIB, 8 * MIB, 16 * MIB]));
        let h = host_tensor(&m, TensorKind::Scratch, 4096, 2);
        let writer = m.pin(h, Tier::Host).unwrap();
        let reader = m.pin(h, Tier::Host).unwrap();
        let stop = AtomicBool::new(false);
        let (write_errors, read_errors) = std::thread::scope(|s| {
            let w = s.spawn(|| {
                let mut errors = Vec::new();
                let until = Instant::now() + Duration::from_millis(1500);
                while Instant::now() < until {
                    if let Err(e) = writer.write(0, &[]) {
                        errors.push(format!("{e:?}"));
                    }
                }
                stop.store(true, Ordering::Relaxed);
                errors
            });
            let r = s.spawn(|| {
                let mut errors = Vec::new();
                let mut buf = [0u8; 64];
                while !stop.load(Ordering::Relaxed) {
                    if let Err(e) = reader.read(0, &mut buf) {
                        errors.push(format!("{e:?}"));
                    }
                    if let Err(e) = m.read(h, 0, &mut buf) {
                        errors.push(format!("{e:?}"));
                    }
                }
                errors
            });
            (w.join().unwrap(), r.join().unwrap())
        });
        assert!(
            read_errors.is_empty(),
            "{} reads failed beside zero-length writes, e.g. {:?}",
            read_errors.len(),
            read_errors.first()
        );
        assert!(
            write_errors.is_empty(),
            "{} zero-length writes failed beside reads, e.g. {:?}",
            write_errors.len(),
            write_errors.first()
        );
    });
}

#[test]
fn zero_length_ranges_at_every_edge_are_served_or_refused_with_a_type() {
    bounded("zero-length edges", Duration::from_secs(30), || {
        let m = manager(config([MIB, 8 * MIB, 16 * MIB]));
        for tier in Tier::ALL {
            let h = host_tensor(&m, TensorKind::Scratch, 4096, 3);
            // Make the pinned copy the only one on `tier`.
            if tier != Tier::Host {
                drop(m.pin(h, tier).unwrap());
                m.swap_out(h, Tier::Host).unwrap();
                if tier == Tier::Disk {
                    m.swap_out(h, Tier::Device).unwrap();
                }
            }
            let pin = m.pin(h, tier).unwrap();
            for at in [0u64, 100, 4096] {
                pin.read(at, &mut []).unwrap();
                m.read(h, at, &mut []).unwrap();
                let _ = pin.write(at, &[]);
                let _ = pin.with_bytes_mut(at, 0, |b| assert!(b.is_empty()));
                let _ = pin.with_ranges_mut(&[(at, 0), (at, 0)], |v| v.len());
            }
            let _ = pin.with_ranges_mut(&[], |v| v.len());
            assert!(matches!(
                pin.read(4097, &mut []),
                Err(ManagerError::OutOfRange { .. })
            ));
            assert!(matches!(
                pin.read(u64::MAX, &mut []),
                Err(ManagerError::OutOfRange { .. })
            ));
            assert!(matches!(
                pin.with_bytes_mut(u64::MAX, 2, |_| ()),
                Err(ManagerError::OutOfRange { .. })
            ));
            // The bytes are still the ones written.
            let mut buf = vec![0u8; 4096];
            pin.read(0, &mut buf).unwrap();
            assert_eq!(buf, pattern(3, 4096), "{tier}");
            drop(pin);
            m.deallocate(h).unwrap();
        }
        assert_quiet(&m);
    });
}

// ---- A pin of a never-written tensor lends no previous bytes. ----

fn lend_of_a_never_written_tensor(zero_on_free: bool) -> Result<Vec<u8>, ManagerError> {
    let mut c = config([MIB, 8 * MIB, 16 * MIB]);
    c.zero_on_free = zero_on_free;
    let m = manager(c);
    let secret = host_tensor(&m, TensorKind::Activation, 64 * KIB as usize, 99);
    m.deallocate(secret).unwrap();
    let fresh = m.allocate(64 * KIB, TensorKind::Activation, 2).unwrap();
    let pin = m.pin(fresh, Tier::Host).unwrap();
    let mut buf = vec![0u8; 64 * KIB as usize];
    assert!(matches!(
        pin.read(0, &mut buf),
        Err(ManagerError::Uninitialized { .. })
    ));
    pin.with_bytes_mut(0, 64 * KIB, |b| b.to_vec())
}

#[test]
fn a_lend_of_a_never_written_tensor_shows_no_previous_owners_bytes() {
    let seen = bounded("lend of unwritten", Duration::from_secs(30), || {
        lend_of_a_never_written_tensor(false)
    });
    match seen {
        Err(ManagerError::Uninitialized { .. }) => {}
        Ok(bytes) => assert!(
            bytes != pattern(99, bytes.len()),
            "the lend showed the freed tensor's bytes to the block's next owner"
        ),
        Err(e) => panic!("unexpected error: {e}"),
    }
}

#[test]
fn a_lend_of_a_never_written_tensor_under_zero_on_free_shows_zeros() {
    let seen = bounded("lend of unwritten", Duration::from_secs(30), || {
        lend_of_a_never_written_tensor(true)
    });
    match seen {
        Err(ManagerError::Uninitialized { .. }) => {}
        Ok(bytes) => assert!(bytes.iter().all(|&b| b == 0)),
        Err(e) => panic!("unexpected error: {e}"),
    }
}

// ---- OutOfMemory only when eviction cannot make room; the wait bound is about others. ----

/// 16 weights of 64 KiB fill a 1 MiB host arena; the odd ones are used again, so the least
/// recently used victims (the even ones) free no two adjacent blocks: 128 KiB needs several
/// passes of eviction. No other thread runs.
fn fragmented_allocation(max_call_wait: Duration) -> Result<(), ManagerError> {
    let mut c = config([MIB, MIB, 32 * MIB]);
    c.max_call_wait = max_call_wait;
    let m = manager(c);
    let hs: Vec<_> = (0..16)
        .map(|i| host_tensor(&m, TensorKind::Weight, 64 * KIB as usize, i))
        .collect();
    assert_eq!(m.tier_usage(Tier::Host).free_bytes, 0);
    for h in hs.iter().skip(1).step_by(2) {
        drop(m.pin(*h, Tier::Host).unwrap());
    }
    let big = m.allocate(128 * KIB, TensorKind::Weight, 100)?;
    m.write(big, 0, &pattern(100, 128 * KIB as usize))?;
    for (i, h) in hs.iter().enumerate() {
        let mut buf = vec![0u8; 64 * KIB as usize];
        m.read(*h, 0, &mut buf)?;
        assert_eq!(buf, pattern(i as u64, buf.len()));
    }
    Ok(())
}

#[test]
fn eviction_over_several_passes_makes_room_with_the_default_wait() {
    bounded("fragmented", Duration::from_secs(60), || {
        fragmented_allocation(config([MIB, MIB, MIB]).max_call_wait).unwrap();
    });
}

#[test]
fn a_zero_call_wait_still_evicts_what_it_must_when_no_one_else_runs() {
    let r = bounded("fragmented, no wait", Duration::from_secs(60), || {
        fragmented_allocation(Duration::ZERO)
    });
    assert!(
        r.is_ok(),
        "one thread alone, every victim unpinned and idle, yet: {r:?}"
    );
}

#[test]
fn a_request_larger_than_the_kinds_part_of_a_split_arena_is_too_large() {
    bounded("split arena", Duration::from_secs(30), || {
        common::align_allocator_ids();
        let mut c = ManagerConfig::with_capacities(4 * MIB, 8 * MIB, 64 * MIB);
        c.disk.preallocate = false;
        c.kv_block_bytes = Some(4096);
        c.budgets.bytes[Tier::Host.index()][TensorKind::Weight.index()] = 8 * MIB;
        c.budgets.bytes[Tier::Host.index()][TensorKind::KvCache.index()] = 4 * MIB;
        let m = manager(c);
        let r = m.allocate(6 * MIB, TensorKind::Weight, 1);
        assert!(
            matches!(r, Err(ManagerError::TooLarge { .. })),
            "6 MiB of weights beside a 4 MiB KV slab in an 8 MiB arena: {r:?}"
        );
    });
}

// ---- Writers and deallocation beside plain reads. ----

fn write_beside_reads(deallocate: bool) -> Vec<String> {
    let m = manager(config([MIB, 8 * MIB, 16 * MIB]));
    if deallocate {
        let mut refused = Vec::new();
        for round in 0..40u64 {
            let h = host_tensor(&m, TensorKind::Scratch, 64 * KIB as usize, round);
            let stop = AtomicBool::new(false);
            let freed = std::thread::scope(|s| {
                s.spawn(|| {
                    let mut buf = vec![0u8; 64 * KIB as usize];
                    while !stop.load(Ordering::Relaxed) {
                        if m.read(h, 0, &mut buf).is_err() {
                            break;
                        }
                    }
                });
                std::thread::sleep(Duration::from_millis(5));
                let r = m.deallocate(h);
                stop.store(true, Ordering::Relaxed);
                r
            });
            if let Err(e) = freed {
                refused.push(format!("deallocate: {e:?}"));
                m.deallocate(h).unwrap();
            }
        }
        return refused;
    }
    let h = host_tensor(&m, TensorKind::Scratch, 64 * KIB as usize, 4);
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut buf = vec![0u8; 64 * KIB as usize];
            while !stop.load(Ordering::Relaxed) {
                m.read(h, 0, &mut buf).unwrap();
            }
        });
        let mut errors = Vec::new();
        for round in 0..300u64 {
            if let Err(e) = m.write(h, 0, &pattern(round, 64 * KIB as usize)) {
                errors.push(format!("{e:?}"));
            }
        }
        stop.store(true, Ordering::Relaxed);
        errors
    })
}

#[test]
fn a_write_racing_plain_reads_is_never_refused_as_pinned() {
    let errors = bounded("write beside reads", Duration::from_secs(60), || {
        write_beside_reads(false)
    });
    assert!(
        errors.is_empty(),
        "{} of 300 writes refused beside plain reads, e.g. {:?}",
        errors.len(),
        errors.first()
    );
}

#[test]
fn a_deallocation_racing_plain_reads_is_never_refused_as_pinned() {
    let errors = bounded("free beside reads", Duration::from_secs(60), || {
        write_beside_reads(true)
    });
    assert!(
        errors.is_empty(),
        "{} of 40 deallocations refused beside plain reads, e.g. {:?}",
        errors.len(),
        errors.first()
    );
}

// ---- Configuration: typed errors, never a panic. ----

#[test]
fn an_absurd_shard_count_is_a_typed_error_not_a_panic() {
    bounded("shards", Duration::from_secs(30), || {
        let mut c = config([MIB, MIB, MIB]);
        c.shards = usize::MAX;
        let r = quiet_panic(|| MemoryManager::new(c).map(|_| ()));
        match r {
            Ok(Err(ManagerError::InvalidConfig(_))) => {}
            Ok(other) => panic!("usize::MAX shards: {other:?}"),
            Err(_) => panic!("usize::MAX shards panicked"),
        }
    });
}

// ---- A lend's closure that calls back into the manager on the same tensor. ----

#[test]
fn a_lend_whose_closure_calls_back_on_its_tensor_ends_within_the_call_bound() {
    bounded("re-entrant lend", Duration::from_secs(60), || {
        let wait = Duration::from_millis(300);
        let slack = Duration::from_millis(1500);
        let mut c = config([MIB, 8 * MIB, 16 * MIB]);
        c.max_call_wait = wait;
        let m = manager(c);
        let h = host_tensor(&m, TensorKind::Scratch, 8192, 5);
        let pin = m.pin(h, Tier::Host).unwrap();
        let report = pin
            .with_bytes_mut(0, 4096, |lent| {
                lent.fill(7);
                let timed = |f: &dyn Fn() -> String| {
                    let t = Instant::now();
                    let r = f();
                    (r, t.elapsed())
                };
                let mut out = Vec::new();
                // The lent range: bounded waits ending in Busy (no self-deadlock).
                out.push((
                    "pin read of the lent range",
                    timed(&|| format!("{:?}", pin.read(0, &mut [0u8; 16]))),
                ));
                out.push((
                    "manager read of the lent range",
                    timed(&|| format!("{:?}", m.read(h, 10, &mut [0u8; 16]))),
                ));
                out.push((
                    "pin write of the lent range",
                    timed(&|| format!("{:?}", pin.write(100, &[1u8; 16]))),
                ));
                out.push((
                    "pin on the device",
                    timed(&|| format!("{:?}", m.pin(h, Tier::Device).map(|_| ()))),
                ));
                // Elsewhere: at once.
                out.push((
                    "pin read elsewhere",
                    timed(&|| format!("{:?}", pin.read(5000, &mut [0u8; 16]))),
                ));
                out.push((
                    "pin write elsewhere",
                    timed(&|| format!("{:?}", pin.write(5000, &[3u8; 16]))),
                ));
                out.push((
                    "swap out",
                    timed(&|| format!("{:?}", m.swap_out(h, Tier::Host))),
                ));
                out.push(("deallocate", timed(&|| format!("{:?}", m.deallocate(h)))));
                out.push((
                    "write",
                    timed(&|| format!("{:?}", m.write(h, 0, &[1u8; 8]))),
                ));
                out.push((
                    "compact",
                    timed(&|| format!("{:?}", m.compact_tier(Tier::Host).map(|_| ()))),
                ));
                out.push(("stats", timed(&|| format!("{}", m.stats().tensors))));
                out
            })
            .unwrap();
        for (what, (result, took)) in &report {
            assert!(*took < wait + slack, "{what} took {took:?}: {result}");
        }
        let find = |what: &str| &report.iter().find(|r| r.0 == what).unwrap().1.0;
        for what in [
            "pin read of the lent range",
            "manager read of the lent range",
            "pin write of the lent range",
            "pin on the device",
        ] {
            assert!(find(what).starts_with("Err(Busy"), "{what}: {}", find(what));
        }
        for what in ["pin read elsewhere", "pin write elsewhere"] {
            assert_eq!(find(what), "Ok(())", "{what}");
            let took = report.iter().find(|r| r.0 == what).unwrap().1.1;
            assert!(took < Duration::from_millis(250), "{what} waited {took:?}");
        }
        assert_eq!(find("swap out"), "Ok(0)");
        assert!(find("deallocate").starts_with("Err(Pinned"));
        assert!(find("write").starts_with("Err(Pinned"));
        // Afterwards nothing stays locked, and the lend's bytes are there.
        let t = Instant::now();
        let mut buf = vec![0u8; 8192];
        m.read(h, 0, &mut buf).unwrap();
        assert!(t.elapsed() < Duration::from_millis(250));
        assert_eq!(&buf[..4096], &[7u8; 4096][..]);
        assert_eq!(&buf[5000..5016], &[3u8; 16]);
        pin.write(0, &[4u8; 16]).unwrap();
        drop(pin);
        m.deallocate(h).unwrap();
        assert_quiet(&m);
    });
}

#[test]
fn a_read_lend_whose_closure_writes_its_tensor_ends_within_the_call_bound() {
    bounded("re-entrant read lend", Duration::from_secs(60), || {
        let wait = Duration::from_millis(300);
        let mut c = config([MIB, 8 * MIB, 16 * MIB]);
        c.max_call_wait = wait;
        let m = manager(c);
        let h = host_tensor(&m, TensorKind::Scratch, 8192, 6);
        let pin = m.pin(h, Tier::Host).unwrap();
        let (w, r, took) = pin
            .with_bytes(|bytes| {
                assert_eq!(bytes, &pattern(6, 8192)[..]);
                let t = Instant::now();
                let w = pin.write(0, &[1u8; 16]);
                // A write that gave up must not leave its range held off from readers.
                let r = pin.read(0, &mut [0u8; 16]);
                (w, r, t.elapsed())
            })
            .unwrap();
        assert!(matches!(w, Err(ManagerError::Busy { .. })), "{w:?}");
        assert!(r.is_ok(), "{r:?}");
        assert!(took < wait + Duration::from_millis(1500), "{took:?}");
        pin.write(0, &[1u8; 16]).unwrap();
        drop(pin);
        assert_quiet(&m);
    });
}

#[test]
fn an_arena_view_whose_closure_reads_slices_ends_within_the_call_bound() {
    bounded("re-entrant arena", Duration::from_secs(60), || {
        let mut c = config([MIB, 8 * MIB, 16 * MIB]);
        c.max_call_wait = Duration::from_millis(300);
        let m = manager(c);
        let arena = StepArena::new(&m, TensorKind::Activation, Tier::Host, 64 * KIB).unwrap();
        let (s0, s1) = (arena.alloc(256).unwrap(), arena.alloc(256).unwrap());
        let (own, other, nested) = arena
            .with_f32(&[s0], |v| {
                v[0].fill(1.0);
                let t = Instant::now();
                let own = arena.read(&s0, 0, &mut [0u8; 4]).map(|_| t.elapsed());
                let t = Instant::now();
                let other = arena.read(&s1, 0, &mut [0u8; 4]).map(|_| t.elapsed());
                let nested = arena.with_f32(&[s1], |w| w[0].fill(2.0));
                (own, other, nested)
            })
            .unwrap();
        assert!(matches!(own, Err(ManagerError::Busy { .. })), "{own:?}");
        assert!(other.unwrap() < Duration::from_millis(250));
        nested.unwrap();
        let mut four = [0u8; 4];
        arena.read(&s0, 0, &mut four).unwrap();
        assert_eq!(four, 1.0f32.to_le_bytes());
        arena.read(&s1, 252, &mut four).unwrap();
        assert_eq!(four, 2.0f32.to_le_bytes());
    });
}

// ---- Every closure may panic, on every tier, nested or not. ----

#[test]
fn a_panic_in_any_closure_on_any_tier_leaves_nothing_locked() {
    bounded("panics", Duration::from_secs(60), || {
        let m = manager(config([MIB, 8 * MIB, 16 * MIB]));
        for tier in Tier::ALL {
            let h = host_tensor(&m, TensorKind::Scratch, 8192, 7);
            if tier != Tier::Host {
                drop(m.pin(h, tier).unwrap());
                m.swap_out(h, Tier::Host).unwrap();
                if tier == Tier::Disk {
                    m.swap_out(h, Tier::Device).unwrap();
                }
            }
            assert_eq!(m.residency(h).unwrap().0, vec![tier]);
            let pin = m.pin(h, tier).unwrap();
            let _ = quiet_panic(|| pin.with_bytes(|_| panic!("read lend")));
            let _ = quiet_panic(|| pin.with_bytes_mut(0, 64, |_| panic!("lend")));
            let _ = quiet_panic(|| {
                pin.with_bytes_mut(0, 64, |_| {
                    let _ = pin.with_bytes_mut(100, 64, |_| panic!("nested lend"));
                })
            });
            let _ = quiet_panic(|| {
                pin.with_bytes(|_| {
                    let _ = pin.with_bytes(|_| panic!("nested read lend"));
                })
            });
            let _ = quiet_panic(|| pin.with_ranges_mut(&[(0, 8), (64, 8)], |_| panic!("ranges")));
            // Another thread reads at once; this one lends and writes the same bytes.
            std::thread::scope(|s| {
                s.spawn(|| {
                    let t = Instant::now();
                    let mut buf = vec![0u8; 8192];
                    m.read(h, 0, &mut buf).unwrap();
                    assert_eq!(buf, pattern(7, 8192), "{tier}");
                    assert!(t.elapsed() < Duration::from_millis(500), "{tier}");
                });
            });
            if tier != Tier::Disk {
                pin.with_bytes_mut(0, 64, |b| b.fill(5)).unwrap();
                pin.write(64, &[6u8; 64]).unwrap();
                let mut buf = [0u8; 128];
                pin.read(0, &mut buf).unwrap();
                assert_eq!(&buf[..64], &[5u8; 64]);
                assert_eq!(&buf[64..], &[6u8; 64]);
            }
            drop(pin);
            assert_quiet(&m);
            if tier != Tier::Host {
                drop(m.pin(h, Tier::Host).unwrap());
            }
            m.deallocate(h).unwrap();
        }
        assert_quiet(&m);
    });
}

// ---- Wait bounds of "for ever". ----

#[test]
fn a_practically_endless_call_wait_still_waits_and_reads_the_new_bytes() {
    for wait in [Duration::MAX, Duration::from_secs(u64::MAX / 2)] {
        bounded("endless wait", Duration::from_secs(30), move || {
            let mut c = config([MIB, 8 * MIB, 16 * MIB]);
            c.max_call_wait = wait;
            let m = manager(c);
            let h = host_tensor(&m, TensorKind::Scratch, 4096, 8);
            let pin = m.pin(h, Tier::Host).unwrap();
            let lent = Barrier::new(2);
            std::thread::scope(|s| {
                s.spawn(|| {
                    pin.with_bytes_mut(0, 4096, |b| {
                        lent.wait();
                        std::thread::sleep(Duration::from_millis(200));
                        b.fill(3);
                    })
                    .unwrap();
                });
                lent.wait();
                let mut buf = vec![0u8; 4096];
                m.read(h, 0, &mut buf).unwrap();
                assert_eq!(buf, vec![3u8; 4096]);
            });
        });
    }
}

// ---- Zeroing on free: every unit, sealed or not, files striped or not. ----

#[test]
fn zero_on_free_frees_every_block_at_every_unit_sealed_or_not() {
    bounded("zero on free", Duration::from_secs(300), || {
        let mut unit = 4 * KIB;
        while unit <= 64 * MIB {
            for (encrypt, file_bytes) in [(false, None), (true, Some(2 * MIB))] {
                let mut c = config([4 * MIB, 8 * MIB, 32 * MIB]);
                c.zero_on_free = true;
                c.disk.unit_bytes = unit;
                c.disk.encrypt = encrypt;
                c.disk.file_bytes = file_bytes;
                c.engine.chunk_bytes = unit.max(4 * MIB);
                let m = MemoryManager::new(c)
                    .unwrap_or_else(|e| panic!("unit {unit}, encrypt {encrypt}: {e}"));
                let before = Tier::ALL.map(|t| m.tier_usage(t).in_use_bytes);
                for (i, len) in [1u64, 4095, 64 * KIB + 1, 128 * KIB, MIB + 3, 3 * MIB + 5]
                    .into_iter()
                    .enumerate()
                {
                    let seed = unit + i as u64;
                    let h = m.allocate(len, TensorKind::Weight, seed).unwrap();
                    let want = pattern(seed, len as usize);
                    m.write(h, 0, &want).unwrap();
                    assert_eq!(m.swap_out(h, Tier::Host).unwrap(), len);
                    let mut one = vec![0u8; (len as usize).min(10)];
                    let at = (len / 2).min(len - one.len() as u64);
                    m.read(h, at, &mut one).unwrap_or_else(|e| {
                        panic!("unit {unit}, encrypt {encrypt}, {len} B at {at}: {e}")
                    });
                    assert_eq!(one, want[at as usize..at as usize + one.len()]);
                    drop(m.pin(h, Tier::Device).unwrap());
                    let mut all = vec![0u8; len as usize];
                    m.read(h, 0, &mut all).unwrap();
                    assert_eq!(all, want, "unit {unit}, encrypt {encrypt}, {len} B");
                    m.deallocate(h).unwrap();
                }
                assert_quiet(&m);
                assert_eq!(
                    Tier::ALL.map(|t| m.tier_usage(t).in_use_bytes),
                    before,
                    "unit {unit}, encrypt {encrypt}: freed blocks stayed reserved"
                );
            }
            unit *= 2;
        }
    });
}

// ---- Checkpoint extents: the file is the disk copy, untouched by anything. ----

#[test]
fn extents_survive_every_demotion_compaction_and_zero_on_free_unchanged() {
    bounded("extents", Duration::from_secs(120), || {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("weights.bin");
        let file = pattern(21, 3 * MIB as usize + 777);
        std::fs::write(&path, &file).unwrap();
        for (encrypt, direct_io) in [(false, true), (true, true), (false, false)] {
            let mut c = config([4 * MIB, 8 * MIB, 16 * MIB]);
            c.zero_on_free = true;
            c.disk.encrypt = encrypt;
            c.disk.direct_io = direct_io;
            let m = manager(c);
            let disk_before = m.tier_usage(Tier::Disk).in_use_bytes;
            let spans = [
                (0u64, 4096u64),
                (3, 100_001),
                (4095, 2 * MIB + 1),
                (MIB, 777),
            ];
            let hs: Vec<_> = spans
                .iter()
                .enumerate()
                .map(|(i, &(off, len))| {
                    m.register_extent(&path, off, len, TensorKind::Weight, i as u64)
                        .unwrap()
                })
                .collect();
            let check = |h: TensorHandle, (off, len): (u64, u64)| {
                let mut buf = vec![0u8; len as usize];
                m.read(h, 0, &mut buf).unwrap();
                assert_eq!(buf, file[off as usize..(off + len) as usize]);
                let mut one = [0u8; 1];
                m.read(h, len - 1, &mut one).unwrap();
                assert_eq!(one[0], file[(off + len - 1) as usize]);
            };
            for (&h, &span) in hs.iter().zip(&spans) {
                check(h, span);
                // Write refusals of every kind.
                assert!(matches!(
                    m.write(h, 0, &[1]),
                    Err(ManagerError::ReadOnly { .. })
                ));
                let pin = m.pin(h, Tier::Disk).unwrap();
                assert!(pin.write(0, &[1]).is_err());
                assert!(pin.with_bytes_mut(0, 1, |b| b[0] = 1).is_err());
                assert_eq!(
                    pin.with_bytes(|b| b.to_vec()).unwrap(),
                    file[span.0 as usize..(span.0 + span.1) as usize]
                );
                drop(pin);
                let host = m.pin(h, Tier::Host).unwrap();
                assert!(matches!(
                    host.write(0, &[1]),
                    Err(ManagerError::ReadOnly { .. } | ManagerError::NotExclusive { .. })
                ));
                drop(host);
                drop(m.pin(h, Tier::Device).unwrap());
                assert_eq!(m.swap_out(h, Tier::Disk).unwrap(), 0);
            }
            assert!(m.evict(Tier::Device, u64::MAX).unwrap() > 0);
            m.evict(Tier::Host, u64::MAX).unwrap();
            assert_eq!(m.evict(Tier::Disk, u64::MAX).unwrap(), 0);
            m.compact().unwrap();
            for (&h, &span) in hs.iter().zip(&spans) {
                assert_eq!(m.residency(h).unwrap().0, vec![Tier::Disk]);
                check(h, span);
            }
            assert_eq!(m.stats().charged.get(Tier::Disk, TensorKind::Weight), 0);
            assert_eq!(m.tier_usage(Tier::Disk).in_use_bytes, disk_before);
            for h in hs {
                drop(m.pin(h, Tier::Host).unwrap());
                m.deallocate(h).unwrap();
            }
            assert_quiet(&m);
            assert_eq!(
                std::fs::read(&path).unwrap(),
                file,
                "the checkpoint file changed"
            );
        }
    });
}

#[test]
fn an_extent_beyond_its_file_is_a_typed_error() {
    bounded("short extent", Duration::from_secs(30), || {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("short.bin");
        std::fs::write(&path, pattern(1, 10_000)).unwrap();
        let m = manager(config([MIB, 8 * MIB, 16 * MIB]));
        for (off, len) in [
            (0u64, 10_001u64),
            (9_999, 2),
            (u64::MAX - 1, 4),
            (10_000, 1),
        ] {
            match m.register_extent(&path, off, len, TensorKind::Weight, 1) {
                Err(_) => {}
                Ok(h) => {
                    let mut buf = vec![0u8; len as usize];
                    assert!(
                        m.read(h, 0, &mut buf).is_err(),
                        "{off}+{len} read past the file"
                    );
                    m.deallocate(h).unwrap();
                }
            }
        }
        assert!(
            m.register_extent(&dir.path().join("missing"), 0, 1, TensorKind::Weight, 1)
                .is_err()
        );
        assert_quiet(&m);
    });
}

// ---- Handles: stale ones never read a newer tensor; foreign ones are refused. ----

#[test]
fn a_stale_handle_racing_reuse_never_reads_a_newer_tensor() {
    bounded("stale handles", Duration::from_secs(60), || {
        let mut c = config([MIB, 8 * MIB, 16 * MIB]);
        c.shards = 1;
        let m = manager(c);
        let latest: Mutex<Vec<(TensorHandle, u64)>> = Mutex::new(Vec::new());
        let stop = AtomicBool::new(false);
        let seen_stale = AtomicU64::new(0);
        std::thread::scope(|s| {
            for _ in 0..2 {
                s.spawn(|| {
                    let mut buf = vec![0u8; 512];
                    while !stop.load(Ordering::Relaxed) {
                        let old: Vec<_> = latest.lock().unwrap().clone();
                        for (h, seed) in old {
                            match m.read(h, 0, &mut buf) {
                                Ok(()) => assert_eq!(buf, pattern(seed, 512), "seed {seed}"),
                                Err(ManagerError::Stale { .. }) => {
                                    seen_stale.fetch_add(1, Ordering::Relaxed);
                                }
                                Err(e) => panic!("{e}"),
                            }
                        }
                    }
                });
            }
            for seed in 0..3000u64 {
                let h = host_tensor(&m, TensorKind::Scratch, 512, seed);
                let mut l = latest.lock().unwrap();
                l.push((h, seed));
                if l.len() > 4 {
                    let (old, _) = l.remove(0);
                    drop(l);
                    // Readers may hold it a moment (a plain read pins it).
                    while let Err(ManagerError::Pinned { .. }) = m.deallocate(old) {
                        std::thread::yield_now();
                    }
                }
            }
            stop.store(true, Ordering::Relaxed);
        });
        assert!(seen_stale.load(Ordering::Relaxed) > 0, "the race never ran");
    });
}

#[test]
fn handles_of_many_managers_in_one_process_are_foreign_to_each_other() {
    bounded("many managers", Duration::from_secs(60), || {
        let ms: Vec<_> = (0..6)
            .map(|i| {
                common::align_allocator_ids();
                let mut c = config([MIB, 4 * MIB, 16 * MIB]);
                if i % 2 == 1 {
                    c.kv_block_bytes = Some(4096);
                    for t in [Tier::Device, Tier::Host] {
                        c.budgets.bytes[t.index()][TensorKind::KvCache.index()] = 256 * KIB;
                    }
                }
                c.zero_on_free = i % 3 == 0;
                manager(c)
            })
            .collect();
        let hs: Vec<_> = ms
            .iter()
            .enumerate()
            .map(|(i, m)| host_tensor(m, TensorKind::KvCache, 4096, i as u64))
            .collect();
        for (i, m) in ms.iter().enumerate() {
            for (j, &h) in hs.iter().enumerate() {
                let mut buf = vec![0u8; 4096];
                if i == j {
                    m.read(h, 0, &mut buf).unwrap();
                    assert_eq!(buf, pattern(i as u64, 4096));
                } else {
                    assert!(matches!(
                        m.read(h, 0, &mut buf),
                        Err(ManagerError::Foreign { .. })
                    ));
                    assert!(matches!(m.deallocate(h), Err(ManagerError::Foreign { .. })));
                    assert!(matches!(
                        m.pin(h, Tier::Host),
                        Err(ManagerError::Foreign { .. })
                    ));
                    assert!(matches!(
                        m.swap_out(h, Tier::Host),
                        Err(ManagerError::Foreign { .. })
                    ));
                }
            }
        }
        for (m, h) in ms.iter().zip(hs) {
            let before = m.tier_usage(Tier::Host).in_use_bytes;
            assert!(before >= 4096);
            assert_eq!(m.swap_out(h, Tier::Host).unwrap(), 4096);
            drop(m.pin(h, Tier::Host).unwrap());
            m.compact().unwrap();
            m.deallocate(h).unwrap();
            assert_eq!(m.tier_usage(Tier::Host).in_use_bytes, 0);
            assert_eq!(m.tier_usage(Tier::Disk).in_use_bytes, 0);
            assert_quiet(m);
        }
    });
}

// ---- Everything at once: every byte read is a whole version, nothing is left behind. ----

const SHARED: usize = 8;
const SHARED_BYTES: usize = 48 * 1024;

/// Version `v` of shared tensor `i`: the version in the first 8 bytes, a pattern after.
fn version(i: usize, v: u64) -> Vec<u8> {
    let mut b = pattern(i as u64 * 1_000_000 + v, SHARED_BYTES);
    b[..8].copy_from_slice(&v.to_le_bytes());
    b
}

fn check_version(i: usize, bytes: &[u8], what: &str) {
    let v = u64::from_le_bytes(bytes[..8].try_into().unwrap());
    assert!(
        bytes == version(i, v),
        "{what}: shared tensor {i} read a torn or foreign version ({v})"
    );
}

#[test]
fn compaction_eviction_and_swap_outs_racing_reads_and_lends_keep_every_byte() {
    bounded("everything at once", Duration::from_secs(240), || {
        common::align_allocator_ids();
        let mut c = config([2 * MIB, 4 * MIB, 64 * MIB]);
        c.zero_on_free = true;
        c.kv_block_bytes = Some(4096);
        c.disk.unit_bytes = 16 * KIB;
        c.engine.chunk_bytes = 256 * KIB;
        for t in [Tier::Device, Tier::Host] {
            c.budgets.bytes[t.index()][TensorKind::KvCache.index()] = 512 * KIB;
        }
        let m = manager(c);
        let baseline = Tier::ALL.map(|t| m.tier_usage(t).in_use_bytes);
        let shared: Vec<_> = (0..SHARED)
            .map(|i| {
                let h = m
                    .allocate(SHARED_BYTES as u64, TensorKind::Scratch, i as u64)
                    .unwrap();
                m.write(h, 0, &version(i, 0)).unwrap();
                h
            })
            .collect();
        let next_version: Vec<AtomicU64> = (0..SHARED).map(|_| AtomicU64::new(1)).collect();
        let stop = AtomicBool::new(false);
        let failures: Mutex<Vec<String>> = Mutex::new(Vec::new());
        let fail = |what: String| failures.lock().unwrap().push(what);
        let deadline = Instant::now() + Duration::from_secs(4);
        std::thread::scope(|s| {
            // Writers: through a pin when its copy is the only one, else a plain write.
            for w in 0..2usize {
                let (m, shared, next_version, stop, fail) =
                    (&m, &shared, &next_version, &stop, &fail);
                s.spawn(move || {
                    let mut n = w;
                    while !stop.load(Ordering::Relaxed) {
                        n += 3;
                        let i = n % SHARED;
                        let v = next_version[i].fetch_add(1, Ordering::Relaxed);
                        let bytes = version(i, v);
                        let tier = [Tier::Host, Tier::Device][n % 2];
                        let r = match m.pin(shared[i], tier) {
                            Ok(pin) => match pin.write(0, &bytes) {
                                Err(ManagerError::NotExclusive { .. }) => {
                                    drop(pin);
                                    m.write(shared[i], 0, &bytes)
                                }
                                other => other,
                            },
                            Err(e) => Err(e),
                        };
                        match r {
                            Ok(())
                            | Err(ManagerError::Pinned { .. })
                            | Err(ManagerError::OutOfMemory { .. }) => {}
                            Err(e) => fail(format!("write {i}: {e:?}")),
                        }
                    }
                });
            }
            // Readers: plain reads, pinned reads and read lends on every tier.
            for r in 0..3usize {
                let (m, shared, stop, fail) = (&m, &shared, &stop, &fail);
                s.spawn(move || {
                    let mut buf = vec![0u8; SHARED_BYTES];
                    let mut n = r;
                    while !stop.load(Ordering::Relaxed) {
                        n += 1;
                        let i = n % SHARED;
                        match m.read(shared[i], 0, &mut buf) {
                            Ok(()) => check_version(i, &buf, "plain read"),
                            Err(e) => fail(format!("read {i}: {e:?}")),
                        }
                        let tier = Tier::ALL[n % 3];
                        match m.pin(shared[i], tier) {
                            Ok(pin) => {
                                match pin.read(0, &mut buf) {
                                    Ok(()) => check_version(i, &buf, "pinned read"),
                                    Err(e) => fail(format!("pinned read {i} on {tier}: {e:?}")),
                                }
                                match pin.with_bytes(|b| check_version(i, b, "read lend")) {
                                    Ok(()) => {}
                                    Err(e) => fail(format!("read lend {i} on {tier}: {e:?}")),
                                }
                            }
                            Err(ManagerError::OutOfMemory { .. }) => {}
                            Err(e) => fail(format!("pin {i} on {tier}: {e:?}")),
                        }
                    }
                });
            }
            // Movers: swap-outs, evictions, prefetches and compaction of every tier.
            {
                let (m, shared, stop, fail) = (&m, &shared, &stop, &fail);
                s.spawn(move || {
                    let mut n = 0usize;
                    while !stop.load(Ordering::Relaxed) {
                        n += 1;
                        let h = shared[n % SHARED];
                        let tier = Tier::ALL[n % 3];
                        if let Err(e) = m.swap_out(h, tier) {
                            fail(format!("swap out on {tier}: {e:?}"));
                        }
                        m.prefetch(shared[(n + 3) % SHARED], Tier::Device);
                        if n.is_multiple_of(7)
                            && let Err(e) = m.compact_tier(tier)
                        {
                            fail(format!("compact {tier}: {e:?}"));
                        }
                        if n.is_multiple_of(11) {
                            let _ = m.evict(tier, 128 * KIB);
                        }
                    }
                });
            }
            // Churn: odd sizes and KV blocks allocated, written, swapped and freed.
            {
                let (m, stop, fail) = (&m, &stop, &fail);
                s.spawn(move || {
                    let mut live: Vec<(TensorHandle, u64, usize)> = Vec::new();
                    let mut seed = 10_000u64;
                    while !stop.load(Ordering::Relaxed) {
                        seed += 1;
                        let (kind, len) = match seed % 3 {
                            0 => (TensorKind::KvCache, 4096),
                            1 => (TensorKind::Weight, 1 + (seed as usize * 7919) % (96 * 1024)),
                            _ => (TensorKind::Activation, 4096 + (seed as usize % 5000)),
                        };
                        match m.allocate(len as u64, kind, seed) {
                            Ok(h) => {
                                if let Err(e) = m.write(h, 0, &pattern(seed, len)) {
                                    fail(format!("churn write: {e:?}"));
                                }
                                live.push((h, seed, len));
                            }
                            Err(ManagerError::OutOfMemory { .. }) => {}
                            Err(e) => fail(format!("churn allocate: {e:?}")),
                        }
                        if live.len() > 12 || (seed.is_multiple_of(4) && !live.is_empty()) {
                            let (h, sd, len) = live.remove(seed as usize % live.len());
                            let _ = m.swap_out(h, Tier::Host);
                            let mut buf = vec![0u8; len];
                            match m.read(h, 0, &mut buf) {
                                Ok(()) => {
                                    if buf != pattern(sd, len) {
                                        fail(format!("churn tensor {sd} changed"));
                                    }
                                }
                                Err(e) => fail(format!("churn read: {e:?}")),
                            }
                            if let Err(e) = m.deallocate(h) {
                                fail(format!("churn free: {e:?}"));
                            }
                        }
                    }
                    for (h, _, _) in live {
                        m.deallocate(h).unwrap();
                    }
                });
            }
            while Instant::now() < deadline && failures.lock().unwrap().is_empty() {
                std::thread::sleep(Duration::from_millis(20));
            }
            stop.store(true, Ordering::Relaxed);
        });
        let failures = failures.into_inner().unwrap();
        assert!(
            failures.is_empty(),
            "{} failures, first: {:?}",
            failures.len(),
            &failures[..failures.len().min(5)]
        );
        // Let the prefetch workers drain, then check the ledger and free everything.
        std::thread::sleep(Duration::from_millis(100));
        assert_quiet(&m);
        for (i, &h) in shared.iter().enumerate() {
            let mut buf = vec![0u8; SHARED_BYTES];
            m.read(h, 0, &mut buf).unwrap();
            check_version(i, &buf, "final read");
            m.deallocate(h).unwrap();
        }
        assert_quiet(&m);
        assert_eq!(Tier::ALL.map(|t| m.tier_usage(t).in_use_bytes), baseline);
    });
}
