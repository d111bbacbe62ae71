use super::*;
use crate::{ManagerConfig, TensorKind};
use std::time::{Duration, Instant};

/// A checkpoint file of `lens` tensors (at odd offsets, so pieces start at every phase)
/// registered in place with a manager whose host tier takes `host_weight_bytes` of weights.
struct Fixture {
    _dir: tempfile::TempDir,
    manager: MemoryManager,
    file: Vec<u8>,
    /// Handle, file offset, length.
    tensors: Vec<(TensorHandle, u64, usize)>,
}

fn fixture(lens: &[usize], host_weight_bytes: u64) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let total: usize = lens.iter().map(|l| l + 123).sum();
    let file: Vec<u8> = (0..total).map(|i| (i * 7 + i / 4093 + 1) as u8).collect();
    let path = dir.path().join("weights.bin");
    std::fs::write(&path, &file).unwrap();
    let mut c = ManagerConfig::with_capacities(0, 8 << 20, 8 << 20);
    c.budgets.bytes[Tier::Host.index()][TensorKind::Weight.index()] = host_weight_bytes;
    let manager = MemoryManager::new(c).unwrap();
    let mut offset = 0u64;
    let tensors = lens
        .iter()
        .enumerate()
        .map(|(i, &len)| {
            offset += 123;
            let h = manager
                .register_extent(&path, offset, len as u64, TensorKind::Weight, i as u64)
                .unwrap();
            let t = (h, offset, len);
            offset += len as u64;
            t
        })
        .collect();
    Fixture {
        _dir: dir,
        manager,
        file,
        tensors,
    }
}

/// Units of `per_unit` tensors each, in file order; tensor `i` streamed when `streamed(i)`.
fn plan(f: &Fixture, per_unit: usize, streamed: impl Fn(usize) -> bool, area_bytes: u64) -> Plan {
    Plan {
        units: f
            .tensors
            .chunks(per_unit)
            .enumerate()
            .map(|(u, chunk)| {
                chunk
                    .iter()
                    .enumerate()
                    .map(|(j, &(handle, file_offset_bytes, len))| Need {
                        handle,
                        len_bytes: len as u64,
                        file_offset_bytes,
                        streamed: streamed(u * per_unit + j),
                    })
                    .collect()
            })
            .collect(),
        area_bytes,
        budget_bytes: 4 << 20,
    }
}

/// What the runner does with one unit: the cursor moves there, each streamed tensor's
/// pieces are taken (the rest read on demand) and every tensor's bytes are checked
/// against the file. Returns the streamed bytes taken from the area.
fn compute_unit(f: &Fixture, ra: &ReadAhead, cursor: &Cursor, u: usize, jitter: u64) -> u64 {
    cursor.begin_unit(u);
    let mut taken = 0;
    for need in &ra.units()[u] {
        let (off, len) = (need.file_offset_bytes as usize, need.len_bytes as usize);
        let want = &f.file[off..off + len];
        let mut got = vec![0u8; len];
        if need.streamed {
            let rest = cursor
                .take_pieces(need.handle, |start, bytes| {
                    got[start..start + bytes.len()].copy_from_slice(bytes);
                    taken += bytes.len() as u64;
                    if jitter.is_multiple_of(3) {
                        std::thread::sleep(Duration::from_micros(50));
                    }
                    Ok::<(), ManagerError>(())
                })
                .unwrap();
            if let Some(start) = rest {
                f.manager
                    .read(need.handle, start as u64, &mut got[start..])
                    .unwrap();
            }
        } else {
            f.manager.read(need.handle, 0, &mut got).unwrap();
        }
        assert!(
            got == want,
            "unit {u}: tensor {:?} has foreign bytes",
            need.handle
        );
    }
    taken
}

