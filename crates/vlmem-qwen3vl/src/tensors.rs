//! The tensors of a Qwen3-VL checkpoint: names, shapes and classes, as the released
//! checkpoints store them (transformers >= 4.57 nested names: `model.language_model.*`,
//! `model.visual.*`, `lm_head.weight`), derived from a config.
//!
//! This one list drives the memory math, the placement plan and `vlmem synth`, so all three
//! agree by construction; tests check it against real fixture headers.

use crate::config::Qwen3VlConfig;
use crate::format::WeightFormat;
use serde::Serialize;
use std::fmt;

/// Element type of a stored tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Dtype {
    /// bfloat16 (the released checkpoints' type).
    BF16,
    /// IEEE half.
    F16,
    /// IEEE single.
    F32,
    /// 64-bit integer.
    I64,
    /// 32-bit integer.
    I32,
    /// Unsigned byte.
    U8,
    /// 8-bit integer.
    I8,
    /// Boolean byte.
    BOOL,
    /// IEEE double.
    F64,
    /// 8-bit float, E4M3 (`e4m3fn`): Qwen's FP8 checkpoints, with a scale per 128 x 128
    /// tile (see `format::fp8`).
    F8E4M3,
}

impl Dtype {
    /// Bytes per element. Weights are sized by their [`WeightFormat`] instead, whose rows
    /// may be blocks of many elements.
    pub const fn size_bytes(self) -> u64 {
        match self {
            Dtype::BF16 | Dtype::F16 => 2,
            Dtype::F32 | Dtype::I32 => 4,
            Dtype::I64 | Dtype::F64 => 8,
            Dtype::U8 | Dtype::I8 | Dtype::BOOL | Dtype::F8E4M3 => 1,
        }
    }

    /// The name safetensors uses.
    pub const fn safetensors_name(self) -> &'static str {
        match self {
            Dtype::BF16 => "BF16",
            Dtype::F16 => "F16",
            Dtype::F32 => "F32",
            Dtype::I64 => "I64",
            Dtype::I32 => "I32",
            Dtype::U8 => "U8",
            Dtype::I8 => "I8",
            Dtype::BOOL => "BOOL",
            Dtype::F64 => "F64",
            Dtype::F8E4M3 => "F8_E4M3",
        }
    }

    /// Parses a safetensors dtype name.
    pub fn from_safetensors_name(name: &str) -> Option<Self> {
        Some(match name {
            "BF16" => Dtype::BF16,
            "F16" => Dtype::F16,
            "F32" => Dtype::F32,
            "I64" => Dtype::I64,
            "I32" => Dtype::I32,
            "U8" => Dtype::U8,
            "I8" => Dtype::I8,
            "BOOL" => Dtype::BOOL,
            "F64" => Dtype::F64,
            "F8_E4M3" => Dtype::F8E4M3,
            _ => return None,
        })
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.safetensors_name())
    }
}

/// What a tensor is part of; the unit the memory math and the plan reason about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TensorClass {
    /// `embed_tokens`: one row gathered per token.
    Embedding,
    /// q/k/v/o projections of a decoder layer.
    Attention,
    /// Dense SwiGLU projections of a decoder layer.
    Mlp,
    /// The MoE router (`mlp.gate`).
    Router,
    /// Fused expert weights of an MoE layer.
    Expert,
    /// RMSNorm weights (layer norms, q/k norms, the final norm).
    Norm,
    /// The output projection (absent when tied to the embedding).
    LmHead,
    /// Vision patch embedding (Conv3d) and learned position embedding.
    VisionEmbed,
    /// A ViT block.
    VisionBlock,
    /// The vision merger (2x2 patches to one LLM token).
    Merger,
    /// A DeepStack merger.
    DeepstackMerger,
}

impl TensorClass {
    /// Whether the tensor belongs to the vision tower (`model.visual.*`).
    pub const fn is_vision(self) -> bool {
        matches!(
            self,
            TensorClass::VisionEmbed
                | TensorClass::VisionBlock
                | TensorClass::Merger
                | TensorClass::DeepstackMerger
        )
    }

