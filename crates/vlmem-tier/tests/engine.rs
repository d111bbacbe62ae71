//! The transfer engine: round trips, chunking, priorities, back-pressure, cancellation,
//! batches, concurrency.
mod common;

use common::*;
use std::sync::Arc;
use std::time::{Duration, Instant};
use vlmem_core::Tier;
use vlmem_tier::{
    EngineConfig, FaultKind, FaultPlan, FaultRule, FaultyTier, IoPoint, Move, Priority,
    TierBackend, TierError, TransferEngine,
};

fn fill(
    t: &dyn TierBackend,
    len: u64,
    seed: u64,
    name: &str,
) -> (vlmem_tier::Reservation, Vec<u8>) {
    let r = t.reserve(len, name).unwrap();
    let d = pattern(len as usize, seed);
    t.write(&r, 0, &d).unwrap();
    (r, d)
}

#[test]
fn moves_between_all_tiers_preserve_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let h = host(64 * MIB);
    let dev = device(64 * MIB, None);
    let d = Arc::new(disk_in(
        dir.path(),
        64 * MIB,
        Arc::new(vlmem_tier::io::RealFileIo),
    ));
    let e = engine(&[h.clone(), dev.clone(), d.clone()]);
    let len = 13 * MIB + 12_345; // 4 chunks, an unaligned tail
    let (src, data) = fill(&*h, len, 1, "w");
    // host -> disk -> device -> host
    let on_disk = d.reserve(len, "w").unwrap();
    let rep = e
        .submit(Move { src, dst: on_disk }, Priority::WriteBack)
        .unwrap()
        .wait()
        .unwrap();
    assert_eq!(rep.bytes, len);
    assert_eq!(rep.chunks, 4);
    let on_dev = dev.reserve(len, "w").unwrap();
    e.submit(
        Move {
            src: on_disk,
            dst: on_dev,
        },
        Priority::Demand,
    )
    .unwrap()
    .wait()
    .unwrap();
    let back = h.reserve(len, "w2").unwrap();
    e.submit(
        Move {
            src: on_dev,
            dst: back,
        },
        Priority::Prefetch,
    )
    .unwrap()
    .wait()
    .unwrap();
    assert_eq!(read_all(&*h, &back), data);
    // disk -> host directly, and device -> disk.
    let back2 = h.reserve(len, "w3").unwrap();
    e.submit(
        Move {
            src: on_disk,
            dst: back2,
        },
        Priority::Demand,
    )
    .unwrap()
    .wait()
    .unwrap();
    assert_eq!(read_all(&*h, &back2), data);
    let disk2 = d.reserve(len, "w4").unwrap();
    e.submit(
        Move {
            src: on_dev,
            dst: disk2,
        },
        Priority::WriteBack,
    )
    .unwrap()
    .wait()
    .unwrap();
    assert_eq!(read_all(&*d, &disk2), data);
    let s = e.stats();
    assert_eq!(s.jobs_submitted, 5);
    assert_eq!(s.jobs_succeeded, 5);
    assert_eq!(s.bytes_moved, 5 * len);
}

#[test]
fn bad_moves_are_refused_at_submit() {
    let h = host(4 * MIB);
    let dev = device(4 * MIB, None);
    let e = engine(&[h.clone(), dev.clone()]);
    let a = h.reserve(4096, "a").unwrap();
    let b = dev.reserve(8192, "b").unwrap();
    assert!(matches!(
        e.submit(Move { src: a, dst: b }, Priority::Demand),
        Err(TierError::LengthMismatch { .. })
    ));
    let dir = tempfile::tempdir().unwrap();
    let d = disk_in(dir.path(), MIB, Arc::new(vlmem_tier::io::RealFileIo));
    let c = d.reserve(4096, "c").unwrap();
    assert!(matches!(
        e.submit(Move { src: a, dst: c }, Priority::Demand),
        Err(TierError::NoSuchTier(Tier::Disk))
    ));
    // Chunk size must be a multiple of the disk's unit.
    let cfg = EngineConfig {
        chunk_bytes: 3 << 19,
        ..EngineConfig::default()
    };
    let d: Arc<dyn TierBackend> = Arc::new(d);
    assert!(TransferEngine::new(&[d], cfg).is_err());
}

