//! Weights owned by the memory manager: every checkpoint tensor is registered in place as a
//! read-only extent on the disk tier (start-up copies nothing), and each use pins it on the
//! compute tier, which brings it up through the tiers and lets the manager's weights policy
//! (the access plan in model order) decide what stays. When the compute tier has no room for
//! a tensor at all (`--host-mem 0`, or a budget smaller than one tensor), the tensor streams
//! from its fastest copy, and nothing is kept: the outputs are the same whatever the tiering.
//!
//! Streamed tensors are read ahead in pieces of about 4 MiB, each into its own buffer of a
//! small staging area (a few buffers on huge pages, reused round after round), and the
//! decode kernel multiplies each piece's rows as the piece lands: the reads land in few MiB
//! of memory, which this project's test VM's disk serves faster than reads spread over a
//! tensor-sized area (docs/BENCHMARKS.md, "Streamed tensors piece by piece").

use crate::error::{Result, RunnerError};
use crate::kernels::{self, WeightFormat};
use crate::weights::{
    WeightSource, check_expert, check_outputs, matvec_each_into, widen_into, widen_to_f32,
};
use candle_core::{Device, Tensor};
use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::rc::Rc;
use std::time::Instant;
use vlmem::readahead::{Cursor, Need, Plan, ReadAhead, Streamed, phase_range};
pub use vlmem::readahead::{ReaderActivity, STREAM_READERS};
use vlmem::{ManagerError, MemoryManager, StagingStats, TensorHandle, TensorKind, Tier};
use vlmem_core::sync::atomic::{AtomicU64, Ordering};
use vlmem_qwen3vl::checkpoint::{Checkpoint, TensorInfo};
use vlmem_qwen3vl::placement::{Home, PlanTensor, WeightPlacement, decode_units, place_weights};
use vlmem_qwen3vl::tensors::expected_tensors;
use vlmem_tier::{AlignedBuf, IO_ALIGN_BYTES};

/// Layers prefetched ahead of the one computing, unless told otherwise.
pub const DEFAULT_PREFETCH_LAYERS: usize = 2;

/// A [`WeightSource`] over a [`MemoryManager`].
pub struct ManagedWeights {
    manager: MemoryManager,
    index: HashMap<String, (TensorHandle, TensorInfo)>,
    compute_tier: Tier,
    device: Device,
    /// The read-ahead of the plan's units (streamed tensors into its staging area, kept
    /// ones to the compute tier); each request moves its own cursor ([`Self::cursor`]).
    readahead: ReadAhead,
    /// Tensors the plan neither keeps on the compute tier nor streams through the read-ahead
    /// (the vision tower or expert stacks it streams, GPU matrices asked of the CPU): read
    /// into a buffer of their own when used, never pinned.
    on_demand: HashSet<TensorHandle>,
    staged_bytes: AtomicU64,
    expert_bytes: AtomicU64,
    /// Weight bytes the decode kernels read and the nanoseconds they took (pin and staging
    /// excluded): the kernels' own read speed.
    kernel_bytes: AtomicU64,
    kernel_ns: AtomicU64,
}

/// The streaming plan of a [`ManagedWeights`] and its staging area's counters.
#[derive(Debug, Clone, Copy)]
pub struct StagingReport {
    /// The staging area's capacity (0 when every decoder weight fits the budget).
    pub capacity_bytes: u64,
    /// Decoder weight bytes the plan keeps on the compute tier.
    pub kept_bytes: u64,
    /// Decoder weight bytes the plan streams (read ahead into the area, or on demand).
    pub streamed_bytes: u64,
    /// How many tensors the plan streams.
    pub streamed_tensors: usize,
    /// How many pieces they are read in (each one read-ahead buffer).
    pub streamed_pieces: usize,
    /// The size of each read-ahead buffer (0: the area is too small, and streamed tensors
    /// are read on demand).
    pub buffer_bytes: usize,
    /// Bytes the area holds now (pieces read ahead and not taken yet, reads in flight,
    /// pieces the kernel is using).
    pub held_bytes: u64,
    /// The area's counters.
    pub stats: StagingStats,
}

