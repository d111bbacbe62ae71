//! The manager's newest mechanisms attacked from outside: plain reads that are not pins
//! (writers and frees wait for them), write-backs that find room below before they claim their
//! tensor, reservations that wait for bytes in flight, the OutOfMemory and TooLarge promises,
//! and lends of never-written tensors on every tier. Every test runs under a watchdog, so a
//! hang fails instead of stalling the suite.

mod common;

use common::{KIB, MIB, bounded, config, pattern};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};
use vlmem::{ManagerConfig, ManagerError, MemoryManager, TensorHandle, TensorKind, Tier};
use vlmem_tier::{
    DiskOptions, DiskTier, FaultKind, FaultPlan, FaultRule, FaultyTier, FirstFitAllocator,
    HostOptions, IoPoint, MemoryTier, TierBackend,
};

fn manager(c: ManagerConfig) -> MemoryManager {
    MemoryManager::new(c).unwrap()
}

fn host_tensor(m: &MemoryManager, kind: TensorKind, len: u64, seed: u64) -> TensorHandle {
    let h = m.allocate(len, kind, seed).unwrap();
    m.write(h, 0, &pattern(seed, len as usize)).unwrap();
    h
}

/// Leaves `h`'s only copy on `tier` (it starts with its only copy on the host).
fn only_on(m: &MemoryManager, h: TensorHandle, tier: Tier) {
    match tier {
        Tier::Host => {}
        Tier::Device => {
            drop(m.pin(h, Tier::Device).unwrap());
            m.swap_out(h, Tier::Host).unwrap();
        }
        Tier::Disk => {
            assert!(m.swap_out(h, Tier::Host).unwrap() > 0);
        }
    }
    assert_eq!(m.residency(h).unwrap().0, vec![tier]);
}

fn assert_quiet(m: &MemoryManager) {
    let a = m.audit();
    assert_eq!(a.overlaps, 0, "{a:?}");
    assert_eq!(a.busy_entries, 0, "{a:?}");
    assert_eq!(a.pins, 0, "{a:?}");
    assert_eq!(a.entries_without_copy, 0, "{a:?}");
    assert!(a.charged_matches_resident, "{a:?}");
}

fn set_budget(c: &mut ManagerConfig, tier: Tier, kind: TensorKind, bytes: u64) {
    c.budgets.bytes[tier.index()][kind.index()] = bytes;
}

fn alloc(capacity_bytes: u64, granule_bytes: u64) -> Arc<FirstFitAllocator> {
    Arc::new(FirstFitAllocator::new(capacity_bytes, granule_bytes).unwrap())
}

/// A manager over a device and a host wrapped in `FaultyTier` (plans returned) and a plain
/// disk; every kind may use each tier whole.
fn faulty_manager(
    caps: [u64; 3],
    max_call_wait: Duration,
) -> (MemoryManager, Arc<FaultPlan>, Arc<FaultPlan>) {
    let device_plan = Arc::new(FaultPlan::new());
    let host_plan = Arc::new(FaultPlan::new());
    let device: Arc<dyn TierBackend> = Arc::new(FaultyTier::new(
        Arc::new(MemoryTier::simulated_device(alloc(caps[0], 256), None).unwrap()),
        device_plan.clone(),
    ));
    let host: Arc<dyn TierBackend> = Arc::new(FaultyTier::new(
        Arc::new(MemoryTier::host(alloc(caps[1], 256), HostOptions::default()).unwrap()),
        host_plan.clone(),
    ));
    let disk = Arc::new(
        DiskTier::new(
            alloc(caps[2], 4096),
            DiskOptions {
                preallocate: false,
                ..DiskOptions::default()
            },
        )
        .unwrap(),
    );
    let mut c = config(caps);
    c.max_call_wait = max_call_wait;
    (
        MemoryManager::with_tiers(c, device, host, disk).unwrap(),
        device_plan,
        host_plan,
    )
}

// ---- OutOfMemory only when nothing can go: a victim the tier below cannot take. ----

