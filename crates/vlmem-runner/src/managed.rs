//! Weights owned by the memory manager: every checkpoint tensor is registered in place as a
//! read-only extent on the disk tier (start-up copies nothing), and each use pins it on the
//! compute tier, which brings it up through the tiers and lets the manager's weights policy
//! (the access plan in model order) decide what stays. When the compute tier has no room for
//! a tensor at all (`--host-mem 0`, or a budget smaller than one tensor), the tensor streams
//! from its fastest copy through a staging buffer the size of that tensor, and nothing is
//! kept: the outputs are the same whatever the tiering.

use crate::error::{Result, RunnerError};
use crate::weights::{WeightSource, widen_to_f32};
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use vlmem::{ManagerError, MemoryManager, TensorHandle, TensorKind, Tier};
use vlmem_qwen3vl::checkpoint::{Checkpoint, TensorInfo};
use vlmem_qwen3vl::tensors::expected_tensors;

/// A [`WeightSource`] over a [`MemoryManager`].
pub struct ManagedWeights {
    manager: MemoryManager,
    index: HashMap<String, (TensorHandle, TensorInfo)>,
    compute_tier: Tier,
    device: Device,
}

impl std::fmt::Debug for ManagedWeights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ManagedWeights")
            .field("tensors", &self.index.len())
            .field("compute_tier", &self.compute_tier)
            .finish_non_exhaustive()
    }
}

fn manager_error(name: &str, e: ManagerError) -> RunnerError {
    RunnerError::Weights(format!("{name}: {e}"))
}

impl ManagedWeights {
    /// Registers every weight of `checkpoint` with `manager` (in place, on the disk tier) and
    /// gives the manager the model's access order. Tensors are pinned on `compute_tier`
    /// (the host tier for CPU compute) and staged on `device`.
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
        Ok(ManagedWeights {
            manager,
            index,
            compute_tier,
            device: device.clone(),
        })
    }

    /// The manager (for stats).
    pub fn manager(&self) -> &MemoryManager {
        &self.manager
    }

    fn entry(&self, name: &str) -> Result<&(TensorHandle, TensorInfo)> {
        self.index
            .get(name)
            .ok_or_else(|| RunnerError::MissingTensor {
                name: name.to_string(),
            })
    }

    /// The tensor's values widened to f32: pinned on the compute tier when it fits there,
    /// else streamed from its fastest copy.
    fn values(&self, name: &str) -> Result<Vec<f32>> {
        let (h, info) = self.entry(name)?;
        match self.manager.pin(*h, self.compute_tier) {
            Ok(guard) => guard
                .with_bytes(|bytes| widen_to_f32(name, info.dtype, bytes))
                .map_err(|e| manager_error(name, e))?,
            Err(ManagerError::TooLarge { .. } | ManagerError::OutOfMemory { .. }) => {
                let mut staging = vec![0u8; info.bytes as usize];
                self.manager
                    .read(*h, 0, &mut staging)
                    .map_err(|e| manager_error(name, e))?;
                widen_to_f32(name, info.dtype, &staging)
            }
            Err(e) => Err(manager_error(name, e)),
        }
    }
}

impl WeightSource for ManagedWeights {
    fn tensor_f32(&self, name: &str) -> Result<Tensor> {
        let values = self.values(name)?;
        let (_, info) = self.entry(name)?;
        let shape: Vec<usize> = info.shape.iter().map(|&d| d as usize).collect();
        Ok(Tensor::from_vec(values, shape, &self.device)?)
    }

    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.index
            .get(name)
            .map(|(_, t)| t.shape.iter().map(|&d| d as usize).collect())
    }
}