#[test]
fn a_small_demand_fetch_overtakes_a_huge_write_back() {
    // One worker, a link of 400 MB/s: the 144 MiB write-back needs ~0.38 s; one 4 MiB chunk
    // needs ~10 ms. The demand fetch must not wait for the whole write-back.
    let h = host(160 * MIB);
    let dev = device(160 * MIB, Some(400_000_000));
    let cfg = EngineConfig {
        workers: 1,
        ..EngineConfig::default()
    };
    let e = TransferEngine::new(&[h.clone(), dev.clone()], cfg).unwrap();
    let (big_dev, _) = fill(&*dev, 144 * MIB, 1, "big");
    let big_host = h.reserve(144 * MIB, "big").unwrap();
    let (small_dev, small_data) = fill(&*dev, 64 * 1024, 2, "small");
    let small_host = h.reserve(64 * 1024, "small").unwrap();
    let wb = e
        .submit(
            Move {
                src: big_dev,
                dst: big_host,
            },
            Priority::WriteBack,
        )
        .unwrap();
    std::thread::sleep(Duration::from_millis(20));
    let t0 = Instant::now();
    let demand = e
        .submit(
            Move {
                src: small_dev,
                dst: small_host,
            },
            Priority::Demand,
        )
        .unwrap();
    let rep = demand.wait().unwrap();
    let waited = t0.elapsed();
    assert!(!wb.is_finished(), "the write-back should still be running");
    assert!(
        waited < Duration::from_millis(200),
        "demand waited {waited:?}"
    );
    assert_eq!(rep.priority, Priority::Demand);
    assert_eq!(read_all(&*h, &small_host), small_data);
    wb.wait().unwrap();
}

#[test]
fn priorities_order_demand_prefetch_write_back() {
    let h = host(64 * MIB);
    let plan = Arc::new(FaultPlan::new());
    let dev_inner = device(64 * MIB, None);
    let dev = Arc::new(FaultyTier::new(dev_inner, plan.clone()));
    let cfg = EngineConfig {
        workers: 1,
        max_starve: Duration::from_secs(10), // strict priority for this test
        ..EngineConfig::default()
    };
    let e = TransferEngine::new(&[h.clone(), dev.clone()], cfg).unwrap();
    // The first device write is slow: it holds the only worker while the others queue.
    plan.add(FaultRule::once(
        IoPoint::Write,
        FaultKind::Slow(Duration::from_millis(150)),
    ));
    let mk = |name: &str, seed| {
        let (src, _) = fill(&*h, 4096, seed, name);
        let dst = dev.reserve(4096, name).unwrap();
        Move { src, dst }
    };
    let blocker = e.submit(mk("blocker", 1), Priority::Demand).unwrap();
    std::thread::sleep(Duration::from_millis(30));
    let start = Instant::now();
    let w = e.submit(mk("w", 2), Priority::WriteBack).unwrap();
    let p = e.submit(mk("p", 3), Priority::Prefetch).unwrap();
    let d = e.submit(mk("d", 4), Priority::Demand).unwrap();
    blocker.wait().unwrap();
    let end_of = |r: vlmem_tier::TransferReport| r.elapsed;
    let (dw, dp, dd) = (
        end_of(w.wait().unwrap()),
        end_of(p.wait().unwrap()),
        end_of(d.wait().unwrap()),
    );
    // Submission order was w, p, d (each a little later): compare completion instants.
    let _ = start;
    assert!(
        dd < dp,
        "demand {dd:?} should finish before prefetch {dp:?}"
    );
    assert!(
        dp < dw,
        "prefetch {dp:?} should finish before write-back {dw:?}"
    );
}

