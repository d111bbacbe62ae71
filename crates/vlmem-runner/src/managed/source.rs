//! [`ManagedWeights`] as a [`WeightSource`]: the kernels on the stored bytes (pinned,
//! staged or streamed), rows of tables and expert slices.

use super::{ManagedWeights, usize_of, weight_type};
use crate::error::{Result, RunnerError};
use crate::kernels::{self, WeightFormat};
use crate::weights::{
    WeightSource, check_outputs, matvec_each_into, widen_blocks, widen_format_into,
};
use candle_core::Tensor;
use vlmem_qwen3vl::checkpoint::TensorInfo;

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

impl ManagedWeights {
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
}

impl WeightSource for ManagedWeights {
    fn tensor_f32(&self, name: &str) -> Result<Tensor> {
        let (_, info) = self.entry(name)?;
        let values = self.with_stored(name, |bytes| {
            widen_blocks(name, weight_type(name, info)?, bytes)
        })?;
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

    /// The tiled product on the stored bytes (prefill, the vision tower), the weight read
    /// as `[first dimension, the rest]`: pinned in place or staged, or for a streamed weight
    /// piece by piece as the pieces arrive (no buffer the size of the weight).
    fn matmul(&self, name: &str, x: &[f32], n: usize) -> Result<Vec<f32>> {
        let (h, info) = self.entry(name)?;
        let shape: Vec<usize> = info.shape.iter().map(|&d| d as usize).collect();
        let (rows, cols) = crate::weights::matrix_dims(name, &shape)?;
        let ty = weight_type(name, info)?;
        if let Some(s) = self.readahead.streamed(*h) {
            return self.matmul_streamed(name, *h, s, (rows, cols, ty), x, n);
        }
        self.with_stored(name, |bytes| kernels::matmul(bytes, ty, rows, cols, x, n))
    }

    fn expert_f32(&self, name: &str, expert: usize) -> Result<Tensor> {
        let (_, info) = self.entry(name)?;
        let (bytes, _, a, b) = self.expert_slice(name, expert)?;
        let values = widen_blocks(name, weight_type(name, info)?, &bytes)?;
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
        self.with_stored(name, |bytes| {
            widen_format_into(name, weight_type(name, info)?, bytes, out)
        })
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
        widen_format_into(name, weight_type(name, info)?, &bytes, out)
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
