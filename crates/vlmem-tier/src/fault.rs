//! Deterministic fault injection at the I/O points.
//!
//! All disk I/O goes through [`crate::io::FileIo`] and all tier reads and writes through
//! [`crate::TierBackend`]; [`crate::io::FaultyFileIo`] and [`crate::FaultyTier`] wrap them
//! and consult a [`FaultPlan`] at every call. A plan is a list of rules "at the Nth call of
//! this I/O point, do that, so many times"; it is deterministic and per instance (no global
//! state), so fault tests run in parallel.

use crate::sync::Mutex;
use std::time::Duration;

/// A place where I/O happens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IoPoint {
    /// Opening (creating) a swap file or a checkpoint file.
    Open,
    /// Preallocating a swap file (fallocate).
    Allocate,
    /// Writing bytes (pwrite on disk; a copy into a memory tier).
    Write,
    /// Reading bytes (pread on disk; a copy out of a memory tier).
    Read,
    /// Flushing written data to stable storage (fdatasync).
    Sync,
}

/// What goes wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// ENOSPC: the device is full.
    NoSpace,
    /// EIO: the device failed.
    Eio,
    /// The call transfers only part of the bytes (half, rounded down to 4 KiB; 0 when less
    /// than 8 KiB was asked for). A reader or writer that loops on short transfers recovers
    /// from one; a fault that repeats stops progress and must fail the operation.
    Short,
    /// One bit of the data is flipped: after a read (corrupt data returned), or in a copy of
    /// the data before a write (corrupt data stored; the caller's buffer is untouched).
    BitFlip,
    /// The call sleeps this long before doing its work normally.
    Slow(Duration),
}

/// One rule of a plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaultRule {
    /// Where it fires.
    pub point: IoPoint,
    /// What happens.
    pub kind: FaultKind,
    /// Calls of `point` to let through before the first firing.
    pub skip_calls: u64,
    /// How many times it fires (`u64::MAX`: for ever).
    pub times: u64,
}

impl FaultRule {
    /// A rule that fires once, at the first call of `point`.
    pub const fn once(point: IoPoint, kind: FaultKind) -> Self {
        FaultRule {
            point,
            kind,
            skip_calls: 0,
            times: 1,
        }
    }
    /// A rule that fires at every call of `point`.
    pub const fn always(point: IoPoint, kind: FaultKind) -> Self {
        FaultRule {
            point,
            kind,
            skip_calls: 0,
            times: u64::MAX,
        }
    }
    /// The same rule, letting `calls` calls through first.
    pub const fn after(mut self, calls: u64) -> Self {
        self.skip_calls = calls;
        self
    }
}

#[derive(Debug)]
struct RuleState {
    rule: FaultRule,
    seen_calls: u64,
    fired: u64,
}

/// A schedule of faults, consulted at every I/O call of the wrappers that hold it.
#[derive(Debug, Default)]
pub struct FaultPlan {
    rules: Mutex<Vec<RuleState>>,
}

impl FaultPlan {
    /// An empty plan (no faults).
    pub fn new() -> Self {
        FaultPlan::default()
    }
    /// Adds a rule.
    pub fn add(&self, rule: FaultRule) {
        self.rules.lock().push(RuleState {
            rule,
            seen_calls: 0,
            fired: 0,
        });
    }
    /// Removes every rule.
    pub fn clear(&self) {
        self.rules.lock().clear();
    }
    /// How many faults have fired so far.
    pub fn fired(&self) -> u64 {
        self.rules.lock().iter().map(|r| r.fired).sum()
    }
    /// Called by the wrappers at each call of `point`: the fault to apply, if any. The
    /// first matching rule that is due fires.
    pub fn check(&self, point: IoPoint) -> Option<FaultKind> {
        let mut rules = self.rules.lock();
        let mut hit = None;
        for r in rules.iter_mut().filter(|r| r.rule.point == point) {
            let call = r.seen_calls;
            r.seen_calls += 1;
            if hit.is_none() && call >= r.rule.skip_calls && r.fired < r.rule.times {
                r.fired += 1;
                hit = Some(r.rule.kind);
            }
        }
        hit
    }
}

/// The byte count a `Short` fault lets through for a request of `len_bytes`.
pub(crate) fn short_len(len_bytes: usize) -> usize {
    (len_bytes / 2) & !4095
}

/// Flips one bit in the middle of `buf` (no-op on an empty buffer).
pub(crate) fn flip_bit(buf: &mut [u8]) {
    let mid = buf.len() / 2;
    if let Some(b) = buf.get_mut(mid) {
        *b ^= 0x10;
    }
}
