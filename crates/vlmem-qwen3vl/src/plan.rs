//! The placement plan: which weights live on the GPU, which in host RAM, which stream from
//! disk at each token; where the KV cache goes; and the decode-speed bound that follows from
//! the profile's bandwidths.
//!
//! The model (also in docs/ARCHITECTURE.md, "The placement plan"):
//! - Decode reads, per token, every decoder layer and the output projection (lm_head, or the
//!   embedding matrix when tied) once, plus the KV cache of the context. MoE layers read only
//!   top-k of their experts (k / E of the expert bytes, on average).
//! - The embedding is a row gather (one row per token) and the vision tower runs only at
//!   prefill, so neither is worth fast memory during decode: they go to host RAM after the
//!   streamed text units, else stay on disk (read in place from the checkpoint).
//! - Each unit is computed where it lives, as llama.cpp does with `-ngl` and as every profile
//!   here favours (DDR4 at ~43 GB/s beats any PCIe 3.0 link at 3.9-15.8 GB/s): units on the
//!   GPU are computed there; units in host RAM by the CPU; units on disk are streamed into a
//!   double-buffered host staging area (two of the largest streamed units) and computed by
//!   the CPU, with the next unit's read overlapping the current one's compute.
//! - GPU memory is filled with activations, then the KV cache (if it takes at most half of
//!   what is left, else it lives in host RAM), then decoder layers in order, then lm_head.
//! - Placement is exclusive: a unit has one home tier.
//! - Per token, GPU and CPU units run one after the other and disk reads overlap compute:
//!   tokens/s <= 1 / max(disk bytes / disk bandwidth, device bytes / device memory
//!   bandwidth + host bytes / host memory bandwidth, link bytes / link bandwidth).
//!   The link carries only the hidden state between GPU and CPU units (and KV slices of
//!   CPU-computed layers when the KV cache lives on the GPU, which this plan avoids).

use crate::catalog;
use crate::checkpoint::Checkpoint;
use crate::config::Qwen3VlConfig;
use crate::error::{Error, Result};
use crate::format::WeightFormat;
use crate::kv_dtype::{KvDtype, KvDtypeError};
use crate::math::{ImageCost, WeightBytes, WeightTensor, image_cost};
use crate::placement::{
    self, Budgets, EMBED_TOKENS, FINAL_NORM, Home, LM_HEAD, PlanTensor, RequestNeeds,
    TensorPlacement, WeightPlacement, is_expert_stack, place_weights, text_layer,
};
use crate::tensors::Dtype;
use serde::Serialize;
use std::path::Path;
use vlmem_core::Tier;
use vlmem_core::bytes::format_bytes;
use vlmem_core::profile::HardwareProfile;

/// What to plan for.
#[derive(Debug, Clone)]
pub struct PlanRequest {
    /// Context length in tokens (prompt, images and generated tokens together).
    pub context_tokens: u64,
    /// Sequences decoded together.
    pub batch: u64,
    /// Images as (width, height), in prompt order.
    pub images: Vec<(u64, u64)>,
    /// How weights are held in the tiers; `None` keeps the stored format.
    pub dtype: Option<WeightFormat>,
    /// How the KV cache holds keys and values ([`KvDtype::Bf16`] by default, as the engine).
    pub kv_dtype: KvDtype,
}

impl Default for PlanRequest {
    fn default() -> Self {
        PlanRequest {
            context_tokens: 4096,
            batch: 1,
            images: Vec::new(),
            dtype: None,
            kv_dtype: KvDtype::default(),
        }
    }
}

