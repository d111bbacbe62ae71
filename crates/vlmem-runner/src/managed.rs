//! Weights owned by the memory manager: every checkpoint tensor is registered in place as a
//! read-only extent on the disk tier (start-up copies nothing), and each use pins it on the
//! compute tier, which brings it up through the tiers and lets the manager's weights policy
//! (the access plan in model order) decide what stays. When the compute tier has no room for
//! a tensor at all (`--host-mem 0`, or a budget smaller than one tensor), the tensor streams
//! from its fastest copy through a staging buffer the size of that tensor, and nothing is
//! kept: the outputs are the same whatever the tiering.

use crate::error::{Result, RunnerError};
use crate::kernels::{self, WeightType};
use crate::text::{EMBED_TOKENS, LM_HEAD};
use crate::weights::{WeightSource, check_expert, widen_to_f32};
use candle_core::{Device, Tensor};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use vlmem::{
    ManagerError, MemoryManager, StagingArea, StagingStats, TensorHandle, TensorKind, Tier,
};
use vlmem_qwen3vl::checkpoint::{Checkpoint, TensorInfo};
use vlmem_qwen3vl::tensors::expected_tensors;
use vlmem_tier::IO_ALIGN_BYTES;

/// Layers prefetched ahead of the one computing, unless told otherwise.
pub const DEFAULT_PREFETCH_LAYERS: usize = 2;

/// The staging area's smallest size when the weights do not all fit: enough for a few of a
/// 2B model's largest layer tensors, so the disk never waits for the compute to give a
/// buffer back.
const MIN_STAGING_BYTES: u64 = 64 << 20;

/// A [`WeightSource`] over a [`MemoryManager`].
pub struct ManagedWeights {
    manager: MemoryManager,
    index: HashMap<String, (TensorHandle, TensorInfo)>,
    compute_tier: Tier,
    device: Device,
    prefetch: Arc<PrefetchShared>,
    prefetcher: Mutex<Option<(Sender<usize>, JoinHandle<()>)>>,
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
    /// The area's counters.
    pub stats: StagingStats,
}

/// What the prefetch thread shares with the compute thread.
struct PrefetchShared {
    manager: MemoryManager,
    tier: Tier,
    /// Per decoder layer, then one unit for the final norm and lm_head, in use order: the
    /// handles (and sizes) a prefetch of that unit hints. Fused expert stacks are left out:
    /// decode reads only the routed experts' slices of them.
    units: Vec<Vec<(TensorHandle, u64)>>,
    /// The compute tier's weight budget when registered: larger tensors are never hinted.
    budget_bytes: u64,

    /// The bounded staging area streamed tensors are read ahead into.
    area: StagingArea<TensorHandle>,
    /// Bytes read into `area`.
    area_read_bytes: AtomicU64,
    ahead: AtomicUsize,
    /// Where the compute thread is: its unit in the high 32 bits, and in the low 32 bits one
    /// more than the index (within the unit) of the last streamed tensor it asked for (0:
    /// none yet in this unit).
    cursor: AtomicU64,
    /// The tensors the plan does not keep on the compute tier, with their unit and index
    /// among the unit's streamed tensors: they are read ahead into `area` (or read on
    /// demand) and never enter the tier, so they never evict a kept tensor.
    /// (And each one's offset in its checkpoint file, for reads with no copy.)
    positions: HashMap<TensorHandle, (usize, usize, u64)>,
    hints: AtomicU64,
}

impl PrefetchShared {
    fn on_tier(&self, h: TensorHandle) -> bool {
        self.manager
            .residency(h)
            .is_ok_and(|(tiers, _)| tiers.contains(&self.tier))
    }

    /// How many units unit `u` lies ahead of the compute thread (0: it is computing it), and
    /// the compute thread's position in its unit (see `cursor`).
    fn distance(&self, u: usize) -> (usize, usize) {
        let n = self.units.len();
        let c = self.cursor.load(Ordering::Acquire);
        let (cur, at) = ((c >> 32) as usize, (c & 0xffff_ffff) as usize);
        ((u + n - cur % n) % n, at)
    }

    /// Whether unit `u` is still ahead of the compute thread, within the lookahead.
    fn still_ahead(&self, u: usize) -> bool {
        let (dist, _) = self.distance(u);
        dist > 0 && dist <= self.ahead.load(Ordering::Relaxed)
    }

