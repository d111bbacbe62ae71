//! The key/value cache behind a small trait, so the paged KV pool of the memory manager can
//! replace the simple in-process store here without touching the decoder.
//!
//! Both stores hold each token's keys and values in a [`KvDtype`] (f32, bf16 or q8_0 blocks):
//! encoded on append, widened to f32 on every read. What a prompt's pass attends over (the
//! tensors [`KvStore::append`] returns, its own new tokens included) and what a decode step
//! reads ([`KvStore::read_rows`]) are the same rounded values, so a prompt processed in one
//! pass and token by token agree.

use crate::error::{Result, RunnerError};
use candle_core::{Device, Tensor};
pub use vlmem_qwen3vl::kv_dtype::{KvDtype, KvDtypeError};

/// Per-layer storage of attention keys and values, `[1, kv_heads, tokens, head_dim]`, held in
/// the store's [`KvDtype`] and read as f32.
pub trait KvStore {
    /// Appends `k` and `v` (`[1, kv_heads, new_tokens, head_dim]` f32) to layer `layer` and
    /// returns the layer's whole keys and values as the store holds them (rounded to its
    /// dtype, widened to f32), the new ones last.
    fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)>;

    /// Tokens held (by layer 0; every layer holds the same number between steps).
    fn len_tokens(&self) -> usize;

    /// The decode step's append: one token's keys then values (`kv_row`: `2 * kv_heads *
    /// head_dim` f32, keys first) go to layer `layer`, rounded to the store's dtype. Returns
    /// the layer's tokens.
    fn append_row(&mut self, layer: usize, kv_heads: usize, kv_row: &[f32]) -> Result<usize>;

    /// Copies tokens `start..` of layer `layer` into `out`, widened to f32, token by token as
    /// [`KvStore::append_row`] takes them (keys then values), as many as `out` holds whole
    /// rows of `row_len` values (e.g. a view of the step arena).
    fn read_rows(
        &mut self,
        layer: usize,
        start: usize,
        row_len: usize,
        out: &mut [f32],
    ) -> Result<()>;

    /// How the store holds keys and values.
    fn dtype(&self) -> KvDtype;

    /// Drops everything.
    fn clear(&mut self);

    /// Takes the keys and values of the longest prefix of a prompt that other requests'
    /// live blocks already hold, in whole blocks and short of the last key, into this
    /// empty store; returns the tokens taken (0 for a store that shares nothing).
    ///
    /// `keys` names the prompt's tokens for sharing: equal keys at equal positions after
    /// equal keys must mean equal keys and values (see [`prefix_keys`]). The tokens
    /// appended later, past `keys`, are never shared.
    fn share_prefix(&mut self, keys: &[u32]) -> Result<usize> {
        let _ = keys;
        Ok(0)
    }

    /// Tokens per shared block, for a store whose whole blocks can outlive it in another
    /// store (see [`KvStore::share_prefix`]); `None` for a store that shares nothing.
    fn block_tokens(&self) -> Option<usize> {
        None
    }

    /// Moves what only this store holds out of the compute tier (a sequence set aside under
    /// memory pressure); it comes back when next used. Returns the bytes freed there (0 for
    /// a store outside the manager).
    fn swap_out(&mut self) -> Result<u64> {
        Ok(0)
    }

    /// Keeps the first `tokens` tokens of every layer and drops the rest (a conversation
    /// whose re-rendered history differs from what the cache holds after them). A store
    /// that cannot drop tokens says so with an error and is left as it was.
    fn truncate(&mut self, tokens: usize) -> Result<()> {
        if tokens >= self.len_tokens() {
            return Ok(());
        }
        Err(RunnerError::BadRequest(
            "this KV store cannot drop tokens".into(),
        ))
    }
}

/// A KV dtype that cannot hold these rows or values, as the runner's error.
fn dtype_err(e: KvDtypeError) -> RunnerError {
    RunnerError::BadRequest(format!("KV cache: {e}"))
}

/// [`KvDtype::encode_into`], f32 as one copy.
fn encode(dtype: KvDtype, values: &[f32], out: &mut [u8]) -> Result<()> {
    match dtype {
        KvDtype::F32 if out.len() == 4 * values.len() => {
            out.copy_from_slice(bytemuck::cast_slice(values));
            Ok(())
        }
        _ => dtype.encode_into(values, out).map_err(dtype_err),
    }
}

/// [`KvDtype::decode_into`], f32 as one copy.
fn decode(dtype: KvDtype, bytes: &[u8], out: &mut [f32]) -> Result<()> {
    match dtype {
        KvDtype::F32 if bytes.len() == 4 * out.len() => {
            bytemuck::cast_slice_mut(out).copy_from_slice(bytes);
            Ok(())
        }
        _ => dtype.decode_into(bytes, out).map_err(dtype_err),
    }
}

/// `[1, heads, tokens, head_dim]` as `tokens` rows of `heads * head_dim` values.
fn token_rows(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.squeeze(0)?
        .transpose(0, 1)?
        .contiguous()?
        .flatten_all()?
        .to_vec1::<f32>()?)
}

