//! One decode step in the manager's step arena: the decoder's arithmetic on one row, every
//! activation a view of the arena, weights read through the source's `_into` calls.

use super::attend::{
    ATTENTION_FORK_ELEMS, AttentionBufs, AttentionShape, KV_CHUNK_TOKENS, attend_chunked,
};
use super::{EMBED_TOKENS, ExpertLayout, PREFIX, TextDecoder};
use crate::error::{Result, RunnerError};
use crate::kv::KvStore;
use crate::nn::Params;
use vlmem::StepArena;
use vlmem::arena::ARENA_ALIGN_BYTES;

impl TextDecoder {
    /// The lengths (f32 values) of the decode step's arena views with `tokens` tokens in the
    /// KV cache after the step, in [`StepBufs`] order: the plan's
    /// ([`vlmem_qwen3vl::placement::decode_step_lens`]), which sizes the activation budget.
    fn step_lens(&self, tokens: usize) -> [usize; STEP_BUFS] {
        vlmem_qwen3vl::placement::decode_step_lens(&self.cfg, tokens as u64).map(|n| n as usize)
    }

    /// Bytes of step arena a decode step takes with `tokens` tokens in the KV cache after it
    /// (every view rounded up to the arena's alignment).
    pub fn step_arena_bytes(&self, tokens: usize) -> u64 {
        self.step_lens(tokens)
            .iter()
            .map(|&n| (n as u64 * 4).next_multiple_of(ARENA_ALIGN_BYTES))
            .sum()
    }

