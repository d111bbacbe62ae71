//! Conformance: random operation sequences applied to the real manager and to a small
//! executable model of its observable behaviour, compared after every step (proptest, so a
//! failure shrinks to a short sequence).
//!
//! The model knows which handles are live, stale or foreign, each tensor's bytes (byte by
//! byte: a never-written byte has no defined value), its pins, the budgets, and which call
//! must fail with which error, in the manager's order of checks. Placement (which tier holds
//! a copy) is the manager's choice: the model reads `residency()` before a call and checks
//! the outcome is consistent with it (a pin on a tier that holds a copy is a hit and cannot
//! fail). `OutOfMemory` is accepted only where it is possible: while something is pinned or
//! a budget was lowered; with nothing pinned and full budgets, every tensor that fits its
//! budget must find room (eviction writes back to a disk tier large enough for all).
//!
//! Each case uses one tensor kind (all kinds across cases) whose budget on every tier is the
//! tier's capacity; every other kind has a zero budget ("wrong kind": always `TooLarge`).
//! After every step: stats and audit agree with the model (tensor and pin counts, no
//! overlap, nothing busy, no copyless entry, budget counters equal to the recount), every
//! pinned copy is resident, and every live tensor reads back its known bytes.
//!
//! The model runs over a matrix of manager configurations ([`Setup`]), since a promise can
//! hold in one and break in another: the default; a KV slab (`kv_block_bytes`, with KV
//! blocks beside the case's kind); `zero_on_free`; checkpoint extents and explicit
//! `swap_out` of extents and ordinary tensors on every tier; a tiny disk that fills up, at
//! several integrity unit sizes. Every configuration adds these promises: the checkpoint
//! file is an extent's disk copy for its whole life (never dropped, never moved into swap,
//! never charged); the budget counters and each tier's arena usage equal the live copies
//! (rounded to the tier's granule) after every step; freeing every tensor gives every byte
//! back; compaction moves no copy off its tier and loses no byte; and a refusal
//! (`OutOfMemory`, `TooLarge`) changes nothing.

mod common;

use proptest::prelude::*;
use proptest::test_runner::Config;
use std::path::PathBuf;
use vlmem::{ManagerConfig, ManagerError, MemoryManager, PinGuard, TensorHandle, TensorKind, Tier};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const CAPS: [u64; 3] = [MIB, MIB, 16 * MIB];
const MAX_LEN: u64 = 400 * 1024;
const EXTENT_FILE_BYTES: u64 = 128 * 1024;
/// The KV slab's block: every KV tensor of the model is one block.
const KV_BLOCK_BYTES: u64 = 4096;
/// The KV budget on the device and the host with a KV slab (the slab region's size).
const KV_SLAB_BYTES: u64 = 256 * KIB;
/// The KV budget on the disk with a KV slab.
const KV_DISK_BYTES: u64 = 4 * MIB;
/// Allocation granule of the device and host arenas, and of the disk's.
const MEMORY_GRANULE_BYTES: u64 = 256;
const DISK_GRANULE_BYTES: u64 = 4096;

/// One manager configuration of the matrix.
#[derive(Debug, Clone, Copy)]
struct Setup {
    /// Device, host and disk capacity.
    caps: [u64; 3],
    /// `kv_block_bytes = Some(KV_BLOCK_BYTES)`, KV blocks allocated beside the case's kind.
    kv_slab: bool,
    zero_on_free: bool,
    /// Checkpoint extents and explicit swap-outs are frequent in the mix.
    extents: bool,
    /// The disk's integrity unit.
    disk_unit_bytes: u64,
    /// The disk is small enough to fill: a write-back to it may be refused.
    tiny_disk: bool,
}

impl Setup {
    const DEFAULT: Setup = Setup {
        caps: CAPS,
        kv_slab: false,
        zero_on_free: false,
        extents: false,
        disk_unit_bytes: MIB,
        tiny_disk: false,
    };

    /// The budget `kind` starts with on `tier` when the case's kind is `main`: the tier's
    /// capacity for `main` (less the KV share with a KV slab), the KV share for KV blocks,
    /// nothing for any other kind.
    fn budget(&self, tier: Tier, kind: TensorKind, main: TensorKind) -> u64 {
        let kv_share = match tier {
            Tier::Disk => KV_DISK_BYTES,
            _ => KV_SLAB_BYTES,
        };
        if self.kv_slab && kind == TensorKind::KvCache {
            kv_share
        } else if kind != main {
            0
        } else if self.kv_slab {
            self.caps[tier.index()] - kv_share
        } else {
            self.caps[tier.index()]
        }
    }

    fn budgets(&self, main: TensorKind) -> [u64; 3] {
        Tier::ALL.map(|t| self.budget(t, main, main))
    }
}

