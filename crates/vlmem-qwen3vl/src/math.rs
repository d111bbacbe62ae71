//! Memory math: what each part of a Qwen3-VL model costs in bytes.
//!
//! Weight bytes come from the tensor list (the catalog's, or a checkpoint's headers), so they
//! are exact: each tensor's bytes are its shape in its [`WeightFormat`] (whole rows of whole
//! blocks), as stored or as held in another format. KV bytes per token = 2 (K and V) x layers x kv_heads x head_dim x element size.
//! Image costs follow the released preprocessor: `smart_resize` to a multiple of
//! patch_size x merge_size (32) between min and max pixels, one ViT patch per 16x16 pixels,
//! one LLM token per 2x2 patches.

use crate::checkpoint::Checkpoint;
use crate::checkpoint::TensorInfo;
use crate::config::Qwen3VlConfig;
use crate::error::{Error, Result};
use crate::format::WeightFormat;
use crate::tensors::{Dtype, TensorClass, TensorSpec, expected_tensors};
use serde::Serialize;

/// Released preprocessor limits: `size.shortest_edge` (min pixels) and `longest_edge` (max).
pub const MIN_PIXELS: u64 = 65_536;
/// See [`MIN_PIXELS`].
pub const MAX_PIXELS: u64 = 16_777_216;
/// Longest image side we accept before resizing (larger is surely a mistake).
pub const MAX_IMAGE_SIDE: u64 = 1 << 20;

/// Weight bytes by component.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct WeightBytes {
    /// Every weight.
    pub total_bytes: u64,
    /// Every weight's elements.
    pub total_params: u64,
    /// Embedding, decoder layers, final norm, lm_head.
    pub text_bytes: u64,
    /// Everything under `model.visual`: tower, merger, DeepStack mergers.
    pub vision_bytes: u64,
    /// Tensors that are not Qwen3-VL weights (none in a clean checkpoint).
    pub other_bytes: u64,
    /// `embed_tokens`.
    pub embedding_bytes: u64,
    /// `lm_head` (0 when tied to the embedding).
    pub lm_head_bytes: u64,
    /// The final RMSNorm.
    pub final_norm_bytes: u64,
    /// Each decoder layer, all its tensors.
    pub layer_bytes: Vec<u64>,
    /// Of each layer, its expert tensors (0 for dense layers).
    pub layer_expert_bytes: Vec<u64>,
    /// Patch embedding, position embedding and ViT blocks.
    pub vision_tower_bytes: u64,
    /// The merger.
    pub merger_bytes: u64,
    /// The DeepStack mergers together.
    pub deepstack_merger_bytes: u64,
}

impl WeightBytes {
    /// The largest decoder layer (all layers are equal in the released sizes).
    pub fn per_layer_bytes(&self) -> u64 {
        self.layer_bytes.iter().copied().max().unwrap_or(0)
    }

    fn add(&mut self, class: Option<TensorClass>, layer: Option<u64>, bytes: u64, numel: u64) {
        self.total_bytes += bytes;
        self.total_params += numel;
        let Some(class) = class else {
            self.other_bytes += bytes;
            return;
        };
        if class.is_vision() {
            self.vision_bytes += bytes;
        } else {
            self.text_bytes += bytes;
        }
        match (class, layer) {
            (TensorClass::Embedding, _) => self.embedding_bytes += bytes,
            (TensorClass::LmHead, _) => self.lm_head_bytes += bytes,
            (TensorClass::Norm, None) => self.final_norm_bytes += bytes,
            (TensorClass::VisionEmbed | TensorClass::VisionBlock, _) => {
                self.vision_tower_bytes += bytes
            }
            (TensorClass::Merger, _) => self.merger_bytes += bytes,
            (TensorClass::DeepstackMerger, _) => self.deepstack_merger_bytes += bytes,
            (_, Some(l)) => {
                let l = l as usize;
                if self.layer_bytes.len() <= l {
                    self.layer_bytes.resize(l + 1, 0);
                    self.layer_expert_bytes.resize(l + 1, 0);
                }
                self.layer_bytes[l] += bytes;
                if class == TensorClass::Expert {
                    self.layer_expert_bytes[l] += bytes;
                }
            }
            (_, None) => self.other_bytes += bytes,
        }
    }

