//! A bounded staging area for streamed tensors: buffers that a read-ahead thread fills with
//! tensors the compute tier does not keep, and the compute thread takes, uses and gives
//! back. It keeps streaming apart from the kept set: a tensor read ahead never enters the
//! tier, so it never evicts a tensor that the plan keeps there (the tier's budget is the
//! kept set's, the area's capacity is its own).
//!
//! One producer fills one key at a time: [`StagingArea::begin_fill`] waits for room, then
//! [`StagingArea::finish_fill`] publishes the bytes. Consumers [`StagingArea::take`] a key:
//! they get its buffer (waiting while it is being filled) or `None` when it is not staged, and
//! the buffer comes back to the area when the [`Staged`] guard drops.
//!
//! Bytes are counted by buffer capacity (what is allocated). Invariants (under the one lock;
//! checked by [`StagingArea::check`] in the tests and models):
//! - `held_bytes` = the bytes of ready buffers + the buffer being filled + buffers lent out,
//!   and `held_bytes <= capacity_bytes`;
//! - `held_bytes + free_bytes <= capacity_bytes`: buffers kept for reuse never take the area
//!   over its capacity;
//! - a key is at most once ready or being filled; a consumer never sees a buffer before its
//!   fill finished.
//!
//! The lock is never held across the producer's read or the consumer's use of the bytes.
//! Lock order: the area's lock is a leaf (nothing is locked while holding it).

use std::collections::HashMap;
use std::hash::Hash;
use std::ops::Range;
use vlmem_core::sync::{Condvar, Mutex, wait_guard};

/// Counters of a [`StagingArea`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StagingStats {
    /// Buffers filled and published.
    pub filled: u64,
    /// Bytes filled and published.
    pub filled_bytes: u64,
    /// Takes that found their key ready (or being filled, then waited).
    pub hits: u64,
    /// Takes that had to wait for the fill to finish.
    pub waits: u64,
    /// Takes that found nothing staged.
    pub misses: u64,
    /// Ready buffers dropped unused (their reader had moved past them).
    pub dropped: u64,
}

#[derive(Debug)]
struct Ready {
    tag: u64,
    buf: Vec<u8>,
    /// The part of `buf` that holds the key's bytes.
    range: Range<usize>,
}

#[derive(Debug)]
struct State<K> {
    ready: HashMap<K, Ready>,
    filling: Option<K>,
    held_bytes: u64,
    free: Vec<Vec<u8>>,
    free_bytes: u64,
    closed: bool,
    stats: StagingStats,
}

/// The staging area; see the module documentation.
#[derive(Debug)]
pub struct StagingArea<K> {
    capacity_bytes: u64,
    state: Mutex<State<K>>,
    changed: Condvar,
}

/// A staged buffer lent to a consumer; it returns to the area when dropped.
#[derive(Debug)]
pub struct Staged<'a, K: Eq + Hash + Copy> {
    area: &'a StagingArea<K>,
    buf: Option<Vec<u8>>,
    range: Range<usize>,
}

impl<K: Eq + Hash + Copy> std::ops::Deref for Staged<'_, K> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.buf
            .as_deref()
            .and_then(|b| b.get(self.range.clone()))
            .unwrap_or(&[])
    }
}

impl<K: Eq + Hash + Copy> Drop for Staged<'_, K> {
    fn drop(&mut self) {
        if let Some(buf) = self.buf.take() {
            self.area.give_back(buf);
        }
    }
}

impl<K: Eq + Hash + Copy> StagingArea<K> {
    /// An area of at most `capacity_bytes` of buffers.
    pub fn new(capacity_bytes: u64) -> Self {
        StagingArea {
            capacity_bytes,
            state: Mutex::new(State {
                ready: HashMap::new(),
                filling: None,
                held_bytes: 0,
                free: Vec::new(),
                free_bytes: 0,
                closed: false,
                stats: StagingStats::default(),
            }),
            changed: Condvar::new(),
        }
    }

    /// The capacity in bytes.
    pub fn capacity_bytes(&self) -> u64 {
        self.capacity_bytes
    }

