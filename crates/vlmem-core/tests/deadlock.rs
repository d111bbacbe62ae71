//! The deadlock detector bites: two threads take two parking_lot mutexes in opposite order
//! (a planted lock-order inversion) and the detector that `vlmem stress` runs must report
//! the cycle. Run: `cargo test -p vlmem-core --features deadlock-detection --test deadlock`.
#![cfg(feature = "deadlock-detection")]

use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};
use vlmem_core::sync::Mutex;
use vlmem_core::sync::deadlock::{Detector, ENABLED};

#[test]
fn detector_reports_a_planted_lock_order_inversion() {
    const { assert!(ENABLED) };
    let detector = Detector::start(Duration::from_millis(20));
    // Nothing is blocked yet.
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(detector.found(), 0);

    let a = Arc::new(Mutex::new(0u32));
    let b = Arc::new(Mutex::new(0u32));
    let both_hold_one = Arc::new(Barrier::new(2));
    for first_a in [true, false] {
        let (a, b, barrier) = (a.clone(), b.clone(), both_hold_one.clone());
        // The two threads never return: they are left blocked when the test ends.
        std::thread::spawn(move || {
            let (x, y) = if first_a { (&a, &b) } else { (&b, &a) };
            let _g1 = x.lock();
            barrier.wait();
            let _g2 = y.lock();
            unreachable!("the planted deadlock resolved");
        });
    }
    let started = Instant::now();
    while detector.found() == 0 && started.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(
        detector.found(),
        1,
        "the detector missed the planted deadlock"
    );
    let cycle = detector.first_cycle().unwrap();
    assert_eq!(cycle.len(), 2, "two threads in the cycle: {cycle:#?}");
    // A persistent cycle is reported once.
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(detector.finish(), 1);
}
