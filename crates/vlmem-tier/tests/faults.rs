//! Every fault kind at every I/O point: the operation fails with a typed error (or, for a
//! delay, succeeds late), the source copy stays valid, and the engine goes on serving.
//!
//! Disk faults are injected at the system calls (`FaultyFileIo`), device and host faults at
//! the tier's copies (`FaultyTier`). Each test: write or read a multi-chunk tensor through the
//! engine with the fault armed, check the outcome, check the source bytes, then disarm and
//! redo the same move and check the bytes arrive intact.
mod common;

use common::*;
use std::sync::Arc;
use std::time::Duration;
use vlmem_tier::io::{FaultyFileIo, FileIo, RealFileIo};
use vlmem_tier::{
    DiskOptions, DiskTier, FaultKind, FaultPlan, FaultRule, FaultyTier, IoPoint, Move, Priority,
    TierBackend, TierError,
};

const LEN: u64 = 9 * MIB + 4321; // three engine chunks, an unaligned tail

#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    NoSpace,
    Io,
    Short,
    /// The write "succeeds"; the corruption is caught when the tensor is read back.
    CorruptOnReadBack,
    Corrupt,
    Ok,
}

fn expect_for(point: IoPoint, kind: FaultKind) -> Expect {
    match (point, kind) {
        (_, FaultKind::NoSpace) => Expect::NoSpace,
        (_, FaultKind::Eio) => Expect::Io,
        (IoPoint::Sync, FaultKind::Short | FaultKind::BitFlip) => Expect::Ok, // no data at a sync
        (_, FaultKind::Short) => Expect::Short,
        (IoPoint::Write, FaultKind::BitFlip) => Expect::CorruptOnReadBack,
        (_, FaultKind::BitFlip) => Expect::Corrupt,
        (_, FaultKind::Slow(_)) => Expect::Ok,
    }
}

fn check(expect: Expect, r: &Result<vlmem_tier::TransferReport, TierError>, tensor: &str) {
    match (expect, r) {
        (Expect::NoSpace, Err(TierError::NoSpace { .. })) => {}
        (Expect::Io, Err(TierError::Io { .. })) => {}
        (Expect::Short, Err(TierError::ShortRead { .. } | TierError::ShortWrite { .. })) => {}
        (Expect::Corrupt, Err(TierError::Corrupt { tensor: t, .. })) => assert_eq!(t, tensor),
        (Expect::Ok | Expect::CorruptOnReadBack, Ok(rep)) => assert_eq!(rep.bytes, LEN),
        (e, r) => panic!("expected {e:?}, got {r:?}"),
    }
}

fn rule(point: IoPoint, kind: FaultKind) -> FaultRule {
    match kind {
        // A single short transfer is retried and recovers; a persistent one must fail.
        FaultKind::Short => FaultRule::always(point, kind),
        _ => FaultRule::once(point, kind),
    }
}

