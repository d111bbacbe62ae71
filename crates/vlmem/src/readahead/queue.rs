//! The read-ahead's reader pool: a queue of jobs (one piece read each) served in order by
//! a few persistent threads.

use std::collections::VecDeque;
use std::time::Instant;
use vlmem_core::sync::thread::{JoinHandle, spawn_named};
use vlmem_core::sync::{Arc, Condvar, Mutex, MutexGuard, wait_guard};

/// A job of the reader pool (one piece of a streamed tensor).
pub(crate) type Job = Box<dyn FnOnce() + Send>;

/// The reader pool's queue: jobs run in the order they were submitted, by a few persistent
/// threads, so with pieces queued in use order across tensor boundaries that many reads stay
/// in flight until the queue is empty (one tensor's tail does not drain the disk's queue
/// before the next tensor starts).
///
/// Invariant: every submitted job is run exactly once, or dropped unrun once the queue is
/// closed (a piece dropped unread fails its fill, which gives the area its room back). The
/// lock is a leaf: jobs run, and are dropped, outside it.
pub(crate) struct JobQueue {
    state: Mutex<JobState>,
    more: Condvar,
}

struct JobState {
    jobs: VecDeque<Job>,
    closed: bool,
    /// Reader threads serving the queue (0: the submitter runs each job itself).
    readers: usize,
    /// Jobs the readers are running now, and since when that count holds.
    running: usize,
    since: Instant,
    /// The readers' activity so far (see [`ReaderActivity`]).
    activity: ReaderActivity,
}

impl JobState {
    /// Accounts the time since the last change of `running`, then sets it to `running`.
    fn set_running(&mut self, running: usize) {
        let now = Instant::now();
        let ns = u64::try_from(now.duration_since(self.since).as_nanos()).unwrap_or(u64::MAX);
        if self.running > 0 {
            self.activity.busy_ns = self.activity.busy_ns.saturating_add(ns);
            self.activity.depth_ns = self
                .activity
                .depth_ns
                .saturating_add(ns.saturating_mul(self.running as u64));
        }
        self.running = running;
        self.since = now;
    }
}

/// How busy the read-ahead's reader threads have been since they started: the time at least
/// one read was in flight, and the integral of the number in flight over time (so
/// `depth_ns / busy_ns` is the mean queue depth while busy). Taken twice, the difference
/// tells how much of an interval the disk was kept busy, and how deep.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReaderActivity {
    /// Nanoseconds with at least one read in flight.
    pub busy_ns: u64,
    /// Reads in flight, integrated over time (read-nanoseconds).
    pub depth_ns: u64,
}

impl JobQueue {
    pub(crate) fn new() -> Self {
        JobQueue {
            state: Mutex::new(JobState {
                jobs: VecDeque::new(),
                closed: false,
                readers: 0,
                running: 0,
                since: Instant::now(),
                activity: ReaderActivity::default(),
            }),
            more: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, JobState> {
        self.state.lock()
    }

    /// Queues `job` behind the others; runs it here when no reader thread serves the
    /// queue, drops it unrun when the queue is closed.
    pub(crate) fn submit(&self, job: Job) {
        let mut st = self.lock();
        if st.closed {
            drop(st);
            drop(job);
        } else if st.readers == 0 {
            drop(st);
            job();
        } else {
            st.jobs.push_back(job);
            drop(st);
            self.more.notify_one();
        }
    }

    /// A reader thread: runs jobs in order until the queue is closed.
    fn serve(&self) {
        loop {
            let mut st = self.lock();
            let job = loop {
                if st.closed {
                    return;
                }
                if let Some(job) = st.jobs.pop_front() {
                    break job;
                }
                st = wait_guard(&self.more, st);
            };
            let running = st.running + 1;
            st.set_running(running);
            drop(st);
            // Counts the job as finished when it returns or unwinds.
            let _done = Finished(self);
            job();
        }
    }

    /// The readers' activity so far, the reads in flight now counted up to now.
    pub(crate) fn activity(&self) -> ReaderActivity {
        let mut st = self.lock();
        let running = st.running;
        st.set_running(running);
        st.activity
    }

    /// Reads running now (for tests).
    #[cfg(all(test, not(any(vlmem_loom, vlmem_shuttle))))]
    pub(crate) fn running(&self) -> usize {
        self.lock().running
    }

    /// Starts up to `threads` reader threads (fewer when the system refuses some).
    pub(crate) fn start(this: &Arc<Self>, threads: usize) -> Vec<JoinHandle<()>> {
        let handles: Vec<JoinHandle<()>> = (0..threads)
            .filter_map(|_| {
                let q = this.clone();
                spawn_named("vlmem-read", move || q.serve()).ok()
            })
            .collect();
        this.lock().readers = handles.len();
        handles
    }

    /// Closes the queue: jobs still queued are dropped unrun, readers stop after the job
    /// they are running.
    pub(crate) fn close(&self) {
        let mut st = self.lock();
        st.closed = true;
        let dropped: Vec<Job> = st.jobs.drain(..).collect();
        drop(st);
        self.more.notify_all();
        drop(dropped);
    }
}

/// Takes a finished job off the queue's count of running ones when dropped.
struct Finished<'a>(&'a JobQueue);

impl Drop for Finished<'_> {
    fn drop(&mut self) {
        let mut st = self.0.lock();
        let running = st.running.saturating_sub(1);
        st.set_running(running);
    }
}

