//! The scheduler's queue of waiting requests: bounded, closable, and the one place its worker
//! sleeps.
//!
//! Callers push; the worker pops, drops cancelled entries, and sleeps in
//! [`RequestQueue::wait_for_work`] when it has nothing to run. [`RequestQueue::cancel_all`]
//! raises a flag the worker takes at its next step. Invariants (the loom model below checks
//! them in every interleaving): an entry pushed is handed to the worker exactly once (popped,
//! taken as cancelled, or drained); the queue never holds more than its bound; a push after
//! [`RequestQueue::close`] is refused; and the worker never sleeps while an entry waits, an
//! abort is raised, or the queue is closed and empty (it then returns false and ends): every
//! change it waits for is made under the lock and notified after.
//!
//! Lock: one mutex, a leaf, held only to push, pop, count or set a flag, never across model
//! work or a caller's callback.

use std::collections::VecDeque;
use vlmem_core::sync::atomic::{AtomicBool, Ordering};
use vlmem_core::sync::{Condvar, Mutex, wait_guard};

/// Why [`RequestQueue::push`] refused an entry (the entry comes back).
#[derive(Debug)]
pub(super) enum Refused<T> {
    /// The queue holds its bound already.
    Full(T, usize),
    /// The queue was closed.
    Closed(T),
}

struct Inner<T> {
    waiting: VecDeque<T>,
    accepting: bool,
}

/// A bounded queue of waiting entries with a worker that sleeps on it.
pub(super) struct RequestQueue<T> {
    inner: Mutex<Inner<T>>,
    wake: Condvar,
    /// Raised by [`RequestQueue::cancel_all`], taken by the worker.
    abort: AtomicBool,
    bound: usize,
}

impl<T> RequestQueue<T> {
    /// An open queue of at most `bound` entries.
    pub(super) fn new(bound: usize) -> Self {
        RequestQueue {
            inner: Mutex::new(Inner {
                waiting: VecDeque::new(),
                accepting: true,
            }),
            wake: Condvar::new(),
            abort: AtomicBool::new(false),
            bound,
        }
    }

    /// Queues `entry` last, or gives it back when the queue is full or closed.
    pub(super) fn push(&self, entry: T) -> Result<(), Refused<T>> {
        let mut q = self.inner.lock();
        if !q.accepting {
            return Err(Refused::Closed(entry));
        }
        if q.waiting.len() >= self.bound {
            let n = q.waiting.len();
            return Err(Refused::Full(entry, n));
        }
        q.waiting.push_back(entry);
        drop(q);
        self.wake.notify_one();
        Ok(())
    }

    /// Entries waiting now.
    pub(super) fn len(&self) -> usize {
        self.inner.lock().waiting.len()
    }

    /// Refuses pushes from now on; the worker ends once the queue is empty.
    pub(super) fn close(&self) {
        self.inner.lock().accepting = false;
        self.wake.notify_all();
    }

    /// Raises the abort flag for the worker's next step.
    pub(super) fn cancel_all(&self) {
        // Raised under the lock, which the worker holds from its last look at the flag to
        // its wait: the wake-up cannot fall between the two.
        let q = self.inner.lock();
        self.abort.store(true, Ordering::Release);
        drop(q);
        self.wake.notify_all();
    }

    /// Takes the abort flag (the worker, at the start of a step).
    pub(super) fn take_abort(&self) -> bool {
        self.abort.swap(false, Ordering::AcqRel)
    }

    /// `f` of the first entry, if any.
    pub(super) fn peek<R>(&self, f: impl FnOnce(&T) -> R) -> Option<R> {
        self.inner.lock().waiting.front().map(f)
    }

    /// The first entry, if `admit` says yes to it.
    pub(super) fn pop_if(&self, admit: impl FnOnce(&T) -> bool) -> Option<T> {
        let mut q = self.inner.lock();
        match q.waiting.front() {
            Some(f) if admit(f) => q.waiting.pop_front(),
            _ => None,
        }
    }

    /// Takes out the entries `gone` says yes to, keeping the others in order (no rebuilding
    /// when there are none, the usual case).
    pub(super) fn take_where(&self, gone: impl Fn(&T) -> bool) -> VecDeque<T> {
        let mut q = self.inner.lock();
        if !q.waiting.iter().any(&gone) {
            return VecDeque::new();
        }
        let (out, kept) = std::mem::take(&mut q.waiting).into_iter().partition(gone);
        q.waiting = kept;
        out
    }

    /// Takes out every entry.
    pub(super) fn take_all(&self) -> VecDeque<T> {
        std::mem::take(&mut self.inner.lock().waiting)
    }

