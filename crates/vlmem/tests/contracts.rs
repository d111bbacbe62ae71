//! The manager's documented promises, each tried the way an attacker would: readers during
//! lends and pinned writes, allocators of every kind in one process, zeroing on free over
//! every disk unit, checkpoint extents swapped out, a full disk under many threads, a plan
//! replaced by a shorter one, oversized requests, and callers' closures that panic.

mod common;

use common::{KIB, MIB, config, pattern};
use std::sync::Barrier;
use std::time::{Duration, Instant};
use vlmem::{ManagerConfig, ManagerError, MemoryManager, StepArena, TensorKind, Tier};

fn host_tensor(m: &MemoryManager, len: usize, seed: u64) -> vlmem::TensorHandle {
    let h = m
        .allocate(len as u64, TensorKind::Activation, seed)
        .unwrap();
    m.write(h, 0, &pattern(seed, len)).unwrap();
    h
}

// ---- Readers during a lend or a pinned write: they wait, then read the new bytes. ----

#[test]
fn a_lend_locks_only_its_slices_and_readers_of_them_wait_for_the_new_bytes() {
    let m = MemoryManager::new(config([MIB, 8 * MIB, 16 * MIB])).unwrap();
    let arena = StepArena::new(&m, TensorKind::Activation, Tier::Host, 64 * KIB).unwrap();
    let (s0, s1, s2) = (
        arena.alloc(4 * KIB).unwrap(),
        arena.alloc(4 * KIB).unwrap(),
        arena.alloc(4 * KIB).unwrap(),
    );
    arena.write(&s1, 0, &[7u8; 4096]).unwrap();
    let lent = Barrier::new(2);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            arena
                .with_f32(&[s0, s2], |views| {
                    lent.wait();
                    std::thread::sleep(Duration::from_millis(300));
                    views[0].fill(1.5);
                    views[1].fill(2.5);
                })
                .unwrap();
        });
        lent.wait();
        // A slice between the lent ones is not lent: it reads at once.
        let started = Instant::now();
        let mut buf = vec![0u8; 4096];
        arena.read(&s1, 0, &mut buf).unwrap();
        assert_eq!(buf, vec![7u8; 4096]);
        assert!(
            started.elapsed() < Duration::from_millis(250),
            "a read of a slice outside the lend waited {:?}",
            started.elapsed()
        );
        // A lent slice: the read waits for the lend and sees what it left.
        arena.read(&s0, 0, &mut buf).unwrap();
        let want: Vec<u8> = std::iter::repeat_n(1.5f32.to_le_bytes(), 1024)
            .flatten()
            .collect();
        assert_eq!(buf, want, "the read did not see the lend's bytes");
        arena.read(&s2, 0, &mut buf).unwrap();
        assert_eq!(&buf[..4], &2.5f32.to_le_bytes());
    });
}

#[test]
fn reads_racing_pinned_writes_wait_and_see_whole_writes() {
    const LEN: usize = 64 * 1024;
    const ROUNDS: u64 = 300;
    let m = MemoryManager::new(config([MIB, 8 * MIB, 16 * MIB])).unwrap();
    let h = m.allocate(LEN as u64, TensorKind::Scratch, 1).unwrap();
    m.write(h, 0, &pattern(0, LEN)).unwrap();
    let writer_pin = m.pin(h, Tier::Host).unwrap();
    let reader_pin = m.pin(h, Tier::Host).unwrap();
    let versions: Vec<Vec<u8>> = (0..=ROUNDS).map(|i| pattern(i, LEN)).collect();
    std::thread::scope(|scope| {
        scope.spawn(|| {
            for v in versions.iter().skip(1) {
                writer_pin.write(0, v).unwrap();
            }
        });
        scope.spawn(|| {
            for _ in 0..ROUNDS {
                let mut buf = vec![0u8; LEN];
                m.read(h, 0, &mut buf)
                    .expect("MemoryManager::read during a pinned write");
                assert!(versions.contains(&buf), "a read saw a torn write");
            }
        });
        for _ in 0..ROUNDS {
            let mut buf = vec![0u8; LEN];
            reader_pin
                .read(0, &mut buf)
                .expect("PinGuard::read during a pinned write");
            assert!(versions.contains(&buf), "a pinned read saw a torn write");
        }
    });
    drop((writer_pin, reader_pin));
    m.deallocate(h).unwrap();
}

