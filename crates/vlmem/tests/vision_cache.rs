//! The vision cache when a caller's computation panics: the panic reaches its caller, the
//! image is not left in flight (other threads waiting for it, or asking later, go on), the
//! ledger holds and the cache keeps serving, with or without a `clear` in between.

mod common;

use std::sync::mpsc;
use std::sync::{Arc, Barrier};
use std::time::Duration;
use vlmem::vision_cache::VisionCache;
use vlmem::{ManagerError, MemoryManager, TensorKind, Tier};

const MIB: u64 = 1 << 20;

fn cache() -> (Arc<VisionCache>, MemoryManager) {
    let m = common::manager_with([4 * MIB, 64 * MIB, 64 * MIB]);
    (Arc::new(VisionCache::new(m.clone(), "t", 8 * MIB)), m)
}

fn embed(image: &[u8]) -> Vec<u8> {
    common::xorshift_bytes(image.len() as u64 ^ u64::from(image[0]), 10_000)
}

/// Runs `f` on a thread and returns what it returns, failing (not hanging) when it takes
/// more than 5 s.
fn within<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(5))
        .unwrap_or_else(|_| panic!("{what} blocked"))
}

/// Which closure-taking entry point computes the embedding.
#[derive(Clone, Copy, Debug)]
enum Api {
    Infallible,
    Fallible,
}

/// Computes through `api` with a computation that panics after `hold` (so other threads
/// can start waiting for it); returns whether the panic reached the caller.
fn panicking_compute(cache: &VisionCache, img: &[u8], api: Api, hold: Duration) -> bool {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match api {
        Api::Infallible => cache
            .get_or_insert_with(img, || {
                std::thread::sleep(hold);
                panic!("the vision tower panicked")
            })
            .map(|_| ()),
        Api::Fallible => cache
            .get_or_try_insert_with(img, || -> Result<Vec<u8>, ManagerError> {
                std::thread::sleep(hold);
                panic!("the vision tower panicked")
            })
            .map(|_| ()),
    }))
    .is_err()
}

/// After a panic the image computes again, is cached and read back; no tensor leaked.
fn serves_again(cache: &Arc<VisionCache>, m: &MemoryManager, img: &[u8]) {
    let (c, i) = (cache.clone(), img.to_vec());
    // (A hit when a thread that waited computed it meanwhile.)
    let (e, _) = within("get_or_insert_with after the panic", move || {
        c.get_or_insert_with(&i, || embed(&i)).unwrap()
    });
    assert_eq!(e.to_vec().unwrap(), embed(img));
    let (c, i) = (cache.clone(), img.to_vec());
    let got = within("get after the panic", move || c.get(&i).map(|e| e.to_vec()));
    assert_eq!(got.unwrap().unwrap(), embed(img));
    let s = cache.stats();
    assert_eq!((s.entries, s.resident_bytes), (1, 10_000), "{s:?}");
    drop(e);
    cache.clear();
    assert_eq!(
        m.stats().tensors,
        0,
        "every embedding freed once the cache lets go"
    );
    let charged: u64 = Tier::ALL
        .iter()
        .map(|&t| m.stats().charged.get(t, TensorKind::VisionEmbedding))
        .sum();
    assert_eq!(charged, 0);
}

fn panic_then_others_go_on(api: Api, clear_between: bool) {
    let (cache, m) = cache();
    let img = vec![7u8; 3000];
    // Two threads ask for the image while the panicking computation is in flight: one
    // computing it, one only looking it up. Both must return.
    let ready = Arc::new(Barrier::new(3));
    let waiters: Vec<_> = (0..2)
        .map(|w| {
            let (c, i, ready) = (cache.clone(), img.clone(), ready.clone());
            let (tx, rx) = mpsc::channel();
            std::thread::spawn(move || {
                ready.wait();
                std::thread::sleep(Duration::from_millis(20));
                let r = if w == 0 {
                    c.get_or_insert_with(&i, || embed(&i))
                        .map(|(e, _)| Some(e.to_vec().unwrap()))
                        .unwrap()
                } else {
                    c.get(&i).map(|e| e.to_vec().unwrap())
                };
                let _ = tx.send(r);
            });
            rx
        })
        .collect();
    let owner = {
        let (c, i, ready) = (cache.clone(), img.clone(), ready.clone());
        std::thread::spawn(move || {
            // The owner marks the image in flight before the others ask.
            let hold = Duration::from_millis(200);
            let first = std::thread::spawn({
                let ready = ready.clone();
                move || {
                    std::thread::sleep(Duration::from_millis(20));
                    ready.wait();
                }
            });
            let r = panicking_compute(&c, &i, api, hold);
            first.join().unwrap();
            r
        })
    };
    assert!(
        owner.join().unwrap(),
        "{api:?}: the panic reaches its caller"
    );
    for (w, rx) in waiters.into_iter().enumerate() {
        let r = rx
            .recv_timeout(Duration::from_secs(5))
            .unwrap_or_else(|_| panic!("{api:?}: waiter {w} blocked on a panicked computation"));
        if let Some(bytes) = r {
            assert_eq!(bytes, embed(&img), "{api:?}: waiter {w}");
        }
    }
    if clear_between {
        cache.clear();
    }
    serves_again(&cache, &m, &img);
    // A later panic, with nobody waiting, leaves nothing behind either.
    assert!(panicking_compute(&cache, &img, api, Duration::ZERO));
    if clear_between {
        cache.clear();
    }
    serves_again(&cache, &m, &img);
}

#[test]
fn a_computation_that_panics_does_not_block_its_image() {
    panic_then_others_go_on(Api::Infallible, false);
}

#[test]
fn a_computation_that_panics_does_not_block_its_image_after_clear() {
    panic_then_others_go_on(Api::Infallible, true);
}

#[test]
fn a_fallible_computation_that_panics_does_not_block_its_image() {
    panic_then_others_go_on(Api::Fallible, false);
}

#[test]
fn a_fallible_computation_that_panics_does_not_block_its_image_after_clear() {
    panic_then_others_go_on(Api::Fallible, true);
}

/// The simplest form: one panic, then get and get_or_insert_with from other threads.
#[test]
fn get_and_insert_after_a_panicked_computation_return() {
    let (cache, m) = cache();
    let img = vec![3u8; 500];
    assert!(panicking_compute(
        &cache,
        &img,
        Api::Infallible,
        Duration::ZERO
    ));
    let (c, i) = (cache.clone(), img.clone());
    assert!(within("get", move || c.get(&i).is_none()));
    serves_again(&cache, &m, &img);
}