/// The `[1, heads, tokens, head_dim]` shape of `k` and `v`, which must agree and be one
/// sequence.
fn kv_dims(k: &Tensor, v: &Tensor) -> Result<(usize, usize, usize)> {
    let (b, h, n, d) = k.dims4()?;
    if b != 1 || v.dims4()? != (b, h, n, d) {
        return Err(RunnerError::BadRequest(format!(
            "KV of shape {:?} / {:?}: keys and values of one sequence, alike",
            k.dims(),
            v.dims()
        )));
    }
    Ok((h, n, d))
}

/// Appends `k` and `v` (`[1, heads, tokens, dim]`) to `out` in `dtype`, token by token: each
/// token's key row, then its value row, `token_bytes` in all.
fn encode_tokens(
    dtype: KvDtype,
    k: &Tensor,
    v: &Tensor,
    token_bytes: usize,
    out: &mut Vec<u8>,
) -> Result<()> {
    let (kr, vr) = (token_rows(k)?, token_rows(v)?);
    let (_, n, _) = kv_dims(k, v)?;
    let row = kr.len() / n.max(1);
    let half = token_bytes / 2;
    let at = out.len();
    out.resize(at + n * token_bytes, 0);
    for (t, dst) in out[at..].chunks_exact_mut(token_bytes).enumerate() {
        let (dk, dv) = dst.split_at_mut(half);
        encode(dtype, &kr[t * row..(t + 1) * row], dk)?;
        encode(dtype, &vr[t * row..(t + 1) * row], dv)?;
    }
    Ok(())
}

/// A layer's `tokens` encoded entries (as [`encode_tokens`] wrote them) widened to its keys
/// and values, `[1, heads, tokens, dim]` each on `device`.
fn widen_layer(
    dtype: KvDtype,
    bytes: &[u8],
    (heads, tokens, dim): (usize, usize, usize),
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let row = heads * dim;
    let mut all = vec![0f32; tokens * 2 * row];
    decode(dtype, bytes, &mut all)?;
    let mut ks = Vec::with_capacity(tokens * row);
    let mut vs = Vec::with_capacity(tokens * row);
    for entry in all.chunks_exact(2 * row) {
        ks.extend_from_slice(&entry[..row]);
        vs.extend_from_slice(&entry[row..]);
    }
    let shape = |xs: Vec<f32>| -> Result<Tensor> {
        Ok(Tensor::from_vec(xs, (tokens, heads, dim), device)?
            .transpose(0, 1)?
            .contiguous()?
            .unsqueeze(0)?)
    };
    Ok((shape(ks)?, shape(vs)?))
}

/// One layer of a [`KvCache`]: its heads and head size, and its tokens' encoded entries.
#[derive(Debug, Clone)]
struct LayerKv {
    heads: usize,
    dim: usize,
    token_bytes: usize,
    bytes: Vec<u8>,
}

impl LayerKv {
    fn len(&self) -> usize {
        self.bytes.len() / self.token_bytes.max(1)
    }
}

/// The simplest store, in process: per layer, its tokens' keys and values encoded in the
/// store's dtype, end to end in one growable buffer.
#[derive(Debug, Clone)]
pub struct KvCache {
    dtype: KvDtype,
    layers: Vec<Option<LayerKv>>,
}

impl Default for KvCache {
    fn default() -> Self {
        KvCache::new(0)
    }
}

impl KvCache {
    /// An empty cache for `layers` decoder layers holding f32 (exact).
    pub fn new(layers: usize) -> Self {
        KvCache::with_dtype(layers, KvDtype::F32)
    }

    /// An empty cache for `layers` decoder layers holding keys and values in `dtype`.
    pub fn with_dtype(layers: usize, dtype: KvDtype) -> Self {
        KvCache {
            dtype,
            layers: vec![None; layers],
        }
    }

    /// Bytes of the keys and values held, every layer, as stored (in the store's dtype).
    pub fn bytes(&self) -> usize {
        self.layers.iter().flatten().map(|l| l.bytes.len()).sum()
    }

    /// Layer `layer`, started for `heads x dim` on first use; an error when it holds
    /// another shape or the dtype cannot hold its rows.
    fn layer_mut(&mut self, layer: usize, heads: usize, dim: usize) -> Result<&mut LayerKv> {
        if layer >= self.layers.len() {
            self.layers.resize(layer + 1, None);
        }
        let dtype = self.dtype;
        let slot = &mut self.layers[layer];
        if let Some(l) = slot.as_ref()
            && (l.heads, l.dim) != (heads, dim)
        {
            return Err(RunnerError::BadRequest(format!(
                "KV of {heads} heads x {dim} for a layer of {} x {}",
                l.heads, l.dim
            )));
        }
        if slot.is_none() {
            let token_bytes = dtype
                .token_bytes(heads as u64, dim as u64)
                .map_err(dtype_err)? as usize;
            *slot = Some(LayerKv {
                heads,
                dim,
                token_bytes,
                bytes: Vec::new(),
            });
        }
        slot.as_mut()
            .ok_or_else(|| RunnerError::BadRequest("KV slot vanished".into()))
    }
}

