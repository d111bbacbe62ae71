//! The one placement plan: for every weight of a model, where it lives while the model runs
//! (the GPU, host RAM, or streamed from the checkpoint on disk), the staging area streamed
//! weights pass through, and each memory class's budget on each tier, sized from the model
//! and the request. `vlmem plan` reports it ([`crate::plan`]) and the engine executes exactly
//! it: the memory manager's budgets come from [`Budgets`], the weight store keeps, streams or
//! hands to the GPU each tensor as [`WeightPlacement`] says.
//!
//! The rules, in order:
//! - **Budgets from the request.** On the host: activations for one decode step at the
//!   request's context ([`decode_step_bytes`]), the KV cache for its context in whole blocks
//!   of its KV dtype ([`RequestNeeds::kv_dtype`]; at most half of the host: beyond that the KV
//!   pool swaps blocks to disk), the image
//!   embeddings of the images it gives, and every other byte for weights. The KV cache is
//!   computed on the host, so the GPU holds weights and a small share for its kernels' vectors.
//! - **GPU**: from layer 0 up, every 2-D matrix of as many whole decoder layers as the GPU's
//!   weight budget holds (one GPU to CPU hand-over per token); norms stay with the CPU.
//! - **Host**: the decoder's tensors (every layer, then the final norm and lm_head, which is
//!   the embedding when tied), if they all fit the host's weight budget. Else a staging area
//!   of at most [`STAGING_AREA_MAX_BYTES`] (a quarter of the budget, at most) is set apart for
//!   the read-ahead, and the rest keeps first the vectors (the norms: a few KiB each, which
//!   streamed would each cost a read request), then the other tensors in this order: the
//!   final unit (lm_head: the largest tensor), then layers from the first, each in use order.
//!   What does not fit streams: read ahead into the staging area, or on demand.
//! - **The rest** (the vision tower, MoE expert stacks) is kept on the host while room is left
//!   and streams otherwise (read into a buffer of its own when used, never entering the host
//!   tier, so it never evicts a kept tensor). The embedding, when not tied, always streams: a
//!   decode step reads one row of it.

use crate::config::{Qwen3VlConfig, TextConfig};
use crate::kv_dtype::{KvDtype, KvDtypeError};
use serde::Serialize;

/// Tokens per block of the paged KV cache.
pub const KV_BLOCK_TOKENS: u64 = 16;

/// Keys a decode step's attention scores at once (its arena holds one chunk of them).
pub const DECODE_KV_CHUNK_TOKENS: u64 = 256;

/// Alignment of each view in a decode step's arena.
pub const STEP_ALIGN_BYTES: u64 = 64;

/// The largest staging area for streamed weights: nine 4 MiB read-ahead buffers (two per
/// reader of four, and the one the kernel reads).
pub const STAGING_AREA_MAX_BYTES: u64 = 9 * (4 << 20);

/// The checkpoint name of the token embedding.
pub const EMBED_TOKENS: &str = "model.language_model.embed_tokens.weight";
/// The checkpoint name of the output projection (absent when tied to the embedding).
pub const LM_HEAD: &str = "lm_head.weight";
/// The checkpoint name of the final norm.
pub const FINAL_NORM: &str = "model.language_model.norm.weight";

const MIB: u64 = 1 << 20;

/// Where a weight lives while the model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Home {
    /// On the GPU, computed there.
    Gpu,
    /// In host RAM, computed by the CPU.
    Host,
    /// In the checkpoint on disk, read each time it is used (ahead through the staging area
    /// for the decoder's tensors, into a buffer of its own otherwise).
    Stream,
}

impl Home {
    /// "gpu", "host" or "stream".
    pub fn name(self) -> &'static str {
        match self {
            Home::Gpu => "gpu",
            Home::Host => "host",
            Home::Stream => "stream",
        }
    }
}

/// A weight as the planner sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanTensor {
    /// The checkpoint name.
    pub name: String,
    /// Bytes as held in the tiers.
    pub bytes: u64,
    /// Number of dimensions (1 for norms and biases).
    pub dims: usize,
}

/// One weight's place.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TensorPlacement {
    /// The checkpoint name.
    pub name: String,
    /// Where it lives.
    pub tier: Home,
    /// Its bytes.
    pub bytes: u64,
}

