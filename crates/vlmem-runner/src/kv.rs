//! The key/value cache behind a small trait, so the paged KV pool of the memory manager can
//! replace the simple growable tensors here without touching the decoder.

use crate::error::{Result, RunnerError};
use candle_core::Tensor;

/// Per-layer storage of attention keys and values, `[1, kv_heads, tokens, head_dim]` f32.
pub trait KvStore {
    /// Appends `k` and `v` (`[1, kv_heads, new_tokens, head_dim]`) to layer `layer` and
    /// returns the layer's whole keys and values, the new ones last.
    fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)>;

    /// Tokens held (by layer 0; every layer holds the same number between steps).
    fn len_tokens(&self) -> usize;

    /// The decode step's append: one token's keys then values (`kv_row`: `2 * kv_heads *
    /// head_dim` f32, keys first) go to layer `layer`. Returns the layer's tokens.
    fn append_row(&mut self, layer: usize, kv_heads: usize, kv_row: &[f32]) -> Result<usize>;

    /// Copies tokens `start..` of layer `layer` into `out`, token by token as
    /// [`KvStore::append_row`] takes them (keys then values), as many as `out` holds whole
    /// rows of `row_len` values (e.g. a view of the step arena).
    fn read_rows(
        &mut self,
        layer: usize,
        start: usize,
        row_len: usize,
        out: &mut [f32],
    ) -> Result<()>;

    /// Drops everything.
    fn clear(&mut self);

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

/// Minimum token capacity of a layer's buffers.
const MIN_CAPACITY_TOKENS: usize = 64;

/// One layer's buffers, `[1, kv_heads, capacity, head_dim]`, the first `len` tokens valid.
#[derive(Debug, Clone)]
struct LayerKv {
    k: Tensor,
    v: Tensor,
    len: usize,
}

/// `[1, heads, tokens, head_dim]` as `tokens` rows of `heads * head_dim` values.
fn token_rows(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.squeeze(0)?
        .transpose(0, 1)?
        .contiguous()?
        .flatten_all()?
        .to_vec1::<f32>()?)
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

    fn append_row(&mut self, layer: usize, kv_heads: usize, kv_row: &[f32]) -> Result<usize> {
        let row = kv_row.len() / 2;
        if kv_heads == 0 || row * 2 != kv_row.len() || !row.is_multiple_of(kv_heads) {
            return Err(RunnerError::BadRequest(format!(
                "a KV row of {} values for {kv_heads} heads",
                kv_row.len()
            )));
        }
        let d = row / kv_heads;
        let dev = candle_core::Device::Cpu;
        let k = Tensor::from_slice(&kv_row[..row], (1, kv_heads, 1, d), &dev)?;
        let v = Tensor::from_slice(&kv_row[row..], (1, kv_heads, 1, d), &dev)?;
        let (ka, _) = self.append(layer, &k, &v)?;
        Ok(ka.dim(2)?)
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
        let (_, h, _, d) = l.k.dims4()?;
        let half = row_len / 2;
        let n = out.len() / row_len.max(1);
        if row_len != 2 * h * d || start + n > l.len {
            return Err(RunnerError::BadRequest(format!(
                "KV rows {start}..{} of {row_len} values; layer {layer} holds {} of {}",
                start + n,
                l.len,
                2 * h * d
            )));
        }
        let ks = token_rows(&l.k.narrow(2, start, n)?)?;
        let vs = token_rows(&l.v.narrow(2, start, n)?)?;
        for (t, dst) in out.chunks_exact_mut(row_len).take(n).enumerate() {
            dst[..half].copy_from_slice(&ks[t * half..(t + 1) * half]);
            dst[half..].copy_from_slice(&vs[t * half..(t + 1) * half]);
        }
        Ok(())
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

    /// The buffers stay; only the valid length shrinks.
    fn truncate(&mut self, tokens: usize) -> Result<()> {
        for slot in &mut self.layers {
            match slot {
                Some(_) if tokens == 0 => *slot = None,
                Some(l) => l.len = l.len.min(tokens),
                None => {}
            }
        }
        Ok(())
    }
}