impl KvStore for KvCache {
    fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let (h, _, d) = kv_dims(k, v)?;
        let dtype = self.dtype;
        let l = self.layer_mut(layer, h, d)?;
        let before = l.bytes.len();
        if let Err(e) = encode_tokens(dtype, k, v, l.token_bytes, &mut l.bytes) {
            l.bytes.truncate(before);
            return Err(e);
        }
        widen_layer(dtype, &l.bytes, (h, l.len(), d), k.device())
    }

    fn append_row(&mut self, layer: usize, kv_heads: usize, kv_row: &[f32]) -> Result<usize> {
        let row = kv_row.len() / 2;
        if kv_heads == 0 || row * 2 != kv_row.len() || !row.is_multiple_of(kv_heads) {
            return Err(RunnerError::BadRequest(format!(
                "a KV row of {} values for {kv_heads} heads",
                kv_row.len()
            )));
        }
        let dtype = self.dtype;
        let l = self.layer_mut(layer, kv_heads, row / kv_heads)?;
        let at = l.bytes.len();
        l.bytes.resize(at + l.token_bytes, 0);
        let (dk, dv) = l.bytes[at..].split_at_mut(l.token_bytes / 2);
        let encoded =
            encode(dtype, &kv_row[..row], dk).and_then(|()| encode(dtype, &kv_row[row..], dv));
        if let Err(e) = encoded {
            l.bytes.truncate(at);
            return Err(e);
        }
        Ok(l.len())
    }

    fn read_rows(
        &mut self,
        layer: usize,
        start: usize,
        row_len: usize,
        out: &mut [f32],
    ) -> Result<()> {
        let l = self
            .layers
            .get(layer)
            .and_then(Option::as_ref)
            .ok_or_else(|| RunnerError::BadRequest(format!("layer {layer} holds no KV")))?;
        let n = out.len() / row_len.max(1);
        if row_len != 2 * l.heads * l.dim || start + n > l.len() {
            return Err(RunnerError::BadRequest(format!(
                "KV rows {start}..{} of {row_len} values; layer {layer} holds {} of {}",
                start + n,
                l.len(),
                2 * l.heads * l.dim
            )));
        }
        let tb = l.token_bytes;
        decode(
            self.dtype,
            &l.bytes[start * tb..(start + n) * tb],
            &mut out[..n * row_len],
        )
    }

    fn dtype(&self) -> KvDtype {
        self.dtype
    }

    fn len_tokens(&self) -> usize {
        match self.layers.first() {
            Some(Some(l)) => l.len(),
            _ => 0,
        }
    }

    fn clear(&mut self) {
        for l in &mut self.layers {
            *l = None;
        }
    }

    /// The buffers stay; only the valid length shrinks.
    fn truncate(&mut self, tokens: usize) -> Result<()> {
        for slot in &mut self.layers {
            match slot {
                Some(_) if tokens == 0 => *slot = None,
                Some(l) => {
                    let keep = tokens.min(l.len()) * l.token_bytes;
                    l.bytes.truncate(keep);
                }
                None => {}
            }
        }
        Ok(())
    }
}

/// The KV cache in the memory manager's paged pool ([`vlmem::KvPool`]): one pool sequence
/// per decoder layer, each token's keys and values (`[kv_heads, head_dim]` each, in the
/// store's [`KvDtype`]) one entry of [`KvDtype::token_bytes`]. Blocks live in the manager's
/// tiers under its KV budget; whole layers' sequences swap out under pressure and come back
/// when read. A decode step's read lands in its f32 view of the step arena and is widened
/// there, in place: no other buffer.
///
/// The decoder does not pass token ids to the cache: a store names its tokens by position in
/// a fresh namespace (salt) of its own and shares no blocks, unless the prompt's keys are
/// given first ([`KvStore::share_prefix`]): then it takes the namespace shared by every such
/// store, its prompt's tokens are named by those keys and the tokens after them by keys no
/// prompt has ([`GENERATED_KEY`] and the position), so only prompt blocks are ever shared.
pub struct PagedKv {
    pool: std::sync::Arc<vlmem::KvPool>,
    salt: u64,
    /// The prompt's keys, given by [`KvStore::share_prefix`] (then `shared`).
    keys: Vec<u32>,
    shared: bool,
    layers: Vec<Option<(vlmem::SeqId, usize)>>,
    kv_heads: usize,
    head_dim: usize,
    dtype: KvDtype,
    /// Bytes of one token's entry in one layer.
    token_bytes: usize,
    /// A decode step's encoded row, kept between steps.
    row_bytes: Vec<u8>,
}

impl std::fmt::Debug for PagedKv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PagedKv")
            .field("layers", &self.layers.len())
            .field("tokens", &self.len_tokens())
            .field("dtype", &self.dtype)
            .finish_non_exhaustive()
    }
}

