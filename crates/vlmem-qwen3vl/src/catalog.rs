//! The six released Qwen3-VL sizes, with their exact text and vision configs
//! (shared research note qwen3vl.md §1.2: vocab 151936, head_dim 128, rope_theta 5e6,
//! interleaved M-RoPE [24, 20, 20], max_position_embeddings 262144 for all), and the
//! released special-token ids (vision_start 151652, vision_end 151653, image_pad 151655,
//! video_pad 151656).

use crate::config::{MoeConfig, Qwen3VlConfig, TextConfig, VisionConfig};
use serde_json::json;

/// Catalog names, smallest first.
pub const NAMES: [&str; 6] = [
    "qwen3-vl-2b",
    "qwen3-vl-4b",
    "qwen3-vl-8b",
    "qwen3-vl-32b",
    "qwen3-vl-30b-a3b",
    "qwen3-vl-235b-a22b",
];

struct Text {
    hidden: u64,
    layers: u64,
    heads: u64,
    kv: u64,
    inter: u64,
    tie: bool,
    moe: Option<(u64, u64, u64)>,
}

fn vision(small: bool, out_hidden_size: u64) -> VisionConfig {
    let (depth, hidden_size, intermediate_size, deepstack) = if small {
        (24, 1024, 4096, vec![5, 11, 17])
    } else {
        (27, 1152, 4304, vec![8, 16, 24])
    };
    VisionConfig {
        depth,
        hidden_size,
        intermediate_size,
        num_heads: 16,
        patch_size: 16,
        temporal_patch_size: 2,
        spatial_merge_size: 2,
        in_channels: 3,
        num_position_embeddings: 2304,
        out_hidden_size,
        deepstack_visual_indexes: deepstack,
    }
}

fn build(t: Text, small_vision: bool) -> Qwen3VlConfig {
    Qwen3VlConfig {
        model_type: if t.moe.is_some() {
            "qwen3_vl_moe"
        } else {
            "qwen3_vl"
        }
        .into(),
        text: TextConfig {
            hidden_size: t.hidden,
            num_hidden_layers: t.layers,
            num_attention_heads: t.heads,
            num_key_value_heads: t.kv,
            head_dim: 128,
            intermediate_size: t.inter,
            vocab_size: 151_936,
            rms_norm_eps: 1e-6,
            rope_theta: 5_000_000.0,
            mrope_section: vec![24, 20, 20],
            mrope_interleaved: true,
            max_position_embeddings: 262_144,
            tie_word_embeddings: t.tie,
            moe: t.moe.map(|(e, k, i)| MoeConfig {
                num_experts: e,
                num_experts_per_tok: k,
                moe_intermediate_size: i,
                norm_topk_prob: true,
                decoder_sparse_step: 1,
                mlp_only_layers: vec![],
            }),
        },
        vision: vision(small_vision, t.hidden),
        image_token_id: 151_655,
        video_token_id: 151_656,
        vision_start_token_id: 151_652,
        vision_end_token_id: 151_653,
    }
}

/// The config of a released size by catalog name.
pub fn config(name: &str) -> Option<Qwen3VlConfig> {
    let dense = |hidden, layers, heads, kv, inter, tie| Text {
        hidden,
        layers,
        heads,
        kv,
        inter,
        tie,
        moe: None,
    };
    Some(match name {
        "qwen3-vl-2b" => build(dense(2048, 28, 16, 8, 6144, true), true),
        "qwen3-vl-4b" => build(dense(2560, 36, 32, 8, 9728, true), true),
        "qwen3-vl-8b" => build(dense(4096, 36, 32, 8, 12288, false), false),
        "qwen3-vl-32b" => build(dense(5120, 64, 64, 8, 25600, false), false),
        "qwen3-vl-30b-a3b" => build(
            Text {
                moe: Some((128, 8, 768)),
                ..dense(2048, 48, 32, 4, 6144, false)
            },
            false,
        ),
        "qwen3-vl-235b-a22b" => build(
            Text {
                moe: Some((128, 8, 1536)),
                ..dense(4096, 94, 64, 4, 12288, false)
            },
            false,
        ),
        _ => return None,
    })
}

