//! Where weights come from: the [`WeightSource`] trait, the one door through which the model
//! reads every parameter. The model never holds a weight itself; it asks the source for a
//! tensor by its checkpoint name each time it needs one, so whoever implements the trait
//! decides residency: [`CheckpointWeights`] reads the exact byte range from the checkpoint
//! file on every call (nothing resident), [`CachedWeights`] keeps converted tensors after the
//! first use (everything resident), and `ManagedWeights` (managed/) implements the same
//! trait over the memory manager's tiers.
//!
//! Weights stay in their stored type (bf16 for the released checkpoints) on disk and are
//! widened to f32 only when a tensor is staged for compute.

use crate::error::{Result, RunnerError};
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use vlmem_qwen3vl::checkpoint::{Checkpoint, TensorInfo};
use vlmem_qwen3vl::format::WeightFormat;

/// A source of model weights, staged as f32 tensors on the compute device.
///
/// Object-safe and shareable across threads. Implementations must return exactly the
/// checkpoint's values (widened to f32) in the checkpoint's shape.
pub trait WeightSource: Send + Sync {
    /// The tensor `name` (a checkpoint name such as
    /// `model.language_model.layers.0.self_attn.q_proj.weight`) as an f32 tensor in its stored
    /// shape; [`RunnerError::MissingTensor`] if the checkpoint has no such tensor.
    fn tensor_f32(&self, name: &str) -> Result<Tensor>;

    /// The stored shape of `name`, without reading its data; `None` if absent.
    fn shape(&self, name: &str) -> Option<Vec<usize>>;

    /// Rows `ids` of the 2-D tensor `name` (an embedding gather), as `[ids.len(), cols]`.
    /// The default stages the whole tensor; a tiered source can read only the rows.
    fn rows_f32(&self, name: &str, ids: &[u32]) -> Result<Tensor> {
        let table = self.tensor_f32(name)?;
        let idx = Tensor::from_slice(ids, ids.len(), table.device())?;
        Ok(table.index_select(&idx, 0)?)
    }

    /// `W x` for the 2-D weight `name` (`[out, in]`, a linear layer) and one input row `x`
    /// (`in` values): the decode path. The default stages the tensor as f32 and multiplies
    /// with candle; a source holding the stored bytes runs [`crate::kernels::matvec`] on
    /// them instead (no widened copy).
    fn matvec(&self, name: &str, x: &[f32]) -> Result<Vec<f32>> {
        let w = self.tensor_f32(name)?;
        let xt = Tensor::from_slice(x, (1, x.len()), w.device())?;
        Ok(crate::nn::linear(&xt, &w, None)?.flatten_all()?.to_vec1()?)
    }

    /// [`WeightSource::matvec`] of several weights against the same input row (q/k/v,
    /// gate/up). The default calls `matvec` for each; a source holding the stored bytes runs
    /// them in one parallel pass ([`crate::kernels::matvec_many`]).
    fn matvec_many(&self, names: &[&str], x: &[f32]) -> Result<Vec<Vec<f32>>> {
        names.iter().map(|n| self.matvec(n, x)).collect()
    }

    /// `X W^T` for the weight `name` read as the matrix `[out, in]` of its first dimension
    /// by the product of the others ([`matrix_dims`]) and `n` input rows `x` (`n x in`
    /// values, row-major): prefill and the vision tower. Returns `n x out` values. The
    /// default stages the tensor as f32 and multiplies with candle; a source holding the
    /// stored bytes runs [`crate::kernels::matmul`] (the tiled product) on them, with no
    /// widened copy.
    fn matmul(&self, name: &str, x: &[f32], n: usize) -> Result<Vec<f32>> {
        let w = self.tensor_f32(name)?;
        let (rows, cols) = matrix_dims(name, w.dims())?;
        let w = w.reshape((rows, cols))?;
        let xt = Tensor::from_slice(x, (n, x.len().checked_div(n).unwrap_or(0)), w.device())?;
        Ok(crate::nn::linear(&xt, &w, None)?.flatten_all()?.to_vec1()?)
    }