#[test]
fn bounded_queue_gives_back_pressure() {
    let h = host(16 * MIB);
    let plan = Arc::new(FaultPlan::new());
    let dev = Arc::new(FaultyTier::new(device(16 * MIB, None), plan.clone()));
    let cfg = EngineConfig {
        workers: 1,
        max_queued_jobs: 2,
        ..EngineConfig::default()
    };
    let e = Arc::new(TransferEngine::new(&[h.clone(), dev.clone()], cfg).unwrap());
    plan.add(FaultRule::once(
        IoPoint::Write,
        FaultKind::Slow(Duration::from_millis(200)),
    ));
    let mk = |i: u64| {
        let (src, _) = fill(&*h, 4096, i, "x");
        Move {
            src,
            dst: dev.reserve(4096, "x").unwrap(),
        }
    };
    let t1 = e.submit(mk(1), Priority::Demand).unwrap();
    std::thread::sleep(Duration::from_millis(30)); // the worker holds t1
    let t2 = e.try_submit(mk(2), Priority::Demand).unwrap();
    let t3 = e.try_submit(mk(3), Priority::Demand).unwrap();
    match e.try_submit(mk(4), Priority::Demand) {
        Err(TierError::QueueFull {
            queued_jobs: 2,
            max_queued_jobs: 2,
        }) => {}
        other => panic!("expected QueueFull, got {other:?}"),
    }
    // A blocking submit waits for room instead.
    let mv = mk(5);
    let e2 = e.clone();
    let t0 = Instant::now();
    let blocked = std::thread::spawn(move || e2.submit(mv, Priority::Demand).map(|t| t.wait()));
    let r = blocked.join().unwrap().unwrap();
    assert!(r.is_ok());
    assert!(
        t0.elapsed() >= Duration::from_millis(100),
        "submit should have blocked"
    );
    for t in [t1, t2, t3] {
        t.wait().unwrap();
    }
}

#[test]
fn cancellation_stops_a_transfer_and_the_engine_goes_on() {
    let h = host(128 * MIB);
    let dev = device(128 * MIB, Some(200_000_000));
    let e = engine(&[h.clone(), dev.clone()]);
    let (src, data) = fill(&*h, 100 * MIB, 1, "big");
    let dst = dev.reserve(100 * MIB, "big").unwrap();
    let t = e.submit(Move { src, dst }, Priority::Prefetch).unwrap();
    std::thread::sleep(Duration::from_millis(30));
    let t0 = Instant::now();
    t.cancel();
    assert!(matches!(t.wait(), Err(TierError::Cancelled)));
    assert!(
        t0.elapsed() < Duration::from_millis(300),
        "cancel took {:?}",
        t0.elapsed()
    );
    assert_eq!(e.stats().jobs_cancelled, 1);
    // Source intact; the destination can be released and the engine serves the next move.
    assert_eq!(read_all(&*h, &src), data);
    dev.release(dst).unwrap();
    let dst = dev.reserve(MIB, "next").unwrap();
    let (src2, data2) = fill(&*h, MIB, 2, "next");
    e.submit(Move { src: src2, dst }, Priority::Demand)
        .unwrap()
        .wait()
        .unwrap();
    assert_eq!(read_all(&*dev, &dst), data2);
}

#[test]
fn cancel_before_start_and_after_finish() {
    let h = host(16 * MIB);
    let plan = Arc::new(FaultPlan::new());
    let dev = Arc::new(FaultyTier::new(device(16 * MIB, None), plan.clone()));
    let cfg = EngineConfig {
        workers: 1,
        ..EngineConfig::default()
    };
    let e = TransferEngine::new(&[h.clone(), dev.clone()], cfg).unwrap();
    plan.add(FaultRule::once(
        IoPoint::Write,
        FaultKind::Slow(Duration::from_millis(100)),
    ));
    let (s1, _) = fill(&*h, 4096, 1, "a");
    let (s2, _) = fill(&*h, 4096, 2, "b");
    let t1 = e
        .submit(
            Move {
                src: s1,
                dst: dev.reserve(4096, "a").unwrap(),
            },
            Priority::Demand,
        )
        .unwrap();
    std::thread::sleep(Duration::from_millis(20));
    let t2 = e
        .submit(
            Move {
                src: s2,
                dst: dev.reserve(4096, "b").unwrap(),
            },
            Priority::Demand,
        )
        .unwrap();
    t2.cancel(); // still queued: finishes at once
    assert!(t2.is_finished());
    assert!(matches!(t2.wait(), Err(TierError::Cancelled)));
    let r = t1.wait();
    assert!(r.is_ok());
}