thread_local! {
    /// This thread's read-ahead cursors, one per read-ahead it computed with: a request
    /// runs on one thread (the engine runs each request's forward passes on the thread that
    /// asked, one request at a time), so a thread's cursor is its request's place. A
    /// thread that ends drops its cursors, which gives back what was read ahead for it.
    static CURSORS: RefCell<Vec<Rc<Cursor>>> = const { RefCell::new(Vec::new()) };
}

impl std::fmt::Debug for ManagedWeights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ManagedWeights")
            .field("tensors", &self.index.len())
            .field("compute_tier", &self.compute_tier)
            .field("prefetch_layers", &self.prefetch_layers())
            .finish_non_exhaustive()
    }
}

/// Rows and columns of the 2-D table `name` (an embedding); a shape error otherwise.
fn table_dims(name: &str, info: &TensorInfo) -> Result<(usize, usize)> {
    match info.shape.as_slice() {
        [r, c] => Ok((usize_of(name, *r)?, usize_of(name, *c)?)),
        _ => Err(RunnerError::TensorShape {
            name: name.to_string(),
            expected: "a 2-D table".into(),
            found: info.shape.iter().map(|&d| d as usize).collect(),
        }),
    }
}

/// One input row through one expert's matrix `[a, b]`: `W x` when `transposed` (`W: [out,
/// in]`), `x W` otherwise (the released layout).
fn expert_kernel(
    bytes: &[u8],
    ty: WeightFormat,
    (a, b): (usize, usize),
    transposed: bool,
    x: &[f32],
    y: &mut [f32],
) -> Result<()> {
    if transposed {
        kernels::matvec_into(bytes, ty, a, b, x, y)
    } else {
        kernels::vecmat_into(bytes, ty, a, b, x, y)
    }
}

/// How long the weight store keeps asking for a weight that other threads keep busy. Each
/// manager call waits at most its own budget (`ManagerConfig::max_call_wait`, 2 s by
/// default) and then says [`ManagerError::Busy`], "nothing changed, retry"; the read-ahead's
/// move of a large weight (a 622 MB embedding) from a slow or shared disk can take longer
/// than one budget. Weights are read-only, so asking again is always safe.
pub const WEIGHT_BUSY_MAX: std::time::Duration = std::time::Duration::from_secs(120);

/// `call` again while it says [`ManagerError::Busy`], up to [`WEIGHT_BUSY_MAX`] in all (each
/// call waits its own budget first, so this never spins).
fn wait_out_moves<R>(
    mut call: impl FnMut() -> std::result::Result<R, ManagerError>,
) -> std::result::Result<R, ManagerError> {
    let started = Instant::now();
    loop {
        match call() {
            Err(ManagerError::Busy { .. }) if started.elapsed() < WEIGHT_BUSY_MAX => {}
            done => return done,
        }
    }
}

fn manager_error(name: &str, e: ManagerError) -> RunnerError {
    RunnerError::Weight {
        name: name.to_string(),
        source: e,
    }
}

fn weight_type(name: &str, info: &TensorInfo) -> Result<WeightFormat> {
    WeightFormat::from_dtype(info.dtype).ok_or_else(|| RunnerError::UnsupportedDtype {
        name: name.to_string(),
        dtype: info.dtype.safetensors_name().to_string(),
    })
}

/// A buffer for a tensor read on demand: page-aligned, and on huge pages when large (reads
/// into it reach the disk in few segments; see [`vlmem_tier::AlignedBuf`]).
fn staging_buf(name: &str, len: usize) -> Result<AlignedBuf> {
    AlignedBuf::new(len).map_err(|source| RunnerError::WeightBuffer {
        name: name.to_string(),
        source,
    })
}

fn usize_of(name: &str, v: u64) -> Result<usize> {
    usize::try_from(v).map_err(|_| {
        RunnerError::BadRequest(format!("tensor {name} is too large for this machine"))
    })
}

/// The checkpoint's tensors as the planner sees them.
pub fn plan_tensors(checkpoint: &Checkpoint) -> Vec<PlanTensor> {
    checkpoint
        .tensors
        .iter()
        .map(|t| PlanTensor {
            name: t.name.clone(),
            bytes: t.bytes,
            dims: t.shape.len(),
        })
        .collect()
}