static NEXT_SALT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// The namespace of stores that share prompt blocks (private ones count up from `1 << 16`).
const SHARED_SALT: u64 = 1 << 63;

/// The keys of an image's pad tokens: this bit and 30 bits of the image's content hash mixed
/// with the pad's index (text ids are far below it: vocabularies hold under 2^30 ids).
pub const IMAGE_KEY: u32 = 1 << 30;

/// The keys of the tokens a shared store holds past its prompt: this bit and the position.
/// No prompt key has it, so no block holding such a token is ever shared.
pub const GENERATED_KEY: u32 = 1 << 31;

/// The sharing keys of a prompt ([`KvStore::share_prefix`]): each text token's id, and for
/// the `k`-th pad (`image_token_id`) of image `j`, [`IMAGE_KEY`] with 30 bits of a mix of
/// `image_hashes[j]` and `k` (images take their `pads[j]` pads in order). Two prompts get
/// equal keys up to a position exactly when their tokens and the images before it are
/// equal, but for a collision of those 30 bits on every pad of a block.
pub fn prefix_keys(
    ids: &[u32],
    image_token_id: u32,
    image_hashes: &[u64],
    pads: &[usize],
) -> Vec<u32> {
    let mut image = 0;
    let mut k = 0usize;
    ids.iter()
        .map(|&id| {
            if id != image_token_id {
                return id;
            }
            while image < pads.len() && k >= pads[image] {
                image += 1;
                k = 0;
            }
            let h = image_hashes.get(image).copied().unwrap_or(0);
            k += 1;
            // splitmix64's finalizer over the hash and the pad's index.
            let mut x = h ^ (k as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            x ^= x >> 31;
            IMAGE_KEY | (x as u32 & (IMAGE_KEY - 1))
        })
        .collect()
}

impl PagedKv {
    /// A store for `layers` layers of `kv_heads x head_dim` in `dtype` over `pool`, whose
    /// `bytes_per_token` must be `dtype.token_bytes(kv_heads, head_dim)`; an error when it is
    /// not, or when a row of `kv_heads * head_dim` values is not whole blocks of `dtype`.
    pub fn new(
        pool: std::sync::Arc<vlmem::KvPool>,
        layers: usize,
        kv_heads: usize,
        head_dim: usize,
        dtype: KvDtype,
    ) -> Result<Self> {
        let want = dtype
            .token_bytes(kv_heads as u64, head_dim as u64)
            .map_err(dtype_err)?;
        if pool.config().bytes_per_token != want {
            return Err(crate::error::RunnerError::BadRequest(format!(
                "the KV pool stores {} bytes per token; this model's KV in {dtype} needs {want}",
                pool.config().bytes_per_token
            )));
        }
        Ok(PagedKv {
            pool,
            salt: NEXT_SALT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) << 16,
            keys: Vec::new(),
            shared: false,
            layers: vec![None; layers],
            kv_heads,
            head_dim,
            dtype,
            token_bytes: want as usize,
            row_bytes: Vec::new(),
        })
    }
    /// Layer `layer`'s pool sequence and its length, started on first use.
    fn layer_seq(&mut self, layer: usize) -> Result<(vlmem::SeqId, usize)> {
        if layer >= self.layers.len() {
            self.layers.resize(layer + 1, None);
        }
        match self.layers[layer] {
            Some(x) => Ok(x),
            None => {
                let (seq, _) = self
                    .pool
                    .start_salted(self.salt + layer as u64, &[])
                    .map_err(Self::kv_err)?;
                // Recorded now, so a failed first append does not leak the sequence.
                self.layers[layer] = Some((seq, 0));
                Ok((seq, 0))
            }
        }
    }

    /// The key of the token at `position`: the prompt's key, else a private one.
    fn key(&self, position: usize) -> u32 {
        match self.keys.get(position) {
            Some(&k) => k,
            None if self.shared => GENERATED_KEY | (position as u32 & (GENERATED_KEY - 1)),
            None => position as u32,
        }
    }

    fn kv_err(e: vlmem::KvError) -> crate::error::RunnerError {
        crate::error::RunnerError::KvCache(e)
    }
}

