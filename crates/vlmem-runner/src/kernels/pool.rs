//! A pool of threads that spin between jobs: the decode kernels' parallel loops.
//!
//! Decode runs a few hundred short matrix-vector products per token (0.1-25 ms each), one
//! after another with a little serial work between. Rayon's workers go to sleep between them
//! and a call from outside its pool waits for them to wake. This pool's workers spin for a
//! short while after each job ([`SPIN`]) so the next job starts at once, then sleep on a
//! condition variable, so an idle process costs nothing. On the 2-vCPU development VM
//! (`cargo run --release -p vlmem-bench --example matvec_pool`, the same kernel and the same
//! 1 MiB tasks both ways, 3 runs of 4 rounds) the kernel read 0.71-0.86 of the machine's read
//! bandwidth split by rayon and 0.83-0.94 split by this pool, after the first round (0.57-0.62
//! for the pool's first job after rayon's first use, a one-off we have not explained).

//! A job is `tasks` indices and a function of an index. The calling thread publishes it,
//! takes indices itself like any worker (so the pool needs one thread fewer than the cores),
//! and returns when every index has run. Indices are claimed one at a time from a shared
//! counter, so a thread that the OS deschedules holds up at most the one task it holds.
//!
//! Invariants (checked by the loom models below and `tests/pool.rs`):
//! - every index in `0..tasks` runs exactly once, and all of them have returned before
//!   [`WorkPool::run`] returns (the job's `done` counter reaches `tasks` only after the last
//!   call returns, and the caller waits for it);
//! - the job's function, which borrows the caller's stack, is called only by a thread that
//!   claimed an index below `tasks`; a worker that arrives late finds none left and never
//!   touches it (it only holds the job's counters, shared through an `Arc`);
//! - one job at a time: a second caller (another thread, or a task calling `run` inside a
//!   job) finds the pool busy and runs its job inline on its own thread instead of waiting,
//!   so `run` never blocks on another job and cannot deadlock;
//! - a panic in a task is caught where it happens, the job still completes (every index is
//!   counted), and the panic is re-raised on the caller's thread.
//!
//! Lock order: `Shared::slot` is a leaf lock, held only to publish or fetch a job and to go to
//! sleep; no task runs under it. `WorkPool::submit` is taken with `try_lock` only.

#![allow(unsafe_code)]

use std::any::Any;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::OnceLock;
use vlmem_core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use vlmem_core::sync::{Arc, Condvar, Mutex, thread, wait_guard};

/// How long an idle worker spins for the next job before it sleeps. Decode's serial work
/// between two kernels (a norm, RoPE, attention over the cache) takes tens of microseconds;
/// a sleeping worker costs a wake-up (tens of microseconds on a VM) at the next job.
pub const SPIN: std::time::Duration = std::time::Duration::from_micros(200);

/// The function of a job with its lifetime erased. It is dereferenced only while the job has
/// unclaimed indices, and the caller of [`WorkPool::run`] keeps the function alive until every
/// claimed index has returned (the module's invariants).
#[derive(Clone, Copy)]
struct TaskFn(*const (dyn Fn(usize) + Sync));

// SAFETY: the pointee is `Sync` (shared calls from several threads are allowed), and the
// pointer is only dereferenced under the module's invariants, which keep it alive.
unsafe impl Send for TaskFn {}
// SAFETY: as above; the pointer itself is never written after the job is made.
unsafe impl Sync for TaskFn {}

/// One job: its function, its size and its two counters.
struct Job {
    f: TaskFn,
    tasks: usize,
    /// The next index to hand out (may run past `tasks`: each late claim adds one).
    next: AtomicUsize,
    /// Indices that have returned.
    done: AtomicUsize,
    /// The first panic of a task, re-raised by the caller.
    panic: Mutex<Option<Box<dyn Any + Send>>>,
}

impl Job {
    /// Claims and runs indices until none is left.
    fn work(&self) {
        loop {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            if i >= self.tasks {
                return;
            }
            // SAFETY: index `i < tasks` is claimed by this thread alone and has not been
            // counted in `done`, so the caller of `run` is still waiting and the function
            // it lent (and everything it borrows) is alive (the module's invariants).
            let f = unsafe { &*self.f.0 };
            if let Err(p) = catch_unwind(AssertUnwindSafe(|| f(i))) {
                self.panic.lock().get_or_insert(p);
            }
            // Release: the task's writes happen before the caller sees the count.
            self.done.fetch_add(1, Ordering::Release);
        }
    }
}

/// What the workers read: the published job and the pool's life.
#[derive(Default)]
struct Slot {
    epoch: u64,
    job: Option<Arc<Job>>,
    sleeping: usize,
    shutdown: bool,
}