/// Host weights: one of 512 KiB used first, then eight of 64 KiB (the host's weight budget
/// of 1 MiB is full); the disk's weight budget is 256 KiB, so the big one can never be
/// written back, the small ones can.
fn host_full_with_one_victim_too_large_for_the_disk() -> (MemoryManager, Vec<TensorHandle>) {
    let mut c = config([MIB, 4 * MIB, 32 * MIB]);
    set_budget(&mut c, Tier::Host, TensorKind::Weight, MIB);
    set_budget(&mut c, Tier::Disk, TensorKind::Weight, 256 * KIB);
    let m = manager(c);
    let mut hs = vec![host_tensor(&m, TensorKind::Weight, 512 * KIB, 1)];
    for i in 0..8 {
        hs.push(host_tensor(&m, TensorKind::Weight, 64 * KIB, 10 + i));
    }
    (m, hs)
}

#[test]

fn an_eviction_pass_goes_past_a_victim_too_large_for_the_tier_below() {
    let r = bounded("too large below", Duration::from_secs(30), || {
        let (m, hs) = host_full_with_one_victim_too_large_for_the_disk();
        let r = m.allocate(64 * KIB, TensorKind::Weight, 99);
        if r.is_ok() {
            for (i, h) in hs.iter().enumerate() {
                let seed = if i == 0 { 1 } else { 9 + i as u64 };
                let len = if i == 0 { 512 * KIB } else { 64 * KIB };
                assert_eq!(
                    common::read_all(&m, *h, len as usize),
                    pattern(seed, len as usize)
                );
            }
        }
        r.map(|_| ())
    });
    assert!(
        r.is_ok(),
        "eight unpinned 64 KiB weights could go to a disk with 256 KiB free for weights, yet: {r:?}"
    );
}

#[test]

fn evict_demotes_the_victims_that_fit_below_when_one_does_not() {
    let freed = bounded("evict too large below", Duration::from_secs(30), || {
        let (m, _hs) = host_full_with_one_victim_too_large_for_the_disk();
        m.evict(Tier::Host, 128 * KIB).unwrap()
    });
    assert!(
        freed >= 128 * KIB,
        "evict(Host, 128 KiB) with eight movable 64 KiB weights freed {freed} B"
    );
}

// ---- OutOfMemory at once when everything stays by rule: no wait for the call's own move. ----

#[test]

fn a_pin_from_a_full_disk_fails_at_once_instead_of_waiting_for_its_own_move() {
    let (elapsed, r) = bounded("full disk self wait", Duration::from_secs(30), || {
        let mut c = config([MIB, 4 * MIB, 32 * MIB]);
        c.max_call_wait = Duration::from_millis(1500);
        set_budget(&mut c, Tier::Host, TensorKind::Weight, 128 * KIB);
        set_budget(&mut c, Tier::Disk, TensorKind::Weight, 256 * KIB);
        let m = manager(c);
        // Four weights whose last copies fill the disk's weight budget.
        let on_disk: Vec<_> = (0..4)
            .map(|i| {
                let h = host_tensor(&m, TensorKind::Weight, 64 * KIB, i);
                only_on(&m, h, Tier::Disk);
                h
            })
            .collect();
        // Two on the host fill its weight budget; neither can be written back (disk full).
        let _a = host_tensor(&m, TensorKind::Weight, 64 * KIB, 10);
        let _b = host_tensor(&m, TensorKind::Weight, 64 * KIB, 11);
        let started = Instant::now();
        let r = m.pin(on_disk[0], Tier::Host).map(drop);
        let elapsed = started.elapsed();
        assert_quiet(&m);
        (elapsed, r)
    });
    assert!(
        matches!(r, Err(ManagerError::OutOfMemory { .. })),
        "every byte on the full disk is a last copy: {r:?}"
    );
    assert!(
        elapsed < Duration::from_millis(500),
        "the disk holds only last copies (one of them the pin's own source), yet the pin \
         waited {elapsed:?} of its 1.5 s for bytes in flight before {r:?}"
    );
}

#[test]

