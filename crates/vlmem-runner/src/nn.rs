//! Small f32 building blocks shared by the vision tower and the text decoder, written with
//! the reference's exact arithmetic (two-pass LayerNorm, RMSNorm in f32, the two GELUs).

use crate::error::{Result, RunnerError};
use crate::weights::WeightSource;
use candle_core::{D, Tensor};
use candle_nn::ops::softmax_last_dim;

/// `x @ w^T + b` for `x: [rows, in]`, `w: [out, in]`, `b: [out]`.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let y = x.matmul(&w.t()?)?;
    Ok(match b {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    })
}

/// Default bound, in bytes, of one attention score tensor (`[heads, rows, keys]` f32) in the
/// prompt's forward pass and the vision tower: 32 MiB. See [`attention_in_row_chunks`].
pub const ATTENTION_SCORE_BYTES: usize = 32 << 20;

/// How many query rows of a `heads x keys` attention fit one score tensor of `score_bytes`
/// (at least one row, at most `rows`).
pub fn score_rows(heads: usize, keys: usize, score_bytes: usize, rows: usize) -> usize {
    let per_row_bytes = heads.max(1) * keys.max(1) * std::mem::size_of::<f32>();
    (score_bytes / per_row_bytes).clamp(1, rows.max(1))
}

/// Scaled dot-product attention of `q` (`[1, heads, n, d]`) over `k`, `v` (`[1, heads, keys,
/// d]`), computed a block of query rows at a time so that no score tensor exceeds
/// `score_bytes` (one row at least): at most two of them (the scores and their softmax) are
/// live at once, instead of the whole `[heads, n, keys]`, which for a large image (8,160
/// patches, 16 heads) would be 4.3 GB. `causal_past: Some(past)` makes query `i` see keys
/// `0..=past + i` only (the prompt after `past` cached tokens; `keys = past + n`); `None`
/// lets every query see every key (the vision tower's full attention per image). Returns
/// `[1, heads, n, d]`. The softmax of each row is the same whatever the blocking.
///
/// f32 tensors on the CPU go through the fused kernel [`crate::kernels::attention`], which
/// streams keys per block of query rows and never holds more than one small score tile per
/// task (so `score_bytes` does not matter there); `k` and `v` may then also have fewer heads
/// than `q` (grouped-query attention, query head `h` reading kv head `h / (heads /
/// kv_heads)`). Other tensors take [`attention_in_row_chunks_candle`].
pub fn attention_in_row_chunks(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    causal_past: Option<usize>,
    score_bytes: usize,
) -> Result<Tensor> {
    let cpu_f32 = |t: &Tensor| t.device().is_cpu() && t.dtype() == candle_core::DType::F32;
    if !(cpu_f32(q) && cpu_f32(k) && cpu_f32(v)) {
        return attention_in_row_chunks_candle(q, k, v, scale, causal_past, score_bytes);
    }
    let (b, heads, n, d) = q.dims4()?;
    let (kb, kv_heads, keys, kd) = k.dims4()?;
    let (vb, vh, vkeys, dv) = v.dims4()?;
    if (kb, kd) != (b, d) || (vb, vh, vkeys) != (b, kv_heads, keys) {
        return Err(RunnerError::BadRequest(format!(
            "attention of q {:?} over k {:?}, v {:?}",
            q.dims(),
            k.dims(),
            v.dims()
        )));
    }
    let shape = crate::kernels::attention::Shape {
        heads: b * heads,
        kv_heads: b * kv_heads,
        n,
        keys,
        d,
        dv,
        scale: scale as f32,
        past: causal_past,
    };
    // Batches folded into heads: query head `bi * heads + h` reads kv head
    // `(bi * heads + h) / groups = bi * kv_heads + h / groups`.
    if kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
        return Err(RunnerError::BadRequest(format!(
            "attention of {heads} query heads over {kv_heads} kv heads"
        )));
    }
    let out = with_values(q, |q| {
        with_values(k, |k| {
            with_values(v, |v| crate::kernels::attention::attention(q, k, v, &shape))
        })
    })?;
    Ok(Tensor::from_vec(out, (b, heads, n, dv), q.device())?)
}