    /// The most input rows [`WeightSource::matmul`] takes for `name`; more rows go through
    /// candle on the staged f32 tensor ([`crate::nn::Params::linear`]). The CPU kernels
    /// take any number ([`crate::kernels::MATMUL_MAX_ROWS`]); a source that computes `name`
    /// elsewhere (on the GPU) may bound it.
    fn matmul_rows_max(&self, name: &str) -> usize {
        let _ = name;
        crate::kernels::MATMUL_MAX_ROWS
    }

    /// Matrix `expert` of the fused 3-D tensor `name` (`[experts, a, b]`) as f32 `[a, b]`.
    /// The default stages the whole tensor; a tiered source reads only that expert's slice.
    fn expert_f32(&self, name: &str, expert: usize) -> Result<Tensor> {
        let t = self.tensor_f32(name)?;
        check_expert(name, t.dims(), expert)?;
        Ok(t.get(expert)?)
    }

    /// One input row through matrix `expert` of the fused 3-D tensor `name`: `x W_e` when
    /// `transposed` is false (`W_e: [in, out]`, the released layout), `W_e x` when it is true
    /// (`W_e: [out, in]`). The default goes through [`WeightSource::expert_f32`] and candle.
    fn expert_matvec(
        &self,
        name: &str,
        expert: usize,
        transposed: bool,
        x: &[f32],
    ) -> Result<Vec<f32>> {
        let w = self.expert_f32(name, expert)?;
        let xt = Tensor::from_slice(x, (1, x.len()), w.device())?;
        let y = if transposed {
            crate::nn::linear(&xt, &w, None)?
        } else {
            xt.matmul(&w)?
        };
        Ok(y.flatten_all()?.to_vec1()?)
    }

    /// [`WeightSource::matvec`] into `y` (`out` values, e.g. a view of the step arena). The
    /// default computes with `matvec` and copies; a source holding the stored bytes writes
    /// the kernel's output straight into `y`.
    fn matvec_into(&self, name: &str, x: &[f32], y: &mut [f32]) -> Result<()> {
        copy_into(name, &self.matvec(name, x)?, y)
    }

    /// [`WeightSource::matvec_many`] into `ys`, one output per weight.
    fn matvec_many_into(&self, names: &[&str], x: &[f32], ys: &mut [&mut [f32]]) -> Result<()> {
        matvec_each_into(self, names, x, ys)
    }

    /// [`WeightSource::expert_matvec`] into `y`.
    fn expert_matvec_into(
        &self,
        name: &str,
        expert: usize,
        transposed: bool,
        x: &[f32],
        y: &mut [f32],
    ) -> Result<()> {
        copy_into(name, &self.expert_matvec(name, expert, transposed, x)?, y)
    }

    /// Every value of `name` (any shape, row-major) widened to f32 into `out`, which must
    /// hold exactly that many: a norm's weights for the decode step.
    fn values_into(&self, name: &str, out: &mut [f32]) -> Result<()> {
        let values = self.tensor_f32(name)?.flatten_all()?.to_vec1::<f32>()?;
        copy_into(name, &values, out)
    }

    /// Row `id` of the 2-D table `name` widened to f32 into `out` (an embedding lookup).
    fn row_into(&self, name: &str, id: u32, out: &mut [f32]) -> Result<()> {
        let row = self
            .rows_f32(name, &[id])?
            .flatten_all()?
            .to_vec1::<f32>()?;
        copy_into(name, &row, out)
    }

    /// Told by the decoder as it starts layer `layer` of `layers` (`layer == layers`: the
    /// final norm and lm_head), so a tiered source can prefetch what comes next. The default
    /// does nothing.
    fn begin_layer(&self, _layer: usize, _layers: usize) {}
}

/// Rows and columns of a weight of `shape` read as a matrix: its first dimension by the
/// product of the others (`[out, in]` as it is; a convolution's `[out, c, t, h, w]` whose
/// stride equals its kernel as `[out, c * t * h * w]`); a shape error for fewer than two
/// dimensions.
pub fn matrix_dims(name: &str, shape: &[usize]) -> Result<(usize, usize)> {
    match shape {
        [rows, rest @ ..] if !rest.is_empty() => rest
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .map(|cols| (*rows, cols))
            .ok_or_else(|| RunnerError::BadRequest(format!("{name}: {shape:?} overflows"))),
        _ => Err(RunnerError::TensorShape {
            name: name.to_string(),
            expected: "a matrix (two or more dimensions)".into(),
            found: shape.to_vec(),
        }),
    }
}