#[test]
fn batched_small_tensors_move_as_one_job() {
    let dir = tempfile::tempdir().unwrap();
    let h = host(32 * MIB);
    let d = Arc::new(disk_in(
        dir.path(),
        32 * MIB,
        Arc::new(vlmem_tier::io::RealFileIo),
    ));
    let e = engine(&[h.clone(), d.clone()]);
    let n = 64;
    let mut moves = Vec::new();
    let mut datas = Vec::new();
    for i in 0..n {
        let (src, data) = fill(&*h, 65_536, i, &format!("kv{i}"));
        moves.push(Move {
            src,
            dst: d.reserve(65_536, &format!("kv{i}")).unwrap(),
        });
        datas.push(data);
    }
    let rep = e
        .submit_batch(moves.clone(), Priority::WriteBack)
        .unwrap()
        .wait()
        .unwrap();
    assert_eq!(rep.bytes, n * 65_536);
    assert_eq!(rep.chunks, 1);
    let back: Vec<Move> = moves
        .iter()
        .map(|m| Move {
            src: m.dst,
            dst: h.reserve(65_536, "back").unwrap(),
        })
        .collect();
    e.submit_batch(back.clone(), Priority::Demand)
        .unwrap()
        .wait()
        .unwrap();
    for (m, data) in back.iter().zip(&datas) {
        assert_eq!(&read_all(&*h, &m.dst), data);
    }
    // Mixed tiers in one batch are refused.
    let mixed = vec![
        moves[0],
        Move {
            src: back[0].dst,
            dst: back[1].dst,
        },
    ];
    assert!(e.submit_batch(mixed, Priority::Demand).is_err());
}

