//! Where tensors are, the stats recount, and the audit of the ledger.

use super::{Inner, MemoryManager, TensorHandle};
use crate::error::Result;
use crate::stats::{ManagerStats, TierKindBytes};
use vlmem_core::sync::atomic::Ordering;
use vlmem_core::{TensorKind, Tier};

/// The result of [`MemoryManager::audit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Audit {
    /// Pairs of live copies on one tier whose blocks overlap (must be 0).
    pub overlaps: u64,
    /// Entries with a move or write in flight.
    pub busy_entries: u64,
    /// Pins held.
    pub pins: u64,
    /// Entries with no copy at all (must be 0: a lost tensor).
    pub entries_without_copy: u64,
    /// Whether the budget counters equal the recount of live copies.
    pub charged_matches_resident: bool,
}

impl MemoryManager {
    /// Where the tensor has copies now (fastest first), and its pin count.
    pub fn residency(&self, handle: TensorHandle) -> Result<(Vec<Tier>, u32)> {
        let inner = &self.inner;
        let shard = inner.shard_of(handle)?;
        let mut st = shard.state.lock();
        let e = inner.entry(&mut st, handle)?;
        let tiers = Tier::ALL
            .into_iter()
            .filter(|t| e.copies[t.index()].is_some())
            .collect();
        Ok((tiers, e.pins()))
    }

    /// A consistent snapshot of the manager's state and counters (see [`ManagerStats`]).
    pub fn stats(&self) -> ManagerStats {
        self.inner.stats()
    }

    /// Checks the ledger under all shard locks: no two live copies on one tier overlap, no
    /// copy is marked busy or pinned when nothing runs, and the budget counters equal the
    /// recount. Meant for quiescent moments (tests, the end of `vlmem stress`).
    pub fn audit(&self) -> Audit {
        self.inner.audit()
    }
}

impl Inner {
    fn audit(&self) -> Audit {
        let guards: Vec<_> = self.shards.iter().map(|s| s.state.lock()).collect();
        let mut spans: [Vec<(u64, u64)>; 3] = Default::default();
        let mut busy = 0u64;
        let mut pins = 0u64;
        let mut copyless = 0u64;
        for st in &guards {
            for e in st.slots.iter().filter_map(|s| s.entry.as_ref()) {
                busy += u64::from(e.busy);
                pins += u64::from(e.pins());
                copyless += u64::from(e.fastest().is_none());
                for t in Tier::ALL {
                    if let Some(c) = e.copies[t.index()]
                        && !c.res.is_in_place()
                    {
                        let b = c.res.block();
                        spans[t.index()].push((b.offset_bytes(), b.end_bytes()));
                    }
                }
            }
        }
        drop(guards);
        let mut overlaps = 0u64;
        for list in spans.iter_mut() {
            list.sort_unstable();
            overlaps += list.windows(2).filter(|w| w[1].0 < w[0].1).count() as u64;
        }
        let stats = self.stats();
        Audit {
            overlaps,
            busy_entries: busy,
            pins,
            entries_without_copy: copyless,
            charged_matches_resident: stats.charged == stats.resident,
        }
    }

    /// Recounts every copy under all shard locks (taken in ascending order) and compares with
    /// the budget counters.
    fn stats(&self) -> ManagerStats {
        let guards: Vec<_> = self.shards.iter().map(|s| s.state.lock()).collect();
        let mut resident = TierKindBytes::default();
        let mut tensors = 0u64;
        let mut pinned = 0u64;
        for st in &guards {
            for e in st.slots.iter().filter_map(|s| s.entry.as_ref()) {
                tensors += 1;
                for t in Tier::ALL {
                    if let Some(c) = e.copies[t.index()] {
                        if !c.res.is_in_place() {
                            resident.add(t, e.kind, c.res.len_bytes());
                        }
                        pinned += u64::from(c.pins);
                    }
                }
            }
        }
        let mut charged = TierKindBytes::default();
        for t in Tier::ALL {
            for k in TensorKind::ALL {
                charged.add(
                    t,
                    k,
                    self.used[t.index()][k.index()].load(Ordering::Acquire),
                );
            }
        }
        drop(guards);
        ManagerStats {
            tensors,
            pins: pinned,
            resident,
            charged,
            budgets: *self.budgets.read(),
            counters: self.counters.snapshot(),
        }
    }
}