/// A model to plan: a catalog entry or a checkpoint folder.
#[derive(Debug, Clone)]
pub struct ModelSource {
    /// The name shown ("qwen3-vl-8b" or the folder).
    pub name: String,
    /// Its config.
    pub config: Qwen3VlConfig,
    /// Its weight bytes as stored.
    pub weights: WeightBytes,
    /// Stored format: the block format of a quantized folder, else the largest tensor's
    /// (bf16 for catalog entries).
    pub stored_format: WeightFormat,
    /// The format the engine loads the weights in when none is asked for (`None`: as
    /// stored; q8_0 for an FP8 checkpoint, whose bytes the kernels do not read: see
    /// [`crate::quantize::load_format`]).
    pub load_dtype: Option<WeightFormat>,
    /// Whether the checkpoint already lies on disk (a folder) or would have to be fetched
    /// (a catalog name).
    pub on_disk: bool,
    /// Every weight as stored (the checkpoint's, or the catalog's tensor list).
    pub tensors: Vec<WeightTensor>,
}

impl ModelSource {
    /// Resolves `--model`: a catalog name or a checkpoint folder.
    pub fn resolve(arg: &str) -> Result<Self> {
        if let Some(config) = catalog::config(arg) {
            let weights = WeightBytes::of_config(&config, Dtype::BF16);
            let tensors = WeightTensor::of_config(&config, Dtype::BF16);
            return Ok(ModelSource {
                name: arg.to_string(),
                config,
                weights,
                stored_format: WeightFormat::Bf16,
                load_dtype: None,
                on_disk: false,
                tensors,
            });
        }
        let path = Path::new(arg);
        if path.exists() {
            let ckpt = Checkpoint::open(path)?;
            return Ok(ModelSource::of_checkpoint(arg, &ckpt));
        }
        if arg.contains('/') || arg.starts_with('.') {
            return Err(Error::Missing {
                path: path.to_path_buf(),
                message: "no such checkpoint folder".into(),
            });
        }
        Err(Error::UnknownModel(arg.to_string()))
    }

    /// An opened checkpoint, shown as `name`.
    pub fn of_checkpoint(name: &str, ckpt: &Checkpoint) -> Self {
        // A quantized folder is named by its block format (its largest tensor may be one it
        // keeps as stored, such as a vision patch embedding); any other by its largest tensor.
        // (A q4_k folder also holds q8_0 tensors: the block format holding the most bytes.)
        let mut block_bytes = std::collections::BTreeMap::new();
        for t in &ckpt.tensors {
            if let Some(f) = t.format.filter(|f| !f.is_plain()) {
                *block_bytes.entry(f).or_insert(0u64) += t.bytes;
            }
        }
        let quantized = block_bytes
            .into_iter()
            .max_by_key(|&(_, b)| b)
            .map(|(f, _)| f);
        let stored_format = quantized
            .or_else(|| {
                ckpt.tensors
                    .iter()
                    .max_by_key(|t| t.bytes)
                    .and_then(|t| t.format)
            })
            .unwrap_or(WeightFormat::Bf16);
        ModelSource {
            name: name.to_string(),
            config: ckpt.config.clone(),
            weights: WeightBytes::of_checkpoint(ckpt),
            stored_format,
            load_dtype: crate::quantize::load_format(ckpt),
            on_disk: true,
            tensors: WeightTensor::of_checkpoint(ckpt),
        }
    }
}

/// Weight bytes as the plan counts them.
#[derive(Debug, Clone, Serialize)]
pub struct PlanWeights {
    /// Every weight.
    pub total_bytes: u64,
    /// Embedding, decoder layers, final norm, lm_head.
    pub text_bytes: u64,
    /// Everything under `model.visual`.
    pub vision_bytes: u64,
    /// The largest decoder layer.
    pub per_layer_bytes: u64,
    /// Decoder layers.
    pub layers: u64,
    /// `embed_tokens`.
    pub embedding_bytes: u64,
    /// `lm_head` (0 when tied).
    pub lm_head_bytes: u64,
    /// Of each layer, experts (0 for dense models).
    pub expert_bytes_per_layer: u64,
    /// Parameters.
    pub total_params: u64,
    /// The format counted.
    pub dtype: WeightFormat,
}

