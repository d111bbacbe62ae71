//! Small f32 building blocks shared by the vision tower and the text decoder, written with
//! the reference's exact arithmetic (two-pass LayerNorm, RMSNorm in f32, the two GELUs).

use crate::error::{Result, RunnerError};
use crate::weights::WeightSource;
use candle_core::{D, Tensor};

/// `x @ w^T + b` for `x: [rows, in]`, `w: [out, in]`, `b: [out]`.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let y = x.matmul(&w.t()?)?;
    Ok(match b {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    })
}

/// LayerNorm over the last dimension, two-pass (mean, then the variance of the centred
/// values) as torch computes it.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let dim = x.dim(D::Minus1)? as f64;
    let mean = (x.sum_keepdim(D::Minus1)? / dim)?;
    let centred = x.broadcast_sub(&mean)?;
    let var = (centred.sqr()?.sum_keepdim(D::Minus1)? / dim)?;
    let inv_std = (var + eps)?.sqrt()?.recip()?;
    Ok(centred
        .broadcast_mul(&inv_std)?
        .broadcast_mul(w)?
        .broadcast_add(b)?)
}

/// Qwen3's RMSNorm over the last dimension: `w * x / sqrt(mean(x^2) + eps)`.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let dim = x.dim(D::Minus1)? as f64;
    let ms = (x.sqr()?.sum_keepdim(D::Minus1)? / dim)?;
    let inv = (ms + eps)?.sqrt()?.recip()?;
    Ok(x.broadcast_mul(&inv)?.broadcast_mul(w)?)
}

/// `gelu_pytorch_tanh`: the tanh approximation of GELU (the ViT blocks' MLP).
pub fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    Ok(x.gelu()?)
}

/// Exact GELU, `x * Phi(x)` with erf (the mergers' `nn.GELU()`).
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    Ok(x.gelu_erf()?)
}

/// Fetches weights by name and checks their shapes against what the config implies, so a
/// checkpoint that disagrees with its config is a typed error, not a shape failure deep in
/// the arithmetic.
#[derive(Clone, Copy)]
pub struct Params<'a> {
    src: &'a dyn WeightSource,
}

impl<'a> Params<'a> {
    /// Wraps a weight source.
    pub fn new(src: &'a dyn WeightSource) -> Self {
        Params { src }
    }

    /// The tensor `name`, which must have shape `shape`.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        check_shape(self.src, name, shape)?;
        self.src.tensor_f32(name)
    }

    /// The tensor `name` in whatever shape it is stored.
    pub fn get_any(&self, name: &str) -> Result<Tensor> {
        self.src.tensor_f32(name)
    }

    /// The stored shape of `name`.
    pub fn shape(&self, name: &str) -> Result<Vec<usize>> {
        self.src
            .shape(name)
            .ok_or_else(|| RunnerError::MissingTensor {
                name: name.to_string(),
            })
    }

    /// Whether the source has `name`.
    pub fn has(&self, name: &str) -> bool {
        self.src.shape(name).is_some()
    }

    /// Rows `ids` of the 2-D table `name`.
    pub fn rows(&self, name: &str, ids: &[u32]) -> Result<Tensor> {
        self.src.rows_f32(name, ids)
    }

    /// The weight source.
    pub fn source(&self) -> &'a dyn WeightSource {
        self.src
    }

    /// [`Params::linear`] of several weights on the same `x`: one row goes through
    /// [`WeightSource::matvec_many`] (one parallel pass), more rows one weight at a time.
    pub fn linear_many(&self, names: &[&str], x: &Tensor) -> Result<Vec<Tensor>> {
        let (n, _) = x.dims2()?;
        if n != 1 {
            return names.iter().map(|name| self.linear(name, x)).collect();
        }
        let xs = x.flatten_all()?.to_vec1::<f32>()?;
        self.src
            .matvec_many(names, &xs)?
            .into_iter()
            .map(|y| {
                let len = y.len();
                Ok(Tensor::from_vec(y, (1, len), x.device())?)
            })
            .collect()
    }

    /// `x @ W^T` for the 2-D weight `name` (`[out, in]`): a one-row `x` goes through
    /// [`WeightSource::matvec`] (the bf16 kernel on tiered sources), up to
    /// [`WeightSource::matmul_rows_max`] rows through [`WeightSource::matmul`], more rows
    /// through candle on the staged f32 tensor.
    pub fn linear(&self, name: &str, x: &Tensor) -> Result<Tensor> {
        let (n, _) = x.dims2()?;
        if n == 1 {
            let xs = x.flatten_all()?.to_vec1::<f32>()?;
            let y = self.src.matvec(name, &xs)?;
            let len = y.len();
            Ok(Tensor::from_vec(y, (1, len), x.device())?)
        } else if n <= self.src.matmul_rows_max(name) {
            let xs = x.flatten_all()?.to_vec1::<f32>()?;
            let y = self.src.matmul(name, &xs, n)?;
            let out = y.len() / n;
            Ok(Tensor::from_vec(y, (n, out), x.device())?)
        } else {
            linear(x, &self.src.tensor_f32(name)?, None)
        }
    }
}

/// Errors unless `name` exists with exactly `shape`.
pub fn check_shape(src: &dyn WeightSource, name: &str, shape: &[usize]) -> Result<()> {
    let found = src.shape(name).ok_or_else(|| RunnerError::MissingTensor {
        name: name.to_string(),
    })?;
    if found != shape {
        return Err(RunnerError::TensorShape {
            name: name.to_string(),
            expected: format!("{shape:?}"),
            found,
        });
    }
    Ok(())
}
