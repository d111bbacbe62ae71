//! Prefetch: hints served by workers, and prefetches the caller waits for.

use super::waits::Waits;
use super::{Inner, MemoryManager, PREFETCH_WORKERS, TensorHandle};
use crate::error::Result;
use std::time::Instant;
use vlmem_core::Tier;
use vlmem_core::sync::atomic::Ordering;
use vlmem_tier::Priority;

#[derive(Debug, Default)]
pub(super) struct PrefetchQueue {
    /// (tensor, tier, clock tick when hinted).
    jobs: std::collections::VecDeque<(TensorHandle, Tier, u64)>,
    workers: usize,
}

impl MemoryManager {
    /// A hint: start bringing the tensor to `tier` soon, on a prefetch worker (the caller
    /// never waits). Hints queue in order for at most `PREFETCH_WORKERS` workers, which
    /// start on demand and stop when the queue stays empty; at most
    /// `max_prefetches_in_flight` hints are queued or running, further ones are dropped. A
    /// hint whose tensor was used after the hint was given, or is already on the tier, is
    /// skipped (a late hint must not load again what the caller already loaded and may have
    /// let go). Errors are counted, not returned: the tensor stays where it was.
    pub fn prefetch(&self, handle: TensorHandle, tier: Tier) {
        let inner = &self.inner;
        let admitted = inner
            .prefetches_in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < inner.max_prefetches_in_flight).then_some(n + 1)
            })
            .is_ok();
        if !admitted {
            inner
                .counters
                .prefetches_dropped
                .fetch_add(1, Ordering::Relaxed);
            return;
        }
        inner.counters.prefetches.fetch_add(1, Ordering::Relaxed);
        let tick = inner.tick();
        let mut q = inner.prefetch_queue.lock();
        q.jobs.push_back((handle, tier, tick));
        if q.workers < PREFETCH_WORKERS {
            q.workers += 1;
            drop(q);
            let inner = inner.clone();
            vlmem_core::sync::thread::spawn(move || inner.prefetch_worker());
        } else {
            drop(q);
            inner.prefetch_ready.notify_one();
        }
    }

    /// A prefetch its caller waits for: brings the tensor to `tier` on the calling thread,
    /// as a prefetch worker would (the prefetch priority; nothing to do when it is there
    /// already), waiting for other threads (a move of it, room being made) until `deadline`
    /// at most, and no longer than a call may (`ManagerConfig::max_call_wait`). Returns
    /// whether the tensor is on `tier` when the call returns: false when the bring failed
    /// (no room, a foreign or freed handle) or the waiting ran out. Counted as a prefetch,
    /// and as a failed one when it returns false. For a thread that reads ahead in order,
    /// one tensor at a time: it learns when each landed without polling, and nothing of the
    /// prefetch goes on after the call.
    pub fn prefetch_wait(&self, handle: TensorHandle, tier: Tier, deadline: Instant) -> bool {
        let inner = &self.inner;
        inner.counters.prefetches.fetch_add(1, Ordering::Relaxed);
        let left = deadline.saturating_duration_since(Instant::now());
        let waits = Waits::new(left.min(inner.max_call_wait));
        let landed = match inner.prefetch_is_stale(handle, tier, inner.tick()) {
            Ok(false) => inner
                .bring(handle, tier, Priority::Prefetch, false, &waits)
                .is_ok(),
            Ok(true) | Err(_) => self
                .residency(handle)
                .is_ok_and(|(tiers, _)| tiers.contains(&tier)),
        };
        if !landed {
            inner
                .counters
                .prefetch_failures
                .fetch_add(1, Ordering::Relaxed);
        }
        landed
    }
}

impl Inner {
    /// A prefetch worker: takes hints in order until the queue stays empty, then stops (a
    /// worker holds the manager alive, so it must not outlive the queue's work).
    fn prefetch_worker(&self) {
        loop {
            let job = {
                let mut q = self.prefetch_queue.lock();
                if q.jobs.is_empty() {
                    // Hints come in bursts (a layer's tensors): linger briefly for the next.
                    #[cfg(not(any(vlmem_loom, vlmem_shuttle)))]
                    self.prefetch_ready
                        .wait_for(&mut q, std::time::Duration::from_millis(2));
                }
                match q.jobs.pop_front() {
                    Some(job) => job,
                    None => {
                        q.workers -= 1;
                        return;
                    }
                }
            };
            let (h, tier, hinted_at) = job;
            let failed = match self.prefetch_is_stale(h, tier, hinted_at) {
                Ok(true) => false,
                Ok(false) => self
                    .bring(h, tier, Priority::Prefetch, false, &self.waits())
                    .is_err(),
                // A foreign, stale or freed handle: the hint fails (and changes nothing).
                Err(_) => true,
            };
            if failed {
                self.counters
                    .prefetch_failures
                    .fetch_add(1, Ordering::Relaxed);
            }
            self.prefetches_in_flight.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Whether a hint has nothing left to do: the tensor is gone, already on the tier, or
    /// was used after the hint (its demand pin brought it, and may have let it go since).
    fn prefetch_is_stale(&self, h: TensorHandle, tier: Tier, hinted_at: u64) -> Result<bool> {
        let shard = self.shard_of(h)?;
        let mut st = shard.state.lock();
        let e = self.entry(&mut st, h)?;
        Ok(e.copies[tier.index()].is_some() || e.last_use > hinted_at)
    }
}