#[cfg(all(test, not(any(vlmem_loom, vlmem_shuttle))))]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Counts its drop without a run.
    struct Unrun(Arc<vlmem_core::sync::atomic::AtomicU64>);
    impl Drop for Unrun {
        fn drop(&mut self) {
            self.0
                .fetch_add(1, vlmem_core::sync::atomic::Ordering::SeqCst);
        }
    }

    /// A closed queue drops what is still queued (unrun), and with no reader thread the
    /// submitter runs each job.
    #[test]
    fn a_closed_queue_drops_jobs_and_no_readers_runs_them_inline() {
        use vlmem_core::sync::atomic::{AtomicU64, Ordering};
        let queue = Arc::new(JobQueue::new());
        let ran = Arc::new(AtomicU64::new(0));
        let unrun = Arc::new(AtomicU64::new(0));
        let r = ran.clone();
        queue.submit(Box::new(move || {
            r.fetch_add(1, Ordering::SeqCst);
        }));
        assert_eq!(ran.load(Ordering::SeqCst), 1, "no readers: run inline");
        // A reader that is busy: the second job is still queued when the queue closes.
        let (gate_tx, gate_rx) = std::sync::mpsc::channel::<()>();
        let readers = JobQueue::start(&queue, 1);
        queue.submit(Box::new(move || {
            let _ = gate_rx.recv();
        }));
        let (r, guard) = (ran.clone(), Unrun(unrun.clone()));
        queue.submit(Box::new(move || {
            r.fetch_add(1, Ordering::SeqCst);
            std::mem::forget(guard);
        }));
        queue.close();
        drop(gate_tx);
        for h in readers {
            h.join().unwrap();
        }
        assert_eq!(ran.load(Ordering::SeqCst), 1, "the queued job never ran");
        assert_eq!(unrun.load(Ordering::SeqCst), 1, "it was dropped unrun");
        // After the close, a job is dropped unrun at once.
        let guard = Unrun(unrun.clone());
        queue.submit(Box::new(move || std::mem::forget(guard)));
        assert_eq!(unrun.load(Ordering::SeqCst), 2);
    }

    /// The readers' activity counts time with reads in flight and how many: two readers, four
    /// jobs of ~20 ms each, so at least ~40 ms busy at depth 2; never more reads in flight
    /// than readers, and nothing counted once they are idle.
    #[test]
    fn reader_activity_counts_busy_time_and_depth() {
        let queue = Arc::new(JobQueue::new());
        assert_eq!(queue.activity(), ReaderActivity::default());
        let readers = JobQueue::start(&queue, 2);
        let done = Arc::new((Mutex::new(0usize), Condvar::new()));
        for _ in 0..4 {
            let d = done.clone();
            queue.submit(Box::new(move || {
                std::thread::sleep(Duration::from_millis(20));
                *d.0.lock() += 1;
                d.1.notify_all();
            }));
        }
        let mut n = done.0.lock();
        while *n < 4 {
            n = wait_guard(&done.1, n);
        }
        drop(n);
        // The last job's end is counted when its reader takes the lock after it returns.
        while queue.running() > 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
        let a = queue.activity();
        let ms = 1_000_000;
        assert!(a.busy_ns >= 38 * ms, "{a:?}");
        assert!(a.depth_ns >= 78 * ms, "four jobs of 20 ms: {a:?}");
        assert!(a.depth_ns <= 2 * a.busy_ns, "at most two in flight: {a:?}");
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(queue.activity(), a, "idle readers add nothing");
        queue.close();
        for h in readers {
            h.join().unwrap();
        }
    }
}

