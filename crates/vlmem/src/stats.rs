//! Manager statistics. Residency is recounted from the handle table under all shard locks,
//! so a snapshot's `resident` bytes always equal the sum of live copies; `charged` are the
//! budget counters, which must equal `resident` when no operation is in flight (a reservation
//! is charged just before it is installed, so under load `charged >= resident`). Event
//! counters (hits, moves, latencies) are atomics, each exact on its own.

use crate::config::Budgets;
use std::time::Duration;
use vlmem_core::sync::atomic::{AtomicU64, Ordering};
use vlmem_core::{TensorKind, Tier};

/// Bytes per tier and kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TierKindBytes {
    /// `bytes[tier.index()][kind.index()]`.
    pub bytes: [[u64; 5]; 3],
}

impl TierKindBytes {
    pub(crate) fn add(&mut self, tier: Tier, kind: TensorKind, bytes: u64) {
        self.bytes[tier.index()][kind.index()] += bytes;
    }
    /// Bytes of `kind` on `tier`.
    pub fn get(&self, tier: Tier, kind: TensorKind) -> u64 {
        self.bytes[tier.index()][kind.index()]
    }
    /// Bytes on `tier`, all kinds.
    pub fn tier_total(&self, tier: Tier) -> u64 {
        self.bytes[tier.index()].iter().sum()
    }
}

/// Swap latency histogram: bucket i counts moves of [2^i, 2^(i+1)) microseconds.
const LATENCY_BUCKETS: usize = 32;

#[derive(Debug, Default)]
pub(crate) struct Counters {
    hits: [AtomicU64; 3],
    misses: [AtomicU64; 3],
    bytes_in: [AtomicU64; 3],
    bytes_out: [AtomicU64; 3],
    evictions: [AtomicU64; 3],
    write_backs: [AtomicU64; 3],
    moves: AtomicU64,
    pin_wait_ns: AtomicU64,
    pub(crate) prefetches: AtomicU64,
    pub(crate) prefetches_dropped: AtomicU64,
    pub(crate) prefetch_failures: AtomicU64,
    pub(crate) demote_failures: AtomicU64,
    pub(crate) compaction_moves: AtomicU64,
    pub(crate) compaction_bytes: AtomicU64,
    pub(crate) compaction_ns: AtomicU64,
    pub(crate) compaction_verify_failures: AtomicU64,
    pub(crate) oom_waits: AtomicU64,
    latency_us: [AtomicU64; LATENCY_BUCKETS],
}

