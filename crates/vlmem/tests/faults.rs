//! The fault matrix through the manager: every I/O point of every tier x {ENOSPC, EIO,
//! short transfer, bit flip, slow I/O}, each in several firing modes (the first call, a
//! later call, every call from some point on), while a workload allocates, writes, reads,
//! pins on each tier, evicts (swap-out to disk), swaps in and promotes to the device.
//!
//! The manager is built with `MemoryManager::with_tiers` over `FaultyTier`-wrapped device
//! and host tiers and a disk tier whose system calls go through `FaultyFileIo`.
//!
//! Checked in every cell:
//! - every successful read (the manager's or a pin's) returns the model's bytes: no silent
//!   corruption;
//! - every failure is a typed error (a tier error or `OutOfMemory` when eviction could not
//!   write back), never a panic, a stale handle or an invariant break;
//! - nothing is lost: after the plan is cleared, every tensor reads back its bytes (a write
//!   that failed may leave its own range torn: the caller was told; every other byte
//!   is intact), the audit is clean, and the same workload then runs without an error.
//!
//! One cell is a known gap, tested apart and `#[ignore]`d (see its reason): bit flips in
//! memory-tier copies (no checksum in RAM). A bit flipped on its way to disk is tested apart
//! too: never silent, and not lost.

use std::sync::Arc;
use std::time::Duration;
use vlmem::{ManagerConfig, ManagerError, MemoryManager, TensorHandle, TensorKind, Tier};
use vlmem_tier::io::{FaultyFileIo, FileIo, RealFileIo};
use vlmem_tier::{
    DiskOptions, DiskTier, FaultKind, FaultPlan, FaultRule, FaultyTier, FirstFitAllocator,
    HostOptions, IoPoint, MemoryTier, TierBackend, TierError,
};

mod common;
use common::{MIB, pattern};

const KIND: TensorKind = TensorKind::KvCache;

struct Plans {
    device: Arc<FaultPlan>,
    host: Arc<FaultPlan>,
    disk: Arc<FaultPlan>,
}

impl Plans {
    fn of(&self, tier: Tier) -> &Arc<FaultPlan> {
        match tier {
            Tier::Device => &self.device,
            Tier::Host => &self.host,
            Tier::Disk => &self.disk,
        }
    }
    fn fired(&self) -> u64 {
        self.device.fired() + self.host.fired() + self.disk.fired()
    }
    fn clear(&self) {
        self.device.clear();
        self.host.clear();
        self.disk.clear();
    }
}

fn alloc(capacity_bytes: u64, granule_bytes: u64) -> Arc<FirstFitAllocator> {
    Arc::new(FirstFitAllocator::new(capacity_bytes, granule_bytes).unwrap())
}

/// Device 1 MiB, host 2 MiB, disk 32 MiB (swap in `dir`), every byte for one kind.
fn faulty_manager(dir: &std::path::Path, direct_io: bool) -> (MemoryManager, Plans) {
    let plans = Plans {
        device: Arc::new(FaultPlan::new()),
        host: Arc::new(FaultPlan::new()),
        disk: Arc::new(FaultPlan::new()),
    };
    let device: Arc<dyn TierBackend> = Arc::new(FaultyTier::new(
        Arc::new(MemoryTier::simulated_device(alloc(MIB, 256), None).unwrap()),
        plans.device.clone(),
    ));
    let host: Arc<dyn TierBackend> = Arc::new(FaultyTier::new(
        Arc::new(MemoryTier::host(alloc(2 * MIB, 256), HostOptions::default()).unwrap()),
        plans.host.clone(),
    ));
    let io = Arc::new(FaultyFileIo::new(Arc::new(RealFileIo), plans.disk.clone()));
    let disk = Arc::new(
        DiskTier::with_io(
            alloc(32 * MIB, 4096),
            DiskOptions {
                dir: Some(dir.to_path_buf()),
                direct_io,
                preallocate: false,
                ..DiskOptions::default()
            },
            io,
        )
        .unwrap(),
    );
    (
        with_disk(device, host, disk, [MIB, 2 * MIB, 32 * MIB]),
        plans,
    )
}