/// [`attention_in_row_chunks`] on candle's tensor operations: `Q K^T` into a score tensor
/// of at most `score_bytes` per block of query rows, softmax, times `V`. Any device and
/// dtype; `k` and `v` with fewer heads than `q` (grouped-query attention) are repeated to
/// its heads first.
pub fn attention_in_row_chunks_candle(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    causal_past: Option<usize>,
    score_bytes: usize,
) -> Result<Tensor> {
    let (_, heads, n, _) = q.dims4()?;
    let kv_heads = k.dim(1)?;
    if kv_heads != heads {
        if kv_heads == 0 || !heads.is_multiple_of(kv_heads) || v.dim(1)? != kv_heads {
            return Err(RunnerError::BadRequest(format!(
                "attention of q {:?} over k {:?}, v {:?}",
                q.dims(),
                k.dims(),
                v.dims()
            )));
        }
        let (k, v) = (
            repeat_kv(k, heads / kv_heads)?,
            repeat_kv(v, heads / kv_heads)?,
        );
        return attention_in_row_chunks_candle(q, &k, &v, scale, causal_past, score_bytes);
    }
    let keys = k.dim(2)?;
    if let Some(past) = causal_past
        && past + n != keys
    {
        return Err(RunnerError::BadRequest(format!(
            "causal attention of {n} queries after {past} tokens over {keys} keys"
        )));
    }
    let rows = score_rows(heads, keys, score_bytes, n);
    let mut outs = Vec::with_capacity(n.div_ceil(rows));
    let mut start = 0;
    while start < n {
        let c = rows.min(n - start);
        let qc = q.narrow(2, start, c)?;
        let out = match causal_past {
            None => {
                let scores = (qc.matmul(&k.t()?)? * scale)?;
                softmax_last_dim(&scores)?.matmul(v)?
            }
            Some(past) => {
                // Keys after the block's last query are masked for every row: leave them out.
                let seen = past + start + c;
                let (kc, vc) = (k.narrow(2, 0, seen)?, v.narrow(2, 0, seen)?);
                let mut scores = (qc.matmul(&kc.t()?)? * scale)?;
                if c > 1 {
                    let mask = causal_mask(c, past + start, q.device())?;
                    scores = scores.broadcast_add(&mask)?;
                }
                softmax_last_dim(&scores)?.matmul(&vc)?
            }
        };
        outs.push(out);
        start += c;
    }
    if outs.len() == 1 {
        return Ok(outs.swap_remove(0));
    }
    Ok(Tensor::cat(&outs, 2)?)
}

/// Repeats each of the `kv_heads` heads `groups` times: `[b, kv, L, d] -> [b, kv*groups, L, d]`.
fn repeat_kv(t: &Tensor, groups: usize) -> Result<Tensor> {
    let (b, kvh, len, d) = t.dims4()?;
    Ok(t.unsqueeze(2)?
        .expand((b, kvh, groups, len, d))?
        .reshape((b, kvh * groups, len, d))?)
}

