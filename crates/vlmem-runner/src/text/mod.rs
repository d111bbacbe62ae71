//! The text decoder: Qwen3 layers (RMSNorm, GQA attention with per-head q/k RMSNorm and
//! interleaved M-RoPE, SwiGLU or a top-k mixture of experts), DeepStack injection after the
//! first layers, the final norm and the (tied or untied) lm_head.

mod attend;
mod batch;
mod step;

pub use batch::BatchRow;

pub use attend::KV_CHUNK_TOKENS;

use crate::error::{Result, RunnerError};
use crate::kv::KvStore;
use crate::nn::{Params, attention_in_row_chunks, linear, rms_norm};
use crate::rope::{MropePositions, inv_freq, mrope_axes, text_cos_sin};
use candle_core::{Device, Tensor};
use candle_nn::ops::softmax_last_dim;
use candle_nn::rotary_emb::rope;
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
        let scale = (hd as f64).powf(-0.5);
        // [1, nh, n, hd], a block of query rows at a time (scores bounded by `score_bytes`);
        // the kv heads as cached (grouped-query attention: no repeated copy of them).
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