    /// Weight bytes of the catalog's tensor list for `cfg`, stored as `dtype`.
    pub fn of_config(cfg: &Qwen3VlConfig, dtype: Dtype) -> Self {
        let mut w = WeightBytes::default();
        for t in expected_tensors(cfg, dtype) {
            w.add(Some(t.class), t.layer, t.bytes(), t.numel());
        }
        w
    }

    /// Weight bytes of a checkpoint, exactly as its files store them.
    pub fn of_checkpoint(ckpt: &Checkpoint) -> Self {
        let mut w = WeightBytes::default();
        for t in &ckpt.tensors {
            let numel = t.shape.iter().product();
            w.add(t.class, t.layer, t.bytes, numel);
        }
        w
    }

    /// Weight bytes of `tensors` held as `format` (`None`: as stored). Each tensor is sized
    /// on its own, by its shape in that format; tensors that are not floating-point weights
    /// (integer tables) keep their stored bytes. An error names the first tensor whose rows
    /// the format cannot store (not whole blocks, or past 64 bits).
    pub fn of_tensors<'a>(
        tensors: impl IntoIterator<Item = &'a WeightTensor>,
        format: Option<WeightFormat>,
    ) -> Result<Self> {
        let mut w = WeightBytes::default();
        for t in tensors {
            let numel = t.params().ok_or_else(|| {
                Error::BadRequest(format!("{}: {:?} elements overflow", t.name, t.shape))
            })?;
            w.add(t.class, t.layer, t.held_bytes(format)?, numel);
        }
        Ok(w)
    }
}

/// A weight tensor as the memory math counts it: what it is part of, its shape, and its
/// stored type and bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WeightTensor {
    /// The checkpoint name.
    pub name: String,
    /// Dimensions; rows run along the last.
    pub shape: Vec<u64>,
    /// Stored element type (`U8` for a block-quantized matrix).
    pub dtype: Dtype,
    /// The format the stored bytes hold (`None`: not a weight format, e.g. integers).
    pub format: Option<WeightFormat>,
    /// Bytes as stored.
    pub stored_bytes: u64,
    /// What it is part of (`None` for names that are not Qwen3-VL weights).
    pub class: Option<TensorClass>,
    /// Decoder layer, for text-layer tensors.
    pub layer: Option<u64>,
}

impl WeightTensor {
    /// The tensors of a catalog model stored as `dtype`.
    pub fn of_config(cfg: &Qwen3VlConfig, dtype: Dtype) -> Vec<Self> {
        expected_tensors(cfg, dtype)
            .iter()
            .map(Self::from)
            .collect()
    }

    /// The tensors of a checkpoint, as its headers describe them, but for the scales of
    /// FP8 weights, which are folded into the weights' blocks when they are transcoded (an
    /// FP8 checkpoint always is).
    pub fn of_checkpoint(ckpt: &Checkpoint) -> Vec<Self> {
        let fp8 = crate::quantize::fp8_weights(ckpt);
        ckpt.tensors
            .iter()
            .filter(|t| {
                crate::format::fp8::weight_of_scale(&t.name).is_none_or(|w| !fp8.contains(w))
            })
            .map(Self::from)
            .collect()
    }

    /// Elements; `None` past 64 bits.
    pub fn params(&self) -> Option<u64> {
        self.shape.iter().try_fold(1u64, |n, &d| n.checked_mul(d))
    }

    /// The format this tensor is held in when the weights are asked for in `requested`
    /// (`None`: as stored). This is the one place that decides it, for the plan's math,
    /// `vlmem quantize` and quantization at load alike:
    ///
    /// - a tensor already stored in a block format, or in a type that is not a weight
    ///   format (an integer table), keeps its stored bytes;
    /// - a plain format holds any tensor;
    /// - a block format holds matrices (two or more dimensions) whose rows are whole blocks;
    ///   the rest (1-D norms and biases, as GGUF files keep norms in f32; the vision patch
    ///   embedding's rows of 16 in q8_0) keep their stored type;
    /// - a format of fewer than 8 bits per value (q4_k) is used only for the decoder
    ///   layers' projections (attention, dense MLP, experts), which hold nearly all the
    ///   parameters and are read every token; the embedding and output projection (one
    ///   row per token, and the logits' last step), the MoE router and the vision tower
    ///   (read once per image, and more sensitive to rounding) take q8_0 instead, as
    ///   llama.cpp's `_M` mixes keep their most sensitive tensors in more bits.
    ///
    /// FP8 weights (`F8_E4M3`, which no kernel reads) are values to transcode: they take
    /// the format asked for by the same rule, as if stored in a plain format.
    pub fn held_format(&self, requested: Option<WeightFormat>) -> Option<WeightFormat> {
        let Some(requested) = requested else {
            return self.stored_format();
        };
        let stored = match self.stored_format() {
            Some(f) => f,
            None if self.dtype == Dtype::F8E4M3 => WeightFormat::Bf16,
            None => return None,
        };
        if !stored.is_plain() || requested.is_plain() {
            return Some(if stored.is_plain() { requested } else { stored });
        }
        // Fewer than 8 bits per value: bytes x 8 < 8 x values.
        let low_bit = requested.block_bytes() < requested.block_elems();
        let wanted = if low_bit && !self.is_layer_projection() {
            WeightFormat::Q8_0
        } else {
            requested
        };
        Some(if self.holds_in(wanted) {
            wanted
        } else {
            stored
        })
    }