impl ManagedWeights {
    /// Registers every weight of `checkpoint` with `manager` (in place, on the disk tier) and
    /// places them as the one planner does ([`vlmem_qwen3vl::placement::place_weights`]) for
    /// the compute tier's weight budget, with no GPU; see
    /// [`ManagedWeights::register_planned`]. Prefetch of the next [`DEFAULT_PREFETCH_LAYERS`]
    /// layers is on ([`ManagedWeights::set_prefetch_layers`]).
    pub fn register(
        manager: MemoryManager,
        checkpoint: &Checkpoint,
        compute_tier: Tier,
        device: &Device,
    ) -> Result<Self> {
        let budget_bytes = manager
            .stats()
            .budgets
            .get(compute_tier, TensorKind::Weight);
        let placement = place_weights(
            &checkpoint.config,
            &plan_tensors(checkpoint),
            0,
            budget_bytes,
        );
        Self::register_planned(manager, checkpoint, compute_tier, device, &placement)
    }

    /// Registers every weight of `checkpoint` with `manager` (in place, on the disk tier),
    /// gives the manager the model's access order, and executes `placement` (the engine's
    /// plan): a tensor on [`Home::Host`] is pinned on `compute_tier` when used and stays
    /// there; a decoder tensor on [`Home::Stream`] is read ahead into a staging area of
    /// `placement.staging_bytes` (or on demand) and never enters the tier; any other tensor
    /// on [`Home::Stream`] or [`Home::Gpu`] (asked of this source when a device pin fails) is
    /// read into a buffer of its own when used, so it never evicts a kept tensor. Kernels
    /// compute on `device`.
    pub fn register_planned(
        manager: MemoryManager,
        checkpoint: &Checkpoint,
        compute_tier: Tier,
        device: &Device,
        placement: &WeightPlacement,
    ) -> Result<Self> {
        let mut index = HashMap::with_capacity(checkpoint.tensors.len());
        for (i, t) in checkpoint.tensors.iter().enumerate() {
            let h = manager
                .register_extent(
                    &t.file,
                    t.file_offset_bytes,
                    t.bytes,
                    TensorKind::Weight,
                    i as u64,
                )
                .map_err(|e| manager_error(&t.name, e))?;
            index.insert(t.name.clone(), (h, t.clone()));
        }
        // Model order: vision tower, then the decoder layer by layer, then lm_head.
        let plan: Vec<TensorHandle> =
            expected_tensors(&checkpoint.config, vlmem_qwen3vl::tensors::Dtype::BF16)
                .iter()
                .filter_map(|spec| index.get(&spec.name).map(|(h, _)| *h))
                .collect();
        manager.set_access_plan(&plan);
        let home: HashMap<&str, Home> = placement
            .tensors
            .iter()
            .map(|t| (t.name.as_str(), t.tier))
            .collect();
        // A tensor the plan does not name (a placement of another checkpoint) streams.
        let home_of = |name: &str| home.get(name).copied().unwrap_or(Home::Stream);
        let names: Vec<&str> = checkpoint.tensors.iter().map(|t| t.name.as_str()).collect();
        let units: Vec<Vec<(TensorHandle, u64)>> =
            decode_units(&checkpoint.config, &plan_tensors(checkpoint))
                .into_iter()
                .map(|unit| {
                    unit.into_iter()
                        .filter(|&i| home_of(names[i]) != Home::Gpu)
                        .map(|i| (index[names[i]].0, checkpoint.tensors[i].bytes))
                        .collect()
                })
                .collect();
        let in_units: HashSet<TensorHandle> = units.iter().flatten().map(|&(h, _)| h).collect();
        let streamed: HashSet<TensorHandle> = checkpoint
            .tensors
            .iter()
            .filter(|t| home_of(&t.name) == Home::Stream)
            .map(|t| index[t.name.as_str()].0)
            .filter(|h| in_units.contains(h))
            .collect();
        let on_demand: HashSet<TensorHandle> = checkpoint
            .tensors
            .iter()
            .filter(|t| home_of(&t.name) != Home::Host)
            .map(|t| index[t.name.as_str()].0)
            .filter(|h| !in_units.contains(h))
            .collect();
        let area_bytes = if streamed.is_empty() {
            0
        } else {
            placement.staging_bytes
        };
        let budget_bytes = manager
            .stats()
            .budgets
            .get(compute_tier, TensorKind::Weight);
        let file_offsets: HashMap<TensorHandle, u64> = index
            .values()
            .map(|(h, info)| (*h, info.file_offset_bytes))
            .collect();
        let plan = Plan {
            units: units
                .iter()
                .map(|unit| {
                    unit.iter()
                        .map(|&(handle, len_bytes)| Need {
                            handle,
                            len_bytes,
                            file_offset_bytes: file_offsets.get(&handle).copied().unwrap_or(0),
                            streamed: streamed.contains(&handle),
                        })
                        .collect()
                })
                .collect(),
            area_bytes,
            budget_bytes,
        };
        let readahead =
            ReadAhead::new(manager.clone(), compute_tier, plan, DEFAULT_PREFETCH_LAYERS)
                .map_err(|e| RunnerError::BadRequest(format!("weights: {e}")))?;
        Ok(ManagedWeights {
            manager,
            index,
            compute_tier,
            device: device.clone(),
            readahead,
            on_demand,
            staged_bytes: AtomicU64::new(0),
            expert_bytes: AtomicU64::new(0),
            kernel_bytes: AtomicU64::new(0),
            kernel_ns: AtomicU64::new(0),
        })
    }

