//! Adversarial checks of the tiers and the transfer engine: every documented promise of
//! src/engine.rs, src/disk.rs, src/mem.rs, src/registry.rs and src/align.rs driven with
//! absurd configurations, racing threads, cancellations at every moment, failing I/O and
//! closures that panic. Each test is bounded by a watchdog: a hang fails, it never stalls.
mod common;

use common::*;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};
use vlmem_core::Tier;
use vlmem_tier::io::{FaultyFileIo, FileIo, RealFileIo};
use vlmem_tier::{
    AlignedBuf, DiskOptions, DiskTier, EngineConfig, FaultKind, FaultPlan, FaultRule, FaultyTier,
    IoPoint, MemoryTier, Move, Priority, Reservation, TierBackend, TierError, TransferEngine,
};

const KIB: u64 = 1024;

/// Runs `f` on its own thread and fails the test if it has not finished within `secs`.
fn bounded<T: Send + 'static>(what: &str, secs: u64, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel::<()>();
    let h = std::thread::spawn(move || {
        let r = f();
        let _ = tx.send(());
        r
    });
    match rx.recv_timeout(Duration::from_secs(secs)) {
        Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => match h.join() {
            Ok(v) => v,
            Err(p) => std::panic::resume_unwind(p),
        },
        Err(mpsc::RecvTimeoutError::Timeout) => {
            panic!("{what}: no result within {secs} s (a hang)")
        }
    }
}

fn fill(t: &dyn TierBackend, len: u64, seed: u64, name: &str) -> (Reservation, Vec<u8>) {
    let r = t.reserve(len, name).unwrap();
    let d = pattern(len as usize, seed);
    t.write(&r, 0, &d).unwrap();
    (r, d)
}

fn disk_opts(dir: &Path) -> DiskOptions {
    DiskOptions {
        dir: Some(dir.to_path_buf()),
        ..DiskOptions::default()
    }
}

/// A `FileIo` that delays writes whose file offset falls in given ranges and counts how many
/// writes run at once.
#[derive(Debug)]
struct SlowWrites {
    inner: Arc<dyn FileIo>,
    slow: Vec<(u64, u64, Duration)>,
    every_write: Duration,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
}

impl SlowWrites {
    fn new(inner: Arc<dyn FileIo>, slow: Vec<(u64, u64, Duration)>, every_write: Duration) -> Self {
        SlowWrites {
            inner,
            slow,
            every_write,
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
        }
    }
}

impl FileIo for SlowWrites {
    fn open_swap(&self, dir: &Path, direct: bool) -> std::io::Result<std::fs::File> {
        self.inner.open_swap(dir, direct)
    }
    fn open_read_only(&self, path: &Path, direct: bool) -> std::io::Result<std::fs::File> {
        self.inner.open_read_only(path, direct)
    }
    fn allocate(&self, file: &std::fs::File, len_bytes: u64) -> std::io::Result<()> {
        self.inner.allocate(file, len_bytes)
    }
    fn write_at(&self, file: &std::fs::File, off: u64, buf: &[u8]) -> std::io::Result<usize> {
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_in_flight.fetch_max(now, Ordering::SeqCst);
        let mut d = self.every_write;
        for &(s, e, delay) in &self.slow {
            if off >= s && off < e {
                d = d.max(delay);
            }
        }
        std::thread::sleep(d);
        let r = self.inner.write_at(file, off, buf);
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        r
    }
    fn read_at(&self, file: &std::fs::File, off: u64, buf: &mut [u8]) -> std::io::Result<usize> {
        self.inner.read_at(file, off, buf)
    }
    fn sync_data(&self, file: &std::fs::File) -> std::io::Result<()> {
        self.inner.sync_data(file)
    }
}

/// A tier that panics on its `n`th read (a caller-supplied backend with a bug).
#[derive(Debug)]
struct PanicsOnRead {
    inner: Arc<MemoryTier>,
    reads: AtomicU64,
    panic_at: u64,
}

impl TierBackend for PanicsOnRead {
    fn tier(&self) -> Tier {
        self.inner.tier()
    }
    fn describe(&self) -> String {
        "panics on a read".into()
    }
    fn capacity_bytes(&self) -> u64 {
        self.inner.capacity_bytes()
    }
    fn usage(&self) -> vlmem_core::ArenaUsage {
        self.inner.usage()
    }
    fn reserve(&self, len_bytes: u64, name: &str) -> vlmem_tier::Result<Reservation> {
        self.inner.reserve(len_bytes, name)
    }
    fn release(&self, res: Reservation) -> vlmem_tier::Result<()> {
        self.inner.release(res)
    }
    fn write(&self, res: &Reservation, off: u64, src: &[u8]) -> vlmem_tier::Result<()> {
        self.inner.write(res, off, src)
    }
    fn read(&self, res: &Reservation, off: u64, dst: &mut [u8]) -> vlmem_tier::Result<()> {
        if self.reads.fetch_add(1, Ordering::SeqCst) == self.panic_at {
            panic!("injected panic in a tier read");
        }
        self.inner.read(res, off, dst)
    }
}

// ---------------------------------------------------------------------------------------
// Engine: flush and fsyncgate
// ---------------------------------------------------------------------------------------

/// A job reports `Ok` only once its bytes are durable: when a sync that covered its first
/// chunk failed (and so invalidated it), the job must not later report `Ok` because its own,
/// retried sync succeeded.
#[test]
fn a_job_is_ok_only_if_every_sync_covering_its_bytes_succeeded() {
    bounded("fsyncgate across jobs", 30, || {
        let dir = tempfile::tempdir().unwrap();
        let plan = Arc::new(FaultPlan::new());
        let faulty: Arc<dyn FileIo> =
            Arc::new(FaultyFileIo::new(Arc::new(RealFileIo), plan.clone()));
        // B's second chunk (disk bytes 64..128 KiB) is slow; A (128..192 KiB) a little.
        let io = Arc::new(SlowWrites::new(
            faulty,
            vec![
                (64 * KIB, 128 * KIB, Duration::from_millis(500)),
                (128 * KIB, 192 * KIB, Duration::from_millis(150)),
            ],
            Duration::ZERO,
        ));
        let opts = DiskOptions {
            direct_io: false,
            unit_bytes: 4096,
            ..disk_opts(dir.path())
        };
        let d = Arc::new(DiskTier::with_io(alloc(MIB), opts, io).unwrap());
        let h = host(MIB);
        let cfg = EngineConfig {
            workers: 3,
            chunk_bytes: 64 * KIB,
            ..EngineConfig::default()
        };
        let e = TransferEngine::new(&[h.clone(), d.clone()], cfg).unwrap();
        let (src_b, data_b) = fill(&*h, 128 * KIB, 1, "b");
        let (src_a, _) = fill(&*h, 64 * KIB, 2, "a");
        let dst_b = d.reserve(128 * KIB, "b").unwrap();
        let dst_a = d.reserve(64 * KIB, "a").unwrap();
        assert_eq!((dst_b.offset_bytes(), dst_a.offset_bytes()), (0, 128 * KIB));
        // The first sync fails (EIO); later ones succeed (a retried sync cannot be trusted).
        plan.add(FaultRule::once(IoPoint::Sync, FaultKind::Eio));
        let tb = e
            .submit(
                Move {
                    src: src_b,
                    dst: dst_b,
                },
                Priority::Demand,
            )
            .unwrap();
        std::thread::sleep(Duration::from_millis(20));
        let ta = e
            .submit(
                Move {
                    src: src_a,
                    dst: dst_a,
                },
                Priority::Demand,
            )
            .unwrap();
        let ra = ta.wait();
        let rb = tb.wait();
        assert!(
            matches!(
                ra,
                Err(TierError::Io {
                    point: IoPoint::Sync,
                    ..
                })
            ),
            "{ra:?}"
        );
        let mut back = vec![0u8; 128 * KIB as usize];
        let read = d.read(&dst_b, 0, &mut back);
        match (&rb, &read) {
            (Err(_), _) => {}
            (Ok(_), Ok(())) if back == data_b => {}
            _ => panic!(
                "job B reported {rb:?}, but its destination reads back as {:?} (a sync that covered its first chunk failed)",
                read.map(|()| "different bytes")
            ),
        }
    });
}

/// A cancelled move reports `Ok` only after its flush; on a failing sync it reports the
/// error, whenever the cancel lands (before, during or after its chunks).
#[test]
fn a_cancel_at_any_moment_never_hides_a_failed_sync() {
    bounded("cancel against failing sync", 60, || {
        for delay_ms in [0u64, 5, 30, 80, 200] {
            let dir = tempfile::tempdir().unwrap();
            let plan = Arc::new(FaultPlan::new());
            let io = Arc::new(FaultyFileIo::new(Arc::new(RealFileIo), plan.clone()));
            let opts = DiskOptions {
                direct_io: false,
                unit_bytes: 4096,
                ..disk_opts(dir.path())
            };
            let d = Arc::new(DiskTier::with_io(alloc(4 * MIB), opts, io).unwrap());
            let h = host(4 * MIB);
            let cfg = EngineConfig {
                workers: 2,
                chunk_bytes: 64 * KIB,
                ..EngineConfig::default()
            };
            let e = TransferEngine::new(&[h.clone(), d.clone()], cfg).unwrap();
            let (src, data) = fill(&*h, 256 * KIB + 100, 7, "t");
            let dst = d.reserve(256 * KIB + 100, "t").unwrap();
            plan.add(FaultRule::always(IoPoint::Sync, FaultKind::Eio));
            plan.add(FaultRule::always(
                IoPoint::Write,
                FaultKind::Slow(Duration::from_millis(20)),
            ));
            let t = e.submit(Move { src, dst }, Priority::WriteBack).unwrap();
            std::thread::sleep(Duration::from_millis(delay_ms));
            t.cancel();
            let r = t.wait();
            assert!(
                matches!(
                    r,
                    Err(TierError::Cancelled
                        | TierError::Io {
                            point: IoPoint::Sync,
                            ..
                        })
                ),
                "cancel after {delay_ms} ms with every sync failing: {r:?}"
            );
            assert_eq!(read_all(&*h, &src), data, "the source changed");
        }
    });
}

// ---------------------------------------------------------------------------------------
// Engine: a backend that panics
// ---------------------------------------------------------------------------------------

/// A backend that panics inside a chunk fails that job (its ticket completes) and the engine
/// goes on serving other jobs; nothing waits for ever.
#[test]
fn a_panicking_tier_fails_its_job_and_the_engine_goes_on() {
    bounded("panicking tier", 30, || {
        let h = host(4 * MIB);
        let dev = Arc::new(PanicsOnRead {
            inner: device(4 * MIB, None),
            reads: AtomicU64::new(0),
            panic_at: 0,
        });
        let cfg = EngineConfig {
            workers: 1,
            ..EngineConfig::default()
        };
        let e = TransferEngine::new(&[h.clone(), dev.clone()], cfg).unwrap();
        let (src, _) = fill(&*dev, 64 * KIB, 1, "w");
        let dst = h.reserve(64 * KIB, "w").unwrap();
        let t = e.submit(Move { src, dst }, Priority::Demand).unwrap();
        let first = match t.wait_timeout(Duration::from_secs(3)) {
            Ok(r) => r,
            Err(_) => panic!("the job whose tier panicked never completed its ticket"),
        };
        assert!(first.is_err(), "{first:?}");
        let (src2, data2) = fill(&*dev, 64 * KIB, 2, "w2");
        let dst2 = h.reserve(64 * KIB, "w2").unwrap();
        let t2 = e
            .submit(
                Move {
                    src: src2,
                    dst: dst2,
                },
                Priority::Demand,
            )
            .unwrap();
        match t2.wait_timeout(Duration::from_secs(3)) {
            Ok(r) => {
                r.unwrap();
            }
            Err(_) => panic!("the engine serves nothing after a tier panicked"),
        }
        assert_eq!(read_all(&*h, &dst2), data2);
    });
}