    /// Bytes held as `format` (`None`: the stored bytes), in the format
    /// [`WeightTensor::held_format`] chooses. An error only when the bytes pass 64 bits.
    pub fn held_bytes(&self, format: Option<WeightFormat>) -> Result<u64> {
        match self.held_format(format) {
            Some(f) if Some(f) != self.stored_format() => f
                .tensor_bytes(&self.shape)
                .map_err(|e| Error::BadRequest(format!("{}: {e}", self.name))),
            _ => Ok(self.stored_bytes),
        }
    }

    /// The format the stored bytes hold; `None` for a type that is not a weight format.
    pub fn stored_format(&self) -> Option<WeightFormat> {
        self.format
    }

    /// Whether this is a decoder layer's projection (attention, dense MLP, experts).
    fn is_layer_projection(&self) -> bool {
        matches!(
            self.class,
            Some(TensorClass::Attention | TensorClass::Mlp | TensorClass::Expert)
        )
    }

    /// Whether `format` can hold this tensor: any plain format holds any shape; a block
    /// format holds tensors of two or more dimensions whose rows are whole blocks.
    fn holds_in(&self, format: WeightFormat) -> bool {
        format.is_plain()
            || (self.shape.len() >= 2
                && self
                    .shape
                    .last()
                    .is_some_and(|&cols| cols.is_multiple_of(format.block_elems())))
    }
}

impl From<&TensorSpec> for WeightTensor {
    fn from(t: &TensorSpec) -> Self {
        WeightTensor {
            name: t.name.clone(),
            shape: t.shape.clone(),
            dtype: t.dtype,
            format: WeightFormat::from_dtype(t.dtype),
            stored_bytes: t.bytes(),
            class: Some(t.class),
            layer: t.layer,
        }
    }
}

impl From<&TensorInfo> for WeightTensor {
    fn from(t: &TensorInfo) -> Self {
        WeightTensor {
            name: t.name.clone(),
            shape: t.shape.clone(),
            dtype: t.dtype,
            format: t.format,
            stored_bytes: t.bytes,
            class: t.class,
            layer: t.layer,
        }
    }
}

/// KV-cache bytes per token: K and V of every layer.
pub fn kv_bytes_per_token(cfg: &Qwen3VlConfig, element_bytes: u64) -> u64 {
    let t = &cfg.text;
    2 * t.num_hidden_layers * t.num_key_value_heads * t.head_dim * element_bytes
}

/// Python's `round` (half to even), which the reference preprocessor uses.
fn round_half_even(x: f64) -> f64 {
    x.round_ties_even()
}