/// Waits (bounded) until no fill is in flight.
fn settle(ra: &ReadAhead) -> ReadAheadStats {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = ra.stats();
        if s.fills_begun == s.fills_finished && ra.control.shared.area.filling() == 0 {
            return s;
        }
        assert!(Instant::now() < deadline, "fills still in flight: {s:?}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Streamed tensors of 1 to 6 pieces (buffers of 16 KiB in an area of nine) over six units,
/// decoded for five rounds with the consumer sometimes slower than the disk: every tensor
/// carries its file's bytes, many pieces came from the read-ahead, the area's ledger holds,
/// every begun fill was finished once, and when the request's cursor goes the area holds
/// nothing (before the facility stops).
#[test]
fn read_ahead_serves_every_piece_with_its_bytes_and_keeps_the_ledger() {
    let lens: Vec<usize> = (0..24).map(|i| 1 + (i * 9_173) % 48_000).collect();
    let f = fixture(&lens, 1 << 20);
    let ra = ReadAhead::new(
        f.manager.clone(),
        Tier::Host,
        plan(&f, 4, |i| i % 4 != 0, 9 * 16 * 1024),
        2,
    )
    .unwrap();
    assert_eq!(ra.buffer_bytes(), 16 * 1024);
    assert!(ra.streamed_pieces() > ra.streamed_tensors());
    let cursor = ra.cursor();
    let mut taken = 0;
    for round in 0..5u64 {
        for u in 0..ra.units().len() {
            taken += compute_unit(&f, &ra, &cursor, u, round + u as u64);
            ra.control.shared.area.check().unwrap();
        }
    }
    let s = ra.stats();
    assert!(s.area.hits > 0 && taken > 0, "{s:?}");
    // A miss ends a tensor's takes (the rest is read on demand).
    assert!(
        s.area.hits + s.area.misses <= 5 * ra.streamed_pieces() as u64,
        "{s:?}"
    );
    drop(cursor);
    let s = settle(&ra);
    assert_eq!(s.fills_begun, s.fills_finished);
    assert_eq!(s.held_bytes, 0, "the request's cursor went: {s:?}");
    ra.control.shared.area.check().unwrap();
    ra.stop();
    assert_eq!(ra.stats().held_bytes, 0);
}

/// Two requests alternate unit by unit, each at its own place in the cycle (one two
/// units behind the other): each reads its tensors' bytes, the read-ahead follows the one
/// that moved last (its pieces are still read ahead: hits), and when both cursors are gone
/// the area holds nothing.
#[test]
fn two_cursors_switching_each_read_their_bytes_and_give_the_room_back() {
    let lens: Vec<usize> = (0..18).map(|i| 20_000 + (i * 5_003) % 30_000).collect();
    let f = fixture(&lens, 1 << 20);
    let ra = ReadAhead::new(
        f.manager.clone(),
        Tier::Host,
        plan(&f, 3, |_| true, 9 * 16 * 1024),
        2,
    )
    .unwrap();
    let n = ra.units().len();
    let (a, b) = (ra.cursor(), ra.cursor());
    for step in 0..4 * n {
        compute_unit(&f, &ra, &a, step % n, step as u64);
        compute_unit(&f, &ra, &b, (step + n - 2) % n, step as u64 + 1);
        ra.control.shared.area.check().unwrap();
    }
    assert!(ra.stats().area.hits > 0, "{:?}", ra.stats());
    // The cursor that did not move last leaves nothing behind; the one that did gives
    // back what was read ahead for it.
    drop(a);
    drop(b);
    let s = settle(&ra);
    assert_eq!(s.held_bytes, 0, "{s:?}");
    ra.control.shared.area.check().unwrap();
}

/// A kept tensor of the unit ahead that is not on the compute tier is brought there while
/// the current unit computes (and counted as a hint); none is brought with read-ahead off.
#[test]
fn a_kept_tensor_ahead_is_brought_to_the_compute_tier() {
    let f = fixture(&[40_000, 30_000, 50_000, 20_000], 1 << 20);
    let on_host = |h| {
        f.manager
            .residency(h)
            .is_ok_and(|(tiers, _)| tiers.contains(&Tier::Host))
    };
    for ahead in [0, 1] {
        let ra = ReadAhead::new(
            f.manager.clone(),
            Tier::Host,
            plan(&f, 2, |i| i < 2, 9 * 16 * 1024),
            ahead,
        )
        .unwrap();
        let kept = ra.units()[1][0].handle;
        let cursor = ra.cursor();
        cursor.begin_unit(0);
        let deadline = Instant::now() + Duration::from_secs(ahead as u64 * 5);
        while !on_host(kept) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(on_host(kept), ahead > 0, "ahead {ahead}");
        assert_eq!(ra.hints() > 0, ahead > 0, "ahead {ahead}");
    }
}

/// The manager's waited-for prefetch: a tensor lands on the tier before the call returns;
/// one too large for the tier's budget does not, and the call returns at once.
#[test]
fn a_waited_prefetch_returns_once_the_tensor_landed_or_failed() {
    let f = fixture(&[40_000, 3_000_000], 1 << 20);
    let (small, large) = (f.tensors[0].0, f.tensors[1].0);
    let deadline = Instant::now() + Duration::from_secs(5);
    assert!(f.manager.prefetch_wait(small, Tier::Host, deadline));
    assert!(f.manager.residency(small).unwrap().0.contains(&Tier::Host));
    assert!(
        f.manager.prefetch_wait(small, Tier::Host, deadline),
        "already there"
    );
    let t = Instant::now();
    assert!(!f.manager.prefetch_wait(large, Tier::Host, deadline));
    assert!(t.elapsed() < Duration::from_secs(2));
    let c = f.manager.stats().counters;
    assert_eq!((c.prefetches, c.prefetch_failures), (3, 1));
}

/// Runs `body` on its own thread and fails when it has not returned within `limit` (a
/// take waiting for a fill that is never finished hangs for ever): a bounded test.
fn within<T: Send + 'static>(limit: Duration, body: impl FnOnce() -> T + Send + 'static) -> T {
    use std::sync::mpsc::RecvTimeoutError;
    let (tx, rx) = std::sync::mpsc::channel();
    let worker = std::thread::spawn(move || {
        let _ = tx.send(body());
    });
    match rx.recv_timeout(limit) {
        Ok(v) => {
            worker.join().unwrap();
            v
        }
        Err(RecvTimeoutError::Timeout) => {
            panic!(
                "still running after {limit:?}: a fill is never finished, or a take waits for one"
            )
        }
        Err(RecvTimeoutError::Disconnected) => match worker.join() {
            Err(panic) => std::panic::resume_unwind(panic),
            Ok(()) => unreachable!("the body returned without sending"),
        },
    }
}

/// The plans of a disk tier's faults: `eio` fails reads, `slow` delays them (two layers, so
/// each counts its own).
struct DiskFaults {
    eio: std::sync::Arc<vlmem_tier::FaultPlan>,
    slow: std::sync::Arc<vlmem_tier::FaultPlan>,
}

/// Like [`fixture`], over a manager whose disk tier reads the checkpoint through a faulty
/// file layer: of the first `calls` reads, about 1 in 10 fails with EIO and about 1 in 20
/// sleeps 1-4 ms, drawn from `seed`.
fn faulty_fixture(
    lens: &[usize],
    host_weight_bytes: u64,
    seed: u64,
    calls: u64,
) -> (Fixture, DiskFaults) {
    use rand::{Rng, SeedableRng};
    use std::sync::Arc as StdArc;
    use vlmem_tier::io::{FaultyFileIo, RealFileIo};
    use vlmem_tier::{
        DiskOptions, DiskTier, FaultKind, FaultPlan, FaultRule, FirstFitAllocator, HostOptions,
        IoPoint, MemoryTier, TierBackend,
    };
    let faults = DiskFaults {
        eio: StdArc::new(FaultPlan::new()),
        slow: StdArc::new(FaultPlan::new()),
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for call in 0..calls {
        if rng.gen_ratio(1, 10) {
            faults
                .eio
                .add(FaultRule::once(IoPoint::Read, FaultKind::Eio).after(call));
        } else if rng.gen_ratio(1, 20) {
            let ms = rng.gen_range(1..=4);
            faults.slow.add(
                FaultRule::once(IoPoint::Read, FaultKind::Slow(Duration::from_millis(ms)))
                    .after(call),
            );
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let alloc = |cap: u64, granule: u64| StdArc::new(FirstFitAllocator::new(cap, granule).unwrap());
    let device: StdArc<dyn TierBackend> =
        StdArc::new(MemoryTier::simulated_device(alloc(1 << 20, 256), None).unwrap());
    let host: StdArc<dyn TierBackend> =
        StdArc::new(MemoryTier::host(alloc(8 << 20, 256), HostOptions::default()).unwrap());
    let slow_io = StdArc::new(FaultyFileIo::new(
        StdArc::new(RealFileIo),
        faults.slow.clone(),
    ));
    let io = StdArc::new(FaultyFileIo::new(slow_io, faults.eio.clone()));
    let disk = StdArc::new(
        DiskTier::with_io(
            alloc(8 << 20, 4096),
            DiskOptions {
                dir: Some(dir.path().join("swap")),
                preallocate: false,
                ..DiskOptions::default()
            },
            io,
        )
        .unwrap(),
    );
    let mut c = ManagerConfig::with_capacities(1 << 20, 8 << 20, 8 << 20);
    c.budgets.bytes[Tier::Host.index()][TensorKind::Weight.index()] = host_weight_bytes;
    let manager = MemoryManager::with_tiers(c, device, host, disk).unwrap();
    let total: usize = lens.iter().map(|l| l + 123).sum();
    let file: Vec<u8> = (0..total).map(|i| (i * 7 + i / 4093 + 1) as u8).collect();
    let path = dir.path().join("weights.bin");
    std::fs::write(&path, &file).unwrap();
    let mut offset = 0u64;
    let tensors = lens
        .iter()
        .enumerate()
        .map(|(i, &len)| {
            offset += 123;
            let h = manager
                .register_extent(&path, offset, len as u64, TensorKind::Weight, i as u64)
                .unwrap();
            let t = (h, offset, len);
            offset += len as u64;
            t
        })
        .collect();
    let f = Fixture {
        _dir: dir,
        manager,
        file,
        tensors,
    };
    (f, faults)
}

/// Reads `dst.len()` bytes of `h` at `from` on demand, as the runner does after a miss: a
/// failed disk read must be a typed I/O error (counted in `errors`), and a later try reads
/// the bytes.
fn read_on_demand(f: &Fixture, h: TensorHandle, from: usize, dst: &mut [u8], errors: &mut u64) {
    for _ in 0..64 {
        match f.manager.read(h, from as u64, dst) {
            Ok(()) => return,
            Err(ManagerError::Tier(vlmem_tier::TierError::Io {
                tier: Tier::Disk, ..
            })) => *errors += 1,
            Err(e) => panic!("a failed read must be a disk I/O error, not {e:?}"),
        }
    }
    panic!("64 reads of {h:?} at {from} failed in a row");
}

/// What the runner does with one unit over a faulty disk: the streamed tensors' pieces
/// taken from the area must be the file's bytes (the area's ledger checked at every take),
/// what was not read ahead is read on demand, whose failures must be typed errors. The
/// consumer is slower than the readers when `slow`. Returns the bytes taken.
fn compute_unit_over_faults(
    f: &Fixture,
    ra: &ReadAhead,
    cursor: &Cursor,
    u: usize,
    slow: bool,
    errors: &mut u64,
) -> u64 {
    cursor.begin_unit(u);
    let area = &ra.control.shared.area;
    let mut taken = 0;
    for need in &ra.units()[u] {
        let (off, len) = (need.file_offset_bytes as usize, need.len_bytes as usize);
        let want = &f.file[off..off + len];
        let mut got = vec![0u8; len];
        let mut from = 0;
        if need.streamed {
            let mut next = 0;
            let rest = cursor
                .take_pieces(need.handle, |start, bytes| {
                    assert_eq!(start, next, "pieces are taken in order");
                    assert!(
                        bytes == &want[start..start + bytes.len()],
                        "unit {u}: a taken piece of {:?} at {start} has foreign bytes",
                        need.handle
                    );
                    area.check().unwrap();
                    got[start..start + bytes.len()].copy_from_slice(bytes);
                    next = start + bytes.len();
                    taken += bytes.len() as u64;
                    if slow {
                        std::thread::sleep(Duration::from_micros(300));
                    }
                    Ok::<(), ManagerError>(())
                })
                .unwrap();
            area.check().unwrap();
            match rest {
                None => from = len,
                Some(start) => {
                    assert_eq!(start, next, "the rest starts after the taken pieces");
                    from = start;
                }
            }
        }
        if from < len {
            read_on_demand(f, need.handle, from, &mut got[from..], errors);
        }
        assert!(
            got == want,
            "unit {u}: tensor {:?} has foreign bytes",
            need.handle
        );
    }
    taken
}

/// Over a disk tier where about 1 in 10 reads fails with EIO and 1 in 20 is slow (1-4 ms),
/// streamed tensors of 1 to 6 pieces over six units are decoded for six rounds with the
/// consumer sometimes slower than the readers (it dawdles over pieces, or lets the readers
/// fill the area before a unit): every piece taken carries the file's bytes, the area's
/// ledger holds at every take, a failed read surfaces only as a typed error of a read on
/// demand (whose retry reads the bytes), every fill begun is finished once (a failed read
/// gives its buffer's room back, so no take waits for it for ever), no room is held once
/// the cursor goes, and the facility stops cleanly, after which units are read on demand.
#[test]
fn failed_disk_reads_give_their_room_back_and_surface_only_on_demand() {
    within(Duration::from_secs(30), || {
        let lens: Vec<usize> = (0..24).map(|i| 1 + (i * 9_173) % 48_000).collect();
        let (f, faults) = faulty_fixture(&lens, 1 << 20, 0x5eed_f17e, 50_000);
        let ra = ReadAhead::new(
            f.manager.clone(),
            Tier::Host,
            plan(&f, 4, |i| i % 4 != 0, 9 * 16 * 1024),
            2,
        )
        .unwrap();
        assert_eq!(ra.buffer_bytes(), 16 * 1024);
        let cursor = ra.cursor();
        let (mut taken, mut errors) = (0, 0);
        for round in 0..6usize {
            for u in 0..ra.units().len() {
                if (round * 7 + u) % 4 == 0 {
                    // The readers get ahead: the area fills up, claims wait for room.
                    std::thread::sleep(Duration::from_millis(3));
                }
                let slow = (round + u) % 3 == 0;
                taken += compute_unit_over_faults(&f, &ra, &cursor, u, slow, &mut errors);
                ra.control.shared.area.check().unwrap();
            }
        }
        let s = ra.stats();
        let eio = faults.eio.fired();
        let c = f.manager.stats().counters;
        assert!(eio > 0 && faults.slow.fired() > 0, "faults injected: {s:?}");
        assert!(s.area.hits > 0 && taken > 0, "{s:?}");
        // Failed reads not seen by the consumer nor by a kept tensor's bring were the
        // read-ahead's own.
        assert!(
            eio > errors + c.prefetch_failures,
            "the readers met failed reads: {eio} failed, {errors} on demand, {} brings: {s:?}",
            c.prefetch_failures
        );
        assert!(
            s.area.filled < s.fills_begun,
            "some fills gave their room back: {s:?}"
        );
        drop(cursor);
        let s = settle(&ra);
        assert_eq!(s.fills_begun, s.fills_finished, "{s:?}");
        assert_eq!(s.held_bytes, 0, "the request's cursor went: {s:?}");
        ra.control.shared.area.check().unwrap();
        ra.stop();
        let s = ra.stats();
        assert_eq!(s.fills_begun, s.fills_finished, "{s:?}");
        assert_eq!(s.held_bytes, 0, "{s:?}");
        // Stopped: a request still reads every tensor, all of it on demand.
        let cursor = ra.cursor();
        assert!(cursor.is_stopped());
        for u in 0..ra.units().len() {
            assert_eq!(
                compute_unit_over_faults(&f, &ra, &cursor, u, false, &mut errors),
                0
            );
        }
        drop(cursor);
        assert_eq!(ra.stats().fills_begun, s.fills_begun);
        ra.control.shared.area.check().unwrap();
        drop(ra);
    });
}