// ---------------------------------------------------------------------------------------
// Engine: cancellation, back-pressure, shutdown, priorities, parallel chunks
// ---------------------------------------------------------------------------------------

/// Under a storm of moves and batches cancelled at random moments: every ticket completes,
/// every `Ok` destination holds the source's bytes, every source is intact, the counters add
/// up, and no queue slot leaks.
#[test]
fn cancels_at_random_moments_lose_nothing_and_leak_no_queue_slot() {
    bounded("cancel storm", 120, || {
        let h = host(32 * MIB);
        let plan = Arc::new(FaultPlan::new());
        let dev = Arc::new(FaultyTier::new(device(32 * MIB, None), plan.clone()));
        plan.add(FaultRule::always(
            IoPoint::Write,
            FaultKind::Slow(Duration::from_micros(300)),
        ));
        let cfg = EngineConfig {
            workers: 3,
            chunk_bytes: 16 * KIB,
            max_queued_jobs: 8,
            ..EngineConfig::default()
        };
        let e = Arc::new(TransferEngine::new(&[h.clone(), dev.clone()], cfg).unwrap());
        let mut seed = 0x5eed_u64;
        let mut rnd = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let (mut ok, mut cancelled) = (0, 0);
        for round in 0..12u64 {
            let mut jobs = Vec::new();
            for i in 0..16u64 {
                let batch = rnd() % 4 == 0;
                let moves: Vec<(Reservation, Reservation, Vec<u8>)> =
                    (0..if batch { 3 } else { 1 })
                        .map(|k| {
                            let len = 1 + rnd() % (96 * KIB);
                            let (src, data) = fill(&*h, len, round * 1000 + i * 10 + k, "s");
                            let dst = dev.reserve(len, "d").unwrap();
                            (src, dst, data)
                        })
                        .collect();
                let mvs: Vec<Move> = moves
                    .iter()
                    .map(|(s, d, _)| Move { src: *s, dst: *d })
                    .collect();
                let t = if batch {
                    e.submit_batch(mvs, Priority::ALL[(rnd() % 3) as usize])
                        .unwrap()
                } else {
                    e.submit(mvs[0], Priority::ALL[(rnd() % 3) as usize])
                        .unwrap()
                };
                let when = rnd() % 4;
                jobs.push((t, moves, when));
            }
            for (t, _, when) in &jobs {
                match when {
                    0 => t.cancel(),
                    1 => {
                        std::thread::sleep(Duration::from_micros(rnd() % 2000));
                        t.cancel();
                    }
                    _ => {}
                }
            }
            for (t, moves, _) in jobs {
                t.cancel(); // a second cancel (or one after the end) changes nothing
                match t.wait() {
                    Ok(rep) => {
                        ok += 1;
                        let total: u64 = moves.iter().map(|m| m.2.len() as u64).sum();
                        assert_eq!(rep.bytes, total);
                        for (_, dst, data) in &moves {
                            assert_eq!(&read_all(&*dev, dst), data, "an Ok move lost bytes");
                        }
                    }
                    Err(TierError::Cancelled) => cancelled += 1,
                    Err(other) => panic!("unexpected {other:?}"),
                }
                for (src, dst, data) in moves {
                    assert_eq!(read_all(&*h, &src), data, "a source changed");
                    h.release(src).unwrap();
                    dev.release(dst).unwrap();
                }
            }
        }
        let s = e.stats();
        assert_eq!(
            s.jobs_submitted,
            s.jobs_succeeded + s.jobs_failed + s.jobs_cancelled,
            "{s:?}"
        );
        assert_eq!((s.jobs_succeeded, s.jobs_cancelled), (ok, cancelled));
        assert!(ok > 0 && cancelled > 0, "ok {ok}, cancelled {cancelled}");
        // No leaked queue slot: with the only... every worker held, exactly
        // `max_queued_jobs` more jobs are accepted, then QueueFull.
        plan.clear();
        plan.add(FaultRule::always(
            IoPoint::Write,
            FaultKind::Slow(Duration::from_millis(400)),
        ));
        let mut blockers = Vec::new();
        for _ in 0..3 {
            let (src, _) = fill(&*h, 4096, 1, "blk");
            let dst = dev.reserve(4096, "blk").unwrap();
            blockers.push(e.submit(Move { src, dst }, Priority::Demand).unwrap());
        }
        std::thread::sleep(Duration::from_millis(100));
        let mut queued = Vec::new();
        for i in 0..8 {
            let (src, _) = fill(&*h, 4096, 1, "q");
            let dst = dev.reserve(4096, "q").unwrap();
            match e.try_submit(Move { src, dst }, Priority::WriteBack) {
                Ok(t) => queued.push(t),
                Err(err) => panic!("slot {i} of 8 refused after the storm: {err:?}"),
            }
        }
        let (src, _) = fill(&*h, 4096, 1, "q");
        let dst = dev.reserve(4096, "q").unwrap();
        assert!(matches!(
            e.try_submit(Move { src, dst }, Priority::WriteBack),
            Err(TierError::QueueFull { .. })
        ));
        plan.clear();
        for t in blockers.into_iter().chain(queued) {
            t.wait().unwrap();
        }
    });
}

/// A submit blocked by full queues wakes when a queued job is cancelled (a slot frees), long
/// before the running job ends.
#[test]
fn cancelling_a_queued_job_wakes_a_blocked_submit() {
    bounded("back-pressure and cancel", 30, || {
        let h = host(4 * MIB);
        let plan = Arc::new(FaultPlan::new());
        let dev = Arc::new(FaultyTier::new(device(4 * MIB, None), plan.clone()));
        plan.add(FaultRule::once(
            IoPoint::Write,
            FaultKind::Slow(Duration::from_millis(800)),
        ));
        let cfg = EngineConfig {
            workers: 1,
            max_queued_jobs: 2,
            ..EngineConfig::default()
        };
        let e = Arc::new(TransferEngine::new(&[h.clone(), dev.clone()], cfg).unwrap());
        let mk = |seed| {
            let (src, _) = fill(&*h, 4096, seed, "m");
            Move {
                src,
                dst: dev.reserve(4096, "m").unwrap(),
            }
        };
        let blocker = e.submit(mk(1), Priority::Demand).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let q1 = e.submit(mk(2), Priority::WriteBack).unwrap();
        let q2 = e.submit(mk(3), Priority::WriteBack).unwrap();
        let m3 = mk(4);
        let e2 = e.clone();
        let t0 = Instant::now();
        let waiter = std::thread::spawn(move || {
            let t = e2.submit(m3, Priority::WriteBack);
            (t, Instant::now())
        });
        std::thread::sleep(Duration::from_millis(100));
        assert!(!waiter.is_finished(), "submit did not block on full queues");
        q1.cancel();
        let (t3, woke) = waiter.join().unwrap();
        let waited = woke - t0;
        assert!(
            waited < Duration::from_millis(500),
            "the blocked submit woke after {waited:?}, not at the cancel"
        );
        assert!(matches!(q1.wait(), Err(TierError::Cancelled)));
        blocker.wait().unwrap();
        q2.wait().unwrap();
        t3.unwrap().wait().unwrap();
    });
}

/// Dropping the engine with jobs queued lets them finish: every ticket completes `Ok` with
/// the bytes, and the drop itself returns.
#[test]
fn dropping_the_engine_with_jobs_queued_finishes_them_all() {
    bounded("drop with queued jobs", 60, || {
        for workers in [1usize, 4] {
            let h = host(8 * MIB);
            let plan = Arc::new(FaultPlan::new());
            let dev = Arc::new(FaultyTier::new(device(8 * MIB, None), plan.clone()));
            plan.add(FaultRule::always(
                IoPoint::Write,
                FaultKind::Slow(Duration::from_millis(2)),
            ));
            let cfg = EngineConfig {
                workers,
                chunk_bytes: 32 * KIB,
                ..EngineConfig::default()
            };
            let e = TransferEngine::new(&[h.clone(), dev.clone()], cfg).unwrap();
            let mut jobs = Vec::new();
            for i in 0..24u64 {
                let len = 4096 + i * 7919;
                let (src, data) = fill(&*h, len, i, "s");
                let dst = dev.reserve(len, "d").unwrap();
                let t = if i % 5 == 0 {
                    e.submit_batch(vec![Move { src, dst }], Priority::WriteBack)
                        .unwrap()
                } else {
                    e.submit(Move { src, dst }, Priority::ALL[(i % 3) as usize])
                        .unwrap()
                };
                jobs.push((t, dst, data));
            }
            drop(e);
            for (t, dst, data) in jobs {
                assert!(t.is_finished(), "a ticket still running after the drop");
                t.cancel(); // after the end: no effect
                t.wait().unwrap();
                assert_eq!(read_all(&*dev, &dst), data);
            }
        }
    });
}

/// A demand fetch is served within about two hand-outs however many write-backs have
/// starved, with several workers too.
#[test]
fn a_demand_fetch_behind_many_starved_write_backs_waits_a_few_chunks_on_four_workers() {
    bounded("anti-starvation bound", 60, || {
        let h = host(16 * MIB);
        let plan = Arc::new(FaultPlan::new());
        let dev = Arc::new(FaultyTier::new(device(16 * MIB, None), plan.clone()));
        let cfg = EngineConfig {
            workers: 4,
            max_queued_jobs: 1024,
            max_starve: Duration::from_millis(20),
            ..EngineConfig::default()
        };
        let e = TransferEngine::new(&[h.clone(), dev.clone()], cfg).unwrap();
        plan.add(FaultRule::always(
            IoPoint::Write,
            FaultKind::Slow(Duration::from_millis(300)),
        ));
        plan.add(FaultRule::always(
            IoPoint::Write,
            FaultKind::Slow(Duration::from_millis(5)),
        ));
        let mk = |seed| {
            let (src, _) = fill(&*h, 4096, seed, "m");
            Move {
                src,
                dst: dev.reserve(4096, "m").unwrap(),
            }
        };
        // Hold all four workers for 300 ms while 400 write-backs queue and starve.
        let blockers: Vec<_> = (0..4)
            .map(|i| e.submit(mk(i), Priority::Demand).unwrap())
            .collect();
        std::thread::sleep(Duration::from_millis(30));
        plan.clear();
        plan.add(FaultRule::always(
            IoPoint::Write,
            FaultKind::Slow(Duration::from_millis(5)),
        ));
        let wbs: Vec<_> = (0..400)
            .map(|i| e.submit(mk(100 + i), Priority::WriteBack).unwrap())
            .collect();
        std::thread::sleep(Duration::from_millis(350));
        let d = e.submit(mk(7), Priority::Demand).unwrap();
        let rep = d.wait().unwrap();
        // 400 write-backs of 5 ms on 4 workers take 500 ms; the demand fetch must not
        // wait behind more than a few of them per worker.
        assert!(
            rep.queued < Duration::from_millis(60),
            "a demand fetch waited {:?} behind starved write-backs",
            rep.queued
        );
        for t in blockers.into_iter().chain(wbs) {
            t.wait().unwrap();
        }
    });
}

