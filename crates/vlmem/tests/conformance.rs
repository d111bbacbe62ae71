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

mod common;

use proptest::prelude::*;
use proptest::test_runner::Config;
use std::path::PathBuf;
use vlmem::{ManagerConfig, ManagerError, MemoryManager, PinGuard, TensorHandle, TensorKind, Tier};

const MIB: u64 = 1 << 20;
const CAPS: [u64; 3] = [MIB, MIB, 16 * MIB];
const MAX_LEN: u64 = 400 * 1024;
const EXTENT_FILE_BYTES: u64 = 128 * 1024;

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

fn op() -> impl Strategy<Value = Op> {
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
            prop_oneof![6 => Just(Tier::Host), 1 => Just(Tier::Device), 1 => Just(Tier::Disk)],
        )
            .prop_map(|(size, wrong_kind, tier)| Op::Alloc { size, wrong_kind, tier }),
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
        1 => (0..EXTENT_FILE_BYTES + 10, 0..EXTENT_FILE_BYTES / 2)
            .prop_map(|(off, len)| Op::Extent { off, len }),
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
    kind: TensorKind,
    other_kind: TensorKind,
    foreign: TensorHandle,
    _other: MemoryManager,
    _dir: tempfile::TempDir,
    extent_path: PathBuf,
    extent_bytes: Vec<u8>,
    budgets: [u64; 3],
    live: Vec<Tensor>,
    stale: Vec<TensorHandle>,
    guards: Vec<Guard>,
    next_id: u64,
    steps: u64,
}

fn new_manager(kind: TensorKind) -> MemoryManager {
    let mut c = ManagerConfig::with_capacities(CAPS[0], CAPS[1], CAPS[2]);
    c.shards = 4;
    c.disk.preallocate = false;
    for t in Tier::ALL {
        for k in TensorKind::ALL {
            c.budgets.bytes[t.index()][k.index()] = if k == kind { CAPS[t.index()] } else { 0 };
        }
    }
    MemoryManager::new(c).unwrap()
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
    fn new(kind: TensorKind) -> Self {
        let other_kind = TensorKind::ALL
            .into_iter()
            .find(|&k| k != kind)
            .expect("five kinds");
        let other = new_manager(kind);
        let foreign = other.allocate(4096, kind, 0).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let extent_path = dir.path().join("checkpoint.bin");
        let extent_bytes = fill(201, EXTENT_FILE_BYTES as usize);
        std::fs::write(&extent_path, &extent_bytes).unwrap();
        Harness {
            m: new_manager(kind),
            kind,
            other_kind,
            foreign,
            _other: other,
            _dir: dir,
            extent_path,
            extent_bytes,
            budgets: CAPS,
            live: Vec::new(),
            stale: Vec::new(),
            guards: Vec::new(),
            next_id: 1,
            steps: 0,
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

    /// Whether `OutOfMemory` is possible now.
    fn constrained(&self) -> bool {
        !self.guards.is_empty() || self.budgets != CAPS
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
                tier,
            } => {
                let kind = if wrong_kind {
                    self.other_kind
                } else {
                    self.kind
                };
                let bytes = match size {
                    Size::Zero => 0,
                    Size::Small(n) => n,
                    Size::OverCapacity => CAPS[tier.index()] + 1,
                    Size::Huge(n) => n,
                };
                let budget = if wrong_kind {
                    0
                } else {
                    self.budgets[tier.index()]
                };
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
                        } else if self.residency(i).contains(&Tier::Host) {
                            Want::Ok
                        } else if t.len > self.budgets[Tier::Host.index()] {
                            Want::TooLarge
                        } else {
                            self.oom_or_ok()
                        }
                    }
                };
                let r = self.m.write(h, o, &data);
                check(want, &r, op);
                if let (Ok(()), Some(i)) = (&r, i) {
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
                        } else if self.live[i].len > self.budgets[tier.index()] {
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
                check(Want::Ok, &r, op);
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
                    BudgetLevel::Small => CAPS[tier.index()] / 4,
                    BudgetLevel::Full => CAPS[tier.index()],
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
                        len,
                        known: vec![true; bytes.len()],
                        bytes,
                        written: true,
                        read_only: true,
                    });
                }
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
        if let Some(&h) = self.stale.last() {
            assert!(matches!(
                self.m.residency(h),
                Err(ManagerError::Stale { .. })
            ));
        }
    }
}

fn run(kind: TensorKind, ops: &[Op]) {
    let mut h = Harness::new(kind);
    for op in ops {
        h.apply(op);
        h.check_state();
    }
    // Drop every pin: nothing is left pinned, everything still reads back.
    h.guards.clear();
    h.check_state();
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
        ops in prop::collection::vec(op(), 1..64),
    ) {
        run(kind, &ops);
    }
}

/// The harness bites: a model that forgets a write must see a mismatch.
#[test]
#[should_panic(expected = "the model says")]
fn a_wrong_model_is_caught() {
    let mut h = Harness::new(TensorKind::KvCache);
    h.apply(&Op::Alloc {
        size: Size::Small(5000),
        wrong_kind: false,
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
    let m = new_manager(TensorKind::KvCache);
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