#[cfg(all(test, vlmem_loom))]
mod loom_queue {
    //! Run: `RUSTFLAGS="--cfg vlmem_loom" CARGO_TARGET_DIR=target/loom cargo test --release
    //! -p vlmem --lib loom`.
    use super::*;
    use vlmem_core::sync::atomic::{AtomicU64, Ordering};

    /// A job that counts its run, and, when dropped without running, its drop.
    struct Counted {
        ran: Arc<AtomicU64>,
        dropped_unrun: Arc<AtomicU64>,
        done: bool,
    }

    impl Counted {
        fn run(mut self) {
            self.ran.fetch_add(1, Ordering::SeqCst);
            self.done = true;
        }
    }

    impl Drop for Counted {
        fn drop(&mut self) {
            if !self.done {
                self.dropped_unrun.fetch_add(1, Ordering::SeqCst);
            }
        }
    }

    fn job(ran: &Arc<AtomicU64>, dropped: &Arc<AtomicU64>) -> Job {
        let c = Counted {
            ran: ran.clone(),
            dropped_unrun: dropped.clone(),
            done: false,
        };
        Box::new(move || c.run())
    }

    /// Two readers serve a queue that gets two jobs, then closes while they may still be
    /// queued, then gets a third: in every interleaving (up to four preemptions) each job
    /// runs exactly once or is dropped unrun (never both, never twice), a job submitted
    /// after the close is dropped unrun, and the readers stop.
    #[test]
    fn loom_every_job_runs_once_or_is_dropped_after_close() {
        let mut model = loom::model::Builder::new();
        model.preemption_bound = Some(4);
        model.check(|| {
            let queue = Arc::new(JobQueue::new());
            let readers = JobQueue::start(&queue, 2);
            let counters: Vec<(Arc<AtomicU64>, Arc<AtomicU64>)> = (0..3)
                .map(|_| (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0))))
                .collect();
            for (ran, dropped) in &counters[..2] {
                queue.submit(job(ran, dropped));
            }
            queue.close();
            let (ran, dropped) = &counters[2];
            queue.submit(job(ran, dropped));
            for r in readers {
                r.join().unwrap();
            }
            for (i, (ran, dropped)) in counters.iter().enumerate() {
                let (r, d) = (ran.load(Ordering::SeqCst), dropped.load(Ordering::SeqCst));
                assert_eq!(r + d, 1, "job {i}: ran {r}, dropped unrun {d}");
            }
            assert_eq!(
                counters[2].0.load(Ordering::SeqCst),
                0,
                "submitted after close"
            );
            assert_eq!(queue.lock().running, 0);
        });
    }

    /// One reader, two jobs submitted and the queue closed only after both ran (the
    /// submitter waits for them): both run, in order, exactly once.
    #[test]
    fn loom_jobs_run_in_order_exactly_once() {
        loom::model(|| {
            let queue = Arc::new(JobQueue::new());
            let readers = JobQueue::start(&queue, 1);
            let order = Arc::new(Mutex::new(Vec::new()));
            let done = Arc::new(Condvar::new());
            for i in 0..2u32 {
                let (order, done) = (order.clone(), done.clone());
                queue.submit(Box::new(move || {
                    order.lock().push(i);
                    done.notify_all();
                }));
            }
            let mut seen = order.lock();
            while seen.len() < 2 {
                seen = wait_guard(&done, seen);
            }
            assert_eq!(*seen, vec![0, 1]);
            drop(seen);
            queue.close();
            for r in readers {
                r.join().unwrap();
            }
        });
    }
}