#[test]
fn a_read_outwaiting_the_call_bound_is_a_typed_busy_error() {
    let mut c = config([MIB, 8 * MIB, 16 * MIB]);
    c.max_call_wait = Duration::from_millis(100);
    let m = MemoryManager::new(c).unwrap();
    let h = host_tensor(&m, 4096, 3);
    let pin = m.pin(h, Tier::Host).unwrap();
    let lent = Barrier::new(2);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            pin.with_bytes_mut(0, 4096, |_| {
                lent.wait();
                std::thread::sleep(Duration::from_millis(600));
            })
            .unwrap();
        });
        lent.wait();
        let started = Instant::now();
        let mut buf = [0u8; 16];
        match m.read(h, 0, &mut buf) {
            Err(ManagerError::Busy { id: 3, waited_ms }) => assert!(waited_ms >= 90),
            other => panic!("expected Busy after the bound, got {other:?}"),
        }
        assert!(started.elapsed() < Duration::from_millis(500));
    });
    drop(pin);
    m.deallocate(h).unwrap();
}

#[test]
fn a_pin_sees_bytes_written_through_another_pin_on_every_tier() {
    let m = MemoryManager::new(config([MIB, 8 * MIB, 16 * MIB])).unwrap();
    for tier in Tier::ALL {
        let len = 64 * KIB as usize;
        let h = m
            .allocate_on(
                len as u64,
                TensorKind::Scratch,
                40 + tier.index() as u64,
                tier,
            )
            .unwrap();
        let early = m.pin(h, tier).unwrap();
        let writer = m.pin(h, tier).unwrap();
        writer.write(0, &pattern(9, len)).unwrap();
        drop(writer);
        let mut buf = vec![0u8; len];
        early
            .read(0, &mut buf)
            .unwrap_or_else(|e| panic!("a pin held on {tier} before the write: {e}"));
        assert_eq!(buf, pattern(9, len));
        assert_eq!(early.with_bytes(|b| b.to_vec()).unwrap(), pattern(9, len));
        drop(early);
        m.deallocate(h).unwrap();
    }
}

#[test]
fn pins_held_across_pinned_writes_on_the_disk_never_read_uninitialized() {
    // Many rounds of: a fresh disk tensor, pins taken before its first write, writes
    // through one pin while others read through theirs.
    let m = MemoryManager::new(config([MIB, 4 * MIB, 64 * MIB])).unwrap();
    for round in 0..200u64 {
        let len = 64 * KIB as usize;
        let h = m
            .allocate_on(len as u64, TensorKind::Scratch, round, Tier::Disk)
            .unwrap();
        let pins: Vec<_> = (0..3).map(|_| m.pin(h, Tier::Disk).unwrap()).collect();
        let wrote = Barrier::new(3);
        std::thread::scope(|scope| {
            scope.spawn(|| {
                pins[0].write(0, &pattern(round, len)).unwrap();
                wrote.wait();
                pins[0].write(0, &pattern(round + 1, len)).unwrap();
            });
            for p in &pins[1..] {
                let wrote = &wrote;
                scope.spawn(move || {
                    wrote.wait();
                    let mut buf = vec![0u8; len];
                    p.read(0, &mut buf).expect("a held disk pin read");
                    assert!(buf == pattern(round, len) || buf == pattern(round + 1, len));
                });
            }
        });
        drop(pins);
        m.deallocate(h).unwrap();
    }
}

// ---- Allocator identity: one source of ids for every allocator in the process. ----