#[test]
fn concurrent_submitters_all_get_their_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let h = host(64 * MIB);
    let dev = device(64 * MIB, None);
    let d = Arc::new(disk_in(
        dir.path(),
        64 * MIB,
        Arc::new(vlmem_tier::io::RealFileIo),
    ));
    let e = Arc::new(engine(&[h.clone(), dev.clone(), d.clone()]));
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let (e, h, dev, d) = (e.clone(), h.clone(), dev.clone(), d.clone());
            std::thread::spawn(move || {
                for i in 0..6u64 {
                    let len = 300_000 + (t * 7 + i) * 40_000;
                    let (src, data) = fill(&*h, len, t * 100 + i, "c");
                    let on_disk = d.reserve(len, "c").unwrap();
                    let on_dev = dev.reserve(len, "c").unwrap();
                    let tk1 = e
                        .submit(Move { src, dst: on_disk }, Priority::WriteBack)
                        .unwrap();
                    let tk2 = e
                        .submit(Move { src, dst: on_dev }, Priority::Prefetch)
                        .unwrap();
                    tk1.wait().unwrap();
                    tk2.wait().unwrap();
                    let back = h.reserve(len, "c").unwrap();
                    e.submit(
                        Move {
                            src: on_disk,
                            dst: back,
                        },
                        Priority::Demand,
                    )
                    .unwrap()
                    .wait()
                    .unwrap();
                    assert_eq!(read_all(&*h, &back), data);
                    assert_eq!(read_all(&*dev, &on_dev), data);
                    for r in [src, back] {
                        h.release(r).unwrap();
                    }
                    d.release(on_disk).unwrap();
                    dev.release(on_dev).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(h.usage().in_use_bytes, 0);
    assert_eq!(d.usage().in_use_bytes, 0);
}

#[test]
fn dropping_the_engine_finishes_queued_work() {
    let h = host(16 * MIB);
    let dev = device(16 * MIB, None);
    let e = engine(&[h.clone(), dev.clone()]);
    let mut tickets = Vec::new();
    for i in 0..8 {
        let (src, _) = fill(&*h, MIB, i, "x");
        tickets.push(
            e.submit(
                Move {
                    src,
                    dst: dev.reserve(MIB, "x").unwrap(),
                },
                Priority::Prefetch,
            )
            .unwrap(),
        );
    }
    drop(e);
    for t in tickets {
        t.wait().unwrap();
    }
}

#[test]
fn a_batch_naming_one_destination_twice_is_refused() {
    let h = host(4 * MIB);
    let dev = device(4 * MIB, None);
    let e = engine(&[h.clone(), dev.clone()]);
    let (a, _) = fill(&*h, 4096, 1, "a");
    let (b, _) = fill(&*h, 4096, 2, "b");
    let d = dev.reserve(4096, "d").unwrap();
    let r = e
        .submit_batch(
            vec![Move { src: a, dst: d }, Move { src: b, dst: d }],
            Priority::Demand,
        )
        .unwrap()
        .wait();
    assert!(matches!(r, Err(TierError::Busy { .. })), "{r:?}");
    // The engine goes on.
    e.submit(Move { src: a, dst: d }, Priority::Demand)
        .unwrap()
        .wait()
        .unwrap();
}

#[test]
fn a_checkpoint_extent_streams_to_the_device_through_the_engine() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model-00001-of-00002.safetensors");
    let file = pattern((11 * MIB + 3333) as usize, 5);
    std::fs::write(&path, &file).unwrap();
    let d = Arc::new(disk_in(
        dir.path(),
        MIB,
        Arc::new(vlmem_tier::io::RealFileIo),
    ));
    let dev = device(32 * MIB, None);
    let h = host(32 * MIB);
    let e = engine(&[h.clone(), dev.clone(), d.clone()]);
    let (off, len) = (8 + 777, 9 * MIB + 5); // a header, then an unaligned tensor
    let w = d
        .register_extent(&path, off, len, "model.layers.1.self_attn.o_proj.weight")
        .unwrap();
    let on_dev = dev.reserve(len, "o_proj").unwrap();
    let rep = e
        .submit(
            Move {
                src: w,
                dst: on_dev,
            },
            Priority::Prefetch,
        )
        .unwrap()
        .wait()
        .unwrap();
    assert_eq!(rep.bytes, len);
    assert_eq!(
        read_all(&*dev, &on_dev),
        &file[off as usize..(off + len) as usize]
    );
    let on_host = h.reserve(len, "o_proj").unwrap();
    e.submit(
        Move {
            src: w,
            dst: on_host,
        },
        Priority::Demand,
    )
    .unwrap()
    .wait()
    .unwrap();
    assert_eq!(
        read_all(&*h, &on_host),
        &file[off as usize..(off + len) as usize]
    );
    // An extent is never a destination.
    assert!(matches!(
        e.submit(
            Move {
                src: on_host,
                dst: w
            },
            Priority::WriteBack
        ),
        Err(TierError::ReadOnly { .. })
    ));
}

#[test]
fn a_steady_demand_stream_does_not_starve_a_write_back() {
    // One worker, a 100 MB/s link: each 1 MiB demand copy holds the worker ~10 ms, and the
    // feeder keeps demand jobs queued for ~1.5 s. The write-back must still finish early.
    let h = host(64 * MIB);
    let dev = device(64 * MIB, Some(100_000_000));
    let cfg = EngineConfig {
        workers: 1,
        max_starve: Duration::from_millis(100),
        ..EngineConfig::default()
    };
    let e = Arc::new(TransferEngine::new(&[h.clone(), dev.clone()], cfg).unwrap());
    let (src, _) = fill(&*h, MIB, 1, "d");
    let dsts: Vec<_> = (0..8).map(|_| dev.reserve(MIB, "d").unwrap()).collect();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let feeder = {
        let (e, stop) = (e.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut i = 0;
            let mut tickets = std::collections::VecDeque::new();
            let t0 = Instant::now();
            while !stop.load(std::sync::atomic::Ordering::Relaxed)
                && t0.elapsed() < Duration::from_millis(1500)
            {
                // Keep three demand jobs queued at all times (each to its own destination).
                while tickets.len() < 3 {
                    let dst = dsts[i % dsts.len()];
                    i += 1;
                    tickets.push_back(e.submit(Move { src, dst }, Priority::Demand).unwrap());
                }
                if let Some(t) = tickets.pop_front() {
                    let _ = t.wait();
                }
            }
            for t in tickets {
                let _ = t.wait();
            }
        })
    };
    std::thread::sleep(Duration::from_millis(50));
    let (wsrc, _) = fill(&*h, MIB, 2, "w");
    let wdst = h.reserve(MIB, "w2").unwrap();
    let t0 = Instant::now();
    e.submit(
        Move {
            src: wsrc,
            dst: wdst,
        },
        Priority::WriteBack,
    )
    .unwrap()
    .wait()
    .unwrap();
    let waited = t0.elapsed();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    feeder.join().unwrap();
    assert!(
        waited < Duration::from_millis(800),
        "write-back starved for {waited:?}"
    );
}

