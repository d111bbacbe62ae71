//! The one switch between real and model-checked synchronisation.
//!
//! All vlmem code takes its locks, atomics, `Arc` and threads from here, never from
//! `std::sync` or `parking_lot` directly. Normally these are parking_lot 0.12 locks (eventually
//! fair: a waiting thread cannot starve, see docs/ARCHITECTURE.md) and std atomics. Under
//! `RUSTFLAGS="--cfg vlmem_loom"` they are loom's, so loom models explore every interleaving
//! of the real code; under `--cfg vlmem_shuttle` they are shuttle's, so randomized and PCT
//! schedules drive whole harnesses (the manager with its engine threads). The wrappers keep
//! parking_lot's shape (`lock()` returns the guard), so call sites compile unchanged.

#[cfg(not(any(vlmem_loom, vlmem_shuttle)))]
mod imp {
    pub use parking_lot::{Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
    pub use std::sync::Arc;
    /// Atomic integer types and orderings.
    pub mod atomic {
        pub use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
    }
    /// Thread spawning and yielding.
    pub mod thread {
        pub use std::thread::{JoinHandle, spawn, yield_now};

        /// Spawns a thread named `name` (shown by debuggers and `top -H`); `Err` when the
        /// system refuses a thread, so the caller can go on without it.
        pub fn spawn_named<F, T>(name: &str, f: F) -> std::io::Result<JoinHandle<T>>
        where
            F: FnOnce() -> T + Send + 'static,
            T: Send + 'static,
        {
            std::thread::Builder::new().name(name.to_string()).spawn(f)
        }
    }
}

#[cfg(any(vlmem_loom, vlmem_shuttle))]
mod imp {
    #[cfg(vlmem_loom)]
    use loom as backend;
    #[cfg(all(vlmem_shuttle, not(vlmem_loom)))]
    use shuttle as backend;

    pub use backend::sync::Arc;

    /// A parking_lot-shaped mutex over loom's or shuttle's (no poisoning in the API).
    #[derive(Debug, Default)]
    pub struct Mutex<T>(backend::sync::Mutex<T>);
    /// The guard of [`Mutex`].
    pub type MutexGuard<'a, T> = backend::sync::MutexGuard<'a, T>;

    impl<T> Mutex<T> {
        /// A new mutex holding `value`.
        pub fn new(value: T) -> Self {
            Mutex(backend::sync::Mutex::new(value))
        }
        /// Locks, blocking until the lock is free.
        pub fn lock(&self) -> MutexGuard<'_, T> {
            self.0.lock().unwrap_or_else(|e| e.into_inner())
        }
        /// Locks if free.
        pub fn try_lock(&self) -> Option<MutexGuard<'_, T>> {
            self.0.try_lock().ok()
        }
        /// The inner value, consuming the mutex.
        pub fn into_inner(self) -> T {
            self.0.into_inner().unwrap_or_else(|e| e.into_inner())
        }
    }

    /// A parking_lot-shaped reader-writer lock over loom's.
    #[derive(Debug, Default)]
    pub struct RwLock<T>(backend::sync::RwLock<T>);
    /// Read guard of [`RwLock`].
    pub type RwLockReadGuard<'a, T> = backend::sync::RwLockReadGuard<'a, T>;
    /// Write guard of [`RwLock`].
    pub type RwLockWriteGuard<'a, T> = backend::sync::RwLockWriteGuard<'a, T>;

    impl<T> RwLock<T> {
        /// A new lock holding `value`.
        pub fn new(value: T) -> Self {
            RwLock(backend::sync::RwLock::new(value))
        }
        /// Shared access.
        pub fn read(&self) -> RwLockReadGuard<'_, T> {
            self.0.read().unwrap_or_else(|e| e.into_inner())
        }
        /// Exclusive access.
        pub fn write(&self) -> RwLockWriteGuard<'_, T> {
            self.0.write().unwrap_or_else(|e| e.into_inner())
        }
    }

    /// A parking_lot-shaped condition variable over loom's.
    #[derive(Debug, Default)]
    pub struct Condvar(backend::sync::Condvar);

    impl Condvar {
        /// A new condition variable.
        pub fn new() -> Self {
            Condvar(backend::sync::Condvar::new())
        }
        /// Wakes one waiter.
        pub fn notify_one(&self) {
            self.0.notify_one();
        }
        /// Wakes every waiter.
        pub fn notify_all(&self) {
            self.0.notify_all();
        }
        /// Waits, taking and returning the guard. Shared code calls [`super::wait_guard`].
        pub fn wait_guard<'a, T>(&self, guard: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
            self.0.wait(guard).unwrap_or_else(|e| e.into_inner())
        }
    }

    /// Atomic integer types and orderings.
    pub mod atomic {
        pub use super::backend::sync::atomic::{
            AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering,
        };
    }
    /// Thread spawning and yielding.
    pub mod thread {
        pub use super::backend::thread::{JoinHandle, spawn, yield_now};

        /// Spawns a thread (the model's threads carry no names); never refused here.
        pub fn spawn_named<F, T>(_name: &str, f: F) -> std::io::Result<JoinHandle<T>>
        where
            F: FnOnce() -> T + Send + 'static,
            T: Send + 'static,
        {
            Ok(spawn(f))
        }
    }
}

pub use imp::*;