fn a_pin_to_the_device_does_not_wait_for_its_own_host_copy() {
    let (elapsed, read_waited, r) = bounded("device self wait", Duration::from_secs(30), || {
        let mut c = config([MIB, 4 * MIB, 32 * MIB]);
        c.max_call_wait = Duration::from_millis(1500);
        set_budget(&mut c, Tier::Device, TensorKind::Weight, 64 * KIB);
        set_budget(&mut c, Tier::Host, TensorKind::Weight, 128 * KIB);
        let m = manager(c);
        let y = host_tensor(&m, TensorKind::Weight, 64 * KIB, 1);
        only_on(&m, y, Tier::Device);
        let x = host_tensor(&m, TensorKind::Weight, 64 * KIB, 2);
        let z = host_tensor(&m, TensorKind::Weight, 64 * KIB, 3);
        let z_pin = m.pin(z, Tier::Host).unwrap();
        let go = Barrier::new(2);
        let (elapsed, r, read_waited) = std::thread::scope(|s| {
            let reader = s.spawn(|| {
                go.wait();
                std::thread::sleep(Duration::from_millis(20));
                let t = Instant::now();
                let mut buf = vec![0u8; 64];
                let r = m.read(x, 0, &mut buf);
                (t.elapsed(), r)
            });
            go.wait();
            let started = Instant::now();
            let r = m.pin(x, Tier::Device).map(drop);
            let elapsed = started.elapsed();
            let (read_waited, read) = reader.join().unwrap();
            assert!(read.is_ok(), "{read:?}");
            (elapsed, r, read_waited)
        });
        drop(z_pin);
        assert_quiet(&m);
        (elapsed, read_waited, r)
    });
    assert!(
        elapsed < Duration::from_millis(500),
        "pin(x, Device): the device's one victim can only go to a host holding x itself (the \
         pin's own source, busy) and a pinned tensor; the pin waited {elapsed:?} before {r:?}, \
         and a plain read of x waited {read_waited:?} meanwhile"
    );
}

// ---- TooLarge: more than any part of the arena can hold. ----

#[test]

fn a_kv_tensor_that_no_part_of_a_split_arena_can_hold_is_too_large() {
    let r = bounded("kv split too large", Duration::from_secs(30), || {
        common::align_allocator_ids();
        let mut c = ManagerConfig::with_capacities(4 * MIB, 8 * MIB, 64 * MIB);
        c.disk.preallocate = false;
        c.kv_block_bytes = Some(4096);
        // The slab takes 6 MiB of the 8 MiB arena; 2 MiB remain for everything else.
        set_budget(&mut c, Tier::Host, TensorKind::KvCache, 6 * MIB);
        let m = manager(c);
        // Not a block: the slab cannot take it, and the rest of the arena is 2 MiB.
        m.allocate(3 * MIB, TensorKind::KvCache, 1)
    });
    assert!(
        matches!(r, Err(ManagerError::TooLarge { .. })),
        "3 MiB of KV (not one block) beside a 6 MiB KV slab in an 8 MiB arena, nothing else \
         allocated: {r:?}"
    );
}

// ---- Empty reads touch no tier and are never Busy. ----

#[test]

fn an_empty_read_inside_a_lent_range_is_never_busy() {
    let (through_pin, through_manager) =
        bounded("empty read in lend", Duration::from_secs(30), || {
            let mut c = config([MIB, 8 * MIB, 16 * MIB]);
            c.max_call_wait = Duration::from_millis(100);
            let m = manager(c);
            let h = host_tensor(&m, TensorKind::Scratch, 8192, 1);
            let lender = m.pin(h, Tier::Host).unwrap();
            let reader = m.pin(h, Tier::Host).unwrap();
            let lent = Barrier::new(2);
            std::thread::scope(|s| {
                s.spawn(|| {
                    lender
                        .with_bytes_mut(0, 4096, |b| {
                            lent.wait();
                            std::thread::sleep(Duration::from_millis(400));
                            b.fill(9);
                        })
                        .unwrap();
                });
                lent.wait();
                (reader.read(2048, &mut []), m.read(h, 2048, &mut []))
            })
        });
    assert!(
        through_pin.is_ok() && through_manager.is_ok(),
        "a read of 0 bytes at offset 2048 inside a lend of [0, 4096): PinGuard::read \
         {through_pin:?}, MemoryManager::read {through_manager:?}"
    );
}

