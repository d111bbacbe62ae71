//! The vision-embedding cache: a repeated image skips the vision tower.
//!
//! Keys are a 128-bit hash of the image's bytes bound to a namespace (the model, processor
//! and dtype: [`VisionCache::new`] takes it as a string), so two models never share an entry
//! and a small change of the image changes the key (research note tiering.md §0.7: LMCache
//! shipped constant, never-hitting and 16-bit-truncated image keys). The embeddings are
//! manager tensors of kind [`TensorKind::VisionEmbedding`], so the manager places, demotes and
//! accounts them like any other tensor; this cache decides which ones are kept at all, with
//! S3-FIFO admission and eviction under its own byte budget.
//!
//! ## Threads
//! [`VisionCache::get_or_insert_with`] is single-flight: while one thread computes an image's
//! embedding, other threads asking for the same image wait for it and then share it (one
//! computation, one tensor). An embedding larger than the whole budget is never admitted; its
//! waiters then compute their own, as they do when the computation fails or panics (the
//! panic goes on in the thread that computed; the image is never left in flight).
//!
//! The in-flight mark records the computing thread. A computation that asks the cache for
//! its own image (a tower that consults the cache re-entrantly) would wait for itself: it
//! gets no wait instead. [`VisionCache::get`] returns `None` (the image is not cached yet),
//! and [`VisionCache::get_or_insert_with`] and [`VisionCache::get_or_try_insert_with`] return
//! a re-entrant-computation error at once (nothing computed, nothing counted). Other images
//! work as usual from inside a computation.
//!
//! ## Lifetime
//! An [`Embedding`] is a reference-counted share of the tensor. Evicting it from the cache
//! drops the cache's share only; the tensor is freed when the last share drops, so a caller
//! that holds one never sees it vanish. The budget bounds the bytes the cache holds; shares
//! held by callers after eviction are theirs.

use crate::manager::{MemoryManager, PinGuard, TensorHandle};
use crate::policy::S3Fifo;
use crate::{ManagerError, Result, TensorKind, Tier};
use std::collections::HashMap;
use vlmem_core::sync::atomic::{AtomicU64, Ordering};
use vlmem_core::sync::{Arc, Condvar, Mutex, wait_guard};

/// A 128-bit content key.
pub type ImageKey = u128;

const P0: u64 = 0xa076_1d64_78bd_642f;
const P1: u64 = 0xe703_7ed1_a0b4_28db;
const P2: u64 = 0x8ebc_6af0_9c88_c6e3;
const P3: u64 = 0x5899_65cc_7537_4cc3;
const P4: u64 = 0x1d8e_4e27_c47d_124f;

#[inline]
fn mum(a: u64, b: u64) -> u64 {
    let r = (a as u128).wrapping_mul(b as u128);
    (r as u64) ^ ((r >> 64) as u64)
}

#[inline]
fn le64(b: &[u8]) -> u64 {
    let mut x = [0u8; 8];
    x[..b.len()].copy_from_slice(b);
    u64::from_le_bytes(x)
}

/// A fast non-cryptographic 128-bit hash (two cross-mixed lanes of 64x64->128 folded
/// multiplies, wyhash-style, over 16-byte words, then a length-keyed finalisation). Stable
/// across platforms and runs. Not for adversarial inputs: it keys a cache, where a collision
/// at 128 bits is practically impossible for accidental data.
pub fn hash128(seed: u64, data: &[u8]) -> u128 {
    let mut a = seed ^ P0;
    let mut b = seed.rotate_left(32) ^ P1;
    let mut chunks = data.chunks_exact(16);
    for c in &mut chunks {
        let w0 = le64(&c[..8]);
        let w1 = le64(&c[8..]);
        let x = mum(w0 ^ a, w1 ^ P2);
        let y = mum(w1 ^ b, w0 ^ P3);
        a = x ^ b.rotate_left(29);
        b = y ^ a.rotate_left(17).wrapping_add(P4);
    }
    let rest = chunks.remainder();
    let (w0, w1) = if rest.len() > 8 {
        (le64(&rest[..8]), le64(&rest[8..]))
    } else {
        (le64(rest), 0)
    };
    let len = data.len() as u64;
    a = mum(w0 ^ a ^ len, w1 ^ P2 ^ (rest.len() as u64));
    b = mum(w1 ^ b ^ P1, w0 ^ P3 ^ len.rotate_left(32));
    let lo = mum(a ^ P4, b ^ P0);
    let hi = mum(b ^ P2, a.rotate_left(31) ^ P3 ^ lo);
    ((hi as u128) << 64) | lo as u128
}