fn round_up(n: u64, granule: u64) -> u64 {
    n.div_ceil(granule) * granule
}

#[derive(Debug, Clone, Copy)]
enum Sel {
    Live(usize),
    Stale(usize),
    Foreign,
}

#[derive(Debug, Clone, Copy)]
enum Size {
    Zero,
    Small(u64),
    OverCapacity,
    Huge(u64),
}

/// An offset: a fraction of the tensor (in 1/65536), its end, or past it.
#[derive(Debug, Clone, Copy)]
enum Off {
    Frac(u16),
    End,
    PastEnd,
    Max,
}

/// A length: a fraction of what is left after the offset, the rest, or one more.
#[derive(Debug, Clone, Copy)]
enum Len {
    Frac(u16),
    Rest,
    RestPlusOne,
}

#[derive(Debug, Clone, Copy)]
enum BudgetLevel {
    Zero,
    Small,
    Full,
}

#[derive(Debug, Clone)]
enum Op {
    Alloc {
        size: Size,
        wrong_kind: bool,
        /// A KV block instead of the case's kind (with a KV slab; ignored otherwise).
        kv: bool,
        tier: Tier,
    },
    Write {
        t: Sel,
        off: Off,
        len: Len,
        seed: u8,
    },
    Read {
        t: Sel,
        off: Off,
        len: Len,
    },
    Pin {
        t: Sel,
        tier: Tier,
    },
    Unpin(usize),
    GuardRead {
        g: usize,
        off: Off,
        len: Len,
    },
    Evict {
        tier: Tier,
        bytes: u64,
    },
    Dealloc(Sel),
    SetBudget {
        tier: Tier,
        level: BudgetLevel,
    },
    Extent {
        off: u64,
        len: u64,
    },
    SwapOut {
        t: Sel,
        tier: Tier,
    },
    Compact(Tier),
}

fn tier() -> impl Strategy<Value = Tier> {
    prop_oneof![Just(Tier::Device), Just(Tier::Host), Just(Tier::Disk)]
}

fn sel() -> impl Strategy<Value = Sel> {
    prop_oneof![
        10 => (0..64usize).prop_map(Sel::Live),
        1 => (0..64usize).prop_map(Sel::Stale),
        1 => Just(Sel::Foreign),
    ]
}

fn off() -> impl Strategy<Value = Off> {
    prop_oneof![
        8 => any::<u16>().prop_map(Off::Frac),
        2 => Just(Off::Frac(0)),
        1 => Just(Off::End),
        1 => Just(Off::PastEnd),
        1 => Just(Off::Max),
    ]
}

fn len() -> impl Strategy<Value = Len> {
    prop_oneof![
        6 => any::<u16>().prop_map(Len::Frac),
        3 => Just(Len::Rest),
        1 => Just(Len::RestPlusOne),
    ]
}

fn op(setup: Setup) -> impl Strategy<Value = Op> {
    let extent_weight = if setup.extents { 4 } else { 1 };
    let swap_weight = if setup.extents { 6 } else { 2 };
    prop_oneof![
        6 => (
            prop_oneof![
                1 => Just(Size::Zero),
                12 => (1..=MAX_LEN).prop_map(Size::Small),
                1 => Just(Size::OverCapacity),
                1 => prop_oneof![Just(u64::MAX), Just(1u64 << 63), Just((1u64 << 63) + 1)]
                    .prop_map(Size::Huge),
            ],
            prop::bool::weighted(0.1),
            prop::bool::weighted(0.35),
            prop_oneof![6 => Just(Tier::Host), 1 => Just(Tier::Device), 1 => Just(Tier::Disk)],
        )
            .prop_map(|(size, wrong_kind, kv, tier)| Op::Alloc {
                size,
                wrong_kind,
                kv,
                tier
            }),
        6 => (sel(), off(), len(), any::<u8>()).prop_map(|(t, off, len, seed)| Op::Write {
            t,
            off,
            len,
            seed
        }),
        4 => (sel(), off(), len()).prop_map(|(t, off, len)| Op::Read { t, off, len }),
        5 => (sel(), tier()).prop_map(|(t, tier)| Op::Pin { t, tier }),
        4 => (0..16usize).prop_map(Op::Unpin),
        2 => (0..16usize, off(), len()).prop_map(|(g, off, len)| Op::GuardRead { g, off, len }),
        2 => (tier(), prop_oneof![Just(0u64), 1..MIB, Just(u64::MAX)])
            .prop_map(|(tier, bytes)| Op::Evict { tier, bytes }),
        3 => sel().prop_map(Op::Dealloc),
        1 => (
            prop_oneof![Just(Tier::Device), Just(Tier::Host)],
            prop_oneof![Just(BudgetLevel::Zero), Just(BudgetLevel::Small), Just(BudgetLevel::Full)]
        )
            .prop_map(|(tier, level)| Op::SetBudget { tier, level }),
        extent_weight => (0..EXTENT_FILE_BYTES + 10, 0..EXTENT_FILE_BYTES / 2)
            .prop_map(|(off, len)| Op::Extent { off, len }),
        swap_weight => (sel(), tier()).prop_map(|(t, tier)| Op::SwapOut { t, tier }),
        1 => tier().prop_map(Op::Compact),
    ]
}

