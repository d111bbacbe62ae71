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
use crate::math::{ImageCost, WeightBytes, image_cost, kv_bytes_per_token};
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
    /// How weights are held in the tiers; `None` keeps the stored type.
    pub dtype: Option<Dtype>,
}

impl Default for PlanRequest {
    fn default() -> Self {
        PlanRequest {
            context_tokens: 4096,
            batch: 1,
            images: Vec::new(),
            dtype: None,
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
    /// Stored element type (bf16 for catalog entries).
    pub stored_dtype: Dtype,
    /// Whether the checkpoint already lies on disk (a folder) or would have to be fetched
    /// (a catalog name).
    pub on_disk: bool,
}

impl ModelSource {
    /// Resolves `--model`: a catalog name or a checkpoint folder.
    pub fn resolve(arg: &str) -> Result<Self> {
        if let Some(config) = catalog::config(arg) {
            let weights = WeightBytes::of_config(&config, Dtype::BF16);
            return Ok(ModelSource {
                name: arg.to_string(),
                config,
                weights,
                stored_dtype: Dtype::BF16,
                on_disk: false,
            });
        }
        let path = Path::new(arg);
        if path.exists() {
            let ckpt = Checkpoint::open(path)?;
            let weights = WeightBytes::of_checkpoint(&ckpt);
            let stored_dtype = ckpt
                .tensors
                .iter()
                .max_by_key(|t| t.bytes)
                .map(|t| t.dtype)
                .unwrap_or(Dtype::BF16);
            return Ok(ModelSource {
                name: arg.to_string(),
                config: ckpt.config,
                weights,
                stored_dtype,
                on_disk: true,
            });
        }
        if arg.contains('/') || arg.starts_with('.') {
            return Err(Error::Missing {
                path: path.to_path_buf(),
                message: "no such checkpoint folder".into(),
            });
        }
        Err(Error::UnknownModel(arg.to_string()))
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
    /// The element type counted.
    pub dtype: Dtype,
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
    /// Weight bytes left on disk (read in place from the checkpoint).
    pub disk_bytes: u64,
    /// The KV cache's tier and size.
    pub kv_tier: Tier,
    /// KV bytes for the whole context and batch.
    pub kv_bytes: u64,
    /// GPU bytes kept for activations (text prefill, the vision tower's working set).
    pub gpu_activation_bytes: u64,
    /// Host bytes kept for double-buffered staging of units streamed from disk.
    pub host_staging_bytes: u64,
    /// Decoder layers fully resident (and computed) on the GPU.
    pub gpu_layers: u64,
    /// Every unit.
    pub units: Vec<PlacedUnit>,
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
    /// KV bytes per token of context.
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
    let dtype = req.dtype.unwrap_or(model.stored_dtype);
    // Bytes as held in the tiers: stored bytes scaled to the requested element size.
    let scale = |b: u64| b / model.stored_dtype.size_bytes() * dtype.size_bytes();
    let w = &model.weights;
    let act_bytes = 4; // activations are f32 (SM 6.1 has no bf16 arithmetic)
    let images = req
        .images
        .iter()
        .map(|&(iw, ih)| image_cost(cfg, iw, ih, act_bytes))
        .collect::<Result<Vec<_>>>()?;
    let kv_per_token = kv_bytes_per_token(cfg, dtype.size_bytes());
    let kv_bytes = kv_per_token * req.context_tokens * req.batch;

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

    // Streamed text units in decode order: (name, bytes held, bytes read per token).
    let moe = cfg.text.moe.as_ref();
    let mut text_units: Vec<(String, u64, u64)> = Vec::new();
    for (l, (&layer, &experts)) in w.layer_bytes.iter().zip(&w.layer_expert_bytes).enumerate() {
        let dense = scale(layer - experts);
        text_units.push((format!("layer {l}"), dense, dense));
        if experts > 0 {
            let e = scale(experts);
            let per_token = match moe {
                Some(m) => e / m.num_experts * m.num_experts_per_tok,
                None => e,
            };
            text_units.push((format!("layer {l} experts"), e, per_token));
        }
    }
    let final_norm = scale(w.final_norm_bytes);
    let (head_name, head_bytes) = if w.lm_head_bytes > 0 {
        ("lm_head", scale(w.lm_head_bytes) + final_norm)
    } else {
        (
            "lm_head (tied embedding)",
            scale(w.embedding_bytes) + final_norm,
        )
    };
    text_units.push((head_name.into(), head_bytes, head_bytes));
    // Units that decode does not stream: the embedding (unless tied, where lm_head holds
    // it) and the vision tower.
    let mut cold_units: Vec<(String, u64)> = Vec::new();
    if w.lm_head_bytes > 0 {
        cold_units.push(("embedding".into(), scale(w.embedding_bytes)));
    }
    cold_units.push(("vision tower".into(), scale(w.vision_bytes)));
    if w.other_bytes > 0 {
        cold_units.push(("other tensors".into(), scale(w.other_bytes)));
        notes.push(format!(
            "{} bytes of tensors are not Qwen3-VL weights; they are counted but never read",
            w.other_bytes
        ));
    }

    // Activations on the device: text prefill of the context chunk and the vision tower.
    let h = cfg.text.hidden_size;
    let text_act = 8 * h * act_bytes * req.batch * 512.min(req.context_tokens.max(1));
    let vision_act = images
        .iter()
        .map(|i| i.vision_working_set_bytes + i.embeds_bytes + i.deepstack_bytes)
        .max()
        .unwrap_or(0);
    let activation_bytes = text_act.max(vision_act);

    let gpu_usable = profile.gpu_usable_bytes();
    let host_usable = profile.host.usable_bytes();
    let has_gpu = profile.gpu.is_some() && activation_bytes < gpu_usable;
    if profile.gpu.is_some() && !has_gpu {
        notes.push(format!(
            "the GPU's {gpu_usable} usable bytes cannot hold the activations ({activation_bytes}): the CPU computes everything"
        ));
    }
    let mut gpu_left = if has_gpu {
        gpu_usable - activation_bytes
    } else {
        0
    };
    let mut host_left = host_usable;

    // KV cache: on the GPU if it takes at most half of what is left there, else host.
    let kv_tier = if has_gpu && kv_bytes <= gpu_left / 2 {
        gpu_left -= kv_bytes;
        Tier::Device
    } else if kv_bytes <= host_left {
        host_left -= kv_bytes;
        Tier::Host
    } else {
        reason.get_or_insert(format!(
            "the KV cache for {} tokens x {} sequences needs {}, more than the GPU and host budgets",
            req.context_tokens,
            req.batch,
            format_bytes(kv_bytes)
        ));
        Tier::Disk
    };
    // What does not fit GPU and host streams from disk through a double buffer in host RAM.
    let gpu_fit: u64 = {
        let mut left = gpu_left;
        text_units
            .iter()
            .take_while(|u| {
                let fits = u.1 <= left;
                left = left.saturating_sub(u.1);
                fits
            })
            .map(|u| u.1)
            .sum()
    };
    let total_text: u64 = text_units.iter().map(|u| u.1).sum();
    // lm_head is a row-split matrix-vector product: it streams in chunks of a layer's size.
    // An experts unit streams only the experts a token is routed to.
    let largest_unit = text_units
        .iter()
        .filter(|u| u.0.starts_with("layer "))
        .map(|u| u.2)
        .max()
        .unwrap_or(0);
    let host_staging_bytes = if total_text - gpu_fit > host_left {
        let staging = 2 * largest_unit;
        if staging > host_left {
            reason.get_or_insert(format!(
                "host RAM ({} usable) cannot hold the double buffer ({}) that streams units from disk",
                format_bytes(host_usable),
                format_bytes(staging)
            ));
            0
        } else {
            host_left -= staging;
            staging
        }
    } else {
        0
    };

    let mut units: Vec<PlacedUnit> = Vec::new();
    let mut gpu_layers: u64 = 0;
    let mut prefix_on_gpu = true;
    for (name, bytes, per_token) in &text_units {
        let tier = if prefix_on_gpu && has_gpu && *bytes <= gpu_left {
            gpu_left -= bytes;
            Tier::Device
        } else if *bytes <= host_left {
            host_left -= bytes;
            Tier::Host
        } else {
            Tier::Disk
        };
        // Only a prefix of layers lives on the GPU (one GPU -> CPU hand-over per token);
        // lm_head may still go to the GPU if it fits there.
        if name.starts_with("layer ") {
            if tier != Tier::Device {
                if prefix_on_gpu && name.ends_with("experts") {
                    gpu_layers = gpu_layers.saturating_sub(1);
                }
                prefix_on_gpu = false;
            } else if !name.ends_with("experts") {
                gpu_layers += 1;
            }
        }
        units.push(PlacedUnit {
            name: name.clone(),
            bytes: *bytes,
            bytes_per_token: *per_token,
            tier,
        });
    }
    // lm_head comes last in text_units: let it onto the GPU even after the layer prefix.
    if let Some(head) = units.last_mut()
        && head.tier != Tier::Device
        && has_gpu
        && head.bytes <= gpu_left
    {
        if head.tier == Tier::Host {
            host_left += head.bytes;
        }
        head.tier = Tier::Device;
    }
    for (name, bytes) in cold_units {
        let tier = if bytes <= host_left {
            host_left -= bytes;
            Tier::Host
        } else {
            Tier::Disk
        };
        let per_token = if name == "embedding" {
            h * dtype.size_bytes()
        } else {
            0
        };
        units.push(PlacedUnit {
            name,
            bytes,
            bytes_per_token: per_token,
            tier,
        });
    }
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

    // A checkpoint that is not on disk yet must fit there.
    let total_held = scale(w.total_bytes);
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
            per_token_from(Tier::Device) + kv_on(Tier::Device),
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
            text_bytes: scale(w.text_bytes),
            vision_bytes: scale(w.vision_bytes),
            per_layer_bytes: scale(w.per_layer_bytes()),
            layers: cfg.text.num_hidden_layers,
            embedding_bytes: scale(w.embedding_bytes),
            lm_head_bytes: scale(w.lm_head_bytes),
            expert_bytes_per_layer: scale(w.layer_expert_bytes.iter().copied().max().unwrap_or(0)),
            total_params: w.total_params,
            dtype,
        },
        kv_bytes_per_token: kv_per_token,
        images,
        placement: Placement {
            gpu_bytes,
            host_bytes,
            disk_bytes,
            kv_tier,
            kv_bytes,
            gpu_activation_bytes: if has_gpu { activation_bytes } else { 0 },
            host_staging_bytes,
            gpu_layers,
            units,
        },
        fits,
        reason,
        decode_tokens_per_s_bound: bound,
        bound_terms: terms,
        notes,
    })
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
            let gpu_total = pl.gpu_bytes
                + pl.gpu_activation_bytes
                + if pl.kv_tier == Tier::Device {
                    pl.kv_bytes
                } else {
                    0
                };
            assert!(
                gpu_total <= laptop().gpu_usable_bytes(),
                "{name}: GPU overcommitted"
            );
            let host_total = pl.host_bytes
                + pl.host_staging_bytes
                + if pl.kv_tier == Tier::Host {
                    pl.kv_bytes
                } else {
                    0
                };
            assert!(
                host_total <= laptop().host.usable_bytes(),
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
        let req = PlanRequest {
            context_tokens: 1000,
            ..Default::default()
        };
        let p = plan(&m, &profile, &req).unwrap();
        assert_eq!(p.placement.disk_bytes, 0);
        assert_eq!(p.placement.gpu_bytes, 0);
        // 28 layers x 100,672,000 B + tied embedding 622,329,856 B + final norm 4,096 B,
        // + KV 114,688 B x 1000 tokens.
        let per_token = 28 * 100_672_000u64 + 622_329_856 + 4_096 + 114_688 * 1000;
        let expect = profile.host.bandwidth.bytes_per_s / per_token as f64;
        assert!(
            (p.decode_tokens_per_s_bound - expect).abs() < 1e-9,
            "{} vs {expect}",
            p.decode_tokens_per_s_bound
        );
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