impl KvStore for PagedKv {
    fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let (h, n, d) = kv_dims(k, v)?;
        if h != self.kv_heads || d != self.head_dim {
            return Err(crate::error::RunnerError::BadRequest(format!(
                "KV of shape {:?} / {:?} for a cache of {} heads x {}",
                k.dims(),
                v.dims(),
                self.kv_heads,
                self.head_dim
            )));
        }
        let mut bytes = Vec::with_capacity(n * self.token_bytes);
        encode_tokens(self.dtype, k, v, self.token_bytes, &mut bytes)?;
        let (seq, len) = self.layer_seq(layer)?;
        let ids: Vec<u32> = (len..len + n).map(|p| self.key(p)).collect();
        self.pool.append(seq, &ids, &bytes).map_err(Self::kv_err)?;
        let total = len + n;
        self.layers[layer] = Some((seq, total));
        let mut all = vec![0u8; total * self.token_bytes];
        self.pool
            .read_range(seq, 0, &mut all)
            .map_err(Self::kv_err)?;
        widen_layer(self.dtype, &all, (h, total, d), k.device())
    }

    fn len_tokens(&self) -> usize {
        match self.layers.first() {
            Some(Some((_, len))) => *len,
            _ => 0,
        }
    }

    /// The row is encoded into a buffer kept between steps and appended as those bytes.
    fn append_row(&mut self, layer: usize, kv_heads: usize, kv_row: &[f32]) -> Result<usize> {
        let row = self.kv_heads * self.head_dim;
        if kv_heads != self.kv_heads || kv_row.len() != 2 * row {
            return Err(RunnerError::BadRequest(format!(
                "a KV row of {} values for {kv_heads} heads; the cache holds {} heads x {}",
                kv_row.len(),
                self.kv_heads,
                self.head_dim
            )));
        }
        self.row_bytes.resize(self.token_bytes, 0);
        let (dk, dv) = self.row_bytes.split_at_mut(self.token_bytes / 2);
        encode(self.dtype, &kv_row[..row], dk)?;
        encode(self.dtype, &kv_row[row..], dv)?;
        let (seq, len) = self.layer_seq(layer)?;
        self.pool
            .append(seq, &[self.key(len)], &self.row_bytes)
            .map_err(Self::kv_err)?;
        self.layers[layer] = Some((seq, len + 1));
        Ok(len + 1)
    }

    /// Read from the pool straight into the front of `out`'s bytes, then widened there.
    fn read_rows(
        &mut self,
        layer: usize,
        start: usize,
        row_len: usize,
        out: &mut [f32],
    ) -> Result<()> {
        let (seq, _) = self
            .layers
            .get(layer)
            .copied()
            .flatten()
            .ok_or_else(|| RunnerError::BadRequest(format!("layer {layer} holds no KV")))?;
        if row_len != 2 * self.kv_heads * self.head_dim {
            return Err(RunnerError::BadRequest(format!(
                "KV rows of {row_len} values; the cache holds {} heads x {}",
                self.kv_heads, self.head_dim
            )));
        }
        let n = out.len() / row_len;
        let out = &mut out[..n * row_len];
        self.pool
            .read_range(
                seq,
                start,
                &mut bytemuck::cast_slice_mut::<f32, u8>(out)[..n * self.token_bytes],
            )
            .map_err(Self::kv_err)?;
        self.dtype.decode_in_place(out).map_err(dtype_err)
    }

    fn dtype(&self) -> KvDtype {
        self.dtype
    }

    fn clear(&mut self) {
        for l in &mut self.layers {
            if let Some((seq, _)) = l.take() {
                let _ = self.pool.finish(seq);
            }
        }
    }

    /// The pool's prefix index finds the prompt's sealed blocks by `keys` in the shared
    /// namespace; each layer takes them (layers that found more are cut to the fewest).
    fn share_prefix(&mut self, keys: &[u32]) -> Result<usize> {
        if self.layers.iter().any(Option::is_some) || self.shared {
            return Err(RunnerError::BadRequest(
                "a KV store shares a prefix only before its first token".into(),
            ));
        }
        self.salt = SHARED_SALT;
        self.shared = true;
        self.keys = keys.to_vec();
        let mut fewest = usize::MAX;
        for layer in 0..self.layers.len() {
            let (seq, taken) = self
                .pool
                .start_salted(self.salt + layer as u64, keys)
                .map_err(Self::kv_err)?;
            self.layers[layer] = Some((seq, taken));
            fewest = fewest.min(taken);
        }
        if fewest == usize::MAX {
            return Ok(0);
        }
        self.truncate(fewest)?;
        Ok(fewest)
    }

    fn block_tokens(&self) -> Option<usize> {
        Some(self.pool.config().block_tokens as usize)
    }

    /// Each layer's sequence goes out whole; its first use brings it back.
    fn swap_out(&mut self) -> Result<u64> {
        let mut freed = 0u64;
        for (seq, _) in self.layers.iter().flatten() {
            freed = freed.saturating_add(self.pool.swap_out(*seq).map_err(Self::kv_err)?);
        }
        Ok(freed)
    }

    /// Pool blocks are sealed and shared, never shortened: each layer gets a new sequence
    /// that takes the old one's whole blocks before `tokens` by reference (found by the
    /// store's keys in its namespace, see [`PagedKv`]), copies
    /// the few tokens of the partial block after them, and the old sequence is finished.
    /// A layer that fails keeps its old sequence (the caller clears the store).
    fn truncate(&mut self, tokens: usize) -> Result<()> {
        let bpt = self.pool.config().bytes_per_token as usize;
        for layer in 0..self.layers.len() {
            let Some((old, len)) = self.layers[layer] else {
                continue;
            };
            if tokens >= len {
                continue;
            }
            if tokens == 0 {
                self.layers[layer] = None;
                self.pool.finish(old).map_err(Self::kv_err)?;
                continue;
            }
            let ids: Vec<u32> = (0..tokens).map(|p| self.key(p)).collect();
            let (new, shared) = self
                .pool
                .start_salted(self.salt + layer as u64, &ids)
                .map_err(Self::kv_err)?;
            let mut rest = vec![0u8; (tokens - shared) * bpt];
            let copied = self
                .pool
                .read_range(old, shared, &mut rest)
                .and_then(|()| self.pool.append(new, &ids[shared..], &rest));
            if let Err(e) = copied {
                let _ = self.pool.finish(new);
                return Err(Self::kv_err(e));
            }
            self.layers[layer] = Some((new, tokens));
            self.pool.finish(old).map_err(Self::kv_err)?;
        }
        Ok(())
    }
}