/// A unit of placement: what is placed, where, and what it costs per decoded token.
#[derive(Debug, Clone, Serialize)]
pub struct PlacedUnit {
    /// "layer 3", "layer 3 experts", "lm_head", "embedding", "vision tower", "kv cache".
    pub name: String,
    /// Bytes held.
    pub bytes: u64,
    /// Bytes read per decoded token.
    pub bytes_per_token: u64,
    /// Where it lives.
    pub tier: Tier,
}

/// Where everything goes.
#[derive(Debug, Clone, Serialize)]
pub struct Placement {
    /// Weight bytes resident on the GPU.
    pub gpu_bytes: u64,
    /// Weight bytes resident in host RAM.
    pub host_bytes: u64,
    /// Weight bytes streamed from disk (read in place from the checkpoint).
    pub disk_bytes: u64,
    /// The KV cache's tier: host, or disk when the host's KV budget holds only part of it
    /// (the KV pool swaps the rest).
    pub kv_tier: Tier,
    /// KV bytes for the whole context and batch (in the plan's KV dtype, whole blocks).
    pub kv_bytes: u64,
    /// Host bytes kept for the staging area streamed weights are read ahead into.
    pub host_staging_bytes: u64,
    /// Decoder layers whose matrices compute on the GPU.
    pub gpu_layers: u64,
    /// Each memory class's budget on the GPU and the host, sized from the request.
    pub budgets: Budgets,
    /// Every unit (a decoder layer, lm_head, the embedding, the vision tower), split by tier
    /// where its tensors are on more than one.
    pub units: Vec<PlacedUnit>,
    /// Every weight: `{"name", "tier": "gpu"|"host"|"stream", "bytes"}`. The engine executes
    /// exactly this (`vlmem run --json` reports the same array).
    pub tensors: Vec<TensorPlacement>,
}

/// One term of the speed bound.
#[derive(Debug, Clone, Serialize)]
pub struct BoundTerm {
    /// "disk", "gpu_link", "gpu_memory", "host_memory".
    pub name: String,
    /// Bytes moved per token.
    pub bytes_per_token: u64,
    /// Bandwidth, bytes per second.
    pub bytes_per_s: f64,
    /// Seconds per token this term alone would take.
    pub seconds_per_token: f64,
}

/// The plan.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    /// The model's name.
    pub model: String,
    /// The profile's name.
    pub profile: String,
    /// Whether the device is simulated (no CUDA GPU).
    pub context_tokens: u64,
    /// Sequences decoded together.
    pub batch: u64,
    /// Weight bytes.
    pub weights: PlanWeights,
    /// How the KV cache holds keys and values ("f32", "bf16" or "q8_0").
    pub kv_dtype: KvDtype,
    /// KV bytes per token of context (every layer's keys and values in `kv_dtype`).
    pub kv_bytes_per_token: u64,
    /// Each image's cost, in order.
    pub images: Vec<ImageCost>,
    /// Where everything goes.
    pub placement: Placement,
    /// Whether the model can run at all on this profile.
    pub fits: bool,
    /// Why not, when it cannot.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Upper bound on decode tokens per second (0 when it does not fit).
    pub decode_tokens_per_s_bound: f64,
    /// The terms of the bound; the largest is the bottleneck.
    pub bound_terms: Vec<BoundTerm>,
    /// Notes for the reader (assumptions that matter here).
    pub notes: Vec<String>,
}