    /// Producer: claims room for a buffer of at least `len_bytes` (a reused one may be
    /// longer and holds old bytes) to fill `key`, waiting while the area is full. Ready buffers whose tag
    /// `stale(tag)` says no consumer will take are dropped to make room. Returns `None`
    /// without waiting when `key` is already staged, `len_bytes` exceeds the capacity or the
    /// area is closed, and as soon as `wanted()` turns false (both predicates are called
    /// under the area's lock, so a consumer that took `None` before cannot see the key
    /// staged later: it must change what `wanted` reads before calling [`Self::take`], then
    /// [`Self::wake`]). Every `Some` must be followed by [`Self::finish_fill`].
    pub fn begin_fill(
        &self,
        key: K,
        len_bytes: usize,
        wanted: impl Fn() -> bool,
        stale: impl Fn(u64) -> bool,
    ) -> Option<Vec<u8>> {
        let len = len_bytes as u64;
        if len > self.capacity_bytes {
            return None;
        }
        let mut st = self.state.lock();
        loop {
            if st.closed || !wanted() || st.ready.contains_key(&key) || st.filling.is_some() {
                return None;
            }
            // Drop what no one will take.
            let stale_keys: Vec<K> = st
                .ready
                .iter()
                .filter(|(_, r)| stale(r.tag))
                .map(|(k, _)| *k)
                .collect();
            for k in stale_keys {
                if let Some(r) = st.ready.remove(&k) {
                    st.held_bytes -= r.buf.capacity() as u64;
                    st.stats.dropped += 1;
                    Self::keep_free(&mut st, r.buf, self.capacity_bytes);
                }
            }
            if st.held_bytes + len <= self.capacity_bytes {
                break;
            }
            st = wait_guard(&self.changed, st);
        }
        st.filling = Some(key);
        // The smallest free buffer that holds `len_bytes` and fits beside what is held (its
        // pages are mapped already: no page faults, no zeroing); else free buffers go,
        // smallest first, until a new one fits.
        let capacity = self.capacity_bytes;
        let held = st.held_bytes;
        let reuse = st
            .free
            .iter()
            .enumerate()
            .filter(|(_, b)| b.capacity() >= len_bytes && held + b.capacity() as u64 <= capacity)
            .min_by_key(|(_, b)| b.capacity())
            .map(|(i, _)| i);
        let mut buf = match reuse {
            Some(i) => {
                let b = st.free.swap_remove(i);
                st.free_bytes -= b.capacity() as u64;
                b
            }
            None => {
                st.free
                    .sort_unstable_by_key(|b| std::cmp::Reverse(b.capacity()));
                while st.held_bytes + st.free_bytes + len > capacity {
                    match st.free.pop() {
                        Some(b) => st.free_bytes -= b.capacity() as u64,
                        None => break,
                    }
                }
                // Reserves address space only; pages are touched below, outside the lock.
                Vec::with_capacity(len_bytes)
            }
        };
        st.held_bytes += buf.capacity() as u64;
        drop(st);
        // A new buffer is zeroed once (its pages faulted in here, outside the lock); a reused
        // one keeps its length (its capacity) and its old bytes: no second pass over it.
        if buf.len() < len_bytes {
            buf.resize(len_bytes, 0);
        }
        Some(buf)
    }

    /// Producer: publishes `range` of `buf` (the buffer [`Self::begin_fill`] gave) as
    /// `key`'s bytes, tagged `tag` (e.g. the layer it belongs to, for `stale`), when `ok` (and
    /// the range lies in the buffer), or gives the room back (a read that failed). Wakes
    /// consumers waiting for `key`.
    pub fn finish_fill(&self, key: K, tag: u64, buf: Vec<u8>, range: Range<usize>, ok: bool) {
        let mut st = self.state.lock();
        debug_assert!(st.filling == Some(key), "finish_fill without begin_fill");
        st.filling = None;
        if ok && !st.closed && range.start <= range.end && range.end <= buf.len() {
            st.stats.filled += 1;
            st.stats.filled_bytes += range.len() as u64;
            st.ready.insert(key, Ready { tag, buf, range });
        } else {
            st.held_bytes -= buf.capacity() as u64;
            Self::keep_free(&mut st, buf, self.capacity_bytes);
        }
        drop(st);
        self.changed.notify_all();
    }

