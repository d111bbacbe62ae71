//! Disjoint pieces of one buffer, written by several threads at once, and handed back whole
//! to whichever piece finishes last.
//!
//! [`split_buf`] takes a `Vec<u8>` and disjoint ranges of it and returns one [`Piece`] per
//! range. A piece gives `&mut` access to its range only and can move to another thread (a
//! reader pool reads each piece of a streamed tensor straight into its place in the one
//! buffer the kernels will read). When the last piece is dropped (after
//! [`Piece::finish`], or unread), the callback given to [`split_buf`] receives the whole
//! buffer back, with `true` when every piece was finished `ok`: exactly once, on the thread
//! that dropped the last piece.
//!
//! Invariants (the `unsafe` below relies on them; the loom model in this file checks the
//! hand-off):
//! - while any piece lives, no `Vec` owns the allocation: [`split_buf`] took it apart into
//!   its raw parts, and only the last piece to drop puts it back together;
//! - the ranges are disjoint and inside the buffer's initialized length (checked by
//!   [`split_buf`]), so two pieces never alias, and a piece's slice borrows the piece
//!   mutably (one slice per piece at a time);
//! - `remaining` counts the live pieces; each piece decrements it once, in its drop, with
//!   `AcqRel`: the decrements form one release sequence, so the piece that brings it to zero
//!   acquires every other piece's writes (and its `failed` mark) before it rebuilds the
//!   buffer, and no other piece can rebuild it.

#![allow(unsafe_code)]

use crate::sync::Arc;
use crate::sync::Mutex;
use crate::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::ops::Range;

/// What receives the whole buffer back, and whether every piece was finished `ok`.
type OnDone = Box<dyn FnOnce(Vec<u8>, bool) + Send>;

struct Shared {
    /// The raw parts of the split `Vec<u8>`.
    ptr: *mut u8,
    len: usize,
    cap: usize,
    /// Pieces not dropped yet.
    remaining: AtomicUsize,
    /// Whether a piece was dropped without `finish(true)`.
    failed: AtomicBool,
    on_done: Mutex<Option<OnDone>>,
    /// Under loom, one cell per piece stands for its bytes: a piece writes its cell, the
    /// last piece writes them all, and loom reports any pair not ordered by `remaining`.
    #[cfg(vlmem_loom)]
    cells: Vec<loom::cell::UnsafeCell<()>>,
}

// SAFETY: `ptr` is the allocation of a `Vec<u8>` (which is Send) that no `Vec` owns while the
// pieces live; each piece touches only its own disjoint range of it, and only the last piece
// rebuilds the `Vec` (module invariants), so moving the handle between threads is as safe as
// moving disjoint `&mut [u8]`s and then the `Vec`.
unsafe impl Send for Shared {}
// SAFETY: shared references to `Shared` give access to the atomics and the mutex only; the
// bytes behind `ptr` are reached through a piece (`&mut Piece`) or by the last piece alone.
unsafe impl Sync for Shared {}

/// One range of a buffer split by [`split_buf`]; see the module documentation.
pub struct Piece {
    shared: Arc<Shared>,
    index: usize,
    start: usize,
    len: usize,
    ok: bool,
}

impl std::fmt::Debug for Piece {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Piece")
            .field("index", &self.index)
            .field("range", &(self.start..self.start + self.len))
            .finish_non_exhaustive()
    }
}

/// Splits `buf` into one [`Piece`] per range of `ranges` (disjoint, within `buf.len()`, at
/// least one; empty ranges allowed). `on_done(buf, all_ok)` runs once, with the whole buffer,
/// when the last piece drops. Gives `buf` back unsplit (and drops `on_done` uncalled) when the
/// ranges are not valid.
pub fn split_buf(
    buf: Vec<u8>,
    ranges: &[Range<usize>],
    on_done: impl FnOnce(Vec<u8>, bool) + Send + 'static,
) -> Result<Vec<Piece>, Vec<u8>> {
    let mut sorted: Vec<&Range<usize>> = ranges.iter().collect();
    sorted.sort_by_key(|r| r.start);
    let valid = !ranges.is_empty()
        && ranges
            .iter()
            .all(|r| r.start <= r.end && r.end <= buf.len())
        && sorted.windows(2).all(|w| w[0].end <= w[1].start);
    if !valid {
        return Err(buf);
    }
    let mut buf = std::mem::ManuallyDrop::new(buf);
    let shared = Arc::new(Shared {
        ptr: buf.as_mut_ptr(),
        len: buf.len(),
        cap: buf.capacity(),
        remaining: AtomicUsize::new(ranges.len()),
        failed: AtomicBool::new(false),
        on_done: Mutex::new(Some(Box::new(on_done))),
        #[cfg(vlmem_loom)]
        cells: ranges
            .iter()
            .map(|_| loom::cell::UnsafeCell::new(()))
            .collect(),
    });
    Ok(ranges
        .iter()
        .enumerate()
        .map(|(index, r)| Piece {
            shared: shared.clone(),
            index,
            start: r.start,
            len: r.end - r.start,
            ok: false,
        })
        .collect())
}