/// `[n, past + n]`: 0 where query `i` may see key `j` (`j <= past + i`), -inf elsewhere.
pub fn causal_mask(n: usize, past: usize, device: &candle_core::Device) -> Result<Tensor> {
    let total = past + n;
    let mut m = vec![0f32; n * total];
    for i in 0..n {
        for j in (past + i + 1)..total {
            m[i * total + j] = f32::NEG_INFINITY;
        }
    }
    Ok(Tensor::from_vec(m, (n, total), device)?)
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
    /// [`WeightSource::matvec`] (the decode kernel on tiered sources), more rows (up to
    /// [`WeightSource::matmul_rows_max`], any number on the CPU) through
    /// [`WeightSource::matmul`] (the tiled product on the stored weight,
    /// [`crate::kernels::gemm`]), past that through candle on the staged f32 tensor.
    pub fn linear(&self, name: &str, x: &Tensor) -> Result<Tensor> {
        let (n, _) = x.dims2()?;
        if n == 1 {
            let y = with_values(x, |xs| self.src.matvec(name, xs))?;
            let len = y.len();
            Ok(Tensor::from_vec(y, (1, len), x.device())?)
        } else if n <= self.src.matmul_rows_max(name) {
            let y = with_values(x, |xs| self.src.matmul(name, xs, n))?;
            let out = y.len().checked_div(n).unwrap_or(0);
            Ok(Tensor::from_vec(y, (n, out), x.device())?)
        } else {
            linear(x, &self.src.tensor_f32(name)?, None)
        }
    }

    /// `x @ W^T + b` for the weight `name` read as the matrix `[out, in]` of its first
    /// dimension by the product of the others (a 2-D weight as it is; a convolution whose
    /// stride equals its kernel, the patch embedding, as its flattened kernels) and the bias
    /// `bias` (`[out]`), for any number of rows: [`WeightSource::matmul`] on the stored
    /// weight, then the bias added to each row (as candle adds it after its matmul).
    pub fn linear_bias(&self, name: &str, bias: &str, x: &Tensor) -> Result<Tensor> {
        let (y, n, out) = self.linear_bias_rows(name, bias, x, |_, _| {})?;
        Ok(Tensor::from_vec(y, (n, out), x.device())?)
    }

    /// [`Params::linear_bias`] as values (`n` rows of the weight's `out` outputs, returned
    /// with `n` and `out`): the bias is added, then `then(first_row, rows)` runs on blocks of
    /// whole rows, in parallel on [`crate::kernels::pool`] (an activation or a rotation
    /// applied while the rows are in cache, before any tensor is made of them).
    pub fn linear_bias_rows(
        &self,
        name: &str,
        bias: &str,
        x: &Tensor,
        then: impl Fn(usize, &mut [f32]) + Sync,
    ) -> Result<(Vec<f32>, usize, usize)> {
        let (n, _) = x.dims2()?;
        let b = self.src.tensor_f32(bias)?.flatten_all()?.to_vec1::<f32>()?;
        let mut y = with_values(x, |xs| self.src.matmul(name, xs, n))?;
        if Some(y.len()) != n.checked_mul(b.len()) {
            return Err(RunnerError::BadRequest(format!(
                "{name}: {} outputs for {n} rows and a bias of {}",
                y.len(),
                b.len()
            )));
        }
        if !y.is_empty() {
            let pool = crate::kernels::pool::global();
            let per_task = n.div_ceil(4 * pool.threads()).max(1);
            pool.for_each(y.chunks_mut(per_task * b.len()).enumerate(), |(i, rows)| {
                for row in rows.chunks_exact_mut(b.len()) {
                    for (v, b) in row.iter_mut().zip(&b) {
                        *v += b;
                    }
                }
                then(i * per_task, rows);
            });
        }
        Ok((y, n, b.len()))
    }
}