/// Disk fault at `point` (Write, Read or Sync).
fn disk_case(point: IoPoint, kind: FaultKind) {
    let dir = tempfile::tempdir().unwrap();
    let plan = Arc::new(FaultPlan::new());
    let io = Arc::new(FaultyFileIo::new(Arc::new(RealFileIo), plan.clone()));
    // Sync faults need a buffered tier (O_DIRECT writes need no sync to be known good).
    let opts = DiskOptions {
        dir: Some(dir.path().to_path_buf()),
        direct_io: point != IoPoint::Sync,
        ..DiskOptions::default()
    };
    let d = Arc::new(DiskTier::with_io(alloc(64 * MIB), opts, io).unwrap());
    let h = host(64 * MIB);
    let e = engine(&[h.clone(), d.clone()]);
    let data = pattern(LEN as usize, 42);
    let src = h.reserve(LEN, "layer.3.k_proj").unwrap();
    h.write(&src, 0, &data).unwrap();
    let on_disk = d.reserve(LEN, "layer.3.k_proj").unwrap();
    let expect = expect_for(point, kind);
    match point {
        IoPoint::Write | IoPoint::Sync => {
            plan.add(rule(point, kind));
            let r = e
                .submit(Move { src, dst: on_disk }, Priority::WriteBack)
                .unwrap()
                .wait();
            check(expect, &r, "layer.3.k_proj");
            assert!(plan.fired() >= 1, "the fault never fired");
            plan.clear();
            // The source is intact.
            assert_eq!(read_all(&*h, &src), data);
            let back = h.reserve(LEN, "back").unwrap();
            let rb = e
                .submit(
                    Move {
                        src: on_disk,
                        dst: back,
                    },
                    Priority::Demand,
                )
                .unwrap()
                .wait();
            match expect {
                Expect::Ok => {
                    rb.unwrap();
                    assert_eq!(read_all(&*h, &back), data);
                }
                Expect::CorruptOnReadBack => {
                    check(Expect::Corrupt, &rb, "layer.3.k_proj");
                }
                // A failed write leaves no readable (stale or torn) data behind.
                _ => assert!(
                    matches!(rb, Err(TierError::NotWritten { .. })),
                    "read after failed write: {rb:?}"
                ),
            }
            // Redo the write without faults: the bytes arrive intact.
            e.submit(Move { src, dst: on_disk }, Priority::WriteBack)
                .unwrap()
                .wait()
                .unwrap();
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
        }
        IoPoint::Read => {
            e.submit(Move { src, dst: on_disk }, Priority::WriteBack)
                .unwrap()
                .wait()
                .unwrap();
            let back = h.reserve(LEN, "back").unwrap();
            plan.add(rule(point, kind));
            let r = e
                .submit(
                    Move {
                        src: on_disk,
                        dst: back,
                    },
                    Priority::Demand,
                )
                .unwrap()
                .wait();
            check(expect, &r, "layer.3.k_proj");
            assert!(plan.fired() >= 1, "the fault never fired");
            plan.clear();
            // The disk copy (the source of this move) is still valid.
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
        }
        _ => unreachable!(),
    }
    // And the engine serves an unrelated move.
    let (a, b) = (h.reserve(MIB, "a").unwrap(), d.reserve(MIB, "a").unwrap());
    h.write(&a, 0, &data[..MIB as usize]).unwrap();
    e.submit(Move { src: a, dst: b }, Priority::Demand)
        .unwrap()
        .wait()
        .unwrap();
    assert_eq!(read_all(&*d, &b), &data[..MIB as usize]);
}

/// Device (or host) fault at the tier's copies.
fn memory_case(faulty_tier: vlmem_core::Tier, point: IoPoint, kind: FaultKind) {
    let plan = Arc::new(FaultPlan::new());
    let (h, dev): (Arc<dyn TierBackend>, Arc<dyn TierBackend>) = match faulty_tier {
        vlmem_core::Tier::Device => (
            host(64 * MIB),
            Arc::new(FaultyTier::new(device(64 * MIB, None), plan.clone())),
        ),
        _ => (
            Arc::new(FaultyTier::new(host(64 * MIB), plan.clone())),
            device(64 * MIB, None),
        ),
    };
    let e = engine(&[h.clone(), dev.clone()]);
    let data = pattern(LEN as usize, 7);
    // Writes go into the faulty tier, reads come out of it.
    let (src_t, dst_t) = match (faulty_tier, point) {
        (vlmem_core::Tier::Device, IoPoint::Write) | (vlmem_core::Tier::Host, IoPoint::Read) => {
            (h.clone(), dev.clone())
        }
        _ => (dev.clone(), h.clone()),
    };
    let src = src_t.reserve(LEN, "vision.embed").unwrap();
    // Seed the source without faults.
    src_t.write(&src, 0, &data).unwrap();
    let dst = dst_t.reserve(LEN, "vision.embed").unwrap();
    plan.add(rule(point, kind));
    let r = e
        .submit(Move { src, dst }, Priority::Demand)
        .unwrap()
        .wait();
    let expect = match kind {
        FaultKind::BitFlip => unreachable!(),
        _ => expect_for(point, kind),
    };
    check(expect, &r, "vision.embed");
    assert!(plan.fired() >= 1);
    plan.clear();
    assert_eq!(read_all(&*src_t, &src), data, "source changed");
    e.submit(Move { src, dst }, Priority::Demand)
        .unwrap()
        .wait()
        .unwrap();
    assert_eq!(read_all(&*dst_t, &dst), data);
}