    /// The manager's handle of weight `name`.
    pub fn handle(&self, name: &str) -> Option<TensorHandle> {
        self.index.get(name).map(|(h, _)| *h)
    }

    /// The manager (for stats).
    pub fn manager(&self) -> &MemoryManager {
        &self.manager
    }

    /// Reads in flight when streamed tensors are read ahead: the reader pool's threads
    /// (default [`STREAM_READERS`]; at least 1). Takes effect when the read-ahead starts (the
    /// first layer of the first step), so set it before generating.
    pub fn set_stream_readers(&self, readers: usize) {
        self.readahead.set_readers(readers);
    }

    /// Prefetch the weights of the next `layers` layers (the final norm and lm_head count as
    /// one, and the first layers follow them, as decode cycles) when a layer starts; 0 turns
    /// prefetch off. Streamed tensors are read ahead over the next `layers` layers that
    /// stream: layers kept whole in between do not count.
    pub fn set_prefetch_layers(&self, layers: usize) {
        self.readahead.set_ahead(layers);
    }

    /// How many layers ahead are prefetched (0: off).
    pub fn prefetch_layers(&self) -> usize {
        self.readahead.ahead()
    }

    /// Weight bytes read by the decode kernels and the seconds they took, since registration.
    pub fn kernel_read(&self) -> (u64, f64) {
        (
            self.kernel_bytes.load(Ordering::Relaxed),
            self.kernel_ns.load(Ordering::Relaxed) as f64 * 1e-9,
        )
    }

    /// Rows, columns and element type of the 2-D weight `name`; a shape error otherwise.
    fn matrix(&self, name: &str) -> Result<(usize, usize, WeightFormat)> {
        let (_, info) = self.entry(name)?;
        match info.shape.as_slice() {
            [r, c] => Ok((
                usize_of(name, *r)?,
                usize_of(name, *c)?,
                weight_type(name, info)?,
            )),
            _ => Err(RunnerError::TensorShape {
                name: name.to_string(),
                expected: "a 2-D matrix".into(),
                found: info.shape.iter().map(|&d| d as usize).collect(),
            }),
        }
    }

    /// Lends the stored bytes of every weight in `names` to `f` at once (each pinned, or
    /// staged), by nesting [`ManagedWeights::with_stored`]; the borrows end with the call.
    fn lend_all<R>(
        &self,
        names: &[&str],
        held: &[&[u8]],
        f: &mut dyn FnMut(&[&[u8]]) -> Result<R>,
    ) -> Result<R> {
        match names.split_first() {
            None => f(held),
            Some((name, rest)) => self.with_stored(name, |bytes| {
                let mut inner = held.to_vec();
                inner.push(bytes);
                self.lend_all(rest, &inner, f)
            }),
        }
    }