/// What the model says a call must give.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    Ok,
    /// Ok, or `OutOfMemory` (something pinned or a budget lowered).
    OkOrOom,
    ZeroSize,
    TooLarge,
    Stale,
    Foreign,
    OutOfRange,
    Pinned(u32),
    Uninitialized,
    ReadOnly,
    TierError,
}

fn check<T: std::fmt::Debug>(want: Want, got: &Result<T, ManagerError>, op: &Op) {
    let ok = match (want, got) {
        (Want::Ok | Want::OkOrOom, Ok(_)) => true,
        (Want::OkOrOom, Err(ManagerError::OutOfMemory { .. })) => true,
        (Want::ZeroSize, Err(ManagerError::ZeroSize)) => true,
        (Want::TooLarge, Err(ManagerError::TooLarge { .. })) => true,
        (Want::Stale, Err(ManagerError::Stale { .. })) => true,
        (Want::Foreign, Err(ManagerError::Foreign { .. })) => true,
        (Want::OutOfRange, Err(ManagerError::OutOfRange { .. })) => true,
        (Want::Pinned(n), Err(ManagerError::Pinned { pins, .. })) => *pins == n,
        (Want::Uninitialized, Err(ManagerError::Uninitialized { .. })) => true,
        (Want::ReadOnly, Err(ManagerError::ReadOnly { .. })) => true,
        (Want::TierError, Err(ManagerError::Tier(_))) => true,
        _ => false,
    };
    assert!(
        ok,
        "{op:?}: the model wants {want:?}, the manager gave {got:?}"
    );
}

struct Tensor {
    handle: TensorHandle,
    kind: TensorKind,
    len: u64,
    bytes: Vec<u8>,
    known: Vec<bool>,
    written: bool,
    read_only: bool,
}

struct Guard {
    tensor: usize,
    guard: PinGuard,
}

struct Harness {
    m: MemoryManager,
    setup: Setup,
    kind: TensorKind,
    other_kind: TensorKind,
    foreign: TensorHandle,
    _other: MemoryManager,
    _dir: tempfile::TempDir,
    extent_path: PathBuf,
    extent_bytes: Vec<u8>,
    /// The case's kind's budgets now (`SetBudget` changes them).
    budgets: [u64; 3],
    /// Each tier's arena bytes in use before the first step.
    base_usage: [u64; 3],
    live: Vec<Tensor>,
    stale: Vec<TensorHandle>,
    guards: Vec<Guard>,
    next_id: u64,
    steps: u64,
}

fn new_manager(setup: &Setup, kind: TensorKind) -> Result<MemoryManager, ManagerError> {
    let mut c = ManagerConfig::with_capacities(setup.caps[0], setup.caps[1], setup.caps[2]);
    c.shards = 4;
    c.disk.preallocate = false;
    c.disk.unit_bytes = setup.disk_unit_bytes;
    // Engine chunks are whole units (about 4 MiB).
    c.engine.chunk_bytes = setup.disk_unit_bytes * (4 * MIB / setup.disk_unit_bytes).max(1);
    c.zero_on_free = setup.zero_on_free;
    for t in Tier::ALL {
        for k in TensorKind::ALL {
            c.budgets.bytes[t.index()][k.index()] = setup.budget(t, k, kind);
        }
    }
    if setup.kv_slab {
        c.kv_block_bytes = Some(KV_BLOCK_BYTES);
        // The split arenas' two allocators are built next: give them equal ids if the
        // process draws ids from more than one counter (a block must name its allocator).
        common::align_allocator_ids();
    }
    MemoryManager::new(c)
}

fn fill(seed: u8, n: usize) -> Vec<u8> {
    common::pattern(u64::from(seed), n)
}

fn resolve(off: Off, len: Len, tensor_len: u64) -> (u64, u64) {
    let o = match off {
        Off::Frac(f) => tensor_len * u64::from(f) / 65536,
        Off::End => tensor_len,
        Off::PastEnd => tensor_len + 1,
        Off::Max => u64::MAX,
    };
    let rest = tensor_len.saturating_sub(o);
    let n = match len {
        Len::Frac(f) => rest * u64::from(f) / 65536,
        Len::Rest => rest,
        Len::RestPlusOne => rest + 1,
    };
    (o, n)
}