    /// Whether streamed tensor `i` of unit `u` is still to be asked for by the compute
    /// thread, within the lookahead: worth reading ahead.
    fn wanted(&self, u: usize, i: usize) -> bool {
        match self.distance(u) {
            (0, at) => i >= at,
            (dist, _) => dist <= self.ahead.load(Ordering::Relaxed),
        }
    }

    /// Whether a staged buffer of tensor `i` of unit `u` will not be taken any more: the
    /// compute thread has passed it (the one it is asking for now is not stale).
    fn stale(&self, u: usize, i: usize) -> bool {
        match self.distance(u) {
            (0, at) => i + 1 < at,
            (dist, _) => dist > self.ahead.load(Ordering::Relaxed),
        }
    }

    /// Reads streamed tensor `h` (index `i` of unit `u`) into the staging area, if the area
    /// has (or gets) room before the compute thread asks for it.
    fn stage(&self, h: TensorHandle, u: usize, i: usize, bytes: u64, file_offset: u64) {
        let Ok(len) = usize::try_from(bytes) else {
            return;
        };
        let Some(mut buf) = self.area.begin_fill(
            h,
            len + IO_ALIGN_BYTES,
            || self.wanted(u, i),
            |tag| self.stale((tag >> 32) as usize, (tag & 0xffff_ffff) as usize),
        ) else {
            return;
        };
        let tag = ((u as u64) << 32) | i as u64;
        let range = phase_range(&buf, file_offset, len);
        let ok = read_parallel(&self.manager, h, &mut buf[range.clone()]);
        if ok {
            self.area_read_bytes.fetch_add(bytes, Ordering::Relaxed);
            self.hints.fetch_add(1, Ordering::Relaxed);
        }
        // A failed read publishes nothing: the compute thread reads the tensor itself and
        // reports the error.
        self.area.finish_fill(h, tag, buf, range, ok);
    }

    /// The prefetch thread: for each layer start (the latest one when several queued), hints
    /// the next layers' tensors one at a time, each after checking the compute thread has
    /// not reached its layer yet and that it is not on the tier already, and waits for it to
    /// land before the next. One hint in flight keeps a late hint from loading a tensor that
    /// was already used (and evicted), and prefetches from racing each other's evictions.
    fn run(&self, rx: &Receiver<usize>) {
        while let Ok(mut layer) = rx.recv() {
            while let Ok(l) = rx.try_recv() {
                layer = l;
            }
            let n = self.units.len();
            let ahead = self.ahead.load(Ordering::Relaxed).min(n.saturating_sub(1));
            // Streamed tensors from the rest of the current unit on (the compute thread may
            // have caught up with the reads: it then waits for each instead of reading it a
            // second time), kept ones from the next unit on.
            'units: for step in 0..=ahead {
                let u = (layer + step) % n;
                for &(h, bytes) in &self.units[u] {
                    if self.distance(u).0 > ahead {
                        break 'units;
                    }
                    if let Some(&(_, i, offset)) = self.positions.get(&h) {
                        if self.wanted(u, i) {
                            self.stage(h, u, i, bytes, offset);
                        }
                        continue;
                    }
                    if step == 0 {
                        continue;
                    }
                    if !self.still_ahead(u) {
                        break 'units;
                    }
                    if bytes > self.budget_bytes || self.on_tier(h) {
                        continue;
                    }
                    self.manager.prefetch(h, self.tier);
                    self.hints.fetch_add(1, Ordering::Relaxed);
                    let started = Instant::now();
                    while !self.on_tier(h)
                        && self.still_ahead(u)
                        && started.elapsed() < Duration::from_millis(500)
                    {
                        std::thread::sleep(Duration::from_micros(200));
                    }
                }
            }
        }
    }
}

/// The `len` bytes of `buf` (which has [`IO_ALIGN_BYTES`] to spare) whose address is
/// congruent to `file_offset` modulo [`IO_ALIGN_BYTES`]: the disk tier then reads the
/// tensor's aligned middle straight into them with O_DIRECT, with no copy.
fn phase_range(buf: &[u8], file_offset: u64, len: usize) -> std::ops::Range<usize> {
    let align = IO_ALIGN_BYTES;
    let want = (file_offset % align as u64) as usize;
    let have = buf.as_ptr() as usize % align;
    let start = (want + align - have) % align;
    start..start + len
}