    /// Runs a kernel over `len_bytes` of weights, counting them and its time.
    fn timed<R>(&self, len_bytes: usize, f: impl FnOnce() -> Result<R>) -> Result<R> {
        let t = Instant::now();
        let r = f();
        let ns = u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.kernel_ns.fetch_add(ns, Ordering::Relaxed);
        self.kernel_bytes
            .fetch_add(len_bytes as u64, Ordering::Relaxed);
        r
    }

    /// Bytes read from a weight's fastest copy into a staging buffer without being kept on
    /// the compute tier (tensors that do not fit it, embedding rows, expert slices). With
    /// the manager's `bytes_in` of the compute tier, this is what was streamed.
    pub fn staged_bytes(&self) -> u64 {
        self.staged_bytes.load(Ordering::Relaxed) + self.readahead.area_read_bytes()
    }

    /// The streaming plan and the staging area's counters.
    pub fn staging(&self) -> StagingReport {
        let ra = &self.readahead;
        let (mut kept_bytes, mut streamed_bytes) = (0, 0);
        for need in ra.units().iter().flatten() {
            if need.streamed {
                streamed_bytes += need.len_bytes;
            } else {
                kept_bytes += need.len_bytes;
            }
        }
        let stats = ra.stats();
        StagingReport {
            capacity_bytes: ra.capacity_bytes(),
            kept_bytes,
            streamed_bytes,
            streamed_tensors: ra.streamed_tensors(),
            streamed_pieces: ra.streamed_pieces(),
            buffer_bytes: ra.buffer_bytes(),
            held_bytes: stats.held_bytes,
            stats: stats.area,
        }
    }

    /// How busy the read-ahead's readers have been so far (zero before the first streamed
    /// layer, and when nothing streams).
    pub fn reader_activity(&self) -> ReaderActivity {
        self.readahead.reader_activity()
    }

    /// The weights the plan streams, in use order (layer by layer, each layer's tensors in
    /// the order the forward pass takes them): what a decode step reads from the disk.
    pub fn streamed_tensors(&self) -> Vec<&TensorInfo> {
        let by_handle: HashMap<TensorHandle, &TensorInfo> =
            self.index.values().map(|(h, info)| (*h, info)).collect();
        self.readahead
            .units()
            .iter()
            .flatten()
            .filter(|need| need.streamed)
            .filter_map(|need| by_handle.get(&need.handle).copied())
            .collect()
    }

    /// Bytes of fused expert tensors read (routed experts' slices only).
    pub fn expert_bytes(&self) -> u64 {
        self.expert_bytes.load(Ordering::Relaxed)
    }

    /// Prefetch hints given to the manager.
    pub fn prefetch_hints(&self) -> u64 {
        self.readahead.hints()
    }

