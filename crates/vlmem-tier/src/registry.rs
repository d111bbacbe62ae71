//! The table of live reservations of one tier, with per-reservation access states
//! (readers / one writer). A leaf lock: held only to look up or flip a state, never across a
//! copy or an I/O.

use crate::backend::Reservation;
use crate::error::{Result, TierError};
use crate::sync::Mutex;
use std::collections::BTreeMap;
use vlmem_core::Tier;

#[derive(Debug)]
pub(crate) struct Entry<M> {
    pub(crate) res: Reservation,
    pub(crate) name: std::sync::Arc<str>,
    /// Accesses in progress: (id, start, end, write).
    accesses: Vec<(u64, u64, u64, bool)>,
    pub(crate) meta: M,
}

#[derive(Debug)]
pub(crate) struct Registry<M> {
    tier: Tier,
    entries: Mutex<BTreeMap<u64, Entry<M>>>,
    next_access: crate::sync::atomic::AtomicU64,
}

/// A granted access; dropping it ends the access.
#[derive(Debug)]
pub(crate) struct Access<'a, M> {
    reg: &'a Registry<M>,
    key: u64,
    id: u64,
}

impl<M> Drop for Access<'_, M> {
    fn drop(&mut self) {
        let mut entries = self.reg.entries.lock();
        if let Some(e) = entries.get_mut(&self.key) {
            e.accesses.retain(|a| a.0 != self.id);
        }
    }
}

impl<M> Registry<M> {
    pub(crate) fn new(tier: Tier) -> Self {
        Registry {
            tier,
            entries: Mutex::new(BTreeMap::new()),
            next_access: crate::sync::atomic::AtomicU64::new(0),
        }
    }

    fn invalid(&self, res: &Reservation) -> TierError {
        TierError::InvalidReservation {
            tier: self.tier,
            offset_bytes: res.offset_bytes(),
        }
    }

    /// Adds a reservation; for arena blocks, refuses one that overlaps a live block (a
    /// defence against a faulty allocator: overlapping blocks would alias memory).
    pub(crate) fn insert(&self, res: Reservation, name: &str, meta: M) -> Result<()> {
        let key = res.key();
        let mut entries = self.entries.lock();
        if !res.is_in_place() {
            let start = res.block().offset_bytes();
            let end = res.block().end_bytes();
            let prev_overlaps = entries
                .range(..=start)
                .next_back()
                .is_some_and(|(_, e)| e.res.block().end_bytes() > start);
            let next_overlaps = entries.range(start..).next().is_some_and(|(k, _)| *k < end);
            if prev_overlaps || next_overlaps {
                return Err(TierError::InvalidConfig(format!(
                    "the {:?} allocator returned block {start}..{end}, which overlaps a live block",
                    self.tier
                )));
            }
        } else if entries.contains_key(&key) {
            return Err(self.invalid(&res));
        }
        entries.insert(
            key,
            Entry {
                res,
                name: std::sync::Arc::from(name),
                accesses: Vec::new(),
                meta,
            },
        );
        Ok(())
    }

    /// Removes a reservation that nobody is accessing.
    pub(crate) fn remove(&self, res: &Reservation) -> Result<Entry<M>> {
        let mut entries = self.entries.lock();
        match entries.get(&res.key()) {
            Some(e) if e.res == *res => {
                if !e.accesses.is_empty() {
                    return Err(TierError::Busy {
                        tier: self.tier,
                        offset_bytes: res.offset_bytes(),
                    });
                }
            }
            _ => return Err(self.invalid(res)),
        }
        entries.remove(&res.key()).ok_or_else(|| self.invalid(res))
    }

    /// Begins a read (shared) or write (exclusive) access to bytes
    /// `offset_bytes..offset_bytes + len_bytes` of a live reservation. Disjoint ranges (the
    /// chunks of one transfer) are accessed in parallel; an overlapping write is refused. An
    /// empty range touches no byte, so it conflicts with nothing (it is never `Busy`) and
    /// nothing conflicts with it; it still needs a live reservation.
    pub(crate) fn access(
        &self,
        res: &Reservation,
        offset_bytes: u64,
        len_bytes: u64,
        write: bool,
    ) -> Result<Access<'_, M>> {
        let (start, end) = (offset_bytes, offset_bytes.saturating_add(len_bytes));
        let mut entries = self.entries.lock();
        let e = match entries.get_mut(&res.key()) {
            Some(e) if e.res == *res => e,
            _ => return Err(self.invalid(res)),
        };
        let conflict = start < end
            && e.accesses
                .iter()
                .any(|&(_, s, x, w)| (w || write) && s < x && s < end && start < x);
        if conflict {
            return Err(TierError::Busy {
                tier: self.tier,
                offset_bytes: res.offset_bytes(),
            });
        }
        let id = self
            .next_access
            .fetch_add(1, crate::sync::atomic::Ordering::Relaxed);
        e.accesses.push((id, start, end, write));
        Ok(Access {
            reg: self,
            key: res.key(),
            id,
        })
    }

    /// Runs `f` on the live entry of `res` under the table lock (keep `f` short: no I/O).
    pub(crate) fn with_entry<R>(
        &self,
        res: &Reservation,
        f: impl FnOnce(&mut Entry<M>) -> R,
    ) -> Result<R> {
        let mut entries = self.entries.lock();
        match entries.get_mut(&res.key()) {
            Some(e) if e.res == *res => Ok(f(e)),
            _ => Err(self.invalid(res)),
        }
    }

    /// Runs `f` on every entry (under the lock; keep it short).
    pub(crate) fn for_each_mut(&self, mut f: impl FnMut(&mut Entry<M>)) {
        let mut entries = self.entries.lock();
        for e in entries.values_mut() {
            f(e);
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.lock().len()
    }
}

#[cfg(all(test, vlmem_loom))]
mod loom_models {
    use super::*;
    use crate::sync::Arc;
    use crate::sync::atomic::{AtomicU32, Ordering};
    use vlmem_core::Block;

    fn conflicting_pair(a: (u64, u64, bool), b: (u64, u64, bool)) {
        loom::model(move || {
            let reg = Arc::new(Registry::<()>::new(Tier::Host));
            let res =
                Reservation::new(Tier::Host, Block::from_parts(1, 0, 1, 0, 8192), 8192, false);
            reg.insert(res, "t", ()).unwrap();
            let inside = Arc::new(AtomicU32::new(0));
            let handles: Vec<_> = [a, b]
                .into_iter()
                .map(|(off, len, write)| {
                    let (reg, inside) = (reg.clone(), inside.clone());
                    crate::sync::thread::spawn(move || {
                        if let Ok(access) = reg.access(&res, off, len, write) {
                            // The two ranges conflict: nobody else may be inside.
                            assert_eq!(inside.fetch_add(1, Ordering::SeqCst), 0);
                            inside.fetch_sub(1, Ordering::SeqCst);
                            drop(access);
                        }
                    })
                })
                .collect();
            for h in handles {
                h.join().unwrap();
            }
            // Every access was released: the reservation can be removed.
            assert!(reg.remove(&res).is_ok());
        });
    }

    /// Overlapping writes never hold access at the same time.
    #[test]
    fn overlapping_writes_are_exclusive() {
        conflicting_pair((0, 4096, true), (2048, 4096, true));
    }

    /// A write and an overlapping read never hold access at the same time.
    #[test]
    fn a_write_excludes_overlapping_reads() {
        conflicting_pair((0, 8192, false), (4096, 4096, true));
    }
}