    /// The snake_case name.
    pub fn name(self) -> &'static str {
        match self {
            TensorClass::Embedding => "embedding",
            TensorClass::Attention => "attention",
            TensorClass::Mlp => "mlp",
            TensorClass::Router => "router",
            TensorClass::Expert => "expert",
            TensorClass::Norm => "norm",
            TensorClass::LmHead => "lm_head",
            TensorClass::VisionEmbed => "vision_embed",
            TensorClass::VisionBlock => "vision_block",
            TensorClass::Merger => "merger",
            TensorClass::DeepstackMerger => "deepstack_merger",
        }
    }

    /// Classifies a checkpoint tensor by its name. `None` for names that are not part of a
    /// Qwen3-VL model.
    pub fn of_name(name: &str) -> Option<Self> {
        if let Some(rest) = name.strip_prefix("model.visual.") {
            return Some(if rest.starts_with("blocks.") {
                TensorClass::VisionBlock
            } else if rest.starts_with("deepstack_merger_list.") {
                TensorClass::DeepstackMerger
            } else if rest.starts_with("merger.") {
                TensorClass::Merger
            } else {
                TensorClass::VisionEmbed
            });
        }
        if name.starts_with("lm_head.") {
            return Some(TensorClass::LmHead);
        }
        let rest = name.strip_prefix("model.language_model.")?;
        if rest.starts_with("embed_tokens.") {
            return Some(TensorClass::Embedding);
        }
        if rest.starts_with("norm.") {
            return Some(TensorClass::Norm);
        }
        let (_, in_layer) = rest.strip_prefix("layers.")?.split_once('.')?;
        Some(if in_layer.contains("norm") {
            TensorClass::Norm
        } else if in_layer.starts_with("self_attn.") {
            TensorClass::Attention
        } else if in_layer.starts_with("mlp.experts.") {
            TensorClass::Expert
        } else if in_layer.starts_with("mlp.gate.") {
            TensorClass::Router
        } else {
            TensorClass::Mlp
        })
    }
}

/// The decoder layer a text tensor belongs to, from its name.
pub fn layer_of_name(name: &str) -> Option<u64> {
    let rest = name.strip_prefix("model.language_model.layers.")?;
    rest.split('.').next()?.parse().ok()
}

/// One tensor the model needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TensorSpec {
    /// The checkpoint name.
    pub name: String,
    /// Dimensions.
    pub shape: Vec<u64>,
    /// Stored element type.
    pub dtype: Dtype,
    /// What it is part of.
    pub class: TensorClass,
    /// Decoder layer, for text-layer tensors.
    pub layer: Option<u64>,
}

impl TensorSpec {
    /// Elements.
    pub fn numel(&self) -> u64 {
        self.shape.iter().product()
    }
    /// Bytes stored: the shape in the dtype's [`WeightFormat`] (elements x size for types
    /// that are not weight formats).
    pub fn bytes(&self) -> u64 {
        WeightFormat::from_dtype(self.dtype)
            .and_then(|f| f.tensor_bytes(&self.shape).ok())
            .unwrap_or_else(|| self.numel() * self.dtype.size_bytes())
    }
}

