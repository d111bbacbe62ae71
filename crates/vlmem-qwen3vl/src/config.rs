//! Qwen3-VL configuration, read from a Hugging Face `config.json` in either layout:
//!
//! - released checkpoints (transformers 4.57): `text_config.rope_theta` +
//!   `text_config.rope_scaling {mrope_section, mrope_interleaved}`, MoE `num_experts`;
//! - transformers 5.x `save_pretrained`: `text_config.rope_parameters {rope_theta,
//!   mrope_section, mrope_interleaved}`, MoE `num_local_experts`.
//!
//! Unknown fields are tolerated (Hugging Face adds fields freely); missing required ones and
//! impossible values are errors. Special token ids come from the file, never from constants.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The text decoder's shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TextConfig {
    /// Model width.
    pub hidden_size: u64,
    /// Decoder layers.
    pub num_hidden_layers: u64,
    /// Query heads.
    pub num_attention_heads: u64,
    /// Key/value heads (GQA).
    pub num_key_value_heads: u64,
    /// Width of one head.
    pub head_dim: u64,
    /// SwiGLU width of the dense MLP.
    pub intermediate_size: u64,
    /// Vocabulary rows.
    pub vocab_size: u64,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// Rotary slots given to (t, h, w); sums to head_dim / 2.
    pub mrope_section: Vec<u64>,
    /// Whether the sections interleave (T,H,W,T,H,W,...), as all released sizes do.
    pub mrope_interleaved: bool,
    /// Longest context the rotary tables cover.
    pub max_position_embeddings: u64,
    /// Whether lm_head shares the embedding's matrix.
    pub tie_word_embeddings: bool,
    /// Mixture-of-experts settings; `None` for dense models.
    pub moe: Option<MoeConfig>,
}

/// Mixture-of-experts settings of the text decoder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MoeConfig {
    /// Experts per layer.
    pub num_experts: u64,
    /// Experts each token is routed to.
    pub num_experts_per_tok: u64,
    /// Width of one expert's SwiGLU.
    pub moe_intermediate_size: u64,
    /// Renormalise the top-k routing weights to sum to 1.
    pub norm_topk_prob: bool,
    /// Every `decoder_sparse_step`-th layer is sparse.
    pub decoder_sparse_step: u64,
    /// Layers that keep a dense MLP.
    pub mlp_only_layers: Vec<u64>,
}

impl MoeConfig {
    /// Whether decoder layer `layer` has experts (otherwise a dense MLP).
    pub fn is_sparse_layer(&self, layer: u64) -> bool {
        !self.mlp_only_layers.contains(&layer)
            && self.decoder_sparse_step > 0
            && (layer + 1).is_multiple_of(self.decoder_sparse_step)
    }
}

/// The vision tower's shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VisionConfig {
    /// ViT blocks.
    pub depth: u64,
    /// ViT width.
    pub hidden_size: u64,
    /// ViT MLP width.
    pub intermediate_size: u64,
    /// ViT heads.
    pub num_heads: u64,
    /// Pixels per patch side.
    pub patch_size: u64,
    /// Frames per temporal patch.
    pub temporal_patch_size: u64,
    /// Patches merged per side into one LLM token.
    pub spatial_merge_size: u64,
    /// Colour channels.
    pub in_channels: u64,
    /// Learned position embeddings (a square grid).
    pub num_position_embeddings: u64,
    /// Width of the merger output (the text hidden size).
    pub out_hidden_size: u64,
    /// ViT blocks whose outputs feed the DeepStack mergers.
    pub deepstack_visual_indexes: Vec<u64>,
}

/// A whole Qwen3-VL configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Qwen3VlConfig {
    /// `qwen3_vl` or `qwen3_vl_moe`.
    pub model_type: String,
    /// The text decoder.
    pub text: TextConfig,
    /// The vision tower.
    pub vision: VisionConfig,
    /// `<|image_pad|>`.
    pub image_token_id: u32,
    /// `<|video_pad|>`.
    pub video_token_id: u32,
    /// `<|vision_start|>`.
    pub vision_start_token_id: u32,
    /// `<|vision_end|>`.
    pub vision_end_token_id: u32,
}

impl Qwen3VlConfig {
    /// Whether the decoder has experts.
    pub fn is_moe(&self) -> bool {
        self.text.moe.is_some()
    }