/// Every weight's place, and the staging area streamed ones pass through.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct WeightPlacement {
    /// Every weight, in the order given.
    pub tensors: Vec<TensorPlacement>,
    /// The host staging area for streamed decoder tensors (0 when none stream).
    pub staging_bytes: u64,
    /// Decoder layers whose matrices compute on the GPU (layers `0..gpu_layers`).
    pub gpu_layers: u64,
}

impl WeightPlacement {
    /// Where `name` lives (`None` for a name the plan does not know).
    pub fn home(&self, name: &str) -> Option<Home> {
        self.tensors.iter().find(|t| t.name == name).map(|t| t.tier)
    }

    /// Bytes placed on `home`.
    pub fn bytes_on(&self, home: Home) -> u64 {
        self.tensors
            .iter()
            .filter(|t| t.tier == home)
            .map(|t| t.bytes)
            .sum()
    }

    /// The names placed on `home`.
    pub fn names_on(&self, home: Home) -> impl Iterator<Item = &str> {
        self.tensors
            .iter()
            .filter(move |t| t.tier == home)
            .map(|t| t.name.as_str())
    }
}

/// Each memory class's bytes on one tier.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ClassBudgets {
    /// Weights (on the host, the staging area included).
    pub weights: u64,
    /// The KV cache.
    pub kv: u64,
    /// One step's activations.
    pub activations: u64,
    /// Image embeddings.
    pub vision: u64,
    /// Temporary buffers.
    pub scratch: u64,
}

impl ClassBudgets {
    /// Every class together.
    pub fn total(&self) -> u64 {
        self.weights + self.kv + self.activations + self.vision + self.scratch
    }
}

/// The GPU's and the host's class budgets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Budgets {
    /// The GPU (all zero without one).
    pub gpu: ClassBudgets,
    /// Host RAM.
    pub host: ClassBudgets,
}

/// What a request needs besides weights.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestNeeds {
    /// Prompt, image and generated tokens together.
    pub context_tokens: u64,
    /// Sequences decoded together.
    pub batch: u64,
    /// Each image's embedding and DeepStack bytes.
    pub image_bytes: Vec<u64>,
    /// How the KV cache holds keys and values (bf16 by default).
    pub kv_dtype: KvDtype,
}

/// One layer's keys and values for one token in `kv_dtype`; an error when a row of
/// `kv_heads * head_dim` values is not whole blocks of it.
pub fn kv_layer_bytes_per_token(
    cfg: &Qwen3VlConfig,
    kv_dtype: KvDtype,
) -> Result<u64, KvDtypeError> {
    kv_dtype.token_bytes(cfg.text.num_key_value_heads, cfg.text.head_dim)
}

/// Every layer's keys and values for one token in `kv_dtype`.
pub fn kv_bytes_per_token(cfg: &Qwen3VlConfig, kv_dtype: KvDtype) -> Result<u64, KvDtypeError> {
    let layer = kv_layer_bytes_per_token(cfg, kv_dtype)?;
    layer
        .checked_mul(cfg.text.num_hidden_layers)
        .ok_or(KvDtypeError::Overflow {
            dtype: kv_dtype,
            values: u64::MAX,
        })
}

/// One block of one layer's KV cache in `kv_dtype`.
pub fn kv_block_bytes(cfg: &Qwen3VlConfig, kv_dtype: KvDtype) -> Result<u64, KvDtypeError> {
    Ok(KV_BLOCK_TOKENS.saturating_mul(kv_layer_bytes_per_token(cfg, kv_dtype)?))
}

/// Every layer's whole KV blocks in `kv_dtype` for `context_tokens` of `batch` sequences
/// (saturating: an absurd context is refused by the caller, not an overflow).
pub fn kv_need_bytes(
    cfg: &Qwen3VlConfig,
    context_tokens: u64,
    batch: u64,
    kv_dtype: KvDtype,
) -> Result<u64, KvDtypeError> {
    Ok(cfg
        .text
        .num_hidden_layers
        .saturating_mul(context_tokens.div_ceil(KV_BLOCK_TOKENS))
        .saturating_mul(kv_block_bytes(cfg, kv_dtype)?)
        .saturating_mul(batch.max(1)))
}