fn in_range(o: u64, n: u64, len: u64) -> bool {
    o.checked_add(n).is_some_and(|e| e <= len)
}

impl Harness {
    /// The harness over a manager of `setup`, or `None` when the manager refuses the
    /// configuration with a typed error, which it may only do for an integrity unit that
    /// is not a power of two.
    fn new(setup: Setup, kind: TensorKind) -> Option<Self> {
        let other_kind = TensorKind::ALL
            .into_iter()
            .find(|&k| k != kind && k != TensorKind::KvCache)
            .expect("five kinds");
        let other = new_manager(&Setup::DEFAULT, kind).unwrap();
        let foreign = other.allocate(4096, kind, 0).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let extent_path = dir.path().join("checkpoint.bin");
        let extent_bytes = fill(201, EXTENT_FILE_BYTES as usize);
        std::fs::write(&extent_path, &extent_bytes).unwrap();
        let m = match new_manager(&setup, kind) {
            Ok(m) => m,
            Err(ManagerError::InvalidConfig(why))
            | Err(ManagerError::Tier(vlmem_tier::TierError::InvalidConfig(why)))
                if !setup.disk_unit_bytes.is_power_of_two() =>
            {
                assert!(why.contains("unit"), "refused for another reason: {why}");
                return None;
            }
            Err(e) => panic!("{setup:?}: {e}"),
        };
        let base_usage = Tier::ALL.map(|t| m.tier_usage(t).in_use_bytes);
        Some(Harness {
            m,
            setup,
            kind,
            other_kind,
            foreign,
            _other: other,
            _dir: dir,
            extent_path,
            extent_bytes,
            budgets: setup.budgets(kind),
            base_usage,
            live: Vec::new(),
            stale: Vec::new(),
            guards: Vec::new(),
            next_id: 1,
            steps: 0,
        })
    }

    /// The budget of `kind` on `tier` now.
    fn budget_of(&self, kind: TensorKind, tier: Tier) -> u64 {
        if kind == self.kind {
            self.budgets[tier.index()]
        } else {
            self.setup.budget(tier, kind, self.kind)
        }
    }

    /// The handle a selector names, and the live index if it is live.
    fn pick(&self, s: Sel) -> (TensorHandle, Option<usize>, Want) {
        match s {
            Sel::Live(i) if !self.live.is_empty() => {
                let i = i % self.live.len();
                (self.live[i].handle, Some(i), Want::Ok)
            }
            Sel::Stale(i) if !self.stale.is_empty() => {
                (self.stale[i % self.stale.len()], None, Want::Stale)
            }
            _ => (self.foreign, None, Want::Foreign),
        }
    }

    fn pins_of(&self, i: usize) -> u32 {
        self.guards.iter().filter(|g| g.tensor == i).count() as u32
    }

    fn pins_on(&self, i: usize, tier: Tier) -> u32 {
        self.guards
            .iter()
            .filter(|g| g.tensor == i && g.guard.tier() == tier)
            .count() as u32
    }

    /// Whether `OutOfMemory` is possible now: something pinned, a budget lowered, or a disk
    /// that may be full.
    fn constrained(&self) -> bool {
        !self.guards.is_empty()
            || self.budgets != self.setup.budgets(self.kind)
            || self.setup.tiny_disk
    }

    fn oom_or_ok(&self) -> Want {
        if self.constrained() {
            Want::OkOrOom
        } else {
            Want::Ok
        }
    }

    fn residency(&self, i: usize) -> Vec<Tier> {
        self.m.residency(self.live[i].handle).unwrap().0
    }