fn with_disk(
    device: Arc<dyn TierBackend>,
    host: Arc<dyn TierBackend>,
    disk: Arc<DiskTier>,
    caps: [u64; 3],
) -> MemoryManager {
    let mut c = ManagerConfig::with_capacities(caps[0], caps[1], caps[2]);
    for t in Tier::ALL {
        for k in TensorKind::ALL {
            c.budgets.bytes[t.index()][k.index()] = caps[t.index()];
        }
    }
    c.shards = 4;
    MemoryManager::with_tiers(c, device, host, disk).unwrap()
}

/// One tensor as the test knows it: its bytes and which of them a failed write may have
/// torn (the caller got the error; those bytes are old or new).
struct Known {
    h: TensorHandle,
    bytes: Vec<u8>,
    torn: Vec<bool>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Outcome {
    /// Faults the plan fired.
    fired: u64,
    /// Operations that failed with a typed error.
    errors: u64,
    /// Successful reads that returned other bytes than the model's.
    silent_corruptions: u64,
    /// Tensors unreadable after the plan was cleared, with a typed error (`Corrupt`).
    lost_detected: u64,
    /// Tensors read back with wrong bytes after the plan was cleared.
    lost_silently: u64,
}

struct Run<'a> {
    m: &'a MemoryManager,
    tensors: Vec<Known>,
    out: Outcome,
    strict: bool,
}