/// The f32 lengths of a decode step's views with `tokens` tokens in the KV cache after the
/// step: hidden states, attention (queries, rotary halves, one chunk of keys and scores),
/// the MLP (dense or routed experts) and the logits. The runner carves its step arena in
/// this order.
pub fn decode_step_lens(c: &TextConfig, tokens: u64) -> [u64; 18] {
    let (h, hd) = (c.hidden_size, c.head_dim);
    let (nh, nkv) = (c.num_attention_heads, c.num_key_value_heads);
    let dense_i = c.intermediate_size;
    let (experts, moe_i) = c
        .moe
        .as_ref()
        .map_or((0, 0), |m| (m.num_experts, m.moe_intermediate_size));
    let kv_row = 2 * nkv * hd;
    let chunk = tokens.min(DECODE_KV_CHUNK_TOKENS);
    [
        h,
        h,
        h,
        hd,
        hd / 2,
        hd / 2,
        nh * hd,
        kv_row,
        chunk.saturating_mul(kv_row),
        nh.saturating_mul(chunk),
        2 * nh,
        nh * hd,
        h,
        dense_i.max(2 * moe_i),
        dense_i.max(moe_i),
        experts.max(1),
        if experts > 0 { h } else { 1 },
        c.vocab_size,
    ]
    .map(|n| n.max(1))
}

/// Bytes of one decode step's arena with `tokens` tokens of context (every view aligned).
pub fn decode_step_bytes(cfg: &Qwen3VlConfig, tokens: u64) -> u64 {
    decode_step_lens(&cfg.text, tokens)
        .iter()
        .map(|&n| n.saturating_mul(4).next_multiple_of(STEP_ALIGN_BYTES))
        .sum()
}

/// The class budgets for `needs` on a GPU of `gpu_usable_bytes` (0: none computes) and a
/// host of `host_usable_bytes` (see the module's rules), each rounded down to whole MiBs as
/// the memory manager's tiers are. Each class but weights is whole MiBs; weights take what is
/// left. An error when the model's KV rows are not whole blocks of `needs.kv_dtype`.
pub fn budgets(
    cfg: &Qwen3VlConfig,
    gpu_usable_bytes: u64,
    host_usable_bytes: u64,
    needs: &RequestNeeds,
) -> Result<Budgets, KvDtypeError> {
    let mib_up = |b: u64| b.div_ceil(MIB).saturating_mul(MIB);
    let mib_down = |b: u64| b / MIB * MIB;
    // Tiers are whole MiBs.
    let host = mib_down(host_usable_bytes);
    let gpu_usable_bytes = mib_down(gpu_usable_bytes);
    let activations =
        mib_up(decode_step_bytes(cfg, needs.context_tokens).saturating_mul(needs.batch.max(1)))
            .min(host);
    let vision = needs
        .image_bytes
        .iter()
        .fold(0u64, |acc, &b| acc.saturating_add(mib_up(b)))
        .min(host - activations);
    let kv = mib_up(kv_need_bytes(
        cfg,
        needs.context_tokens,
        needs.batch,
        needs.kv_dtype,
    )?)
    .min(mib_down(host / 2))
    .min(host - activations - vision);
    let weights = host - activations - vision - kv;
    // The GPU: weights, and a twentieth for its kernels' vectors.
    let gpu_scratch = mib_up(gpu_usable_bytes / 20).min(gpu_usable_bytes);
    Ok(Budgets {
        gpu: ClassBudgets {
            weights: gpu_usable_bytes - gpu_scratch,
            scratch: gpu_scratch,
            ..ClassBudgets::default()
        },
        host: ClassBudgets {
            weights,
            kv,
            activations,
            vision,
            scratch: 0,
        },
    })
}

/// The decoder layer a tensor belongs to (`model.language_model.layers.N.`).
pub fn text_layer(name: &str) -> Option<u64> {
    let rest = name.strip_prefix("model.language_model.layers.")?;
    rest.split('.').next()?.parse().ok()
}

/// Whether `name` is a fused MoE expert stack (decode reads only the routed experts' slices).
pub fn is_expert_stack(name: &str) -> bool {
    name.contains(".mlp.experts.")
}

