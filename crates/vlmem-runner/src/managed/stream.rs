//! The streamed path: a streamed tensor's pieces taken from the read-ahead with this
//! thread's cursor, the rest read in one request, and the kernel run piece by piece.

use super::stored::staging_buf;
use super::{ManagedWeights, manager_error};
use crate::error::{Result, RunnerError};
use crate::kernels::{self, WeightFormat};
use std::cell::RefCell;
use std::rc::Rc;
use vlmem::TensorHandle;
use vlmem::readahead::{Cursor, Streamed, phase_range};
use vlmem_core::sync::atomic::Ordering;
use vlmem_tier::IO_ALIGN_BYTES;

thread_local! {
    /// This thread's read-ahead cursors, one per read-ahead it computed with: a request
    /// runs on one thread (the engine runs each request's forward passes on the thread that
    /// asked, one request at a time), so a thread's cursor is its request's place. A
    /// thread that ends drops its cursors, which gives back what was read ahead for it.
    static CURSORS: RefCell<Vec<Rc<Cursor>>> = const { RefCell::new(Vec::new()) };
}

impl ManagedWeights {
    /// This thread's read-ahead cursor (see [`CURSORS`]).
    pub(super) fn cursor(&self) -> Rc<Cursor> {
        let found = CURSORS.try_with(|cursors| {
            let mut cursors = cursors.borrow_mut();
            if let Some(c) = cursors.iter().find(|c| c.of(&self.readahead)) {
                return c.clone();
            }
            // Cursors of read-aheads that stopped (their weights were dropped) go.
            cursors.retain(|c| !c.is_stopped());
            let c = Rc::new(self.readahead.cursor());
            cursors.push(c.clone());
            c
        });
        // While the thread's locals are torn down: a cursor for this call only.
        found.unwrap_or_else(|_| Rc::new(self.readahead.cursor()))
    }

    /// Hands a streamed tensor's bytes to `f` in order, as `(offset in the tensor, bytes)`:
    /// each piece from the staging area when read ahead (waiting for a read in flight, or one
    /// the read-ahead waits room for), and from the first piece that was not, the rest of
    /// the tensor read now in one request (what the disk serves fastest when nothing reads
    /// ahead). Nothing enters the compute tier.
    ///
    /// The cursor moves before each take, so stale buffers can go; a miss is recorded by the
    /// area, so no fill of that piece starts after it, and the cursor then moves past the
    /// tensor, so none of its later pieces is read ahead either. Forward only within a unit:
    /// a tensor used out of the planned order (read twice, or before one planned ahead of
    /// it) must not make the read-ahead fetch again what was already taken.
    fn stream_pieces(
        &self,
        name: &str,
        h: TensorHandle,
        s: &Streamed,
        mut f: impl FnMut(usize, &[u8]) -> Result<()>,
    ) -> Result<()> {
        let Some(start) = self.take_pieces(h, &mut f)? else {
            return Ok(());
        };
        let len = s.len_bytes() - start;
        let mut buf = staging_buf(name, len + IO_ALIGN_BYTES)?;
        let range = phase_range(buf.as_slice(), s.file_offset_bytes() + start as u64, len);
        let buf = &mut buf.as_mut_slice()[range];
        self.read_rest(name, h, start, buf)?;
        f(start, buf)
    }

    /// The read-ahead half of [`ManagedWeights::stream_pieces`]: hands `f` the pieces taken
    /// from the staging area with this thread's cursor ([`Cursor::take_pieces`]), in order,
    /// up to the first that was not read ahead, and returns that piece's offset in the
    /// tensor (`None`: every piece was taken). The caller reads the rest with
    /// [`ManagedWeights::read_rest`].
    pub(super) fn take_pieces(
        &self,
        h: TensorHandle,
        f: impl FnMut(usize, &[u8]) -> Result<()>,
    ) -> Result<Option<usize>> {
        self.cursor().take_pieces(h, f)
    }