impl Run<'_> {
    /// A failure: fine while faults are armed if typed; never in a clean (strict) run.
    fn failed(&mut self, what: &str, e: &ManagerError) {
        assert!(!self.strict, "{what} failed with no fault armed: {e}");
        match e {
            ManagerError::Tier(_) | ManagerError::OutOfMemory { .. } => self.out.errors += 1,
            other => panic!("{what}: not a fault's typed error: {other:?}"),
        }
    }

    fn compare(&mut self, i: usize, offset: usize, got: &[u8], what: &str) {
        let t = &self.tensors[i];
        let bad = got
            .iter()
            .enumerate()
            .filter(|&(k, &b)| !t.torn[offset + k] && t.bytes[offset + k] != b)
            .count();
        if bad > 0 {
            assert!(!self.strict, "{what}: tensor {i}: {bad} bytes differ");
            self.out.silent_corruptions += 1;
        }
    }

    fn read(&mut self, i: usize) {
        let len = self.tensors[i].bytes.len();
        let mut buf = vec![0u8; len];
        match self.m.read(self.tensors[i].h, 0, &mut buf) {
            Ok(()) => self.compare(i, 0, &buf, "read"),
            Err(e) => self.failed("read", &e),
        }
    }

    fn pin_and_read(&mut self, i: usize, tier: Tier) {
        let len = self.tensors[i].bytes.len();
        match self.m.pin(self.tensors[i].h, tier) {
            Ok(g) => {
                let mut buf = vec![0u8; len];
                match g.read(0, &mut buf) {
                    Ok(()) => self.compare(i, 0, &buf, "pinned read"),
                    Err(e) => self.failed("pinned read", &e),
                }
            }
            Err(e) => self.failed("pin", &e),
        }
    }

    fn write(&mut self, i: usize, offset: usize, data: &[u8]) {
        match self.m.write(self.tensors[i].h, offset as u64, data) {
            Ok(()) => {
                let t = &mut self.tensors[i];
                t.bytes[offset..offset + data.len()].copy_from_slice(data);
                t.torn[offset..offset + data.len()].fill(false);
            }
            Err(e) => {
                self.failed("write", &e);
                self.tensors[i].torn[offset..offset + data.len()].fill(true);
            }
        }
    }

    fn allocate(&mut self, len: usize, seed: u64) {
        match self.m.allocate(len as u64, KIND, seed) {
            Ok(h) => {
                let data = pattern(seed, len);
                match self.m.write(h, 0, &data) {
                    Ok(()) => self.tensors.push(Known {
                        h,
                        bytes: data,
                        torn: vec![false; len],
                    }),
                    Err(e) => {
                        self.failed("first write", &e);
                        self.m.deallocate(h).unwrap();
                    }
                }
            }
            Err(e) => self.failed("allocate", &e),
        }
    }

    fn evict(&mut self, tier: Tier) {
        if let Err(e) = self.m.evict(tier, u64::MAX) {
            self.failed("evict", &e);
        }
    }

    /// Allocation with swap-out, reads from every tier, promotion to the device, swap-in,
    /// partial rewrites, evictions that write back, pins on disk.
    fn workload(&mut self, round: u64) {
        let n0 = self.tensors.len();
        for k in 0..8u64 {
            // 8 x ~230 KiB: more than the host's 2 MiB with what is there already.
            let len = 200_000 + (k as usize) * 9_973;
            self.allocate(len, round * 100 + k);
        }
        let n = self.tensors.len();
        for i in 0..n {
            self.read(i);
        }
        for i in n0..n {
            self.pin_and_read(i, Tier::Device);
        }
        for i in 0..n {
            self.pin_and_read(i, Tier::Host);
        }
        for i in (0..n).step_by(2) {
            let len = self.tensors[i].bytes.len();
            let data = pattern(round * 1000 + i as u64, len / 3);
            self.write(i, len / 5, &data);
        }
        // Tensors on the device only (their host copy dropped), then written back down.
        for i in (1..n).step_by(3) {
            self.pin_and_read(i, Tier::Device);
        }
        self.evict(Tier::Host);
        self.evict(Tier::Device);
        for i in 0..n {
            self.pin_and_read(i, Tier::Disk);
        }
        self.evict(Tier::Host);
        for i in (0..n).rev() {
            self.read(i);
        }
    }

    /// With the plan cleared: every tensor reads back (counting losses), the ledger is
    /// clean.
    fn verify_all(&mut self) {
        let mut lost = Vec::new();
        for i in 0..self.tensors.len() {
            let len = self.tensors[i].bytes.len();
            let mut buf = vec![0u8; len];
            match self.m.read(self.tensors[i].h, 0, &mut buf) {
                Ok(()) => {
                    let t = &self.tensors[i];
                    if (0..len).any(|k| !t.torn[k] && t.bytes[k] != buf[k]) {
                        self.out.lost_silently += 1;
                    }
                    // From here on the tensor's bytes are what it holds.
                    let t = &mut self.tensors[i];
                    t.bytes = buf;
                    t.torn.fill(false);
                }
                Err(ManagerError::Tier(TierError::Corrupt { .. })) => {
                    self.out.lost_detected += 1;
                    lost.push(i);
                }
                Err(e) => panic!("tensor {i} unreadable after the faults cleared: {e}"),
            }
        }
        // A lost tensor (counted) is freed; the manager goes on with the others.
        for &i in lost.iter().rev() {
            let t = self.tensors.remove(i);
            self.m.deallocate(t.h).unwrap();
        }
        let a = self.m.audit();
        assert_eq!(a.overlaps, 0);
        assert_eq!(a.busy_entries, 0);
        assert_eq!(a.pins, 0);
        assert_eq!(a.entries_without_copy, 0);
        assert!(a.charged_matches_resident);
    }
}

#[derive(Debug, Clone, Copy)]
enum Mode {
    /// The first call of the point.
    First,
    /// One call, later in the run.
    Later(u64),
    /// Every call from the k-th on.
    From(u64),
}

