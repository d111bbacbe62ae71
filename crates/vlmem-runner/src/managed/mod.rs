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

mod report;
mod source;
mod stored;
mod stream;

use crate::error::{Result, RunnerError};
use crate::kernels::WeightFormat;
use candle_core::Device;
use std::collections::{HashMap, HashSet};
use vlmem::readahead::{Need, Plan, ReadAhead};
pub use vlmem::readahead::{ReaderActivity, STREAM_READERS};
use vlmem::{ManagerError, MemoryManager, TensorHandle, TensorKind, Tier};
use vlmem_core::sync::atomic::AtomicU64;
use vlmem_qwen3vl::checkpoint::{Checkpoint, TensorInfo};
use vlmem_qwen3vl::placement::{Home, PlanTensor, WeightPlacement, decode_units, place_weights};
use vlmem_qwen3vl::tensors::expected_tensors;

pub use report::StagingReport;
pub use stored::WEIGHT_BUSY_MAX;

/// Layers prefetched ahead of the one computing, unless told otherwise.
pub const DEFAULT_PREFETCH_LAYERS: usize = 2;

/// A [`WeightSource`] over a [`MemoryManager`].
///
/// [`WeightSource`]: crate::weights::WeightSource
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
    RunnerError::Weight {
        name: name.to_string(),
        source: e,
    }
}

fn weight_type(name: &str, info: &TensorInfo) -> Result<WeightFormat> {
    crate::weights::weight_format(name, info)
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

    fn entry(&self, name: &str) -> Result<&(TensorHandle, TensorInfo)> {
        self.index
            .get(name)
            .ok_or_else(|| RunnerError::MissingTensor {
                name: name.to_string(),
            })
    }
}