/// Bytes per read of a streamed tensor: the request size this kind of disk serves fastest
/// (../shared/research/peers.md: `dd iflag=direct` at 4 MiB beat 1, 16 and 64 MiB).
const STREAM_READ_BYTES: usize = 4 << 20;

/// Threads reading one streamed tensor's pieces at once (reads in flight). Measured on the
/// 2-vCPU VM: 1 reader 0.77 GB/s while reading, 2: 0.82-1.01, 3: 0.98, 4: 0.62-0.90 (the
/// disk's own dd figure moved between 0.8 and 1.9 GB/s during those runs).
const STREAM_READERS: usize = 2;

/// Reads all of `h` into `buf` in [`STREAM_READ_BYTES`] pieces from [`STREAM_READERS`]
/// threads (this one and scoped helpers), so that many reads are in flight: the disk sees a
/// deeper queue, and one reader's turnaround between pieces overlaps the others' waits.
/// Returns whether every piece was read.
fn read_parallel(manager: &MemoryManager, h: TensorHandle, buf: &mut [u8]) -> bool {
    let readers = STREAM_READERS;
    if buf.len() < 2 * STREAM_READ_BYTES {
        return manager.read(h, 0, buf).is_ok();
    }
    let read_pieces = |pieces: Vec<(usize, &mut [u8])>| {
        pieces.into_iter().all(|(k, piece)| {
            manager
                .read(h, (k * STREAM_READ_BYTES) as u64, piece)
                .is_ok()
        })
    };
    // Piece k to reader k mod readers; reader 0 is this thread.
    let mut groups: Vec<Vec<(usize, &mut [u8])>> = (0..readers).map(|_| Vec::new()).collect();
    for (k, piece) in buf.chunks_mut(STREAM_READ_BYTES).enumerate() {
        groups[k % readers].push((k, piece));
    }
    let mine = groups.remove(0);
    std::thread::scope(|scope| {
        let helpers: Vec<_> = groups
            .into_iter()
            .map(|g| {
                std::thread::Builder::new()
                    .name("vlmem-stream".into())
                    .spawn_scoped(scope, move || read_pieces(g))
            })
            .collect();
        let mut ok = read_pieces(mine);
        for helper in helpers {
            // A helper that could not start leaves its pieces unread: the fill fails and the
            // compute thread reads the tensor itself.
            ok &= helper.is_ok_and(|h| h.join().unwrap_or(false));
        }
        ok
    })
}

/// The streaming plan for a compute-tier weight budget: when the decoder's tensors do not all
/// fit, a staging area of `max(64 MiB, 2 x the largest layer tensor)` (at most a quarter of the
/// budget) is set apart, and the rest of the budget keeps tensors in this order: the final
/// unit (norm and lm_head: the largest tensor, the hardest to read ahead behind compute),
/// then layers from the first. Everything else is streamed: read ahead into the area, or on
/// demand. The plan does not depend on the prefetch depth, so runs with and without
/// prefetch read the same bytes. Returns the area's capacity and the streamed handles.
fn plan_streaming(
    units: &[Vec<(TensorHandle, u64)>],
    budget_bytes: u64,
) -> (u64, HashSet<TensorHandle>) {
    let total: u64 = units.iter().flatten().map(|&(_, b)| b).sum();
    if total <= budget_bytes {
        return (0, HashSet::new());
    }
    let layers = units.len().saturating_sub(1);
    let largest = units[..layers]
        .iter()
        .flatten()
        .map(|&(_, b)| b)
        .max()
        .unwrap_or(0);
    let area = MIN_STAGING_BYTES
        .max(largest.saturating_mul(2))
        .min(budget_bytes / 4);
    let mut room = budget_bytes - area;
    let mut streamed = HashSet::new();
    let order = units.len().checked_sub(1).into_iter().chain(0..layers);
    for u in order {
        for &(h, bytes) in &units[u] {
            if bytes <= room {
                room -= bytes;
            } else {
                streamed.insert(h);
            }
        }
    }
    (area, streamed)
}

/// Use order of a decoder layer's tensors (attention, then the MLP).
fn use_order(name: &str) -> usize {
    const ORDER: [&str; 12] = [
        "input_layernorm",
        "q_proj",
        "k_proj",
        "v_proj",
        "q_norm",
        "k_norm",
        "o_proj",
        "post_attention_layernorm",
        "mlp.gate.",
        "gate_proj",
        "up_proj",
        "down_proj",
    ];
    ORDER
        .iter()
        .position(|k| name.contains(k))
        .unwrap_or(ORDER.len())
}