    fn apply(&mut self, op: &Op) {
        self.steps += 1;
        match *op {
            Op::Alloc {
                size,
                wrong_kind,
                kv,
                tier,
            } => {
                let kv = kv && self.setup.kv_slab && !wrong_kind;
                let kind = if wrong_kind {
                    self.other_kind
                } else if kv {
                    TensorKind::KvCache
                } else {
                    self.kind
                };
                let bytes = match size {
                    Size::Zero => 0,
                    Size::Small(_) if kv => KV_BLOCK_BYTES,
                    Size::Small(n) => n,
                    Size::OverCapacity => self.setup.caps[tier.index()] + 1,
                    Size::Huge(n) => n,
                };
                let budget = self.budget_of(kind, tier);
                let want = if bytes == 0 {
                    Want::ZeroSize
                } else if bytes > budget {
                    Want::TooLarge
                } else {
                    self.oom_or_ok()
                };
                self.next_id += 1;
                let r = self.m.allocate_on(bytes, kind, self.next_id, tier);
                check(want, &r, op);
                if let Ok(handle) = r {
                    self.live.push(Tensor {
                        handle,
                        kind,
                        len: bytes,
                        bytes: vec![0; bytes as usize],
                        known: vec![false; bytes as usize],
                        written: false,
                        read_only: false,
                    });
                }
            }
            Op::Write { t, off, len, seed } => {
                let (h, i, want0) = self.pick(t);
                let tlen = i.map_or(4096, |i| self.live[i].len);
                let (o, n) = resolve(off, len, tlen);
                let n = n.min(MAX_LEN + 1);
                let data = fill(seed, n as usize);
                let want = match i {
                    None => want0,
                    Some(i) => {
                        let t = &self.live[i];
                        if t.read_only {
                            Want::ReadOnly
                        } else if !in_range(o, n, t.len) {
                            Want::OutOfRange
                        } else if self.pins_of(i) > 0 {
                            Want::Pinned(self.pins_of(i))
                        } else if n == 0 || self.residency(i).contains(&Tier::Host) {
                            Want::Ok
                        } else if t.len > self.budget_of(t.kind, Tier::Host) {
                            Want::TooLarge
                        } else {
                            self.oom_or_ok()
                        }
                    }
                };
                let before = i.map(|i| self.residency(i));
                let r = self.m.write(h, o, &data);
                check(want, &r, op);
                if let (Ok(()), Some(i)) = (&r, i) {
                    if n == 0 {
                        // An empty write touches no tier and does not make a tensor
                        // written.
                        assert_eq!(Some(self.residency(i)), before, "{op:?}");
                        return;
                    }
                    let t = &mut self.live[i];
                    let (o, n) = (o as usize, n as usize);
                    t.bytes[o..o + n].copy_from_slice(&data);
                    t.known[o..o + n].fill(true);
                    t.written = true;
                    // Only the host copy is left.
                    assert_eq!(self.residency(i), vec![Tier::Host], "{op:?}");
                }
            }
            Op::Read { t, off, len } => {
                let (h, i, want0) = self.pick(t);
                let tlen = i.map_or(4096, |i| self.live[i].len);
                let (o, n) = resolve(off, len, tlen);
                let n = n.min(MAX_LEN + 1);
                let want = match i {
                    None => want0,
                    Some(i) if !self.live[i].written => Want::Uninitialized,
                    Some(i) if !in_range(o, n, self.live[i].len) => Want::OutOfRange,
                    Some(_) => Want::Ok,
                };
                let before = i.map(|i| self.residency(i));
                let mut buf = vec![0u8; n as usize];
                let r = self.m.read(h, o, &mut buf);
                check(want, &r, op);
                if let (Ok(()), Some(i)) = (&r, i) {
                    self.compare(i, o, &buf, "read");
                    // A read moves nothing.
                    assert_eq!(Some(self.residency(i)), before, "{op:?}");
                }
            }
            Op::Pin { t, tier } => {
                let (h, i, want0) = self.pick(t);
                let want = match i {
                    None => want0,
                    Some(i) => {
                        if self.residency(i).contains(&tier) {
                            Want::Ok
                        } else if self.live[i].len > self.budget_of(self.live[i].kind, tier) {
                            Want::TooLarge
                        } else {
                            self.oom_or_ok()
                        }
                    }
                };
                let r = self.m.pin(h, tier);
                check(want, &r, op);
                if let (Ok(guard), Some(i)) = (r, i) {
                    assert_eq!(guard.tier(), tier);
                    assert_eq!(guard.len_bytes(), self.live[i].len);
                    self.guards.push(Guard { tensor: i, guard });
                }
            }
            Op::Unpin(g) => {
                if !self.guards.is_empty() {
                    let g = g % self.guards.len();
                    drop(self.guards.swap_remove(g));
                }
            }
            Op::GuardRead { g, off, len } => {
                if self.guards.is_empty() {
                    return;
                }
                let g = g % self.guards.len();
                let i = self.guards[g].tensor;
                let (o, n) = resolve(off, len, self.live[i].len);
                let n = n.min(MAX_LEN + 1);
                let mut buf = vec![0u8; n as usize];
                let r = self.guards[g].guard.read(o, &mut buf);
                let want = if !in_range(o, n, self.live[i].len) {
                    Want::OutOfRange
                } else if !self.live[i].written {
                    // A never-written tensor has no bytes, through a pin as through `read`.
                    Want::Uninitialized
                } else {
                    Want::Ok
                };
                check(want, &r, op);
                if r.is_ok() && self.live[i].written {
                    self.compare(i, o, &buf, "pinned read");
                }
            }
            Op::Evict { tier, bytes } => {
                let r = self.m.evict(tier, bytes);
                // Only a full disk can refuse a write-back.
                let want = if self.setup.tiny_disk {
                    Want::OkOrOom
                } else {
                    Want::Ok
                };
                check(want, &r, op);
            }
            Op::Dealloc(t) => {
                let (h, i, want0) = self.pick(t);
                let want = match i {
                    None => want0,
                    Some(i) if self.pins_of(i) > 0 => Want::Pinned(self.pins_of(i)),
                    Some(_) => Want::Ok,
                };
                let r = self.m.deallocate(h);
                check(want, &r, op);
                if let (Ok(()), Some(i)) = (r, i) {
                    let t = self.live.swap_remove(i);
                    self.stale.push(t.handle);
                    // Guards point at tensors by index: the last one moved to `i`.
                    let moved = self.live.len();
                    for g in &mut self.guards {
                        if g.tensor == moved {
                            g.tensor = i;
                        }
                    }
                }
            }
            Op::SetBudget { tier, level } => {
                let bytes = match level {
                    BudgetLevel::Zero => 0,
                    BudgetLevel::Small => self.setup.budgets(self.kind)[tier.index()] / 4,
                    BudgetLevel::Full => self.setup.budgets(self.kind)[tier.index()],
                };
                self.m.set_budget(tier, self.kind, bytes);
                self.budgets[tier.index()] = bytes;
            }
            Op::Extent { off, len } => {
                let want = if len == 0 {
                    Want::ZeroSize
                } else if off + len > EXTENT_FILE_BYTES {
                    Want::TierError
                } else {
                    Want::Ok
                };
                self.next_id += 1;
                let r =
                    self.m
                        .register_extent(&self.extent_path, off, len, self.kind, self.next_id);
                check(want, &r, op);
                if let Ok(handle) = r {
                    let bytes = self.extent_bytes[off as usize..(off + len) as usize].to_vec();
                    self.live.push(Tensor {
                        handle,
                        kind: self.kind,
                        len,
                        known: vec![true; bytes.len()],
                        bytes,
                        written: true,
                        read_only: true,
                    });
                }
            }
            Op::SwapOut { t, tier } => {
                let (h, i, want0) = self.pick(t);
                let Some(i) = i else {
                    check(want0, &self.m.swap_out(h, tier), op);
                    return;
                };
                let before = self.residency(i);
                let (len, kind, read_only) =
                    (self.live[i].len, self.live[i].kind, self.live[i].read_only);
                // (what the call must give, bytes freed, where the copies are after).
                let (want, freed, after) = if !before.contains(&tier) || self.pins_on(i, tier) > 0 {
                    (Want::Ok, 0, before.clone())
                } else if read_only && tier == Tier::Disk {
                    // The checkpoint file is the extent's disk copy: never dropped.
                    (Want::Ok, 0, before.clone())
                } else if before.len() > 1 {
                    let rest = before.iter().copied().filter(|&t| t != tier).collect();
                    (Want::Ok, len, rest)
                } else if tier == Tier::Disk {
                    // The last copy stays.
                    (Want::Ok, 0, before.clone())
                } else {
                    let below = tier.below().expect("a tier above the disk");
                    let want = if len > self.budget_of(kind, below) {
                        Want::TooLarge
                    } else {
                        self.oom_or_ok()
                    };
                    (want, len, vec![below])
                };
                let r = self.m.swap_out(h, tier);
                check(want, &r, op);
                match r {
                    Ok(n) => {
                        assert_eq!(n, freed, "{op:?}: bytes freed (copies were on {before:?})");
                        assert_eq!(
                            self.residency(i),
                            after,
                            "{op:?}: copies were on {before:?}"
                        );
                    }
                    // A refusal moves nothing.
                    Err(_) => assert_eq!(self.residency(i), before, "{op:?}"),
                }
            }
            Op::Compact(tier) => {
                let before: Vec<_> = (0..self.live.len()).map(|i| self.residency(i)).collect();
                let r = self.m.compact_tier(tier);
                check(Want::Ok, &r, op);
                if let Ok(report) = r {
                    assert_eq!(report.verify_failures, 0, "{op:?}: {report:?}");
                }
                let after: Vec<_> = (0..self.live.len()).map(|i| self.residency(i)).collect();
                assert_eq!(
                    after, before,
                    "{op:?}: compaction moves copies inside a tier only"
                );
            }
        }
    }