    /// Consumer: `key`'s staged bytes, waiting while they are being filled; `None` when the
    /// key is neither ready nor being filled.
    pub fn take(&self, key: K) -> Option<Staged<'_, K>> {
        let mut st = self.state.lock();
        let mut waited = false;
        loop {
            if let Some(r) = st.ready.remove(&key) {
                st.stats.hits += 1;
                if waited {
                    st.stats.waits += 1;
                }
                return Some(Staged {
                    area: self,
                    buf: Some(r.buf),
                    range: r.range,
                });
            }
            if st.filling != Some(key) {
                st.stats.misses += 1;
                return None;
            }
            waited = true;
            st = wait_guard(&self.changed, st);
        }
    }

    /// Wakes a producer waiting for room, to re-check its predicates (the reader moved on).
    pub fn wake(&self) {
        // Taking the lock orders this wake after any predicate change the caller made.
        drop(self.state.lock());
        self.changed.notify_all();
    }

    /// Ends production: a waiting or later `begin_fill` returns `None`, ready buffers are
    /// dropped. Buffers lent out still come back.
    pub fn close(&self) {
        let mut st = self.state.lock();
        st.closed = true;
        let ready: Vec<Ready> = st.ready.drain().map(|(_, r)| r).collect();
        for r in ready {
            st.held_bytes -= r.buf.capacity() as u64;
        }
        st.free.clear();
        st.free_bytes = 0;
        drop(st);
        self.changed.notify_all();
    }

    /// The counters.
    pub fn stats(&self) -> StagingStats {
        self.state.lock().stats
    }

    /// Bytes held now (ready, being filled, lent out).
    pub fn held_bytes(&self) -> u64 {
        self.state.lock().held_bytes
    }

    /// Checks the invariants of the module documentation; `Err` names the first broken one.
    pub fn check(&self) -> std::result::Result<(), String> {
        let st = self.state.lock();
        if st.held_bytes > self.capacity_bytes {
            return Err(format!(
                "held {} > capacity {}",
                st.held_bytes, self.capacity_bytes
            ));
        }
        if st.held_bytes + st.free_bytes > self.capacity_bytes {
            return Err(format!(
                "held {} + free {} > capacity {}",
                st.held_bytes, st.free_bytes, self.capacity_bytes
            ));
        }
        let ready: u64 = st.ready.values().map(|r| r.buf.capacity() as u64).sum();
        if ready > st.held_bytes {
            return Err(format!("ready {ready} > held {}", st.held_bytes));
        }
        let free: u64 = st.free.iter().map(|b| b.capacity() as u64).sum();
        if free != st.free_bytes {
            return Err(format!("free list {free} != free_bytes {}", st.free_bytes));
        }
        if let Some(k) = st.filling
            && st.ready.contains_key(&k)
        {
            return Err("a key both ready and being filled".into());
        }
        Ok(())
    }

    fn give_back(&self, buf: Vec<u8>) {
        let mut st = self.state.lock();
        st.held_bytes -= buf.capacity() as u64;
        Self::keep_free(&mut st, buf, self.capacity_bytes);
        drop(st);
        self.changed.notify_all();
    }

    /// Keeps `buf` for reuse when that stays within the capacity (else frees it).
    fn keep_free(st: &mut State<K>, buf: Vec<u8>, capacity_bytes: u64) {
        let len = buf.capacity() as u64;
        if !st.closed && st.held_bytes + st.free_bytes + len <= capacity_bytes {
            st.free_bytes += len;
            st.free.push(buf);
        }
    }
}