    /// Reads `config.json` from a file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json_str(&text).map_err(|m| Error::config(path, m))
    }

    /// Parses config.json text; the error is a message naming the field.
    pub fn from_json_str(text: &str) -> std::result::Result<Self, String> {
        let raw: RawConfig =
            serde_json::from_str(text).map_err(|e| format!("invalid JSON: {e}"))?;
        raw.into_config()
    }

    /// Checks shapes that the arithmetic relies on.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let t = &self.text;
        let v = &self.vision;
        let positive = [
            ("text_config.hidden_size", t.hidden_size),
            ("text_config.num_hidden_layers", t.num_hidden_layers),
            ("text_config.num_attention_heads", t.num_attention_heads),
            ("text_config.num_key_value_heads", t.num_key_value_heads),
            ("text_config.head_dim", t.head_dim),
            ("text_config.vocab_size", t.vocab_size),
            ("vision_config.depth", v.depth),
            ("vision_config.hidden_size", v.hidden_size),
            ("vision_config.intermediate_size", v.intermediate_size),
            ("vision_config.num_heads", v.num_heads),
            ("vision_config.patch_size", v.patch_size),
            ("vision_config.temporal_patch_size", v.temporal_patch_size),
            ("vision_config.spatial_merge_size", v.spatial_merge_size),
            ("vision_config.in_channels", v.in_channels),
            (
                "vision_config.num_position_embeddings",
                v.num_position_embeddings,
            ),
            ("vision_config.out_hidden_size", v.out_hidden_size),
        ];
        for (name, value) in positive {
            if value == 0 {
                return Err(format!("{name} must be positive"));
            }
        }
        // Keep every product below 2^63 with room: no real model is near these bounds.
        let bounded = [
            ("text_config.hidden_size", t.hidden_size, 1 << 20),
            (
                "text_config.num_hidden_layers",
                t.num_hidden_layers,
                1 << 12,
            ),
            (
                "text_config.num_attention_heads",
                t.num_attention_heads,
                1 << 12,
            ),
            ("text_config.head_dim", t.head_dim, 1 << 12),
            (
                "text_config.intermediate_size",
                t.intermediate_size,
                1 << 22,
            ),
            ("text_config.vocab_size", t.vocab_size, 1 << 24),
            ("vision_config.depth", v.depth, 1 << 10),
            ("vision_config.hidden_size", v.hidden_size, 1 << 16),
            (
                "vision_config.intermediate_size",
                v.intermediate_size,
                1 << 18,
            ),
            ("vision_config.patch_size", v.patch_size, 1 << 10),
            (
                "vision_config.temporal_patch_size",
                v.temporal_patch_size,
                1 << 6,
            ),
            (
                "vision_config.spatial_merge_size",
                v.spatial_merge_size,
                1 << 6,
            ),
            ("vision_config.in_channels", v.in_channels, 1 << 8),
            ("vision_config.out_hidden_size", v.out_hidden_size, 1 << 20),
            (
                "vision_config.num_position_embeddings",
                v.num_position_embeddings,
                1 << 24,
            ),
        ];
        for (name, value, max) in bounded {
            if value > max {
                return Err(format!("{name} = {value} is implausibly large (max {max})"));
            }
        }
        if !t.num_attention_heads.is_multiple_of(t.num_key_value_heads) {
            return Err(format!(
                "text_config.num_attention_heads ({}) is not a multiple of num_key_value_heads ({})",
                t.num_attention_heads, t.num_key_value_heads
            ));
        }
        if !v.hidden_size.is_multiple_of(v.num_heads) {
            return Err("vision_config.hidden_size is not a multiple of num_heads".into());
        }
        // Checked: sections summing past 2^64 are an error, not an overflow panic.
        let rotary = t
            .mrope_section
            .iter()
            .try_fold(0u64, |acc, &s| acc.checked_add(s));
        if t.mrope_section.len() != 3 || rotary != Some(t.head_dim / 2) {
            return Err(format!(
                "mrope_section {:?} must have 3 entries summing to head_dim / 2 = {}",
                t.mrope_section,
                t.head_dim / 2
            ));
        }
        if !(t.rope_theta.is_finite() && t.rope_theta > 0.0) {
            return Err("rope_theta must be a positive number".into());
        }
        if let Some(d) = v.deepstack_visual_indexes.iter().find(|&&d| d >= v.depth) {
            return Err(format!(
                "deepstack_visual_indexes entry {d} is not a vision block (depth {})",
                v.depth
            ));
        }
        // More DeepStack features than text layers is allowed: as in the reference, feature
        // K is added after layer K only where that layer exists (truncated models).
        let grid = (v.num_position_embeddings as f64).sqrt() as u64;
        if grid * grid != v.num_position_embeddings {
            return Err("vision_config.num_position_embeddings must be a square".into());
        }
        if let Some(m) = &t.moe {
            if m.num_experts == 0 || m.moe_intermediate_size == 0 {
                return Err("num_experts and moe_intermediate_size must be positive".into());
            }
            if m.num_experts_per_tok == 0 || m.num_experts_per_tok > m.num_experts {
                return Err(format!(
                    "num_experts_per_tok ({}) must be between 1 and num_experts ({})",
                    m.num_experts_per_tok, m.num_experts
                ));
            }
            if m.num_experts > 1 << 14 || m.moe_intermediate_size > 1 << 20 {
                return Err("MoE sizes are implausibly large".into());
            }
        } else if t.intermediate_size == 0 {
            return Err("text_config.intermediate_size must be positive".into());
        }
        Ok(())
    }
}