    fn compare(&self, i: usize, o: u64, got: &[u8], what: &str) {
        let t = &self.live[i];
        let o = o as usize;
        for (k, &b) in got.iter().enumerate() {
            if t.known[o + k] && t.bytes[o + k] != b {
                panic!(
                    "{what}: tensor {i} byte {} is {b}, the model says {} (step {})",
                    o + k,
                    t.bytes[o + k],
                    self.steps
                );
            }
        }
    }

    /// The manager agrees with the model.
    fn check_state(&self) {
        let s = self.m.stats();
        assert_eq!(s.tensors, self.live.len() as u64, "tensor count");
        assert_eq!(s.pins, self.guards.len() as u64, "pin count");
        assert_eq!(s.resident, s.charged, "budget counters vs recount");
        let a = self.m.audit();
        assert_eq!(a.overlaps, 0, "overlapping copies");
        assert_eq!(a.busy_entries, 0, "busy entries at rest");
        assert_eq!(a.pins, self.guards.len() as u64);
        assert_eq!(a.entries_without_copy, 0, "a tensor without a copy");
        assert!(a.charged_matches_resident);
        for (i, t) in self.live.iter().enumerate() {
            let (tiers, pins) = self.m.residency(t.handle).unwrap();
            assert_eq!(pins, self.pins_of(i), "pins of tensor {i}");
            for g in self.guards.iter().filter(|g| g.tensor == i) {
                assert!(tiers.contains(&g.guard.tier()), "pinned copy gone");
            }
            if t.written {
                let mut buf = vec![0u8; t.len as usize];
                self.m.read(t.handle, 0, &mut buf).unwrap();
                self.compare(i, 0, &buf, "check");
            }
        }
        // Every live copy is charged and occupies its arena; nothing else is. A checkpoint
        // extent's disk copy is the file: never dropped, no swap space, no budget.
        let mut resident = [[0u64; 5]; 3];
        let mut in_use = self.base_usage;
        for (i, t) in self.live.iter().enumerate() {
            let (tiers, _) = self.m.residency(t.handle).unwrap();
            if t.read_only {
                assert!(
                    tiers.contains(&Tier::Disk),
                    "extent {i}: its checkpoint copy is gone (copies on {tiers:?}, step {})",
                    self.steps
                );
            }
            for tier in tiers {
                if t.read_only && tier == Tier::Disk {
                    continue;
                }
                resident[tier.index()][t.kind.index()] += t.len;
                let granule = match tier {
                    Tier::Disk => DISK_GRANULE_BYTES,
                    _ => MEMORY_GRANULE_BYTES,
                };
                in_use[tier.index()] += round_up(t.len, granule);
            }
        }
        assert_eq!(
            s.resident.bytes, resident,
            "resident bytes by tier and kind vs the live copies (step {})",
            self.steps
        );
        for tier in Tier::ALL {
            assert_eq!(
                self.m.tier_usage(tier).in_use_bytes,
                in_use[tier.index()],
                "{tier} arena bytes in use vs the live copies (step {})",
                self.steps
            );
        }
        if let Some(&h) = self.stale.last() {
            assert!(matches!(
                self.m.residency(h),
                Err(ManagerError::Stale { .. })
            ));
        }
    }
}