#[cfg(all(test, not(any(vlmem_loom, vlmem_shuttle))))]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    #[test]
    fn fill_take_and_reuse() {
        let a: StagingArea<u32> = StagingArea::new(100);
        let mut b = a.begin_fill(1, 40, || true, |_| false).unwrap();
        assert_eq!(b.len(), 40);
        // One fill at a time, and a key is staged once.
        assert!(a.begin_fill(2, 10, || true, |_| false).is_none());
        b.fill(7);
        a.finish_fill(1, 0, b, 0..40, true);
        assert!(a.begin_fill(1, 40, || true, |_| false).is_none());
        assert_eq!(a.held_bytes(), 40);
        {
            let s = a.take(1).unwrap();
            assert_eq!(&s[..], &[7u8; 40][..]);
            assert!(a.take(1).is_none(), "taken once");
        }
        assert_eq!(a.held_bytes(), 0);
        a.check().unwrap();
        // The buffer is reused for the same size.
        let b = a.begin_fill(3, 40, || true, |_| false).unwrap();
        assert_eq!(b.len(), 40);
        a.finish_fill(3, 0, b, 0..40, false);
        assert_eq!(a.held_bytes(), 0);
        assert!(a.take(3).is_none(), "a failed fill publishes nothing");
        // A range publishes part of the buffer; a range outside it publishes nothing.
        let mut b = a.begin_fill(5, 48, || true, |_| false).unwrap();
        b[8..40].fill(9);
        a.finish_fill(5, 0, b, 8..40, true);
        assert_eq!(&a.take(5).unwrap()[..], &[9u8; 32][..]);
        let b = a.begin_fill(6, 48, || true, |_| false).unwrap();
        a.finish_fill(6, 0, b, 8..49, true);
        assert!(a.take(6).is_none());
        assert_eq!(a.held_bytes(), 0);
        // Larger than the area: never staged.
        assert!(a.begin_fill(4, 101, || true, |_| false).is_none());
        let s = a.stats();
        assert_eq!((s.filled, s.hits, s.misses), (2, 2, 3));
        a.check().unwrap();
    }

    #[test]
    fn stale_buffers_make_room_and_unwanted_fills_stop() {
        let a: StagingArea<u32> = StagingArea::new(100);
        for (k, tag) in [(1u32, 1u64), (2, 2)] {
            let b = a.begin_fill(k, 50, || true, |_| false).unwrap();
            a.finish_fill(k, tag, b, 0..50, true);
        }
        assert_eq!(a.held_bytes(), 100);
        // Full; tag 1 is stale: its buffer goes, the fill proceeds.
        let b = a.begin_fill(3, 50, || true, |t| t == 1).unwrap();
        a.finish_fill(3, 3, b, 0..50, true);
        assert!(a.take(1).is_none());
        assert_eq!(a.stats().dropped, 1);
        // Full and nothing stale, but no longer wanted: returns at once.
        assert!(a.begin_fill(4, 50, || false, |_| false).is_none());
        a.check().unwrap();
        a.close();
        assert_eq!(a.held_bytes(), 0);
        assert!(a.begin_fill(5, 10, || true, |_| false).is_none());
    }

    /// A producer streams 2,000 keys through an area that holds three buffers while a
    /// consumer takes them in order, sometimes too early (a miss it serves itself): every
    /// taken buffer carries its key's bytes, the ledger holds after every step, and nothing
    /// is left held at the end.
    #[test]
    fn producer_and_consumer_stress_keeps_the_ledger() {
        const KEYS: u64 = 2000;
        let a = Arc::new(StagingArea::<u64>::new(3 * 64));
        let cursor = Arc::new(AtomicU64::new(0));
        let producer = {
            let (a, cursor) = (a.clone(), cursor.clone());
            std::thread::spawn(move || {
                for k in 0..KEYS {
                    let Some(mut b) = a.begin_fill(
                        k,
                        64,
                        || cursor.load(Ordering::Acquire) <= k,
                        |t| t < cursor.load(Ordering::Acquire),
                    ) else {
                        continue;
                    };
                    b.fill(k as u8);
                    a.finish_fill(k, k, b, 0..64, true);
                }
            })
        };
        let mut hits = 0;
        for k in 0..KEYS {
            cursor.store(k, Ordering::Release);
            a.wake();
            if let Some(s) = a.take(k) {
                assert!(s.iter().all(|&v| v == k as u8), "key {k} saw foreign bytes");
                hits += 1;
            }
            a.check().unwrap();
        }
        cursor.store(KEYS, Ordering::Release);
        a.wake();
        producer.join().unwrap();
        a.close();
        assert_eq!(a.held_bytes(), 0);
        a.check().unwrap();
        let s = a.stats();
        assert_eq!(s.hits, hits);
        assert_eq!(s.hits + s.misses, KEYS);
    }
}

#[cfg(all(test, vlmem_loom))]
mod loom_models {
    //! Run: `RUSTFLAGS="--cfg vlmem_loom" cargo test -p vlmem --release --lib loom`.
    use super::*;
    use vlmem_core::sync::Arc;
    use vlmem_core::sync::atomic::{AtomicU64, Ordering};

    /// A producer fills keys 0 and 1 into an area with room for one buffer while the consumer
    /// takes 0 then 1: no deadlock in any interleaving, a taken buffer always carries its
    /// key's bytes, and the ledger is empty at the end.
    #[test]
    fn loom_staging_fill_versus_take() {
        loom::model(|| {
            let a = Arc::new(StagingArea::<u64>::new(4));
            let cursor = Arc::new(AtomicU64::new(0));
            let p = {
                let (a, cursor) = (a.clone(), cursor.clone());
                loom::thread::spawn(move || {
                    for k in 0..2u64 {
                        if let Some(mut b) = a.begin_fill(
                            k,
                            4,
                            || cursor.load(Ordering::Acquire) <= k,
                            |t| t < cursor.load(Ordering::Acquire),
                        ) {
                            b.fill(k as u8 + 1);
                            a.finish_fill(k, k, b, 0..4, true);
                        }
                    }
                })
            };
            for k in 0..2u64 {
                cursor.store(k, Ordering::Release);
                a.wake();
                if let Some(s) = a.take(k) {
                    assert!(s.iter().all(|&v| v == k as u8 + 1));
                }
                a.check().unwrap();
            }
            cursor.store(2, Ordering::Release);
            a.wake();
            p.join().unwrap();
            a.close();
            assert_eq!(a.held_bytes(), 0);
            a.check().unwrap();
        });
    }
}