impl Drop for ManagedWeights {
    fn drop(&mut self) {
        let worker = self
            .prefetcher
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        // Close the area first: the thread may be waiting in it for room.
        self.prefetch.area.close();
        if let Some((tx, handle)) = worker {
            drop(tx);
            let _ = handle.join();
        }
    }
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

fn manager_error(name: &str, e: ManagerError) -> RunnerError {
    RunnerError::Weights(format!("{name}: {e}"))
}

fn weight_type(name: &str, info: &TensorInfo) -> Result<WeightType> {
    WeightType::from_dtype(info.dtype).ok_or_else(|| RunnerError::UnsupportedDtype {
        name: name.to_string(),
        dtype: info.dtype.safetensors_name().to_string(),
    })
}

fn usize_of(name: &str, v: u64) -> Result<usize> {
    usize::try_from(v).map_err(|_| {
        RunnerError::BadRequest(format!("tensor {name} is too large for this machine"))
    })
}

/// The decoder layer a tensor name belongs to (`model.language_model.layers.N.`).
fn text_layer(name: &str) -> Option<usize> {
    let rest = name.strip_prefix("model.language_model.layers.")?;
    rest.split('.').next()?.parse().ok()
}

impl ManagedWeights {
    /// Registers every weight of `checkpoint` with `manager` (in place, on the disk tier) and
    /// gives the manager the model's access order. Tensors are pinned on `compute_tier`
    /// (the host tier for CPU compute) and staged on `device`. Prefetch of the next
    /// [`DEFAULT_PREFETCH_LAYERS`] layers is on ([`ManagedWeights::set_prefetch_layers`]).
    pub fn register(
        manager: MemoryManager,
        checkpoint: &Checkpoint,
        compute_tier: Tier,
        device: &Device,
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
        let layers = checkpoint.config.text.num_hidden_layers as usize;
        let mut units: Vec<Vec<(TensorHandle, u64)>> = vec![Vec::new(); layers + 1];
        let mut names: Vec<&String> = index.keys().collect();
        names.sort_by_key(|n| (use_order(n), n.to_string()));
        for name in names {
            let (h, info) = &index[name];
            match text_layer(name) {
                Some(l) if l < layers && !name.contains(".mlp.experts.") => {
                    units[l].push((*h, info.bytes))
                }
                _ => {}
            }
        }
        let head = if checkpoint.config.text.tie_word_embeddings {
            EMBED_TOKENS
        } else {
            LM_HEAD
        };
        for name in ["model.language_model.norm.weight", head] {
            if let Some((h, info)) = index.get(name) {
                units[layers].push((*h, info.bytes));
            }
        }
        let budget_bytes = manager
            .stats()
            .budgets
            .get(compute_tier, TensorKind::Weight);
        let (area_bytes, streamed) = plan_streaming(&units, budget_bytes);
        let mut positions = HashMap::new();
        for (u, unit) in units.iter().enumerate() {
            for (i, &(h, _)) in unit
                .iter()
                .filter(|(h, _)| streamed.contains(h))
                .enumerate()
            {
                let offset = index
                    .values()
                    .find(|(hh, _)| *hh == h)
                    .map_or(0, |(_, info)| info.file_offset_bytes);
                positions.insert(h, (u, i, offset));
            }
        }
        let prefetch = Arc::new(PrefetchShared {
            manager: manager.clone(),
            tier: compute_tier,
            units,
            budget_bytes,
            positions,
            area: StagingArea::new(area_bytes),
            area_read_bytes: AtomicU64::new(0),
            ahead: AtomicUsize::new(DEFAULT_PREFETCH_LAYERS),
            cursor: AtomicU64::new(0),
            hints: AtomicU64::new(0),
        });
        Ok(ManagedWeights {
            manager,
            index,
            compute_tier,
            device: device.clone(),
            prefetch,
            prefetcher: Mutex::new(None),
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

    /// Prefetch the weights of the next `layers` layers (the final norm and lm_head count as
    /// one, and the first layers follow them, as decode cycles) when a layer starts; 0 turns
    /// prefetch off.
    pub fn set_prefetch_layers(&self, layers: usize) {
        self.prefetch.ahead.store(layers, Ordering::Relaxed);
    }

    /// How many layers ahead are prefetched (0: off).
    pub fn prefetch_layers(&self) -> usize {
        self.prefetch.ahead.load(Ordering::Relaxed)
    }

    /// Weight bytes read by the decode kernels and the seconds they took, since registration.
    pub fn kernel_read(&self) -> (u64, f64) {
        (
            self.kernel_bytes.load(Ordering::Relaxed),
            self.kernel_ns.load(Ordering::Relaxed) as f64 * 1e-9,
        )
    }

    /// Rows, columns and element type of the 2-D weight `name`; a shape error otherwise.
    fn matrix(&self, name: &str) -> Result<(usize, usize, WeightType)> {
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
        self.staged_bytes.load(Ordering::Relaxed)
            + self.prefetch.area_read_bytes.load(Ordering::Relaxed)
    }

    /// The streaming plan and the staging area's counters.
    pub fn staging(&self) -> StagingReport {
        let p = &self.prefetch;
        let (mut kept_bytes, mut streamed_bytes) = (0, 0);
        for &(h, bytes) in p.units.iter().flatten() {
            if p.positions.contains_key(&h) {
                streamed_bytes += bytes;
            } else {
                kept_bytes += bytes;
            }
        }
        StagingReport {
            capacity_bytes: p.area.capacity_bytes(),
            kept_bytes,
            streamed_bytes,
            streamed_tensors: p.positions.len(),
            stats: p.area.stats(),
        }
    }

    /// Bytes of fused expert tensors read (routed experts' slices only).
    pub fn expert_bytes(&self) -> u64 {
        self.expert_bytes.load(Ordering::Relaxed)
    }

    /// Prefetch hints given to the manager.
    pub fn prefetch_hints(&self) -> u64 {
        self.prefetch.hints.load(Ordering::Relaxed)
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
    /// the tensor, which is dropped afterwards.
    fn with_stored<R>(&self, name: &str, f: impl FnOnce(&[u8]) -> Result<R>) -> Result<R> {
        let (h, info) = self.entry(name)?;
        if let Some(&(u, i, offset)) = self.prefetch.positions.get(h) {
            // Not kept: from the staging area when read ahead, else read now; either way it
            // does not enter the compute tier. The cursor moves first, so the read-ahead
            // thread never starts this tensor once it has been asked for.
            // Forward only within a unit: a tensor used out of the planned order (read twice,
            // or before one planned ahead of it) must not make the read-ahead thread fetch
            // again what was already taken.
            let c = self.prefetch.cursor.load(Ordering::Acquire);
            let next = ((u as u64) << 32) | (i as u64 + 1);
            if c >> 32 != u as u64 || c < next {
                self.prefetch.cursor.store(next, Ordering::Release);
            }
            if let Some(staged) = self.prefetch.area.take(*h) {
                return f(&staged);
            }
            let len = usize_of(name, info.bytes)?;
            let mut staging = vec![0u8; len + IO_ALIGN_BYTES];
            let range = phase_range(&staging, offset, len);
            self.manager
                .read(*h, 0, &mut staging[range.clone()])
                .map_err(|e| manager_error(name, e))?;
            self.staged_bytes.fetch_add(info.bytes, Ordering::Relaxed);
            return f(&staging[range]);
        }
        match self.manager.pin(*h, self.compute_tier) {
            Ok(guard) => guard.with_bytes(f).map_err(|e| manager_error(name, e))?,
            Err(ManagerError::TooLarge { .. } | ManagerError::OutOfMemory { .. }) => {
                let mut staging = vec![0u8; usize_of(name, info.bytes)?];
                self.manager
                    .read(*h, 0, &mut staging)
                    .map_err(|e| manager_error(name, e))?;
                self.staged_bytes.fetch_add(info.bytes, Ordering::Relaxed);
                f(&staging)
            }
            Err(e) => Err(manager_error(name, e)),
        }
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
        if on_compute_tier && let Ok(guard) = self.manager.pin(*h, self.compute_tier) {
            guard
                .read(offset, &mut buf)
                .map_err(|e| manager_error(name, e))?;
            return Ok(buf);
        }
        self.manager
            .read(*h, offset, &mut buf)
            .map_err(|e| manager_error(name, e))?;
        self.staged_bytes.fetch_add(len as u64, Ordering::Relaxed);
        Ok(buf)
    }

    /// The stored bytes of matrix `expert` of the stack `name`, and its two dimensions.
    fn expert_slice(
        &self,
        name: &str,
        expert: usize,
    ) -> Result<(Vec<u8>, WeightType, usize, usize)> {
        let (_, info) = self.entry(name)?;
        let shape: Vec<usize> = info
            .shape
            .iter()
            .map(|&d| usize_of(name, d))
            .collect::<Result<_>>()?;
        check_expert(name, &shape, expert)?;
        let ty = weight_type(name, info)?;
        let (a, b) = (shape[1], shape[2]);
        let slice = a * b * ty.size_bytes();
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
        let (rows, cols) = match info.shape.as_slice() {
            [r, c] => (usize_of(name, *r)?, usize_of(name, *c)?),
            _ => {
                return Err(RunnerError::TensorShape {
                    name: name.to_string(),
                    expected: "a 2-D table".into(),
                    found: info.shape.iter().map(|&d| d as usize).collect(),
                });
            }
        };
        let row_bytes = cols * weight_type(name, info)?.size_bytes();
        let mut values = Vec::with_capacity(ids.len() * cols);
        for (position, &id) in ids.iter().enumerate() {
            if id as usize >= rows {
                return Err(RunnerError::TokenOutOfVocab {
                    id,
                    position,
                    vocab_size: rows,
                });
            }
            let bytes = self.read_range(name, id as u64 * row_bytes as u64, row_bytes)?;
            values.extend(widen_to_f32(name, info.dtype, &bytes)?);
        }
        Ok(Tensor::from_vec(values, (ids.len(), cols), &self.device)?)
    }

    /// The bf16 kernel on the stored bytes (pinned in place, or staged when they do not fit).
    fn matvec(&self, name: &str, x: &[f32]) -> Result<Vec<f32>> {
        let (rows, cols, ty) = self.matrix(name)?;
        self.with_stored(name, |bytes| {
            self.timed(bytes.len(), || kernels::matvec(bytes, ty, rows, cols, x))
        })
    }

    /// The kernels on the stored bytes of all the weights at once (each pinned, or staged),
    /// in one parallel pass; one at a time when they differ in input width or one of them is
    /// streamed.
    fn matvec_many(&self, names: &[&str], x: &[f32]) -> Result<Vec<Vec<f32>>> {
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
                .is_some_and(|(h, _)| self.prefetch.positions.contains_key(h))
        });
        if streamed || names.len() > 3 || mats.iter().any(|m| m.1 != cols) {
            return names.iter().map(|n| self.matvec(n, x)).collect();
        }
        let mut run = |bytes: &[&[u8]]| -> Result<Vec<Vec<f32>>> {
            let refs: Vec<(&[u8], WeightType, usize)> = bytes
                .iter()
                .zip(&mats)
                .map(|(b, &(rows, _, ty))| (*b, ty, rows))
                .collect();
            let total: usize = bytes.iter().map(|b| b.len()).sum();
            self.timed(total, || kernels::matvec_many(&refs, cols, x))
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
        self.timed(bytes.len(), || {
            if transposed {
                kernels::matvec(&bytes, ty, a, b, x)
            } else {
                kernels::vecmat(&bytes, ty, a, b, x)
            }
        })
    }

    /// Tells the prefetch thread (started on first use) that `layer` starts, so it brings
    /// the next layers' weights to the compute tier while this one computes.
    fn begin_layer(&self, layer: usize, layers: usize) {
        let shared = &self.prefetch;
        shared.cursor.store((layer as u64) << 32, Ordering::Release);
        // A read-ahead waiting for room re-checks what is still wanted.
        shared.area.wake();
        if self.prefetch_layers() == 0 || layers + 1 != shared.units.len() {
            return;
        }
        let mut worker = self.prefetcher.lock().unwrap_or_else(|p| p.into_inner());
        if worker.is_none() {
            let (tx, rx) = channel();
            let s = shared.clone();
            match std::thread::Builder::new()
                .name("vlmem-prefetch".into())
                .spawn(move || s.run(&rx))
            {
                Ok(handle) => *worker = Some((tx, handle)),
                // No thread, no prefetch: demand loads still serve every weight.
                Err(_) => return,
            }
        }
        if let Some((tx, _)) = worker.as_ref() {
            let _ = tx.send(layer);
        }
    }
}