    /// The worker, with nothing to run: sleeps until an entry waits, an abort is raised or
    /// the queue is closed. Returns false when the queue is closed and empty (the worker
    /// ends), true otherwise (it may also return true spuriously: the worker looks again).
    pub(super) fn wait_for_work(&self) -> bool {
        let q = self.inner.lock();
        if !q.waiting.is_empty() || self.abort.load(Ordering::Acquire) {
            return true;
        }
        if !q.accepting {
            return false;
        }
        drop(wait_guard(&self.wake, q));
        true
    }
}

#[cfg(all(test, vlmem_loom))]
mod loom_models {
    //! Run: `RUSTFLAGS="--cfg vlmem_loom" cargo test -p vlmem-runner --release --lib loom`.
    use super::*;
    use vlmem_core::sync::Arc;
    use vlmem_core::sync::atomic::AtomicUsize;
    use vlmem_core::sync::thread;

    /// The worker's loop, reduced to the queue: each step takes the abort (draining every
    /// entry), drops the cancelled entries (odd ones stand for cancelled), pops one, and
    /// sleeps when there is nothing. Counts each entry it handles; returns when closed.
    fn worker(q: &RequestQueue<usize>, handled: &[AtomicUsize]) {
        loop {
            if q.take_abort() {
                for e in q.take_all() {
                    handled[e].fetch_add(1, Ordering::Relaxed);
                }
            }
            for e in q.take_where(|e| e % 2 == 1) {
                handled[e].fetch_add(1, Ordering::Relaxed);
            }
            if let Some(e) = q.pop_if(|_| true) {
                handled[e].fetch_add(1, Ordering::Relaxed);
                continue;
            }
            if !q.wait_for_work() {
                return;
            }
        }
    }

    /// Two callers push (one into a full queue), one cancels all, then the queue closes:
    /// in every interleaving the worker ends, every accepted entry is handled exactly once,
    /// refused ones never, and the bound holds.
    ///
    /// The first caller waits for its entry to be handled before the queue may close: a
    /// push that did not wake a sleeping worker would leave it waiting forever (loom fails
    /// the model then).
    #[test]
    fn loom_every_accepted_entry_is_handled_once_and_the_worker_ends() {
        loom::model(|| {
            let q = Arc::new(RequestQueue::new(2));
            let handled: Arc<Vec<AtomicUsize>> =
                Arc::new((0..4).map(|_| AtomicUsize::new(0)).collect());
            let accepted: Arc<Vec<AtomicUsize>> =
                Arc::new((0..4).map(|_| AtomicUsize::new(0)).collect());
            let w = {
                let (q, handled) = (q.clone(), handled.clone());
                thread::spawn(move || worker(&q, &handled))
            };
            let pushers: Vec<_> = [[0usize, 1], [2, 3]]
                .into_iter()
                .map(|entries| {
                    let (q, accepted) = (q.clone(), accepted.clone());
                    let handled = handled.clone();
                    thread::spawn(move || {
                        for e in entries {
                            match q.push(e) {
                                Ok(()) => {
                                    accepted[e].fetch_add(1, Ordering::Relaxed);
                                }
                                Err(Refused::Full(_, n)) => assert_eq!(n, 2),
                                Err(Refused::Closed(_)) => unreachable!("closed after the joins"),
                            }
                            assert!(q.len() <= 2);
                        }
                        if entries[0] == 0 && accepted[0].load(Ordering::Relaxed) == 1 {
                            while handled[0].load(Ordering::Relaxed) == 0 {
                                thread::yield_now();
                            }
                        }
                    })
                })
                .collect();
            q.cancel_all();
            for p in pushers {
                p.join().unwrap();
            }
            q.close();
            assert!(matches!(q.push(9), Err(Refused::Closed(9))));
            w.join().unwrap();
            for e in 0..4 {
                assert_eq!(
                    handled[e].load(Ordering::Relaxed),
                    accepted[e].load(Ordering::Relaxed),
                    "entry {e}"
                );
            }
            assert_eq!(q.len(), 0);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_closable_and_ordered() {
        let q = RequestQueue::new(2);
        q.push(1).unwrap();
        q.push(2).unwrap();
        assert!(matches!(q.push(3), Err(Refused::Full(3, 2))));
        assert_eq!(q.peek(|e| *e), Some(1));
        assert_eq!(q.pop_if(|e| *e == 2), None, "only the first is looked at");
        assert_eq!(q.pop_if(|_| true), Some(1));
        q.push(4).unwrap();
        assert_eq!(q.take_where(|e| *e == 4), VecDeque::from([4]));
        assert_eq!(q.take_where(|e| *e == 4), VecDeque::new());
        assert!(!q.take_abort());
        q.cancel_all();
        assert!(q.take_abort() && !q.take_abort());
        assert!(q.wait_for_work(), "an entry waits");
        assert_eq!(q.take_all(), VecDeque::from([2]));
        q.close();
        assert!(matches!(q.push(5), Err(Refused::Closed(5))));
        assert!(!q.wait_for_work(), "closed and empty");
    }
}
