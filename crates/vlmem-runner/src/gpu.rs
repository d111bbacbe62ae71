//! Decoder layers on the GPU (feature `cuda`): a [`WeightSource`] over [`ManagedWeights`]
//! whose first decoder layers' matrices live on the memory manager's CUDA device tier and
//! multiply there (`kernels::cuda::GpuKernels`), read in place in their stored type. Everything else (the
//! other layers, norms, the embedding, lm_head, the vision tower, expert stacks) goes to the
//! wrapped source and computes on the CPU, as without a GPU.
//!
//! Which layers: from layer 0 up, as many whole layers as the device tier's weight budget
//! holds (what `vlmem plan` puts on the GPU). Each use pins the weight on the device tier: the
//! manager brings it up from the checkpoint on first use and keeps it there; a pin that fails
//! (no room, no GPU memory) falls back to the CPU path with the same result.

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

#[cfg(feature = "cuda")]
mod on_gpu {
    use super::GpuReport;
    use crate::error::{Result, RunnerError};
    use crate::kernels::WeightType;
    use crate::kernels::cuda::GpuKernels;
    use crate::managed::ManagedWeights;
    use crate::weights::WeightSource;
    use candle_core::Tensor;
    use std::collections::{BTreeMap, HashMap};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    use vlmem::{TensorHandle, TensorKind, Tier};
    use vlmem_qwen3vl::checkpoint::Checkpoint;

    /// A 2-D weight that computes on the GPU.
    #[derive(Debug, Clone, Copy)]
    struct OnGpu {
        handle: TensorHandle,
        rows: usize,
        cols: usize,
        ty: WeightType,
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
        /// Puts the first decoder layers of `checkpoint` whose 2-D weights fit the device tier's
        /// weight budget on the GPU. `inner` must be registered from the same checkpoint, with a
        /// manager whose device tier is the GPU `kernels` runs on
        /// ([`vlmem::ManagerConfig::gpu_ordinal`]); otherwise no layer goes there.
        pub fn new(
            inner: Arc<ManagedWeights>,
            checkpoint: &Checkpoint,
            kernels: GpuKernels,
        ) -> Result<Self> {
            let manager = inner.manager();
            let budget = if manager.device_is_gpu() {
                manager
                    .stats()
                    .budgets
                    .get(Tier::Device, TensorKind::Weight)
            } else {
                0
            };
            // Each layer's matrices, in layer order.
            let mut by_layer: BTreeMap<u64, Vec<(String, OnGpu, u64)>> = BTreeMap::new();
            for t in &checkpoint.tensors {
                let (Some(layer), [r, c]) = (t.layer, t.shape.as_slice()) else {
                    continue;
                };
                let (Some(ty), Some(handle)) =
                    (WeightType::from_dtype(t.dtype), inner.handle(&t.name))
                else {
                    continue;
                };
                let (Ok(rows), Ok(cols)) = (usize::try_from(*r), usize::try_from(*c)) else {
                    continue;
                };
                by_layer.entry(layer).or_default().push((
                    t.name.clone(),
                    OnGpu {
                        handle,
                        rows,
                        cols,
                        ty,
                    },
                    t.bytes,
                ));
            }
            let mut on_gpu = HashMap::new();
            let (mut layers, mut gpu_bytes) = (0usize, 0u64);
            for (expect, (layer, mats)) in by_layer.into_iter().enumerate() {
                let bytes: u64 = mats.iter().map(|m| m.2).sum();
                if layer != expect as u64 || gpu_bytes + bytes > budget {
                    break;
                }
                gpu_bytes += bytes;
                layers += 1;
                on_gpu.extend(mats.into_iter().map(|(n, g, _)| (n, g)));
            }
            Ok(GpuLayers {
                inner,
                kernels,
                on_gpu,
                layers,
                gpu_bytes,
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