fn run(setup: Setup, kind: TensorKind, ops: &[Op]) {
    let Some(mut h) = Harness::new(setup, kind) else {
        return;
    };
    for op in ops {
        h.apply(op);
        h.check_state();
    }
    // Drop every pin: nothing is left pinned, everything still reads back.
    h.guards.clear();
    h.check_state();
    // Free everything: every byte of every tier comes back, zeroed or not.
    for t in std::mem::take(&mut h.live) {
        h.m.deallocate(t.handle).unwrap();
    }
    let s = h.m.stats();
    assert_eq!(s.tensors, 0);
    assert_eq!(
        s.resident.bytes, [[0; 5]; 3],
        "resident after freeing everything"
    );
    assert_eq!(
        s.charged.bytes, [[0; 5]; 3],
        "charged after freeing everything"
    );
    for tier in Tier::ALL {
        assert_eq!(
            h.m.tier_usage(tier).in_use_bytes,
            h.base_usage[tier.index()],
            "{tier} arena bytes in use after freeing everything ({setup:?})"
        );
        let r = h.m.compact_tier(tier);
        assert!(r.is_ok(), "compacting the empty {tier} tier: {r:?}");
    }
}

fn setup_kv_slab() -> Setup {
    Setup {
        kv_slab: true,
        ..Setup::DEFAULT
    }
}

fn setup_zero_on_free() -> Setup {
    Setup {
        zero_on_free: true,
        ..Setup::DEFAULT
    }
}

fn setup_extents() -> Setup {
    Setup {
        extents: true,
        ..Setup::DEFAULT
    }
}

/// A disk of 2 or 3 MiB (it fills), at integrity units from the smallest to more than the
/// disk, power of two or not, with or without `zero_on_free`.
fn setup_tiny_disk() -> impl Strategy<Value = Setup> {
    (
        prop_oneof![Just(2 * MIB), Just(3 * MIB)],
        prop_oneof![
            2 => Just(4 * KIB),
            3 => Just(64 * KIB),
            3 => Just(MIB),
            1 => Just(8 * MIB),
            // Not powers of two: served exactly, or refused when the manager is built.
            1 => Just(12 * KIB),
            1 => Just(3 * MIB / 2),
        ],
        any::<bool>(),
    )
        .prop_map(|(disk_bytes, unit_bytes, zero_on_free)| Setup {
            caps: [MIB, MIB, disk_bytes],
            zero_on_free,
            disk_unit_bytes: unit_bytes,
            tiny_disk: true,
            ..Setup::DEFAULT
        })
}