/// Waits on `condvar`, taking and returning the guard; the same call under loom and
/// parking_lot, so code that waits compiles in both worlds.
#[cfg(not(any(vlmem_loom, vlmem_shuttle)))]
pub fn wait_guard<'a, T>(condvar: &Condvar, mut guard: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
    condvar.wait(&mut guard);
    guard
}

/// Waits on `condvar`, taking and returning the guard; the same call under loom and
/// parking_lot, so code that waits compiles in both worlds.
#[cfg(any(vlmem_loom, vlmem_shuttle))]
pub fn wait_guard<'a, T>(condvar: &Condvar, guard: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
    condvar.wait_guard(guard)
}

/// Waits on `condvar` until notified or until `deadline`, taking and returning the guard;
/// the flag is true when the deadline passed first. Under loom and shuttle (whose clocks do
/// not advance) it waits like [`wait_guard`] and never times out: a model bounds its waits
/// by counting them instead.
#[cfg(not(any(vlmem_loom, vlmem_shuttle)))]
pub fn wait_guard_until<'a, T>(
    condvar: &Condvar,
    mut guard: MutexGuard<'a, T>,
    deadline: std::time::Instant,
) -> (MutexGuard<'a, T>, bool) {
    let timed_out = condvar.wait_until(&mut guard, deadline).timed_out();
    (guard, timed_out)
}

/// Waits on `condvar` until notified or until `deadline`, taking and returning the guard;
/// the flag is true when the deadline passed first. Under loom and shuttle (whose clocks do
/// not advance) it waits like [`wait_guard`] and never times out: a model bounds its waits
/// by counting them instead.
#[cfg(any(vlmem_loom, vlmem_shuttle))]
pub fn wait_guard_until<'a, T>(
    condvar: &Condvar,
    guard: MutexGuard<'a, T>,
    _deadline: std::time::Instant,
) -> (MutexGuard<'a, T>, bool) {
    (condvar.wait_guard(guard), false)
}

/// parking_lot's deadlock detector, behind the `deadlock-detection` feature (which turns on
/// `parking_lot/deadlock_detection`: every lock then records who waits for whom, at some
/// cost). Without the feature, or under loom or shuttle (which find deadlocks themselves),
/// [`deadlock::ENABLED`] is false and [`deadlock::check`] finds nothing.
pub mod deadlock {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::time::Duration;

    /// Whether this build runs parking_lot's detector.
    pub const ENABLED: bool = cfg!(all(
        feature = "deadlock-detection",
        not(any(vlmem_loom, vlmem_shuttle))
    ));

    /// One pass of the detector: the cycles of threads blocked on each other's parking_lot
    /// locks found now, each described as one line per thread (its id and backtrace).
    #[cfg(all(feature = "deadlock-detection", not(any(vlmem_loom, vlmem_shuttle))))]
    pub fn check() -> Vec<Vec<String>> {
        parking_lot::deadlock::check_deadlock()
            .into_iter()
            .map(|cycle| {
                cycle
                    .iter()
                    .map(|t| format!("thread {:?}:\n{:?}", t.thread_id(), t.backtrace()))
                    .collect()
            })
            .collect()
    }

    /// One pass of the detector (off in this build: finds nothing).
    #[cfg(not(all(feature = "deadlock-detection", not(any(vlmem_loom, vlmem_shuttle)))))]
    pub fn check() -> Vec<Vec<String>> {
        Vec::new()
    }

    /// A thread running [`check`] every `interval` until dropped; counts the cycles found
    /// (a cycle that persists is reported by parking_lot once).
    #[derive(Debug)]
    pub struct Detector {
        found: Arc<AtomicU64>,
        first: Arc<parking_lot::Mutex<Option<Vec<String>>>>,
        stop: Arc<AtomicBool>,
        thread: Option<std::thread::JoinHandle<()>>,
    }

    impl Detector {
        /// Starts the detector thread (a thread that does nothing when [`ENABLED`] is false).
        pub fn start(interval: Duration) -> Self {
            let found = Arc::new(AtomicU64::new(0));
            let first = Arc::new(parking_lot::Mutex::new(None));
            let stop = Arc::new(AtomicBool::new(false));
            let thread = ENABLED.then(|| {
                let (found, first, stop) = (found.clone(), first.clone(), stop.clone());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(interval);
                        for cycle in check() {
                            found.fetch_add(1, Ordering::Relaxed);
                            first.lock().get_or_insert(cycle);
                        }
                    }
                })
            });
            Detector {
                found,
                first,
                stop,
                thread,
            }
        }

        /// Deadlock cycles found so far.
        pub fn found(&self) -> u64 {
            self.found.load(Ordering::Relaxed)
        }

        /// The threads of the first cycle found (id and backtrace each), if any.
        pub fn first_cycle(&self) -> Option<Vec<String>> {
            self.first.lock().clone()
        }

        /// Runs one last pass, stops the thread and returns the cycles found in all.
        pub fn finish(mut self) -> u64 {
            self.stop.store(true, Ordering::Relaxed);
            if let Some(t) = self.thread.take() {
                let _ = t.join();
                for cycle in check() {
                    self.found.fetch_add(1, Ordering::Relaxed);
                    self.first.lock().get_or_insert(cycle);
                }
            }
            self.found()
        }
    }

    impl Drop for Detector {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::Relaxed);
        }
    }
}