/// The KV cache in the memory manager's paged pool ([`vlmem::KvPool`]): one pool sequence
/// per decoder layer, each token's keys and values (f32, `[kv_heads, head_dim]` each) one
/// entry of `2 * kv_heads * head_dim * 4` bytes. Blocks live in the manager's tiers under its
/// KV budget; whole layers' sequences swap out under pressure and come back when read.
///
/// The decoder does not pass token ids to the cache, so each store takes a fresh namespace
/// (salt) and shares no blocks with other requests: prefix sharing needs the ids.
pub struct PagedKv {
    pool: std::sync::Arc<vlmem::KvPool>,
    salt: u64,
    layers: Vec<Option<(vlmem::SeqId, usize)>>,
    kv_heads: usize,
    head_dim: usize,
}

impl std::fmt::Debug for PagedKv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PagedKv")
            .field("layers", &self.layers.len())
            .field("tokens", &self.len_tokens())
            .finish_non_exhaustive()
    }
}

static NEXT_SALT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

impl PagedKv {
    /// A store for `layers` layers of `kv_heads x head_dim` over `pool`, whose
    /// `bytes_per_token` must be `2 * kv_heads * head_dim * 4`.
    pub fn new(
        pool: std::sync::Arc<vlmem::KvPool>,
        layers: usize,
        kv_heads: usize,
        head_dim: usize,
    ) -> Result<Self> {
        let want = (2 * kv_heads * head_dim * 4) as u64;
        if pool.config().bytes_per_token != want {
            return Err(crate::error::RunnerError::BadRequest(format!(
                "the KV pool stores {} bytes per token; this model needs {want}",
                pool.config().bytes_per_token
            )));
        }
        Ok(PagedKv {
            pool,
            salt: NEXT_SALT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) << 16,
            layers: vec![None; layers],
            kv_heads,
            head_dim,
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

    fn kv_err(e: vlmem::KvError) -> crate::error::RunnerError {
        crate::error::RunnerError::KvCache(e)
    }
}

impl KvStore for PagedKv {
    fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let (b, h, n, d) = k.dims4()?;
        if b != 1 || h != self.kv_heads || d != self.head_dim || v.dims4()? != (b, h, n, d) {
            return Err(crate::error::RunnerError::BadRequest(format!(
                "KV of shape {:?} / {:?} for a cache of {} heads x {}",
                k.dims(),
                v.dims(),
                self.kv_heads,
                self.head_dim
            )));
        }
        let (seq, len) = self.layer_seq(layer)?;
        // Per token: its keys, then its values.
        let (kr, vr) = (token_rows(k)?, token_rows(v)?);
        let row = h * d;
        let mut bytes = Vec::with_capacity(2 * kr.len() * 4);
        for t in 0..n {
            for x in kr[t * row..(t + 1) * row]
                .iter()
                .chain(&vr[t * row..(t + 1) * row])
            {
                bytes.extend_from_slice(&x.to_le_bytes());
            }
        }
        // Token ids are positions here (the namespace keeps requests apart).
        let ids: Vec<u32> = (len..len + n).map(|p| p as u32).collect();
        self.pool.append(seq, &ids, &bytes).map_err(Self::kv_err)?;
        let total = len + n;
        self.layers[layer] = Some((seq, total));
        let mut all = vec![0u8; total * 2 * row * 4];
        self.pool
            .read_range(seq, 0, &mut all)
            .map_err(Self::kv_err)?;
        let mut ks = Vec::with_capacity(total * row);
        let mut vs = Vec::with_capacity(total * row);
        for (t, chunk) in all.chunks_exact(2 * row * 4).enumerate() {
            let _ = t;
            let vals = chunk
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]));
            for (i, x) in vals.enumerate() {
                if i < row {
                    ks.push(x);
                } else {
                    vs.push(x);
                }
            }
        }
        let dev = k.device();
        let shape = |xs: Vec<f32>| -> Result<Tensor> {
            Ok(Tensor::from_vec(xs, (total, h, d), dev)?
                .transpose(0, 1)?
                .contiguous()?
                .unsqueeze(0)?)
        };
        Ok((shape(ks)?, shape(vs)?))
    }

    fn len_tokens(&self) -> usize {
        match self.layers.first() {
            Some(Some((_, len))) => *len,
            _ => 0,
        }
    }

    /// The pool stores exactly this layout: the row is appended as its bytes, with no other
    /// buffer.
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
        let (seq, len) = self.layer_seq(layer)?;
        self.pool
            .append(seq, &[len as u32], bytemuck::cast_slice(kv_row))
            .map_err(Self::kv_err)?;
        self.layers[layer] = Some((seq, len + 1));
        Ok(len + 1)
    }

    /// Read from the pool straight into `out`.
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
        self.pool
            .read_range(
                seq,
                start,
                bytemuck::cast_slice_mut(&mut out[..n * row_len]),
            )
            .map_err(Self::kv_err)
    }

    fn clear(&mut self) {
        for l in &mut self.layers {
            if let Some((seq, _)) = l.take() {
                let _ = self.pool.finish(seq);
            }
        }
    }

    /// Pool blocks are sealed and shared, never shortened: each layer gets a new sequence
    /// that takes the old one's whole blocks before `tokens` by reference (the store's ids
    /// are positions in its own namespace, so the pool's prefix index finds them), copies
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
            let ids: Vec<u32> = (0..tokens).map(|p| p as u32).collect();
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

    #[test]
    fn the_paged_store_returns_what_the_simple_one_does() {
        use vlmem::{KvPool, KvPoolConfig, ManagerConfig, MemoryManager, TensorKind, Tier};
        let mut c = ManagerConfig::with_capacities(1 << 20, 16 << 20, 64 << 20);
        // Room for 4 blocks of 16 tokens on the host: later layers push earlier ones out.
        c.budgets.bytes[Tier::Host.index()][TensorKind::KvCache.index()] = 4 * 16 * 48;
        let m = MemoryManager::new(c).unwrap();
        let pool = std::sync::Arc::new(
            KvPool::new(
                m.clone(),
                KvPoolConfig {
                    block_tokens: 16,
                    bytes_per_token: 2 * 2 * 3 * 4,
                    compute_tier: Tier::Host,
                },
            )
            .unwrap(),
        );
        let mut paged = PagedKv::new(pool.clone(), 2, 2, 3).unwrap();
        let mut simple = KvCache::new(2);
        let mut start = 0.0;
        for step in 0..40 {
            let n = if step == 0 { 21 } else { 1 };
            for layer in 0..2 {
                let t = block(start, n);
                start += 100.0;
                let v = (&t * -1.0).unwrap();
                let (pk, pv) = paged.append(layer, &t, &v).unwrap();
                let (sk, sv) = simple.append(layer, &t, &v).unwrap();
                let flat = |x: &Tensor| -> Vec<f32> { x.flatten_all().unwrap().to_vec1().unwrap() };
                assert_eq!(pk.dims(), sk.dims());
                assert_eq!(flat(&pk), flat(&sk), "keys, step {step} layer {layer}");
                assert_eq!(flat(&pv), flat(&sv), "values, step {step} layer {layer}");
            }
        }
        assert_eq!(paged.len_tokens(), 60);
        assert!(pool.stats().swap_outs > 0, "{:?}", pool.stats());
        // A wrong shape is an error, not a panic.
        assert!(paged.append(0, &block(0.0, 1), &block(0.0, 2)).is_err());
        drop(paged);
        assert_eq!(
            pool.stats().blocks,
            0,
            "dropping the store frees its blocks"
        );
        assert!(
            PagedKv::new(pool, 2, 4, 3).is_err(),
            "bytes per token must match"
        );
    }

    /// Dropping a store's last tokens keeps exactly the first ones (read back as appended,
    /// from both stores), later appends follow them, the paged store's whole blocks before
    /// the cut are taken by reference rather than copied, and nothing leaks.
    #[test]
    fn a_truncated_store_keeps_its_first_tokens_and_grows_from_there() {
        use vlmem::{KvPool, KvPoolConfig, ManagerConfig, MemoryManager};
        let (heads, dim) = (2usize, 3usize);
        let row = 2 * heads * dim;
        let m = MemoryManager::new(ManagerConfig::with_capacities(1 << 20, 16 << 20, 64 << 20))
            .unwrap();
        let pool = std::sync::Arc::new(
            KvPool::new(
                m,
                KvPoolConfig {
                    block_tokens: 16,
                    bytes_per_token: (row * 4) as u64,
                    compute_tier: vlmem::Tier::Host,
                },
            )
            .unwrap(),
        );
        let mut stores: Vec<Box<dyn KvStore>> = vec![
            Box::new(KvCache::new(2)),
            Box::new(PagedKv::new(pool.clone(), 2, heads, dim).unwrap()),
        ];
        for (which, store) in stores.iter_mut().enumerate() {
            let mut ledger: Vec<Vec<f32>> = vec![Vec::new(); 2];
            let append = |store: &mut Box<dyn KvStore>, ledger: &mut Vec<Vec<f32>>, n, base| {
                for (layer, rows) in ledger.iter_mut().enumerate() {
                    for t in 0..n {
                        let new: Vec<f32> = (0..row)
                            .map(|i| (base + t * 100 + layer * 10 + i) as f32)
                            .collect();
                        store.append_row(layer, heads, &new).unwrap();
                        rows.extend_from_slice(&new);
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
                    assert_eq!(&out[..], &rows[..], "cut {cut} layer {layer}");
                }
            }
            store.truncate(100).unwrap();
            assert_eq!(store.len_tokens(), 5, "a longer length keeps everything");
        }
        drop(stores);
        assert_eq!(pool.stats().blocks, 0, "no block leaks: {:?}", pool.stats());
        assert_eq!(pool.stats().sequences, 0);
    }

    /// The decode step's row interface: after a prompt appended as tensors, rows appended one
    /// at a time read back, from any start and in any chunk, as exactly what was appended
    /// (keys then values per token), from both stores, with layers swapping out between.
    #[test]
    fn rows_read_back_what_was_appended_from_both_stores() {
        use vlmem::{KvPool, KvPoolConfig, ManagerConfig, MemoryManager, TensorKind, Tier};
        let (heads, dim) = (2usize, 3usize);
        let row = 2 * heads * dim;
        let mut c = ManagerConfig::with_capacities(1 << 20, 16 << 20, 64 << 20);
        c.budgets.bytes[Tier::Host.index()][TensorKind::KvCache.index()] = 4 * 16 * 48;
        let m = MemoryManager::new(c).unwrap();
        let pool = std::sync::Arc::new(
            KvPool::new(
                m,
                KvPoolConfig {
                    block_tokens: 16,
                    bytes_per_token: (row * 4) as u64,
                    compute_tier: Tier::Host,
                },
            )
            .unwrap(),
        );
        let mut stores: Vec<Box<dyn KvStore>> = vec![
            Box::new(KvCache::new(3)),
            Box::new(PagedKv::new(pool.clone(), 3, heads, dim).unwrap()),
        ];
        for store in stores.iter_mut() {
            // The ledger: every token's row per layer, as [k heads..., v heads...].
            let mut ledger: Vec<Vec<f32>> = vec![Vec::new(); 3];
            for (layer, rows_of_layer) in ledger.iter_mut().enumerate() {
                let k = block(layer as f32 * 1000.0, 5);
                let v = (&k * -1.0).unwrap();
                store.append(layer, &k, &v).unwrap();
                let (kr, vr) = (token_rows(&k).unwrap(), token_rows(&v).unwrap());
                for t in 0..5 {
                    rows_of_layer.extend_from_slice(&kr[t * row / 2..(t + 1) * row / 2]);
                    rows_of_layer.extend_from_slice(&vr[t * row / 2..(t + 1) * row / 2]);
                }
            }
            for step in 0..30 {
                for (layer, rows) in ledger.iter_mut().enumerate() {
                    let new: Vec<f32> = (0..row)
                        .map(|i| (step * 100 + layer * 10 + i) as f32)
                        .collect();
                    let held = store.append_row(layer, heads, &new).unwrap();
                    rows.extend_from_slice(&new);
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
        assert!(pool.stats().swap_outs > 0, "{:?}", pool.stats());
    }
}