/// Errors unless there is one output per weight.
pub(crate) fn check_outputs(weights: usize, outputs: usize) -> Result<()> {
    if weights == outputs {
        Ok(())
    } else {
        Err(RunnerError::BadRequest(format!(
            "{weights} weights but {outputs} outputs"
        )))
    }
}

/// [`WeightSource::matvec_into`] of each weight in turn, one output each (no fused pass).
pub(crate) fn matvec_each_into<S: WeightSource + ?Sized>(
    src: &S,
    names: &[&str],
    x: &[f32],
    ys: &mut [&mut [f32]],
) -> Result<()> {
    check_outputs(names.len(), ys.len())?;
    for (name, y) in names.iter().zip(ys.iter_mut()) {
        src.matvec_into(name, x, y)?;
    }
    Ok(())
}

/// Copies `values` of `name` into `out`, which must have exactly their length.
pub(crate) fn copy_into(name: &str, values: &[f32], out: &mut [f32]) -> Result<()> {
    if values.len() != out.len() {
        return Err(RunnerError::BadRequest(format!(
            "{name}: {} values for an output of {}",
            values.len(),
            out.len()
        )));
    }
    out.copy_from_slice(values);
    Ok(())
}

/// Errors unless `shape` is a 3-D stack with a matrix `expert`.
pub(crate) fn check_expert(name: &str, shape: &[usize], expert: usize) -> Result<()> {
    match shape {
        [e, _, _] if expert < *e => Ok(()),
        _ => Err(RunnerError::TensorShape {
            name: name.to_string(),
            expected: format!("a 3-D stack of experts with expert {expert}"),
            found: shape.to_vec(),
        }),
    }
}

/// Reads weights straight from the checkpoint's safetensors files: one positioned read of the
/// tensor's exact byte range per call, converted to f32. Nothing is kept between calls.
#[derive(Debug)]
pub struct CheckpointWeights {
    index: HashMap<String, TensorInfo>,
    files: HashMap<PathBuf, File>,
    device: Device,
}

impl CheckpointWeights {
    /// Opens every weight file of `checkpoint` (headers already checked by
    /// [`Checkpoint::open`]); tensors are staged on `device`.
    pub fn new(checkpoint: &Checkpoint, device: &Device) -> Result<Self> {
        let mut files = HashMap::new();
        for path in &checkpoint.files {
            let file = File::open(path).map_err(|e| RunnerError::io(path, e))?;
            files.insert(path.clone(), file);
        }
        let index = checkpoint
            .tensors
            .iter()
            .map(|t| (t.name.clone(), t.clone()))
            .collect();
        Ok(CheckpointWeights {
            index,
            files,
            device: device.clone(),
        })
    }

    /// Opens the checkpoint folder `dir` and its weight files.
    pub fn open(dir: &Path, device: &Device) -> Result<Self> {
        let checkpoint = Checkpoint::open(dir)?;
        Self::new(&checkpoint, device)
    }

    /// Number of tensors in the checkpoint.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// Whether the checkpoint holds no tensor.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    fn info(&self, name: &str) -> Result<&TensorInfo> {
        self.index
            .get(name)
            .ok_or_else(|| RunnerError::MissingTensor {
                name: name.to_string(),
            })
    }

    /// The stored bytes of `name`, read with one positioned read.
    pub fn raw_bytes(&self, name: &str) -> Result<Vec<u8>> {
        let info = self.info(name)?;
        let file = self
            .files
            .get(&info.file)
            .ok_or_else(|| RunnerError::MissingFile {
                path: info.file.clone(),
                message: "weight file not opened".into(),
            })?;
        let len_bytes = usize::try_from(info.bytes).map_err(|_| {
            RunnerError::BadRequest(format!("tensor {name} is too large for this machine"))
        })?;
        let mut buf = vec![0u8; len_bytes];
        file.read_exact_at(&mut buf, info.file_offset_bytes)
            .map_err(|e| RunnerError::io(&info.file, e))?;
        Ok(buf)
    }
}

