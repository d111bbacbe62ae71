//! Decoder layers on the GPU (feature `cuda`): a [`WeightSource`](crate::weights::WeightSource)
//! over [`ManagedWeights`](crate::managed::ManagedWeights) whose first decoder layers' matrices live on the memory manager's CUDA device tier and
//! multiply there (`kernels::cuda::GpuKernels`), read in place in their stored type. Everything else (the
//! other layers, norms, the embedding, lm_head, the vision tower, expert stacks) goes to the
//! wrapped source and computes on the CPU, as without a GPU.
//!
//! Which layers ([`GpuLayerPlan`]): from layer 0 up, as many whole layers as the device
//! tier's weight budget holds (what `vlmem plan` puts on the GPU); `ManagedWeights` is told to
//! leave their matrices out of its RAM plan and read-ahead. Each use pins the weight on the device tier: the
//! manager brings it up from the checkpoint on first use and keeps it there; a pin that fails
//! (no room, no GPU memory) falls back to the CPU path with the same result.

use std::collections::BTreeSet;
use vlmem_qwen3vl::placement::{Home, WeightPlacement};

#[cfg(feature = "cuda")]
pub use on_gpu::GpuLayers;

/// What `GpuLayers` did, for reports.
#[derive(Debug, Clone)]
pub struct GpuReport {
    /// The GPU, e.g. "NVIDIA GeForce MX250 (SM 6.1)".
    pub device: String,
    /// Decoder layers whose matrices compute on the GPU (layers 0..layers).
    pub layers: usize,
    /// Their weight bytes.
    pub weight_bytes: u64,
    /// Weight bytes the GPU kernels read, and the seconds their calls took.
    pub kernel_bytes: u64,
    /// See `kernel_bytes`.
    pub kernel_s: f64,
    /// Calls that fell back to the CPU (device pin failed).
    pub fallbacks: u64,
}

/// The decoder layers that compute on the GPU, as the engine's plan places them
/// ([`vlmem_qwen3vl::placement::place_weights`]: from layer 0 up, as many whole layers as the
/// GPU's weight budget holds), and their 2-D matrices (the weights the GPU kernels multiply;
/// norms and expert stacks stay with the CPU).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GpuLayerPlan {
    /// Layers `0..layers` compute on the GPU.
    pub layers: usize,
    /// Bytes of their matrices.
    pub weight_bytes: u64,
    /// The matrices' checkpoint names.
    pub matrices: BTreeSet<String>,
}

impl GpuLayerPlan {
    /// The GPU's share of `placement`.
    pub fn of(placement: &WeightPlacement) -> Self {
        let on_gpu = placement.tensors.iter().filter(|t| t.tier == Home::Gpu);
        GpuLayerPlan {
            layers: placement.gpu_layers as usize,
            weight_bytes: on_gpu.clone().map(|t| t.bytes).sum(),
            matrices: on_gpu.map(|t| t.name.clone()).collect(),
        }
    }

    /// Whether `name` computes on the GPU.
    pub fn contains(&self, name: &str) -> bool {
        self.matrices.contains(name)
    }
}

#[cfg(feature = "cuda")]
mod on_gpu {
    use super::{GpuLayerPlan, GpuReport};
    use crate::error::{Result, RunnerError};
    use crate::kernels::WeightFormat;
    use crate::kernels::cuda::GpuKernels;
    use crate::managed::ManagedWeights;
    use crate::weights::WeightSource;
    use candle_core::Tensor;
    use std::collections::HashMap;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    use vlmem::{TensorHandle, Tier};
    use vlmem_qwen3vl::checkpoint::Checkpoint;

    /// A 2-D weight that computes on the GPU.
    #[derive(Debug, Clone, Copy)]
    struct OnGpu {
        handle: TensorHandle,
        rows: usize,
        cols: usize,
        ty: WeightFormat,
    }

    /// See the module documentation.
    pub struct GpuLayers {
        inner: Arc<ManagedWeights>,
        kernels: GpuKernels,
        on_gpu: HashMap<String, OnGpu>,
        layers: usize,
        gpu_bytes: u64,
        /// Calls that fell back to the CPU because the pin on the device failed.
        fallbacks: AtomicU64,
    }