fn rule(point: IoPoint, kind: FaultKind, mode: Mode) -> FaultRule {
    let r = match (kind, mode) {
        // One short transfer is retried and recovers on disk; make some persist (for 20,000
        // calls: see `persistent_short_disk_writes_do_not_storm`).
        (FaultKind::Short, Mode::First) => FaultRule {
            times: 20_000,
            ..FaultRule::always(point, kind)
        },
        (_, Mode::First) => FaultRule::once(point, kind),
        (_, Mode::Later(k)) => FaultRule::once(point, kind).after(k),
        (_, Mode::From(k)) => FaultRule::always(point, kind).after(k),
    };
    if let FaultKind::Slow(_) = kind {
        // Slow everywhere would take too long: a few calls.
        return FaultRule {
            times: r.times.min(3),
            ..r
        };
    }
    r
}

const MODES: [Mode; 4] = [Mode::First, Mode::Later(3), Mode::Later(9), Mode::From(5)];

/// One cell: the fault armed on `tier` at `point`, in each mode; returns the sum.
fn cell(tier: Tier, point: IoPoint, kind: FaultKind) -> Outcome {
    cell_with(tier, point, kind, &MODES, |point, kind, mode| {
        rule(point, kind, mode)
    })
}

fn cell_with(
    tier: Tier,
    point: IoPoint,
    kind: FaultKind,
    modes: &[Mode],
    rule: impl Fn(IoPoint, FaultKind, Mode) -> FaultRule,
) -> Outcome {
    let mut total = Outcome::default();
    for &mode in modes {
        let dir = tempfile::tempdir().unwrap();
        // Sync faults need a buffered disk tier (O_DIRECT writes are not synced).
        let (m, plans) = faulty_manager(dir.path(), point != IoPoint::Sync);
        // Tensors that exist before the faults, so that the first faults hit swap-outs.
        let mut run = Run {
            m: &m,
            tensors: Vec::new(),
            out: Outcome::default(),
            strict: true,
        };
        run.workload(0);
        run.strict = false;
        plans.of(tier).add(rule(point, kind, mode));
        run.workload(1);
        run.out.fired = plans.fired();
        plans.clear();
        assert!(
            run.out.fired >= 1,
            "{tier} {point:?} {kind:?} {mode:?}: the fault never fired"
        );
        run.verify_all();
        // The manager keeps serving: the same workload, no fault, no error.
        run.strict = true;
        run.workload(2);
        run.verify_all();
        let a = m.audit();
        assert!(a.charged_matches_resident);
        total.fired += run.out.fired;
        total.errors += run.out.errors;
        total.silent_corruptions += run.out.silent_corruptions;
        total.lost_detected += run.out.lost_detected;
        total.lost_silently += run.out.lost_silently;
    }
    // One line per cell; the figures of docs/RELIABILITY.md sum them.
    eprintln!("cell {tier} {point:?} {kind:?}: {total:?}");
    total
}

/// The cell must lose nothing and corrupt nothing silently.
fn clean_cell(tier: Tier, point: IoPoint, kind: FaultKind) {
    let o = cell(tier, point, kind);
    assert_eq!(o.silent_corruptions, 0, "{o:?}");
    assert_eq!(o.lost_silently, 0, "{o:?}");
    assert_eq!(o.lost_detected, 0, "{o:?}");
}

const SLOW: FaultKind = FaultKind::Slow(Duration::from_millis(30));

macro_rules! cells {
    ($($name:ident: $tier:expr, $point:expr, $kind:expr;)*) => {$(
        #[test]
        fn $name() {
            clean_cell($tier, $point, $kind);
        }
    )*};
}