struct Share {
    manager: MemoryManager,
    handle: TensorHandle,
    len_bytes: u64,
    key: ImageKey,
}

impl Drop for Share {
    fn drop(&mut self) {
        if let Err(e) = self.manager.deallocate(self.handle) {
            tracing::warn!(error = %e, "vision embedding not freed");
        }
    }
}

/// A share of a cached vision embedding (a manager tensor). Cheap to clone; the tensor is
/// freed when the last share drops.
#[derive(Clone)]
pub struct Embedding(Arc<Share>);

impl std::fmt::Debug for Embedding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Embedding")
            .field("key", &format_args!("{:032x}", self.0.key))
            .field("len_bytes", &self.0.len_bytes)
            .finish()
    }
}

impl Embedding {
    /// The tensor. Valid while this share lives; pin it through [`Embedding::pin`] so the
    /// pin cannot outlive the share.
    pub fn handle(&self) -> TensorHandle {
        self.0.handle
    }
    /// The embedding's size.
    pub fn len_bytes(&self) -> u64 {
        self.0.len_bytes
    }
    /// The content key of the image.
    pub fn key(&self) -> ImageKey {
        self.0.key
    }
    /// Pins the embedding on `tier` (see [`MemoryManager::pin`]). Drop the guard before the
    /// last share.
    pub fn pin(&self, tier: Tier) -> Result<PinGuard> {
        self.0.manager.pin(self.0.handle, tier)
    }
    /// Copies the whole embedding out.
    pub fn to_vec(&self) -> Result<Vec<u8>> {
        let mut v = vec![0u8; self.0.len_bytes as usize];
        self.0.manager.read(self.0.handle, 0, &mut v)?;
        Ok(v)
    }
}

enum Slot {
    Ready(Embedding),
    /// Being computed by this thread.
    Pending(std::thread::ThreadId),
}

/// The error a re-entrant computation gets: the thread computing `key` asked for it.
fn reentrant(key: ImageKey) -> ManagerError {
    ManagerError::Reentrant {
        what: format!("vision computation of image {key:032x}"),
    }
}

/// The in-flight mark of one image, owned by the thread computing it. Dropped without
/// [`InFlight::settled`] (the computation panicked), it withdraws the mark and wakes the
/// waiting threads, which then compute the image themselves: a panic never leaves an image
/// in flight for ever.
struct InFlight<'a> {
    cache: &'a VisionCache,
    key: ImageKey,
    settled: bool,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        let mut st = self.cache.state.lock();
        if matches!(st.slots.get(&self.key), Some(Slot::Pending(_))) {
            st.slots.remove(&self.key);
        }
        drop(st);
        self.cache.cond.notify_all();
    }
}

struct State {
    policy: S3Fifo<ImageKey>,
    slots: HashMap<ImageKey, Slot>,
}

/// Counters of a [`VisionCache`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct VisionCacheStats {
    /// Lookups served from the cache (waiting for another thread's computation included).
    pub hits: u64,
    /// Lookups that computed the embedding.
    pub misses: u64,
    /// Embeddings admitted.
    pub inserts: u64,
    /// Embeddings evicted.
    pub evictions: u64,
    /// Embeddings not admitted (larger than the budget).
    pub rejected: u64,
    /// Bytes the cache holds now.
    pub resident_bytes: u64,
    /// The most bytes it ever held (never above the budget).
    pub peak_resident_bytes: u64,
    /// Entries it holds now.
    pub entries: u64,
}