    impl std::fmt::Debug for GpuLayers {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("GpuLayers")
                .field("gpu", &self.kernels)
                .field("layers", &self.layers)
                .field("gpu_bytes", &self.gpu_bytes)
                .finish_non_exhaustive()
        }
    }

    impl GpuLayers {
        /// Computes the matrices of `plan` (made from the same checkpoint) on the GPU
        /// `kernels` runs on. `inner` must be registered from that checkpoint with a manager
        /// whose device tier is that GPU ([`vlmem::ManagerConfig::gpu_ordinal`]); an error
        /// otherwise, unless the plan is empty.
        pub fn new(
            inner: Arc<ManagedWeights>,
            checkpoint: &Checkpoint,
            plan: &GpuLayerPlan,
            kernels: GpuKernels,
        ) -> Result<Self> {
            if plan.layers > 0 && !inner.manager().device_is_gpu() {
                return Err(RunnerError::Gpu(
                    "the memory manager's device tier is not a GPU (ManagerConfig::gpu_ordinal)"
                        .into(),
                ));
            }
            let mut on_gpu = HashMap::new();
            for name in &plan.matrices {
                let info = checkpoint
                    .tensor(name)
                    .ok_or_else(|| RunnerError::MissingTensor { name: name.clone() })?;
                let handle = inner
                    .handle(name)
                    .ok_or_else(|| RunnerError::MissingTensor { name: name.clone() })?;
                let (Some(ty), [r, c]) = (info.format, info.shape.as_slice()) else {
                    continue;
                };
                let (Ok(rows), Ok(cols)) = (usize::try_from(*r), usize::try_from(*c)) else {
                    continue;
                };
                on_gpu.insert(
                    name.clone(),
                    OnGpu {
                        handle,
                        rows,
                        cols,
                        ty,
                    },
                );
            }
            Ok(GpuLayers {
                inner,
                kernels,
                on_gpu,
                layers: plan.layers,
                gpu_bytes: plan.weight_bytes,
                fallbacks: AtomicU64::new(0),
            })
        }

        /// What runs where, and the kernels' counters.
        pub fn report(&self) -> GpuReport {
            let (kernel_bytes, kernel_s) = self.kernels.read_so_far();
            GpuReport {
                device: self.kernels.describe(),
                layers: self.layers,
                weight_bytes: self.gpu_bytes,
                kernel_bytes,
                kernel_s,
                fallbacks: self.fallbacks.load(Ordering::Relaxed),
            }
        }

        /// The wrapped source.
        pub fn inner(&self) -> &Arc<ManagedWeights> {
            &self.inner
        }

        /// `Y = X W^T` on the GPU when `name` lives there: `None` when it does not (or its pin
        /// on the device failed, counted as a fallback), so the caller takes the CPU path.
        fn on_gpu(&self, name: &str, x: &[f32], n: usize) -> Option<Result<Vec<f32>>> {
            let g = self.on_gpu.get(name)?;
            let pin = match self.inner.manager().pin(g.handle, Tier::Device) {
                Ok(pin) => pin,
                Err(_) => {
                    self.fallbacks.fetch_add(1, Ordering::Relaxed);
                    return None;
                }
            };
            Some(
                self.kernels
                    .matmul(&pin, g.ty, g.rows, g.cols, x, n)
                    .map_err(|e| match e {
                        RunnerError::Gpu(m) => RunnerError::Gpu(format!("{name}: {m}")),
                        other => other,
                    }),
            )
        }
    }

    impl WeightSource for GpuLayers {
        fn tensor_f32(&self, name: &str) -> Result<Tensor> {
            self.inner.tensor_f32(name)
        }
        fn shape(&self, name: &str) -> Option<Vec<usize>> {
            self.inner.shape(name)
        }
        fn rows_f32(&self, name: &str, ids: &[u32]) -> Result<Tensor> {
            self.inner.rows_f32(name, ids)
        }
        fn matvec(&self, name: &str, x: &[f32]) -> Result<Vec<f32>> {
            match self.on_gpu(name, x, 1) {
                Some(r) => r,
                None => self.inner.matvec(name, x),
            }
        }
        fn matvec_many(&self, names: &[&str], x: &[f32]) -> Result<Vec<Vec<f32>>> {
            if names.iter().any(|n| self.on_gpu.contains_key(*n)) {
                names.iter().map(|n| self.matvec(n, x)).collect()
            } else {
                self.inner.matvec_many(names, x)
            }
        }
        fn matvec_into(&self, name: &str, x: &[f32], y: &mut [f32]) -> Result<()> {
            match self.on_gpu(name, x, 1) {
                Some(r) => crate::weights::copy_into(name, &r?, y),
                None => self.inner.matvec_into(name, x, y),
            }
        }
        fn matvec_many_into(&self, names: &[&str], x: &[f32], ys: &mut [&mut [f32]]) -> Result<()> {
            if names.iter().any(|n| self.on_gpu.contains_key(*n)) {
                crate::weights::matvec_each_into(self, names, x, ys)
            } else {
                self.inner.matvec_many_into(names, x, ys)
            }
        }
        fn expert_matvec_into(
            &self,
            name: &str,
            expert: usize,
            transposed: bool,
            x: &[f32],
            y: &mut [f32],
        ) -> Result<()> {
            self.inner
                .expert_matvec_into(name, expert, transposed, x, y)
        }
        fn values_into(&self, name: &str, out: &mut [f32]) -> Result<()> {
            self.inner.values_into(name, out)
        }
        fn row_into(&self, name: &str, id: u32, out: &mut [f32]) -> Result<()> {
            self.inner.row_into(name, id, out)
        }
        fn matmul(&self, name: &str, x: &[f32], n: usize) -> Result<Vec<f32>> {
            match self.on_gpu(name, x, n) {
                Some(r) => r,
                None => self.inner.matmul(name, x, n),
            }
        }
        fn matmul_rows_max(&self, name: &str) -> usize {
            if self.on_gpu.contains_key(name) {
                usize::from(u16::MAX)
            } else {
                self.inner.matmul_rows_max(name)
            }
        }
        fn expert_f32(&self, name: &str, expert: usize) -> Result<Tensor> {
            self.inner.expert_f32(name, expert)
        }
        fn expert_matvec(
            &self,
            name: &str,
            expert: usize,
            transposed: bool,
            x: &[f32],
        ) -> Result<Vec<f32>> {
            self.inner.expert_matvec(name, expert, transposed, x)
        }
        fn begin_layer(&self, layer: usize, layers: usize) {
            self.inner.begin_layer(layer, layers)
        }
    }
}