macro_rules! disk_tests {
    ($($name:ident: $point:expr, $kind:expr;)*) => {$(
        #[test]
        fn $name() {
            disk_case($point, $kind);
        }
    )*};
}

const SLOW: FaultKind = FaultKind::Slow(Duration::from_millis(60));

disk_tests! {
    disk_write_enospc: IoPoint::Write, FaultKind::NoSpace;
    disk_write_eio: IoPoint::Write, FaultKind::Eio;
    disk_write_short: IoPoint::Write, FaultKind::Short;
    disk_write_bit_flip: IoPoint::Write, FaultKind::BitFlip;
    disk_write_slow: IoPoint::Write, SLOW;
    disk_read_enospc: IoPoint::Read, FaultKind::NoSpace;
    disk_read_eio: IoPoint::Read, FaultKind::Eio;
    disk_read_short: IoPoint::Read, FaultKind::Short;
    disk_read_bit_flip: IoPoint::Read, FaultKind::BitFlip;
    disk_read_slow: IoPoint::Read, SLOW;
    disk_sync_enospc: IoPoint::Sync, FaultKind::NoSpace;
    disk_sync_eio: IoPoint::Sync, FaultKind::Eio;
    disk_sync_short: IoPoint::Sync, FaultKind::Short;
    disk_sync_bit_flip: IoPoint::Sync, FaultKind::BitFlip;
    disk_sync_slow: IoPoint::Sync, SLOW;
}

macro_rules! memory_tests {
    ($($name:ident: $tier:expr, $point:expr, $kind:expr;)*) => {$(
        #[test]
        fn $name() {
            memory_case($tier, $point, $kind);
        }
    )*};
}

use vlmem_core::Tier::{Device, Host};
memory_tests! {
    device_write_enospc: Device, IoPoint::Write, FaultKind::NoSpace;
    device_write_eio: Device, IoPoint::Write, FaultKind::Eio;
    device_write_short: Device, IoPoint::Write, FaultKind::Short;
    device_write_slow: Device, IoPoint::Write, SLOW;
    device_read_enospc: Device, IoPoint::Read, FaultKind::NoSpace;
    device_read_eio: Device, IoPoint::Read, FaultKind::Eio;
    device_read_short: Device, IoPoint::Read, FaultKind::Short;
    device_read_slow: Device, IoPoint::Read, SLOW;
    host_write_eio: Host, IoPoint::Write, FaultKind::Eio;
    host_write_short: Host, IoPoint::Write, FaultKind::Short;
    host_read_eio: Host, IoPoint::Read, FaultKind::Eio;
    host_read_short: Host, IoPoint::Read, FaultKind::Short;
}

#[test]
fn a_single_short_write_or_read_is_retried_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let (d, plan) = faulty_disk(
        16 * MIB,
        DiskOptions {
            dir: Some(dir.path().to_path_buf()),
            ..DiskOptions::default()
        },
    );
    let r = d.reserve(LEN, "t").unwrap();
    let data = pattern(LEN as usize, 3);
    plan.add(FaultRule::once(IoPoint::Write, FaultKind::Short));
    plan.add(FaultRule::once(IoPoint::Read, FaultKind::Short));
    d.write(&r, 0, &data).unwrap();
    assert_eq!(read_all(&d, &r), data);
    assert_eq!(plan.fired(), 2);
}