/// Use order of a decoder layer's tensors (attention, then the MLP).
pub fn use_order(name: &str) -> usize {
    const ORDER: [&str; 12] = [
        "input_layernorm",
        "q_proj",
        "k_proj",
        "v_proj",
        "q_norm",
        "k_norm",
        "o_proj",
        "post_attention_layernorm",
        "mlp.gate.",
        "gate_proj",
        "up_proj",
        "down_proj",
    ];
    ORDER
        .iter()
        .position(|k| name.contains(k))
        .unwrap_or(ORDER.len())
}

/// The decoder's units in decode order, as indices into `tensors`: each layer's tensors in
/// use order (fused expert stacks left out), then the final unit (the final norm and the
/// output projection: lm_head, or the embedding when tied).
pub fn decode_units(cfg: &Qwen3VlConfig, tensors: &[PlanTensor]) -> Vec<Vec<usize>> {
    let layers = cfg.text.num_hidden_layers as usize;
    let mut units: Vec<Vec<usize>> = vec![Vec::new(); layers + 1];
    let mut order: Vec<usize> = (0..tensors.len()).collect();
    order.sort_by(|&a, &b| {
        let key = |i: usize| (use_order(&tensors[i].name), tensors[i].name.as_str());
        key(a).cmp(&key(b))
    });
    for i in order {
        let name = &tensors[i].name;
        if let Some(l) = text_layer(name)
            && (l as usize) < layers
            && !is_expert_stack(name)
        {
            units[l as usize].push(i);
        }
    }
    let head = if cfg.text.tie_word_embeddings {
        EMBED_TOKENS
    } else {
        LM_HEAD
    };
    for name in [FINAL_NORM, head] {
        if let Some(i) = tensors.iter().position(|t| t.name == name) {
            units[layers].push(i);
        }
    }
    units
}