cells! {
    device_write_enospc: Tier::Device, IoPoint::Write, FaultKind::NoSpace;
    device_write_eio: Tier::Device, IoPoint::Write, FaultKind::Eio;
    device_write_short: Tier::Device, IoPoint::Write, FaultKind::Short;
    device_write_slow: Tier::Device, IoPoint::Write, SLOW;
    device_read_enospc: Tier::Device, IoPoint::Read, FaultKind::NoSpace;
    device_read_eio: Tier::Device, IoPoint::Read, FaultKind::Eio;
    device_read_short: Tier::Device, IoPoint::Read, FaultKind::Short;
    device_read_slow: Tier::Device, IoPoint::Read, SLOW;
    host_write_enospc: Tier::Host, IoPoint::Write, FaultKind::NoSpace;
    host_write_eio: Tier::Host, IoPoint::Write, FaultKind::Eio;
    host_write_short: Tier::Host, IoPoint::Write, FaultKind::Short;
    host_write_slow: Tier::Host, IoPoint::Write, SLOW;
    host_read_enospc: Tier::Host, IoPoint::Read, FaultKind::NoSpace;
    host_read_eio: Tier::Host, IoPoint::Read, FaultKind::Eio;
    host_read_short: Tier::Host, IoPoint::Read, FaultKind::Short;
    host_read_slow: Tier::Host, IoPoint::Read, SLOW;
    disk_write_enospc: Tier::Disk, IoPoint::Write, FaultKind::NoSpace;
    disk_write_eio: Tier::Disk, IoPoint::Write, FaultKind::Eio;
    disk_write_short: Tier::Disk, IoPoint::Write, FaultKind::Short;
    disk_write_slow: Tier::Disk, IoPoint::Write, SLOW;
    disk_read_enospc: Tier::Disk, IoPoint::Read, FaultKind::NoSpace;
    disk_read_eio: Tier::Disk, IoPoint::Read, FaultKind::Eio;
    disk_read_short: Tier::Disk, IoPoint::Read, FaultKind::Short;
    disk_read_bit_flip: Tier::Disk, IoPoint::Read, FaultKind::BitFlip;
    disk_read_slow: Tier::Disk, IoPoint::Read, SLOW;
    disk_sync_enospc: Tier::Disk, IoPoint::Sync, FaultKind::NoSpace;
    disk_sync_eio: Tier::Disk, IoPoint::Sync, FaultKind::Eio;
    disk_sync_slow: Tier::Disk, IoPoint::Sync, SLOW;
}

/// A bit flipped on its way to disk (the stored copy is bad; its CRC was taken before):
/// never silent.
#[test]
fn disk_write_bit_flip_is_never_silent() {
    let o = cell(Tier::Disk, IoPoint::Write, FaultKind::BitFlip);
    assert_eq!(o.silent_corruptions, 0, "{o:?}");
    assert_eq!(o.lost_silently, 0, "{o:?}");
}

/// ... and not lost: the manager reads a swap-out back before it drops the host copy. (Found
/// here: the swap-out succeeded, the host copy went, and the swap-in failed with `Corrupt`;
/// fixed in 0f56667.)
#[test]
fn disk_write_bit_flip_loses_nothing() {
    let o = cell(Tier::Disk, IoPoint::Write, FaultKind::BitFlip);
    assert_eq!(o.lost_detected, 0, "{o:?}");
}

#[test]
#[ignore = "manager gap: device and host copies carry no checksum, so a bit flipped in a memory-tier read or write (what ECC is for) reaches the caller or the disk silently"]
fn memory_tier_bit_flips_are_detected() {
    for (tier, point) in [
        (Tier::Device, IoPoint::Write),
        (Tier::Device, IoPoint::Read),
        (Tier::Host, IoPoint::Write),
        (Tier::Host, IoPoint::Read),
    ] {
        let o = cell(tier, point, FaultKind::BitFlip);
        assert_eq!(
            o.silent_corruptions + o.lost_silently,
            0,
            "{tier} {point:?}: {o:?}"
        );
    }
}

/// Every disk write short from the start of a phase: the operations fail, but without a storm
/// of retries. (Found here: nested eviction loops re-demoted the same victims, 631,520 disk
/// write calls and ~60 s for one ~80-operation workload; fixed in 0f56667: a failing tier
/// below stops the eviction pass.)
#[test]
fn persistent_short_disk_writes_do_not_storm() {
    let o = cell_with(
        Tier::Disk,
        IoPoint::Write,
        FaultKind::Short,
        &[Mode::First],
        |point, kind, _| FaultRule::always(point, kind),
    );
    assert!(o.fired < 20_000, "{o:?}");
}