#[test]
fn allocators_of_every_kind_never_share_an_id() {
    use vlmem_core::OffsetAllocator as _;
    let mut ids = std::collections::HashSet::new();
    for _ in 0..40 {
        let first_fit = vlmem_tier::FirstFitAllocator::new(MIB, 4096).unwrap();
        let slab = vlmem_alloc::SlabPool::new(vlmem_alloc::SlabConfig {
            block_bytes: 4096,
            capacity_blocks: 4,
            cache_blocks: 1,
            caches: 1,
            kind: None,
        })
        .unwrap();
        let buddy = vlmem_alloc::BuddyAllocator::new(vlmem_alloc::BuddyConfig {
            capacity_bytes: MIB,
            min_block_bytes: 4096,
            kind: None,
        })
        .unwrap();
        for (name, block) in [
            ("first fit", first_fit.allocate(1).unwrap()),
            ("slab", slab.allocate(1).unwrap()),
            ("buddy", buddy.allocate(1).unwrap()),
        ] {
            assert!(
                ids.insert(block.allocator_id()),
                "the {name} allocator reused id {}",
                block.allocator_id()
            );
        }
    }
}

/// Every configuration `MemoryManager::new` serves, built in one process.
fn every_configuration() -> Vec<(&'static str, ManagerConfig)> {
    let mut out = Vec::new();
    let base = || ManagerConfig::with_capacities(4 * MIB, 8 * MIB, 64 * MIB);
    let mut c = base();
    c.disk.preallocate = false;
    out.push(("default", c));
    let mut c = base();
    c.disk.preallocate = false;
    c.kv_block_bytes = Some(4096);
    out.push(("kv slab", c));
    let mut c = base();
    c.disk.preallocate = false;
    c.kv_block_bytes = Some(4096);
    c.zero_on_free = true;
    out.push(("kv slab, zero on free", c));
    let mut c = base();
    c.disk.preallocate = false;
    c.zero_on_free = true;
    c.disk.unit_bytes = 64 * KIB;
    out.push(("zero on free, 64 KiB disk units", c));
    let mut c = base();
    c.disk.preallocate = false;
    c.kv_block_bytes = Some(64 * KIB);
    c.disk.encrypt = true;
    out.push(("64 KiB KV blocks, encrypted disk", c));
    out
}

#[test]
fn managers_of_every_configuration_in_one_process_free_everything() {
    let managers: Vec<_> = every_configuration()
        .into_iter()
        .map(|(name, c)| (name, MemoryManager::new(c).unwrap()))
        .collect();
    let baseline: Vec<_> = managers
        .iter()
        .map(|(_, m)| Tier::ALL.map(|t| m.tier_usage(t).in_use_bytes))
        .collect();
    // Interleave work across the managers, so blocks of every allocator are live at once.
    let mut live = Vec::new();
    for (i, (_, m)) in managers.iter().enumerate() {
        for (kind, len) in [
            (TensorKind::Weight, 64 * KIB),
            (TensorKind::KvCache, 4 * KIB),
            (TensorKind::Weight, 100 * KIB + 3),
        ] {
            let h = m.allocate(len, kind, i as u64).unwrap();
            m.write(h, 0, &pattern(i as u64, len as usize)).unwrap();
            live.push((i, h, len));
        }
    }
    for &(i, h, _) in &live {
        managers[i].1.swap_out(h, Tier::Host).unwrap();
    }
    for (i, h, len) in live {
        let (name, m) = &managers[i];
        let mut buf = vec![0u8; len as usize];
        m.read(h, 0, &mut buf).unwrap();
        assert_eq!(buf, pattern(i as u64, len as usize), "{name}");
        m.deallocate(h).unwrap();
    }
    for ((name, m), before) in managers.iter().zip(baseline) {
        for t in Tier::ALL {
            assert_eq!(
                m.tier_usage(t).in_use_bytes,
                before[t.index()],
                "{name}: the {t} arena kept freed blocks"
            );
            m.compact_tier(t)
                .unwrap_or_else(|e| panic!("{name}: compacting {t}: {e}"));
        }
        let stats = m.stats();
        assert_eq!(stats.charged, stats.resident, "{name}");
    }
}

#[test]
fn a_freed_weight_leaves_the_split_host_arena() {
    let mut c = ManagerConfig::with_capacities(4 * MIB, 8 * MIB, 64 * MIB);
    c.disk.preallocate = false;
    c.kv_block_bytes = Some(4096);
    let m = MemoryManager::new(c).unwrap();
    let before = m.tier_usage(Tier::Host).in_use_bytes;
    let h = m.allocate(64 * KIB, TensorKind::Weight, 1).unwrap();
    m.write(h, 0, &pattern(1, 64 * KIB as usize)).unwrap();
    m.deallocate(h).unwrap();
    assert_eq!(m.tier_usage(Tier::Host).in_use_bytes, before);
    m.compact_tier(Tier::Host).unwrap();
}