/// Places every weight of `tensors` under a GPU weight budget (0: no GPU computes) and a host
/// weight budget (see the module's rules).
pub fn place_weights(
    cfg: &Qwen3VlConfig,
    tensors: &[PlanTensor],
    gpu_weight_bytes: u64,
    host_weight_bytes: u64,
) -> WeightPlacement {
    let n = tensors.len();
    let mut home: Vec<Option<Home>> = vec![None; n];
    // The GPU: whole layers' matrices from layer 0 up.
    let mut gpu_layers = 0;
    let mut gpu_left = gpu_weight_bytes;
    if gpu_weight_bytes > 0 {
        for layer in 0..cfg.text.num_hidden_layers {
            let mats: Vec<usize> = (0..n)
                .filter(|&i| text_layer(&tensors[i].name) == Some(layer) && tensors[i].dims == 2)
                .collect();
            let bytes: u64 = mats.iter().map(|&i| tensors[i].bytes).sum();
            if mats.is_empty() || bytes > gpu_left {
                break;
            }
            gpu_left -= bytes;
            gpu_layers += 1;
            for i in mats {
                home[i] = Some(Home::Gpu);
            }
        }
    }
    // The host: the decoder's tensors, the final unit first.
    let units = decode_units(cfg, tensors);
    let decoder: Vec<usize> = units
        .last()
        .into_iter()
        .chain(&units[..units.len() - 1])
        .flatten()
        .copied()
        .filter(|&i| home[i].is_none())
        .collect();
    let total: u64 = decoder.iter().map(|&i| tensors[i].bytes).sum();
    let (staging_bytes, mut room) = if total <= host_weight_bytes {
        (0, host_weight_bytes)
    } else {
        let area = STAGING_AREA_MAX_BYTES.min(host_weight_bytes / 4);
        (area, host_weight_bytes - area)
    };
    let mut any_streamed = false;
    for vectors in [true, false] {
        for &i in &decoder {
            if (tensors[i].dims == 1) != vectors {
                continue;
            }
            home[i] = Some(if tensors[i].bytes <= room {
                room -= tensors[i].bytes;
                Home::Host
            } else {
                any_streamed = true;
                Home::Stream
            });
        }
    }
    // The rest: the vision tower first, then expert stacks and anything else; the untied
    // embedding streams (a decode step reads one row).
    let mut rest: Vec<usize> = (0..n).filter(|&i| home[i].is_none()).collect();
    rest.sort_by_key(|&i| !tensors[i].name.starts_with("model.visual."));
    for i in rest {
        home[i] = Some(
            if tensors[i].name != EMBED_TOKENS && tensors[i].bytes <= room {
                room -= tensors[i].bytes;
                Home::Host
            } else {
                Home::Stream
            },
        );
    }
    WeightPlacement {
        tensors: tensors
            .iter()
            .zip(home)
            .map(|(t, h)| TensorPlacement {
                name: t.name.clone(),
                tier: h.unwrap_or(Home::Stream),
                bytes: t.bytes,
            })
            .collect(),
        staging_bytes: if any_streamed { staging_bytes } else { 0 },
        gpu_layers,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog;
    use crate::tensors::{Dtype, expected_tensors};

    fn model(name: &str) -> (Qwen3VlConfig, Vec<PlanTensor>) {
        let cfg = catalog::config(name).unwrap();
        let tensors = expected_tensors(&cfg, Dtype::BF16)
            .into_iter()
            .map(|s| PlanTensor {
                bytes: s.bytes(),
                dims: s.shape.len(),
                name: s.name,
            })
            .collect();
        (cfg, tensors)
    }

    #[test]
    fn every_weight_has_one_home_and_no_tier_is_overcommitted() {
        for name in catalog::NAMES {
            let (cfg, tensors) = model(name);
            for (gpu, host) in [(0, 0), (0, 1 << 30), (1 << 30, 3 << 30), (0, 1 << 40)] {
                let p = place_weights(&cfg, &tensors, gpu, host);
                assert_eq!(p.tensors.len(), tensors.len(), "{name}");
                let total: u64 = tensors.iter().map(|t| t.bytes).sum();
                assert_eq!(
                    p.bytes_on(Home::Gpu) + p.bytes_on(Home::Host) + p.bytes_on(Home::Stream),
                    total,
                    "{name}"
                );
                assert!(p.bytes_on(Home::Gpu) <= gpu, "{name}: GPU overcommitted");
                assert!(
                    p.bytes_on(Home::Host) + p.staging_bytes <= host,
                    "{name}: host overcommitted ({gpu}, {host})"
                );
            }
        }
    }

    #[test]
    fn ample_room_keeps_everything_but_the_untied_embedding() {
        let (cfg, tensors) = model("qwen3-vl-8b");
        let p = place_weights(&cfg, &tensors, 0, 1 << 40);
        assert_eq!(p.staging_bytes, 0);
        for t in &p.tensors {
            let want = if t.name == EMBED_TOKENS {
                Home::Stream
            } else {
                Home::Host
            };
            assert_eq!(t.tier, want, "{}", t.name);
        }
    }

    #[test]
    fn a_short_budget_keeps_norms_then_lm_head_then_early_layers() {
        let (cfg, tensors) = model("qwen3-vl-2b");
        let host = 1 << 30;
        let p = place_weights(&cfg, &tensors, 0, host);
        assert_eq!(p.staging_bytes, STAGING_AREA_MAX_BYTES);
        // Every norm is kept, the tied embedding (lm_head) is kept, layer 0's matrices are
        // kept and the last layer's stream.
        for t in &p.tensors {
            if t.name.ends_with("norm.weight") && t.name.starts_with("model.language_model") {
                assert_eq!(t.tier, Home::Host, "{}", t.name);
            }
        }
        assert_eq!(p.home(EMBED_TOKENS), Some(Home::Host));
        let q = |l: u64| format!("model.language_model.layers.{l}.self_attn.q_proj.weight");
        assert_eq!(p.home(&q(0)), Some(Home::Host));
        assert_eq!(
            p.home(&q(cfg.text.num_hidden_layers - 1)),
            Some(Home::Stream)
        );
        // Of the vision tower only what fits the last scraps of room is kept: its large
        // matrices stream.
        let vision = |h: Home| -> u64 {
            p.tensors
                .iter()
                .filter(|t| t.name.starts_with("model.visual.") && t.tier == h)
                .map(|t| t.bytes)
                .sum()
        };
        assert!(vision(Home::Stream) > 10 * vision(Home::Host));
    }

    /// With room for every norm but not for the decoder's matrices, the area (a quarter of
    /// the budget, here) is set apart first, the vectors are kept, then lm_head if it fits,
    /// then layers from the first; with room for all, nothing streams and no area is set apart.
    #[test]
    fn the_plan_keeps_vectors_first_then_the_final_unit_then_early_layers() {
        let (mut cfg, _) = model("qwen3-vl-2b");
        cfg.text.num_hidden_layers = 2;
        cfg.text.tie_word_embeddings = false;
        let t = |name: &str, bytes: u64, dims: usize| PlanTensor {
            name: name.into(),
            bytes,
            dims,
        };
        let l = |i: u32, rest: &str| format!("model.language_model.layers.{i}.{rest}");
        let mut tensors = Vec::new();
        for i in 0..2 {
            tensors.push(t(&l(i, "input_layernorm.weight"), 64, 1));
            tensors.push(t(&l(i, "self_attn.q_proj.weight"), 4000, 2));
            tensors.push(t(&l(i, "post_attention_layernorm.weight"), 64, 1));
            tensors.push(t(&l(i, "mlp.down_proj.weight"), 4000, 2));
        }
        tensors.push(t(FINAL_NORM, 64, 1));
        tensors.push(t(LM_HEAD, 9000, 2));
        // 12,428 bytes: a quarter (3,107) for the area, and room for the vectors (320) and
        // lm_head (9,000), not for a layer's matrix.
        let p = place_weights(&cfg, &tensors, 0, 12_428);
        assert_eq!(p.staging_bytes, 3_107);
        assert_eq!(p.home(LM_HEAD), Some(Home::Host));
        assert_eq!(p.bytes_on(Home::Host), 9_320);
        // 12,000 bytes: 9,000 after the area; lm_head no longer fits after the vectors,
        // layer 0's matrices do.
        let p = place_weights(&cfg, &tensors, 0, 12_000);
        assert_eq!(p.staging_bytes, 3_000);
        assert_eq!(p.home(LM_HEAD), Some(Home::Stream));
        assert_eq!(p.home(&l(0, "mlp.down_proj.weight")), Some(Home::Host));
        assert_eq!(p.home(&l(1, "self_attn.q_proj.weight")), Some(Home::Stream));
        assert!(
            p.tensors
                .iter()
                .filter(|t| t.bytes == 64)
                .all(|t| t.tier == Home::Host)
        );
        assert_eq!(p.bytes_on(Home::Host), 5 * 64 + 2 * 4000);
        // Room for everything.
        let p = place_weights(&cfg, &tensors, 0, 30_000);
        assert_eq!((p.staging_bytes, p.bytes_on(Home::Stream)), (0, 0));
    }

    #[test]
    fn the_gpu_takes_whole_layers_from_the_first() {
        let (cfg, tensors) = model("qwen3-vl-2b");
        let layer_mats: u64 = tensors
            .iter()
            .filter(|t| text_layer(&t.name) == Some(0) && t.dims == 2)
            .map(|t| t.bytes)
            .sum();
        let p = place_weights(&cfg, &tensors, 3 * layer_mats + 1, 1 << 40);
        assert_eq!(p.gpu_layers, 3);
        assert_eq!(p.bytes_on(Home::Gpu), 3 * layer_mats);
        for t in &p.tensors {
            let on_gpu =
                text_layer(&t.name).is_some_and(|l| l < 3) && !t.name.ends_with("norm.weight");
            assert_eq!(t.tier == Home::Gpu, on_gpu, "{}", t.name);
        }
    }

    #[test]
    fn budgets_follow_the_request_not_fixed_shares() {
        let cfg = catalog::config("qwen3-vl-8b").unwrap();
        let host = 12u64 << 30;
        let short = RequestNeeds {
            context_tokens: 16,
            batch: 1,
            image_bytes: vec![],
            kv_dtype: KvDtype::F32,
        };
        let b = budgets(&cfg, 0, host, &short).unwrap();
        assert_eq!(b.host.total(), host);
        assert_eq!(b.host.vision, 0);
        // 36 layers x one 16-token block of f32 K and V (8 heads x 128: 128 KiB) = 4.5 MiB,
        // in whole MiBs.
        assert_eq!(b.host.kv, 5 << 20);
        assert!(b.host.weights > host - (16 << 20), "{b:?}");
        // The same in bf16 (64 KiB a block: 2.25 MiB) and q8_0 (16 x 2 x 32 blocks of 34
        // bytes, 34 KiB a block: 1.2 MiB).
        for (kv_dtype, mib) in [(KvDtype::Bf16, 3), (KvDtype::Q8_0, 2)] {
            let needs = RequestNeeds {
                kv_dtype,
                ..short.clone()
            };
            let b = budgets(&cfg, 0, host, &needs).unwrap();
            assert_eq!(b.host.kv, mib << 20, "{kv_dtype}");
            assert_eq!(b.host.total(), host);
        }
        let long = RequestNeeds {
            context_tokens: 1 << 20,
            batch: 1,
            image_bytes: vec![5 << 20, 1],
            kv_dtype: KvDtype::Bf16,
        };
        let b = budgets(&cfg, 0, host, &long).unwrap();
        assert_eq!(b.host.kv, host / 2);
        assert_eq!(b.host.vision, 6 << 20);
        assert_eq!(b.host.total(), host);
        // A host too small for anything still adds up.
        let b = budgets(&cfg, 0, 1 << 20, &long).unwrap();
        assert_eq!(b.host.total(), 1 << 20);
    }

    /// The KV math of each dtype by hand on qwen3-vl-2b (28 layers x 8 KV heads x 128), and
    /// a model whose KV rows are not whole q8_0 blocks: a typed error from every function,
    /// budgets included, and the plain dtypes still sized.
    #[test]
    fn kv_bytes_follow_the_dtype() {
        let cfg = catalog::config("qwen3-vl-2b").unwrap();
        for (dtype, layer_token) in [
            (KvDtype::F32, 2 * 8 * 128 * 4),
            (KvDtype::Bf16, 2 * 8 * 128 * 2),
            (KvDtype::Q8_0, 2 * (8 * 128 / 32) * 34),
        ] {
            assert_eq!(kv_layer_bytes_per_token(&cfg, dtype), Ok(layer_token));
            assert_eq!(kv_bytes_per_token(&cfg, dtype), Ok(28 * layer_token));
            assert_eq!(kv_block_bytes(&cfg, dtype), Ok(16 * layer_token));
            // 1000 tokens: 63 blocks a layer.
            assert_eq!(
                kv_need_bytes(&cfg, 1000, 2, dtype),
                Ok(2 * 28 * 63 * 16 * layer_token)
            );
        }
        assert_eq!(kv_bytes_per_token(&cfg, KvDtype::Bf16), Ok(114_688));
        assert_eq!(kv_bytes_per_token(&cfg, KvDtype::Q8_0), Ok(60_928));
        let mut odd = cfg.clone();
        odd.text.head_dim = 20;
        odd.text.num_key_value_heads = 1;
        let err = KvDtypeError::PartialBlock {
            dtype: KvDtype::Q8_0,
            values: 20,
            block_elems: 32,
        };
        assert_eq!(
            kv_layer_bytes_per_token(&odd, KvDtype::Q8_0),
            Err(err.clone())
        );
        assert_eq!(kv_need_bytes(&odd, 16, 1, KvDtype::Q8_0), Err(err.clone()));
        let needs = RequestNeeds {
            context_tokens: 16,
            batch: 1,
            image_bytes: vec![],
            kv_dtype: KvDtype::Q8_0,
        };
        assert_eq!(budgets(&odd, 0, 1 << 30, &needs), Err(err));
        assert_eq!(kv_layer_bytes_per_token(&odd, KvDtype::Bf16), Ok(80));
    }

    #[test]
    fn the_step_arena_covers_its_views() {
        let cfg = catalog::config("qwen3-vl-2b").unwrap();
        let lens = decode_step_lens(&cfg.text, 1000);
        let raw: u64 = lens.iter().map(|n| n * 4).sum();
        let b = decode_step_bytes(&cfg, 1000);
        assert!(b >= raw && b < raw + 18 * STEP_ALIGN_BYTES);
        // The logits are the largest view.
        assert_eq!(lens[17], cfg.text.vocab_size);
    }
}