/// The kinds beside which KV blocks are allocated.
fn non_kv_kind() -> impl Strategy<Value = TensorKind> {
    prop::sample::select(
        TensorKind::ALL
            .into_iter()
            .filter(|&k| k != TensorKind::KvCache)
            .collect::<Vec<_>>(),
    )
}

proptest! {
    #![proptest_config(Config {
        cases: 320,
        max_shrink_iters: 4096,
        ..Config::default()
    })]

    #[test]
    fn manager_conforms_to_the_model(
        kind in prop::sample::select(TensorKind::ALL.to_vec()),
        ops in prop::collection::vec(op(Setup::DEFAULT), 1..64),
    ) {
        run(Setup::DEFAULT, kind, &ops);
    }
}

proptest! {
    #![proptest_config(Config {
        cases: 256,
        max_shrink_iters: 4096,
        ..Config::default()
    })]

    #[test]
    fn manager_with_a_kv_slab_conforms_to_the_model(
        kind in non_kv_kind(),
        ops in prop::collection::vec(op(setup_kv_slab()), 1..64),
    ) {
        run(setup_kv_slab(), kind, &ops);
    }

    #[test]
    fn manager_with_zero_on_free_conforms_to_the_model(
        kind in prop::sample::select(TensorKind::ALL.to_vec()),
        ops in prop::collection::vec(op(setup_zero_on_free()), 1..64),
    ) {
        run(setup_zero_on_free(), kind, &ops);
    }

    #[test]
    fn manager_with_extents_and_swap_outs_conforms_to_the_model(
        kind in prop::sample::select(TensorKind::ALL.to_vec()),
        ops in prop::collection::vec(op(setup_extents()), 1..64),
    ) {
        run(setup_extents(), kind, &ops);
    }

    #[test]
    fn manager_on_a_tiny_full_disk_conforms_to_the_model(
        setup in setup_tiny_disk(),
        kind in prop::sample::select(TensorKind::ALL.to_vec()),
        ops in prop::collection::vec(op(Setup { tiny_disk: true, ..Setup::DEFAULT }), 1..64),
    ) {
        run(setup, kind, &ops);
    }
}

/// The harness bites: a model that forgets a write must see a mismatch.
#[test]
#[should_panic(expected = "the model says")]
fn a_wrong_model_is_caught() {
    let mut h = Harness::new(Setup::DEFAULT, TensorKind::KvCache).unwrap();
    h.apply(&Op::Alloc {
        size: Size::Small(5000),
        wrong_kind: false,
        kv: false,
        tier: Tier::Host,
    });
    h.apply(&Op::Write {
        t: Sel::Live(0),
        off: Off::Frac(0),
        len: Len::Rest,
        seed: 1,
    });
    // Plant a model error: the model's copy of one byte changes.
    h.live[0].bytes[100] ^= 1;
    h.check_state();
}

/// `MemoryManager::read` of a never-written tensor is `Uninitialized` on every tier, and so
/// is a pinned read of it. (Found by `manager_conforms_to_the_model`: pinned reads used to
/// return `Tier(NotWritten)` on the disk and, on host and device, whatever bytes the block
/// held, a freed tensor's without zero-on-free.)
#[test]
fn pinned_read_of_a_never_written_tensor_is_uninitialized() {
    let m = new_manager(&Setup::DEFAULT, TensorKind::KvCache).unwrap();
    // A freed tensor's bytes in the host arena.
    let old = m.allocate(8192, TensorKind::KvCache, 1).unwrap();
    m.write(old, 0, &[0x5A; 8192]).unwrap();
    m.deallocate(old).unwrap();
    let h = m.allocate(8192, TensorKind::KvCache, 2).unwrap();
    let mut buf = vec![0u8; 8192];
    assert!(matches!(
        m.read(h, 0, &mut buf),
        Err(ManagerError::Uninitialized { .. })
    ));
    for tier in [Tier::Host, Tier::Device, Tier::Disk] {
        let g = m.pin(h, tier).unwrap();
        let r = g.read(0, &mut buf);
        assert!(
            matches!(r, Err(ManagerError::Uninitialized { .. })),
            "pinned on {tier}: {r:?}, {} bytes of the freed tensor",
            buf.iter().filter(|&&b| b == 0x5A).count()
        );
    }
}
