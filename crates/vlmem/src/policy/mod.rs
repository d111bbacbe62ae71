//! Cache policies and simulators over traces of `(key, bytes)` accesses with a byte capacity.
//!
//! Everything here is pure and deterministic: no clock, no threads, no manager. The replay
//! workloads (`vlmem_workloads::replay`) run the same traces through the real manager and
//! through these simulators, so a figure is always reported beside Belady's OPT and LRU on the
//! same trace.
//!
//! - [`Lru`]: least recently used, by bytes.
//! - [`Fifo`]: first in, first out, by bytes.
//! - [`S3Fifo`]: small FIFO (10% of the bytes) + main FIFO + ghost queue, 2-bit frequency
//!   (Yang et al., SOSP'23); generic over the key so [`crate::vision_cache`] uses it directly.
//! - [`Belady`]: offline OPT (farthest next use, with bypass, or without it as demand-paging
//!   MIN). With unit sizes it is exactly
//!   optimal; with variable sizes exact OPT is NP-hard and this is the standard
//!   farthest-next-use heuristic (evict the farthest next uses until the object fits, and
//!   bypass the object instead when one of those would be used before it).
//! - [`PlannedStream`]: the weights plan, not an eviction policy: a pinned prefix of the
//!   access plan stays resident, everything else streams through a staging ring of
//!   `lookahead + 1` chunks.
//!
//! Hand-worked references (tests/policy.rs): a cyclic scan of `n` equal items through a cache
//! of `k < n` items gets 0 hits from LRU, FIFO and S3-FIFO's main queue, and `k - 1` hits per
//! cycle from MIN once warm (`k` with bypass).

mod belady;
mod fifo;
mod lru;
mod planned;
mod s3fifo;
pub mod trace;

pub use belady::Belady;
pub use fifo::Fifo;
pub use lru::Lru;
pub use planned::PlannedStream;
pub use s3fifo::S3Fifo;

use serde::Serialize;

/// One access of a trace: an object and its size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct Access {
    /// The object.
    pub key: u64,
    /// Its size in bytes.
    pub bytes: u64,
}

impl Access {
    /// An access.
    pub const fn new(key: u64, bytes: u64) -> Self {
        Access { key, bytes }
    }
}

/// An online cache policy over byte sizes: every request either hits or, on a miss, may admit
/// the object (evicting others).
pub trait CachePolicy {
    /// Short name ("lru", "s3fifo", ...).
    fn name(&self) -> &'static str;
    /// Serves one request; true on a hit. On a miss the object is admitted if the policy
    /// wants it and it fits the capacity.
    fn request(&mut self, key: u64, bytes: u64) -> bool;
    /// Bytes resident now (never above the capacity).
    fn resident_bytes(&self) -> u64;
}

/// Hits and misses of a simulation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct HitStats {
    /// Requests served from the cache.
    pub hits: u64,
    /// Requests that had to load the object.
    pub misses: u64,
    /// `hits / (hits + misses)` (0 for an empty trace).
    pub hit_ratio: f64,
    /// Bytes of the requests that hit.
    pub bytes_hit: u64,
    /// Bytes of the requests that missed (what had to be loaded).
    pub bytes_missed: u64,
}

impl HitStats {
    /// Counts one request.
    pub fn record(&mut self, hit: bool, bytes: u64) {
        if hit {
            self.hits += 1;
            self.bytes_hit += bytes;
        } else {
            self.misses += 1;
            self.bytes_missed += bytes;
        }
        let n = self.hits + self.misses;
        self.hit_ratio = self.hits as f64 / n as f64;
    }

    /// Byte hit ratio: `bytes_hit / (bytes_hit + bytes_missed)`.
    pub fn byte_hit_ratio(&self) -> f64 {
        let n = self.bytes_hit + self.bytes_missed;
        if n == 0 {
            0.0
        } else {
            self.bytes_hit as f64 / n as f64
        }
    }
}

/// Which policy [`simulate`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "policy")]
pub enum PolicyKind {
    /// [`Lru`].
    Lru,
    /// [`Fifo`].
    Fifo,
    /// [`S3Fifo`] with the default 10% small queue.
    S3Fifo,
    /// [`Belady`] (OPT, with bypass) over the whole trace.
    Belady,
    /// [`Belady::demand_paging`]: MIN where every object must enter the cache to be used.
    BeladyDemand,
    /// [`PlannedStream`] with the plan taken as the order of first uses in the trace.
    PlannedStream {
        /// Chunks fetched ahead of use (the staging ring holds `lookahead + 1`).
        lookahead: usize,
    },
}

impl PolicyKind {
    /// Short name.
    pub fn name(&self) -> &'static str {
        match self {
            PolicyKind::Lru => "lru",
            PolicyKind::Fifo => "fifo",
            PolicyKind::S3Fifo => "s3fifo",
            PolicyKind::Belady => "opt",
            PolicyKind::BeladyDemand => "opt_demand",
            PolicyKind::PlannedStream { .. } => "planned",
        }
    }
}

/// Runs `trace` through `policy` with a cache of `capacity_bytes`; every request counts
/// (compulsory misses included).
pub fn simulate(policy: PolicyKind, trace: &[Access], capacity_bytes: u64) -> HitStats {
    match policy {
        PolicyKind::Lru => simulate_with(&mut Lru::new(capacity_bytes), trace),
        PolicyKind::Fifo => simulate_with(&mut Fifo::new(capacity_bytes), trace),
        PolicyKind::S3Fifo => simulate_with(&mut S3Fifo::<u64>::new(capacity_bytes), trace),
        PolicyKind::Belady => Belady::new(trace, capacity_bytes).run(),
        PolicyKind::BeladyDemand => Belady::new(trace, capacity_bytes).demand_paging().run(),
        PolicyKind::PlannedStream { lookahead } => {
            let plan = trace::first_uses(trace);
            simulate_with(
                &mut PlannedStream::new(&plan, capacity_bytes, lookahead),
                trace,
            )
        }
    }
}

/// Runs `trace` through an online policy.
pub fn simulate_with(policy: &mut dyn CachePolicy, trace: &[Access]) -> HitStats {
    let mut s = HitStats::default();
    for a in trace {
        let hit = policy.request(a.key, a.bytes);
        s.record(hit, a.bytes);
    }
    s
}