    /// One decode step with every activation in `arena` (the manager's pinned step arena):
    /// `token` at text position `position` after the tokens in `kv`, appended to `kv`;
    /// returns the next-token logits. The arena is reset first (the previous step's views
    /// go) and must hold [`TextDecoder::step_arena_bytes`] for the cache's length plus one.
    /// The same arithmetic as [`TextDecoder::forward`] on one row, in f32; weights reach the
    /// kernels through the source's `_into` calls, whose outputs are the arena's views.
    pub fn decode_in_arena(
        &self,
        p: &Params,
        token: u32,
        position: i64,
        kv: &mut dyn KvStore,
        arena: &mut StepArena,
    ) -> Result<Vec<f32>> {
        if token as usize >= self.vocab_size() {
            return Err(RunnerError::TokenOutOfVocab {
                id: token,
                position: 0,
                vocab_size: self.vocab_size(),
            });
        }
        let tokens = kv.len_tokens() + 1;
        arena.reset();
        let slices = self
            .step_lens(tokens)
            .iter()
            .map(|&n| arena.alloc(n as u64 * 4))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|source| RunnerError::Arena { tokens, source })?;
        arena
            .with_f32(&slices, |views| {
                let bufs = StepBufs::new(views)?;
                self.decode_views(p, token, position, kv, tokens, bufs)
            })
            .map_err(|source| RunnerError::Arena { tokens, source })?
    }

    fn decode_views(
        &self,
        p: &Params,
        token: u32,
        position: i64,
        kv: &mut dyn KvStore,
        tokens: usize,
        b: StepBufs<'_>,
    ) -> Result<Vec<f32>> {
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
        let row = nkv * hd;
        src.row_into(EMBED_TOKENS, token, b.h)?;
        // A text token: the same position on all three M-RoPE axes.
        for ((cs, sn), &f) in b.cos.iter_mut().zip(b.sin.iter_mut()).zip(&self.inv_freq) {
            let angle = position as f32 * f;
            *cs = angle.cos();
            *sn = angle.sin();
        }
        let layers = self.num_layers();
        for l in 0..layers {
            src.begin_layer(l, layers);
            let pre = format!("{PREFIX}.layers.{l}");
            // Attention.
            src.values_into(&format!("{pre}.input_layernorm.weight"), b.norm)?;
            rms_norm_into(b.h, b.norm, eps, b.x);
            {
                let (k, v) = b.kv_row.split_at_mut(row);
                src.matvec_many_into(
                    &[
                        &format!("{pre}.self_attn.q_proj.weight"),
                        &format!("{pre}.self_attn.k_proj.weight"),
                        &format!("{pre}.self_attn.v_proj.weight"),
                    ],
                    b.x,
                    &mut [&mut *b.q, k, v],
                )?;
                src.values_into(&format!("{pre}.self_attn.q_norm.weight"), b.head_norm)?;
                head_norm_in_place(b.q, b.head_norm, eps);
                rope_in_place(b.q, b.cos, b.sin);
                src.values_into(&format!("{pre}.self_attn.k_norm.weight"), b.head_norm)?;
                head_norm_in_place(k, b.head_norm, eps);
                rope_in_place(k, b.cos, b.sin);
            }
            let held = kv.append_row(l, nkv, b.kv_row)?;
            if held != tokens {
                return Err(RunnerError::BadRequest(format!(
                    "layer {l}'s KV cache holds {held} tokens, expected {tokens}"
                )));
            }
            let shape = AttentionShape {
                head_dim: hd,
                groups,
                kv_row: 2 * row,
                scale,
            };
            attend_chunked(
                shape,
                tokens,
                |start, rows: &mut [f32]| kv.read_rows(l, start, 2 * row, rows),
                AttentionBufs {
                    q: b.q,
                    cache: b.cache,
                    scores: b.scores,
                    softmax: b.softmax,
                    att: b.att,
                },
                nh * tokens.min(KV_CHUNK_TOKENS) * hd >= ATTENTION_FORK_ELEMS,
            )?;
            src.matvec_into(&format!("{pre}.self_attn.o_proj.weight"), b.att, b.out)?;
            add_in_place(b.h, b.out);
            // MLP.
            src.values_into(&format!("{pre}.post_attention_layernorm.weight"), b.norm)?;
            rms_norm_into(b.h, b.norm, eps, b.x);
            if self.is_sparse(l) {
                self.moe_in_arena(
                    p,
                    &pre,
                    l,
                    MoeBufs {
                        x: b.x,
                        gate: b.gate,
                        act: b.act,
                        router: b.router,
                        expert_out: b.expert_out,
                        out: b.out,
                    },
                )?;
            } else {
                let i = c.intermediate_size as usize;
                let (gate, up) = (&mut b.gate[..i], &mut b.act[..i]);
                src.matvec_many_into(
                    &[
                        &format!("{pre}.mlp.gate_proj.weight"),
                        &format!("{pre}.mlp.up_proj.weight"),
                    ],
                    b.x,
                    &mut [&mut *gate, &mut *up],
                )?;
                for (g, &u) in gate.iter_mut().zip(up.iter()) {
                    *g = silu(*g) * u;
                }
                src.matvec_into(&format!("{pre}.mlp.down_proj.weight"), gate, b.out)?;
            }
            add_in_place(b.h, b.out);
        }
        src.begin_layer(layers, layers);
        src.values_into(&format!("{PREFIX}.norm.weight"), b.norm)?;
        rms_norm_into(b.h, b.norm, eps, b.x);
        src.matvec_into(self.lm_head_name(), b.x, b.logits)?;
        Ok(b.logits.to_vec())
    }

    /// [`TextDecoder::moe`] for one row on arena views: the router's top-k experts (ties to
    /// the lower index), weights renormalised when the config says so, each routed expert's
    /// SwiGLU through its slice only, summed in expert order into `out`.
    pub(super) fn moe_in_arena(
        &self,
        p: &Params,
        pre: &str,
        layer: usize,
        b: MoeBufs<'_>,
    ) -> Result<()> {
        let moe = self
            .cfg
            .moe
            .as_ref()
            .ok_or_else(|| RunnerError::BadRequest("MoE layer in a dense model".into()))?;
        let e = moe.num_experts as usize;
        let k = (moe.num_experts_per_tok as usize).min(e);
        let inter = moe.moe_intermediate_size as usize;
        let h = self.cfg.hidden_size as usize;
        let src = p.source();
        let router = &mut b.router[..e];
        src.matvec_into(&format!("{pre}.mlp.gate.weight"), b.x, router)?;
        softmax_in_place(router);
        // Top k by probability, highest first; a tie goes to the lower index.
        let mut top: Vec<usize> = Vec::with_capacity(k);
        for _ in 0..k {
            let best = (0..e)
                .filter(|i| !top.contains(i))
                .fold(None, |best: Option<usize>, i| match best {
                    Some(j) if router[j] >= router[i] => Some(j),
                    _ => Some(i),
                });
            top.extend(best);
        }
        let sum: f32 = top.iter().map(|&i| router[i]).sum();
        top.sort_unstable();
        let transposed = self.expert_layout(p, layer)? == ExpertLayout::Transposed;
        let gu_name = format!("{pre}.mlp.experts.gate_up_proj");
        let down_name = format!("{pre}.mlp.experts.down_proj");
        let (gu, act, y) = (
            &mut b.gate[..2 * inter],
            &mut b.act[..inter],
            &mut b.expert_out[..h],
        );
        b.out.fill(0.0);
        for expert in top {
            let wgt = if moe.norm_topk_prob {
                router[expert] / sum
            } else {
                router[expert]
            };
            src.expert_matvec_into(&gu_name, expert, transposed, b.x, gu)?;
            for ((a, &g), &u) in act.iter_mut().zip(&gu[..inter]).zip(&gu[inter..]) {
                *a = silu(g) * u;
            }
            src.expert_matvec_into(&down_name, expert, transposed, act, y)?;
            for (o, &v) in b.out.iter_mut().zip(y.iter()) {
                *o += wgt * v;
            }
        }
        Ok(())
    }
}