    /// Reads the streamed tensor's bytes from `start` to its end into `dst` (their length),
    /// in one request, counted as staged. `dst` should be phase-aligned with the bytes' file
    /// offset ([`phase_range`]) for the disk tier to read into it directly.
    pub(super) fn read_rest(
        &self,
        name: &str,
        h: TensorHandle,
        start: usize,
        dst: &mut [u8],
    ) -> Result<()> {
        self.manager
            .read(h, start as u64, dst)
            .map_err(|e| manager_error(name, e))?;
        self.staged_bytes
            .fetch_add(dst.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Hands `f` a streamed matrix's rows in order as its pieces arrive, as `(first row,
    /// bytes of whole rows, whether they were put together)`: the rows wholly inside a
    /// piece straight from its buffer, and a row cut by a piece boundary (pieces end on
    /// aligned file offsets, not on rows) put together in a small buffer first.
    fn stream_rows(
        &self,
        name: &str,
        h: TensorHandle,
        s: &Streamed,
        (rows, cols, row_bytes): (usize, usize, usize),
        mut f: impl FnMut(usize, &[u8], bool) -> Result<()>,
    ) -> Result<()> {
        let shape_error = |found: usize| RunnerError::TensorShape {
            name: name.to_string(),
            expected: format!("{rows} rows of {row_bytes} bytes"),
            found: vec![found, cols],
        };
        let mut carry: Vec<u8> = Vec::with_capacity(row_bytes);
        self.stream_pieces(name, h, s, |start, mut bytes| {
            let mut at = start;
            if !carry.is_empty() {
                let take = (row_bytes - carry.len()).min(bytes.len());
                carry.extend_from_slice(&bytes[..take]);
                bytes = &bytes[take..];
                at += take;
                if carry.len() == row_bytes {
                    let row = at / row_bytes - 1;
                    if row >= rows {
                        return Err(shape_error(row + 1));
                    }
                    f(row, &carry, true)?;
                    carry.clear();
                }
            }
            if bytes.is_empty() {
                return Ok(());
            }
            // `at` is on a row boundary here: a carried row was completed, or the piece
            // starts one (the tensor's start, or the end of the rows before it).
            let first = at / row_bytes;
            let whole = bytes.len() / row_bytes;
            if first + whole > rows {
                return Err(shape_error(first + whole));
            }
            if whole > 0 {
                f(first, &bytes[..whole * row_bytes], false)?;
            }
            carry.extend_from_slice(&bytes[whole * row_bytes..]);
            Ok(())
        })?;
        if !carry.is_empty() {
            return Err(shape_error(rows));
        }
        Ok(())
    }

    /// `W x` for a streamed matrix, row block by row block as its pieces arrive
    /// ([`ManagedWeights::stream_rows`]).
    pub(super) fn matvec_streamed(
        &self,
        name: &str,
        h: TensorHandle,
        s: &Streamed,
        (rows, cols, ty): (usize, usize, WeightFormat),
        x: &[f32],
        y: &mut [f32],
    ) -> Result<()> {
        let row_bytes = kernels::row_bytes(ty, cols)?;
        if row_bytes == 0 || x.len() != cols || y.len() != rows {
            // Empty rows, or a wrong input or output: the kernel reports it (or fills zeros).
            return self.with_stored(name, |bytes| {
                kernels::matvec_into(bytes, ty, rows, cols, x, y)
            });
        }
        self.stream_rows(
            name,
            h,
            s,
            (rows, cols, row_bytes),
            |first, block, carried| {
                let count = block.len() / row_bytes;
                let out = &mut y[first..first + count];
                if carried {
                    kernels::matvec_into(block, ty, count, cols, x, out)
                } else {
                    self.timed(block.len(), || {
                        kernels::matvec_into(block, ty, count, cols, x, out)
                    })
                }
            },
        )
    }

    /// `X W^T` for a streamed matrix (prefill), row block by row block as its pieces
    /// arrive ([`ManagedWeights::stream_rows`]), each block's outputs written into their
    /// columns ([`kernels::gemm::gemm_cols_into`]): the same bits as the whole weight gives.
    pub(super) fn matmul_streamed(
        &self,
        name: &str,
        h: TensorHandle,
        s: &Streamed,
        (rows, cols, ty): (usize, usize, WeightFormat),
        x: &[f32],
        n: usize,
    ) -> Result<Vec<f32>> {
        let row_bytes = kernels::row_bytes(ty, cols)?;
        let fits = n.checked_mul(cols) == Some(x.len()) && n.checked_mul(rows).is_some();
        if row_bytes == 0 || n == 0 || !fits {
            // Empty rows or inputs, or a wrong input: the kernel reports it (or fills zeros).
            return self.with_stored(name, |bytes| kernels::matmul(bytes, ty, rows, cols, x, n));
        }
        let mut y = vec![0f32; n * rows];
        self.stream_rows(name, h, s, (rows, cols, row_bytes), |first, block, _| {
            let count = block.len() / row_bytes;
            kernels::gemm::gemm_cols_into(block, ty, count, cols, x, n, None, &mut y, rows, first)
        })?;
        Ok(y)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::WeightSource;
    use candle_core::Device;
    use std::sync::Arc;
    use std::time::Duration;
    use std::time::Instant;
    use vlmem::{MemoryManager, TensorKind, Tier};
    use vlmem_qwen3vl::checkpoint::Checkpoint;

    /// Two requests on one `ManagedWeights`, each on its own thread, take turns layer by
    /// layer at different places in the decode cycle (one two layers behind the other), one
    /// multiplying the streamed matrices, the other reading them whole: every product and
    /// every tensor matches the weights kept whole, and once both requests' threads are
    /// done, nothing read ahead for them holds the staging area.
    #[test]
    fn two_requests_alternating_each_read_their_bytes_and_leave_the_area_empty() {
        let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../fixtures/qwen3-vl-tiny");
        let ckpt = Checkpoint::open(&dir).unwrap();
        let manager = |host_weight_bytes: u64| {
            let mut c = vlmem::ManagerConfig::with_capacities(0, 8 << 20, 4 << 20);
            c.budgets.bytes[Tier::Host.index()][TensorKind::Weight.index()] = host_weight_bytes;
            MemoryManager::new(c).unwrap()
        };
        let whole =
            ManagedWeights::register(manager(8 << 20), &ckpt, Tier::Host, &Device::Cpu).unwrap();
        let streamed = Arc::new(
            ManagedWeights::register(manager(200 * 1024), &ckpt, Tier::Host, &Device::Cpu).unwrap(),
        );
        let layers = ckpt.config.text.num_hidden_layers as usize;
        let units = layers + 1;
        // Per unit, its streamed matrices: name, input, expected product and values.
        type Expect = (String, Vec<f32>, Vec<f32>, Vec<f32>);
        let mut per_unit: Vec<Vec<Expect>> = vec![Vec::new(); units];
        for info in streamed.streamed_tensors() {
            let name = info.name.clone();
            let cols = info.shape[1] as usize;
            let x: Vec<f32> = (0..cols)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 64.0)
                .collect();
            let y = whole.matvec(&name, &x).unwrap();
            let values = whole
                .tensor_f32(&name)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            per_unit[vlmem_qwen3vl::placement::text_layer(&name).map_or(layers, |l| l as usize)]
                .push((name, x, y, values));
        }
        assert!(per_unit.iter().filter(|u| !u.is_empty()).count() >= 2);
        let per_unit = Arc::new(per_unit);
        let turn = Arc::new((std::sync::Mutex::new(0usize), std::sync::Condvar::new()));
        let requests: Vec<_> = (0..2usize)
            .map(|r| {
                let (w, per_unit, turn) = (streamed.clone(), per_unit.clone(), turn.clone());
                std::thread::spawn(move || {
                    for step in 0..3 * units {
                        let mut t = turn.0.lock().unwrap();
                        while *t % 2 != r {
                            t = turn.1.wait(t).unwrap();
                        }
                        let l = (step + units - 2 * r) % units;
                        w.begin_layer(l, layers);
                        for (name, x, y, values) in &per_unit[l] {
                            if r == 0 {
                                let got = w.matvec(name, x).unwrap();
                                let err = got
                                    .iter()
                                    .zip(y)
                                    .map(|(a, b)| (a - b).abs())
                                    .fold(0f32, f32::max);
                                assert!(err < 1e-5, "request {r}, {name}: max-abs {err:e}");
                            } else {
                                let got = w
                                    .tensor_f32(name)
                                    .unwrap()
                                    .flatten_all()
                                    .unwrap()
                                    .to_vec1::<f32>()
                                    .unwrap();
                                assert!(&got == values, "request {r}, {name}: foreign bytes");
                            }
                        }
                        *t += 1;
                        turn.1.notify_all();
                    }
                    // The request ends once what was read ahead of its last layer landed
                    // (a reply that stops while the next token's weights are read).
                    std::thread::sleep(Duration::from_millis(100));
                })
            })
            .collect();
        for r in requests {
            r.join().unwrap();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while held_bytes(&streamed) > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
        assert_eq!(held_bytes(&streamed), 0, "{:?}", streamed.staging());
    }

    fn held_bytes(w: &ManagedWeights) -> u64 {
        w.staging().held_bytes
    }
}