/// Vision embeddings keyed by image content, S3-FIFO under a byte budget. Thread-safe; share
/// it by reference or in an `Arc`.
pub struct VisionCache {
    manager: MemoryManager,
    seed: u64,
    budget_bytes: u64,
    state: Mutex<State>,
    cond: Condvar,
    hits: AtomicU64,
    misses: AtomicU64,
    inserts: AtomicU64,
    evictions: AtomicU64,
    rejected: AtomicU64,
    peak: AtomicU64,
    ids: AtomicU64,
}

impl std::fmt::Debug for VisionCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VisionCache")
            .field("budget_bytes", &self.budget_bytes)
            .field("stats", &self.stats())
            .finish()
    }
}

impl VisionCache {
    /// A cache of at most `budget_bytes` of embeddings in `manager`. `namespace` binds the
    /// keys to the model, processor and dtype (e.g. `"qwen3-vl-2b/bf16/min65536-max16777216"`).
    pub fn new(manager: MemoryManager, namespace: &str, budget_bytes: u64) -> Self {
        let ns = hash128(0, namespace.as_bytes());
        VisionCache {
            manager,
            seed: (ns as u64) ^ ((ns >> 64) as u64),
            budget_bytes,
            state: Mutex::new(State {
                policy: S3Fifo::new(budget_bytes),
                slots: HashMap::new(),
            }),
            cond: Condvar::default(),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            inserts: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            peak: AtomicU64::new(0),
            ids: AtomicU64::new(1 << 48),
        }
    }

    /// The budget.
    pub fn budget_bytes(&self) -> u64 {
        self.budget_bytes
    }

    /// The key of an image's bytes in this cache's namespace.
    pub fn key_of(&self, image_bytes: &[u8]) -> ImageKey {
        hash128(self.seed, image_bytes)
    }

    /// The cached embedding of this image, if any (counts a hit when found, nothing if not).
    /// Waits while another thread computes it; `None` at once when the calling thread is the
    /// one computing it (a re-entrant lookup).
    pub fn get(&self, image_bytes: &[u8]) -> Option<Embedding> {
        let key = self.key_of(image_bytes);
        let me = std::thread::current().id();
        let mut st = self.state.lock();
        loop {
            match st.slots.get(&key) {
                Some(Slot::Ready(e)) => {
                    let e = e.clone();
                    st.policy.touch(&key);
                    self.hits.fetch_add(1, Ordering::Relaxed);
                    return Some(e);
                }
                Some(Slot::Pending(by)) if *by == me => return None,
                Some(Slot::Pending(_)) => st = wait_guard(&self.cond, st),
                None => return None,
            }
        }
    }

    /// The embedding of `image_bytes`: from the cache, or computed by `compute` (the vision
    /// tower), stored as a manager tensor and offered to the cache. Returns the embedding and
    /// whether it was a hit. Should `compute` panic, the panic goes on in this caller and
    /// the image is not left in flight: threads waiting for it compute it themselves.
    pub fn get_or_insert_with(
        &self,
        image_bytes: &[u8],
        compute: impl FnOnce() -> Vec<u8>,
    ) -> Result<(Embedding, bool)> {
        self.get_or_try_insert_with(image_bytes, || Ok(compute()))
    }