/// Runs `f` on the values of the f32 tensor `x` in row-major order: borrowed from its
/// storage when it is contiguous on the CPU (a prompt's activations are not copied), else
/// copied out.
pub(crate) fn with_values<R>(x: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    {
        let (storage, layout) = x.storage_and_layout();
        if let (candle_core::Storage::Cpu(candle_core::CpuStorage::F32(values)), Some((a, b))) =
            (&*storage, layout.contiguous_offsets())
        {
            return f(&values[a..b]);
        }
    }
    let xs = x.flatten_all()?.to_vec1::<f32>()?;
    f(&xs)
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn tensor(shape: (usize, usize, usize, usize), seed: u32) -> Tensor {
        let n = shape.0 * shape.1 * shape.2 * shape.3;
        let values: Vec<f32> = (0..n as u32)
            .map(|i| {
                let x = i.wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8;
                (x % 2001) as f32 / 1000.0 - 1.0
            })
            .collect();
        Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
    }

    /// Plain attention in f64 on the whole score matrix.
    fn reference(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, past: Option<usize>) -> Vec<f32> {
        let (_, h, n, d) = q.dims4().unwrap();
        let keys = k.dim(2).unwrap();
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let (q, k, v) = (flat(q), flat(k), flat(v));
        let mut out = vec![0f32; h * n * d];
        for head in 0..h {
            for i in 0..n {
                let seen = past.map_or(keys, |p| p + i + 1);
                let qi = &q[(head * n + i) * d..][..d];
                let s: Vec<f64> = (0..seen)
                    .map(|j| {
                        let kj = &k[(head * keys + j) * d..][..d];
                        qi.iter()
                            .zip(kj)
                            .map(|(a, b)| *a as f64 * *b as f64)
                            .sum::<f64>()
                            * scale
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
                for c in 0..d {
                    let acc: f64 = (0..seen)
                        .map(|j| (s[j] - m).exp() / z * v[(head * keys + j) * d + c] as f64)
                        .sum();
                    out[(head * n + i) * d + c] = acc as f32;
                }
            }
        }
        out
    }

    #[test]
    fn row_blocks_match_whole_attention_causal_and_full() {
        let (h, n, d, past) = (3, 13, 8, 5);
        let q = tensor((1, h, n, d), 1);
        for (causal, keys) in [(None, 17), (Some(past), past + n), (Some(0), n)] {
            let k = tensor((1, h, keys, d), 2);
            let v = tensor((1, h, keys, d), 3);
            let want = reference(&q, &k, &v, 0.35, causal);
            // One row per block, uneven blocks, and everything in one block.
            for score_bytes in [1, 5 * h * keys * 4, usize::MAX] {
                // The fused kernel, then candle's operations.
                for (path, got) in [
                    attention_in_row_chunks(&q, &k, &v, 0.35, causal, score_bytes),
                    attention_in_row_chunks_candle(&q, &k, &v, 0.35, causal, score_bytes),
                ]
                .into_iter()
                .enumerate()
                {
                    let got = got.unwrap();
                    assert_eq!(got.dims4().unwrap(), (1, h, n, d));
                    let got = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                    let err = got
                        .iter()
                        .zip(&want)
                        .map(|(a, b)| (a - b).abs())
                        .fold(0f32, f32::max);
                    assert!(
                        err < 1e-5,
                        "path {path} {causal:?} {score_bytes}: max-abs {err}"
                    );
                }
            }
        }
    }

    /// Grouped-query attention (fewer kv heads than query heads) on both paths equals
    /// attention over the kv heads repeated to the query heads.
    #[test]
    fn grouped_kv_heads_match_repeated_heads_on_both_paths() {
        let (h, kvh, n, d) = (6, 2, 9, 16);
        let q = tensor((1, h, n, d), 4);
        for (causal, keys) in [(None, 21), (Some(4), 4 + n)] {
            let k = tensor((1, kvh, keys, d), 5);
            let v = tensor((1, kvh, keys, d), 6);
            let (kr, vr) = (
                repeat_kv(&k, h / kvh).unwrap(),
                repeat_kv(&v, h / kvh).unwrap(),
            );
            let want = reference(&q, &kr, &vr, 0.3, causal);
            for got in [
                attention_in_row_chunks(&q, &k, &v, 0.3, causal, 1 << 10),
                attention_in_row_chunks_candle(&q, &k, &v, 0.3, causal, 1 << 10),
            ] {
                let got = got
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                let err = got
                    .iter()
                    .zip(&want)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(err < 1e-5, "{causal:?}: max-abs {err}");
            }
        }
        let bad = tensor((1, 4, 21, d), 7);
        assert!(attention_in_row_chunks_candle(&q, &bad, &bad, 0.3, None, 1 << 10).is_err());
    }

    #[test]
    fn score_rows_bounds_the_block() {
        // 16 heads x 8,160 keys x 4 bytes = 522,240 bytes a row.
        assert_eq!(score_rows(16, 8160, 32 << 20, 8160), 64);
        assert_eq!(score_rows(16, 8160, 1, 8160), 1);
        assert_eq!(score_rows(16, 10, usize::MAX, 7), 7);
        assert_eq!(score_rows(0, 0, 0, 0), 1);
    }

    #[test]
    fn causal_attention_needs_past_plus_queries_keys() {
        let q = tensor((1, 2, 4, 8), 1);
        let k = tensor((1, 2, 9, 8), 2);
        for err in [
            attention_in_row_chunks(&q, &k, &k, 1.0, Some(3), 1 << 20).unwrap_err(),
            attention_in_row_chunks_candle(&q, &k, &k, 1.0, Some(3), 1 << 20).unwrap_err(),
        ] {
            assert!(
                err.to_string()
                    .contains("4 queries after 3 tokens over 9 keys"),
                "{err}"
            );
        }
    }
}