/// config.json in the released checkpoints' layout (transformers 4.57: `rope_theta` +
/// `rope_scaling`, `num_experts`), as `vlmem synth` writes it.
pub fn to_released_json(cfg: &Qwen3VlConfig) -> serde_json::Value {
    let t = &cfg.text;
    let v = &cfg.vision;
    let moe = cfg.is_moe();
    let mut text = json!({
        "attention_bias": false,
        "attention_dropout": 0.0,
        "head_dim": t.head_dim,
        "hidden_act": "silu",
        "hidden_size": t.hidden_size,
        "intermediate_size": t.intermediate_size,
        "max_position_embeddings": t.max_position_embeddings,
        "model_type": if moe { "qwen3_vl_moe_text" } else { "qwen3_vl_text" },
        "num_attention_heads": t.num_attention_heads,
        "num_hidden_layers": t.num_hidden_layers,
        "num_key_value_heads": t.num_key_value_heads,
        "rms_norm_eps": t.rms_norm_eps,
        "rope_theta": t.rope_theta,
        "rope_scaling": {
            "rope_type": "default",
            "mrope_section": t.mrope_section,
            "mrope_interleaved": t.mrope_interleaved,
        },
        "tie_word_embeddings": t.tie_word_embeddings,
        "use_cache": true,
        "vocab_size": t.vocab_size,
        "dtype": "bfloat16",
    });
    if let (Some(m), Some(obj)) = (&t.moe, text.as_object_mut()) {
        obj.insert("num_experts".into(), json!(m.num_experts));
        obj.insert("num_experts_per_tok".into(), json!(m.num_experts_per_tok));
        obj.insert(
            "moe_intermediate_size".into(),
            json!(m.moe_intermediate_size),
        );
        obj.insert("norm_topk_prob".into(), json!(m.norm_topk_prob));
        obj.insert("decoder_sparse_step".into(), json!(m.decoder_sparse_step));
        obj.insert("mlp_only_layers".into(), json!(m.mlp_only_layers));
    }
    json!({
        "architectures": [if moe { "Qwen3VLMoeForConditionalGeneration" } else { "Qwen3VLForConditionalGeneration" }],
        "model_type": cfg.model_type,
        "dtype": "bfloat16",
        "image_token_id": cfg.image_token_id,
        "video_token_id": cfg.video_token_id,
        "vision_start_token_id": cfg.vision_start_token_id,
        "vision_end_token_id": cfg.vision_end_token_id,
        "tie_word_embeddings": t.tie_word_embeddings,
        "transformers_version": "4.57.0.dev0",
        "text_config": text,
        "vision_config": {
            "deepstack_visual_indexes": v.deepstack_visual_indexes,
            "depth": v.depth,
            "hidden_act": "gelu_pytorch_tanh",
            "hidden_size": v.hidden_size,
            "in_channels": v.in_channels,
            "intermediate_size": v.intermediate_size,
            "model_type": if moe { "qwen3_vl_moe_vision" } else { "qwen3_vl_vision" },
            "num_heads": v.num_heads,
            "num_position_embeddings": v.num_position_embeddings,
            "out_hidden_size": v.out_hidden_size,
            "patch_size": v.patch_size,
            "spatial_merge_size": v.spatial_merge_size,
            "temporal_patch_size": v.temporal_patch_size,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_size_validates_and_round_trips_through_released_json() {
        for name in NAMES {
            let cfg = config(name).unwrap();
            cfg.validate().unwrap();
            let text = serde_json::to_string(&to_released_json(&cfg)).unwrap();
            let back = Qwen3VlConfig::from_json_str(&text).unwrap();
            assert_eq!(back, cfg, "{name}");
        }
        assert!(config("qwen3-vl-7b").is_none());
    }
}