#[test]

fn an_empty_read_of_a_tensor_being_written_is_never_busy() {
    let r = bounded("empty read of busy", Duration::from_secs(30), || {
        let (m, _device, host) =
            faulty_manager([MIB, 8 * MIB, 16 * MIB], Duration::from_millis(100));
        let h = host_tensor(&m, TensorKind::Scratch, 8192, 1);
        host.add(FaultRule::once(
            IoPoint::Write,
            FaultKind::Slow(Duration::from_millis(500)),
        ));
        std::thread::scope(|s| {
            let w = s.spawn(|| m.write(h, 0, &pattern(2, 8192)));
            std::thread::sleep(Duration::from_millis(50));
            let r = m.read(h, 0, &mut []);
            w.join().unwrap().unwrap();
            r
        })
    });
    assert!(
        r.is_ok(),
        "a read of 0 bytes while a write runs for 500 ms: {r:?}"
    );
}

// ---- Writers and frees beside a stream of plain reads: they wait, and are not starved. ----

/// `readers` threads read a 1 MiB tensor in a loop through `MemoryManager::read` while the
/// calling thread makes `rounds` writes (or frees and re-creates the tensor). Returns the
/// refusals.
fn writer_beside_read_stream(
    deallocate: bool,
    readers: usize,
    rounds: u64,
    len_bytes: u64,
) -> Vec<String> {
    let mut c = config([MIB, 16 * MIB, 16 * MIB]);
    c.max_call_wait = Duration::from_millis(500);
    let m = manager(c);
    let len = len_bytes as usize;
    let h = Mutex::new(host_tensor(&m, TensorKind::Scratch, len_bytes, 0));
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        for _ in 0..readers {
            s.spawn(|| {
                let mut buf = vec![0u8; len];
                while !stop.load(Ordering::Relaxed) {
                    let cur = *h.lock().unwrap();
                    match m.read(cur, 0, &mut buf) {
                        Ok(()) | Err(ManagerError::Stale { .. }) => {}
                        Err(e) => panic!("a plain read failed: {e:?}"),
                    }
                }
            });
        }
        std::thread::sleep(Duration::from_millis(20));
        let mut refused = Vec::new();
        for round in 1..=rounds {
            let cur = *h.lock().unwrap();
            let r = if deallocate {
                m.deallocate(cur).map(|()| {
                    *h.lock().unwrap() = host_tensor(&m, TensorKind::Scratch, len_bytes, round);
                })
            } else {
                m.write(cur, 0, &pattern(round, len))
            };
            if let Err(e) = r {
                refused.push(format!("{e:?}"));
            }
        }
        stop.store(true, Ordering::Relaxed);
        refused
    })
}

#[test]

fn a_write_is_not_starved_by_a_stream_of_overlapping_plain_reads() {
    let refused = bounded("write starved", Duration::from_secs(120), || {
        writer_beside_read_stream(false, 8, 20, 4 * MIB)
    });
    assert!(
        refused.is_empty(),
        "{} of 20 writes refused beside eight threads of plain reads of 4 MiB, e.g. {:?}",
        refused.len(),
        refused.first()
    );
}

#[test]

fn a_deallocation_is_not_starved_by_a_stream_of_overlapping_plain_reads() {
    let refused = bounded("free starved", Duration::from_secs(120), || {
        writer_beside_read_stream(true, 8, 20, 4 * MIB)
    });
    assert!(
        refused.is_empty(),
        "{} of 20 deallocations refused beside eight threads of plain reads of 4 MiB, e.g. {:?}",
        refused.len(),
        refused.first()
    );
}