/// Widens `bytes` of `format` to f32 into `out`, which must hold exactly the values `bytes`
/// stores ([`WeightFormat::decode_row_into`]: plain values widened exactly; for Q8_0, whole
/// 34-byte blocks of 32 values, each dequantized to `d * q`; for Q4_K, whole 144-byte
/// blocks of 256 values, each `d * sc * q - dmin * m`); its errors name the tensor.
pub fn widen_format_into(
    name: &str,
    format: WeightFormat,
    bytes: &[u8],
    out: &mut [f32],
) -> Result<()> {
    format
        .decode_row_into(bytes, out)
        .map_err(|e| RunnerError::BadRequest(format!("{name}: {e}")))
}

/// The format a checkpoint tensor's bytes hold (its dtype's, or the block format a
/// quantized checkpoint names); an error for a type that is not a weight (integers).
pub(crate) fn weight_format(name: &str, info: &TensorInfo) -> Result<WeightFormat> {
    info.format.ok_or_else(|| RunnerError::UnsupportedDtype {
        name: name.to_string(),
        dtype: info.dtype.safetensors_name().to_string(),
    })
}

/// Widens whole blocks of `format` (any number of values) to a new f32 vector.
pub fn widen_blocks(name: &str, format: WeightFormat, bytes: &[u8]) -> Result<Vec<f32>> {
    let block_bytes = format.block_bytes() as usize;
    if !bytes.len().is_multiple_of(block_bytes) {
        return Err(RunnerError::BadRequest(format!(
            "{name}: {} bytes are not whole {format} blocks of {block_bytes} bytes",
            bytes.len()
        )));
    }
    let mut out = vec![0f32; bytes.len() / block_bytes * format.block_elems() as usize];
    widen_format_into(name, format, bytes, &mut out)?;
    Ok(out)
}

/// [`widen_format_into`] to a new vector of `values` values.
pub fn widen_format_to_f32(
    name: &str,
    format: WeightFormat,
    bytes: &[u8],
    values: usize,
) -> Result<Vec<f32>> {
    let want = crate::kernels::row_bytes(format, values)?;
    if bytes.len() != want {
        return Err(RunnerError::BadRequest(format!(
            "{name}: {} bytes of {format} for {values} values (needs {want})",
            bytes.len()
        )));
    }
    let mut out = vec![0f32; values];
    widen_format_into(name, format, bytes, &mut out)?;
    Ok(out)
}

fn usize_shape(shape: &[u64]) -> Vec<usize> {
    shape.iter().map(|&d| d as usize).collect()
}

impl WeightSource for CheckpointWeights {
    /// The tiled product on the stored bytes (one read of the tensor, no f32 copy).
    fn matmul(&self, name: &str, x: &[f32], n: usize) -> Result<Vec<f32>> {
        let info = self.info(name)?;
        let (rows, cols) = matrix_dims(name, &usize_shape(&info.shape))?;
        let ty =
            WeightFormat::from_dtype(info.dtype).ok_or_else(|| RunnerError::UnsupportedDtype {
                name: name.to_string(),
                dtype: info.dtype.safetensors_name().to_string(),
            })?;
        let bytes = self.raw_bytes(name)?;
        crate::kernels::matmul(&bytes, ty, rows, cols, x, n)
    }

