//! The kernels' work pool (`kernels::pool::WorkPool`): every index of every job runs exactly
//! once and before `run` returns, whatever the pool size, with several callers at once, with
//! jobs nested in tasks, across idle periods long enough for the workers to sleep, and when
//! a task panics. Each test checks a ledger of what ran against what was asked.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use vlmem_runner::kernels::pool::{SPIN, WorkPool};

/// Runs `tasks` indices on `pool`, each adding one to its own ledger slot, and checks that
/// every slot holds exactly one when `run` returns. Every fifth task first sleeps a little,
/// so a worker is often still inside a task when the caller has claimed the last index: a
/// `run` that returned before its workers finished would leave slots empty.
fn ledger_job(pool: &WorkPool, tasks: usize) {
    let ledger: Vec<AtomicUsize> = (0..tasks).map(|_| AtomicUsize::new(0)).collect();
    pool.run(tasks, &|i| {
        if i % 5 == 1 {
            std::thread::sleep(Duration::from_micros(100));
        }
        ledger[i].fetch_add(1, Ordering::Relaxed);
    });
    for (i, slot) in ledger.iter().enumerate() {
        assert_eq!(slot.load(Ordering::Relaxed), 1, "index {i} of {tasks}");
    }
}

#[test]
fn every_index_once_for_every_pool_size_and_job_size() {
    for threads in [0, 1, 2, 3, 4] {
        let pool = WorkPool::new(threads);
        assert_eq!(pool.threads(), threads.max(1));
        for tasks in [0, 1, 2, 3, 7, 64, 1000] {
            for _ in 0..20 {
                ledger_job(&pool, tasks);
            }
        }
    }
}

#[test]
fn several_callers_at_once_each_get_their_whole_job() {
    let pool = Arc::new(WorkPool::new(3));
    let handles: Vec<_> = (0..4)
        .map(|c| {
            let pool = pool.clone();
            std::thread::spawn(move || {
                for j in 0..300 {
                    ledger_job(&pool, 1 + (c * 7 + j * 13) % 97);
                }
            })
        })
        .collect();
    for h in handles {
        h.join().expect("a caller failed its ledger");
    }
}

#[test]
fn a_job_inside_a_task_runs_inline_and_completes() {
    let pool = WorkPool::new(2);
    let inner_total = AtomicUsize::new(0);
    pool.run(4, &|_| {
        let inner: Vec<AtomicUsize> = (0..5).map(|_| AtomicUsize::new(0)).collect();
        pool.run(5, &|k| {
            inner[k].fetch_add(1, Ordering::Relaxed);
        });
        assert!(inner.iter().all(|s| s.load(Ordering::Relaxed) == 1));
        inner_total.fetch_add(5, Ordering::Relaxed);
    });
    assert_eq!(inner_total.load(Ordering::Relaxed), 20);
}

#[test]
fn workers_that_went_to_sleep_wake_for_the_next_job() {
    let pool = WorkPool::new(3);
    for _ in 0..3 {
        ledger_job(&pool, 50);
        // Longer than the spin: the workers are asleep on the condition variable now.
        std::thread::sleep(SPIN * 10 + Duration::from_millis(2));
    }
    // The workers took part: with tasks that block for a while, three threads finish a job
    // of six 20 ms tasks in about 40 ms, one thread alone in 120 ms.
    let threads_seen = std::sync::Mutex::new(std::collections::HashSet::new());
    pool.run(6, &|_| {
        threads_seen
            .lock()
            .unwrap()
            .insert(std::thread::current().id());
        std::thread::sleep(Duration::from_millis(20));
    });
    assert!(
        threads_seen.lock().unwrap().len() >= 2,
        "sleeping workers never joined the job"
    );
}

#[test]
fn a_panicking_task_reaches_the_caller_after_the_rest_ran() {
    let pool = WorkPool::new(2);
    let ran = AtomicUsize::new(0);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        pool.run(40, &|i| {
            if i == 7 {
                panic!("task 7 fails");
            }
            std::thread::sleep(Duration::from_micros(200));
            ran.fetch_add(1, Ordering::Relaxed);
        });
    }));
    let err = result.expect_err("the panic must reach the caller");
    let msg = err
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| err.downcast_ref::<String>().cloned())
        .unwrap_or_default();
    assert_eq!(msg, "task 7 fails");
    assert_eq!(ran.load(Ordering::Relaxed), 39, "every other task ran");
    // The pool is still whole.
    ledger_job(&pool, 100);
}

#[test]
fn for_each_hands_each_item_to_one_task() {
    let pool = WorkPool::new(3);
    let mut out = vec![0u64; 257];
    let items: Vec<(usize, &mut u64)> = out.iter_mut().enumerate().collect();
    pool.for_each(items, |(i, o)| *o += i as u64 * 3 + 1);
    for (i, o) in out.iter().enumerate() {
        assert_eq!(*o, i as u64 * 3 + 1);
    }
}

#[test]
fn dropping_a_pool_joins_its_workers() {
    for _ in 0..50 {
        let pool = WorkPool::new(4);
        ledger_job(&pool, 10);
        drop(pool);
    }
}
