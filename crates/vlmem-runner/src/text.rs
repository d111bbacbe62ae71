//! The text decoder: Qwen3 layers (RMSNorm, GQA attention with per-head q/k RMSNorm and
//! interleaved M-RoPE, SwiGLU or a top-k mixture of experts), DeepStack injection after the
//! first layers, the final norm and the (tied or untied) lm_head.

use crate::error::{Result, RunnerError};
use crate::kv::KvStore;
use crate::nn::{Params, attention_in_row_chunks, linear, rms_norm};
use crate::rope::{MropePositions, inv_freq, mrope_axes, text_cos_sin};
use candle_core::{Device, Tensor};
use candle_nn::ops::softmax_last_dim;
use candle_nn::rotary_emb::rope;
use vlmem::StepArena;
use vlmem::arena::ARENA_ALIGN_BYTES;
use vlmem_qwen3vl::config::TextConfig;

const PREFIX: &str = "model.language_model";
/// Name of the token embedding table.
pub const EMBED_TOKENS: &str = "model.language_model.embed_tokens.weight";
/// Name of the untied output projection.
pub const LM_HEAD: &str = "lm_head.weight";

/// How fused MoE expert tensors are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpertLayout {
    /// Released checkpoints: `gate_up_proj [E, H, 2I]`, `down_proj [E, I, H]` (`x @ W`).
    Released,
    /// transformers 5.x `save_pretrained`: `gate_up_proj [E, 2I, H]`, `down_proj [E, H, I]`
    /// (`x @ W^T`).
    Transposed,
}

/// Which rows of the final hidden states go through the lm_head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsFor {
    /// Every position (`[tokens, vocab]`).
    All,
    /// The last position only (`[1, vocab]`), as generation needs.
    Last,
    /// None (hidden states only).
    Skip,
}

/// What a decoder pass should return, and how it runs.
#[derive(Clone, Copy)]
pub struct Outputs<'a> {
    /// Which positions get logits.
    pub logits: LogitsFor,
    /// Keep the hidden states (see [`DecoderOutput::hidden_states`]).
    pub hidden_states: bool,
    /// Bound on one attention score tensor, bytes (see
    /// [`crate::nn::attention_in_row_chunks`]; [`crate::nn::ATTENTION_SCORE_BYTES`] by
    /// default).
    pub score_bytes: usize,
    /// Told `(layers done, layers)` after each layer (a progress display).
    pub on_layer: &'a dyn Fn(usize, usize),
}

/// DeepStack features to add to the visual positions after the first layers.
#[derive(Debug, Clone)]
pub struct Deepstack {
    /// Row indices (u32) of the visual positions within this chunk.
    pub positions: Tensor,
    /// Feature `k`, `[visual positions, hidden]`, is added after layer `k`.
    pub features: Vec<Tensor>,
}

/// What a decoder pass returns.
#[derive(Debug, Clone)]
pub struct DecoderOutput {
    /// Logits per [`LogitsFor`]; `None` for `Skip`.
    pub logits: Option<Tensor>,
    /// When asked for: the embedding input, the outputs of layers `0..L-1` (as the layer
    /// returns them, before DeepStack is added, like the reference's recorded
    /// `hidden_states`), and the final normed output: `layers + 1` tensors `[tokens, hidden]`.
    pub hidden_states: Vec<Tensor>,
}

/// The text decoder of one model; it holds only the config and reads weights per call.
#[derive(Debug, Clone)]
pub struct TextDecoder {
    cfg: TextConfig,
    tie_word_embeddings: bool,
    device: Device,
    inv_freq: Vec<f32>,
    axes: Vec<usize>,
}