/// Chunks of one move to the disk run on several workers at once.
#[test]
fn chunks_of_one_move_to_disk_run_in_parallel() {
    bounded("parallel chunks to disk", 30, || {
        let dir = tempfile::tempdir().unwrap();
        let io = Arc::new(SlowWrites::new(
            Arc::new(RealFileIo),
            Vec::new(),
            Duration::from_millis(25),
        ));
        let opts = DiskOptions {
            unit_bytes: 4096,
            ..disk_opts(dir.path())
        };
        let d = Arc::new(DiskTier::with_io(alloc(4 * MIB), opts, io.clone()).unwrap());
        let h = host(4 * MIB);
        let cfg = EngineConfig {
            workers: 4,
            chunk_bytes: 64 * KIB,
            ..EngineConfig::default()
        };
        let e = TransferEngine::new(&[h.clone(), d.clone()], cfg).unwrap();
        let (src, data) = fill(&*h, MIB, 3, "w");
        let dst = d.reserve(MIB, "w").unwrap();
        e.submit(Move { src, dst }, Priority::WriteBack)
            .unwrap()
            .wait()
            .unwrap();
        assert_eq!(read_all(&*d, &dst), data);
        let max = io.max_in_flight.load(Ordering::SeqCst);
        assert!(
            max >= 3,
            "at most {max} disk writes of one move ran at once"
        );
    });
}

/// Every accepted engine configuration works, and every refused one is a typed error, not a
/// panic: one-byte chunks, no batch room, no or infinite aging, the most workers.
#[test]
fn extreme_engine_configurations_work_or_are_refused() {
    bounded("engine configs", 60, || {
        let h = host(4 * MIB);
        let dev = device(4 * MIB, None);
        let tiers: [Arc<dyn TierBackend>; 2] = [h.clone(), dev.clone()];
        for bad in [
            EngineConfig {
                workers: 0,
                ..EngineConfig::default()
            },
            EngineConfig {
                workers: 257,
                ..EngineConfig::default()
            },
            EngineConfig {
                chunk_bytes: 0,
                ..EngineConfig::default()
            },
            EngineConfig {
                chunk_bytes: (1 << 30) + 1,
                ..EngineConfig::default()
            },
            EngineConfig {
                max_queued_jobs: 0,
                ..EngineConfig::default()
            },
        ] {
            assert!(matches!(
                TransferEngine::new(&tiers, bad),
                Err(TierError::InvalidConfig(_))
            ));
        }
        let goods = [
            EngineConfig {
                chunk_bytes: 1,
                workers: 3,
                ..EngineConfig::default()
            },
            EngineConfig {
                max_batch_bytes: 0,
                max_starve: Duration::ZERO,
                ..EngineConfig::default()
            },
            EngineConfig {
                max_batch_bytes: u64::MAX,
                max_starve: Duration::MAX,
                max_queued_jobs: usize::MAX,
                ..EngineConfig::default()
            },
            EngineConfig {
                workers: 256,
                chunk_bytes: 1 << 30,
                max_queued_jobs: 1,
                ..EngineConfig::default()
            },
        ];
        for (i, cfg) in goods.into_iter().enumerate() {
            let e = TransferEngine::new(&tiers, cfg).unwrap();
            let (src, data) = fill(&*h, 20 * KIB + 3, i as u64, "s");
            let dst = dev.reserve(20 * KIB + 3, "d").unwrap();
            let rep = e
                .submit(Move { src, dst }, Priority::ALL[i % 3])
                .unwrap()
                .wait()
                .unwrap();
            assert_eq!(rep.bytes, 20 * KIB + 3);
            assert_eq!(read_all(&*dev, &dst), data);
            let b = e.submit_batch(vec![Move { src, dst }], Priority::Prefetch);
            if cfg.max_batch_bytes == 0 {
                assert!(matches!(b, Err(TierError::InvalidConfig(_))), "{b:?}");
            } else {
                b.unwrap().wait().unwrap();
            }
            assert!(matches!(
                e.submit_batch(Vec::new(), Priority::Demand),
                Err(TierError::InvalidConfig(_))
            ));
            h.release(src).unwrap();
            dev.release(dst).unwrap();
        }
    });
}

/// Batches that mix tiers, write into a read-only extent, or name tiers the engine lacks are
/// refused at submit; batches that repeat a source work; naming one destination twice is
/// refused on every destination tier, not only on memory tiers.
#[test]
fn a_batch_naming_one_destination_twice_is_refused_on_every_tier() {
    bounded("batch with a repeated destination", 30, || {
        let dir = tempfile::tempdir().unwrap();
        let d = Arc::new(disk_in(dir.path(), 8 * MIB, Arc::new(RealFileIo)));
        let h = host(8 * MIB);
        let e = engine(&[h.clone(), d.clone()]);
        let (a, _) = fill(&*h, 4096, 1, "a");
        let (b, _) = fill(&*h, 4096, 2, "b");
        let dd = d.reserve(4096, "dd").unwrap();
        let r = e
            .submit_batch(
                vec![Move { src: a, dst: dd }, Move { src: b, dst: dd }],
                Priority::WriteBack,
            )
            .unwrap()
            .wait();
        assert!(matches!(r, Err(TierError::Busy { .. })), "{r:?}");
    });
}

#[test]
fn malformed_batches_are_refused_at_submit_and_repeated_sources_work() {
    bounded("malformed batches", 30, || {
        let dir = tempfile::tempdir().unwrap();
        let d = Arc::new(disk_in(dir.path(), 8 * MIB, Arc::new(RealFileIo)));
        let h = host(8 * MIB);
        let dev = device(8 * MIB, None);
        let e = engine(&[h.clone(), d.clone(), dev.clone()]);
        let (a, data_a) = fill(&*h, 5000, 1, "a");
        let x = dev.reserve(5000, "x").unwrap();
        let y = d.reserve(5000, "y").unwrap();
        let mixed = e.submit_batch(
            vec![Move { src: a, dst: x }, Move { src: a, dst: y }],
            Priority::Demand,
        );
        assert!(
            matches!(mixed, Err(TierError::InvalidConfig(_))),
            "{mixed:?}"
        );
        let file = dir.path().join("ckpt");
        std::fs::write(&file, pattern(20000, 9)).unwrap();
        let ext = d.register_extent(&file, 100, 5000, "ext").unwrap();
        let ro = e.submit_batch(vec![Move { src: a, dst: ext }], Priority::Demand);
        assert!(matches!(ro, Err(TierError::ReadOnly { .. })), "{ro:?}");
        let short = h.reserve(4999, "short").unwrap();
        let mism = e.submit_batch(vec![Move { src: a, dst: short }], Priority::Demand);
        assert!(
            matches!(mism, Err(TierError::LengthMismatch { .. })),
            "{mism:?}"
        );
        // One source to two destinations, and an extent as a source.
        let x2 = dev.reserve(5000, "x2").unwrap();
        e.submit_batch(
            vec![Move { src: a, dst: x }, Move { src: a, dst: x2 }],
            Priority::Demand,
        )
        .unwrap()
        .wait()
        .unwrap();
        assert_eq!(read_all(&*dev, &x), data_a);
        assert_eq!(read_all(&*dev, &x2), data_a);
        let to_host = h.reserve(5000, "from ext").unwrap();
        let y2 = d.reserve(5000, "y2").unwrap();
        e.submit_batch(vec![Move { src: a, dst: y2 }], Priority::WriteBack)
            .unwrap()
            .wait()
            .unwrap();
        e.submit_batch(
            vec![Move {
                src: ext,
                dst: to_host,
            }],
            Priority::Demand,
        )
        .unwrap()
        .wait()
        .unwrap();
        assert_eq!(
            read_all(&*h, &to_host),
            pattern(20000, 9)[100..5100].to_vec()
        );
        // A mix of an extent and a swap tensor read back in one batch to the device.
        let x3 = dev.reserve(5000, "x3").unwrap();
        let x4 = dev.reserve(5000, "x4").unwrap();
        e.submit_batch(
            vec![Move { src: ext, dst: x3 }, Move { src: y2, dst: x4 }],
            Priority::Demand,
        )
        .unwrap()
        .wait()
        .unwrap();
        assert_eq!(read_all(&*dev, &x3), pattern(20000, 9)[100..5100].to_vec());
        assert_eq!(read_all(&*dev, &x4), data_a);
    });
}

/// Releasing a reservation while a move is in flight never lets the move write into the
/// space's next tenant: the move fails with a typed error and the new tenant keeps its bytes.
#[test]
fn releasing_a_destination_mid_move_never_touches_its_next_tenant() {
    bounded("release mid-move", 30, || {
        let h = host(4 * MIB);
        let plan = Arc::new(FaultPlan::new());
        let dev = Arc::new(FaultyTier::new(device(4 * MIB, None), plan.clone()));
        let cfg = EngineConfig {
            workers: 1,
            chunk_bytes: 64 * KIB,
            ..EngineConfig::default()
        };
        let e = TransferEngine::new(&[h.clone(), dev.clone()], cfg).unwrap();
        let (src, src_data) = fill(&*h, MIB, 1, "src");
        let dst = dev.reserve(MIB, "dst").unwrap();
        // Each chunk's write waits 15 ms before it touches the destination.
        plan.add(FaultRule::always(
            IoPoint::Write,
            FaultKind::Slow(Duration::from_millis(15)),
        ));
        let t = e.submit(Move { src, dst }, Priority::Demand).unwrap();
        std::thread::sleep(Duration::from_millis(60));
        let released = loop {
            match dev.release(dst) {
                Ok(()) => break true,
                Err(TierError::Busy { .. }) => std::thread::sleep(Duration::from_micros(200)),
                Err(e) => panic!("{e:?}"),
            }
            if t.is_finished() {
                break false;
            }
        };
        assert!(released, "the move finished before the release got in");
        plan.clear();
        let (tenant, tenant_data) = fill(&*dev, MIB, 99, "tenant");
        assert_eq!(tenant.offset_bytes(), dst.offset_bytes());
        let r = t.wait();
        assert!(
            matches!(r, Err(TierError::InvalidReservation { .. })),
            "{r:?}"
        );
        assert_eq!(
            read_all(&*dev, &tenant),
            tenant_data,
            "the move wrote into a new tenant"
        );
        assert_eq!(read_all(&*h, &src), src_data);
    });
}

// ---------------------------------------------------------------------------------------
// Memory tier lends
// ---------------------------------------------------------------------------------------

fn panics<R>(f: impl FnOnce() -> R) -> bool {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).is_err()
}

/// A panic inside any lend closure releases the lent ranges: the tier stays serviceable, the
/// reservation can be written, read and released.
#[test]
fn a_panic_in_any_lend_closure_releases_the_range() {
    bounded("panicking lends", 30, || {
        for t in [host(MIB), device(MIB, Some(10_000_000_000))] {
            let (r, _) = fill(&*t, 64 * KIB, 1, "t");
            let (r2, _) = fill(&*t, 8 * KIB, 2, "t2");
            assert!(panics(
                || t.read_with(&r, 0, 100, &mut |_| panic!("read_with"))
            ));
            assert!(panics(
                || t.write_with(&r, 10, 100, &mut |_| panic!("write_with"))
            ));
            assert!(panics(|| t.write_ranges_with(
                &r,
                &[(0, 10), (4096, 10)],
                &mut |_| panic!("write_ranges_with")
            )));
            assert!(panics(
                || t.read_many_with(&[r, r2], &mut |_| panic!("read_many"))
            ));
            assert!(panics(
                || t.write_many_with(&[r, r2], &mut |_| panic!("write_many"))
            ));
            let fresh = pattern(64 * KIB as usize, 3);
            t.write(&r, 0, &fresh).unwrap();
            assert_eq!(read_all(&*t, &r), fresh);
            t.write_with(&r, 0, 64 * KIB, &mut |b| {
                b.fill(7);
                Ok(())
            })
            .unwrap()
            .unwrap();
            t.release(r).unwrap();
            t.release(r2).unwrap();
            assert_eq!(t.usage().in_use_bytes, 0);
        }
    });
}