impl Piece {
    /// Where the piece starts in the whole buffer.
    pub fn start(&self) -> usize {
        self.start
    }

    /// The piece's length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the piece is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The piece's bytes, to fill.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        #[cfg(vlmem_loom)]
        self.shared.cells[self.index].with_mut(|_| ());
        // SAFETY: `start..start + len` lies inside the `len` initialized bytes of the
        // allocation at `ptr` (checked by `split_buf`), no other piece's range overlaps it,
        // and no `Vec` owns the allocation while this piece lives (module invariants); the
        // slice borrows `self` mutably, so it is the only one to these bytes while it lives.
        unsafe { std::slice::from_raw_parts_mut(self.shared.ptr.add(self.start), self.len) }
    }

    /// Marks the piece done, `ok` or not, and drops it (the last one hands the buffer back).
    pub fn finish(mut self, ok: bool) {
        self.ok = ok;
    }
}

impl Drop for Piece {
    fn drop(&mut self) {
        let shared = &self.shared;
        if !self.ok {
            shared.failed.store(true, Ordering::Relaxed);
        }
        if shared.remaining.fetch_sub(1, Ordering::AcqRel) != 1 {
            return;
        }
        #[cfg(vlmem_loom)]
        for cell in &shared.cells {
            cell.with_mut(|_| ());
        }
        // SAFETY: `remaining` reached zero with this decrement: every other piece has been
        // dropped, and its writes happen before this point (the AcqRel release sequence on
        // `remaining`); only one decrement reaches zero, so the buffer is rebuilt once, from
        // the raw parts `split_buf` took from a `Vec<u8>` and never gave to another owner.
        let buf = unsafe { Vec::from_raw_parts(shared.ptr, shared.len, shared.cap) };
        let ok = !shared.failed.load(Ordering::Relaxed);
        let on_done = shared.on_done.lock().take();
        if let Some(f) = on_done {
            f(buf, ok);
        }
    }
}

#[cfg(all(test, not(any(vlmem_loom, vlmem_shuttle))))]
mod tests {
    use super::*;
    use std::sync::mpsc::channel;

    #[test]
    fn pieces_fill_one_buffer_and_the_last_hands_it_back() {
        let (tx, rx) = channel();
        let pieces = split_buf(vec![0u8; 10], &[4..10, 0..4], move |b, ok| {
            tx.send((b, ok)).unwrap()
        })
        .unwrap();
        let mut it = pieces.into_iter();
        let (mut a, mut b) = (it.next().unwrap(), it.next().unwrap());
        assert_eq!((a.start(), a.len(), b.start(), b.len()), (4, 6, 0, 4));
        a.bytes_mut().fill(2);
        b.bytes_mut().fill(1);
        a.finish(true);
        assert!(rx.try_recv().is_err(), "not before the last piece");
        b.finish(true);
        let (buf, ok) = rx.try_recv().unwrap();
        assert!(ok);
        assert_eq!(buf, [1, 1, 1, 1, 2, 2, 2, 2, 2, 2]);
    }

    #[test]
    fn an_unfinished_or_failed_piece_fails_the_whole() {
        for fail_one in [false, true] {
            let (tx, rx) = channel();
            let pieces = split_buf(vec![0u8; 8], &[0..4, 4..8, 8..8], move |b, ok| {
                tx.send((b.len(), ok)).unwrap()
            })
            .unwrap();
            for (i, p) in pieces.into_iter().enumerate() {
                if i == 1 && fail_one {
                    p.finish(false);
                } else if i == 1 {
                    drop(p); // never read
                } else {
                    p.finish(true);
                }
            }
            assert_eq!(rx.try_recv().unwrap(), (8, false));
            assert!(rx.try_recv().is_err(), "handed back once");
        }
    }