    /// This thread's read-ahead cursor (see [`CURSORS`]).
    fn cursor(&self) -> Rc<Cursor> {
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

    fn entry(&self, name: &str) -> Result<&(TensorHandle, TensorInfo)> {
        self.index
            .get(name)
            .ok_or_else(|| RunnerError::MissingTensor {
                name: name.to_string(),
            })
    }

    /// Lends the tensor's stored bytes to `f`: pinned on the compute tier when it fits
    /// there (no copy), else read from its fastest copy into a staging buffer the size of
    /// the tensor, which is dropped afterwards (a streamed tensor's pieces are gathered into
    /// it from the read-ahead, [`ManagedWeights::take_pieces`], and the rest read in place).
    fn with_stored<R>(&self, name: &str, f: impl FnOnce(&[u8]) -> Result<R>) -> Result<R> {
        let (h, info) = self.entry(name)?;
        if let Some(s) = self.readahead.streamed(*h) {
            // One buffer for the whole tensor, phase-aligned with its file offset: pieces read
            // ahead are copied in, and from the first that was not, the rest is read straight
            // into place (O_DIRECT, no second copy).
            let len = usize_of(name, info.bytes)?;
            let mut whole = staging_buf(name, len + IO_ALIGN_BYTES)?;
            let range = phase_range(whole.as_slice(), s.file_offset_bytes(), len);
            let bytes = &mut whole.as_mut_slice()[range];
            let rest = self.take_pieces(*h, |start, piece| {
                bytes[start..start + piece.len()].copy_from_slice(piece);
                Ok(())
            })?;
            if let Some(start) = rest {
                self.read_rest(name, *h, start, &mut bytes[start..])?;
            }
            return f(bytes);
        }
        if self.on_demand.contains(h) {
            return self.with_read(name, *h, info.bytes, f);
        }
        match wait_out_moves(|| self.manager.pin(*h, self.compute_tier)) {
            Ok(guard) => guard.with_bytes(f).map_err(|e| manager_error(name, e))?,
            Err(ManagerError::TooLarge { .. } | ManagerError::OutOfMemory { .. }) => {
                self.with_read(name, *h, info.bytes, f)
            }
            Err(e) => Err(manager_error(name, e)),
        }
    }

    /// Reads the tensor from its fastest copy into a buffer of its own and lends it to `f`;
    /// nothing enters the compute tier.
    fn with_read<R>(
        &self,
        name: &str,
        h: TensorHandle,
        len_bytes: u64,
        f: impl FnOnce(&[u8]) -> Result<R>,
    ) -> Result<R> {
        let mut staging = staging_buf(name, usize_of(name, len_bytes)?)?;
        wait_out_moves(|| self.manager.read(h, 0, staging.as_mut_slice()))
            .map_err(|e| manager_error(name, e))?;
        self.staged_bytes.fetch_add(len_bytes, Ordering::Relaxed);
        f(staging.as_slice())
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
    fn take_pieces(
        &self,
        h: TensorHandle,
        f: impl FnMut(usize, &[u8]) -> Result<()>,
    ) -> Result<Option<usize>> {
        self.cursor().take_pieces(h, f)
    }

    /// Reads the streamed tensor's bytes from `start` to its end into `dst` (their length),
    /// in one request, counted as staged. `dst` should be phase-aligned with the bytes' file
    /// offset ([`phase_range`]) for the disk tier to read into it directly.
    fn read_rest(&self, name: &str, h: TensorHandle, start: usize, dst: &mut [u8]) -> Result<()> {
        self.manager
            .read(h, start as u64, dst)
            .map_err(|e| manager_error(name, e))?;
        self.staged_bytes
            .fetch_add(dst.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// `W x` for a streamed matrix, row block by row block as its pieces arrive: the rows
    /// wholly inside a piece are multiplied from its buffer, and a row cut by a piece
    /// boundary (pieces end on aligned file offsets, not on rows) is put together in a
    /// small buffer first.
    fn matvec_streamed(
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
                    kernels::matvec_into(&carry, ty, 1, cols, x, &mut y[row..row + 1])?;
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
                return Err(RunnerError::TensorShape {
                    name: name.to_string(),
                    expected: format!("{rows} rows of {row_bytes} bytes"),
                    found: vec![first + whole, cols],
                });
            }
            if whole > 0 {
                let block = &bytes[..whole * row_bytes];
                let out = &mut y[first..first + whole];
                self.timed(block.len(), || {
                    kernels::matvec_into(block, ty, whole, cols, x, out)
                })?;
            }
            carry.extend_from_slice(&bytes[whole * row_bytes..]);
            Ok(())
        })?;
        if !carry.is_empty() {
            return Err(RunnerError::TensorShape {
                name: name.to_string(),
                expected: format!("{rows} rows of {row_bytes} bytes"),
                found: vec![rows, cols],
            });
        }
        Ok(())
    }

    /// Reads `len` bytes at `offset` of `name`: from its copy on the compute tier when it has
    /// one, else from its fastest copy into the buffer (counted as staged). Nothing moves.
    fn read_range(&self, name: &str, offset: u64, len: usize) -> Result<Vec<u8>> {
        let (h, _) = self.entry(name)?;
        let mut buf = vec![0u8; len];
        let on_compute_tier = self
            .manager
            .residency(*h)
            .is_ok_and(|(tiers, _)| tiers.contains(&self.compute_tier));
        if on_compute_tier
            && let Ok(guard) = wait_out_moves(|| self.manager.pin(*h, self.compute_tier))
        {
            guard
                .read(offset, &mut buf)
                .map_err(|e| manager_error(name, e))?;
            return Ok(buf);
        }
        wait_out_moves(|| self.manager.read(*h, offset, &mut buf))
            .map_err(|e| manager_error(name, e))?;
        self.staged_bytes.fetch_add(len as u64, Ordering::Relaxed);
        Ok(buf)
    }

    /// The stored bytes of matrix `expert` of the stack `name`, and its two dimensions.
    fn expert_slice(
        &self,
        name: &str,
        expert: usize,
    ) -> Result<(Vec<u8>, WeightFormat, usize, usize)> {
        let (_, info) = self.entry(name)?;
        let shape: Vec<usize> = info
            .shape
            .iter()
            .map(|&d| usize_of(name, d))
            .collect::<Result<_>>()?;
        check_expert(name, &shape, expert)?;
        let ty = weight_type(name, info)?;
        let (a, b) = (shape[1], shape[2]);
        let slice = kernels::matrix_bytes(ty, a, b)?;
        let bytes = self.read_range(name, (expert * slice) as u64, slice)?;
        self.expert_bytes.fetch_add(slice as u64, Ordering::Relaxed);
        Ok((bytes, ty, a, b))
    }
}

impl WeightSource for ManagedWeights {
    fn tensor_f32(&self, name: &str) -> Result<Tensor> {
        let (_, info) = self.entry(name)?;
        let values = self.with_stored(name, |bytes| widen_to_f32(name, info.dtype, bytes))?;
        let shape: Vec<usize> = info.shape.iter().map(|&d| d as usize).collect();
        Ok(Tensor::from_vec(values, shape, &self.device)?)
    }

    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.index
            .get(name)
            .map(|(_, t)| t.shape.iter().map(|&d| d as usize).collect())
    }