impl TextDecoder {
    /// A decoder for `cfg` computing on `device`.
    pub fn new(cfg: &TextConfig, device: &Device) -> Result<Self> {
        let hd = cfg.head_dim as usize;
        let section: [usize; 3] = match cfg.mrope_section.as_slice() {
            [a, b, c] => [*a as usize, *b as usize, *c as usize],
            other => {
                return Err(RunnerError::BadRequest(format!(
                    "mrope_section {other:?} must have three entries"
                )));
            }
        };
        Ok(TextDecoder {
            cfg: cfg.clone(),
            tie_word_embeddings: cfg.tie_word_embeddings,
            device: device.clone(),
            inv_freq: inv_freq(hd, cfg.rope_theta),
            axes: mrope_axes(hd / 2, &section, cfg.mrope_interleaved),
        })
    }

    /// Number of decoder layers.
    pub fn num_layers(&self) -> usize {
        self.cfg.num_hidden_layers as usize
    }

    /// Rows of the embedding table.
    pub fn vocab_size(&self) -> usize {
        self.cfg.vocab_size as usize
    }

    fn lm_head_name(&self) -> &'static str {
        if self.tie_word_embeddings {
            EMBED_TOKENS
        } else {
            LM_HEAD
        }
    }

    fn is_sparse(&self, layer: usize) -> bool {
        self.cfg
            .moe
            .as_ref()
            .is_some_and(|m| m.is_sparse_layer(layer as u64))
    }

    /// The layout of layer `layer`'s fused expert tensors, decided by their shapes.
    pub fn expert_layout(&self, p: &Params, layer: usize) -> Result<ExpertLayout> {
        let moe = self.cfg.moe.as_ref().ok_or_else(|| {
            RunnerError::BadRequest("expert layout asked of a dense model".into())
        })?;
        let (e, h, i) = (
            moe.num_experts as usize,
            self.cfg.hidden_size as usize,
            moe.moe_intermediate_size as usize,
        );
        let gu_name = format!("{PREFIX}.layers.{layer}.mlp.experts.gate_up_proj");
        let down_name = format!("{PREFIX}.layers.{layer}.mlp.experts.down_proj");
        let gu = p.shape(&gu_name)?;
        let down = p.shape(&down_name)?;
        // Released first: when H == 2I both shapes agree and released checkpoints win.
        let layout = if gu == [e, h, 2 * i] {
            ExpertLayout::Released
        } else if gu == [e, 2 * i, h] {
            ExpertLayout::Transposed
        } else {
            return Err(RunnerError::TensorShape {
                name: gu_name,
                expected: format!("[{e}, {h}, {}] or [{e}, {}, {h}]", 2 * i, 2 * i),
                found: gu,
            });
        };
        let want_down = match layout {
            ExpertLayout::Released => vec![e, i, h],
            ExpertLayout::Transposed => vec![e, h, i],
        };
        if down != want_down {
            return Err(RunnerError::TensorShape {
                name: down_name,
                expected: format!("{want_down:?} (matching gate_up_proj's layout)"),
                found: down,
            });
        }
        Ok(layout)
    }

    /// Checks that every text weight exists with the shape the config implies.
    pub fn check_weights(&self, p: &Params) -> Result<()> {
        let c = &self.cfg;
        let (h, hd) = (c.hidden_size as usize, c.head_dim as usize);
        let (nh, nkv) = (
            c.num_attention_heads as usize,
            c.num_key_value_heads as usize,
        );
        let vocab = c.vocab_size as usize;
        let mut want: Vec<(String, Vec<usize>)> = vec![
            (EMBED_TOKENS.to_string(), vec![vocab, h]),
            (format!("{PREFIX}.norm.weight"), vec![h]),
        ];
        if !self.tie_word_embeddings {
            want.push((LM_HEAD.to_string(), vec![vocab, h]));
        }
        for l in 0..self.num_layers() {
            let pre = format!("{PREFIX}.layers.{l}");
            for (n, s) in [
                ("input_layernorm.weight", vec![h]),
                ("post_attention_layernorm.weight", vec![h]),
                ("self_attn.q_proj.weight", vec![nh * hd, h]),
                ("self_attn.k_proj.weight", vec![nkv * hd, h]),
                ("self_attn.v_proj.weight", vec![nkv * hd, h]),
                ("self_attn.o_proj.weight", vec![h, nh * hd]),
                ("self_attn.q_norm.weight", vec![hd]),
                ("self_attn.k_norm.weight", vec![hd]),
            ] {
                want.push((format!("{pre}.{n}"), s));
            }
            if self.is_sparse(l) {
                let e = c.moe.as_ref().map_or(0, |m| m.num_experts as usize);
                want.push((format!("{pre}.mlp.gate.weight"), vec![e, h]));
                self.expert_layout(p, l)?;
            } else {
                let i = c.intermediate_size as usize;
                want.push((format!("{pre}.mlp.gate_proj.weight"), vec![i, h]));
                want.push((format!("{pre}.mlp.up_proj.weight"), vec![i, h]));
                want.push((format!("{pre}.mlp.down_proj.weight"), vec![h, i]));
            }
        }
        for (name, shape) in want {
            let found = p.shape(&name)?;
            if found != shape {
                return Err(RunnerError::TensorShape {
                    name,
                    expected: format!("{shape:?}"),
                    found,
                });
            }
        }
        Ok(())
    }

    /// Embeds `ids` (each must be below `vocab_size`).
    pub fn embed(&self, p: &Params, ids: &[u32]) -> Result<Tensor> {
        let vocab = self.vocab_size();
        if let Some((position, &id)) = ids
            .iter()
            .enumerate()
            .find(|(_, id)| **id as usize >= vocab)
        {
            return Err(RunnerError::TokenOutOfVocab {
                id,
                position,
                vocab_size: vocab,
            });
        }
        p.rows(EMBED_TOKENS, ids)
    }

    /// Runs the decoder over `embeds` (`[tokens, hidden]`) at `positions`, appending to
    /// `kv` (whose current length is the number of earlier tokens).
    pub fn forward(
        &self,
        p: &Params,
        embeds: &Tensor,
        positions: &MropePositions,
        kv: &mut dyn KvStore,
        deepstack: Option<&Deepstack>,
        outputs: Outputs<'_>,
    ) -> Result<DecoderOutput> {
        let collect_hidden = outputs.hidden_states;
        let (n, _) = embeds.dims2()?;
        if n == 0 {
            return Err(RunnerError::BadRequest(
                "the decoder needs at least one token".into(),
            ));
        }
        if positions.len() != n {
            return Err(RunnerError::BadRequest(format!(
                "{n} embeddings but {} positions",
                positions.len()
            )));
        }
        let eps = self.cfg.rms_norm_eps;
        let (cos, sin) = text_cos_sin(positions, &self.inv_freq, &self.axes, &self.device)?;
        let mut hidden_states = Vec::new();
        let mut h = embeds.clone();
        if collect_hidden {
            hidden_states.push(h.clone());
        }
        let layers = self.num_layers();
        for l in 0..layers {
            p.source().begin_layer(l, layers);
            let pre = format!("{PREFIX}.layers.{l}");
            let x = rms_norm(
                &h,
                &p.get_any(&format!("{pre}.input_layernorm.weight"))?,
                eps,
            )?;
            let a = self.attention(p, &pre, l, &x, &cos, &sin, kv, outputs.score_bytes)?;
            h = (h + a)?;
            let x = rms_norm(
                &h,
                &p.get_any(&format!("{pre}.post_attention_layernorm.weight"))?,
                eps,
            )?;
            let m = if self.is_sparse(l) {
                self.moe(p, &pre, l, &x)?
            } else {
                self.swiglu(p, &pre, &x)?
            };
            h = (h + m)?;
            if collect_hidden && l + 1 < self.num_layers() {
                hidden_states.push(h.clone());
            }
            if let Some(ds) = deepstack
                && let Some(feat) = ds.features.get(l)
            {
                h = h.index_add(&ds.positions, feat, 0)?;
            }
            (outputs.on_layer)(l + 1, layers);
        }
        p.source().begin_layer(layers, layers);
        let normed = rms_norm(&h, &p.get_any(&format!("{PREFIX}.norm.weight"))?, eps)?;
        if collect_hidden {
            hidden_states.push(normed.clone());
        }
        let logits = match outputs.logits {
            LogitsFor::Skip => None,
            LogitsFor::All => Some(p.linear(self.lm_head_name(), &normed)?),
            LogitsFor::Last => {
                // One row: the matrix-vector path, even after a long prompt.
                let last = normed.narrow(0, n - 1, 1)?;
                Some(p.linear(self.lm_head_name(), &last)?)
            }
        };
        Ok(DecoderOutput {
            logits,
            hidden_states,
        })
    }

    /// The lengths (f32 values) of the decode step's arena views with `tokens` tokens in the
    /// KV cache after the step, in [`StepBufs`] order.
    fn step_lens(&self, tokens: usize) -> [usize; STEP_BUFS] {
        let c = &self.cfg;
        let (h, hd) = (c.hidden_size as usize, c.head_dim as usize);
        let (nh, nkv) = (
            c.num_attention_heads as usize,
            c.num_key_value_heads as usize,
        );
        let dense_i = c.intermediate_size as usize;
        let (experts, moe_i) = c.moe.as_ref().map_or((0, 0), |m| {
            (m.num_experts as usize, m.moe_intermediate_size as usize)
        });
        let kv_row = 2 * nkv * hd;
        [
            h,
            h,
            h,
            hd,
            hd / 2,
            hd / 2,
            nh * hd,
            kv_row,
            tokens.min(KV_CHUNK_TOKENS) * kv_row,
            nh * tokens.min(KV_CHUNK_TOKENS),
            2 * nh,
            nh * hd,
            h,
            dense_i.max(2 * moe_i),
            dense_i.max(moe_i),
            experts.max(1),
            if experts > 0 { h } else { 1 },
            self.vocab_size(),
        ]
        .map(|n| n.max(1))
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
            .map_err(|e| RunnerError::Arena(format!("a decode step at {tokens} tokens: {e}")))?;
        arena
            .with_f32(&slices, |views| {
                let bufs = StepBufs::new(views)?;
                self.decode_views(p, token, position, kv, tokens, bufs)
            })
            .map_err(|e| RunnerError::Arena(e.to_string()))?
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
        let groups = nh / nkv;
        let row = nkv * hd;
        let scale = (hd as f64).powf(-0.5) as f32;
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
    fn moe_in_arena(&self, p: &Params, pre: &str, layer: usize, b: MoeBufs<'_>) -> Result<()> {
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

    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        p: &Params,
        pre: &str,
        layer: usize,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        kv: &mut dyn KvStore,
        score_bytes: usize,
    ) -> Result<Tensor> {
        let c = &self.cfg;
        let (n, _) = x.dims2()?;
        let hd = c.head_dim as usize;
        let (nh, nkv) = (
            c.num_attention_heads as usize,
            c.num_key_value_heads as usize,
        );
        let eps = c.rms_norm_eps;
        let w = |name: &str| p.get_any(&format!("{pre}.self_attn.{name}"));
        let lin = |name: &str, x: &Tensor| p.linear(&format!("{pre}.self_attn.{name}"), x);
        // [n, heads*hd] -> [n, heads, hd] -> per-head RMSNorm -> [1, heads, n, hd]
        let heads = |proj: Tensor, count: usize, norm: Option<Tensor>| -> Result<Tensor> {
            let t = proj.reshape((n, count, hd))?;
            let t = match norm {
                Some(wn) => rms_norm(&t, &wn, eps)?,
                None => t,
            };
            Ok(t.transpose(0, 1)?.unsqueeze(0)?.contiguous()?)
        };
        // One row (decode): q, k and v in one pass over the three weights.
        let mut qkv = p
            .linear_many(
                &[
                    &format!("{pre}.self_attn.q_proj.weight"),
                    &format!("{pre}.self_attn.k_proj.weight"),
                    &format!("{pre}.self_attn.v_proj.weight"),
                ],
                x,
            )?
            .into_iter();
        let mut next = || {
            qkv.next()
                .ok_or_else(|| RunnerError::BadRequest("q/k/v projection missing".into()))
        };
        let (q, k, v) = (next()?, next()?, next()?);
        let q = heads(q, nh, Some(w("q_norm.weight")?))?;
        let k = heads(k, nkv, Some(w("k_norm.weight")?))?;
        let v = heads(v, nkv, None)?;
        let q = rope(&q, cos, sin)?;
        let k = rope(&k, cos, sin)?;
        let (k_all, v_all) = kv.append(layer, &k, &v)?;
        let past = k_all.dim(2)? - n;
        let k_all = repeat_kv(&k_all, nh / nkv)?;
        let v_all = repeat_kv(&v_all, nh / nkv)?;
        let scale = (hd as f64).powf(-0.5);
        // [1, nh, n, hd], a block of query rows at a time (scores bounded by `score_bytes`).
        let out = attention_in_row_chunks(&q, &k_all, &v_all, scale, Some(past), score_bytes)?;
        let out = out.squeeze(0)?.transpose(0, 1)?.reshape((n, nh * hd))?;
        lin("o_proj.weight", &out)
    }

    fn swiglu(&self, p: &Params, pre: &str, x: &Tensor) -> Result<Tensor> {
        let mut gu = p
            .linear_many(
                &[
                    &format!("{pre}.mlp.gate_proj.weight"),
                    &format!("{pre}.mlp.up_proj.weight"),
                ],
                x,
            )?
            .into_iter();
        let (Some(gate), Some(up)) = (gu.next(), gu.next()) else {
            return Err(RunnerError::BadRequest("gate/up projection missing".into()));
        };
        p.linear(
            &format!("{pre}.mlp.down_proj.weight"),
            &(gate.silu()? * up)?,
        )
    }

    /// Softmax router, top-k experts per token (ties to the lower index), optional
    /// renormalisation, each expert's SwiGLU on its tokens, outputs weighted and summed.
    fn moe(&self, p: &Params, pre: &str, layer: usize, x: &Tensor) -> Result<Tensor> {
        let moe = self
            .cfg
            .moe
            .as_ref()
            .ok_or_else(|| RunnerError::BadRequest("MoE layer in a dense model".into()))?;
        let (n, h) = x.dims2()?;
        let e = moe.num_experts as usize;
        let k = moe.num_experts_per_tok as usize;
        let inter = moe.moe_intermediate_size as usize;
        let router = p.linear(&format!("{pre}.mlp.gate.weight"), x)?;
        let probs = softmax_last_dim(&router)?.to_vec2::<f32>()?;
        // Per expert: (token, weight).
        let mut routed: Vec<Vec<(u32, f32)>> = vec![Vec::new(); e];
        for (tok, row) in probs.iter().enumerate() {
            let mut order: Vec<usize> = (0..e).collect();
            order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
            let top = &order[..k];
            let sum: f32 = top.iter().map(|&i| row[i]).sum();
            for &i in top {
                let wgt = if moe.norm_topk_prob {
                    row[i] / sum
                } else {
                    row[i]
                };
                routed[i].push((tok as u32, wgt));
            }
        }
        let layout = self.expert_layout(p, layer)?;
        let transposed = layout == ExpertLayout::Transposed;
        let gu_name = format!("{pre}.mlp.experts.gate_up_proj");
        let down_name = format!("{pre}.mlp.experts.down_proj");
        let src = p.source();
        if n == 1 {
            // Decode: only the routed experts' slices are read, each through the
            // matrix-vector kernel.
            let xs = x.flatten_all()?.to_vec1::<f32>()?;
            let mut acc = vec![0f32; h];
            for (expert, tokens) in routed.iter().enumerate() {
                let Some(&(_, wgt)) = tokens.first() else {
                    continue;
                };
                let gu = src.expert_matvec(&gu_name, expert, transposed, &xs)?;
                if gu.len() != 2 * inter {
                    return Err(RunnerError::BadRequest(format!(
                        "{gu_name}: expert output has {} values, expected {}",
                        gu.len(),
                        2 * inter
                    )));
                }
                let act: Vec<f32> = gu[..inter]
                    .iter()
                    .zip(&gu[inter..])
                    .map(|(&g, &u)| g / (1.0 + (-g).exp()) * u)
                    .collect();
                let y = src.expert_matvec(&down_name, expert, transposed, &act)?;
                for (a, v) in acc.iter_mut().zip(&y) {
                    *a += wgt * v;
                }
            }
            return Ok(Tensor::from_vec(acc, (1, h), &self.device)?);
        }
        let mut out = Tensor::zeros((n, h), candle_core::DType::F32, &self.device)?;
        for (expert, tokens) in routed.iter().enumerate() {
            if tokens.is_empty() {
                continue;
            }
            let idx: Vec<u32> = tokens.iter().map(|t| t.0).collect();
            let wts: Vec<f32> = tokens.iter().map(|t| t.1).collect();
            let idx = Tensor::from_vec(idx, tokens.len(), &self.device)?;
            let wts = Tensor::from_vec(wts, (tokens.len(), 1), &self.device)?;
            let xs = x.index_select(&idx, 0)?;
            let gu_w = src.expert_f32(&gu_name, expert)?;
            let dn_w = src.expert_f32(&down_name, expert)?;
            let gu = match layout {
                ExpertLayout::Released => xs.matmul(&gu_w)?,
                ExpertLayout::Transposed => linear(&xs, &gu_w, None)?,
            };
            let gate = gu.narrow(1, 0, inter)?;
            let up = gu.narrow(1, inter, inter)?;
            let act = (gate.silu()? * up)?;
            let y = match layout {
                ExpertLayout::Released => act.matmul(&dn_w)?,
                ExpertLayout::Transposed => linear(&act, &dn_w, None)?,
            };
            let y = y.broadcast_mul(&wts)?;
            out = out.index_add(&idx, &y, 0)?;
        }
        Ok(out)
    }
}

