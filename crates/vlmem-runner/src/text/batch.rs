//! One decode step for a batch of sequences: each sequence's next token at its own position,
//! after its own KV cache, through one pass over the weights. Every projection multiplies
//! the batch's rows together ([`crate::weights::WeightSource::matmul`]: the weight read
//! once for all rows, as a batch's decode is bound by reading weights); the norms, rotary
//! embedding and attention run row by row with the single-row step's own functions, each
//! sequence against its own cache.
//!
//! Batch invariance: a row's logits are bit for bit those of
//! [`TextDecoder::decode_in_arena`] for that sequence alone whenever the kernels' product of
//! `n` rows equals their single-row product for each row (see
//! [`crate::kernels::matmul`]); the element-wise arithmetic and the attention are the same
//! code in the same order.

use super::attend::{
    ATTENTION_FORK_ELEMS, AttentionBufs, AttentionShape, KV_CHUNK_TOKENS, attend_chunked,
};
use super::step::{
    AttentionDims, MoeBufs, add_in_place, head_norm_in_place, rms_norm_into, rope_in_place, silu,
};
use super::{EMBED_TOKENS, PREFIX, TextDecoder};
use crate::error::{Result, RunnerError};
use crate::kv::KvStore;
use crate::nn::Params;

/// One sequence's part of a batched decode step.
pub struct BatchRow<'k> {
    /// The token fed back.
    pub token: u32,
    /// Its text position (the same on all three M-RoPE axes).
    pub position: i64,
    /// The sequence's KV cache; the token's keys and values are appended to it.
    pub kv: &'k mut dyn KvStore,
}