impl Drop for PagedKv {
    fn drop(&mut self) {
        self.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use vlmem::{KvPool, KvPoolConfig, ManagerConfig, MemoryManager, TensorKind, Tier};

    /// `[1, heads, tokens, dim]` of consecutive values from `start`, scaled by `step`.
    fn block(start: f32, tokens: usize, heads: usize, dim: usize, step: f32) -> Tensor {
        let vals: Vec<f32> = (0..heads * tokens * dim)
            .map(|i| (start + i as f32) * step)
            .collect();
        Tensor::from_vec(vals, (1, heads, tokens, dim), &Device::Cpu).unwrap()
    }

    fn flat(x: &Tensor) -> Vec<f32> {
        x.flatten_all().unwrap().to_vec1().unwrap()
    }

    /// A pool of 16-token blocks for `heads x dim` in `dtype`, on a manager whose host KV
    /// budget holds `host_blocks` blocks (`None`: ample).
    fn pool(heads: usize, dim: usize, dtype: KvDtype, host_blocks: Option<u64>) -> Arc<KvPool> {
        let bytes_per_token = dtype.token_bytes(heads as u64, dim as u64).unwrap();
        let mut c = ManagerConfig::with_capacities(1 << 20, 16 << 20, 64 << 20);
        if let Some(blocks) = host_blocks {
            c.budgets.bytes[Tier::Host.index()][TensorKind::KvCache.index()] =
                blocks * 16 * bytes_per_token;
        }
        let m = MemoryManager::new(c).unwrap();
        Arc::new(
            KvPool::new(
                m,
                KvPoolConfig {
                    block_tokens: 16,
                    bytes_per_token,
                    compute_tier: Tier::Host,
                },
            )
            .unwrap(),
        )
    }

    use std::sync::Arc;

    /// Whole layers come back as the concatenation of what was appended, rounded to the
    /// dtype, across the buffer's growth; the stored bytes are the dtype's.
    #[test]
    fn appends_equal_the_rounded_concatenation() {
        for (dtype, value_bytes) in [(KvDtype::F32, 4), (KvDtype::Bf16, 2)] {
            let mut kv = KvCache::with_dtype(2, dtype);
            let mut want: Option<Tensor> = None;
            let mut start = 0.0;
            for step in 0..150 {
                let n = if step == 0 { 70 } else { 1 };
                let t = block(start, n, 2, 3, 0.37);
                start += 1000.0;
                let (k, v) = kv.append(1, &t, &(&t * 2.0).unwrap()).unwrap();
                want = Some(match want {
                    None => t.clone(),
                    Some(w) => Tensor::cat(&[&w, &t], 2).unwrap(),
                });
                let w = flat(want.as_ref().unwrap());
                assert_eq!(
                    flat(&k),
                    dtype.round_trip(&w).unwrap(),
                    "{dtype} step {step}"
                );
                let wv: Vec<f32> = w.iter().map(|x| x * 2.0).collect();
                assert_eq!(
                    flat(&v),
                    dtype.round_trip(&wv).unwrap(),
                    "{dtype} step {step}"
                );
            }
            assert_eq!(kv.len_tokens(), 0, "layer 0 untouched");
            assert_eq!(kv.bytes(), 2 * 2 * 219 * 3 * value_bytes);
            kv.clear();
            assert_eq!(kv.bytes(), 0);
        }
    }

    /// Rows that are not whole q8_0 blocks (2 heads x 3) and a pool of another dtype's
    /// bytes are errors from every entry point, never panics, and leave nothing behind.
    #[test]
    fn shapes_a_dtype_cannot_hold_are_errors() {
        let mut kv = KvCache::with_dtype(2, KvDtype::Q8_0);
        let t = block(0.0, 2, 2, 3, 1.0);
        assert!(kv.append(0, &t, &t).is_err());
        assert!(kv.append_row(0, 2, &[0.5; 12]).is_err());
        assert_eq!(kv.len_tokens(), 0);
        let f32_pool = pool(2, 16, KvDtype::F32, None);
        assert!(PagedKv::new(f32_pool.clone(), 2, 2, 3, KvDtype::Q8_0).is_err());
        let err = PagedKv::new(f32_pool.clone(), 2, 2, 16, KvDtype::Bf16).unwrap_err();
        assert!(err.to_string().contains("bf16"), "{err}");
        // Values q8_0 cannot scale: an error, and the store holds what it held.
        let q_pool = pool(2, 16, KvDtype::Q8_0, None);
        let mut stores: Vec<Box<dyn KvStore>> = vec![
            Box::new(KvCache::with_dtype(1, KvDtype::Q8_0)),
            Box::new(PagedKv::new(q_pool.clone(), 1, 2, 16, KvDtype::Q8_0).unwrap()),
        ];
        for store in &mut stores {
            assert_eq!(store.append_row(0, 2, &[0.25; 64]).unwrap(), 1);
            let mut bad = vec![0.25f32; 64];
            bad[40] = f32::NAN;
            assert!(store.append_row(0, 2, &bad).is_err());
            let (inf, ok) = (
                block(0.0, 1, 2, 16, f32::INFINITY),
                block(0.0, 1, 2, 16, 1.0),
            );
            assert!(store.append(0, &inf, &ok).is_err());
            let ok = block(0.0, 1, 2, 32, 0.01);
            assert!(store.append(0, &ok, &ok).is_err(), "a wrong head size");
            assert_eq!(store.len_tokens(), 1);
            let mut out = vec![0f32; 64];
            store.read_rows(0, 0, 64, &mut out).unwrap();
            assert_eq!(out, KvDtype::Q8_0.round_trip(&[0.25; 64]).unwrap());
        }
    }

    #[test]
    fn the_paged_store_returns_what_the_simple_one_does() {
        let (heads, dim) = (2usize, 16usize);
        for dtype in KvDtype::ALL {
            // Room for 4 blocks of 16 tokens on the host: later layers push earlier ones out.
            let pool = pool(heads, dim, dtype, Some(4));
            let mut paged = PagedKv::new(pool.clone(), 2, heads, dim, dtype).unwrap();
            let mut simple = KvCache::with_dtype(2, dtype);
            assert_eq!((paged.dtype(), simple.dtype()), (dtype, dtype));
            let mut start = 0.0;
            for step in 0..40 {
                let n = if step == 0 { 21 } else { 1 };
                for layer in 0..2 {
                    let t = block(start, n, heads, dim, 0.013);
                    start += 100.0;
                    let v = (&t * -1.0).unwrap();
                    let (pk, pv) = paged.append(layer, &t, &v).unwrap();
                    let (sk, sv) = simple.append(layer, &t, &v).unwrap();
                    assert_eq!(pk.dims(), sk.dims());
                    assert_eq!(
                        flat(&pk),
                        flat(&sk),
                        "{dtype} keys, step {step} layer {layer}"
                    );
                    assert_eq!(
                        flat(&pv),
                        flat(&sv),
                        "{dtype} values, step {step} layer {layer}"
                    );
                }
            }
            assert_eq!(paged.len_tokens(), 60);
            assert!(pool.stats().swap_outs > 0, "{:?}", pool.stats());
            // A wrong shape is an error, not a panic.
            let one = block(0.0, 1, heads, dim, 1.0);
            assert!(
                paged
                    .append(0, &one, &block(0.0, 2, heads, dim, 1.0))
                    .is_err()
            );
            drop(paged);
            assert_eq!(
                pool.stats().blocks,
                0,
                "dropping the store frees its blocks"
            );
            assert!(
                PagedKv::new(pool, 2, 4, dim, dtype).is_err(),
                "bytes per token must match"
            );
        }
    }

    /// Dropping a store's last tokens keeps exactly the first ones (read back as appended,
    /// rounded, from both stores), later appends follow them, the paged store's whole blocks
    /// before the cut are taken by reference rather than copied, and nothing leaks.
    #[test]
    fn a_truncated_store_keeps_its_first_tokens_and_grows_from_there() {
        let (heads, dim) = (2usize, 16usize);
        let row = 2 * heads * dim;
        for dtype in KvDtype::ALL {
            let pool = pool(heads, dim, dtype, None);
            let mut stores: Vec<Box<dyn KvStore>> = vec![
                Box::new(KvCache::with_dtype(2, dtype)),
                Box::new(PagedKv::new(pool.clone(), 2, heads, dim, dtype).unwrap()),
            ];
            for (which, store) in stores.iter_mut().enumerate() {
                let mut ledger: Vec<Vec<f32>> = vec![Vec::new(); 2];
                let append = |store: &mut Box<dyn KvStore>, ledger: &mut Vec<Vec<f32>>, n, base| {
                    for (layer, rows) in ledger.iter_mut().enumerate() {
                        for t in 0..n {
                            let new: Vec<f32> = (0..row)
                                .map(|i| (base + t * 100 + layer * 10 + i) as f32 * 0.01)
                                .collect();
                            store.append_row(layer, heads, &new).unwrap();
                            rows.extend_from_slice(&dtype.round_trip(&new).unwrap());
                        }
                    }
                };
                append(store, &mut ledger, 40, 0);
                for (cut, grow) in [(37, 0), (20, 15), (34, 0), (32, 3), (0, 5)] {
                    let before = pool.stats().prefix_hit_tokens;
                    store.truncate(cut).unwrap();
                    if which == 1 && cut > 16 {
                        assert!(
                            pool.stats().prefix_hit_tokens >= before + 16,
                            "whole blocks before the cut are shared, not copied"
                        );
                    }
                    assert_eq!(store.len_tokens(), cut);
                    for rows in &mut ledger {
                        rows.truncate(cut * row);
                    }
                    append(store, &mut ledger, grow, 10_000 * (cut + 1));
                    let held = cut + grow;
                    assert_eq!(store.len_tokens(), held);
                    for (layer, rows) in ledger.iter().enumerate() {
                        if held == 0 {
                            continue;
                        }
                        let mut out = vec![f32::NAN; held * row];
                        store.read_rows(layer, 0, row, &mut out).unwrap();
                        assert_eq!(&out[..], &rows[..], "{dtype} cut {cut} layer {layer}");
                    }
                }
                store.truncate(100).unwrap();
                assert_eq!(store.len_tokens(), 5, "a longer length keeps everything");
            }
            drop(stores);
            assert_eq!(pool.stats().blocks, 0, "no block leaks: {:?}", pool.stats());
            assert_eq!(pool.stats().sequences, 0);
        }
    }

    /// The decode step's row interface: after a prompt appended as tensors, rows appended one
    /// at a time read back, from any start and in any chunk, as exactly what was appended
    /// rounded to the dtype (keys then values per token), from both stores, with layers
    /// swapping out between; and the tensors a prompt's append returns are those same
    /// rounded values, so a prompt's pass attends over what decode steps read.
    #[test]
    fn rows_read_back_what_was_appended_from_both_stores() {
        let (heads, dim) = (2usize, 16usize);
        let row = 2 * heads * dim;
        for dtype in KvDtype::ALL {
            let pool = pool(heads, dim, dtype, Some(4));
            let mut stores: Vec<Box<dyn KvStore>> = vec![
                Box::new(KvCache::with_dtype(3, dtype)),
                Box::new(PagedKv::new(pool.clone(), 3, heads, dim, dtype).unwrap()),
            ];
            for store in stores.iter_mut() {
                // The ledger: every token's row per layer, as [k heads..., v heads...].
                let mut ledger: Vec<Vec<f32>> = vec![Vec::new(); 3];
                for (layer, rows_of_layer) in ledger.iter_mut().enumerate() {
                    let k = block(layer as f32 * 1000.0, 5, heads, dim, 0.007);
                    let v = (&k * -1.0).unwrap();
                    let (ka, va) = store.append(layer, &k, &v).unwrap();
                    let (kr, vr) = (token_rows(&k).unwrap(), token_rows(&v).unwrap());
                    let (kr, vr) = (
                        dtype.round_trip(&kr).unwrap(),
                        dtype.round_trip(&vr).unwrap(),
                    );
                    assert_eq!(token_rows(&ka).unwrap(), kr, "{dtype}: the prompt's keys");
                    assert_eq!(token_rows(&va).unwrap(), vr, "{dtype}: the prompt's values");
                    if dtype != KvDtype::F32 {
                        assert_ne!(kr, token_rows(&k).unwrap(), "{dtype} rounds");
                    }
                    for t in 0..5 {
                        rows_of_layer.extend_from_slice(&kr[t * row / 2..(t + 1) * row / 2]);
                        rows_of_layer.extend_from_slice(&vr[t * row / 2..(t + 1) * row / 2]);
                    }
                }
                for step in 0..30 {
                    for (layer, rows) in ledger.iter_mut().enumerate() {
                        let new: Vec<f32> = (0..row)
                            .map(|i| (step * 100 + layer * 10 + i) as f32 * 0.01 - 3.0)
                            .collect();
                        let held = store.append_row(layer, heads, &new).unwrap();
                        rows.extend_from_slice(&dtype.round_trip(&new).unwrap());
                        assert_eq!(held * row, rows.len());
                        for (start, n) in [(0, held), (held - 1, 1), (held / 3, held / 2)] {
                            let mut out = vec![f32::NAN; n * row];
                            store.read_rows(layer, start, row, &mut out).unwrap();
                            assert_eq!(&out[..], &rows[start * row..(start + n) * row]);
                        }
                    }
                }
                // Past the end, a wrong row or a wrong head count: errors, not panics.
                let mut out = vec![0f32; 2 * row];
                assert!(store.read_rows(0, 34, row, &mut out).is_err());
                assert!(store.read_rows(0, 0, row + 1, &mut out).is_err());
                assert!(store.append_row(0, heads, &out[..row - 1]).is_err());
                assert!(store.read_rows(7, 0, row, &mut out).is_err());
            }
            assert!(pool.stats().swap_outs > 0, "{dtype}: {:?}", pool.stats());
        }
    }
}