/// The decode step's vectors, each a view of the step arena (see
/// [`TextDecoder::decode_in_arena`]); lengths in f32 values.
struct StepBufs<'a> {
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
struct MoeBufs<'b> {
    x: &'b [f32],
    gate: &'b mut [f32],
    act: &'b mut [f32],
    router: &'b mut [f32],
    expert_out: &'b mut [f32],
    out: &'b mut [f32],
}

/// `out = w * x / sqrt(mean(x^2) + eps)`, as [`rms_norm`] computes it.
fn rms_norm_into(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let inv = 1.0 / (ms + eps).sqrt();
    for ((o, &v), &wv) in out.iter_mut().zip(x).zip(w) {
        *o = v * inv * wv;
    }
}

/// RMSNorm of each `w.len()`-wide head of `x`, in place.
fn head_norm_in_place(x: &mut [f32], w: &[f32], eps: f32) {
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
fn rope_in_place(x: &mut [f32], cos: &[f32], sin: &[f32]) {
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

/// Query-key products per step (heads x tokens x head_dim) from which the heads' attention
/// runs on the kernels' pool (below it a fork costs more than it saves).
const ATTENTION_FORK_ELEMS: usize = 1 << 16;

/// `a . b` in eight lanes (so the compiler vectorizes it), then the lanes and the tail.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            lanes[i] += x[i] * y[i];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// Tokens of the KV cache the decode step's attention reads into the arena at a time: the
/// arena stays the same size whatever the context (256 tokens are 2 MiB for qwen3-vl-2b).
pub const KV_CHUNK_TOKENS: usize = 256;

/// The sizes [`attend_chunked`] works with.
#[derive(Debug, Clone, Copy)]
struct AttentionShape {
    head_dim: usize,
    /// Query heads per key/value head (GQA).
    groups: usize,
    /// Values per cached token: its keys, then its values, `2 * kv_heads * head_dim`.
    kv_row: usize,
    scale: f32,
}

/// One head of a chunk in [`attend_chunked`]: its index, then its output, its scores over
/// the chunk and its running softmax (maximum, sum).
type HeadViews<'v> = (usize, ((&'v mut [f32], &'v mut [f32]), &'v mut [f32]));

