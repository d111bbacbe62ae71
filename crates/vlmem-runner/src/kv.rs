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

/// The simplest store: one growing tensor pair per layer (concatenated on append).
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    /// An empty cache for `layers` decoder layers.
    pub fn new(layers: usize) -> Self {
        KvCache {
            layers: vec![None; layers],
        }
    }

    /// f32 bytes held, keys and values of every layer.
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .map(|(k, v)| (k.elem_count() + v.elem_count()) * 4)
            .sum()
    }
}

impl KvStore for KvCache {
    fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        if layer >= self.layers.len() {
            self.layers.resize(layer + 1, None);
        }
        let joined = match &self.layers[layer] {
            None => (k.contiguous()?, v.contiguous()?),
            Some((pk, pv)) => (Tensor::cat(&[pk, k], 2)?, Tensor::cat(&[pv, v], 2)?),
        };
        self.layers[layer] = Some(joined.clone());
        Ok(joined)
    }

    fn len_tokens(&self) -> usize {
        match self.layers.first() {
            Some(Some((k, _))) => k.dims().get(2).copied().unwrap_or(0),
            _ => 0,
        }
    }

    fn clear(&mut self) {
        for l in &mut self.layers {
            *l = None;
        }
    }
}
