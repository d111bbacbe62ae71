//! The wait budget of one public call.

use super::{ShardState, TensorHandle};
use crate::error::ManagerError;
use std::time::{Duration, Instant};
use vlmem_core::sync::{Condvar, MutexGuard, wait_guard_until};

/// Pauses for moving tensors one call may make under loom and shuttle, whose clocks stand
/// still (real builds bound the call's waits by time).
#[cfg(any(vlmem_loom, vlmem_shuttle))]
const MODEL_PAUSES_PER_CALL: u32 = 20;

/// What one public call may still wait for other threads: one budget shared by every wait
/// and reservation the call nests (`ManagerConfig::max_call_wait`), so a pin that demotes
/// that writes back that demotes waits no longer than a plain pin. Passed down by
/// reference: one call, one thread.
pub(crate) struct Waits {
    started: Instant,
    until: Instant,
    /// Tensors this call holds busy (its own moves and writes): never waited for as "in
    /// flight" by its own nested reservations.
    pub(super) own: std::cell::RefCell<Vec<TensorHandle>>,
    #[cfg(any(vlmem_loom, vlmem_shuttle))]
    pauses_left: std::cell::Cell<u32>,
}

impl Waits {
    pub(super) fn new(max: Duration) -> Self {
        let started = Instant::now();
        Waits {
            started,
            own: std::cell::RefCell::new(Vec::new()),
            until: started
                .checked_add(max)
                .unwrap_or(started + Duration::from_secs(1 << 30)),
            #[cfg(any(vlmem_loom, vlmem_shuttle))]
            pauses_left: std::cell::Cell::new(MODEL_PAUSES_PER_CALL),
        }
    }

    /// Whether this call holds `h` busy itself.
    pub(super) fn is_own(&self, h: TensorHandle) -> bool {
        self.own.borrow().contains(&h)
    }

    /// `h` is no longer held busy by this call.
    pub(super) fn disown(&self, h: TensorHandle) {
        let mut own = self.own.borrow_mut();
        if let Some(i) = own.iter().rposition(|&x| x == h) {
            own.swap_remove(i);
        }
    }

    /// The error of a call that gave up waiting for tensor `id`.
    pub(super) fn busy(&self, id: u64) -> ManagerError {
        ManagerError::Busy {
            id,
            waited_ms: self.started.elapsed().as_millis() as u64,
        }
    }

    /// Whether the call has no waiting left.
    pub(super) fn spent(&self) -> bool {
        #[cfg(not(any(vlmem_loom, vlmem_shuttle)))]
        return Instant::now() >= self.until;
        #[cfg(any(vlmem_loom, vlmem_shuttle))]
        return self.pauses_left.get() == 0;
    }

    /// Waits on a shard's condition variable for another thread's move, write or lend;
    /// `Err` (with the guard) when the call's waiting is spent.
    pub(super) fn wait<'a>(
        &self,
        cond: &Condvar,
        st: MutexGuard<'a, ShardState>,
    ) -> std::result::Result<MutexGuard<'a, ShardState>, MutexGuard<'a, ShardState>> {
        if self.spent() {
            return Err(st);
        }
        match wait_guard_until(cond, st, self.until) {
            (st, false) => Ok(st),
            (st, true) => Err(st),
        }
    }

    /// Lets the threads that move tensors run a little (no lock is held by the caller);
    /// false, without pausing, when the call's waiting is spent.
    pub(super) fn pause(&self) -> bool {
        if self.spent() {
            return false;
        }
        vlmem_core::sync::thread::yield_now();
        #[cfg(not(any(vlmem_loom, vlmem_shuttle)))]
        std::thread::sleep(Duration::from_micros(500));
        #[cfg(any(vlmem_loom, vlmem_shuttle))]
        self.pauses_left.set(self.pauses_left.get() - 1);
        true
    }
}