/// Makes the plan.
pub fn plan(model: &ModelSource, profile: &HardwareProfile, req: &PlanRequest) -> Result<Plan> {
    let cfg = &model.config;
    if req.batch == 0 {
        return Err(Error::BadRequest("--batch must be at least 1".into()));
    }
    if req.batch > 1 << 16 || req.context_tokens > 1 << 32 {
        return Err(Error::BadRequest(
            "--batch or --context is absurdly large".into(),
        ));
    }
    let dtype = req.dtype.or(model.load_dtype);
    let format = dtype.unwrap_or(model.stored_format);
    // Bytes as held in the tiers: each tensor by its own shape in the requested format.
    let held = WeightBytes::of_tensors(&model.tensors, dtype)?;
    let w = &model.weights;
    let act_bytes = 4; // activations are f32 (SM 6.1 has no bf16 arithmetic)
    let images = req
        .images
        .iter()
        .map(|&(iw, ih)| image_cost(cfg, iw, ih, act_bytes))
        .collect::<Result<Vec<_>>>()?;
    // The KV cache as the engine holds it (in the request's KV dtype, whole blocks).
    let kv_per_token = placement::kv_bytes_per_token(cfg, req.kv_dtype).map_err(kv_error)?;
    let kv_bytes = placement::kv_need_bytes(cfg, req.context_tokens, req.batch, req.kv_dtype)
        .map_err(kv_error)?;

    let mut notes = Vec::new();
    let mut reason: Option<String> = None;
    if req.context_tokens > cfg.text.max_position_embeddings {
        reason = Some(format!(
            "context of {} tokens exceeds the model's max_position_embeddings of {}",
            req.context_tokens, cfg.text.max_position_embeddings
        ));
    }
    let image_tokens: u64 = images.iter().map(|i| i.tokens + 2).sum();
    if image_tokens > req.context_tokens {
        reason.get_or_insert(format!(
            "the images alone take {image_tokens} tokens, more than the context of {}",
            req.context_tokens
        ));
    }

    // Every weight as held in the tiers, the budgets of the request, and the one placement.
    let tensors: Vec<PlanTensor> = model
        .tensors
        .iter()
        .map(|t| {
            Ok(PlanTensor {
                name: t.name.clone(),
                bytes: t.held_bytes(dtype)?,
                dims: t.shape.len(),
            })
        })
        .collect::<Result<_>>()?;
    // The embedding's own held format (a low-bit request keeps it in q8_0).
    let embedding_format = model
        .tensors
        .iter()
        .find(|t| t.name == EMBED_TOKENS)
        .and_then(|t| t.held_format(dtype))
        .unwrap_or(format);
    let embedding_row_bytes = embedding_format
        .row_bytes(cfg.text.hidden_size)
        .map_err(|e| Error::BadRequest(e.to_string()))?;
    let gpu_usable = profile.gpu_usable_bytes();
    let host_usable = profile.host.usable_bytes();
    let needs = RequestNeeds {
        context_tokens: req.context_tokens,
        batch: req.batch,
        image_bytes: images
            .iter()
            .map(|i| i.embeds_bytes + i.deepstack_bytes)
            .collect(),
        kv_dtype: req.kv_dtype,
    };
    let budgets = placement::budgets(cfg, gpu_usable, host_usable, &needs).map_err(kv_error)?;
    let placed = place_weights(cfg, &tensors, budgets.gpu.weights, budgets.host.weights);
    let kv_tier = if budgets.host.kv >= kv_bytes {
        Tier::Host
    } else {
        Tier::Disk
    };
    if budgets.host.weights == 0 && host_usable > 0 {
        reason.get_or_insert(format!(
            "host RAM ({} usable) holds no weights after one step's activations ({}) and the images' embeddings ({})",
            format_bytes(host_usable),
            format_bytes(budgets.host.activations),
            format_bytes(budgets.host.vision)
        ));
    }
    if host_usable == 0 {
        reason.get_or_insert("no usable host RAM".into());
    }
    if placed.bytes_on(Home::Stream) > 0 && placed.staging_bytes == 0 {
        notes.push(
            "streamed weights are read on demand: the host budget has no room for a staging area"
                .into(),
        );
    }
    let h = cfg.text.hidden_size;
    let units = units_of(cfg, &tensors, &placed, embedding_row_bytes);
    let gpu_layers = placed.gpu_layers;
    let sum_tier = |t: Tier| {
        units
            .iter()
            .filter(|u| u.tier == t)
            .map(|u| u.bytes)
            .sum::<u64>()
    };
    let (gpu_bytes, host_bytes, disk_bytes) = (
        sum_tier(Tier::Device),
        sum_tier(Tier::Host),
        sum_tier(Tier::Disk),
    );
    let per_token_from = |t: Tier| {
        units
            .iter()
            .filter(|u| u.tier == t)
            .map(|u| u.bytes_per_token)
            .sum::<u64>()
    };
    let has_gpu = gpu_bytes > 0;

    // A checkpoint that is not on disk yet must fit there.
    let total_held = held.total_bytes;
    if !model.on_disk && total_held > profile.disk.free_bytes.saturating_add(host_usable) {
        reason.get_or_insert(format!(
            "the weights take {}, more than the profile's free disk ({}) and usable RAM ({}) together",
            format_bytes(total_held),
            format_bytes(profile.disk.free_bytes),
            format_bytes(host_usable)
        ));
    }

    // The bound. KV of the context is read once per token from its tier.
    let kv_read = kv_per_token * req.context_tokens * req.batch;
    let kv_on = |t: Tier| if kv_tier == t { kv_read } else { 0 };
    let bw_term = |name: &str, bytes: u64, bytes_per_s: f64| BoundTerm {
        name: name.into(),
        bytes_per_token: bytes,
        bytes_per_s,
        seconds_per_token: if bytes_per_s > 0.0 {
            bytes as f64 / bytes_per_s
        } else {
            f64::INFINITY
        },
    };
    let disk_read = per_token_from(Tier::Disk) + kv_on(Tier::Disk);
    let cpu_read = per_token_from(Tier::Host) + kv_on(Tier::Host) + disk_read;
    let mut terms = vec![bw_term("disk", disk_read, profile.disk.read.bytes_per_s)];
    let mut compute = vec![bw_term(
        "host_memory",
        cpu_read,
        profile.host.bandwidth.bytes_per_s,
    )];
    if let (Some(gpu), true) = (&profile.gpu, has_gpu) {
        compute.push(bw_term(
            "gpu_memory",
            per_token_from(Tier::Device),
            gpu.memory_bandwidth.bytes_per_s,
        ));
        // The hidden state crosses the link to the CPU and back once per token per sequence.
        let crossings = if gpu_layers > 0 && cpu_read > 0 { 2 } else { 0 };
        terms.push(bw_term(
            "gpu_link",
            crossings * h * act_bytes * req.batch,
            gpu.link.bytes_per_s,
        ));
    }
    let compute_s: f64 = compute.iter().map(|t| t.seconds_per_token).sum();
    terms.push(BoundTerm {
        name: "compute_memory".into(),
        bytes_per_token: compute.iter().map(|t| t.bytes_per_token).sum(),
        bytes_per_s: compute.iter().map(|t| t.bytes_per_token).sum::<u64>() as f64
            / compute_s.max(f64::MIN_POSITIVE),
        seconds_per_token: compute_s,
    });
    terms.extend(compute);
    terms.retain(|t| t.bytes_per_token > 0);
    // host_memory and gpu_memory are parts of compute_memory, which adds them.
    let worst = terms
        .iter()
        .filter(|t| t.name != "host_memory" && t.name != "gpu_memory")
        .map(|t| t.seconds_per_token)
        .fold(0.0f64, f64::max);
    let fits = reason.is_none();
    let bound = if fits && worst > 0.0 {
        req.batch as f64 / worst
    } else {
        0.0
    };
    if profile.gpu.as_ref().is_some_and(|g| !g.bf16_arithmetic) {
        notes.push("the GPU has no bf16 arithmetic: weights stay bf16 in the tiers and are computed in f32 once staged".into());
    }
    if profile.gpu.is_none() {
        notes.push("no GPU in this profile: the CPU computes from host RAM".into());
    }
    if disk_bytes > 0 && model.on_disk {
        notes.push(
            "weights on disk are read in place from the checkpoint files (no swap copy)".into(),
        );
    }

    Ok(Plan {
        model: model.name.clone(),
        profile: profile.name.clone(),
        context_tokens: req.context_tokens,
        batch: req.batch,
        weights: PlanWeights {
            total_bytes: total_held,
            text_bytes: held.text_bytes,
            vision_bytes: held.vision_bytes,
            per_layer_bytes: held.per_layer_bytes(),
            layers: cfg.text.num_hidden_layers,
            embedding_bytes: held.embedding_bytes,
            lm_head_bytes: held.lm_head_bytes,
            expert_bytes_per_layer: held.layer_expert_bytes.iter().copied().max().unwrap_or(0),
            total_params: w.total_params,
            dtype: format,
        },
        kv_dtype: req.kv_dtype,
        kv_bytes_per_token: kv_per_token,
        images,
        placement: Placement {
            gpu_bytes,
            host_bytes,
            disk_bytes,
            kv_tier,
            kv_bytes,
            host_staging_bytes: placed.staging_bytes,
            gpu_layers,
            budgets,
            units,
            tensors: placed.tensors,
        },
        fits,
        reason,
        decode_tokens_per_s_bound: bound,
        bound_terms: terms,
        notes,
    })
}