/// The arena views [`attend_chunked`] works in (see [`StepBufs`]).
struct AttentionBufs<'b> {
    q: &'b [f32],
    cache: &'b mut [f32],
    scores: &'b mut [f32],
    softmax: &'b mut [f32],
    att: &'b mut [f32],
}

/// One query token's attention over `tokens` cached tokens, read [`KV_CHUNK_TOKENS`] at a
/// time into `cache` by `read(start, rows)`: for each query head (its key/value head is
/// `head / groups`), a softmax of the scaled products with the keys, kept as a running
/// maximum and sum across the chunks (the sum and the weighted values rescaled when the
/// maximum grows), then the weighted values divided by the sum, into `att`. With `parallel`
/// the heads of a chunk run on the kernels' pool; each head's arithmetic is the same either
/// way.
fn attend_chunked(
    s: AttentionShape,
    tokens: usize,
    mut read: impl FnMut(usize, &mut [f32]) -> Result<()>,
    b: AttentionBufs<'_>,
    parallel: bool,
) -> Result<()> {
    let hd = s.head_dim;
    let half_row = s.kv_row / 2;
    let chunk_max = b.cache.len() / s.kv_row.max(1);
    let heads = b.att.len() / hd.max(1);
    if chunk_max == 0 || b.scores.len() < heads * chunk_max.min(tokens) {
        return Err(RunnerError::BadRequest(format!(
            "attention over {tokens} tokens with room for {chunk_max} at a time"
        )));
    }
    b.att.fill(0.0);
    for ms in b.softmax.chunks_exact_mut(2) {
        ms[0] = f32::NEG_INFINITY;
        ms[1] = 0.0;
    }
    let q = b.q;
    let mut start = 0;
    while start < tokens {
        let n = chunk_max.min(tokens - start);
        let rows = &mut b.cache[..n * s.kv_row];
        read(start, rows)?;
        let cache = &*rows;
        let one = |(head, ((out, scores), ms)): HeadViews<'_>| {
            let g = head / s.groups;
            let qh = &q[head * hd..(head + 1) * hd];
            let mut max = ms[0];
            for (t, sc) in scores.iter_mut().enumerate() {
                *sc = dot(qh, &cache[t * s.kv_row + g * hd..][..hd]) * s.scale;
                max = max.max(*sc);
            }
            // Rescale what the earlier chunks summed to the new maximum (0 on the first).
            let carry = (ms[0] - max).exp();
            let mut sum = ms[1] * carry;
            out.iter_mut().for_each(|o| *o *= carry);
            for (t, sc) in scores.iter().enumerate() {
                let e = (sc - max).exp();
                sum += e;
                let vt = &cache[t * s.kv_row + half_row + g * hd..][..hd];
                for (o, &vv) in out.iter_mut().zip(vt) {
                    *o += e * vv;
                }
            }
            ms[0] = max;
            ms[1] = sum;
        };
        let per_head = b
            .att
            .chunks_mut(hd)
            .zip(b.scores.chunks_mut(n))
            .zip(b.softmax.chunks_exact_mut(2))
            .enumerate();
        if parallel {
            crate::kernels::pool::global().for_each(per_head, one);
        } else {
            per_head.for_each(one);
        }
        start += n;
    }
    for (out, ms) in b.att.chunks_mut(hd).zip(b.softmax.chunks_exact(2)) {
        out.iter_mut().for_each(|o| *o /= ms[1]);
    }
    Ok(())
}

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