#[test]
fn a_lend_is_not_starved_by_a_stream_of_overlapping_reads() {
    let refused = bounded("lend starved", Duration::from_secs(120), || {
        let mut c = config([MIB, 8 * MIB, 16 * MIB]);
        c.max_call_wait = Duration::from_millis(500);
        let m = manager(c);
        let h = host_tensor(&m, TensorKind::Scratch, MIB, 0);
        let stop = AtomicBool::new(false);
        let writer = m.pin(h, Tier::Host).unwrap();
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    let pin = m.pin(h, Tier::Host).unwrap();
                    let mut buf = vec![0u8; MIB as usize];
                    while !stop.load(Ordering::Relaxed) {
                        pin.read(0, &mut buf).unwrap();
                        m.read(h, 0, &mut buf).unwrap();
                        let first = buf[0];
                        assert!(buf.iter().all(|&b| b == first) || first == pattern(0, 1)[0]);
                    }
                });
            }
            std::thread::sleep(Duration::from_millis(20));
            let mut refused = Vec::new();
            for round in 1..=20u8 {
                if let Err(e) = writer.with_bytes_mut(0, MIB, |b| b.fill(round)) {
                    refused.push(format!("{e:?}"));
                }
            }
            stop.store(true, Ordering::Relaxed);
            refused
        })
    });
    assert!(
        refused.is_empty(),
        "{} of 20 lends refused beside reads: {:?}",
        refused.len(),
        refused.first()
    );
}

// ---- Lends of never-written tensors: zeros, never a previous owner's bytes. ----

/// A tensor that reuses the block a freed tensor of `previous` bytes held on `tier`.
fn fresh_over_old_bytes(m: &MemoryManager, tier: Tier, previous: &[u8]) -> TensorHandle {
    let old = m
        .allocate(previous.len() as u64, TensorKind::Scratch, 1)
        .unwrap();
    m.write(old, 0, previous).unwrap();
    if tier != Tier::Host {
        only_on(m, old, tier);
    }
    m.deallocate(old).unwrap();
    m.allocate_on(previous.len() as u64, TensorKind::Scratch, 2, tier)
        .unwrap()
}

#[test]

fn a_second_lend_of_a_partly_written_tensor_never_shows_a_previous_owners_bytes() {
    let (second_view, read_back) = bounded("second lend", Duration::from_secs(30), || {
        let m = manager(config([MIB, 8 * MIB, 16 * MIB]));
        let old = vec![0xABu8; 8192];
        let h = fresh_over_old_bytes(&m, Tier::Host, &old);
        let pin = m.pin(h, Tier::Host).unwrap();
        pin.with_bytes_mut(0, 4096, |b| b.fill(1)).unwrap();
        let second_view = pin.with_bytes_mut(4096, 4096, |b| b.to_vec()).unwrap();
        let mut read_back = vec![0u8; 4096];
        drop(pin);
        let pin = m.pin(h, Tier::Host).unwrap();
        pin.read(4096, &mut read_back).unwrap();
        (second_view, read_back)
    });
    assert!(
        !second_view.contains(&0xAB) && !read_back.contains(&0xAB),
        "bytes 4096..8192 of a fresh tensor were never written by it; a lend of them showed \
         {} previous-owner bytes (0xAB) and a pinned read {}",
        second_view.iter().filter(|&&b| b == 0xAB).count(),
        read_back.iter().filter(|&&b| b == 0xAB).count()
    );
}

#[test]
fn under_zero_on_free_no_lend_or_read_shows_a_previous_owners_bytes() {
    bounded("zero on free lends", Duration::from_secs(30), || {
        let mut c = config([MIB, 8 * MIB, 16 * MIB]);
        c.zero_on_free = true;
        let m = manager(c);
        for tier in [Tier::Device, Tier::Host] {
            let h = fresh_over_old_bytes(&m, tier, &[0xABu8; 8192]);
            let pin = m.pin(h, tier).unwrap();
            match pin.with_bytes_mut(0, 100, |b| b.fill(1)) {
                Ok(()) => {
                    let v = pin.with_bytes_mut(100, 8092, |b| b.to_vec()).unwrap();
                    assert!(!v.contains(&0xAB), "{tier}: second lend");
                    let mut buf = vec![0u8; 8192];
                    pin.read(0, &mut buf).unwrap();
                    assert!(!buf.contains(&0xAB), "{tier}: read");
                }
                Err(ManagerError::InvalidConfig(_)) => {}
                Err(e) => panic!("{tier}: {e:?}"),
            }
            drop(pin);
            m.deallocate(h).unwrap();
        }
        assert_quiet(&m);
    });
}