#[test]
fn wait_timeout_hands_the_ticket_back_until_done() {
    let h = host(64 * MIB);
    let dev = device(64 * MIB, Some(200_000_000));
    let e = engine(&[h.clone(), dev.clone()]);
    let (src, data) = fill(&*h, 40 * MIB, 1, "x"); // ~0.2 s over the link
    let dst = dev.reserve(40 * MIB, "x").unwrap();
    let t = e.submit(Move { src, dst }, Priority::Prefetch).unwrap();
    let mut t = match t.wait_timeout(Duration::from_millis(10)) {
        Err(t) => t,
        Ok(r) => panic!("finished too early: {r:?}"),
    };
    let (done, total) = t.progress_bytes();
    assert!(done <= total && total == 40 * MIB);
    let r = loop {
        match t.wait_timeout(Duration::from_millis(50)) {
            Ok(r) => break r,
            Err(back) => t = back,
        }
    };
    assert_eq!(r.unwrap().bytes, 40 * MIB);
    assert_eq!(read_all(&*dev, &dst), data);
}

/// A device tier whose reads take `delay` each and that counts how many run at once.
#[derive(Debug)]
struct SlowReads {
    inner: Arc<vlmem_tier::MemoryTier>,
    delay: Duration,
    in_flight: std::sync::atomic::AtomicUsize,
    max_in_flight: std::sync::atomic::AtomicUsize,
    reads: std::sync::atomic::AtomicUsize,
}

impl SlowReads {
    fn new(inner: Arc<vlmem_tier::MemoryTier>, delay: Duration) -> Self {
        SlowReads {
            inner,
            delay,
            in_flight: Default::default(),
            max_in_flight: Default::default(),
            reads: Default::default(),
        }
    }
}

impl TierBackend for SlowReads {
    fn tier(&self) -> Tier {
        self.inner.tier()
    }
    fn describe(&self) -> String {
        "slow reads".into()
    }
    fn capacity_bytes(&self) -> u64 {
        self.inner.capacity_bytes()
    }
    fn usage(&self) -> vlmem_core::ArenaUsage {
        self.inner.usage()
    }
    fn reserve(&self, len_bytes: u64, name: &str) -> vlmem_tier::Result<vlmem_tier::Reservation> {
        self.inner.reserve(len_bytes, name)
    }
    fn release(&self, res: vlmem_tier::Reservation) -> vlmem_tier::Result<()> {
        self.inner.release(res)
    }
    fn write(
        &self,
        res: &vlmem_tier::Reservation,
        offset_bytes: u64,
        src: &[u8],
    ) -> vlmem_tier::Result<()> {
        self.inner.write(res, offset_bytes, src)
    }
    fn read(
        &self,
        res: &vlmem_tier::Reservation,
        offset_bytes: u64,
        dst: &mut [u8],
    ) -> vlmem_tier::Result<()> {
        use std::sync::atomic::Ordering::SeqCst;
        let now = self.in_flight.fetch_add(1, SeqCst) + 1;
        self.max_in_flight.fetch_max(now, SeqCst);
        self.reads.fetch_add(1, SeqCst);
        std::thread::sleep(self.delay);
        let r = self.inner.read(res, offset_bytes, dst);
        self.in_flight.fetch_sub(1, SeqCst);
        r
    }
}