    /// Like [`VisionCache::get_or_insert_with`] with a fallible computation; on an error
    /// nothing is cached and waiting threads try again themselves. A computation that
    /// panics is treated as an error (waiting threads go on, one of them computing the image
    /// again) and the panic goes on in this caller. Called from inside the computation of
    /// the same image (on the computing thread), it returns a re-entrant-computation error at
    /// once instead of waiting for itself.
    pub fn get_or_try_insert_with(
        &self,
        image_bytes: &[u8],
        compute: impl FnOnce() -> Result<Vec<u8>>,
    ) -> Result<(Embedding, bool)> {
        let key = self.key_of(image_bytes);
        let me = std::thread::current().id();
        {
            let mut st = self.state.lock();
            loop {
                match st.slots.get(&key) {
                    Some(Slot::Ready(e)) => {
                        let e = e.clone();
                        st.policy.touch(&key);
                        self.hits.fetch_add(1, Ordering::Relaxed);
                        return Ok((e, true));
                    }
                    Some(Slot::Pending(by)) if *by == me => return Err(reentrant(key)),
                    Some(Slot::Pending(_)) => st = wait_guard(&self.cond, st),
                    None => {
                        st.slots.insert(key, Slot::Pending(me));
                        self.misses.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                }
            }
        }
        // Unlocked: compute and store. Should either panic, the guard withdraws the mark.
        let mut in_flight = InFlight {
            cache: self,
            key,
            settled: false,
        };
        let made = compute().and_then(|bytes| self.store(key, &bytes));
        let mut evicted = Vec::new();
        let out = {
            let mut st = self.state.lock();
            in_flight.settled = true;
            let out = match made {
                Ok(e) => {
                    let adm = st.policy.insert(key, e.len_bytes());
                    for k in adm.evicted {
                        if let Some(Slot::Ready(old)) = st.slots.remove(&k) {
                            evicted.push(old);
                        }
                    }
                    if adm.admitted {
                        st.slots.insert(key, Slot::Ready(e.clone()));
                        self.inserts.fetch_add(1, Ordering::Relaxed);
                        self.peak
                            .fetch_max(st.policy.used_bytes(), Ordering::Relaxed);
                    } else {
                        st.slots.remove(&key);
                        self.rejected.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok((e, false))
                }
                Err(err) => {
                    st.slots.remove(&key);
                    Err(err)
                }
            };
            self.cond.notify_all();
            out
        };
        self.evictions
            .fetch_add(evicted.len() as u64, Ordering::Relaxed);
        // The cache's shares drop here, outside the lock (freeing tensors calls the manager).
        drop(evicted);
        out
    }

    fn store(&self, key: ImageKey, bytes: &[u8]) -> Result<Embedding> {
        if bytes.is_empty() {
            return Err(ManagerError::ZeroSize);
        }
        let id = self.ids.fetch_add(1, Ordering::Relaxed);
        let handle = self
            .manager
            .allocate(bytes.len() as u64, TensorKind::VisionEmbedding, id)?;
        let share = Share {
            manager: self.manager.clone(),
            handle,
            len_bytes: bytes.len() as u64,
            key,
        };
        self.manager.write(handle, 0, bytes)?;
        Ok(Embedding(Arc::new(share)))
    }

    /// Every cached embedding (for checks).
    pub fn entries(&self) -> Vec<Embedding> {
        let st = self.state.lock();
        st.slots
            .values()
            .filter_map(|s| match s {
                Slot::Ready(e) => Some(e.clone()),
                Slot::Pending(_) => None,
            })
            .collect()
    }

    /// Drops every entry (shares held elsewhere stay valid).
    pub fn clear(&self) {
        let dropped: Vec<Slot> = {
            let mut st = self.state.lock();
            st.policy = S3Fifo::new(self.budget_bytes);
            let keys: Vec<ImageKey> = st
                .slots
                .iter()
                .filter(|(_, s)| matches!(s, Slot::Ready(_)))
                .map(|(k, _)| *k)
                .collect();
            keys.into_iter()
                .filter_map(|k| st.slots.remove(&k))
                .collect()
        };
        drop(dropped);
    }

    /// The counters now.
    pub fn stats(&self) -> VisionCacheStats {
        let (resident, entries) = {
            let st = self.state.lock();
            (st.policy.used_bytes(), st.policy.len() as u64)
        };
        VisionCacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            inserts: self.inserts.load(Ordering::Relaxed),
            evictions: self.evictions.load(Ordering::Relaxed),
            rejected: self.rejected.load(Ordering::Relaxed),
            resident_bytes: resident,
            peak_resident_bytes: self.peak.load(Ordering::Relaxed),
            entries,
        }
    }
}