/// The released `smart_resize`: (height, width) rounded to multiples of `factor`, scaled into
/// [min_pixels, max_pixels] keeping the aspect ratio.
pub fn smart_resize(
    height: u64,
    width: u64,
    factor: u64,
    min_pixels: u64,
    max_pixels: u64,
) -> Result<(u64, u64)> {
    if height == 0 || width == 0 {
        return Err(Error::BadRequest(format!(
            "image size {width}x{height}: both sides must be at least 1 pixel"
        )));
    }
    if height > MAX_IMAGE_SIDE || width > MAX_IMAGE_SIDE {
        return Err(Error::BadRequest(format!(
            "image size {width}x{height}: a side over {MAX_IMAGE_SIDE} pixels is not an image we can take"
        )));
    }
    let (h, w, f) = (height as f64, width as f64, factor as f64);
    if h.max(w) / h.min(w) > 200.0 {
        return Err(Error::BadRequest(format!(
            "image size {width}x{height}: aspect ratio must be under 200"
        )));
    }
    let mut h_bar = (round_half_even(h / f) * f).max(f);
    let mut w_bar = (round_half_even(w / f) * f).max(f);
    if h_bar * w_bar > max_pixels as f64 {
        let beta = (h * w / max_pixels as f64).sqrt();
        h_bar = ((h / beta / f).floor() * f).max(f);
        w_bar = ((w / beta / f).floor() * f).max(f);
    } else if h_bar * w_bar < min_pixels as f64 {
        let beta = (min_pixels as f64 / (h * w)).sqrt();
        h_bar = (h * beta / f).ceil() * f;
        w_bar = (w * beta / f).ceil() * f;
    }
    Ok((h_bar as u64, w_bar as u64))
}

/// What one image costs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ImageCost {
    /// As given.
    pub width: u64,
    /// As given.
    pub height: u64,
    /// After smart_resize.
    pub resized_width: u64,
    /// After smart_resize.
    pub resized_height: u64,
    /// ViT patches (temporal x rows x columns).
    pub patches: u64,
    /// LLM tokens after the 2x2 merge (each also takes a KV entry).
    pub tokens: u64,
    /// The merged image embedding, `tokens x out_hidden` in the activation type.
    pub embeds_bytes: u64,
    /// The DeepStack features, kept until text layer `len - 1` of the prefill.
    pub deepstack_bytes: u64,
    /// Peak working set of one ViT block with per-head attention: residual and normed
    /// hidden (2 N d), qkv (3 N d), MLP intermediate (N I), one head's scores (N^2), all in
    /// the activation type.
    pub vision_working_set_bytes: u64,
}