// ---- Zeroing on free: blocks of any size leave every tier. ----

#[test]
fn zero_on_free_frees_disk_blocks_of_every_size_and_unit() {
    for unit_bytes in [4 * KIB, 64 * KIB, MIB, 4 * MIB] {
        let mut c = config([MIB, 8 * MIB, 32 * MIB]);
        c.zero_on_free = true;
        c.disk.unit_bytes = unit_bytes;
        let m = MemoryManager::new(c).unwrap();
        let before = m.tier_usage(Tier::Disk).in_use_bytes;
        // Far more than the disk holds in all: a leaked block would end in OutOfMemory.
        for round in 0..12u64 {
            for len in [64 * KIB + 1, 128 * KIB, MIB, 3 * MIB + 5] {
                let h = m.allocate(len, TensorKind::Weight, round).unwrap();
                m.write(h, 0, &pattern(round, len as usize)).unwrap();
                assert_eq!(m.swap_out(h, Tier::Host).unwrap(), len);
                m.deallocate(h)
                    .unwrap_or_else(|e| panic!("unit {unit_bytes}, {len} B: {e}"));
            }
        }
        assert_eq!(
            m.tier_usage(Tier::Disk).in_use_bytes,
            before,
            "unit {unit_bytes}: freed disk blocks stayed reserved"
        );
    }
}

// ---- Checkpoint extents: the file is the disk copy, whatever is swapped out. ----

#[test]
fn swapping_out_an_extent_keeps_the_file_as_its_disk_copy() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("weights.bin");
    let bytes = pattern(5, 102_400);
    std::fs::write(&path, &bytes).unwrap();
    let m = MemoryManager::new(config([MIB, 8 * MIB, 16 * MIB])).unwrap();
    let disk_before = m.tier_usage(Tier::Disk).in_use_bytes;
    let h = m
        .register_extent(&path, 0, 102_400, TensorKind::Weight, 5)
        .unwrap();
    drop(m.pin(h, Tier::Host).unwrap());
    assert_eq!(m.swap_out(h, Tier::Disk).unwrap(), 0, "the file copy went");
    assert_eq!(m.residency(h).unwrap().0, vec![Tier::Host, Tier::Disk]);
    assert_eq!(m.swap_out(h, Tier::Host).unwrap(), 102_400);
    assert_eq!(m.residency(h).unwrap().0, vec![Tier::Disk]);
    let stats = m.stats();
    assert_eq!(stats.charged.get(Tier::Disk, TensorKind::Weight), 0);
    assert_eq!(m.tier_usage(Tier::Disk).in_use_bytes, disk_before);
    let mut buf = vec![0u8; 102_400];
    m.read(h, 0, &mut buf).unwrap();
    assert_eq!(buf, bytes);
    // Evicting the whole disk tier never drops an extent either.
    m.evict(Tier::Disk, u64::MAX).unwrap();
    m.read(h, 0, &mut buf).unwrap();
    assert_eq!(buf, bytes);
    m.deallocate(h).unwrap();
}

// ---- One deadline per public call, however deep the reservations nest. ----