impl TextDecoder {
    /// One decode step for every row of `rows` in one pass over the weights; returns each
    /// row's next-token logits, in order. A row whose token is outside the vocabulary fails
    /// the whole step before any cache is touched; an error after that (a KV cache that
    /// cannot grow, a weight that cannot be read) leaves the rows' caches holding the step's
    /// keys and values for some layers only: the caller drops those sequences' caches.
    pub fn decode_batch(&self, p: &Params, rows: &mut [BatchRow<'_>]) -> Result<Vec<Vec<f32>>> {
        let n = rows.len();
        if n == 0 {
            return Ok(Vec::new());
        }
        for (i, r) in rows.iter().enumerate() {
            if r.token as usize >= self.vocab_size() {
                return Err(RunnerError::TokenOutOfVocab {
                    id: r.token,
                    position: i,
                    vocab_size: self.vocab_size(),
                });
            }
        }
        let c = &self.cfg;
        let src = p.source();
        let eps = c.rms_norm_eps as f32;
        let AttentionDims {
            head_dim: hd,
            heads: nh,
            kv_heads: nkv,
            groups,
            scale,
        } = self.attention_dims()?;
        let hidden = c.hidden_size as usize;
        let kv_width = nkv * hd;
        let q_width = nh * hd;
        let half = self.inv_freq.len();
        let tokens: Vec<usize> = rows.iter().map(|r| r.kv.len_tokens() + 1).collect();

        let mut h = vec![0f32; n * hidden];
        for (r, hr) in rows.iter().zip(h.chunks_exact_mut(hidden)) {
            src.row_into(EMBED_TOKENS, r.token, hr)?;
        }
        let (mut cos, mut sin) = (vec![0f32; n * half], vec![0f32; n * half]);
        for ((r, cs), sn) in rows
            .iter()
            .zip(cos.chunks_exact_mut(half))
            .zip(sin.chunks_exact_mut(half))
        {
            for ((c, s), &f) in cs.iter_mut().zip(sn.iter_mut()).zip(&self.inv_freq) {
                let angle = r.position as f32 * f;
                *c = angle.cos();
                *s = angle.sin();
            }
        }
        let mut x = vec![0f32; n * hidden];
        let mut norm = vec![0f32; hidden];
        let mut head_norm = vec![0f32; hd];
        let mut att = vec![0f32; n * q_width];
        let mut kv_row = vec![0f32; 2 * kv_width];
        let chunk_max = tokens
            .iter()
            .map(|&t| t.min(KV_CHUNK_TOKENS))
            .max()
            .unwrap_or(1);
        let mut cache = vec![0f32; chunk_max * 2 * kv_width];
        let mut scores = vec![0f32; nh * chunk_max];
        let mut softmax = vec![0f32; 2 * nh];
        let layers = self.num_layers();
        for l in 0..layers {
            src.begin_layer(l, layers);
            let pre = format!("{PREFIX}.layers.{l}");
            // Attention.
            src.values_into(&format!("{pre}.input_layernorm.weight"), &mut norm)?;
            norm_rows(&h, &norm, eps, &mut x, hidden);
            let mut q = src.matmul(&format!("{pre}.self_attn.q_proj.weight"), &x, n)?;
            let mut k = src.matmul(&format!("{pre}.self_attn.k_proj.weight"), &x, n)?;
            let v = src.matmul(&format!("{pre}.self_attn.v_proj.weight"), &x, n)?;
            check_len("q_proj", q.len(), n * q_width)?;
            check_len("k_proj", k.len(), n * kv_width)?;
            check_len("v_proj", v.len(), n * kv_width)?;
            src.values_into(&format!("{pre}.self_attn.q_norm.weight"), &mut head_norm)?;
            for (i, qr) in q.chunks_exact_mut(q_width).enumerate() {
                head_norm_in_place(qr, &head_norm, eps);
                rope_in_place(qr, row(&cos, i, half), row(&sin, i, half));
            }
            src.values_into(&format!("{pre}.self_attn.k_norm.weight"), &mut head_norm)?;
            for (i, kr) in k.chunks_exact_mut(kv_width).enumerate() {
                head_norm_in_place(kr, &head_norm, eps);
                rope_in_place(kr, row(&cos, i, half), row(&sin, i, half));
            }
            for (i, r) in rows.iter_mut().enumerate() {
                kv_row[..kv_width].copy_from_slice(row(&k, i, kv_width));
                kv_row[kv_width..].copy_from_slice(row(&v, i, kv_width));
                let held = r.kv.append_row(l, nkv, &kv_row)?;
                if held != tokens[i] {
                    return Err(RunnerError::BadRequest(format!(
                        "layer {l}'s KV cache of batch row {i} holds {held} tokens, expected {}",
                        tokens[i]
                    )));
                }
                // The single-row step's views: a chunk of at most this row's context.
                let chunk = tokens[i].min(KV_CHUNK_TOKENS);
                let kv = &mut *r.kv;
                attend_chunked(
                    AttentionShape {
                        head_dim: hd,
                        groups,
                        kv_row: 2 * kv_width,
                        scale,
                    },
                    tokens[i],
                    |start, rows: &mut [f32]| kv.read_rows(l, start, 2 * kv_width, rows),
                    AttentionBufs {
                        q: row(&q, i, q_width),
                        cache: &mut cache[..chunk * 2 * kv_width],
                        scores: &mut scores[..nh * chunk],
                        softmax: &mut softmax,
                        att: &mut att[i * q_width..(i + 1) * q_width],
                    },
                    nh * chunk * hd >= ATTENTION_FORK_ELEMS,
                )?;
            }
            let out = src.matmul(&format!("{pre}.self_attn.o_proj.weight"), &att, n)?;
            check_len("o_proj", out.len(), n * hidden)?;
            add_in_place(&mut h, &out);
            // MLP.
            src.values_into(&format!("{pre}.post_attention_layernorm.weight"), &mut norm)?;
            norm_rows(&h, &norm, eps, &mut x, hidden);
            let out = if self.is_sparse(l) {
                self.moe_rows(p, &pre, l, &x, n)?
            } else {
                let i = c.intermediate_size as usize;
                let mut gate = src.matmul(&format!("{pre}.mlp.gate_proj.weight"), &x, n)?;
                let up = src.matmul(&format!("{pre}.mlp.up_proj.weight"), &x, n)?;
                check_len("gate_proj", gate.len(), n * i)?;
                check_len("up_proj", up.len(), n * i)?;
                for (g, &u) in gate.iter_mut().zip(&up) {
                    *g = silu(*g) * u;
                }
                src.matmul(&format!("{pre}.mlp.down_proj.weight"), &gate, n)?
            };
            check_len("mlp", out.len(), n * hidden)?;
            add_in_place(&mut h, &out);
        }
        src.begin_layer(layers, layers);
        src.values_into(&format!("{PREFIX}.norm.weight"), &mut norm)?;
        norm_rows(&h, &norm, eps, &mut x, hidden);
        let logits = src.matmul(self.lm_head_name(), &x, n)?;
        let vocab = self.vocab_size();
        check_len("lm_head", logits.len(), n * vocab)?;
        Ok(logits.chunks_exact(vocab).map(<[f32]>::to_vec).collect())
    }

    /// The MoE block of each of `n` rows of `x`, one row at a time (each row routes to its own
    /// experts) with the single-row step's arithmetic; `n x hidden` values.
    fn moe_rows(
        &self,
        p: &Params,
        pre: &str,
        layer: usize,
        x: &[f32],
        n: usize,
    ) -> Result<Vec<f32>> {
        let hidden = self.cfg.hidden_size as usize;
        let lens = vlmem_qwen3vl::placement::decode_step_lens(&self.cfg, 1);
        let (mut gate, mut act, mut router, mut expert_out) = (
            vec![0f32; lens[13] as usize],
            vec![0f32; lens[14] as usize],
            vec![0f32; lens[15] as usize],
            vec![0f32; lens[16] as usize],
        );
        let mut out = vec![0f32; n * hidden];
        for (xr, or) in x.chunks_exact(hidden).zip(out.chunks_exact_mut(hidden)) {
            self.moe_in_arena(
                p,
                pre,
                layer,
                MoeBufs {
                    x: xr,
                    gate: &mut gate,
                    act: &mut act,
                    router: &mut router,
                    expert_out: &mut expert_out,
                    out: or,
                },
            )?;
        }
        Ok(out)
    }
}

/// Row `i` of a row-major matrix of rows of `width` values.
fn row(m: &[f32], i: usize, width: usize) -> &[f32] {
    &m[i * width..(i + 1) * width]
}

/// RMSNorm of each `width`-wide row of `h` into `x`.
fn norm_rows(h: &[f32], w: &[f32], eps: f32, x: &mut [f32], width: usize) {
    for (hr, xr) in h.chunks_exact(width).zip(x.chunks_exact_mut(width)) {
        rms_norm_into(hr, w, eps, xr);
    }
}

/// A product of the wrong size (a checkpoint whose shapes disagree with its config).
fn check_len(what: &str, have: usize, want: usize) -> Result<()> {
    if have == want {
        Ok(())
    } else {
        Err(RunnerError::BadRequest(format!(
            "{what} gave {have} values for the batch, expected {want}"
        )))
    }
}