impl Counters {
    pub(crate) fn hit(&self, tier: Tier) {
        self.hits[tier.index()].fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn miss(&self, tier: Tier) {
        self.misses[tier.index()].fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn add_pin_wait(&self, waited: Duration) {
        self.pin_wait_ns
            .fetch_add(waited.as_nanos() as u64, Ordering::Relaxed);
    }
    pub(crate) fn record_move(&self, from: Tier, to: Tier, bytes: u64, took: Duration) {
        self.moves.fetch_add(1, Ordering::Relaxed);
        self.bytes_out[from.index()].fetch_add(0, Ordering::Relaxed);
        self.bytes_in[to.index()].fetch_add(bytes, Ordering::Relaxed);
        let us = took.as_micros().max(1) as u64;
        let bucket = (63 - us.leading_zeros() as usize).min(LATENCY_BUCKETS - 1);
        self.latency_us[bucket].fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn eviction(&self, tier: Tier, bytes: u64, written_back: bool) {
        self.evictions[tier.index()].fetch_add(1, Ordering::Relaxed);
        self.bytes_out[tier.index()].fetch_add(bytes, Ordering::Relaxed);
        if written_back {
            self.write_backs[tier.index()].fetch_add(1, Ordering::Relaxed);
        }
    }
    pub(crate) fn snapshot(&self) -> CounterSnapshot {
        let load3 = |a: &[AtomicU64; 3]| {
            [
                a[0].load(Ordering::Relaxed),
                a[1].load(Ordering::Relaxed),
                a[2].load(Ordering::Relaxed),
            ]
        };
        CounterSnapshot {
            hits: load3(&self.hits),
            misses: load3(&self.misses),
            bytes_in: load3(&self.bytes_in),
            bytes_out: load3(&self.bytes_out),
            evictions: load3(&self.evictions),
            write_backs: load3(&self.write_backs),
            moves: self.moves.load(Ordering::Relaxed),
            pin_wait_ns: self.pin_wait_ns.load(Ordering::Relaxed),
            prefetches: self.prefetches.load(Ordering::Relaxed),
            prefetches_dropped: self.prefetches_dropped.load(Ordering::Relaxed),
            prefetch_failures: self.prefetch_failures.load(Ordering::Relaxed),
            demote_failures: self.demote_failures.load(Ordering::Relaxed),
            compaction_moves: self.compaction_moves.load(Ordering::Relaxed),
            compaction_bytes: self.compaction_bytes.load(Ordering::Relaxed),
            compaction_ns: self.compaction_ns.load(Ordering::Relaxed),
            compaction_verify_failures: self.compaction_verify_failures.load(Ordering::Relaxed),
            oom_waits: self.oom_waits.load(Ordering::Relaxed),
            latency_us: std::array::from_fn(|i| self.latency_us[i].load(Ordering::Relaxed)),
        }
    }
}

/// The event counters at one instant. Per-tier arrays are indexed by [`Tier::index`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CounterSnapshot {
    /// Pins served from a copy already on the tier.
    pub hits: [u64; 3],
    /// Pins that had to bring the tensor to the tier.
    pub misses: [u64; 3],
    /// Bytes copied into each tier.
    pub bytes_in: [u64; 3],
    /// Bytes dropped or written back out of each tier by eviction.
    pub bytes_out: [u64; 3],
    /// Copies evicted from each tier.
    pub evictions: [u64; 3],
    /// Of those, the ones written back one tier down first.
    pub write_backs: [u64; 3],
    /// Moves through the transfer engine.
    pub moves: u64,
    /// Time spent in `pin`, waiting for moves included.
    pub pin_wait_ns: u64,
    /// Prefetch hints taken.
    pub prefetches: u64,
    /// Prefetch hints dropped because too many were in flight.
    pub prefetches_dropped: u64,
    /// Prefetches that failed (no room, I/O error); the tensor stayed where it was.
    pub prefetch_failures: u64,
    /// Demotions that failed; the tensor kept its copy.
    pub demote_failures: u64,
    /// Live copies relocated by compaction.
    pub compaction_moves: u64,
    /// Bytes those relocations copied.
    pub compaction_bytes: u64,
    /// Time spent relocating (copy and verification), nanoseconds.
    pub compaction_ns: u64,
    /// Relocations whose copy did not verify (the tensor kept its old block).
    pub compaction_verify_failures: u64,
    /// Reservations that found only moving tensors to evict and waited for them.
    pub oom_waits: u64,
    /// Move latency histogram (bucket i: [2^i, 2^(i+1)) microseconds).
    pub latency_us: [u64; LATENCY_BUCKETS],
}

impl CounterSnapshot {
    /// Hit ratio of pins on `tier` (0 when there were none).
    pub fn hit_ratio(&self, tier: Tier) -> f64 {
        let (h, m) = (self.hits[tier.index()], self.misses[tier.index()]);
        if h + m == 0 {
            0.0
        } else {
            h as f64 / (h + m) as f64
        }
    }

    /// The move latency below which a fraction `q` of moves fell (upper bucket bound, µs).
    pub fn latency_percentile_us(&self, q: f64) -> u64 {
        let total: u64 = self.latency_us.iter().sum();
        if total == 0 {
            return 0;
        }
        let target = (total as f64 * q).ceil() as u64;
        let mut seen = 0;
        for (i, &n) in self.latency_us.iter().enumerate() {
            seen += n;
            if seen >= target {
                return 1u64 << (i + 1);
            }
        }
        1u64 << LATENCY_BUCKETS
    }
}

/// A snapshot of the manager.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManagerStats {
    /// Live tensors.
    pub tensors: u64,
    /// Pins held.
    pub pins: u64,
    /// Bytes of live copies per tier and kind, recounted from the handle table
    /// (checkpoint extents excluded: they cost no budget).
    pub resident: TierKindBytes,
    /// The budget counters per tier and kind.
    pub charged: TierKindBytes,
    /// The budgets.
    pub budgets: Budgets,
    /// Event counters.
    pub counters: CounterSnapshot,
}

impl ManagerStats {
    /// A table for people (`vlmem inspect`): bytes per tier and kind against the budgets,
    /// then per tier pins, hit ratio, bytes moved and evictions, then waits, swap latency,
    /// prefetch and compaction figures.
    pub fn to_text(&self) -> String {
        use vlmem_core::bytes::format_bytes as b;
        let c = &self.counters;
        let charged: u64 = Tier::ALL.iter().map(|&t| self.charged.tier_total(t)).sum();
        let resident: u64 = Tier::ALL.iter().map(|&t| self.resident.tier_total(t)).sum();
        let mut out = format!(
            "tensors {}   pins held {}   budget charges beyond the recount (moves in flight): {}\n\nresident / budget\n{:8}",
            self.tensors,
            self.pins,
            b(charged.saturating_sub(resident)),
            "tier"
        );
        for k in TensorKind::ALL {
            out.push_str(&format!(" {:>21}", k.to_string()));
        }
        out.push('\n');
        for t in Tier::ALL {
            out.push_str(&format!("{:8}", t.to_string()));
            for k in TensorKind::ALL {
                let cell = format!(
                    "{} / {}",
                    b(self.resident.get(t, k)),
                    b(self.budgets.get(t, k))
                );
                out.push_str(&format!(" {cell:>21}"));
            }
            out.push('\n');
        }
        out.push_str(&format!(
            "\n{:8} {:>10} {:>10} {:>9} {:>12} {:>12} {:>10} {:>11}\n",
            "tier", "hits", "misses", "hit %", "bytes in", "bytes out", "evictions", "write-backs"
        ));
        for t in Tier::ALL {
            let i = t.index();
            out.push_str(&format!(
                "{:8} {:>10} {:>10} {:>8.1}% {:>12} {:>12} {:>10} {:>11}\n",
                t.to_string(),
                c.hits[i],
                c.misses[i],
                100.0 * c.hit_ratio(t),
                b(c.bytes_in[i]),
                b(c.bytes_out[i]),
                c.evictions[i],
                c.write_backs[i]
            ));
        }
        out.push_str(&format!(
            "\nmoves {}   time in pin {:.3} s   swap latency p50 {} us, p90 {} us, p99 {} us (bucket bounds)\n",
            c.moves,
            c.pin_wait_ns as f64 / 1e9,
            c.latency_percentile_us(0.5),
            c.latency_percentile_us(0.9),
            c.latency_percentile_us(0.99)
        ));
        out.push_str(&format!(
            "prefetches {} (dropped {}, failed {})   demotion failures {}   waits for moving victims {}\n",
            c.prefetches, c.prefetches_dropped, c.prefetch_failures, c.demote_failures, c.oom_waits
        ));
        out.push_str(&format!(
            "compaction: {} copies moved, {} copied in {:.3} s, {} verify failures\n",
            c.compaction_moves,
            b(c.compaction_bytes),
            c.compaction_ns as f64 / 1e9,
            c.compaction_verify_failures
        ));
        out
    }