/// A KV dtype the model's rows cannot be held in, as a bad request.
fn kv_error(e: KvDtypeError) -> Error {
    Error::BadRequest(format!("--kv-dtype: {e}"))
}

/// The tier a placement home is reported on.
fn tier_of(home: Home) -> Tier {
    match home {
        Home::Gpu => Tier::Device,
        Home::Host => Tier::Host,
        Home::Stream => Tier::Disk,
    }
}

/// The placement by unit (a decoder layer, its experts, lm_head, the embedding, the vision
/// tower), split by tier where a unit's tensors are on more than one, in decode order, with
/// the bytes decode reads of each per token: a layer and lm_head whole, the routed share of
/// an expert stack, one row of an untied embedding, nothing of the vision tower.
fn units_of(
    cfg: &Qwen3VlConfig,
    tensors: &[PlanTensor],
    placed: &WeightPlacement,
    embedding_row_bytes: u64,
) -> Vec<PlacedUnit> {
    let layers = cfg.text.num_hidden_layers;
    let head = if cfg.text.tie_word_embeddings {
        "lm_head (tied embedding)"
    } else {
        "lm_head"
    };
    // (order, name, share of bytes read per token as (numerator, denominator)).
    let unit = |name: &str| -> (u64, String, (u64, u64)) {
        if let Some(l) = text_layer(name).filter(|&l| l < layers) {
            if is_expert_stack(name) {
                let (k, e) = cfg
                    .text
                    .moe
                    .as_ref()
                    .map_or((1, 1), |m| (m.num_experts_per_tok, m.num_experts.max(1)));
                return (2 * l + 1, format!("layer {l} experts"), (k, e));
            }
            return (2 * l, format!("layer {l}"), (1, 1));
        }
        let last = 2 * layers;
        if name == FINAL_NORM
            || name == LM_HEAD
            || (name == EMBED_TOKENS && cfg.text.tie_word_embeddings)
        {
            (last, head.to_string(), (1, 1))
        } else if name == EMBED_TOKENS {
            (last + 1, "embedding".into(), (0, 1))
        } else if name.starts_with("model.visual.") {
            (last + 2, "vision tower".into(), (0, 1))
        } else {
            (last + 3, "other tensors".into(), (0, 1))
        }
    };
    let mut out: Vec<(u64, PlacedUnit)> = Vec::new();
    for (t, p) in tensors.iter().zip(&placed.tensors) {
        let (order, name, (num, den)) = unit(&t.name);
        let tier = tier_of(p.tier);
        let per_token = if name == "embedding" {
            embedding_row_bytes
        } else {
            t.bytes / den * num
        };
        match out
            .iter_mut()
            .find(|(_, u)| u.name == name && u.tier == tier)
        {
            Some((_, u)) => {
                u.bytes += t.bytes;
                u.bytes_per_token += per_token;
            }
            None => out.push((
                order,
                PlacedUnit {
                    name,
                    bytes: t.bytes,
                    bytes_per_token: per_token,
                    tier,
                },
            )),
        }
    }
    out.sort_by_key(|(order, u)| (*order, u.tier.index()));
    out.into_iter().map(|(_, u)| u).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use vlmem_core::bytes::GIB;
    use vlmem_core::profile::{Overrides, builtin};

    fn laptop() -> HardwareProfile {
        builtin("laptop-i5-10210u-mx250").unwrap()
    }

    #[test]
    fn every_size_places_every_byte_exactly_once() {
        for name in catalog::NAMES {
            let m = ModelSource::resolve(name).unwrap();
            let p = plan(&m, &laptop(), &PlanRequest::default()).unwrap();
            let pl = &p.placement;
            assert_eq!(
                pl.gpu_bytes + pl.host_bytes + pl.disk_bytes,
                p.weights.total_bytes,
                "{name}"
            );
            assert_eq!(p.weights.total_bytes, 2 * p.weights.total_params, "{name}");
            let by_tensor: u64 = pl.tensors.iter().map(|t| t.bytes).sum();
            assert_eq!(by_tensor, p.weights.total_bytes, "{name}");
            assert!(
                pl.gpu_bytes <= pl.budgets.gpu.weights
                    && pl.budgets.gpu.total() <= laptop().gpu_usable_bytes(),
                "{name}: GPU overcommitted"
            );
            assert!(
                pl.host_bytes + pl.host_staging_bytes <= pl.budgets.host.weights
                    && pl.budgets.host.total() <= laptop().host.usable_bytes(),
                "{name}: host overcommitted"
            );
        }
    }

    #[test]
    fn the_235b_cannot_run_on_the_laptop_and_says_why() {
        let m = ModelSource::resolve("qwen3-vl-235b-a22b").unwrap();
        let p = plan(&m, &laptop(), &PlanRequest::default()).unwrap();
        assert!(!p.fits);
        assert_eq!(p.decode_tokens_per_s_bound, 0.0);
        assert!(p.reason.unwrap().contains("free disk"));
        // The 2B runs.
        let m = ModelSource::resolve("qwen3-vl-2b").unwrap();
        assert!(plan(&m, &laptop(), &PlanRequest::default()).unwrap().fits);
    }

    #[test]
    fn cpu_only_bound_by_hand() {
        // No GPU, RAM for everything: the CPU reads every text layer, lm_head (the tied
        // embedding) and the KV cache from RAM once per token.
        let mut profile = laptop();
        profile.gpu = None;
        profile.host.memory_bytes = 64 * GIB;
        let m = ModelSource::resolve("qwen3-vl-2b").unwrap();
        // 28 layers x 100,672,000 B + tied embedding 622,329,856 B + final norm 4,096 B,
        // + the KV cache of 1000 tokens: 229,376 B a token in f32, half in bf16 (the
        // default), 28 x 2 x 32 blocks of 34 B in q8_0.
        for (kv_dtype, kv_token) in [
            (KvDtype::F32, 229_376u64),
            (KvDtype::Bf16, 114_688),
            (KvDtype::Q8_0, 60_928),
        ] {
            let req = PlanRequest {
                context_tokens: 1000,
                kv_dtype,
                ..Default::default()
            };
            let p = plan(&m, &profile, &req).unwrap();
            assert_eq!(p.placement.disk_bytes, 0);
            assert_eq!(p.placement.gpu_bytes, 0);
            assert_eq!((p.kv_dtype, p.kv_bytes_per_token), (kv_dtype, kv_token));
            // 63 blocks of 16 tokens.
            assert_eq!(p.placement.kv_bytes, 63 * 16 * kv_token);
            let per_token = 28 * 100_672_000u64 + 622_329_856 + 4_096 + kv_token * 1000;
            let expect = profile.host.bandwidth.bytes_per_s / per_token as f64;
            assert!(
                (p.decode_tokens_per_s_bound - expect).abs() < 1e-9,
                "{kv_dtype}: {} vs {expect}",
                p.decode_tokens_per_s_bound
            );
        }
        let p = plan(&m, &profile, &PlanRequest::default()).unwrap();
        assert_eq!(p.kv_dtype, KvDtype::Bf16, "the default");
        let json = serde_json::to_value(&p).unwrap();
        assert_eq!(json["kv_dtype"], "bf16");
        assert_eq!(json["kv_bytes_per_token"], 114_688);
    }

    /// A KV dtype whose blocks do not divide the model's KV rows is a bad request, not a
    /// panic; the same model plans in the plain dtypes.
    #[test]
    fn a_kv_dtype_the_rows_cannot_hold_is_a_bad_request() {
        let mut m = ModelSource::resolve("qwen3-vl-2b").unwrap();
        m.config.text.head_dim = 20;
        m.config.text.num_key_value_heads = 1;
        let req = |kv_dtype| PlanRequest {
            kv_dtype,
            ..Default::default()
        };
        match plan(&m, &laptop(), &req(KvDtype::Q8_0)) {
            Err(Error::BadRequest(msg)) => assert!(msg.contains("q8_0"), "{msg}"),
            other => panic!("{other:?}"),
        }
        let p = plan(&m, &laptop(), &req(KvDtype::Bf16)).unwrap();
        assert_eq!(p.kv_bytes_per_token, 28 * 2 * 20 * 2);
    }

    #[test]
    fn disk_bound_by_hand() {
        // 0 bytes of GPU and host for weights: every text unit streams from disk.
        let profile = laptop().with_overrides(Overrides {
            gpu_bytes: Some(0),
            host_bytes: Some(2 * GIB),
            disk_bytes: None,
        });
        let m = ModelSource::resolve("qwen3-vl-8b").unwrap();
        let req = PlanRequest {
            context_tokens: 0,
            ..Default::default()
        };
        let p = plan(&m, &profile, &req).unwrap();
        assert!(p.fits);
        let disk = p.bound_terms.iter().find(|t| t.name == "disk").unwrap();
        let on_disk: u64 = p
            .placement
            .units
            .iter()
            .filter(|u| u.tier == Tier::Disk)
            .map(|u| u.bytes_per_token)
            .sum();
        assert_eq!(disk.bytes_per_token, on_disk);
        assert!(
            p.decode_tokens_per_s_bound <= profile.disk.read.bytes_per_s / on_disk as f64 + 1e-12
        );
    }

    #[test]
    fn moe_streams_only_routed_experts() {
        let m = ModelSource::resolve("qwen3-vl-30b-a3b").unwrap();
        let p = plan(&m, &laptop(), &PlanRequest::default()).unwrap();
        let experts = p
            .placement
            .units
            .iter()
            .find(|u| u.name == "layer 47 experts")
            .unwrap();
        // 128 experts of 9 MiB; a token reads 8 of them.
        assert_eq!(experts.bytes, 128 * (9 << 20));
        assert_eq!(experts.bytes_per_token, 8 * (9 << 20));
    }

    #[test]
    fn bad_requests_and_limits() {
        let m = ModelSource::resolve("qwen3-vl-2b").unwrap();
        let bad = PlanRequest {
            batch: 0,
            ..Default::default()
        };
        assert!(matches!(
            plan(&m, &laptop(), &bad),
            Err(Error::BadRequest(_))
        ));
        let img = PlanRequest {
            images: vec![(0, 0)],
            ..Default::default()
        };
        assert!(matches!(
            plan(&m, &laptop(), &img),
            Err(Error::BadRequest(_))
        ));
        let long = PlanRequest {
            context_tokens: 1_000_000,
            ..Default::default()
        };
        let p = plan(&m, &laptop(), &long).unwrap();
        assert!(!p.fits);
        assert!(p.reason.unwrap().contains("max_position_embeddings"));
        assert!(matches!(
            ModelSource::resolve("qwen3-vl-7b"),
            Err(Error::UnknownModel(_))
        ));
        assert!(matches!(
            ModelSource::resolve("./no/such/dir"),
            Err(Error::Missing { .. })
        ));
    }
}