#[test]
fn lends_of_never_written_tensors_on_every_tier_show_zeros_or_are_refused_unwritten() {
    bounded("lends on every tier", Duration::from_secs(30), || {
        let m = manager(config([MIB, 8 * MIB, 16 * MIB]));
        for tier in Tier::ALL {
            let h = fresh_over_old_bytes(&m, tier, &[0xCDu8; 64 * 1024]);
            let pin = m.pin(h, tier);
            let pin = match (tier, pin) {
                (_, Ok(p)) => p,
                (t, Err(e)) => panic!("{t}: pin of a never-written tensor: {e:?}"),
            };
            match pin.with_ranges_mut(&[(0, 4096), (8192, 0), (60_000, 5536)], |v| {
                v.iter().map(|x| x.to_vec()).collect::<Vec<_>>()
            }) {
                Ok(views) => {
                    assert_eq!(views[1].len(), 0);
                    for v in &views {
                        assert!(v.iter().all(|&b| b == 0), "{tier}: a lent view not zero");
                    }
                }
                Err(ManagerError::InvalidConfig(_)) => {
                    // Refused: the tensor stays never written.
                    let mut b = [0u8; 1];
                    let r = m.read(h, 0, &mut b);
                    assert!(
                        matches!(r, Err(ManagerError::Uninitialized { .. })),
                        "{tier}: after a refused lend: {r:?}"
                    );
                }
                Err(e) => panic!("{tier}: {e:?}"),
            }
            drop(pin);
            m.deallocate(h).unwrap();
        }
        assert_quiet(&m);
    });
}

// ---- A tier below that fails ends the wait at once. ----

#[test]
fn a_failing_tier_below_ends_a_reservation_at_once_and_loses_nothing() {
    let (elapsed, r) = bounded("failing below", Duration::from_secs(30), || {
        let (m, _device, host) =
            faulty_manager([256 * KIB, 8 * MIB, 16 * MIB], Duration::from_secs(3));
        let ys: Vec<_> = (0..4)
            .map(|i| {
                let h = host_tensor(&m, TensorKind::Weight, 64 * KIB, i);
                only_on(&m, h, Tier::Device);
                h
            })
            .collect();
        let x = host_tensor(&m, TensorKind::Weight, 64 * KIB, 9);
        host.add(FaultRule::always(IoPoint::Write, FaultKind::Eio));
        let started = Instant::now();
        let r = m.pin(x, Tier::Device).map(drop);
        let elapsed = started.elapsed();
        host.clear();
        for (i, y) in ys.iter().enumerate() {
            assert_eq!(
                common::read_all(&m, *y, 64 * KIB as usize),
                pattern(i as u64, 64 * KIB as usize)
            );
        }
        assert_quiet(&m);
        (elapsed, r)
    });
    assert!(r.is_err(), "every write-back to the host fails: {r:?}");
    assert!(
        elapsed < Duration::from_millis(1000),
        "the tier below fails, yet the pin took {elapsed:?} (wait bound 3 s): {r:?}"
    );
}

// ---- One deadline per call: a zero wait over slow tiers, many threads. ----