#[test]
fn open_and_allocate_faults_fail_construction_cleanly() {
    for (point, kind) in [
        (IoPoint::Open, FaultKind::NoSpace),
        (IoPoint::Open, FaultKind::Eio),
        (IoPoint::Allocate, FaultKind::NoSpace),
        (IoPoint::Allocate, FaultKind::Eio),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let plan = Arc::new(FaultPlan::new());
        plan.add(FaultRule::once(point, kind));
        let io = Arc::new(FaultyFileIo::new(Arc::new(RealFileIo), plan.clone()));
        let r = DiskTier::with_io(
            alloc(4 * MIB),
            DiskOptions {
                dir: Some(dir.path().to_path_buf()),
                ..DiskOptions::default()
            },
            io,
        );
        match (kind, r) {
            (FaultKind::NoSpace, Err(TierError::NoSpace { point: p, .. })) => assert_eq!(p, point),
            (FaultKind::Eio, Err(TierError::Io { point: p, .. })) => assert_eq!(p, point),
            (k, r) => panic!("{point:?} {k:?}: {r:?}"),
        }
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
    // A slow open still opens.
    let dir = tempfile::tempdir().unwrap();
    let plan = Arc::new(FaultPlan::new());
    plan.add(FaultRule::once(IoPoint::Open, SLOW));
    let io = Arc::new(FaultyFileIo::new(Arc::new(RealFileIo), plan));
    let opts = DiskOptions {
        dir: Some(dir.path().to_path_buf()),
        ..DiskOptions::default()
    };
    assert!(DiskTier::with_io(alloc(4 * MIB), opts, io).is_ok());
}

#[test]
fn a_slow_disk_does_not_stall_other_transfers() {
    let dir = tempfile::tempdir().unwrap();
    let (d, plan) = faulty_disk(
        32 * MIB,
        DiskOptions {
            dir: Some(dir.path().to_path_buf()),
            ..DiskOptions::default()
        },
    );
    let d = Arc::new(d);
    let h = host(32 * MIB);
    let dev = device(32 * MIB, None);
    let e = engine(&[h.clone(), dev.clone(), d.clone()]);
    plan.add(FaultRule::once(
        IoPoint::Write,
        FaultKind::Slow(Duration::from_millis(400)),
    ));
    let src = h.reserve(MIB, "slow").unwrap();
    let slow = e
        .submit(
            Move {
                src,
                dst: d.reserve(MIB, "slow").unwrap(),
            },
            Priority::WriteBack,
        )
        .unwrap();
    std::thread::sleep(Duration::from_millis(20));
    let t0 = std::time::Instant::now();
    let src2 = h.reserve(MIB, "fast").unwrap();
    e.submit(
        Move {
            src: src2,
            dst: dev.reserve(MIB, "fast").unwrap(),
        },
        Priority::Demand,
    )
    .unwrap()
    .wait()
    .unwrap();
    assert!(t0.elapsed() < Duration::from_millis(300));
    assert!(!slow.is_finished());
    slow.wait().unwrap();
}

/// /dev/full as a swap file: the kernel's own ENOSPC on every write.
#[derive(Debug)]
struct DevFull;

impl FileIo for DevFull {
    fn open_swap(&self, _dir: &std::path::Path, _direct: bool) -> std::io::Result<std::fs::File> {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/full")
    }
    fn open_read_only(&self, p: &std::path::Path, direct: bool) -> std::io::Result<std::fs::File> {
        RealFileIo.open_read_only(p, direct)
    }
    fn allocate(&self, _f: &std::fs::File, _len_bytes: u64) -> std::io::Result<()> {
        Ok(())
    }
    fn write_at(&self, f: &std::fs::File, o: u64, b: &[u8]) -> std::io::Result<usize> {
        RealFileIo.write_at(f, o, b)
    }
    fn read_at(&self, f: &std::fs::File, o: u64, b: &mut [u8]) -> std::io::Result<usize> {
        RealFileIo.read_at(f, o, b)
    }
    fn sync_data(&self, f: &std::fs::File) -> std::io::Result<()> {
        RealFileIo.sync_data(f)
    }
}

#[test]
fn real_enospc_from_dev_full() {
    let dir = tempfile::tempdir().unwrap();
    let d = Arc::new(disk_in(dir.path(), 16 * MIB, Arc::new(DevFull)));
    let h = host(16 * MIB);
    let e = engine(&[h.clone(), d.clone()]);
    let data = pattern(LEN as usize, 5);
    let src = h.reserve(LEN, "t").unwrap();
    h.write(&src, 0, &data).unwrap();
    let r = e
        .submit(
            Move {
                src,
                dst: d.reserve(LEN, "t").unwrap(),
            },
            Priority::WriteBack,
        )
        .unwrap()
        .wait();
    assert!(matches!(r, Err(TierError::NoSpace { .. })), "{r:?}");
    assert_eq!(read_all(&*h, &src), data);
}

/// A 2 MiB tmpfs (root only; skipped elsewhere): real ENOSPC at preallocation, and at write
/// time when the files are not preallocated.
#[test]
fn real_enospc_on_a_tiny_tmpfs() {
    let dir = tempfile::tempdir().unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs"])
        .arg(dir.path())
        .stderr(std::process::Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !mounted {
        eprintln!("skipped: cannot mount a tmpfs here (not root?)");
        return;
    }
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _guard = Unmount(dir.path().to_path_buf());
    let opts = DiskOptions {
        dir: Some(dir.path().to_path_buf()),
        ..DiskOptions::default()
    };
    match DiskTier::new(alloc(8 * MIB), opts.clone()) {
        Err(TierError::NoSpace {
            point: IoPoint::Allocate,
            ..
        }) => {}
        other => panic!("expected ENOSPC at preallocation, got {other:?}"),
    }
    let d = Arc::new(
        DiskTier::new(
            alloc(8 * MIB),
            DiskOptions {
                preallocate: false,
                ..opts
            },
        )
        .unwrap(),
    );
    let h = host(8 * MIB);
    let e = engine(&[h.clone(), d.clone()]);
    let data = pattern((4 * MIB) as usize, 9);
    let src = h.reserve(4 * MIB, "big").unwrap();
    h.write(&src, 0, &data).unwrap();
    let r = e
        .submit(
            Move {
                src,
                dst: d.reserve(4 * MIB, "big").unwrap(),
            },
            Priority::WriteBack,
        )
        .unwrap()
        .wait();
    assert!(matches!(r, Err(TierError::NoSpace { .. })), "{r:?}");
    assert_eq!(read_all(&*h, &src), data);
    // A tensor that fits still goes through.
    let small = h.reserve(MIB, "small").unwrap();
    h.write(&small, 0, &data[..MIB as usize]).unwrap();
    drop(e);
    drop(d);
}

#[test]
fn a_failed_batch_write_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (d, plan) = faulty_disk(
        16 * MIB,
        DiskOptions {
            dir: Some(dir.path().to_path_buf()),
            ..DiskOptions::default()
        },
    );
    let d = Arc::new(d);
    let h = host(16 * MIB);
    let e = engine(&[h.clone(), d.clone()]);
    let mut moves = Vec::new();
    let mut datas = Vec::new();
    for i in 0..32u64 {
        let data = pattern(65_536, i);
        let s = h.reserve(65_536, "kv").unwrap();
        h.write(&s, 0, &data).unwrap();
        moves.push(Move {
            src: s,
            dst: d.reserve(65_536, &format!("kv{i}")).unwrap(),
        });
        datas.push(data);
    }
    plan.add(FaultRule::once(IoPoint::Write, FaultKind::Eio));
    let r = e
        .submit_batch(moves.clone(), Priority::WriteBack)
        .unwrap()
        .wait();
    assert!(matches!(r, Err(TierError::Io { .. })), "{r:?}");
    for (m, data) in moves.iter().zip(&datas) {
        assert_eq!(&read_all(&*h, &m.src), data);
    }
    // Bit flip on the batched read names the damaged tensor.
    e.submit_batch(moves.clone(), Priority::WriteBack)
        .unwrap()
        .wait()
        .unwrap();
    plan.add(FaultRule::once(IoPoint::Read, FaultKind::BitFlip));
    let back: Vec<Move> = moves
        .iter()
        .map(|m| Move {
            src: m.dst,
            dst: m.src,
        })
        .collect();
    match e
        .submit_batch(back.clone(), Priority::Demand)
        .unwrap()
        .wait()
    {
        Err(TierError::Corrupt { tensor, .. }) => assert!(tensor.starts_with("kv"), "{tensor}"),
        other => panic!("{other:?}"),
    }
    e.submit_batch(back, Priority::Demand)
        .unwrap()
        .wait()
        .unwrap();
    for (m, data) in moves.iter().zip(&datas) {
        assert_eq!(&read_all(&*h, &m.src), data);
    }
}

/// A `FileIo` that stops at one chosen call (the `k`th of a point) until released, counts
/// every call, numbers them in one sequence, and can fail every sync with EIO.
#[derive(Debug, Default)]
struct GateIo {
    state: std::sync::Mutex<GateState>,
    changed: std::sync::Condvar,
    fail_syncs: bool,
}

#[derive(Debug, Default)]
struct GateState {
    /// Calls so far per point: read, write, sync.
    calls: [u64; 3],
    /// Sequence number of the last call started, and of the last write and good sync.
    seq: u64,
    last_write_seq: u64,
    last_good_sync_seq: u64,
    gate: Option<(IoPoint, u64)>,
    entered: bool,
    released: bool,
}

fn slot(point: IoPoint) -> usize {
    match point {
        IoPoint::Read => 0,
        IoPoint::Write => 1,
        _ => 2,
    }
}

impl GateIo {
    /// Counts the call; blocks at the gate; returns its sequence number.
    fn pass(&self, point: IoPoint) -> u64 {
        let mut st = self.state.lock().unwrap();
        let i = slot(point);
        let nth = st.calls[i];
        st.calls[i] += 1;
        st.seq += 1;
        let seq = st.seq;
        if st.gate == Some((point, nth)) {
            st.entered = true;
            self.changed.notify_all();
            while !st.released {
                st = self.changed.wait(st).unwrap();
            }
        }
        seq
    }
    fn arm(&self, point: IoPoint, nth: u64) {
        let mut st = self.state.lock().unwrap();
        st.calls = [0; 3];
        st.gate = Some((point, nth));
        st.entered = false;
        st.released = false;
    }
    fn disarm(&self) {
        let mut st = self.state.lock().unwrap();
        st.calls = [0; 3];
        st.gate = None;
    }
    /// Waits until a call stops at the gate; false if none did within `timeout`.
    fn wait_entered(&self, timeout: Duration) -> bool {
        let st = self.state.lock().unwrap();
        let (st, _) = self
            .changed
            .wait_timeout_while(st, timeout, |s| !s.entered)
            .unwrap();
        st.entered
    }
    fn release(&self) {
        self.state.lock().unwrap().released = true;
        self.changed.notify_all();
    }
    fn calls(&self, point: IoPoint) -> u64 {
        self.state.lock().unwrap().calls[slot(point)]
    }
    fn seqs(&self) -> (u64, u64) {
        let st = self.state.lock().unwrap();
        (st.last_write_seq, st.last_good_sync_seq)
    }
}

impl FileIo for GateIo {
    fn open_swap(&self, dir: &std::path::Path, direct: bool) -> std::io::Result<std::fs::File> {
        RealFileIo.open_swap(dir, direct)
    }
    fn open_read_only(
        &self,
        path: &std::path::Path,
        direct: bool,
    ) -> std::io::Result<std::fs::File> {
        RealFileIo.open_read_only(path, direct)
    }
    fn allocate(&self, file: &std::fs::File, len_bytes: u64) -> std::io::Result<()> {
        RealFileIo.allocate(file, len_bytes)
    }
    fn write_at(&self, file: &std::fs::File, offset: u64, buf: &[u8]) -> std::io::Result<usize> {
        let seq = self.pass(IoPoint::Write);
        let r = RealFileIo.write_at(file, offset, buf);
        let mut st = self.state.lock().unwrap();
        st.last_write_seq = st.last_write_seq.max(seq);
        r
    }
    fn read_at(&self, file: &std::fs::File, offset: u64, buf: &mut [u8]) -> std::io::Result<usize> {
        self.pass(IoPoint::Read);
        RealFileIo.read_at(file, offset, buf)
    }
    fn sync_data(&self, file: &std::fs::File) -> std::io::Result<()> {
        let seq = self.pass(IoPoint::Sync);
        if self.fail_syncs {
            return Err(std::io::Error::from_raw_os_error(libc::EIO));
        }
        RealFileIo.sync_data(file)?;
        let mut st = self.state.lock().unwrap();
        st.last_good_sync_seq = st.last_good_sync_seq.max(seq);
        Ok(())
    }
}

/// Cancels a move while it stands at every I/O call it makes, in turn (each read, write and
/// sync of each chunk), on a buffered disk whose syncs succeed or all fail, with one worker
/// and with several. The outcome is always typed; a move into the disk reports success only
/// when a good sync followed its last write (the durability an uncancelled move gives), and
/// then its bytes read back; the source is never touched.
fn cancel_at_every_io_point(fail_syncs: bool, workers: usize) {
    const UNIT: u64 = 64 * 1024;
    const LEN: u64 = 3 * UNIT + 5000; // four chunks, an unaligned tail
    let dir = tempfile::tempdir().unwrap();
    let io = Arc::new(GateIo {
        fail_syncs,
        ..GateIo::default()
    });
    let opts = DiskOptions {
        dir: Some(dir.path().to_path_buf()),
        direct_io: false,
        preallocate: false,
        unit_bytes: UNIT,
        ..DiskOptions::default()
    };
    let d = Arc::new(DiskTier::with_io(alloc(8 * MIB), opts, io.clone()).unwrap());
    let h = host(8 * MIB);
    let cfg = vlmem_tier::EngineConfig {
        workers,
        chunk_bytes: UNIT,
        ..vlmem_tier::EngineConfig::default()
    };
    let e = vlmem_tier::TransferEngine::new(&[h.clone(), d.clone()], cfg).unwrap();
    let data = pattern(LEN as usize, 9);
    let src = h.reserve(LEN, "layer.7.v_proj").unwrap();
    h.write(&src, 0, &data).unwrap();
    // A disk copy to read from (written and verified without the engine).
    // A disk copy to read from, written without the engine before each move out of the disk
    // (a failed sync of another move invalidates everything written since the last good one).
    let on_disk_src = d.reserve(LEN, "layer.7.v_proj").unwrap();

    for to_disk in [true, false] {
        // Count the calls an uncancelled move makes.
        d.write(&on_disk_src, 0, &data).unwrap();
        io.disarm();
        let (s, t) = if to_disk {
            (src, d.reserve(LEN, "probe").unwrap())
        } else {
            (on_disk_src, h.reserve(LEN, "probe").unwrap())
        };
        let _ = e
            .submit(Move { src: s, dst: t }, Priority::Demand)
            .unwrap()
            .wait();
        let points: Vec<(IoPoint, u64)> = [IoPoint::Read, IoPoint::Write, IoPoint::Sync]
            .into_iter()
            .map(|p| (p, io.calls(p)))
            .collect();
        if to_disk {
            d.release(t).unwrap();
        } else {
            h.release(t).unwrap();
        }
        let mut cases = 0;
        let (mut saw_ok, mut saw_cancelled) = (false, false);
        for (point, n) in points {
            for nth in 0..n {
                cases += 1;
                let dst = if to_disk {
                    d.reserve(LEN, "layer.7.v_proj").unwrap()
                } else {
                    h.reserve(LEN, "back").unwrap()
                };
                let s = if to_disk {
                    src
                } else {
                    d.write(&on_disk_src, 0, &data).unwrap();
                    on_disk_src
                };
                io.arm(point, nth);
                let ticket = e.submit(Move { src: s, dst }, Priority::Demand).unwrap();
                assert!(
                    io.wait_entered(Duration::from_secs(10)),
                    "the move never made {point:?} call {nth}"
                );
                ticket.cancel();
                io.release();
                let r = ticket.wait();
                let (last_write, last_good_sync) = io.seqs();
                let ctx = format!(
                    "to_disk {to_disk}, cancelled at {point:?} call {nth}, failing syncs {fail_syncs}, {workers} worker(s)"
                );
                match &r {
                    Ok(rep) => {
                        assert_eq!(rep.bytes, LEN, "{ctx}");
                        if to_disk {
                            assert!(
                                last_good_sync > last_write,
                                "{ctx}: Ok without a sync after the last write"
                            );
                            assert_eq!(read_all(&*d, &dst), data, "{ctx}");
                        } else {
                            assert_eq!(read_all(&*h, &dst), data, "{ctx}");
                        }
                    }
                    Err(TierError::Cancelled) => {}
                    Err(TierError::Io {
                        point: IoPoint::Sync,
                        ..
                    }) if to_disk && fail_syncs => {}
                    Err(other) => panic!("{ctx}: untyped or unexpected outcome {other:?}"),
                }
                if to_disk && fail_syncs {
                    assert!(r.is_err(), "{ctx}: Ok although every sync fails");
                }
                saw_ok |= r.is_ok();
                saw_cancelled |= matches!(r, Err(TierError::Cancelled));
                io.disarm();
                // The source is intact and the engine goes on.
                if to_disk {
                    assert_eq!(read_all(&*h, &src), data, "{ctx}");
                } else {
                    assert_eq!(read_all(&*d, &on_disk_src), data, "{ctx}");
                }
                if to_disk {
                    d.release(dst).unwrap();
                } else {
                    h.release(dst).unwrap();
                }
            }
        }
        assert!(cases >= 4, "too few I/O points exercised: {cases}");
        // With one worker, cancelled at its first call the move stops; at its last (the sync,
        // when moving to the disk) it has nothing left to stop and completes. (With several,
        // every chunk may have started before the cancel.)
        assert!(
            saw_cancelled || workers > 1,
            "no case was cancelled ({to_disk}, {workers})"
        );
        assert!(
            saw_ok || (to_disk && fail_syncs),
            "no case completed ({to_disk}, {workers})"
        );
    }
}

#[test]
fn a_cancelled_write_reports_ok_only_after_a_good_sync() {
    for workers in [1, 3] {
        cancel_at_every_io_point(false, workers);
    }
}

#[test]
fn a_cancelled_write_to_a_disk_whose_syncs_fail_never_reports_ok() {
    for workers in [1, 3] {
        cancel_at_every_io_point(true, workers);
    }
}

#[test]
fn a_cancelled_write_during_its_only_chunk_is_not_ok_without_a_sync() {
    // Buffered disk behind `FaultyFileIo`, every sync failing, writes slowed, one worker.
    let dir = tempfile::tempdir().unwrap();
    let plan = Arc::new(FaultPlan::new());
    let io = Arc::new(FaultyFileIo::new(Arc::new(RealFileIo), plan.clone()));
    let opts = DiskOptions {
        dir: Some(dir.path().to_path_buf()),
        direct_io: false,
        ..DiskOptions::default()
    };
    let d = Arc::new(DiskTier::with_io(alloc(4 * MIB), opts, io).unwrap());
    let h = host(4 * MIB);
    let cfg = vlmem_tier::EngineConfig {
        workers: 1,
        ..vlmem_tier::EngineConfig::default()
    };
    let e = vlmem_tier::TransferEngine::new(&[h.clone(), d.clone()], cfg).unwrap();
    plan.add(FaultRule::always(IoPoint::Sync, FaultKind::Eio));
    plan.add(FaultRule::always(
        IoPoint::Write,
        FaultKind::Slow(Duration::from_millis(300)),
    ));
    let len = 256 * 1024;
    let data = pattern(len as usize, 4);
    let src = h.reserve(len, "kv").unwrap();
    h.write(&src, 0, &data).unwrap();
    let uncancelled = e
        .submit(
            Move {
                src,
                dst: d.reserve(len, "kv").unwrap(),
            },
            Priority::WriteBack,
        )
        .unwrap()
        .wait();
    assert!(
        matches!(
            uncancelled,
            Err(TierError::Io {
                point: IoPoint::Sync,
                ..
            })
        ),
        "{uncancelled:?}"
    );
    let t = e
        .submit(
            Move {
                src,
                dst: d.reserve(len, "kv").unwrap(),
            },
            Priority::WriteBack,
        )
        .unwrap();
    std::thread::sleep(Duration::from_millis(100)); // inside the only chunk's write
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
        "cancelled during its only chunk: {r:?}"
    );
}