// ---- the raw, tolerant shape of config.json --------------------------------------------

#[derive(Deserialize)]
struct RawConfig {
    model_type: Option<String>,
    #[serde(default)]
    architectures: Vec<String>,
    text_config: Option<RawText>,
    vision_config: Option<RawVision>,
    image_token_id: Option<u32>,
    video_token_id: Option<u32>,
    vision_start_token_id: Option<u32>,
    vision_end_token_id: Option<u32>,
    tie_word_embeddings: Option<bool>,
}

#[derive(Deserialize)]
struct RawRope {
    rope_theta: Option<f64>,
    mrope_section: Option<Vec<u64>>,
    mrope_interleaved: Option<bool>,
}

#[derive(Deserialize)]
struct RawText {
    hidden_size: Option<u64>,
    num_hidden_layers: Option<u64>,
    num_attention_heads: Option<u64>,
    num_key_value_heads: Option<u64>,
    head_dim: Option<u64>,
    intermediate_size: Option<u64>,
    vocab_size: Option<u64>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<RawRope>,
    rope_parameters: Option<RawRope>,
    max_position_embeddings: Option<u64>,
    tie_word_embeddings: Option<bool>,
    num_experts: Option<u64>,
    num_local_experts: Option<u64>,
    num_experts_per_tok: Option<u64>,
    moe_intermediate_size: Option<u64>,
    norm_topk_prob: Option<bool>,
    decoder_sparse_step: Option<u64>,
    #[serde(default)]
    mlp_only_layers: Vec<u64>,
}

#[derive(Deserialize)]
struct RawVision {
    depth: Option<u64>,
    hidden_size: Option<u64>,
    intermediate_size: Option<u64>,
    num_heads: Option<u64>,
    patch_size: Option<u64>,
    temporal_patch_size: Option<u64>,
    spatial_merge_size: Option<u64>,
    in_channels: Option<u64>,
    num_position_embeddings: Option<u64>,
    out_hidden_size: Option<u64>,
    deepstack_visual_indexes: Option<Vec<u64>>,
}

fn need<T>(value: Option<T>, name: &str) -> std::result::Result<T, String> {
    value.ok_or_else(|| format!("missing field {name}"))
}