    fn tensor_f32(&self, name: &str) -> Result<Tensor> {
        let info = self.info(name)?;
        let bytes = self.raw_bytes(name)?;
        let values = widen_blocks(name, weight_format(name, info)?, &bytes)?;
        Ok(Tensor::from_vec(
            values,
            usize_shape(&info.shape),
            &self.device,
        )?)
    }

    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.index.get(name).map(|t| usize_shape(&t.shape))
    }

    fn rows_f32(&self, name: &str, ids: &[u32]) -> Result<Tensor> {
        let info = self.info(name)?;
        let shape = usize_shape(&info.shape);
        let (rows, cols) = match shape.as_slice() {
            [r, c] => (*r, *c),
            _ => {
                return Err(RunnerError::TensorShape {
                    name: name.to_string(),
                    expected: "a 2-D table".into(),
                    found: shape,
                });
            }
        };
        let ty = weight_format(name, info)?;
        let row_bytes = crate::kernels::row_bytes(ty, cols)?;
        let file = self
            .files
            .get(&info.file)
            .ok_or_else(|| RunnerError::MissingFile {
                path: info.file.clone(),
                message: "weight file not opened".into(),
            })?;
        let mut values = Vec::with_capacity(ids.len() * cols);
        let mut buf = vec![0u8; row_bytes];
        for (position, &id) in ids.iter().enumerate() {
            if id as usize >= rows {
                return Err(RunnerError::TokenOutOfVocab {
                    id,
                    position,
                    vocab_size: rows,
                });
            }
            let offset = info.file_offset_bytes + (id as u64) * row_bytes as u64;
            file.read_exact_at(&mut buf, offset)
                .map_err(|e| RunnerError::io(&info.file, e))?;
            values.extend(widen_blocks(name, ty, &buf)?);
        }
        Ok(Tensor::from_vec(values, (ids.len(), cols), &self.device)?)
    }
}

/// Keeps every tensor after its first staging: the "all resident in host RAM" policy, on top
/// of any other source.
pub struct CachedWeights<S> {
    inner: S,
    cache: Mutex<HashMap<String, Tensor>>,
}

impl<S: WeightSource> CachedWeights<S> {
    /// Wraps `inner`; nothing is staged until first asked for.
    pub fn new(inner: S) -> Self {
        CachedWeights {
            inner,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The wrapped source.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    /// f32 bytes held by the cache.
    pub fn resident_bytes(&self) -> usize {
        let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        cache.values().map(|t| t.elem_count() * 4).sum()
    }
}

impl<S: WeightSource> WeightSource for CachedWeights<S> {
    fn tensor_f32(&self, name: &str) -> Result<Tensor> {
        {
            let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(t) = cache.get(name) {
                return Ok(t.clone());
            }
        }
        let t = self.inner.tensor_f32(name)?;
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        cache.insert(name.to_string(), t.clone());
        Ok(t)
    }

    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.inner.shape(name)
    }

    /// The matrix-vector kernel on the resident f32 tensor (no candle matmul, no copy).
    fn matvec(&self, name: &str, x: &[f32]) -> Result<Vec<f32>> {
        let w = self.tensor_f32(name)?;
        let (rows, cols) = w.dims2()?;
        let (storage, layout) = w.storage_and_layout();
        match (&*storage, layout.contiguous_offsets()) {
            (candle_core::Storage::Cpu(candle_core::CpuStorage::F32(values)), Some((a, b))) => {
                crate::kernels::matvec_f32(&values[a..b], rows, cols, x)
            }
            _ => {
                drop(storage);
                let xt = Tensor::from_slice(x, (1, x.len()), w.device())?;
                Ok(crate::nn::linear(&xt, &w, None)?.flatten_all()?.to_vec1()?)
            }
        }
    }

    /// The inner source's product on the stored weight ([`CheckpointWeights`]: the tiled
    /// product on the stored bytes), not on the resident f32 copy: the same path, and the
    /// same bits, as every other source holding those bytes.
    fn matmul(&self, name: &str, x: &[f32], n: usize) -> Result<Vec<f32>> {
        self.inner.matmul(name, x, n)
    }
}

impl<S: WeightSource + ?Sized> WeightSource for Arc<S> {
    fn tensor_f32(&self, name: &str) -> Result<Tensor> {
        (**self).tensor_f32(name)
    }

    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        (**self).shape(name)
    }

    fn rows_f32(&self, name: &str, ids: &[u32]) -> Result<Tensor> {
        (**self).rows_f32(name, ids)
    }

    fn matvec(&self, name: &str, x: &[f32]) -> Result<Vec<f32>> {
        (**self).matvec(name, x)
    }