    #[test]
    fn bad_ranges_give_the_buffer_back() {
        let (past_the_end, reversed) = (0..9, Range { start: 6, end: 5 });
        for ranges in [
            vec![],
            vec![0..5, 4..8],
            vec![past_the_end, 0..1],
            vec![reversed, 0..1],
        ] {
            let buf = split_buf(vec![7u8; 8], &ranges, |_, _| panic!("not split"));
            assert_eq!(buf.unwrap_err(), vec![7u8; 8]);
        }
    }

    /// 2,000 buffers of 1-9 pieces each, the pieces read by four threads in any order
    /// (each writes its index), one piece in 37 failing: every buffer comes back exactly
    /// once, with every byte its piece wrote, `ok` exactly when no piece failed.
    #[test]
    fn pieces_on_many_threads_hand_back_every_buffer_once() {
        const BUFS: usize = 2000;
        let (done_tx, done_rx) = channel();
        let mut work = Vec::new();
        let mut expect = Vec::new();
        for n in 0..BUFS {
            let k = n % 9 + 1;
            let len = k * 16 + n % 5;
            let ranges: Vec<Range<usize>> = (0..k)
                .map(|i| i * 16..if i + 1 == k { len } else { (i + 1) * 16 })
                .collect();
            let tx = done_tx.clone();
            let pieces = split_buf(vec![0u8; len], &ranges, move |b, ok| {
                tx.send((n, b, ok)).unwrap()
            })
            .unwrap();
            let mut fails = false;
            for (i, p) in pieces.into_iter().enumerate() {
                let fail = (n * 7 + i) % 37 == 0;
                fails |= fail;
                work.push((p, i as u8, fail));
            }
            expect.push(fails);
        }
        drop(done_tx);
        // Deal the pieces out round-robin in a scrambled order.
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for i in (1..work.len()).rev() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            work.swap(i, (x % (i as u64 + 1)) as usize);
        }
        let mut shares: Vec<Vec<(Piece, u8, bool)>> = (0..4).map(|_| Vec::new()).collect();
        for (i, w) in work.into_iter().enumerate() {
            shares[i % 4].push(w);
        }
        std::thread::scope(|s| {
            for share in shares {
                s.spawn(move || {
                    for (mut p, v, fail) in share {
                        p.bytes_mut().fill(v + 1);
                        p.finish(!fail);
                    }
                });
            }
        });
        let mut seen = vec![false; BUFS];
        for (n, b, ok) in done_rx {
            assert!(!seen[n], "buffer {n} handed back twice");
            seen[n] = true;
            assert_eq!(ok, !expect[n], "buffer {n}");
            for (j, &v) in b.iter().enumerate() {
                let piece = (j / 16).min(n % 9);
                assert_eq!(v as usize, piece + 1, "buffer {n} byte {j}");
            }
        }
        assert!(seen.iter().all(|&s| s), "every buffer came back");
    }
}

#[cfg(all(test, vlmem_loom))]
mod loom_models {
    //! Run: `RUSTFLAGS="--cfg vlmem_loom" cargo test -p vlmem-tier --release --lib loom`.
    use super::*;

    /// Two pieces written and finished on two threads (one fails in the second model):
    /// in every interleaving the buffer comes back exactly once, after both writes (loom's
    /// cells report a write not ordered before the hand-off), with both pieces' bytes and
    /// `ok` exactly when both succeeded.
    fn two_pieces(second_ok: bool) {
        loom::model(move || {
            let got: Arc<Mutex<Vec<(Vec<u8>, bool)>>> = Arc::new(Mutex::new(Vec::new()));
            let sink = got.clone();
            let pieces = split_buf(vec![0u8; 4], &[0..2, 2..4], move |b, ok| {
                sink.lock().push((b, ok))
            })
            .unwrap();
            let mut it = pieces.into_iter();
            let (mut a, mut b) = (it.next().unwrap(), it.next().unwrap());
            let t = crate::sync::thread::spawn(move || {
                b.bytes_mut().fill(2);
                b.finish(second_ok);
            });
            a.bytes_mut().fill(1);
            a.finish(true);
            t.join().unwrap();
            let got = got.lock();
            assert_eq!(got.len(), 1, "handed back exactly once");
            assert_eq!(got[0].0, [1, 1, 2, 2]);
            assert_eq!(got[0].1, second_ok);
        });
    }

    #[test]
    fn loom_split_last_piece_hands_back() {
        two_pieces(true);
    }

    #[test]
    fn loom_split_a_failed_piece_is_seen_by_the_last() {
        two_pieces(false);
    }
}