/// The attention's sizes, as a decode step uses them.
pub(super) struct AttentionDims {
    pub(super) head_dim: usize,
    pub(super) heads: usize,
    pub(super) kv_heads: usize,
    /// Query heads per key/value head.
    pub(super) groups: usize,
    /// `head_dim^-0.5`.
    pub(super) scale: f32,
}

impl TextDecoder {
    /// The config's attention sizes; an error when the query heads are not a whole multiple
    /// of the key/value heads.
    pub(super) fn attention_dims(&self) -> Result<AttentionDims> {
        let c = &self.cfg;
        let hd = c.head_dim as usize;
        let (nh, nkv) = (
            c.num_attention_heads as usize,
            c.num_key_value_heads as usize,
        );
        if nkv == 0 || !nh.is_multiple_of(nkv) {
            return Err(RunnerError::BadRequest(format!(
                "{nh} attention heads for {nkv} key/value heads"
            )));
        }
        Ok(AttentionDims {
            head_dim: hd,
            heads: nh,
            kv_heads: nkv,
            groups: nh / nkv,
            scale: (hd as f64).powf(-0.5) as f32,
        })
    }
}

/// The decode step's vectors, each a view of the step arena (see
/// [`TextDecoder::decode_in_arena`]); lengths in f32 values.
pub(super) struct StepBufs<'a> {
    /// The residual stream `[hidden]`.
    h: &'a mut [f32],
    /// A norm's output, the next projection's input `[hidden]`.
    x: &'a mut [f32],
    /// A norm's weights `[hidden]`.
    norm: &'a mut [f32],
    /// The q or k head norm's weights `[head_dim]`.
    head_norm: &'a mut [f32],
    /// Rotary cosines and sines of this position `[head_dim / 2]`.
    cos: &'a mut [f32],
    sin: &'a mut [f32],
    /// Queries `[heads * head_dim]`.
    q: &'a mut [f32],
    /// This token's keys then values `[2 * kv_heads * head_dim]`, as the KV cache stores them.
    kv_row: &'a mut [f32],
    /// A chunk of the layer's keys and values, token by token
    /// `[min(tokens, KV_CHUNK_TOKENS) * 2 * kv_heads * head_dim]`.
    cache: &'a mut [f32],
    /// Each head's attention scores over the chunk `[heads * min(tokens, KV_CHUNK_TOKENS)]`.
    scores: &'a mut [f32],
    /// Each head's running softmax maximum and sum across the chunks `[2 * heads]`.
    softmax: &'a mut [f32],
    /// Attention output `[heads * head_dim]`.
    att: &'a mut [f32],
    /// A block's output before the residual add `[hidden]`.
    out: &'a mut [f32],
    /// Gate (dense) or fused gate-up (one expert) projection `[max(I, 2 * moe_I)]`.
    gate: &'a mut [f32],
    /// Up projection, then the activation `[max(I, moe_I)]`.
    act: &'a mut [f32],
    /// Router logits, then probabilities `[experts]` (1 for a dense model).
    router: &'a mut [f32],
    /// One expert's output `[hidden]` (1 for a dense model).
    expert_out: &'a mut [f32],
    /// The next-token logits `[vocab]`.
    logits: &'a mut [f32],
}