/// Every tensor of a model with this config, stored as `dtype`, in a stable order
/// (vision tower, then the decoder layer by layer, then the final norm and lm_head).
/// MoE expert tensors use the released layout: `gate_up_proj` [E, H, 2I], `down_proj` [E, I, H].
pub fn expected_tensors(cfg: &Qwen3VlConfig, dtype: Dtype) -> Vec<TensorSpec> {
    let mut out = Vec::new();
    let mut push = |name: String, shape: Vec<u64>| {
        let class = TensorClass::of_name(&name).unwrap_or(TensorClass::Mlp);
        let layer = layer_of_name(&name);
        out.push(TensorSpec {
            name,
            shape,
            dtype,
            class,
            layer,
        });
    };
    let v = &cfg.vision;
    let d = v.hidden_size;
    let merged = d * v.spatial_merge_size * v.spatial_merge_size;
    let out_d = v.out_hidden_size;
    push(
        "model.visual.patch_embed.proj.weight".into(),
        vec![
            d,
            v.in_channels,
            v.temporal_patch_size,
            v.patch_size,
            v.patch_size,
        ],
    );
    push("model.visual.patch_embed.proj.bias".into(), vec![d]);
    push(
        "model.visual.pos_embed.weight".into(),
        vec![v.num_position_embeddings, d],
    );
    for b in 0..v.depth {
        let p = format!("model.visual.blocks.{b}");
        for norm in ["norm1", "norm2"] {
            push(format!("{p}.{norm}.weight"), vec![d]);
            push(format!("{p}.{norm}.bias"), vec![d]);
        }
        push(format!("{p}.attn.qkv.weight"), vec![3 * d, d]);
        push(format!("{p}.attn.qkv.bias"), vec![3 * d]);
        push(format!("{p}.attn.proj.weight"), vec![d, d]);
        push(format!("{p}.attn.proj.bias"), vec![d]);
        push(
            format!("{p}.mlp.linear_fc1.weight"),
            vec![v.intermediate_size, d],
        );
        push(
            format!("{p}.mlp.linear_fc1.bias"),
            vec![v.intermediate_size],
        );
        push(
            format!("{p}.mlp.linear_fc2.weight"),
            vec![d, v.intermediate_size],
        );
        push(format!("{p}.mlp.linear_fc2.bias"), vec![d]);
    }
    let mut merger = |p: String, norm_width: u64| {
        push(format!("{p}.norm.weight"), vec![norm_width]);
        push(format!("{p}.norm.bias"), vec![norm_width]);
        push(format!("{p}.linear_fc1.weight"), vec![merged, merged]);
        push(format!("{p}.linear_fc1.bias"), vec![merged]);
        push(format!("{p}.linear_fc2.weight"), vec![out_d, merged]);
        push(format!("{p}.linear_fc2.bias"), vec![out_d]);
    };
    merger("model.visual.merger".into(), d);
    for k in 0..v.deepstack_visual_indexes.len() {
        merger(format!("model.visual.deepstack_merger_list.{k}"), merged);
    }

    let t = &cfg.text;
    let h = t.hidden_size;
    let q = t.num_attention_heads * t.head_dim;
    let kv = t.num_key_value_heads * t.head_dim;
    push(
        "model.language_model.embed_tokens.weight".into(),
        vec![t.vocab_size, h],
    );
    for l in 0..t.num_hidden_layers {
        let p = format!("model.language_model.layers.{l}");
        push(format!("{p}.input_layernorm.weight"), vec![h]);
        push(format!("{p}.self_attn.q_proj.weight"), vec![q, h]);
        push(format!("{p}.self_attn.k_proj.weight"), vec![kv, h]);
        push(format!("{p}.self_attn.v_proj.weight"), vec![kv, h]);
        push(format!("{p}.self_attn.o_proj.weight"), vec![h, q]);
        push(format!("{p}.self_attn.q_norm.weight"), vec![t.head_dim]);
        push(format!("{p}.self_attn.k_norm.weight"), vec![t.head_dim]);
        push(format!("{p}.post_attention_layernorm.weight"), vec![h]);
        match &t.moe {
            Some(m) if m.is_sparse_layer(l) => {
                let (e, i) = (m.num_experts, m.moe_intermediate_size);
                push(format!("{p}.mlp.gate.weight"), vec![e, h]);
                push(format!("{p}.mlp.experts.gate_up_proj"), vec![e, h, 2 * i]);
                push(format!("{p}.mlp.experts.down_proj"), vec![e, i, h]);
            }
            _ => {
                let i = t.intermediate_size;
                push(format!("{p}.mlp.gate_proj.weight"), vec![i, h]);
                push(format!("{p}.mlp.up_proj.weight"), vec![i, h]);
                push(format!("{p}.mlp.down_proj.weight"), vec![h, i]);
            }
        }
    }
    push("model.language_model.norm.weight".into(), vec![h]);
    if !t.tie_word_embeddings {
        push("lm_head.weight".into(), vec![t.vocab_size, h]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_names() {
        use TensorClass::*;
        let cases = [
            ("model.language_model.embed_tokens.weight", Embedding),
            (
                "model.language_model.layers.3.self_attn.q_proj.weight",
                Attention,
            ),
            (
                "model.language_model.layers.3.self_attn.q_norm.weight",
                Norm,
            ),
            ("model.language_model.layers.3.input_layernorm.weight", Norm),
            ("model.language_model.layers.3.mlp.up_proj.weight", Mlp),
            ("model.language_model.layers.3.mlp.gate.weight", Router),
            (
                "model.language_model.layers.3.mlp.experts.gate_up_proj",
                Expert,
            ),
            ("model.language_model.norm.weight", Norm),
            ("lm_head.weight", LmHead),
            ("model.visual.patch_embed.proj.weight", VisionEmbed),
            ("model.visual.pos_embed.weight", VisionEmbed),
            ("model.visual.blocks.0.attn.qkv.bias", VisionBlock),
            ("model.visual.merger.linear_fc1.weight", Merger),
            (
                "model.visual.deepstack_merger_list.2.norm.bias",
                DeepstackMerger,
            ),
        ];
        for (name, class) in cases {
            assert_eq!(TensorClass::of_name(name), Some(class), "{name}");
        }
        assert_eq!(TensorClass::of_name("input_ids"), None);
        assert_eq!(TensorClass::of_name("model.language_model.layers.x"), None);
        assert_eq!(
            layer_of_name("model.language_model.layers.17.mlp.up_proj.weight"),
            Some(17)
        );
        assert_eq!(layer_of_name("model.visual.blocks.1.norm1.weight"), None);
    }
}