/// `write_ranges_with`: overlapping or duplicate ranges are `Busy` (and leave nothing
/// locked), empty ranges anywhere inside are empty views, out-of-range or overflowing ranges
/// are `OutOfRange`, an empty list lends nothing; disjoint ranges get their own bytes.
#[test]
fn write_ranges_with_refuses_overlaps_and_serves_empty_and_disjoint_ranges() {
    bounded("write_ranges_with", 30, || {
        let t = host(MIB);
        let (r, _) = fill(&*t, 10_000, 1, "t");
        let refused: [&[(u64, u64)]; 4] = [
            &[(0, 100), (50, 100)],
            &[(200, 10), (200, 10)],
            &[(0, 10_000), (9_999, 1)],
            &[(100, 1), (0, 4096), (4000, 200)],
        ];
        for ranges in refused {
            let mut called = false;
            let out = t.write_ranges_with(&r, ranges, &mut |_| {
                called = true;
                Ok(())
            });
            assert!(
                matches!(out, Some(Err(TierError::Busy { .. }))),
                "{ranges:?}: {out:?}"
            );
            assert!(!called);
        }
        for ranges in [
            &[(10_000u64, 1u64)][..],
            &[(0, 10), (u64::MAX, 2)][..],
            &[(10_001, 0)][..],
        ] {
            let out = t.write_ranges_with(&r, ranges, &mut |_| Ok(()));
            assert!(
                matches!(out, Some(Err(TierError::OutOfRange { .. }))),
                "{ranges:?}: {out:?}"
            );
        }
        // Nothing stayed locked: a whole write succeeds.
        t.write(&r, 0, &[9u8; 10_000]).unwrap();
        let mut lens = Vec::new();
        t.write_ranges_with(&r, &[], &mut |v| {
            lens.push(v.len());
            Ok(())
        })
        .unwrap()
        .unwrap();
        t.write_ranges_with(
            &r,
            &[(0, 0), (10_000, 0), (5, 0), (0, 10), (5, 0), (9_990, 10)],
            &mut |v| {
                lens.extend(v.iter().map(|s| s.len()));
                v[3].fill(1);
                v[5].fill(2);
                Ok(())
            },
        )
        .unwrap()
        .unwrap();
        assert_eq!(lens, vec![0, 0, 0, 0, 10, 0, 10]);
        let back = read_all(&*t, &r);
        assert!(back[..10].iter().all(|&b| b == 1));
        assert!(back[10..9_990].iter().all(|&b| b == 9));
        assert!(back[9_990..].iter().all(|&b| b == 2));
        // While one range is lent, another thread can write the bytes between the ranges.
        let t2 = t.clone();
        t.write_ranges_with(&r, &[(0, 100), (9_000, 100)], &mut |_| {
            let t3 = t2.clone();
            std::thread::spawn(move || t3.write(&r, 100, &[3u8; 8_900]))
                .join()
                .unwrap()
        })
        .unwrap()
        .unwrap();
        t.release(r).unwrap();
    });
}

/// `write_many_with` naming one reservation twice is `Busy`, and leaves nothing locked;
/// a reservation of another tier, or a released one, is refused.
#[test]
fn write_many_with_refuses_a_repeated_or_foreign_reservation() {
    bounded("write_many_with", 30, || {
        let t = host(MIB);
        let other = device(MIB, None);
        let (a, _) = fill(&*t, 4096, 1, "a");
        let (b, _) = fill(&*t, 4096, 2, "b");
        let (f, _) = fill(&*other, 4096, 3, "f");
        let (stale, _) = fill(&*t, 4096, 4, "stale");
        t.release(stale).unwrap();
        let out = t.write_many_with(&[a, b, a], &mut |_| Ok(()));
        assert!(matches!(out, Some(Err(TierError::Busy { .. }))), "{out:?}");
        for res in [f, stale] {
            let out = t.write_many_with(&[a, res], &mut |_| Ok(()));
            assert!(
                matches!(out, Some(Err(TierError::InvalidReservation { .. }))),
                "{out:?}"
            );
            let out = t.read_many_with(&[res], &mut |_| Ok(()));
            assert!(
                matches!(out, Some(Err(TierError::InvalidReservation { .. }))),
                "{out:?}"
            );
            let out = t.read_with(&res, 0, 1, &mut |_| Ok(()));
            assert!(
                matches!(out, Some(Err(TierError::InvalidReservation { .. }))),
                "{out:?}"
            );
        }
        // Reading one reservation twice in a batch is fine.
        t.read_many_with(&[a, a], &mut |v| {
            assert_eq!(v[0], v[1]);
            Ok(())
        })
        .unwrap()
        .unwrap();
        t.release(a).unwrap();
        t.release(b).unwrap();
    });
}

/// Concurrent lends of adjacent and overlapping ranges of one host reservation: a reader
/// sees each range either refused (`Busy`) or whole (never a half-written range).
#[test]
fn concurrent_lends_of_adjacent_and_overlapping_ranges_never_tear() {
    bounded("lend races", 60, || {
        let t = host(MIB);
        let r = t.reserve(16 * KIB, "t").unwrap();
        t.write(&r, 0, &[0u8; 16 * 1024]).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let mut hs = Vec::new();
        for w in 0..4u64 {
            let (t, stop) = (t.clone(), stop.clone());
            hs.push(std::thread::spawn(move || {
                let mut v = 0u8;
                while !stop.load(Ordering::Relaxed) {
                    v = v.wrapping_add(1);
                    let _ = t.write_with(&r, w * 4096, 4096, &mut |b| {
                        for x in b.iter_mut() {
                            *x = v;
                        }
                        Ok(())
                    });
                }
            }));
        }
        let mut served = 0;
        let deadline = Instant::now() + Duration::from_millis(800);
        while Instant::now() < deadline {
            for (off, len) in [(0u64, 4096u64), (4096, 8192), (2048, 4096), (0, 16384)] {
                let mut buf = vec![0u8; len as usize];
                match t.read(&r, off, &mut buf) {
                    Ok(()) => {
                        served += 1;
                        // Each 4 KiB piece of the reservation is one writer's: uniform.
                        for page in 0..4u64 {
                            let (s, e) = (page * 4096, page * 4096 + 4096);
                            let (s, e) = (s.max(off), e.min(off + len));
                            if s < e {
                                let part = &buf[(s - off) as usize..(e - off) as usize];
                                assert!(
                                    part.iter().all(|&b| b == part[0]),
                                    "a torn range at {s}..{e}"
                                );
                            }
                        }
                    }
                    Err(TierError::Busy { .. }) => {}
                    Err(e) => panic!("{e:?}"),
                }
            }
        }
        stop.store(true, Ordering::Relaxed);
        for h in hs {
            h.join().unwrap();
        }
        assert!(served > 0);
        t.release(r).unwrap();
    });
}