    /// Reads only the rows asked for, from the table's fastest copy.
    fn rows_f32(&self, name: &str, ids: &[u32]) -> Result<Tensor> {
        let (_, info) = self.entry(name)?;
        let (_, cols) = table_dims(name, info)?;
        let mut values = vec![0f32; ids.len() * cols];
        for (position, &id) in ids.iter().enumerate() {
            let out = &mut values[position * cols..(position + 1) * cols];
            self.row_into(name, id, out).map_err(|e| match e {
                RunnerError::TokenOutOfVocab { id, vocab_size, .. } => {
                    RunnerError::TokenOutOfVocab {
                        id,
                        position,
                        vocab_size,
                    }
                }
                other => other,
            })?;
        }
        Ok(Tensor::from_vec(values, (ids.len(), cols), &self.device)?)
    }

    /// The bf16 kernel on the stored bytes (pinned in place, or staged when they do not fit).
    fn matvec(&self, name: &str, x: &[f32]) -> Result<Vec<f32>> {
        let (rows, _, _) = self.matrix(name)?;
        let mut y = vec![0f32; rows];
        self.matvec_into(name, x, &mut y)?;
        Ok(y)
    }

    fn matvec_into(&self, name: &str, x: &[f32], y: &mut [f32]) -> Result<()> {
        let (rows, cols, ty) = self.matrix(name)?;
        let (h, _) = self.entry(name)?;
        if let Some(s) = self.readahead.streamed(*h) {
            return self.matvec_streamed(name, *h, s, (rows, cols, ty), x, y);
        }
        self.with_stored(name, |bytes| {
            self.timed(bytes.len(), || {
                kernels::matvec_into(bytes, ty, rows, cols, x, y)
            })
        })
    }

    fn matvec_many(&self, names: &[&str], x: &[f32]) -> Result<Vec<Vec<f32>>> {
        let mut ys = names
            .iter()
            .map(|name| Ok(vec![0f32; self.matrix(name)?.0]))
            .collect::<Result<Vec<_>>>()?;
        let mut views: Vec<&mut [f32]> = ys.iter_mut().map(|y| y.as_mut_slice()).collect();
        self.matvec_many_into(names, x, &mut views)?;
        Ok(ys)
    }

