//! The key/value cache behind a small trait, so the paged KV pool of the memory manager can
//! replace the simple growable tensors here without touching the decoder.

use crate::error::Result;
use candle_core::Tensor;

/// Per-layer storage of attention keys and values, `[1, kv_heads, tokens, head_dim]` f32.
pub trait KvStore {
    /// Appends `k` and `v` (`[1, kv_heads, new_tokens, head_dim]`) to layer `layer` and
    /// returns the layer's whole keys and values, the new ones last.
    fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)>;

    /// Tokens held (by layer 0; every layer holds the same number between steps).
    fn len_tokens(&self) -> usize;

    /// Drops everything.
    fn clear(&mut self);
}

/// Minimum token capacity of a layer's buffers.
const MIN_CAPACITY_TOKENS: usize = 64;

/// One layer's buffers, `[1, kv_heads, capacity, head_dim]`, the first `len` tokens valid.
#[derive(Debug, Clone)]
struct LayerKv {
    k: Tensor,
    v: Tensor,
    len: usize,
}

/// The simplest store: per layer, a key and a value buffer that doubles its token capacity
/// when full (amortised O(1) copying per token); appends write in place.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<Option<LayerKv>>,
}

impl KvCache {
    /// An empty cache for `layers` decoder layers.
    pub fn new(layers: usize) -> Self {
        KvCache {
            layers: vec![None; layers],
        }
    }

    /// f32 bytes of the valid keys and values of every layer.
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .map(|l| {
                let dims = l.k.dims();
                2 * dims[0] * dims[1] * l.len * dims[3] * 4
            })
            .sum()
    }
}

/// A zeroed buffer like `like` (`[b, h, _, d]`) with `tokens` rows, holding `like`'s first
/// `keep` tokens.
fn grow(like: &Tensor, keep: usize, tokens: usize) -> Result<Tensor> {
    let (b, h, _, d) = like.dims4()?;
    let buf = Tensor::zeros((b, h, tokens, d), like.dtype(), like.device())?;
    if keep > 0 {
        buf.slice_set(&like.narrow(2, 0, keep)?.contiguous()?, 2, 0)?;
    }
    Ok(buf)
}

impl KvStore for KvCache {
    fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        if layer >= self.layers.len() {
            self.layers.resize(layer + 1, None);
        }
        let new = k.dim(2)?;
        let k = k.contiguous()?;
        let v = v.contiguous()?;
        let slot = &mut self.layers[layer];
        let (len, capacity) = match slot {
            Some(l) => (l.len, l.k.dim(2)?),
            None => (0, 0),
        };
        let needed = len + new;
        if needed > capacity {
            let tokens = needed.max(capacity * 2).max(MIN_CAPACITY_TOKENS);
            let (nk, nv) = match slot {
                Some(l) => (grow(&l.k, len, tokens)?, grow(&l.v, len, tokens)?),
                None => (grow(&k, 0, tokens)?, grow(&v, 0, tokens)?),
            };
            *slot = Some(LayerKv { k: nk, v: nv, len });
        }
        let l = slot
            .as_mut()
            .ok_or_else(|| crate::error::RunnerError::BadRequest("KV slot vanished".into()))?;
        l.k.slice_set(&k, 2, len)?;
        l.v.slice_set(&v, 2, len)?;
        l.len = needed;
        Ok((l.k.narrow(2, 0, needed)?, l.v.narrow(2, 0, needed)?))
    }

    fn len_tokens(&self) -> usize {
        match self.layers.first() {
            Some(Some(l)) => l.len,
            _ => 0,
        }
    }

    fn clear(&mut self) {
        for l in &mut self.layers {
            *l = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn block(start: f32, tokens: usize) -> Tensor {
        let vals: Vec<f32> = (0..2 * tokens * 3).map(|i| start + i as f32).collect();
        Tensor::from_vec(vals, (1, 2, tokens, 3), &Device::Cpu).unwrap()
    }

    #[test]
    fn appends_equal_concatenation_across_growth() {
        let mut kv = KvCache::new(2);
        let mut want: Option<Tensor> = None;
        let mut start = 0.0;
        for step in 0..150 {
            let n = if step == 0 { 70 } else { 1 };
            let t = block(start, n);
            start += 1000.0;
            let (k, v) = kv.append(1, &t, &(&t * 2.0).unwrap()).unwrap();
            want = Some(match want {
                None => t.clone(),
                Some(w) => Tensor::cat(&[&w, &t], 2).unwrap(),
            });
            let w = want.as_ref().unwrap();
            let k4: Vec<f32> = k.flatten_all().unwrap().to_vec1().unwrap();
            let w4: Vec<f32> = w.flatten_all().unwrap().to_vec1().unwrap();
            assert_eq!(k4, w4, "step {step}");
            let v4: Vec<f32> = v.flatten_all().unwrap().to_vec1().unwrap();
            let wv: Vec<f32> = w4.iter().map(|x| x * 2.0).collect();
            assert_eq!(v4, wv, "step {step}");
        }
        assert_eq!(kv.len_tokens(), 0, "layer 0 untouched");
        assert_eq!(kv.bytes(), 2 * 2 * 219 * 3 * 4);
        kv.clear();
        assert_eq!(kv.bytes(), 0);
    }
}