fn silu(g: f32) -> f32 {
    g / (1.0 + (-g).exp())
}

fn add_in_place(h: &mut [f32], d: &[f32]) {
    for (a, &b) in h.iter_mut().zip(d) {
        *a += b;
    }
}

/// Repeats each of the `kv_heads` heads `groups` times: `[1, kv, L, d] -> [1, kv*groups, L, d]`.
fn repeat_kv(t: &Tensor, groups: usize) -> Result<Tensor> {
    if groups == 1 {
        return Ok(t.clone());
    }
    let (b, kvh, len, d) = t.dims4()?;
    Ok(t.unsqueeze(2)?
        .expand((b, kvh, groups, len, d))?
        .reshape((b, kvh * groups, len, d))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) % 2001) as f32 / 1000.0
                    - 1.0
            })
            .collect()
    }

    #[test]
    fn dot_equals_the_plain_sum() {
        for n in 0..40 {
            let (a, b) = (values(n, 1), values(n, 2));
            let want: f64 = a
                .iter()
                .zip(&b)
                .map(|(x, y)| f64::from(*x) * f64::from(*y))
                .sum();
            assert!((f64::from(dot(&a, &b)) - want).abs() < 1e-5, "n = {n}");
        }
    }

    /// The heads in parallel give the sequential result bit for bit, whatever the chunking
    /// of the cache, and every way matches a plain f64 computation of GQA attention (query
    /// head h reads key/value head h / groups).
    #[test]
    fn attention_matches_a_plain_reference_in_chunks_and_in_parallel() {
        let (nh, nkv, hd, tokens) = (8usize, 2usize, 16usize, 300usize);
        let kv_row = 2 * nkv * hd;
        let shape = AttentionShape {
            head_dim: hd,
            groups: nh / nkv,
            kv_row,
            scale: (hd as f32).powf(-0.5),
        };
        let q = values(nh * hd, 3);
        let all = values(tokens * kv_row, 4);
        let mut runs = Vec::new();
        for (chunk, parallel) in [
            (300, false),
            (300, true),
            (64, false),
            (64, true),
            (1, false),
        ] {
            let mut cache = vec![f32::NAN; chunk * kv_row];
            let mut scores = vec![f32::NAN; nh * chunk];
            let mut softmax = vec![f32::NAN; 2 * nh];
            let mut att = vec![f32::NAN; nh * hd];
            let mut reads = Vec::new();
            attend_chunked(
                shape,
                tokens,
                |start, rows: &mut [f32]| {
                    reads.push((start, rows.len() / kv_row));
                    rows.copy_from_slice(&all[start * kv_row..start * kv_row + rows.len()]);
                    Ok(())
                },
                AttentionBufs {
                    q: &q,
                    cache: &mut cache,
                    scores: &mut scores,
                    softmax: &mut softmax,
                    att: &mut att,
                },
                parallel,
            )
            .unwrap();
            // Every token read once, in order, at most `chunk` at a time.
            assert_eq!(reads.first(), Some(&(0, chunk.min(tokens))));
            assert_eq!(reads.iter().map(|r| r.1).sum::<usize>(), tokens);
            assert!(reads.windows(2).all(|w| w[0].0 + w[0].1 == w[1].0));
            runs.push((chunk, parallel, att));
        }
        for pair in runs.chunks(2).filter(|p| p.len() == 2) {
            assert_eq!(
                pair[0].2, pair[1].2,
                "chunks of {}: parallel differs",
                pair[0].0
            );
        }
        for h in 0..nh {
            let g = h / (nh / nkv);
            let k = |t: usize, d: usize| f64::from(all[t * kv_row + g * hd + d]);
            let v = |t: usize, d: usize| f64::from(all[t * kv_row + nkv * hd + g * hd + d]);
            let s: Vec<f64> = (0..tokens)
                .map(|t| {
                    (0..hd)
                        .map(|d| f64::from(q[h * hd + d]) * k(t, d))
                        .sum::<f64>()
                        / (hd as f64).sqrt()
                })
                .collect();
            let max = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = s.iter().map(|x| (x - max).exp()).collect();
            let z: f64 = e.iter().sum();
            for d in 0..hd {
                let want: f64 = (0..tokens).map(|t| e[t] / z * v(t, d)).sum();
                for (chunk, parallel, att) in &runs {
                    let got = f64::from(att[h * hd + d]);
                    assert!(
                        (got - want).abs() < 1e-5,
                        "chunks of {chunk} (parallel {parallel}), head {h} dim {d}: {got} vs {want}"
                    );
                }
            }
        }
    }
}