    /// The kernels on the stored bytes of all the weights at once (each pinned, or staged),
    /// in one parallel pass; one at a time when they differ in input width or one of them is
    /// streamed.
    fn matvec_many_into(&self, names: &[&str], x: &[f32], ys: &mut [&mut [f32]]) -> Result<()> {
        check_outputs(names.len(), ys.len())?;
        let mats = names
            .iter()
            .map(|name| self.matrix(name))
            .collect::<Result<Vec<_>>>()?;
        let cols = mats.first().map_or(0, |m| m.1);
        // Streamed weights go one at a time: the read-ahead thread fills them in order while
        // each computes, and taking several back to back would outrun it (each would then be
        // read a second time on demand). They are disk-bound: a fused pass buys nothing there.
        let streamed = names.iter().any(|n| {
            self.index
                .get(*n)
                .is_some_and(|(h, _)| self.readahead.streamed(*h).is_some())
        });
        if streamed || names.len() > 3 || mats.iter().any(|m| m.1 != cols) {
            return matvec_each_into(self, names, x, ys);
        }
        let mut run = |bytes: &[&[u8]]| -> Result<()> {
            let refs: Vec<(&[u8], WeightFormat, usize)> = bytes
                .iter()
                .zip(&mats)
                .map(|(b, &(rows, _, ty))| (*b, ty, rows))
                .collect();
            let total: usize = bytes.iter().map(|b| b.len()).sum();
            self.timed(total, || kernels::matvec_many_into(&refs, cols, x, ys))
        };
        self.lend_all(names, &[], &mut run)
    }

    /// The kernel on the stored bytes for a few input rows (a short prefill).
    fn matmul(&self, name: &str, x: &[f32], n: usize) -> Result<Vec<f32>> {
        let (rows, cols, ty) = self.matrix(name)?;
        self.with_stored(name, |bytes| kernels::matmul(bytes, ty, rows, cols, x, n))
    }

    fn expert_f32(&self, name: &str, expert: usize) -> Result<Tensor> {
        let (_, info) = self.entry(name)?;
        let (bytes, _, a, b) = self.expert_slice(name, expert)?;
        let values = widen_to_f32(name, info.dtype, &bytes)?;
        Ok(Tensor::from_vec(values, (a, b), &self.device)?)
    }

    fn expert_matvec(
        &self,
        name: &str,
        expert: usize,
        transposed: bool,
        x: &[f32],
    ) -> Result<Vec<f32>> {
        let (bytes, ty, a, b) = self.expert_slice(name, expert)?;
        let mut y = vec![0f32; if transposed { a } else { b }];
        self.timed(bytes.len(), || {
            expert_kernel(&bytes, ty, (a, b), transposed, x, &mut y)
        })?;
        Ok(y)
    }

    fn expert_matvec_into(
        &self,
        name: &str,
        expert: usize,
        transposed: bool,
        x: &[f32],
        y: &mut [f32],
    ) -> Result<()> {
        let (bytes, ty, a, b) = self.expert_slice(name, expert)?;
        self.timed(bytes.len(), || {
            expert_kernel(&bytes, ty, (a, b), transposed, x, y)
        })
    }

    /// Widens the stored bytes (pinned in place, or staged) straight into `out`.
    fn values_into(&self, name: &str, out: &mut [f32]) -> Result<()> {
        let (_, info) = self.entry(name)?;
        self.with_stored(name, |bytes| widen_into(name, info.dtype, bytes, out))
    }

    /// Reads only that row, from the table's fastest copy.
    fn row_into(&self, name: &str, id: u32, out: &mut [f32]) -> Result<()> {
        let (_, info) = self.entry(name)?;
        let (rows, cols) = table_dims(name, info)?;
        if id as usize >= rows {
            return Err(RunnerError::TokenOutOfVocab {
                id,
                position: 0,
                vocab_size: rows,
            });
        }
        let row_bytes = kernels::row_bytes(weight_type(name, info)?, cols)?;
        let bytes = self.read_range(name, id as u64 * row_bytes as u64, row_bytes)?;
        widen_into(name, info.dtype, &bytes, out)
    }

    /// Moves this thread's read-ahead cursor to `layer` (`layer == layers`: the final
    /// unit), so the read-ahead (started on first use) brings the next layers' weights while
    /// this one computes.
    fn begin_layer(&self, layer: usize, layers: usize) {
        if layers + 1 != self.readahead.units().len() {
            return;
        }
        self.cursor().begin_unit(layer);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

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