struct Shared {
    slot: Mutex<Slot>,
    wake: Condvar,
    /// `slot.epoch`, readable without the lock by spinning workers.
    epoch: AtomicU64,
    /// Whether idle workers spin at all (off under loom, whose model cannot time a spin).
    spin: bool,
}

/// A fixed set of worker threads that run [`WorkPool::run`]'s jobs with the caller.
pub struct WorkPool {
    shared: Arc<Shared>,
    submit: Mutex<()>,
    workers: Vec<thread::JoinHandle<()>>,
}

impl std::fmt::Debug for WorkPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkPool")
            .field("threads", &self.threads())
            .finish()
    }
}

impl WorkPool {
    /// A pool whose jobs run on `threads` threads: the caller and `threads - 1` workers
    /// (none for 0 or 1: every job then runs inline).
    pub fn new(threads: usize) -> Self {
        Self::with_spin(threads, cfg!(not(any(vlmem_loom, vlmem_shuttle))))
    }

    fn with_spin(threads: usize, spin: bool) -> Self {
        let shared = Arc::new(Shared {
            slot: Mutex::new(Slot::default()),
            wake: Condvar::new(),
            epoch: AtomicU64::new(0),
            spin,
        });
        let workers = (1..threads.max(1))
            .map(|_| {
                let shared = shared.clone();
                thread::spawn(move || worker(&shared))
            })
            .collect();
        WorkPool {
            shared,
            submit: Mutex::new(()),
            workers,
        }
    }

    /// Threads a job runs on, the caller included.
    pub fn threads(&self) -> usize {
        self.workers.len() + 1
    }