/// The cost of a `width x height` image under the released preprocessor limits, with
/// activations of `act_bytes` per element (4 for f32).
pub fn image_cost(
    cfg: &Qwen3VlConfig,
    width: u64,
    height: u64,
    act_bytes: u64,
) -> Result<ImageCost> {
    let v = &cfg.vision;
    let factor = v.patch_size * v.spatial_merge_size;
    let (rh, rw) = smart_resize(height, width, factor, MIN_PIXELS, MAX_PIXELS)?;
    let patches = (rh / v.patch_size) * (rw / v.patch_size);
    let tokens = patches / (v.spatial_merge_size * v.spatial_merge_size);
    let embeds_bytes = tokens * v.out_hidden_size * act_bytes;
    let deepstack_bytes = v.deepstack_visual_indexes.len() as u64 * embeds_bytes;
    let n = patches;
    let d = v.hidden_size;
    let working = (2 * n * d + 3 * n * d + n * v.intermediate_size + n * n) * act_bytes;
    Ok(ImageCost {
        width,
        height,
        resized_width: rw,
        resized_height: rh,
        patches,
        tokens,
        embeds_bytes,
        deepstack_bytes,
        vision_working_set_bytes: working,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog;

    #[test]
    fn smart_resize_matches_the_reference_table() {
        // (input w, h) -> (resized w, h, patches, tokens), measured with transformers 5.24.
        let cases = [
            ((64, 64), (256, 256, 256, 64)),
            ((224, 224), (256, 256, 256, 64)),
            ((448, 448), (448, 448, 784, 196)),
            ((640, 480), (640, 480, 1200, 300)),
            ((1024, 1024), (1024, 1024, 4096, 1024)),
            ((1280, 720), (1280, 704, 3520, 880)),
            ((1920, 1080), (1920, 1088, 8160, 2040)),
            ((3840, 2160), (3840, 2176, 32640, 8160)),
            ((8000, 8000), (4096, 4096, 65536, 16384)),
            ((320, 256), (320, 256, 320, 80)),
        ];
        let cfg = catalog::config("qwen3-vl-2b").unwrap();
        for ((w, h), (rw, rh, patches, tokens)) in cases {
            let c = image_cost(&cfg, w, h, 4).unwrap();
            assert_eq!(
                (c.resized_width, c.resized_height, c.patches, c.tokens),
                (rw, rh, patches, tokens),
                "{w}x{h}"
            );
        }
    }

    #[test]
    fn bad_image_sizes_are_errors() {
        let cfg = catalog::config("qwen3-vl-2b").unwrap();
        for (w, h) in [(0, 0), (0, 10), (10, 0), (1 << 30, 1), (100_000, 100)] {
            assert!(
                matches!(image_cost(&cfg, w, h, 4), Err(Error::BadRequest(_))),
                "{w}x{h}"
            );
        }
    }

    #[test]
    fn kv_bytes_per_token_by_hand() {
        let kv = |n| kv_bytes_per_token(&catalog::config(n).unwrap(), 2);
        assert_eq!(kv("qwen3-vl-2b"), 2 * 28 * 8 * 128 * 2);
        assert_eq!(kv("qwen3-vl-2b"), 114_688);
        assert_eq!(kv("qwen3-vl-4b"), 147_456);
        assert_eq!(kv("qwen3-vl-8b"), 147_456);
        assert_eq!(kv("qwen3-vl-32b"), 262_144);
        assert_eq!(kv("qwen3-vl-30b-a3b"), 98_304);
        assert_eq!(kv("qwen3-vl-235b-a22b"), 192_512);
    }

    #[test]
    fn parameter_counts_by_hand() {
        // Hand arithmetic (qwen3vl.md §2.1): per dense layer
        //   q + k + v + o + mlp + norms = H*nh*128 + 2*H*kv*128 + nh*128*H + 3*H*I + 2H + 2*128.
        let dense_layer = |h: u64, nh: u64, kv: u64, i: u64| {
            h * nh * 128 + 2 * h * kv * 128 + nh * 128 * h + 3 * h * i + 2 * h + 2 * 128
        };
        let moe_layer = |h: u64, nh: u64, kv: u64, e: u64, im: u64| {
            h * nh * 128 + 2 * h * kv * 128 + nh * 128 * h + e * h + e * 3 * h * im + 2 * h + 256
        };
        // Vision tower: patch embed d*1536 + d, pos 2304*d, blocks, merger, 3 DeepStack mergers.
        let vision = |d: u64, i: u64, depth: u64, out: u64| {
            let block = 4 * d + 3 * d * d + 3 * d + d * d + d + 2 * d * i + i + d;
            let m = 4 * d;
            let merger = |norm: u64| 2 * norm + m * m + m + out * m + out;
            d * 1536 + d + 2304 * d + depth * block + merger(d) + 3 * merger(m)
        };
        let vocab = 151_936u64;
        let text = |layers: u64, layer: u64, h: u64, tied: bool| {
            layers * layer + vocab * h + h + if tied { 0 } else { vocab * h }
        };
        let expect = [
            (
                "qwen3-vl-2b",
                text(28, dense_layer(2048, 16, 8, 6144), 2048, true) + vision(1024, 4096, 24, 2048),
            ),
            (
                "qwen3-vl-4b",
                text(36, dense_layer(2560, 32, 8, 9728), 2560, true) + vision(1024, 4096, 24, 2560),
            ),
            (
                "qwen3-vl-8b",
                text(36, dense_layer(4096, 32, 8, 12288), 4096, false)
                    + vision(1152, 4304, 27, 4096),
            ),
            (
                "qwen3-vl-32b",
                text(64, dense_layer(5120, 64, 8, 25600), 5120, false)
                    + vision(1152, 4304, 27, 5120),
            ),
            (
                "qwen3-vl-30b-a3b",
                text(48, moe_layer(2048, 32, 4, 128, 768), 2048, false)
                    + vision(1152, 4304, 27, 2048),
            ),
            (
                "qwen3-vl-235b-a22b",
                text(94, moe_layer(4096, 64, 4, 128, 1536), 4096, false)
                    + vision(1152, 4304, 27, 4096),
            ),
        ];
        for (name, params) in expect {
            let w = WeightBytes::of_config(&catalog::config(name).unwrap(), Dtype::BF16);
            assert_eq!(w.total_params, params, "{name}");
            assert_eq!(w.total_bytes, 2 * params, "{name}");
            assert_eq!(w.text_bytes + w.vision_bytes, w.total_bytes, "{name}");
        }
        // The published counts (qwen3vl.md §2.1, meta-device counts of transformers).
        let w2 = WeightBytes::of_config(&catalog::config("qwen3-vl-2b").unwrap(), Dtype::BF16);
        assert_eq!(w2.total_params, 2_127_532_032);
        assert_eq!(w2.text_bytes, 2 * 1_720_574_976);
        assert_eq!(w2.vision_bytes, 2 * 406_957_056);
        assert_eq!(w2.per_layer_bytes(), 2 * 50_336_000);
        assert_eq!(w2.embedding_bytes, 2 * 311_164_928);
        assert_eq!(w2.lm_head_bytes, 0);
        let w8 = WeightBytes::of_config(&catalog::config("qwen3-vl-8b").unwrap(), Dtype::BF16);
        assert_eq!(w8.lm_head_bytes, w8.embedding_bytes);
        // 30B-A3B: one expert is 3 x 2048 x 768 bf16 = 9 MiB, 128 per layer.
        let w30 =
            WeightBytes::of_config(&catalog::config("qwen3-vl-30b-a3b").unwrap(), Dtype::BF16);
        assert_eq!(w30.layer_expert_bytes[0], 128 * 9 * 1024 * 1024);
    }

    fn weight(name: &str, shape: &[u64], dtype: Dtype) -> WeightTensor {
        WeightTensor {
            name: name.to_string(),
            shape: shape.to_vec(),
            dtype,
            format: WeightFormat::from_dtype(dtype),
            stored_bytes: shape.iter().product::<u64>() * dtype.size_bytes(),
            class: TensorClass::of_name(name),
            layer: crate::tensors::layer_of_name(name),
        }
    }

    /// A checkpoint with bf16 matrices, f32 norms and an integer table.
    fn mixed_tensors() -> Vec<WeightTensor> {
        vec![
            weight(
                "model.language_model.embed_tokens.weight",
                &[64, 16],
                Dtype::BF16,
            ),
            weight(
                "model.language_model.layers.0.self_attn.q_proj.weight",
                &[16, 16],
                Dtype::BF16,
            ),
            weight(
                "model.language_model.layers.0.input_layernorm.weight",
                &[16],
                Dtype::F32,
            ),
            weight("model.language_model.norm.weight", &[16], Dtype::F32),
            weight("position_ids", &[8], Dtype::I64),
        ]
    }

    #[test]
    fn each_tensor_is_held_in_the_requested_format_by_its_own_shape() {
        let tensors = mixed_tensors();
        let stored = WeightBytes::of_tensors(&tensors, None).unwrap();
        assert_eq!(
            stored.total_bytes,
            64 * 16 * 2 + 16 * 16 * 2 + 16 * 4 + 16 * 4 + 8 * 8
        );
        assert_eq!(stored.total_params, 64 * 16 + 16 * 16 + 16 + 16 + 8);
        let f32 = WeightBytes::of_tensors(&tensors, Some(WeightFormat::F32)).unwrap();
        // f32 norms stay 4 bytes a value (not 8, as scaling the total by 4 / 2 would give);
        // the integer table keeps its stored bytes.
        assert_eq!(f32.total_bytes, (64 * 16 + 16 * 16 + 16 + 16) * 4 + 8 * 8);
        assert_eq!(f32.embedding_bytes, 64 * 16 * 4);
        assert_eq!(f32.final_norm_bytes, 16 * 4);
        assert_eq!(f32.layer_bytes, [16 * 16 * 4 + 16 * 4]);
        assert_eq!(f32.other_bytes, 8 * 8);
        let bf16 = WeightBytes::of_tensors(&tensors, Some(WeightFormat::Bf16)).unwrap();
        assert_eq!(bf16.final_norm_bytes, 16 * 2);
        assert_eq!(bf16.total_bytes, (64 * 16 + 16 * 16 + 16 + 16) * 2 + 8 * 8);
        assert_eq!(bf16.total_params, stored.total_params);
    }

    #[test]
    fn a_tensor_the_format_cannot_size_is_an_error_naming_it() {
        let mut tensors = mixed_tensors();
        tensors.push(weight(
            "model.language_model.layers.0.mlp.up_proj.weight",
            &[1, 1],
            Dtype::BF16,
        ));
        tensors.last_mut().unwrap().shape = vec![u64::MAX / 2, 4];
        let e = WeightBytes::of_tensors(&tensors, Some(WeightFormat::F32)).unwrap_err();
        assert!(
            matches!(&e, Error::BadRequest(m) if m.starts_with("model.language_model.layers.0.mlp.up_proj.weight: ")),
            "{e}"
        );
        tensors.last_mut().unwrap().shape = vec![u64::MAX, 4];
        assert!(matches!(
            WeightBytes::of_tensors(&tensors, None),
            Err(Error::BadRequest(_))
        ));
    }

    #[test]
    fn catalog_weights_match_their_tensors_in_every_format() {
        for name in catalog::NAMES {
            let cfg = catalog::config(name).unwrap();
            let tensors = WeightTensor::of_config(&cfg, Dtype::BF16);
            let as_stored = WeightBytes::of_config(&cfg, Dtype::BF16);
            assert_eq!(WeightBytes::of_tensors(&tensors, None).unwrap(), as_stored);
            for f in WeightFormat::ALL.into_iter().filter(|f| f.is_plain()) {
                let held = WeightBytes::of_tensors(&tensors, Some(f)).unwrap();
                assert_eq!(
                    held,
                    WeightBytes::of_config(&cfg, f.plain_dtype().unwrap()),
                    "{name} {f}"
                );
                assert_eq!(
                    held.total_bytes,
                    held.total_params * f.block_bytes(),
                    "{name} {f}"
                );
            }
        }
    }

    #[test]
    fn q8_0_holds_matrices_of_whole_blocks_and_leaves_the_rest_as_stored() {
        let mut tensors = mixed_tensors();
        // Rows of 16 values: not whole q8_0 blocks (like the vision patch embedding).
        let q8 = WeightBytes::of_tensors(&tensors, Some(WeightFormat::Q8_0)).unwrap();
        assert_eq!(q8, WeightBytes::of_tensors(&tensors, None).unwrap());
        for t in &mut tensors {
            if let Some(cols) = t.shape.last_mut() {
                *cols = 64;
            }
            t.stored_bytes = t.shape.iter().product::<u64>() * t.dtype.size_bytes();
        }
        let q8 = WeightBytes::of_tensors(&tensors, Some(WeightFormat::Q8_0)).unwrap();
        // The matrices take 34 bytes per 32 values; the f32 norms and the integer table
        // keep their stored bytes.
        assert_eq!(q8.embedding_bytes, 64 * 2 * 34);
        assert_eq!(q8.layer_bytes, [16 * 2 * 34 + 64 * 4]);
        assert_eq!(q8.final_norm_bytes, 64 * 4);
        assert_eq!(q8.other_bytes, 64 * 8);
        assert_eq!(q8.total_params, 64 * 64 + 16 * 64 + 64 * 3);
    }

    #[test]
    fn catalog_weights_in_q8_0_are_34_bytes_per_32_matrix_values() {
        for name in catalog::NAMES {
            let cfg = catalog::config(name).unwrap();
            let tensors = WeightTensor::of_config(&cfg, Dtype::BF16);
            let held = WeightBytes::of_tensors(&tensors, Some(WeightFormat::Q8_0)).unwrap();
            let mut want = 0;
            let mut quantized_params = 0;
            for t in &tensors {
                let n = t.params().unwrap();
                if t.shape.len() >= 2 && t.shape.last().unwrap() % 32 == 0 {
                    want += n / 32 * 34;
                    quantized_params += n;
                } else {
                    want += t.stored_bytes;
                }
            }
            assert_eq!(held.total_bytes, want, "{name}");
            // Nearly every parameter is in a matrix q8_0 holds. The largest exception: the
            // 8B and larger vision towers' MLP down projections, rows of 4304 values (134.5
            // blocks), which stay bf16 (about 1.6% of the 8B's parameters).
            assert!(quantized_params * 100 > held.total_params * 95, "{name}");
            let bf16 = WeightBytes::of_tensors(&tensors, None).unwrap();
            assert!(held.total_bytes < bf16.total_bytes * 54 / 100, "{name}");
        }
    }

    #[test]
    fn deepstack_and_working_set_by_hand() {
        let cfg = catalog::config("qwen3-vl-2b").unwrap();
        let c = image_cost(&cfg, 1024, 1024, 2).unwrap();
        // 1024 tokens x 2048 x 2 bytes = 4 MiB merged; 3 DeepStack features = 12 MiB.
        assert_eq!(c.embeds_bytes, 4 << 20);
        assert_eq!(c.deepstack_bytes, 12 << 20);
        let n = 4096u64;
        assert_eq!(
            c.vision_working_set_bytes,
            (5 * n * 1024 + n * 4096 + n * n) * 2
        );
    }
}