#[test]
fn with_no_wait_every_call_ends_within_its_own_io_over_slow_tiers() {
    let (worst, worst_op, errors) = bounded("zero wait storm", Duration::from_secs(120), || {
        let caps = [512 * KIB, MIB, 16 * MIB];
        let (m, device, host) = faulty_manager(caps, Duration::ZERO);
        let slow = FaultKind::Slow(Duration::from_millis(2));
        device.add(FaultRule::always(IoPoint::Write, slow));
        host.add(FaultRule::always(IoPoint::Write, slow));
        let shared: Vec<_> = (0..12)
            .map(|i| host_tensor(&m, TensorKind::Weight, 48 * KIB + i * 4096, i))
            .collect();
        let worst = Mutex::new((Duration::ZERO, String::new()));
        let errors = AtomicU64::new(0);
        std::thread::scope(|s| {
            for t in 0..6u64 {
                let (m, shared, worst, errors) = (&m, &shared, &worst, &errors);
                s.spawn(move || {
                    let mut x = t * 7919 + 1;
                    for _ in 0..150 {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let i = (x % shared.len() as u64) as usize;
                        let h = shared[i];
                        let tier = Tier::ALL[(x >> 8) as usize % 3];
                        let started = Instant::now();
                        let (op, r) = match (x >> 16) % 5 {
                            0 => (
                                "pin",
                                m.pin(h, tier).map(|p| {
                                    std::thread::sleep(Duration::from_millis(1));
                                    drop(p)
                                }),
                            ),
                            1 => ("swap_out", m.swap_out(h, tier).map(drop)),
                            2 => {
                                let mut b = vec![0u8; 4096];
                                ("read", m.read(h, 0, &mut b))
                            }
                            3 => ("evict", m.evict(tier, 128 * KIB).map(drop)),
                            _ => ("compact", m.compact_tier(tier).map(drop)),
                        };
                        let took = started.elapsed();
                        match r {
                            Ok(())
                            | Err(ManagerError::OutOfMemory { .. })
                            | Err(ManagerError::Busy { .. }) => {}
                            Err(e) => panic!("{op} on {tier}: {e:?}"),
                        }
                        if r.is_err() {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                        let mut w = worst.lock().unwrap();
                        if took > w.0 {
                            *w = (took, format!("{op} on {tier}"));
                        }
                    }
                });
            }
        });
        device.clear();
        host.clear();
        for (i, h) in shared.iter().enumerate() {
            let len = (48 * KIB + i as u64 * 4096) as usize;
            assert_eq!(common::read_all(&m, *h, len), pattern(i as u64, len));
        }
        assert_quiet(&m);
        let (worst, op) = worst.into_inner().unwrap();
        (worst, op, errors.into_inner())
    });
    eprintln!("zero wait storm: worst call {worst:?} ({worst_op}), {errors} refused");
    assert!(
        worst < Duration::from_secs(2),
        "with max_call_wait 0 and 2 ms per tier write, one call ({worst_op}) took {worst:?}"
    );
}

// ---- Swap-outs racing pins, writes, reads and frees: the ledger comes back to baseline. ----

/// Version `v` of tensor `i`: the version in the first 8 bytes, a pattern after.
fn version(i: usize, v: u64, len: usize) -> Vec<u8> {
    let mut b = pattern(i as u64 * 1_000_003 + v, len);
    b[..8].copy_from_slice(&v.to_le_bytes());
    b
}

fn check_version(i: usize, bytes: &[u8], what: &str) {
    let v = u64::from_le_bytes(bytes[..8].try_into().unwrap());
    let want = version(i, v, bytes.len());
    assert!(
        bytes == want.as_slice(),
        "{what}: tensor {i} is not a whole version (v{v})"
    );
}

fn swap_storm(zero_on_free: bool, threads: u64, seconds: u64) {
    let mut c = config([MIB, 2 * MIB, 16 * MIB]);
    c.zero_on_free = zero_on_free;
    c.max_call_wait = Duration::from_millis(300);
    // Over-committed: each kind's budgets are tight and the disk's is small.
    for k in [TensorKind::Weight, TensorKind::KvCache] {
        set_budget(&mut c, Tier::Device, k, 384 * KIB);
        set_budget(&mut c, Tier::Host, k, 768 * KIB);
        set_budget(&mut c, Tier::Disk, k, 2 * MIB);
    }
    let m = manager(c);
    let baseline: Vec<_> = Tier::ALL
        .iter()
        .map(|&t| m.tier_usage(t).in_use_bytes)
        .collect();
    let kinds = [TensorKind::Weight, TensorKind::KvCache];
    let lens: Vec<usize> = (0..12).map(|i| 40_000 + i * 9_000).collect();
    // Tensor i is written only by thread i % threads; every thread reads every tensor.
    let shared: Vec<Mutex<TensorHandle>> = (0..12)
        .map(|i| {
            let h = m.allocate(lens[i] as u64, kinds[i % 2], i as u64).unwrap();
            m.write(h, 0, &version(i, 0, lens[i])).unwrap();
            Mutex::new(h)
        })
        .collect();
    let versions: Vec<AtomicU64> = (0..12).map(|_| AtomicU64::new(0)).collect();
    let until = Instant::now() + Duration::from_secs(seconds);
    let unexpected = Mutex::new(Vec::<String>::new());
    std::thread::scope(|s| {
        for t in 0..threads {
            let (m, shared, versions, lens, unexpected) =
                (&m, &shared, &versions, &lens, &unexpected);
            s.spawn(move || {
                let mut x = t * 104_729 + 17;
                while Instant::now() < until {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let i = (x % 12) as usize;
                    let h = *shared[i].lock().unwrap();
                    let tier = Tier::ALL[(x >> 8) as usize % 3];
                    let r = match (x >> 16) % 9 {
                        0 | 1 => m.swap_out(h, tier).map(drop),
                        2 => m.pin(h, tier).and_then(|p| {
                            let mut b = vec![0u8; lens[i]];
                            let r = p.read(0, &mut b);
                            if r.is_ok() {
                                check_version(i, &b, "pinned read");
                            }
                            r
                        }),
                        3 | 4 => {
                            let mut b = vec![0u8; lens[i]];
                            let r = m.read(h, 0, &mut b);
                            if r.is_ok() {
                                check_version(i, &b, "plain read");
                            }
                            r
                        }
                        5 if i as u64 % threads == t => {
                            let v = versions[i].fetch_add(1, Ordering::Relaxed) + 1;
                            m.write(h, 0, &version(i, v, lens[i]))
                        }
                        6 if i as u64 % threads == t => {
                            // Free and re-create it with its current bytes.
                            let mut b = vec![0u8; lens[i]];
                            m.read(h, 0, &mut b).and_then(|()| {
                                let mut slot = shared[i].lock().unwrap();
                                m.deallocate(*slot)?;
                                let n = m.allocate(lens[i] as u64, kinds[i % 2], i as u64)?;
                                *slot = n;
                                m.write(n, 0, &b)
                            })
                        }
                        7 => m.evict(tier, 100 * KIB).map(drop),
                        8 => m.compact_tier(tier).map(drop),
                        _ => Ok(()),
                    };
                    match r {
                        Ok(())
                        | Err(ManagerError::OutOfMemory { .. })
                        | Err(ManagerError::Busy { .. })
                        | Err(ManagerError::Pinned { .. })
                        | Err(ManagerError::Stale { .. }) => {}
                        Err(e) => unexpected.lock().unwrap().push(format!("{e:?}")),
                    }
                }
            });
        }
    });
    let unexpected = unexpected.into_inner().unwrap();
    assert!(
        unexpected.is_empty(),
        "{} unexpected errors, e.g. {:?}",
        unexpected.len(),
        &unexpected[..unexpected.len().min(3)]
    );
    assert_quiet(&m);
    let stats = m.stats();
    assert_eq!(stats.charged, stats.resident);
    for (i, slot) in shared.iter().enumerate() {
        let h = *slot.lock().unwrap();
        let mut b = vec![0u8; lens[i]];
        match m.read(h, 0, &mut b) {
            Ok(()) => check_version(i, &b, "final read"),
            // Freed and not re-created (its allocation ran out of room): nothing to read.
            Err(ManagerError::Stale { .. }) => continue,
            Err(e) => panic!("final read of {i}: {e:?}"),
        }
        m.deallocate(h).unwrap();
    }
    let after: Vec<_> = Tier::ALL
        .iter()
        .map(|&t| m.tier_usage(t).in_use_bytes)
        .collect();
    assert_eq!(
        after, baseline,
        "arena bytes in use after every tensor was freed"
    );
    let stats = m.stats();
    for t in Tier::ALL {
        assert_eq!(stats.charged.tier_total(t), 0, "{t}: bytes still charged");
    }
}

#[test]
fn swap_outs_racing_pins_writes_reads_and_frees_leave_the_ledger_at_baseline() {
    bounded("swap storm", Duration::from_secs(120), || {
        swap_storm(false, 4, 4)
    });
}

#[test]
fn under_zero_on_free_the_swap_storm_leaves_the_ledger_at_baseline() {
    bounded("swap storm, zero on free", Duration::from_secs(120), || {
        swap_storm(true, 4, 4)
    });
}