    /// Runs `f(0)`, ..., `f(tasks - 1)`, each exactly once, on the caller and the workers;
    /// returns when all have returned. A panic in any of them is re-raised here, after the
    /// others have finished. If the pool is running another job (a second caller, or `run`
    /// called from inside a task), this job runs inline on the calling thread.
    pub fn run(&self, tasks: usize, f: &(dyn Fn(usize) + Sync)) {
        let guard = if tasks > 1 && !self.workers.is_empty() {
            self.submit.try_lock()
        } else {
            None
        };
        let Some(_guard) = guard else {
            (0..tasks).for_each(f);
            return;
        };
        // The lifetime of `f` is erased so the workers can hold it; `Job::work` dereferences
        // it only for an unclaimed index, and this function does not return before
        // `done == tasks`, so `f` outlives every call through the pointer.
        let f: &'static (dyn Fn(usize) + Sync) =
            // SAFETY: same type and layout (a fat reference), only the lifetime changes;
            // nothing is dereferenced here, and the later dereferences are covered above.
            unsafe { std::mem::transmute::<&(dyn Fn(usize) + Sync), _>(f) };
        let job = Arc::new(Job {
            f: TaskFn(f as *const _),
            tasks,
            next: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
            panic: Mutex::new(None),
        });
        {
            let mut slot = self.shared.slot.lock();
            slot.epoch += 1;
            slot.job = Some(job.clone());
            self.shared.epoch.store(slot.epoch, Ordering::Release);
            if slot.sleeping > 0 {
                self.shared.wake.notify_all();
            }
        }
        job.work();
        let mut spins = 0u32;
        while job.done.load(Ordering::Acquire) < tasks {
            spins = spins.saturating_add(1);
            if !self.shared.spin || spins > 1 << 16 {
                thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
        self.shared.slot.lock().job = None;
        let panic = job.panic.lock().take();
        if let Some(p) = panic {
            resume_unwind(p);
        }
    }

    /// Runs `f` once on each of `items`, spread over the pool as [`WorkPool::run`] does: the
    /// safe way to give each task its own mutable output (each item is taken by one task; its
    /// cell's lock is released before `f` runs).
    pub fn for_each<T: Send>(&self, items: impl IntoIterator<Item = T>, f: impl Fn(T) + Sync) {
        let cells: Vec<Mutex<Option<T>>> = items.into_iter().map(|t| Mutex::new(Some(t))).collect();
        self.run(cells.len(), &|i| {
            let item = cells[i].lock().take();
            if let Some(item) = item {
                f(item);
            }
        });
    }
}

impl Drop for WorkPool {
    fn drop(&mut self) {
        {
            let mut slot = self.shared.slot.lock();
            slot.shutdown = true;
            slot.epoch += 1;
            self.shared.epoch.store(slot.epoch, Ordering::Release);
            self.shared.wake.notify_all();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

/// A worker: wait for a new epoch (spinning up to [`SPIN`], then asleep), run its job's
/// indices, repeat until shutdown.
fn worker(shared: &Shared) {
    let mut seen = 0u64;
    loop {
        if shared.spin {
            let start = std::time::Instant::now();
            let mut spins = 0u32;
            while shared.epoch.load(Ordering::Acquire) == seen {
                std::hint::spin_loop();
                spins = spins.wrapping_add(1);
                if spins.is_multiple_of(256) && start.elapsed() > SPIN {
                    break;
                }
            }
        }
        let job = {
            let mut slot = shared.slot.lock();
            while slot.epoch == seen && !slot.shutdown {
                slot.sleeping += 1;
                slot = wait_guard(&shared.wake, slot);
                slot.sleeping -= 1;
            }
            if slot.shutdown {
                return;
            }
            seen = slot.epoch;
            slot.job.clone()
        };
        if let Some(job) = job {
            job.work();
        }
    }
}

/// The process's pool, made on first use: `VLMEM_THREADS` threads if that is set to a
/// number, else `RAYON_NUM_THREADS` (as rayon's global pool reads it), else the machine's
/// available parallelism. (Not `rayon::current_num_threads`, which inside a rayon pool's
/// `install` counts that pool.)
pub fn global() -> &'static WorkPool {
    static POOL: OnceLock<WorkPool> = OnceLock::new();
    POOL.get_or_init(|| {
        let from_env = |name: &str| {
            std::env::var(name)
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
                .filter(|&n| n > 0)
        };
        let threads = from_env("VLMEM_THREADS")
            .or_else(|| from_env("RAYON_NUM_THREADS"))
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        WorkPool::new(threads)
    })
}

#[cfg(all(test, vlmem_loom))]
mod loom_models {
    //! Run: `RUSTFLAGS="--cfg vlmem_loom" cargo test -p vlmem-runner --release --lib loom`.
    use super::*;
    use vlmem_core::sync::atomic::AtomicUsize;

    /// A job of `tasks` indices on a pool of `threads`: in every interleaving each index runs
    /// exactly once and all have run when `run` returns; no call comes after it (counted
    /// again after the pool has shut down and joined its workers).
    fn job(threads: usize, tasks: usize) {
        loom::model(move || {
            let pool = WorkPool::new(threads);
            let hits: Vec<AtomicUsize> = (0..tasks).map(|_| AtomicUsize::new(0)).collect();
            let calls = Arc::new(AtomicUsize::new(0));
            let c = calls.clone();
            pool.run(tasks, &|i| {
                hits[i].fetch_add(1, Ordering::Relaxed);
                c.fetch_add(1, Ordering::Relaxed);
            });
            for h in &hits {
                assert_eq!(h.load(Ordering::Relaxed), 1, "each index exactly once");
            }
            assert_eq!(calls.load(Ordering::Relaxed), tasks);
            drop(pool);
            assert_eq!(
                calls.load(Ordering::Relaxed),
                tasks,
                "no call after run returned"
            );
        });
    }

    #[test]
    fn loom_one_worker_three_tasks() {
        job(2, 3);
    }

    #[test]
    fn loom_two_workers_two_tasks() {
        job(3, 2);
    }

    /// Two jobs back to back: a worker still finishing (or only now waking for) the first
    /// never runs an index of it during the second, and the second completes.
    #[test]
    fn loom_two_jobs_back_to_back() {
        loom::model(|| {
            let pool = WorkPool::new(2);
            let first = Arc::new(AtomicUsize::new(0));
            let second = Arc::new(AtomicUsize::new(0));
            let (a, b) = (first.clone(), second.clone());
            pool.run(2, &|_| {
                a.fetch_add(1, Ordering::Relaxed);
            });
            assert_eq!(first.load(Ordering::Relaxed), 2);
            pool.run(2, &|_| {
                b.fetch_add(1, Ordering::Relaxed);
            });
            assert_eq!(
                first.load(Ordering::Relaxed),
                2,
                "no late call of the first job"
            );
            assert_eq!(second.load(Ordering::Relaxed), 2);
        });
    }

    /// A task writing its own output (the kernels' pattern): every output is written by
    /// its task and visible to the caller when `run` returns; loom's cells report any write
    /// not ordered before the caller's read.
    #[test]
    fn loom_outputs_visible_to_caller() {
        loom::model(|| {
            let pool = WorkPool::new(2);
            struct Cells(Vec<loom::cell::UnsafeCell<u32>>);
            // SAFETY: cell i is written only by the task of index i, which runs once; the
            // caller reads the cells after `run` returns. loom checks exactly this.
            unsafe impl Sync for Cells {}
            impl Cells {
                fn cell(&self, i: usize) -> &loom::cell::UnsafeCell<u32> {
                    &self.0[i]
                }
            }
            let out = Cells((0..2).map(|_| loom::cell::UnsafeCell::new(0)).collect());
            pool.run(2, &|i| {
                // SAFETY: index i is run by one thread only, so cell i has one writer.
                out.cell(i).with_mut(|p| unsafe { *p = i as u32 + 1 });
            });
            for (i, c) in out.0.iter().enumerate() {
                // SAFETY: run has returned: no task writes any more.
                assert_eq!(c.with(|p| unsafe { *p }), i as u32 + 1);
            }
        });
    }
}