/// /dev/full as the swap file: the kernel's own ENOSPC on every swap-out.
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

/// A manager whose swap can never take a byte: allocations beyond the host are refused
/// with `OutOfMemory`, nothing already there is lost, the engine keeps serving.
fn full_disk_keeps_everything(m: &MemoryManager) {
    let mut kept = Vec::new();
    let mut refused = 0;
    for k in 0..24u64 {
        let len = 200_000 + k as usize * 1000;
        match m.allocate(len as u64, KIND, k) {
            Ok(h) => {
                let data = pattern(k, len);
                match m.write(h, 0, &data) {
                    Ok(()) => kept.push((h, data)),
                    Err(ManagerError::OutOfMemory { .. }) => {
                        refused += 1;
                        m.deallocate(h).unwrap();
                    }
                    Err(e) => panic!("{e}"),
                }
            }
            Err(ManagerError::OutOfMemory { .. }) => refused += 1,
            Err(e) => panic!("{e}"),
        }
    }
    assert!(refused > 0, "the disk took everything?");
    assert!(m.stats().counters.demote_failures > 0);
    for (h, data) in &kept {
        let mut buf = vec![0u8; data.len()];
        m.read(*h, 0, &mut buf).unwrap();
        assert!(&buf == data);
        drop(m.pin(*h, Tier::Device).unwrap());
    }
    let a = m.audit();
    assert_eq!(a.entries_without_copy, 0);
    assert!(a.charged_matches_resident);
    // Freeing makes room again.
    for (h, _) in kept {
        m.deallocate(h).unwrap();
    }
    let h = m.allocate(200_000, KIND, 99).unwrap();
    m.write(h, 0, &pattern(99, 200_000)).unwrap();
}

#[test]
fn real_enospc_from_dev_full_through_the_manager() {
    let dir = tempfile::tempdir().unwrap();
    let device: Arc<dyn TierBackend> =
        Arc::new(MemoryTier::simulated_device(alloc(MIB, 256), None).unwrap());
    let host: Arc<dyn TierBackend> =
        Arc::new(MemoryTier::host(alloc(2 * MIB, 256), HostOptions::default()).unwrap());
    let disk = Arc::new(
        DiskTier::with_io(
            alloc(32 * MIB, 4096),
            DiskOptions {
                dir: Some(dir.path().to_path_buf()),
                preallocate: false,
                ..DiskOptions::default()
            },
            Arc::new(DevFull),
        )
        .unwrap(),
    );
    full_disk_keeps_everything(&with_disk(device, host, disk, [MIB, 2 * MIB, 32 * MIB]));
}

/// Swap on a 1 MiB tmpfs (root only; skipped with a message elsewhere): the kernel's
/// ENOSPC once the tmpfs is full, through the manager.
#[test]
fn real_enospc_on_a_tiny_tmpfs_through_the_manager() {
    let dir = tempfile::tempdir().unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs"])
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
    let device: Arc<dyn TierBackend> =
        Arc::new(MemoryTier::simulated_device(alloc(MIB, 256), None).unwrap());
    let host: Arc<dyn TierBackend> =
        Arc::new(MemoryTier::host(alloc(2 * MIB, 256), HostOptions::default()).unwrap());
    let disk = Arc::new(
        DiskTier::new(
            alloc(32 * MIB, 4096),
            DiskOptions {
                dir: Some(dir.path().to_path_buf()),
                preallocate: false,
                ..DiskOptions::default()
            },
        )
        .unwrap(),
    );
    let m = with_disk(device, host, disk, [MIB, 2 * MIB, 32 * MIB]);
    full_disk_keeps_everything(&m);
    drop(m);
}