/// The simulated link is shared: concurrent copies take at least their total bytes over the
/// cap.
#[test]
fn concurrent_copies_share_the_simulated_link() {
    bounded("link cap", 30, || {
        let dev = device(16 * MIB, Some(200_000_000));
        let t0 = Instant::now();
        let hs: Vec<_> = (0..4)
            .map(|i| {
                let dev = dev.clone();
                std::thread::spawn(move || {
                    let r = dev.reserve(2 * MIB, "x").unwrap();
                    dev.write(&r, 0, &pattern(2 * MIB as usize, i)).unwrap();
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
        let took = t0.elapsed();
        // 8 MiB at 200 MB/s is 42 ms.
        assert!(took >= Duration::from_millis(40), "{took:?}");
    });
}

// ---------------------------------------------------------------------------------------
// Disk tier
// ---------------------------------------------------------------------------------------

/// Every accepted unit size (a spread of them), with and without encryption, buffered and
/// direct: partial reads at any offset and length return the bytes written; writes that do
/// not start on a unit or end on one (or at the tensor's end) are `Misaligned`.
#[test]
fn partial_reads_and_misaligned_writes_at_every_unit() {
    bounded("units", 120, || {
        let dir = tempfile::tempdir().unwrap();
        let mut seed = 77u64;
        let mut rnd = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n.max(1)
        };
        for unit in [4 * KIB, 8 * KIB, 32 * KIB, 256 * KIB, MIB, 2 * MIB] {
            for encrypt in [false, true] {
                let opts = DiskOptions {
                    unit_bytes: unit,
                    encrypt,
                    direct_io: !encrypt,
                    file_bytes: Some(12 * KIB * 64),
                    ..disk_opts(dir.path())
                };
                let d = DiskTier::new(alloc(16 * MIB), opts).unwrap();
                for len in [1u64, 4095, 4097, unit - 1, unit + 1, 3 * unit + 5] {
                    let (r, data) = fill(&d, len, len + unit, "t");
                    for _ in 0..12 {
                        let off = rnd(len);
                        let n = 1 + rnd(len - off);
                        let mut b = vec![0u8; n as usize];
                        d.read(&r, off, &mut b).unwrap();
                        assert_eq!(
                            b,
                            data[off as usize..(off + n) as usize],
                            "unit {unit} enc {encrypt} len {len} read {off}+{n}"
                        );
                    }
                    if len > unit {
                        let w = d.write(&r, 1, &[0u8; 10]);
                        assert!(matches!(w, Err(TierError::Misaligned { .. })), "{w:?}");
                        let w = d.write(&r, 0, &vec![0u8; (unit - 1) as usize]);
                        assert!(matches!(w, Err(TierError::Misaligned { .. })), "{w:?}");
                        // A unit-aligned partial write of the last unit is accepted.
                        let last = (len - 1) / unit * unit;
                        let tail = pattern((len - last) as usize, 5);
                        d.write(&r, last, &tail).unwrap();
                        let mut b = vec![0u8; (len - last) as usize];
                        d.read(&r, last, &mut b).unwrap();
                        assert_eq!(b, tail);
                        // The earlier units are intact.
                        let mut head = vec![0u8; last as usize];
                        d.read(&r, 0, &mut head).unwrap();
                        assert_eq!(head, data[..last as usize]);
                    }
                    d.release(r).unwrap();
                }
                assert_eq!(d.live_reservations(), 0);
            }
        }
    });
}

/// Zero and absurd lengths and offsets are typed errors on every tier, never a panic.
#[test]
fn absurd_lengths_and_offsets_are_typed_errors() {
    bounded("absurd ranges", 30, || {
        let dir = tempfile::tempdir().unwrap();
        let d: Arc<dyn TierBackend> =
            Arc::new(DiskTier::new(alloc(MIB), disk_opts(dir.path())).unwrap());
        let h: Arc<dyn TierBackend> = host(MIB);
        let dev: Arc<dyn TierBackend> = device(MIB, Some(1 << 30));
        for t in [d, h, dev] {
            for len in [0u64, MIB + 1, u64::MAX, u64::MAX - 100, u64::MAX - 4095] {
                let r = t.reserve(len, "x");
                assert!(matches!(r, Err(TierError::Alloc { .. })), "{len}: {r:?}");
            }
            let (r, data) = fill(&*t, 5000, 1, "x");
            for (off, n) in [
                (5000u64, 1usize),
                (u64::MAX, 1),
                (u64::MAX - 10, 20),
                (4999, 2),
            ] {
                let mut b = vec![0u8; n];
                let out = t.read(&r, off, &mut b);
                assert!(matches!(out, Err(TierError::OutOfRange { .. })), "{out:?}");
                let out = t.write(&r, off, &b);
                assert!(
                    matches!(
                        out,
                        Err(TierError::OutOfRange { .. } | TierError::Misaligned { .. })
                    ),
                    "{out:?}"
                );
            }
            t.read(&r, 5000, &mut []).unwrap();
            t.write(&r, 5000, &[]).unwrap();
            let cr = t.copy_range(&r, 0, &r, 0, u64::MAX);
            assert!(matches!(cr, Err(TierError::OutOfRange { .. })), "{cr:?}");
            assert_eq!(read_all(&*t, &r), data);
            t.release(r).unwrap();
            let again = t.release(r);
            assert!(
                matches!(again, Err(TierError::InvalidReservation { .. })),
                "{again:?}"
            );
            let stale = t.read(&r, 0, &mut [0u8; 1]);
            assert!(
                matches!(stale, Err(TierError::InvalidReservation { .. })),
                "{stale:?}"
            );
        }
    });
}

/// `AlignedBuf::new` of an absurd length is a typed error, not a panic.
#[test]
fn an_absurd_aligned_buffer_is_a_typed_error() {
    for len in [
        usize::MAX,
        usize::MAX - 4095,
        usize::MAX - (2 << 20),
        usize::MAX / 2,
    ] {
        let r = std::panic::catch_unwind(|| AlignedBuf::new(len).map(|b| b.len()));
        match r {
            Ok(Err(TierError::InvalidConfig(_))) => {}
            Ok(other) => panic!("AlignedBuf::new({len}) gave {other:?}"),
            Err(_) => panic!("AlignedBuf::new({len}) panicked"),
        }
    }
}

/// Every refused disk configuration is a typed error (no panic, nothing left behind in the
/// named directory); extreme accepted ones work.
#[test]
fn extreme_disk_configurations_work_or_are_refused() {
    bounded("disk configs", 60, || {
        let dir = tempfile::tempdir().unwrap();
        let bad = [
            (
                MIB,
                DiskOptions {
                    unit_bytes: 0,
                    ..disk_opts(dir.path())
                },
            ),
            (
                MIB,
                DiskOptions {
                    unit_bytes: 12 * KIB,
                    ..disk_opts(dir.path())
                },
            ),
            (
                MIB,
                DiskOptions {
                    unit_bytes: 2048,
                    ..disk_opts(dir.path())
                },
            ),
            (
                MIB,
                DiskOptions {
                    unit_bytes: 128 << 20,
                    ..disk_opts(dir.path())
                },
            ),
            (
                MIB,
                DiskOptions {
                    unit_bytes: 1 << 63,
                    ..disk_opts(dir.path())
                },
            ),
            (
                MIB,
                DiskOptions {
                    file_bytes: Some(0),
                    ..disk_opts(dir.path())
                },
            ),
            (
                MIB,
                DiskOptions {
                    file_bytes: Some(4097),
                    ..disk_opts(dir.path())
                },
            ),
            (
                8 * MIB,
                DiskOptions {
                    file_bytes: Some(4096),
                    ..disk_opts(dir.path())
                },
            ),
        ];
        for (cap, o) in bad {
            let r = DiskTier::new(alloc(cap), o.clone());
            assert!(
                matches!(r, Err(TierError::InvalidConfig(_))),
                "{o:?}: {r:?}"
            );
        }
        let r = DiskTier::new(alloc(0), disk_opts(dir.path()));
        assert!(matches!(r, Err(TierError::InvalidConfig(_))), "{r:?}");
        let file = dir.path().join("plain");
        std::fs::write(&file, b"x").unwrap();
        let r = DiskTier::new(alloc(MIB), disk_opts(&file));
        assert!(matches!(r, Err(TierError::InvalidConfig(_))), "{r:?}");
        std::fs::remove_file(&file).unwrap();
        // Failing preallocation of the third file: an error, and no file left behind.
        let plan = Arc::new(FaultPlan::new());
        plan.add(FaultRule::once(IoPoint::Allocate, FaultKind::NoSpace).after(2));
        let io = Arc::new(FaultyFileIo::new(Arc::new(RealFileIo), plan));
        let r = DiskTier::with_io(
            alloc(MIB),
            DiskOptions {
                file_bytes: Some(256 * KIB),
                ..disk_opts(dir.path())
            },
            io,
        );
        assert!(matches!(r, Err(TierError::NoSpace { .. })), "{r:?}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        // Accepted extremes: files smaller than a unit, a unit larger than the arena, a
        // batch limit of 0, the most files.
        let goods = [
            (
                MIB,
                DiskOptions {
                    unit_bytes: 64 * KIB,
                    file_bytes: Some(12 * KIB),
                    max_batch_bytes: 0,
                    ..disk_opts(dir.path())
                },
            ),
            (
                MIB,
                DiskOptions {
                    unit_bytes: 64 << 20,
                    ..disk_opts(dir.path())
                },
            ),
            (
                4 * MIB,
                DiskOptions {
                    file_bytes: Some(4096),
                    unit_bytes: 4096,
                    preallocate: false,
                    ..disk_opts(dir.path())
                },
            ),
            (
                MIB,
                DiskOptions {
                    file_bytes: Some(u64::MAX - 4095),
                    ..disk_opts(dir.path())
                },
            ),
        ];
        for (cap, o) in goods {
            let d = DiskTier::new(alloc(cap), o.clone()).unwrap_or_else(|e| panic!("{o:?}: {e}"));
            let len = (cap / 2).min(300 * KIB) + 17;
            let (r, data) = fill(&d, len, 3, "t");
            assert_eq!(read_all(&d, &r), data, "{o:?}");
            let mut part = vec![0u8; 7000];
            d.read(&r, 12_000, &mut part).unwrap();
            assert_eq!(part, data[12_000..19_000]);
            // Batches across file boundaries.
            let items: Vec<(Reservation, Vec<u8>)> = (0..5u64)
                .map(|i| {
                    let l = 3000 + i * 5000;
                    (d.reserve(l, "b").unwrap(), pattern(l as usize, 50 + i))
                })
                .collect();
            let writes: Vec<(Reservation, &[u8])> =
                items.iter().map(|(r, v)| (*r, v.as_slice())).collect();
            d.write_batch(&writes).unwrap();
            let mut outs: Vec<Vec<u8>> = items.iter().map(|(_, v)| vec![0u8; v.len()]).collect();
            let mut reads: Vec<(Reservation, &mut [u8])> = items
                .iter()
                .zip(outs.iter_mut())
                .map(|((r, _), o)| (*r, o.as_mut_slice()))
                .collect();
            d.read_batch(&mut reads).unwrap();
            for ((_, v), o) in items.iter().zip(&outs) {
                assert_eq!(v, o, "{o:?}");
            }
            drop(d);
        }
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    });
}

/// Batches with a repeated reservation, adjacent reservations and extents read back
/// exactly; a batch naming a reservation twice reads the same bytes twice.
#[test]
fn disk_batches_with_repeats_and_extents_read_back_exactly() {
    bounded("disk batches", 30, || {
        let dir = tempfile::tempdir().unwrap();
        for encrypt in [false, true] {
            let d = DiskTier::new(
                alloc(8 * MIB),
                DiskOptions {
                    encrypt,
                    unit_bytes: 4096,
                    max_batch_bytes: 20 * KIB,
                    ..disk_opts(dir.path())
                },
            )
            .unwrap();
            let a = d.reserve(5000, "a").unwrap();
            let b = d.reserve(8192, "b").unwrap();
            let c = d.reserve(1, "c").unwrap();
            let (da, db, dc) = (pattern(5000, 1), pattern(8192, 2), pattern(1, 3));
            d.write_batch(&[(c, &dc), (a, &da), (b, &db)]).unwrap();
            let file = dir.path().join("ckpt");
            let fbytes = pattern(30_000, 4);
            std::fs::write(&file, &fbytes).unwrap();
            let ext = d.register_extent(&file, 4095, 9000, "ext").unwrap();
            let (mut o1, mut o2, mut o3, mut o4) = (
                vec![0u8; 5000],
                vec![0u8; 5000],
                vec![0u8; 9000],
                vec![0u8; 1],
            );
            let mut items: Vec<(Reservation, &mut [u8])> =
                vec![(a, &mut o1), (a, &mut o2), (ext, &mut o3), (c, &mut o4)];
            d.read_batch(&mut items).unwrap();
            assert_eq!((o1 == da, o2 == da), (true, true));
            assert_eq!(o3, fbytes[4095..13_095]);
            assert_eq!(o4, dc);
            let mut ob = vec![0u8; 8192];
            d.read_batch(&mut [(b, &mut ob[..])]).unwrap();
            assert_eq!(ob, db);
            let wrong = d.read_batch(&mut [(b, &mut o1[..])]);
            assert!(
                matches!(wrong, Err(TierError::LengthMismatch { .. })),
                "{wrong:?}"
            );
            let ro = d.write_batch(&[(ext, &o3)]);
            assert!(matches!(ro, Err(TierError::ReadOnly { .. })), "{ro:?}");
            for r in [a, b, c, ext] {
                d.release(r).unwrap();
            }
            std::fs::remove_file(&file).unwrap();
        }
    });
}

/// Concurrent writers and readers of adjacent and overlapping units of one disk tensor: a
/// read is refused (`Busy`) or returns whole units as some write left them; never `Corrupt`,
/// never a torn unit.
#[test]
fn concurrent_disk_writers_and_readers_of_adjacent_units_never_tear() {
    bounded("disk races", 120, || {
        let dir = tempfile::tempdir().unwrap();
        for (encrypt, direct) in [(false, true), (true, true), (false, false)] {
            let d = Arc::new(
                DiskTier::new(
                    alloc(4 * MIB),
                    DiskOptions {
                        encrypt,
                        direct_io: direct,
                        unit_bytes: 4096,
                        ..disk_opts(dir.path())
                    },
                )
                .unwrap(),
            );
            let len = 3 * 4096 + 100;
            let r = d.reserve(len, "t").unwrap();
            d.write(&r, 0, &vec![0u8; len as usize]).unwrap();
            let stop = Arc::new(AtomicBool::new(false));
            let mut hs = Vec::new();
            for unit in 0..4u64 {
                let (d, stop) = (d.clone(), stop.clone());
                hs.push(std::thread::spawn(move || {
                    let n = if unit == 3 { 100 } else { 4096 };
                    let mut v = 0u8;
                    let mut done = 0;
                    while !stop.load(Ordering::Relaxed) {
                        v = v.wrapping_add(1);
                        match d.write(&r, unit * 4096, &vec![v; n]) {
                            Ok(()) => done += 1,
                            Err(TierError::Busy { .. }) => {}
                            Err(e) => panic!("{e:?}"),
                        }
                    }
                    done
                }));
            }
            let deadline = Instant::now() + Duration::from_millis(600);
            let mut served = 0;
            while Instant::now() < deadline {
                for (off, n) in [
                    (0u64, 4096u64),
                    (4096, 100),
                    (4000, 200),
                    (0, len),
                    (12_288, 100),
                ] {
                    let mut b = vec![0u8; n as usize];
                    match d.read(&r, off, &mut b) {
                        Ok(()) => {
                            served += 1;
                            for unit in 0..4u64 {
                                let (s, e) = (unit * 4096, (unit * 4096 + 4096).min(len));
                                let (s, e) = (s.max(off), e.min(off + n));
                                if s < e {
                                    let p = &b[(s - off) as usize..(e - off) as usize];
                                    assert!(p.iter().all(|&x| x == p[0]), "torn unit {unit}");
                                }
                            }
                        }
                        Err(TierError::Busy { .. }) => {}
                        Err(e) => panic!("enc {encrypt} direct {direct}: {e:?}"),
                    }
                }
            }
            stop.store(true, Ordering::Relaxed);
            for h in hs {
                assert!(h.join().unwrap() > 0);
            }
            assert!(served > 0);
            d.release(r).unwrap();
        }
    });
}

/// After a failed sync, everything written since the last good sync reads `NotWritten`; a
/// later good sync does not bring it back, and a rewrite does.
#[test]
fn a_failed_sync_invalidates_and_a_retry_does_not_resurrect() {
    bounded("fsyncgate", 30, || {
        let dir = tempfile::tempdir().unwrap();
        let plan = Arc::new(FaultPlan::new());
        let io = Arc::new(FaultyFileIo::new(Arc::new(RealFileIo), plan.clone()));
        let d = DiskTier::with_io(
            alloc(MIB),
            DiskOptions {
                direct_io: false,
                unit_bytes: 4096,
                ..disk_opts(dir.path())
            },
            io,
        )
        .unwrap();
        let (a, da) = fill(&d, 9000, 1, "a");
        d.flush().unwrap();
        let (b, db) = fill(&d, 9000, 2, "b");
        plan.add(FaultRule::once(IoPoint::Sync, FaultKind::Eio));
        assert!(d.flush().is_err());
        d.flush().unwrap();
        assert_eq!(
            read_all(&d, &a),
            da,
            "a unit synced before the failure was lost"
        );
        let mut buf = vec![0u8; 9000];
        let r = d.read(&b, 0, &mut buf);
        assert!(matches!(r, Err(TierError::NotWritten { .. })), "{r:?}");
        d.write(&b, 0, &db).unwrap();
        d.flush().unwrap();
        assert_eq!(read_all(&d, &b), db);
    });
}

// ---------------------------------------------------------------------------------------
// Extents
// ---------------------------------------------------------------------------------------

/// Reads of extents at any offset, length and buffer phase (the O_DIRECT middle path and
/// the bounced head and tail) return the file's bytes.
#[test]
fn extent_reads_at_any_offset_length_and_buffer_phase_return_the_files_bytes() {
    bounded("extent reads", 60, || {
        let dir = tempfile::tempdir().unwrap();
        let d = DiskTier::new(alloc(MIB), disk_opts(dir.path())).unwrap();
        let file = dir.path().join("ckpt");
        let fbytes = pattern(70_001, 11);
        std::fs::write(&file, &fbytes).unwrap();
        let mut seed = 99u64;
        let mut rnd = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n.max(1)
        };
        let mut big = AlignedBuf::new(80_000).unwrap();
        for &(foff, flen) in &[
            (0u64, 70_001u64),
            (1, 70_000),
            (4096, 8192),
            (70_000, 1),
            (4095, 40_000),
        ] {
            let ext = d.register_extent(&file, foff, flen, "e").unwrap();
            for _ in 0..40 {
                let off = rnd(flen);
                let n = 1 + rnd(flen - off);
                let phase = rnd(4096) as usize;
                let dst = &mut big.as_mut_slice()[phase..phase + n as usize];
                d.read(&ext, off, dst).unwrap();
                let want = &fbytes[(foff + off) as usize..(foff + off + n) as usize];
                assert!(
                    dst == want,
                    "extent {foff}+{flen}, read {off}+{n} at phase {phase}"
                );
            }
            d.release(ext).unwrap();
        }
        for (foff, flen) in [
            (0u64, 0u64),
            (70_001, 1),
            (70_000, 2),
            (u64::MAX, 1),
            (1, u64::MAX),
        ] {
            let r = d.register_extent(&file, foff, flen, "bad");
            assert!(
                matches!(r, Err(TierError::InvalidConfig(_))),
                "{foff}+{flen}: {r:?}"
            );
        }
        let r = d.register_extent(dir.path(), 0, 1, "a directory");
        assert!(r.is_err(), "{r:?}");
        let r = d.register_extent(&dir.path().join("missing"), 0, 1, "missing");
        assert!(r.is_err(), "{r:?}");
    });
}

/// An extent whose file shrinks after registration reads as a typed error (`ShortRead`),
/// and one whose bytes change in place reads the new bytes (the file is the truth).
#[test]
fn an_extent_of_a_file_that_shrinks_or_changes_reads_typed_or_current() {
    bounded("changing extents", 30, || {
        let dir = tempfile::tempdir().unwrap();
        let d = DiskTier::new(alloc(MIB), disk_opts(dir.path())).unwrap();
        let file = dir.path().join("ckpt");
        std::fs::write(&file, pattern(50_000, 1)).unwrap();
        let ext = d.register_extent(&file, 10_000, 30_000, "e").unwrap();
        let changed = pattern(50_000, 2);
        std::fs::write(&file, &changed).unwrap(); // truncates and rewrites in place
        let mut b = vec![0u8; 30_000];
        d.read(&ext, 0, &mut b).unwrap();
        assert_eq!(b, changed[10_000..40_000]);
        let f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
        f.set_len(20_000).unwrap();
        for (off, n) in [
            (0u64, 30_000usize),
            (15_000, 100),
            (9_000, 2_000),
            (29_999, 1),
        ] {
            let mut b = vec![0u8; n];
            let r = d.read(&ext, off, &mut b);
            assert!(
                matches!(r, Err(TierError::ShortRead { .. })),
                "{off}+{n}: {r:?}"
            );
        }
        let mut b = vec![0u8; 5_000];
        d.read(&ext, 0, &mut b).unwrap();
        assert_eq!(b, changed[10_000..15_000]);
    });
}

/// `register_extent(path, ..)` registers bytes of the file that is at `path` now: after the
/// checkpoint is replaced (written anew and renamed over the old name), a new registration
/// reads the new file, and may reach bytes past the old file's end.
#[test]
fn register_extent_reads_the_file_now_at_the_path() {
    bounded("replaced checkpoint", 30, || {
        let dir = tempfile::tempdir().unwrap();
        let d = DiskTier::new(alloc(MIB), disk_opts(dir.path())).unwrap();
        let file = dir.path().join("model.safetensors");
        std::fs::write(&file, vec![0xAAu8; 8192]).unwrap();
        let old = d.register_extent(&file, 0, 4096, "w").unwrap();
        assert!(read_all(&d, &old).iter().all(|&b| b == 0xAA));
        let tmp = dir.path().join("model.safetensors.tmp");
        std::fs::write(&tmp, vec![0xBBu8; 16384]).unwrap();
        std::fs::rename(&tmp, &file).unwrap();
        let new = d.register_extent(&file, 0, 4096, "w").unwrap();
        let bytes = read_all(&d, &new);
        assert!(
            bytes.iter().all(|&b| b == 0xBB),
            "a registration after the file was replaced reads the old file ({:#x})",
            bytes[0]
        );
        let past = d.register_extent(&file, 8192, 8192, "w2");
        assert!(
            past.is_ok(),
            "bytes past the old file's end refused: {past:?}"
        );
    });
}

/// An extent of something that is not a regular file (a FIFO) is refused with a typed error;
/// the call never blocks.
#[test]
fn register_extent_of_a_fifo_is_refused_without_blocking() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo");
    let ok = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        eprintln!("skipped: no mkfifo");
        return;
    }
    let d = Arc::new(DiskTier::new(alloc(MIB), disk_opts(dir.path())).unwrap());
    let (d2, f2) = (d.clone(), fifo.clone());
    let r = bounded("extent of a FIFO", 5, move || {
        d2.register_extent(&f2, 0, 1, "fifo").map(|_| ())
    });
    assert!(matches!(r, Err(TierError::InvalidConfig(_))), "{r:?}");
}

/// A tier refuses another tier's reservation (foreign), extents included: it cannot read or
/// release one of its own extents through a reservation another disk tier handed out.
#[test]
fn a_foreign_disk_tiers_extent_reservation_is_refused() {
    bounded("foreign extents", 30, || {
        let dir = tempfile::tempdir().unwrap();
        let a = DiskTier::new(alloc(MIB), disk_opts(dir.path())).unwrap();
        let b = DiskTier::new(alloc(MIB), disk_opts(dir.path())).unwrap();
        let fa = dir.path().join("a.bin");
        let fb = dir.path().join("b.bin");
        std::fs::write(&fa, vec![1u8; 4096]).unwrap();
        std::fs::write(&fb, vec![2u8; 4096]).unwrap();
        let ra = a.register_extent(&fa, 0, 4096, "wa").unwrap();
        let rb = b.register_extent(&fb, 0, 4096, "wb").unwrap();
        let mut buf = vec![0u8; 4096];
        let r = b.read(&ra, 0, &mut buf);
        assert!(
            matches!(r, Err(TierError::InvalidReservation { .. })),
            "tier B read tier A's extent reservation: {r:?} (bytes {:#x})",
            buf[0]
        );
        let rel = b.release(ra);
        assert!(
            matches!(rel, Err(TierError::InvalidReservation { .. })),
            "{rel:?}"
        );
        assert!(read_all(&b, &rb).iter().all(|&x| x == 2));
    });
}

// ---------------------------------------------------------------------------------------
// copy_range
// ---------------------------------------------------------------------------------------

/// `copy_range` inside one reservation with overlapping ranges moves the bytes as a memmove
/// on every tier (the memory tiers do; the disk tier's pieces must not read bytes it has
/// already overwritten).
#[test]
fn an_overlapping_copy_inside_one_reservation_is_a_memmove_on_every_tier() {
    bounded("overlapping copy_range", 60, || {
        let dir = tempfile::tempdir().unwrap();
        let d: Arc<dyn TierBackend> = Arc::new(
            DiskTier::new(
                alloc(16 * MIB),
                DiskOptions {
                    unit_bytes: 4096,
                    ..disk_opts(dir.path())
                },
            )
            .unwrap(),
        );
        let h: Arc<dyn TierBackend> = host(16 * MIB);
        for t in [h, d] {
            let len = 12 * MIB;
            let (r, data) = fill(&*t, len, 5, "t");
            t.copy_range(&r, 0, &r, 4 * MIB, 8 * MIB).unwrap();
            let back = read_all(&*t, &r);
            assert!(
                back[4 * MIB as usize..] == data[..8 * MIB as usize],
                "{:?}: an overlapping forward copy is not a memmove",
                t.tier()
            );
            t.release(r).unwrap();
        }
    });
}

/// Copies between two disk reservations work for every accepted unit, whole tensors of odd
/// lengths included.
#[test]
fn disk_copies_of_whole_odd_tensors_work_at_every_unit() {
    bounded("disk copy_range", 120, || {
        let dir = tempfile::tempdir().unwrap();
        for unit in [4 * KIB, 64 * KIB, MIB, 8 * MIB] {
            let d = DiskTier::new(
                alloc(32 * MIB),
                DiskOptions {
                    unit_bytes: unit,
                    ..disk_opts(dir.path())
                },
            )
            .unwrap();
            for len in [1u64, unit + 5, 6 * MIB + 5] {
                let (a, data) = fill(&d, len, 3, "a");
                let b = d.reserve(len, "b").unwrap();
                d.copy_range(&a, 0, &b, 0, len).unwrap();
                assert_eq!(read_all(&d, &b), data, "unit {unit} len {len}");
                d.release(a).unwrap();
                d.release(b).unwrap();
            }
        }
    });
}

/// A full disk (a 1 MiB tmpfs; root only, skipped elsewhere): moves fail with `NoSpace`, the
/// source stays intact, nothing written before is lost.
#[test]
fn a_full_tmpfs_fails_moves_with_no_space_and_keeps_earlier_tensors() {
    bounded("full tmpfs", 60, || {
        let dir = tempfile::tempdir().unwrap();
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs"])
            .arg(dir.path())
            .stderr(std::process::Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !mounted {
            eprintln!("skipped: cannot mount a tmpfs here");
            return;
        }
        struct Unmount(std::path::PathBuf);
        impl Drop for Unmount {
            fn drop(&mut self) {
                let _ = std::process::Command::new("umount").arg(&self.0).status();
            }
        }
        let _g = Unmount(dir.path().to_path_buf());
        let d = Arc::new(
            DiskTier::new(
                alloc(8 * MIB),
                DiskOptions {
                    preallocate: false,
                    unit_bytes: 64 * KIB,
                    ..disk_opts(dir.path())
                },
            )
            .unwrap(),
        );
        let h = host(8 * MIB);
        let cfg = EngineConfig {
            chunk_bytes: 256 * KIB,
            ..EngineConfig::default()
        };
        let e = TransferEngine::new(&[h.clone(), d.clone()], cfg).unwrap();
        let mut kept = Vec::new();
        let mut full = false;
        for i in 0..16u64 {
            let (src, data) = fill(&*h, 300 * KIB, i, "t");
            let dst = d.reserve(300 * KIB, "t").unwrap();
            match e
                .submit(Move { src, dst }, Priority::WriteBack)
                .unwrap()
                .wait()
            {
                Ok(_) => kept.push((dst, data)),
                Err(TierError::NoSpace { .. }) => {
                    full = true;
                    assert_eq!(read_all(&*h, &src), data);
                    let mut b = vec![0u8; 300 * KIB as usize];
                    let r = d.read(&dst, 0, &mut b);
                    assert!(r.is_err(), "a failed move left a readable destination");
                    d.release(dst).unwrap();
                    break;
                }
                Err(other) => panic!("{other:?}"),
            }
        }
        assert!(full, "a 1 MiB tmpfs never filled");
        for (dst, data) in &kept {
            assert_eq!(&read_all(&*d, dst), data);
        }
    });
}

/// Tiers that fail every call (EIO, ENOSPC, short transfers for ever, at every point): every
/// move fails with a typed error in bounded time, the sources stay intact, the engine's
/// counters say so, and once the faults stop the same engine and tiers serve again.
#[test]
fn tiers_failing_every_call_fail_every_move_typed_and_recover() {
    bounded("always failing tiers", 120, || {
        let dir = tempfile::tempdir().unwrap();
        for kind in [FaultKind::Eio, FaultKind::NoSpace, FaultKind::Short] {
            let dplan = Arc::new(FaultPlan::new());
            let io = Arc::new(FaultyFileIo::new(Arc::new(RealFileIo), dplan.clone()));
            let d = Arc::new(
                DiskTier::with_io(
                    alloc(8 * MIB),
                    DiskOptions {
                        direct_io: false,
                        unit_bytes: 4096,
                        ..disk_opts(dir.path())
                    },
                    io,
                )
                .unwrap(),
            );
            let vplan = Arc::new(FaultPlan::new());
            let dev = Arc::new(FaultyTier::new(device(8 * MIB, None), vplan.clone()));
            let h = host(8 * MIB);
            let cfg = EngineConfig {
                chunk_bytes: 64 * KIB,
                ..EngineConfig::default()
            };
            let e = TransferEngine::new(&[h.clone(), d.clone(), dev.clone()], cfg).unwrap();
            let len = 200 * KIB + 3;
            let (hs, hdata) = fill(&*h, len, 1, "h");
            let (ds, ddata) = fill(&*d, len, 2, "d");
            let (vs, vdata) = fill(&*dev, len, 3, "v");
            let hd = h.reserve(len, "hd").unwrap();
            let dd = d.reserve(len, "dd").unwrap();
            let vd = dev.reserve(len, "vd").unwrap();
            for p in [IoPoint::Write, IoPoint::Read, IoPoint::Sync] {
                dplan.add(FaultRule::always(p, kind));
                vplan.add(FaultRule::always(p, kind));
            }
            let moves = [
                Move { src: hs, dst: dd },
                Move { src: ds, dst: hd },
                Move { src: vs, dst: dd },
                Move { src: ds, dst: vd },
                Move { src: hs, dst: vd },
                Move { src: vs, dst: hd },
            ];
            let before = e.stats();
            for (i, mv) in moves.iter().enumerate() {
                for _ in 0..3 {
                    let r = e.submit(*mv, Priority::ALL[i % 3]).unwrap().wait();
                    assert!(
                        matches!(
                            r,
                            Err(TierError::Io { .. }
                                | TierError::NoSpace { .. }
                                | TierError::ShortRead { .. }
                                | TierError::ShortWrite { .. })
                        ),
                        "{kind:?} move {i}: {r:?}"
                    );
                }
                let b = e.submit_batch(vec![*mv], Priority::Demand).unwrap().wait();
                assert!(b.is_err(), "{kind:?} batch {i}: {b:?}");
            }
            let after = e.stats();
            assert_eq!(after.jobs_failed - before.jobs_failed, 24);
            assert_eq!(after.jobs_succeeded, before.jobs_succeeded);
            dplan.clear();
            vplan.clear();
            assert_eq!(read_all(&*h, &hs), hdata);
            assert_eq!(read_all(&*d, &ds), ddata);
            assert_eq!(read_all(&*dev, &vs), vdata);
            for (mv, want) in moves
                .iter()
                .zip([&hdata, &ddata, &vdata, &ddata, &hdata, &vdata])
            {
                e.submit(*mv, Priority::Demand).unwrap().wait().unwrap();
                let t: &dyn TierBackend = match mv.dst.tier() {
                    Tier::Host => &*h,
                    Tier::Disk => &*d,
                    Tier::Device => &*dev,
                };
                assert_eq!(&read_all(t, &mv.dst), want);
            }
        }
    });
}

/// `wait_timeout` with a zero timeout hands a running ticket back; with a timeout too large
/// to be a point in time it waits like `wait`.
#[test]
fn wait_timeout_extremes_hand_back_or_wait() {
    bounded("wait_timeout extremes", 30, || {
        let h = host(4 * MIB);
        let plan = Arc::new(FaultPlan::new());
        let dev = Arc::new(FaultyTier::new(device(4 * MIB, None), plan.clone()));
        plan.add(FaultRule::once(
            IoPoint::Write,
            FaultKind::Slow(Duration::from_millis(200)),
        ));
        let e = engine(&[h.clone(), dev.clone()]);
        let (src, data) = fill(&*h, 4096, 1, "s");
        let dst = dev.reserve(4096, "d").unwrap();
        let t = e.submit(Move { src, dst }, Priority::Demand).unwrap();
        let t = match t.wait_timeout(Duration::ZERO) {
            Err(t) => t,
            Ok(r) => panic!("a 200 ms move finished at once: {r:?}"),
        };
        let (done, total) = t.progress_bytes();
        assert!(done <= total && total == 4096);
        match t.wait_timeout(Duration::MAX) {
            Ok(r) => assert_eq!(r.unwrap().bytes, 4096),
            Err(_) => panic!("an unbounded wait_timeout returned before the end"),
        }
        assert_eq!(read_all(&*dev, &dst), data);
    });
}

/// An empty read or write touches no bytes, so it is never refused: not while another thread
/// holds a lend of the range (the disk tier already answers `Ok` at once).
#[test]
fn an_empty_read_or_write_is_never_busy() {
    bounded("empty ops during a lend", 30, || {
        let t = host(MIB);
        let (r, _) = fill(&*t, 8192, 1, "t");
        let t2 = t.clone();
        t.write_with(&r, 0, 4096, &mut |_| {
            let t3 = t2.clone();
            std::thread::spawn(move || {
                let rd = t3.read(&r, 100, &mut []);
                let wr = t3.write(&r, 100, &[]);
                assert!(rd.is_ok() && wr.is_ok(), "read {rd:?}, write {wr:?}");
            })
            .join()
            .map_err(|_| TierError::Cancelled)
        })
        .unwrap()
        .unwrap();
    });
}

// ---------------------------------------------------------------------------------------
// Classes of the failures above: concurrent syncs, panics anywhere in a job, empty ranges,
// repeated destinations, non-regular extent files, overlapping copies
// ---------------------------------------------------------------------------------------

/// A `FileIo` whose first sync takes `delay` and then fails with EIO (after the real sync);
/// later syncs succeed at once.
#[derive(Debug)]
struct FirstSyncFailsLate {
    inner: Arc<dyn FileIo>,
    delay: Duration,
    syncs: AtomicUsize,
}

impl FileIo for FirstSyncFailsLate {
    fn open_swap(&self, dir: &Path, direct: bool) -> std::io::Result<std::fs::File> {
        self.inner.open_swap(dir, direct)
    }
    fn open_read_only(&self, path: &Path, direct: bool) -> std::io::Result<std::fs::File> {
        self.inner.open_read_only(path, direct)
    }
    fn allocate(&self, file: &std::fs::File, len_bytes: u64) -> std::io::Result<()> {
        self.inner.allocate(file, len_bytes)
    }
    fn write_at(&self, file: &std::fs::File, off: u64, buf: &[u8]) -> std::io::Result<usize> {
        self.inner.write_at(file, off, buf)
    }
    fn read_at(&self, file: &std::fs::File, off: u64, buf: &mut [u8]) -> std::io::Result<usize> {
        self.inner.read_at(file, off, buf)
    }
    fn sync_data(&self, file: &std::fs::File) -> std::io::Result<()> {
        let r = self.inner.sync_data(file);
        if self.syncs.fetch_add(1, Ordering::SeqCst) == 0 {
            std::thread::sleep(self.delay);
            return Err(std::io::Error::from_raw_os_error(libc::EIO));
        }
        r
    }
}

/// A sync that fails while another job's sync succeeds: the failing one had taken (and so
/// invalidates) the other job's earlier writes, so that job must not report `Ok` either,
/// even though its own sync returned first and succeeded.
#[test]
fn a_sync_failing_while_another_jobs_sync_succeeds_fails_both() {
    bounded("concurrent syncs", 30, || {
        let dir = tempfile::tempdir().unwrap();
        let late = Arc::new(FirstSyncFailsLate {
            inner: Arc::new(RealFileIo),
            delay: Duration::from_millis(400),
            syncs: AtomicUsize::new(0),
        });
        // B's second chunk (disk bytes 64..128 KiB) takes 150 ms: B's sync starts while A's
        // failing sync, which holds B's first chunk, still runs.
        let io = Arc::new(SlowWrites::new(
            late,
            vec![(64 * KIB, 128 * KIB, Duration::from_millis(150))],
            Duration::ZERO,
        ));
        let opts = DiskOptions {
            direct_io: false,
            unit_bytes: 4096,
            ..disk_opts(dir.path())
        };
        let d = Arc::new(DiskTier::with_io(alloc(MIB), opts, io).unwrap());
        let h = host(MIB);
        let cfg = EngineConfig {
            workers: 3,
            chunk_bytes: 64 * KIB,
            ..EngineConfig::default()
        };
        let e = TransferEngine::new(&[h.clone(), d.clone()], cfg).unwrap();
        let (src_b, data_b) = fill(&*h, 128 * KIB, 1, "b");
        let (src_a, _) = fill(&*h, 64 * KIB, 2, "a");
        let dst_b = d.reserve(128 * KIB, "b").unwrap();
        let dst_a = d.reserve(64 * KIB, "a").unwrap();
        assert_eq!((dst_b.offset_bytes(), dst_a.offset_bytes()), (0, 128 * KIB));
        let mv_b = Move {
            src: src_b,
            dst: dst_b,
        };
        let tb = e.submit(mv_b, Priority::Demand).unwrap();
        std::thread::sleep(Duration::from_millis(30));
        let mv_a = Move {
            src: src_a,
            dst: dst_a,
        };
        let ta = e.submit(mv_a, Priority::Demand).unwrap();
        let (ra, rb) = (ta.wait(), tb.wait());
        assert!(
            matches!(
                ra,
                Err(TierError::Io {
                    point: IoPoint::Sync,
                    ..
                })
            ),
            "{ra:?}"
        );
        let mut back = vec![0u8; 128 * KIB as usize];
        let read = d.read(&dst_b, 0, &mut back);
        match (&rb, &read) {
            (
                Err(TierError::Io {
                    point: IoPoint::Sync,
                    ..
                }),
                _,
            ) => {}
            (Ok(_), Ok(())) if back == data_b => {}
            _ => panic!("job B reported {rb:?}, its destination reads back as {read:?}"),
        }
    });
}

/// A tier that panics in its first flush (and needs one), or on its first read: the panic is
/// caught wherever in a job it happens.
#[derive(Debug)]
struct PanicsOnce {
    inner: Arc<MemoryTier>,
    in_flush: bool,
    panicked: AtomicBool,
}

impl PanicsOnce {
    fn maybe_panic(&self, flush: bool) {
        if flush == self.in_flush && !self.panicked.swap(true, Ordering::SeqCst) {
            panic!("injected panic");
        }
    }
}

impl TierBackend for PanicsOnce {
    fn tier(&self) -> Tier {
        self.inner.tier()
    }
    fn describe(&self) -> String {
        "panics once".into()
    }
    fn capacity_bytes(&self) -> u64 {
        self.inner.capacity_bytes()
    }
    fn usage(&self) -> vlmem_core::ArenaUsage {
        self.inner.usage()
    }
    fn reserve(&self, len_bytes: u64, name: &str) -> vlmem_tier::Result<Reservation> {
        self.inner.reserve(len_bytes, name)
    }
    fn release(&self, res: Reservation) -> vlmem_tier::Result<()> {
        self.inner.release(res)
    }
    fn write(&self, res: &Reservation, off: u64, src: &[u8]) -> vlmem_tier::Result<()> {
        self.inner.write(res, off, src)
    }
    fn read(&self, res: &Reservation, off: u64, dst: &mut [u8]) -> vlmem_tier::Result<()> {
        self.maybe_panic(false);
        self.inner.read(res, off, dst)
    }
    fn flush(&self) -> vlmem_tier::Result<()> {
        self.maybe_panic(true);
        Ok(())
    }
    fn needs_flush(&self) -> bool {
        self.in_flush
    }
}

/// A panic in a destination's flush or in a batch's reads fails that job with
/// `TierError::Panicked`, and the one worker goes on serving the next job.
#[test]
fn a_tier_panicking_in_a_flush_or_a_batch_fails_its_job_and_the_engine_goes_on() {
    bounded("panics in flushes and batches", 30, || {
        for in_flush in [true, false] {
            let h = host(4 * MIB);
            let odd = Arc::new(PanicsOnce {
                inner: device(4 * MIB, None),
                in_flush,
                panicked: AtomicBool::new(false),
            });
            let cfg = EngineConfig {
                workers: 1,
                ..EngineConfig::default()
            };
            let e = TransferEngine::new(&[h.clone(), odd.clone()], cfg).unwrap();
            for round in 0..2 {
                let (a, data_a) = fill(&*h, 5000, 1, "a");
                let (b, _) = fill(&*odd, 6000, 2, "b");
                let a2 = odd.reserve(5000, "a2").unwrap();
                let b2 = h.reserve(6000, "b2").unwrap();
                // Into the tier (its flush), then out of it as a batch (its reads).
                let into = e
                    .submit(Move { src: a, dst: a2 }, Priority::Demand)
                    .unwrap();
                let out = e
                    .submit_batch(vec![Move { src: b, dst: b2 }], Priority::Demand)
                    .unwrap();
                let (ri, ro) = match (
                    into.wait_timeout(Duration::from_secs(5)),
                    out.wait_timeout(Duration::from_secs(5)),
                ) {
                    (Ok(ri), Ok(ro)) => (ri, ro),
                    _ => panic!("a ticket never completed after a panic (flush {in_flush})"),
                };
                let failed = if in_flush { &ri } else { &ro };
                let other = if in_flush { &ro } else { &ri };
                if round == 0 {
                    assert!(
                        matches!(failed, Err(TierError::Panicked { detail }) if detail.contains("injected")),
                        "{failed:?}"
                    );
                } else {
                    assert!(failed.is_ok(), "round {round}: {failed:?}");
                }
                assert!(other.is_ok(), "{other:?}");
                if ri.is_ok() {
                    assert_eq!(read_all(&*odd, &a2), data_a);
                }
            }
        }
    });
}

/// Every empty access of a memory tier at a lent offset answers at once: lends of 0 bytes,
/// empty copies (inside one reservation and between two), and they still refuse a released
/// reservation.
#[test]
fn empty_lends_and_copies_at_a_lent_offset_are_never_busy() {
    bounded("empty accesses during a lend", 30, || {
        for t in [host(MIB), device(MIB, None)] {
            let (r, _) = fill(&*t, 8192, 1, "t");
            let (other, _) = fill(&*t, 8192, 2, "o");
            let t2 = t.clone();
            t.write_with(&r, 0, 8192, &mut |_| {
                let t3 = t2.clone();
                std::thread::spawn(move || {
                    let rd = t3.read_with(&r, 100, 0, &mut |s| {
                        assert!(s.is_empty());
                        Ok(())
                    });
                    let wr = t3.write_with(&r, 8192, 0, &mut |s| {
                        assert!(s.is_empty());
                        Ok(())
                    });
                    let inside = t3.copy_range(&r, 0, &r, 4096, 0);
                    let between = t3.copy_range(&other, 0, &r, 10, 0);
                    assert!(
                        matches!(rd, Some(Ok(())))
                            && matches!(wr, Some(Ok(())))
                            && inside.is_ok()
                            && between.is_ok(),
                        "{rd:?} {wr:?} {inside:?} {between:?}"
                    );
                })
                .join()
                .map_err(|_| TierError::Cancelled)
            })
            .unwrap()
            .unwrap();
            t.release(other).unwrap();
            for r2 in [
                t.read(&other, 0, &mut []),
                t.write(&other, 0, &[]),
                t.copy_range(&other, 0, &r, 0, 0),
            ] {
                assert!(
                    matches!(r2, Err(TierError::InvalidReservation { .. })),
                    "{r2:?}"
                );
            }
            let past = t.read(&r, 8193, &mut []);
            assert!(
                matches!(past, Err(TierError::OutOfRange { .. })),
                "{past:?}"
            );
        }
    });
}

/// `write_batch` naming one reservation twice is refused by each tier itself (not only by
/// the engine), before anything is written.
#[test]
fn write_batch_naming_one_reservation_twice_is_refused_by_every_tier() {
    bounded("write_batch repeats", 30, || {
        let dir = tempfile::tempdir().unwrap();
        let d: Arc<dyn TierBackend> = Arc::new(disk_in(dir.path(), 8 * MIB, Arc::new(RealFileIo)));
        let h: Arc<dyn TierBackend> = host(8 * MIB);
        let plan = Arc::new(FaultPlan::new());
        let f: Arc<dyn TierBackend> = Arc::new(FaultyTier::new(device(8 * MIB, None), plan));
        for t in [d, h, f] {
            let (r, data) = fill(&*t, 4096, 1, "r");
            let (a, b) = (pattern(4096, 2), pattern(4096, 3));
            let w = t.write_batch(&[(r, &a), (r, &b)]);
            assert!(
                matches!(w, Err(TierError::Busy { .. })),
                "{:?}: {w:?}",
                t.tier()
            );
            assert_eq!(read_all(&*t, &r), data, "{:?}: bytes changed", t.tier());
        }
    });
}

/// An extent of anything but a regular file is refused with a typed error, at once: a
/// directory, a character device, a FIFO.
#[test]
fn register_extent_refuses_every_non_regular_file() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo");
    let have_fifo = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    let d = Arc::new(DiskTier::new(alloc(MIB), disk_opts(dir.path())).unwrap());
    let mut paths = vec![
        dir.path().to_path_buf(),
        "/dev/zero".into(),
        "/dev/null".into(),
    ];
    if have_fifo {
        paths.push(fifo);
    }
    for p in paths {
        let d2 = d.clone();
        let p2 = p.clone();
        let r = bounded("extent of a non-regular file", 5, move || {
            d2.register_extent(&p2, 0, 1, "x").map(|_| ())
        });
        assert!(
            matches!(r, Err(TierError::InvalidConfig(_))),
            "{}: {r:?}",
            p.display()
        );
    }
    assert_eq!(d.live_reservations(), 0);
}

/// Overlapping copies inside one reservation, either way and at lengths that are not whole
/// pieces, are a memmove through the staged pieces: on the disk tier and on a tier that
/// copies through `read` and `write` (a `FaultyTier` with no faults).
#[test]
fn overlapping_copies_either_way_are_a_memmove_through_staged_pieces() {
    bounded("overlapping copies both ways", 60, || {
        let dir = tempfile::tempdir().unwrap();
        let d: Arc<dyn TierBackend> = Arc::new(
            DiskTier::new(
                alloc(32 * MIB),
                DiskOptions {
                    unit_bytes: 4096,
                    ..disk_opts(dir.path())
                },
            )
            .unwrap(),
        );
        let plan = Arc::new(FaultPlan::new());
        let f: Arc<dyn TierBackend> = Arc::new(FaultyTier::new(host(32 * MIB), plan));
        let len = 10 * MIB + 3 * 4096 + 17;
        for t in [d, f] {
            for (src_off, dst_off, n) in [
                (0, 4096, 9 * MIB),
                (4096, 0, 9 * MIB),
                (0, 5 * MIB, 5 * MIB + 3 * 4096 + 17),
                (3 * MIB + 4096, 0, 7 * MIB + 2 * 4096),
                (4096, 8192, len - 8192),
            ] {
                let (r, data) = fill(&*t, len, 9, "t");
                t.copy_range(&r, src_off, &r, dst_off, n).unwrap();
                let mut want = data.clone();
                want.copy_within(src_off as usize..(src_off + n) as usize, dst_off as usize);
                assert!(
                    read_all(&*t, &r) == want,
                    "{:?}: copy {src_off} -> {dst_off} of {n} bytes is not a memmove",
                    t.tier()
                );
                t.release(r).unwrap();
            }
        }
    });
}