#[test]
fn a_full_disk_storm_bounds_every_call_and_finishes() {
    const MAX_WAIT: Duration = Duration::from_millis(300);
    // The call's own I/O (a few write-backs of at most 224 KiB) on a loaded debug build.
    const IO_SLACK: Duration = Duration::from_millis(1700);
    let mut c = config([2 * MIB, 4 * MIB, 6 * MIB]);
    for (tier, mib) in [(Tier::Device, 1), (Tier::Host, 2), (Tier::Disk, 3)] {
        for kind in [TensorKind::Weight, TensorKind::KvCache] {
            c.budgets.bytes[tier.index()][kind.index()] = mib * MIB;
        }
    }
    c.shards = 8;
    c.max_call_wait = MAX_WAIT;
    let m = MemoryManager::new(c).unwrap();
    let finished = std::sync::atomic::AtomicUsize::new(0);
    let worst = std::sync::Mutex::new((Duration::ZERO, String::new()));
    let started = Instant::now();
    std::thread::scope(|scope| {
        for t in 0..8u64 {
            let (m, finished, worst) = (&m, &finished, &worst);
            scope.spawn(move || {
                let mut rng = t.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
                let mut next = move || {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    rng
                };
                let mut mine: Vec<(vlmem::TensorHandle, u64, u64)> = Vec::new();
                let note = |what: &str, took: Duration| {
                    let mut w = worst.lock().unwrap();
                    if took > w.0 {
                        *w = (took, what.to_string());
                    }
                };
                for op in 0..150u64 {
                    if mine.len() < 8 || next() % 3 == 0 {
                        let len = (64 + next() % 161) * KIB;
                        let kind = if next() % 2 == 0 {
                            TensorKind::Weight
                        } else {
                            TensorKind::KvCache
                        };
                        let seed = t * 1000 + op;
                        let at = Instant::now();
                        let made = m.allocate(len, kind, seed);
                        note("allocate", at.elapsed());
                        if let Ok(h) = made {
                            let at = Instant::now();
                            let wrote = m.write(h, 0, &pattern(seed, len as usize));
                            note("write", at.elapsed());
                            if wrote.is_ok() {
                                mine.push((h, len, seed));
                            } else {
                                m.deallocate(h).unwrap();
                            }
                        }
                        if mine.len() > 8 {
                            let (h, _, _) = mine.remove(0);
                            let at = Instant::now();
                            m.deallocate(h).unwrap();
                            note("deallocate", at.elapsed());
                        }
                    }
                    if mine.is_empty() {
                        continue;
                    }
                    let (h, len, seed) = mine[(next() % mine.len() as u64) as usize];
                    let tier = if next() % 2 == 0 {
                        Tier::Device
                    } else {
                        Tier::Host
                    };
                    let at = Instant::now();
                    let pinned = m.pin(h, tier);
                    note("pin", at.elapsed());
                    match pinned {
                        Ok(g) => {
                            let mut buf = vec![0u8; len as usize];
                            g.read(0, &mut buf).unwrap();
                            assert_eq!(buf, pattern(seed, len as usize), "a pinned read");
                        }
                        Err(ManagerError::OutOfMemory { .. } | ManagerError::Busy { .. }) => {}
                        Err(e) => panic!("pin: {e}"),
                    }
                }
                for (h, len, seed) in mine {
                    let mut buf = vec![0u8; len as usize];
                    m.read(h, 0, &mut buf).unwrap();
                    assert_eq!(buf, pattern(seed, len as usize), "lost or corrupted");
                    m.deallocate(h).unwrap();
                }
                finished.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            });
        }
        // A watchdog: the storm must end, not hang.
        while finished.load(std::sync::atomic::Ordering::Relaxed) < 8 {
            assert!(
                started.elapsed() < Duration::from_secs(120),
                "the storm made no progress for 120 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    let (took, what) = worst.into_inner().unwrap();
    assert!(
        took <= MAX_WAIT + IO_SLACK,
        "a {what} took {took:?}, over the {MAX_WAIT:?} bound plus {IO_SLACK:?} of its own I/O"
    );
    let audit = m.audit();
    assert_eq!((audit.overlaps, audit.busy_entries, audit.pins), (0, 0, 0));
    assert!(audit.charged_matches_resident);
    assert_eq!(m.stats().tensors, 0);
}

// ---- The access plan: a new, shorter plan. ----

#[test]
fn a_shorter_access_plan_keeps_eviction_working() {
    let mut c = config([MIB, 8 * MIB, 16 * MIB]);
    c.budgets.bytes[Tier::Host.index()][TensorKind::Weight.index()] = 4 * 64 * KIB;
    let m = MemoryManager::new(c).unwrap();
    let w: Vec<_> = (0..10u64)
        .map(|i| {
            let h = m.allocate(64 * KIB, TensorKind::Weight, i).unwrap();
            m.write(h, 0, &pattern(i, 64 * KIB as usize)).unwrap();
            h
        })
        .collect();
    assert_eq!(m.residency(w[0]).unwrap().0, vec![Tier::Disk]);
    m.set_access_plan(&w);
    drop(m.pin(w[9], Tier::Host).unwrap());
    m.set_access_plan(&w[6..8]);
    drop(m.pin(w[0], Tier::Host).unwrap());
    let mut buf = vec![0u8; 64 * KIB as usize];
    m.read(w[0], 0, &mut buf).unwrap();
    assert_eq!(buf, pattern(0, 64 * KIB as usize));
    // Every weight is still whole, whatever was evicted for whom.
    for (i, &h) in w.iter().enumerate() {
        m.read(h, 0, &mut buf).unwrap();
        assert_eq!(buf, pattern(i as u64, 64 * KIB as usize));
    }
}

// ---- More than a tier can ever hold. ----

#[test]
fn more_than_the_arena_is_too_large_even_under_a_larger_budget() {
    let m = MemoryManager::new(config([MIB, 8 * MIB, 16 * MIB])).unwrap();
    for tier in [Tier::Device, Tier::Host] {
        m.set_budget(tier, TensorKind::Weight, 1 << 40);
        let capacity = m.tier_usage(tier).capacity_bytes;
        match m.allocate_on(capacity + 4 * KIB, TensorKind::Weight, 1, tier) {
            Err(ManagerError::TooLarge { budget_bytes, .. }) => {
                assert_eq!(budget_bytes, capacity)
            }
            other => panic!("{tier}: expected TooLarge, got {other:?}"),
        }
    }
}

// ---- Every closure a caller hands in may panic. ----

fn quiet_panic<R>(f: impl FnOnce() -> R) -> std::thread::Result<R> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
}

#[test]
fn a_panic_in_a_callers_closure_releases_the_tensor() {
    let m = MemoryManager::new(config([MIB, 8 * MIB, 16 * MIB])).unwrap();
    let h = host_tensor(&m, 4096, 11);
    let pin = m.pin(h, Tier::Host).unwrap();
    assert!(quiet_panic(|| pin.with_bytes_mut(0, 4096, |_| panic!("in a lend"))).is_err());
    assert!(quiet_panic(|| pin.with_bytes(|_| panic!("in a read lend"))).is_err());
    assert!(
        quiet_panic(|| pin.with_ranges_mut(&[(0, 16), (32, 16)], |_| panic!("in ranges"))).is_err()
    );
    // Nothing stays locked: reads, writes and lends of the same bytes go on at once.
    let started = Instant::now();
    let mut buf = vec![0u8; 4096];
    m.read(h, 0, &mut buf).unwrap();
    pin.write(0, &[1u8; 16]).unwrap();
    pin.with_bytes_mut(0, 16, |b| b.fill(2)).unwrap();
    pin.read(0, &mut buf[..16]).unwrap();
    assert_eq!(&buf[..16], &[2u8; 16]);
    assert!(started.elapsed() < Duration::from_millis(500));
    drop(pin);
    let audit = m.audit();
    assert_eq!((audit.busy_entries, audit.pins), (0, 0));
    m.deallocate(h).unwrap();

    let arena = StepArena::new(&m, TensorKind::Activation, Tier::Host, 16 * KIB).unwrap();
    let s = arena.alloc(64).unwrap();
    assert!(quiet_panic(|| arena.with_f32(&[s], |_| panic!("in an arena view"))).is_err());
    arena.with_f32(&[s], |v| v[0].fill(3.0)).unwrap();
    let mut four = [0u8; 4];
    arena.read(&s, 0, &mut four).unwrap();
    assert_eq!(four, 3.0f32.to_le_bytes());
}

#[test]
fn overlapping_ranges_are_not_lent_at_once() {
    let m = MemoryManager::new(config([MIB, 8 * MIB, 16 * MIB])).unwrap();
    let h = host_tensor(&m, 4096, 12);
    let pin = m.pin(h, Tier::Host).unwrap();
    assert!(matches!(
        pin.with_ranges_mut(&[(0, 64), (32, 64)], |_| ()),
        Err(ManagerError::InvalidConfig(_))
    ));
    let lens = pin
        .with_ranges_mut(&[(128, 8), (0, 16)], |v| {
            v[0].fill(8);
            v[1].fill(9);
            (v[0].len(), v[1].len())
        })
        .unwrap();
    assert_eq!(lens, (8, 16));
    let mut buf = [0u8; 136];
    pin.read(0, &mut buf).unwrap();
    assert_eq!(&buf[..16], &[9u8; 16]);
    assert_eq!(&buf[128..136], &[8u8; 8]);
}

// ---- Every configuration value: a working manager or a typed error, never a panic. ----

mod config_values {
    use super::*;
    use proptest::prelude::*;

    /// Counts accepted configurations, so a strategy that only makes refused ones shows.
    pub static ACCEPTED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

    /// A power of two that every tier accepts as a unit or chunk, most of the time.
    fn usual_unit() -> impl Strategy<Value = u64> {
        (12u32..=22).prop_map(|s| 1u64 << s)
    }

    fn any_size() -> impl Strategy<Value = u64> {
        prop_oneof![
            Just(0u64),
            1u64..=64 * MIB,
            (0u32..=26).prop_map(|s| 1u64 << s),
            (10u32..=26).prop_map(|s| (1u64 << s) + 4096),
            Just(u64::MAX),
            Just(u64::MAX / 2 + 1),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

        #[test]
        fn any_manager_config_builds_a_working_manager_or_is_refused(
            device in 0u64..=8 * MIB,
            host in 0u64..=8 * MIB,
            disk in 0u64..=32 * MIB,
            shards in prop_oneof![1 => Just(0usize), 3 => 1usize..=64, 1 => Just(1 << 20)],
            kv_block in proptest::option::of(prop_oneof![3 => Just(4096u64), 1 => any_size()]),
            unit in prop_oneof![3 => usual_unit(), 1 => any_size()],
            chunk in prop_oneof![3 => (22u32..=24).prop_map(|s| 1u64 << s), 1 => any_size()],
            workers in prop_oneof![1 => Just(0usize), 3 => 1usize..=8, 1 => Just(usize::MAX)],
            queued in prop_oneof![1 => Just(0usize), 3 => 1usize..=8],
            batch in prop_oneof![3 => Just(16 * MIB), 1 => any_size()],
            wait_ms in prop_oneof![Just(0u64), 1u64..=50, Just(u64::MAX)],
            budget in any_size(),
            zero_on_free in any::<bool>(),
        ) {
            let mut c = ManagerConfig::with_capacities(device, host, disk);
            c.disk.preallocate = false;
            c.shards = shards;
            c.kv_block_bytes = kv_block;
            c.disk.unit_bytes = unit;
            c.engine.chunk_bytes = chunk;
            c.engine.workers = workers;
            c.engine.max_queued_jobs = queued;
            c.engine.max_batch_bytes = batch;
            c.max_call_wait = Duration::from_millis(wait_ms);
            c.zero_on_free = zero_on_free;
            c.budgets.bytes[Tier::Host.index()][TensorKind::Weight.index()] = budget;
            let Ok(m) = MemoryManager::new(c) else {
                return Ok(());
            };
            ACCEPTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            // An accepted configuration serves: what is written reads back, through a
            // swap-out where the tiers allow one, and everything freed leaves the arenas.
            let before = Tier::ALL.map(|t| m.tier_usage(t).in_use_bytes);
            let bytes = pattern(7, 5000);
            if let Ok(h) = m.allocate(5000, TensorKind::Weight, 7) {
                if m.write(h, 0, &bytes).is_ok() {
                    let _ = m.swap_out(h, Tier::Host);
                    let mut back = vec![0u8; 5000];
                    m.read(h, 0, &mut back).unwrap();
                    prop_assert_eq!(back, bytes);
                }
                m.deallocate(h).unwrap();
            }
            for t in Tier::ALL {
                prop_assert_eq!(m.tier_usage(t).in_use_bytes, before[t.index()]);
            }
        }
    }

    #[test]
    fn the_config_strategy_makes_working_managers_too() {
        any_manager_config_builds_a_working_manager_or_is_refused();
        let accepted = ACCEPTED.load(std::sync::atomic::Ordering::Relaxed);
        assert!(
            accepted >= 10,
            "only {accepted} of 96 configurations were accepted"
        );
    }
}