impl RawConfig {
    fn into_config(self) -> std::result::Result<Qwen3VlConfig, String> {
        let model_type = self.model_type.unwrap_or_default();
        let known = matches!(model_type.as_str(), "qwen3_vl" | "qwen3_vl_moe");
        let arch_known = self.architectures.iter().any(|a| {
            a == "Qwen3VLForConditionalGeneration" || a == "Qwen3VLMoeForConditionalGeneration"
        });
        if !known && !arch_known {
            return Err(format!(
                "model_type is '{model_type}' (architectures {:?}); vlmem reads qwen3_vl and qwen3_vl_moe",
                self.architectures
            ));
        }
        let t = need(self.text_config, "text_config")?;
        let v = need(self.vision_config, "vision_config")?;
        let hidden_size = need(t.hidden_size, "text_config.hidden_size")?;
        let num_attention_heads = need(t.num_attention_heads, "text_config.num_attention_heads")?;
        if num_attention_heads == 0 {
            return Err("text_config.num_attention_heads must be positive".into());
        }
        // Both layouts: rope_parameters (5.x) or rope_theta + rope_scaling (released).
        let rope = t.rope_parameters.or(t.rope_scaling);
        let rope_theta = t
            .rope_theta
            .or(rope.as_ref().and_then(|r| r.rope_theta))
            .ok_or("missing text_config.rope_theta (or rope_parameters.rope_theta)")?;
        let mrope_section = rope
            .as_ref()
            .and_then(|r| r.mrope_section.clone())
            .ok_or("missing mrope_section in text_config.rope_scaling or rope_parameters")?;
        let mrope_interleaved = rope
            .as_ref()
            .and_then(|r| r.mrope_interleaved)
            .unwrap_or(true);
        let num_experts = t.num_experts.or(t.num_local_experts);
        let is_moe = model_type == "qwen3_vl_moe"
            || self.architectures.iter().any(|a| a.contains("Moe"))
            || num_experts.is_some();
        let moe = if is_moe {
            Some(MoeConfig {
                num_experts: need(
                    num_experts,
                    "text_config.num_experts (or num_local_experts)",
                )?,
                num_experts_per_tok: need(
                    t.num_experts_per_tok,
                    "text_config.num_experts_per_tok",
                )?,
                moe_intermediate_size: need(
                    t.moe_intermediate_size,
                    "text_config.moe_intermediate_size",
                )?,
                norm_topk_prob: t.norm_topk_prob.unwrap_or(true),
                decoder_sparse_step: t.decoder_sparse_step.unwrap_or(1),
                mlp_only_layers: t.mlp_only_layers,
            })
        } else {
            None
        };
        let tie = self
            .tie_word_embeddings
            .or(t.tie_word_embeddings)
            .unwrap_or(false);
        let cfg = Qwen3VlConfig {
            model_type: if is_moe { "qwen3_vl_moe" } else { "qwen3_vl" }.into(),
            text: TextConfig {
                hidden_size,
                num_hidden_layers: need(t.num_hidden_layers, "text_config.num_hidden_layers")?,
                num_attention_heads,
                num_key_value_heads: need(
                    t.num_key_value_heads,
                    "text_config.num_key_value_heads",
                )?,
                head_dim: t.head_dim.unwrap_or(hidden_size / num_attention_heads),
                intermediate_size: if is_moe {
                    t.intermediate_size.unwrap_or(0)
                } else {
                    need(t.intermediate_size, "text_config.intermediate_size")?
                },
                vocab_size: need(t.vocab_size, "text_config.vocab_size")?,
                rms_norm_eps: t.rms_norm_eps.unwrap_or(1e-6),
                rope_theta,
                mrope_section,
                mrope_interleaved,
                max_position_embeddings: t.max_position_embeddings.unwrap_or(262_144),
                tie_word_embeddings: tie,
                moe,
            },
            vision: VisionConfig {
                depth: need(v.depth, "vision_config.depth")?,
                hidden_size: need(v.hidden_size, "vision_config.hidden_size")?,
                intermediate_size: need(v.intermediate_size, "vision_config.intermediate_size")?,
                num_heads: need(v.num_heads, "vision_config.num_heads")?,
                patch_size: v.patch_size.unwrap_or(16),
                temporal_patch_size: v.temporal_patch_size.unwrap_or(2),
                spatial_merge_size: v.spatial_merge_size.unwrap_or(2),
                in_channels: v.in_channels.unwrap_or(3),
                num_position_embeddings: need(
                    v.num_position_embeddings,
                    "vision_config.num_position_embeddings",
                )?,
                out_hidden_size: v.out_hidden_size.unwrap_or(hidden_size),
                deepstack_visual_indexes: need(
                    v.deepstack_visual_indexes,
                    "vision_config.deepstack_visual_indexes",
                )?,
            },
            image_token_id: need(self.image_token_id, "image_token_id")?,
            video_token_id: need(self.video_token_id, "video_token_id")?,
            vision_start_token_id: need(self.vision_start_token_id, "vision_start_token_id")?,
            vision_end_token_id: need(self.vision_end_token_id, "vision_end_token_id")?,
        };
        cfg.validate()?;
        Ok(cfg)
    }
}