    fn matmul(&self, name: &str, x: &[f32], n: usize) -> Result<Vec<f32>> {
        (**self).matmul(name, x, n)
    }

    fn matmul_rows_max(&self, name: &str) -> usize {
        (**self).matmul_rows_max(name)
    }

    fn matvec_many(&self, names: &[&str], x: &[f32]) -> Result<Vec<Vec<f32>>> {
        (**self).matvec_many(names, x)
    }

    fn expert_f32(&self, name: &str, expert: usize) -> Result<Tensor> {
        (**self).expert_f32(name, expert)
    }

    fn expert_matvec(
        &self,
        name: &str,
        expert: usize,
        transposed: bool,
        x: &[f32],
    ) -> Result<Vec<f32>> {
        (**self).expert_matvec(name, expert, transposed, x)
    }

    fn begin_layer(&self, layer: usize, layers: usize) {
        (**self).begin_layer(layer, layers)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn widening_q8_0_dequantizes_each_block() {
        let values: Vec<f32> = (0..64).map(|i| (i as f32 - 20.0) * 0.125).collect();
        let bytes = vlmem_qwen3vl::format::q8_0::quantize_row(&values).unwrap();
        let mut out = vec![f32::NAN; 64];
        widen_format_into("w", WeightFormat::Q8_0, &bytes, &mut out).unwrap();
        let mut want = vec![0f32; 64];
        vlmem_qwen3vl::format::q8_0::dequantize_row_into(&bytes, &mut want).unwrap();
        assert_eq!(out, want);
        for (v, o) in values.iter().zip(&out) {
            assert!((v - o).abs() <= 0.04, "{v} -> {o}");
        }
        assert_eq!(
            widen_format_to_f32("w", WeightFormat::Q8_0, &bytes, 64).unwrap(),
            want
        );
        // Plain formats widen as their element type does.
        let bf = [
            half::bf16::from_f32(1.5).to_le_bytes(),
            half::bf16::from_f32(-2.0).to_le_bytes(),
        ]
        .concat();
        assert_eq!(
            widen_format_to_f32("w", WeightFormat::Bf16, &bf, 2).unwrap(),
            [1.5, -2.0]
        );
        // Lengths that disagree, or rows of partial blocks, are typed errors.
        assert!(widen_format_into("w", WeightFormat::Q8_0, &bytes[..33], &mut out).is_err());
        assert!(widen_format_to_f32("w", WeightFormat::Q8_0, &bytes, 63).is_err());
        assert!(widen_format_to_f32("w", WeightFormat::Q8_0, &bytes, 32).is_err());
    }

    #[test]
    fn widening_q4_k_dequantizes_each_block() {
        use vlmem_qwen3vl::format::q4_k;
        let values: Vec<f32> = (0..512)
            .map(|i| ((i * 37) % 101) as f32 / 50.0 - 0.7)
            .collect();
        let bytes = q4_k::quantize_row(&values).unwrap();
        assert_eq!(bytes.len(), 2 * 144);
        let mut out = vec![f32::NAN; 512];
        widen_format_into("w", WeightFormat::Q4_K, &bytes, &mut out).unwrap();
        let mut want = vec![0f32; 512];
        q4_k::dequantize_row_into(&bytes, &mut want).unwrap();
        assert_eq!(out, want);
        // 16 levels over a range of 2: each value within a step of 2 / 15.
        for (v, o) in values.iter().zip(&out) {
            assert!((v - o).abs() <= 2.0 / 15.0, "{v} -> {o}");
        }
        assert_eq!(
            widen_format_to_f32("w", WeightFormat::Q4_K, &bytes, 512).unwrap(),
            want
        );
        // Lengths that disagree, or rows of partial blocks, are typed errors.
        assert!(widen_format_into("w", WeightFormat::Q4_K, &bytes[..143], &mut out).is_err());
        assert!(widen_format_to_f32("w", WeightFormat::Q4_K, &bytes, 256).is_err());
        assert!(widen_format_to_f32("w", WeightFormat::Q4_K, &bytes, 288).is_err());
    }
}