    /// Prometheus text exposition format.
    pub fn to_prometheus(&self) -> String {
        let mut out = String::new();
        out.push_str("# TYPE vlmem_resident_bytes gauge\n");
        for t in Tier::ALL {
            for k in TensorKind::ALL {
                out.push_str(&format!(
                    "vlmem_resident_bytes{{tier=\"{t}\",kind=\"{k}\"}} {}\n",
                    self.resident.get(t, k)
                ));
            }
        }
        out.push_str("# TYPE vlmem_budget_bytes gauge\n");
        for t in Tier::ALL {
            for k in TensorKind::ALL {
                out.push_str(&format!(
                    "vlmem_budget_bytes{{tier=\"{t}\",kind=\"{k}\"}} {}\n",
                    self.budgets.get(t, k)
                ));
            }
        }
        let c = &self.counters;
        for (name, arr) in [
            ("vlmem_pin_hits_total", c.hits),
            ("vlmem_pin_misses_total", c.misses),
            ("vlmem_bytes_in_total", c.bytes_in),
            ("vlmem_bytes_out_total", c.bytes_out),
            ("vlmem_evictions_total", c.evictions),
            ("vlmem_write_backs_total", c.write_backs),
        ] {
            out.push_str(&format!("# TYPE {name} counter\n"));
            for t in Tier::ALL {
                out.push_str(&format!("{name}{{tier=\"{t}\"}} {}\n", arr[t.index()]));
            }
        }
        out.push_str(&format!(
            "# TYPE vlmem_tensors gauge\nvlmem_tensors {}\n",
            self.tensors
        ));
        out.push_str(&format!(
            "# TYPE vlmem_pins gauge\nvlmem_pins {}\n",
            self.pins
        ));
        out.push_str(&format!(
            "# TYPE vlmem_pin_wait_seconds_total counter\nvlmem_pin_wait_seconds_total {}\n",
            c.pin_wait_ns as f64 / 1e9
        ));
        for (name, value) in [
            ("vlmem_moves_total", c.moves),
            ("vlmem_prefetches_total", c.prefetches),
            ("vlmem_prefetches_dropped_total", c.prefetches_dropped),
            ("vlmem_compaction_moves_total", c.compaction_moves),
            ("vlmem_compaction_bytes_total", c.compaction_bytes),
        ] {
            out.push_str(&format!("# TYPE {name} counter\n{name} {value}\n"));
        }
        out.push_str("# TYPE vlmem_swap_latency_us summary\n");
        for q in [0.5, 0.9, 0.99] {
            out.push_str(&format!(
                "vlmem_swap_latency_us{{quantile=\"{q}\"}} {}\n",
                c.latency_percentile_us(q)
            ));
        }
        out
    }
}