/// Number of [`StepBufs`] fields.
const STEP_BUFS: usize = 18;

impl<'a> StepBufs<'a> {
    /// Takes the views in [`TextDecoder::step_lens`]'s order.
    fn new(views: &'a mut [&mut [f32]]) -> Result<Self> {
        if views.len() != STEP_BUFS {
            return Err(RunnerError::BadRequest(format!(
                "a decode step takes {STEP_BUFS} arena views, not {}",
                views.len()
            )));
        }
        let mut views = views.iter_mut().map(|v| &mut **v);
        // Fields are initialised in the order written.
        let mut next = || views.next().unwrap_or_default();
        Ok(StepBufs {
            h: next(),
            x: next(),
            norm: next(),
            head_norm: next(),
            cos: next(),
            sin: next(),
            q: next(),
            kv_row: next(),
            cache: next(),
            scores: next(),
            softmax: next(),
            att: next(),
            out: next(),
            gate: next(),
            act: next(),
            router: next(),
            expert_out: next(),
            logits: next(),
        })
    }
}

/// The views a MoE block works in (see [`StepBufs`]).
pub(super) struct MoeBufs<'b> {
    pub(super) x: &'b [f32],
    pub(super) gate: &'b mut [f32],
    pub(super) act: &'b mut [f32],
    pub(super) router: &'b mut [f32],
    pub(super) expert_out: &'b mut [f32],
    pub(super) out: &'b mut [f32],
}

/// `out = w * x / sqrt(mean(x^2) + eps)`, as [`rms_norm`](crate::nn::rms_norm) computes it.
pub(super) fn rms_norm_into(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let inv = 1.0 / (ms + eps).sqrt();
    for ((o, &v), &wv) in out.iter_mut().zip(x).zip(w) {
        *o = v * inv * wv;
    }
}

/// RMSNorm of each `w.len()`-wide head of `x`, in place.
pub(super) fn head_norm_in_place(x: &mut [f32], w: &[f32], eps: f32) {
    for head in x.chunks_exact_mut(w.len()) {
        let ms = head.iter().map(|v| v * v).sum::<f32>() / w.len() as f32;
        let inv = 1.0 / (ms + eps).sqrt();
        for (v, &wv) in head.iter_mut().zip(w) {
            *v = *v * inv * wv;
        }
    }
}

/// Rotary embedding of each head of `x` in place, the halves rotated as candle's `rope`
/// (and the reference's `rotate_half`) rotate them.
pub(super) fn rope_in_place(x: &mut [f32], cos: &[f32], sin: &[f32]) {
    let half = cos.len();
    for head in x.chunks_exact_mut(2 * half) {
        let (a, b) = head.split_at_mut(half);
        for i in 0..half {
            let (x1, x2) = (a[i], b[i]);
            a[i] = x1 * cos[i] - x2 * sin[i];
            b[i] = x1 * sin[i] + x2 * cos[i];
        }
    }
}

// The plan's activation budget aligns each view as the step arena does.
const _: () = assert!(ARENA_ALIGN_BYTES == vlmem_qwen3vl::placement::STEP_ALIGN_BYTES);

/// Softmax in place (max-shifted).
fn softmax_in_place(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    for v in x.iter_mut() {
        *v /= sum;
    }
}

pub(super) fn silu(g: f32) -> f32 {
    g / (1.0 + (-g).exp())
}

pub(super) fn add_in_place(h: &mut [f32], d: &[f32]) {
    for (a, &b) in h.iter_mut().zip(d) {
        *a += b;
    }
}