#[test]
fn chunks_of_one_job_run_on_several_workers_at_once() {
    // Four workers, 64 KiB chunks, source reads of 25 ms: a 1 MiB move is 16 chunks, about
    // 100 ms when four run at once, 400 ms one at a time.
    let h = host(4 * MIB);
    let slow = Arc::new(SlowReads::new(
        device(4 * MIB, None),
        Duration::from_millis(25),
    ));
    let cfg = EngineConfig {
        workers: 4,
        chunk_bytes: 64 * 1024,
        ..EngineConfig::default()
    };
    let e = TransferEngine::new(&[h.clone(), slow.clone()], cfg).unwrap();
    let (src, data) = fill(&*slow, MIB, 3, "w");
    let dst = h.reserve(MIB, "w").unwrap();
    let t0 = Instant::now();
    let rep = e
        .submit(Move { src, dst }, Priority::Demand)
        .unwrap()
        .wait()
        .unwrap();
    let wall = t0.elapsed();
    assert_eq!(rep.chunks, 16);
    assert_eq!(read_all(&*h, &dst), data);
    let reads = slow.reads.load(std::sync::atomic::Ordering::SeqCst);
    let max = slow.max_in_flight.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(reads, 16);
    assert_eq!(
        max, 4,
        "at most {max} chunks of the job were in flight at once (4 workers)"
    );
    assert!(
        wall < Duration::from_millis(300),
        "16 chunks of 25 ms on 4 workers took {wall:?}"
    );
}

#[test]
fn a_demand_fetch_behind_many_aged_write_backs_waits_only_a_few_chunks() {
    // One worker held by a slow first copy while 200 one-chunk write-backs queue up and age
    // past `max_starve`; then a demand fetch arrives. Starved jobs get at most every other
    // chunk, so the demand fetch must run after at most one or two of them, not all 200.
    let h = host(16 * MIB);
    let plan = Arc::new(FaultPlan::new());
    let dev = Arc::new(FaultyTier::new(device(16 * MIB, None), plan.clone()));
    let cfg = EngineConfig {
        workers: 1,
        max_queued_jobs: 512,
        max_starve: Duration::from_millis(50),
        ..EngineConfig::default()
    };
    let e = TransferEngine::new(&[h.clone(), dev.clone()], cfg).unwrap();
    // The first device write holds the only worker; every later one takes 2 ms.
    plan.add(FaultRule::once(
        IoPoint::Write,
        FaultKind::Slow(Duration::from_millis(300)),
    ));
    plan.add(FaultRule::always(IoPoint::Write, FaultKind::Slow(Duration::from_millis(2))).after(1));
    let mk = |name: &str, seed| {
        let (src, _) = fill(&*h, 4096, seed, name);
        let dst = dev.reserve(4096, name).unwrap();
        Move { src, dst }
    };
    let blocker = e.submit(mk("blocker", 1), Priority::Demand).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    let write_backs: Vec<_> = (0..200)
        .map(|i| e.submit(mk("wb", 10 + i), Priority::WriteBack).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(150)); // every write-back is now starved
    let demand = e.submit(mk("demand", 5), Priority::Demand).unwrap();
    blocker.wait().unwrap();
    demand.wait().unwrap();
    let ahead = write_backs.iter().filter(|t| t.is_finished()).count();
    assert!(
        ahead <= 3,
        "{ahead} starved write-backs ran before the demand fetch"
    );
    for t in write_backs {
        t.wait().unwrap();
    }
}
