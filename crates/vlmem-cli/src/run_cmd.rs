//! `vlmem run`: a Qwen3-VL checkpoint through the memory manager, greedy or sampled, on the
//! CPU (and,
//! built with `cuda` on a machine with a GPU, the first decoder layers on the GPU).

use crate::CliError;
use candle_core::{Device, Tensor};
use clap::Args;
use serde_json::json;
use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;
use vlmem::vision_cache::VisionCache;
use vlmem::{KvPool, KvPoolConfig, ManagerConfig, MemoryManager, TensorKind, Tier};
use vlmem_core::bytes::format_bytes;
use vlmem_core::profile::{HardwareProfile, Overrides};
use vlmem_qwen3vl::checkpoint::Checkpoint;
use vlmem_runner::preprocess::{load_image, preprocess};
use vlmem_runner::{
    Activations, GenerateOptions, GenerationConfig, KvStore, LogitsFor, ManagedWeights, PagedKv,
    PrefillOptions, PreprocessConfig, Runner, RunnerError, SamplingParams,
};

/// Tokens per KV block (vLLM's default).
const KV_BLOCK_TOKENS: u32 = 16;

#[derive(Args)]
pub struct RunArgs {
    /// A Hugging Face checkpoint folder (config.json, safetensors, tokenizer.json).
    #[arg(long)]
    model: PathBuf,
    /// The user's message, wrapped in Qwen's chat template with the images.
    #[arg(long, conflicts_with = "prompt_ids")]
    prompt: Option<String>,
    /// The full prompt as ids, image pads already expanded (comma-separated).
    #[arg(long)]
    prompt_ids: Option<String>,
    /// An image (PNG or JPEG); repeatable, in prompt order.
    #[arg(long = "image")]
    images: Vec<PathBuf>,
    /// Tokens to generate at most.
    #[arg(long, default_value_t = 16)]
    max_new_tokens: usize,
    /// A built-in profile, `detect`, or a .toml file: sizes the tiers.
    #[arg(long, default_value = "detect")]
    profile: String,
    /// Usable GPU memory (the simulated device without a GPU), e.g. 0 or 512MiB.
    #[arg(long)]
    gpu_mem: Option<String>,
    /// Usable host memory; 0 streams every weight from the checkpoint on disk.
    #[arg(long)]
    host_mem: Option<String>,
    /// Where swap files go (default: a private temp folder, removed at exit).
    #[arg(long)]
    disk_path: Option<PathBuf>,
    /// Most disk space for swap files (default: the profile's free disk). The swap file is
    /// 1 GiB, grown to hold this request's whole KV cache when it needs more.
    #[arg(long)]
    disk_mem: Option<String>,
    /// Write `logits` [1, prompt_len, vocab] and `generated_logits` [new_tokens, vocab] (f32)
    /// to this safetensors file.
    #[arg(long)]
    dump: Option<PathBuf>,
    /// Print one JSON object instead of text and a report.
    #[arg(long)]
    json: bool,
    /// Layers whose weights are prefetched while one computes (0 turns prefetch off).
    #[arg(long, default_value_t = vlmem_runner::managed::DEFAULT_PREFETCH_LAYERS)]
    prefetch_layers: usize,
    /// How each token is chosen.
    #[command(flatten)]
    sampling: Box<SamplingArgs>,
}

/// `vlmem run`'s token-choice flags, as text so that a bad value is one line of bad input.
#[derive(Args)]
struct SamplingArgs {
    /// Sample with this temperature; 0 is greedy (the arg-max). Without it the run is greedy,
    /// unless the checkpoint's generation_config.json sets do_sample: then its temperature,
    /// top_k, top_p (Qwen3-VL-Instruct: 0.7, 20, 0.8) are the defaults these flags override.
    #[arg(long, value_name = "F", allow_hyphen_values = true)]
    temperature: Option<String>,
    /// Sample from the N most likely tokens only (0: all; 1: greedy).
    #[arg(long, value_name = "N", allow_hyphen_values = true)]
    top_k: Option<String>,
    /// Sample from the smallest set of most likely tokens holding probability F, in (0, 1].
    #[arg(long, value_name = "F", allow_hyphen_values = true)]
    top_p: Option<String>,
    /// Drop tokens less likely than F times the most likely one, F in [0, 1].
    #[arg(long, value_name = "F", allow_hyphen_values = true)]
    min_p: Option<String>,
    /// Seed of the sampler (same seed and settings: same reply); default: a fresh one, shown
    /// in the report.
    #[arg(long, value_name = "N", allow_hyphen_values = true)]
    seed: Option<String>,
    /// Divide positive logits (multiply negative ones) of every token already in the prompt
    /// or the reply by F > 0 (1: none); applies to greedy runs too.
    #[arg(long, value_name = "F", allow_hyphen_values = true)]
    repetition_penalty: Option<String>,
    /// Subtract F in [-2, 2] from the logit of every token the reply already holds.
    #[arg(long, value_name = "F", allow_hyphen_values = true)]
    presence_penalty: Option<String>,
    /// Subtract F in [-2, 2] times its count from the logit of every token the reply holds.
    #[arg(long, value_name = "F", allow_hyphen_values = true)]
    frequency_penalty: Option<String>,
}

/// A flag's value parsed as `T`, or the one-line error naming the flag.
fn parse_flag<T: std::str::FromStr>(
    flag: &str,
    value: &Option<String>,
    what: &str,
) -> Result<Option<T>, CliError> {
    value
        .as_deref()
        .map(|v| {
            v.trim()
                .parse::<T>()
                .map_err(|_| CliError::bad_input(format!("{flag} {v}: not {what}")))
        })
        .transpose()
}

/// The sampling settings of this run: the checkpoint's generation_config.json (greedy unless
/// it sets do_sample), overridden by the flags given; out-of-range values are bad input.
fn sampling_params(
    a: &SamplingArgs,
    config: &GenerationConfig,
) -> Result<SamplingParams, CliError> {
    let mut p = config.sampling();
    let number = "a number";
    if let Some(t) = parse_flag("--temperature", &a.temperature, number)? {
        p.temperature = t;
    }
    if let Some(k) = parse_flag("--top-k", &a.top_k, "a count (0 or more)")? {
        p.top_k = k;
    }
    if let Some(x) = parse_flag("--top-p", &a.top_p, number)? {
        p.top_p = x;
    }
    if let Some(x) = parse_flag("--min-p", &a.min_p, number)? {
        p.min_p = x;
    }
    if let Some(x) = parse_flag("--repetition-penalty", &a.repetition_penalty, number)? {
        p.repetition_penalty = x;
    }
    if let Some(x) = parse_flag("--presence-penalty", &a.presence_penalty, number)? {
        p.presence_penalty = x;
    }
    if let Some(x) = parse_flag("--frequency-penalty", &a.frequency_penalty, number)? {
        p.frequency_penalty = x;
    }
    p.seed = parse_flag("--seed", &a.seed, "a seed (0 to 2^64 - 1)")?;
    p.validate()?;
    let shaping = [
        ("--top-k", &a.top_k),
        ("--top-p", &a.top_p),
        ("--min-p", &a.min_p),
        ("--seed", &a.seed),
    ];
    let unused: Vec<&str> = shaping
        .iter()
        .filter(|(_, v)| v.is_some())
        .map(|(f, _)| *f)
        .collect();
    if p.temperature == 0.0 && !unused.is_empty() {
        eprintln!(
            "note: this run is greedy (temperature 0) and ignores {}: give --temperature to sample",
            unused.join(", ")
        );
    }
    Ok(p)
}

/// An f32 setting as the shortest decimal that reads back as it (0.7, not 0.699999988).
fn f32_json(x: f32) -> f64 {
    x.to_string().parse().unwrap_or(f64::from(x))
}

impl From<RunnerError> for CliError {
    fn from(e: RunnerError) -> Self {
        match e {
            RunnerError::Candle(_)
            | RunnerError::Weights(_)
            | RunnerError::Gpu(_)
            | RunnerError::Arena(_)
            | RunnerError::KvCache(_) => CliError::failure(e),
            RunnerError::Io { ref source, .. } if source.kind() != std::io::ErrorKind::NotFound => {
                CliError::failure(e)
            }
            _ => CliError::bad_input(e),
        }
    }
}

fn parse_ids(text: &str) -> Result<Vec<u32>, CliError> {
    text.split(',')
        .map(|s| {
            s.trim().parse::<u32>().map_err(|_| {
                CliError::bad_input(format!("--prompt-ids: '{}' is not a token id", s.trim()))
            })
        })
        .collect()
}

pub fn run(a: RunArgs) -> Result<(), CliError> {
    let started = Instant::now();
    let overrides = Overrides::parse(
        a.gpu_mem.as_deref(),
        a.host_mem.as_deref(),
        a.disk_mem.as_deref(),
    )?;
    let profile = HardwareProfile::resolve(&a.profile)?.with_overrides(overrides);
    let checkpoint = Checkpoint::open(&a.model)?;
    let generation_config = GenerationConfig::load(&checkpoint.dir)?;
    let sampling = sampling_params(&a.sampling, &generation_config)?;
    // The request before any weight: images, prompt ids (so the tiers can be sized for it).
    let tokenizer = Runner::open_tokenizer(&checkpoint)?;
    let preprocess_cfg = PreprocessConfig::for_vision(&checkpoint.config.vision);
    let images = a
        .images
        .iter()
        .map(|p| preprocess(&load_image(p)?, &preprocess_cfg))
        .collect::<Result<Vec<_>, _>>()?;
    let ids = match (&a.prompt_ids, &a.prompt, &tokenizer) {
        (Some(text), _, _) => parse_ids(text)?,
        (None, Some(text), Some(t)) => Runner::chat_ids_with(t, &preprocess_cfg, text, &images)?,
        (None, Some(_), None) => return Err(Runner::no_tokenizer(&checkpoint.dir).into()),
        (None, None, _) => {
            return Err(CliError::bad_input(
                "give --prompt TEXT or --prompt-ids IDS",
            ));
        }
    };
    // The KV cache's blocks: 16 tokens of every layer's f32 keys and values per layer
    // sequence, from a slab region of the host arena.
    let text_cfg = &checkpoint.config.text;
    let (kv_layers, kv_heads, head_dim) = (
        text_cfg.num_hidden_layers as usize,
        text_cfg.num_key_value_heads as usize,
        text_cfg.head_dim as usize,
    );
    let kv_bytes_per_token = (2 * kv_heads * head_dim * 4) as u64;
    let kv_block_bytes = KV_BLOCK_TOKENS as u64 * kv_bytes_per_token;
    // Saturating: an absurd --max-new-tokens is refused by size_tiers, not an overflow.
    let context_tokens = ids.len().saturating_add(a.max_new_tokens) as u64;
    let kv_need_bytes = (kv_layers as u64)
        .saturating_mul(context_tokens.div_ceil(KV_BLOCK_TOKENS as u64))
        .saturating_mul(kv_block_bytes);
    let mut config = size_tiers(&profile, context_tokens, kv_need_bytes, kv_block_bytes)?;
    config.disk.dir = a.disk_path.clone();
    // With the `cuda` feature, a GPU and a device budget: the device tier is the GPU, and
    // the first decoder layers that fit it compute there.
    let use_gpu = gpu_present() && config.device_bytes > 0;
    let gpu_plan = if use_gpu {
        config.gpu_ordinal = Some(0);
        vlmem_runner::gpu::GpuLayerPlan::new(
            &checkpoint,
            config.budgets.get(Tier::Device, TensorKind::Weight),
        )
    } else {
        vlmem_runner::gpu::GpuLayerPlan::default()
    };
    let manager = MemoryManager::new(config).map_err(CliError::failure)?;
    let weights = Arc::new(ManagedWeights::register_except(
        manager.clone(),
        &checkpoint,
        Tier::Host,
        &Device::Cpu,
        &gpu_plan.matrices,
    )?);
    weights.set_prefetch_layers(a.prefetch_layers);
    let gpu = gpu_layers(use_gpu, &weights, &checkpoint, &gpu_plan)?;
    let source: Arc<dyn vlmem_runner::WeightSource> = match &gpu {
        Some((g, _)) => g.clone(),
        None => weights.clone(),
    };
    let runner = Runner::with_tokenizer(&checkpoint, source, &Device::Cpu, tokenizer)?;
    // Image embeddings by content, in the manager, under the host's vision budget.
    let budgets = manager.stats().budgets;
    let vision_budget = budgets.get(Tier::Host, TensorKind::VisionEmbedding);
    let vision_cache = (vision_budget > 0).then(|| {
        Arc::new(VisionCache::new(
            manager.clone(),
            &format!("{}", a.model.display()),
            vision_budget,
        ))
    });
    if let Some(c) = &vision_cache {
        runner.model().use_vision_cache(c.clone());
    }
    // Decode steps' activations in a step arena on the host, under its activation budget.
    runner.model().use_step_arena(manager.clone(), Tier::Host);
    // A progress bar for the prompt's forward pass (a large image or a long prompt takes
    // minutes on a laptop's CPU), on stderr when it is a terminal; cleared at the first token.
    let bar = prefill_bar();
    {
        let bar = bar.clone();
        runner
            .model()
            .on_prefill_progress(Arc::new(move |p| show_prefill(&bar, p)));
    }
    // The KV cache in the manager's paged pool when the host's KV budget holds a block; the
    // plain in-process cache otherwise (`--host-mem 0`).
    let kv_pool = KvPool::new(
        manager.clone(),
        KvPoolConfig {
            block_tokens: KV_BLOCK_TOKENS,
            bytes_per_token: kv_bytes_per_token,
            compute_tier: Tier::Host,
        },
    )
    .ok()
    .map(Arc::new);
    let mut kv: Box<dyn KvStore> = match &kv_pool {
        Some(pool) => Box::new(PagedKv::new(pool.clone(), kv_layers, kv_heads, head_dim)?),
        None => Box::new(runner.model().new_kv_cache()),
    };
    let open_s = started.elapsed().as_secs_f64();
    // The decode speed the placement plan allows on this profile (its bandwidths, these
    // budgets): what the report sets the measured speed against.
    let plan_bound = plan_bound(&a, &profile, &images, ids.len());

    let host = Tier::Host.index();
    // Bytes brought into RAM or read past it (staged), counted from the first token on.
    let streamed_now = || manager.stats().counters.bytes_in[host] + weights.staged_bytes();
    let mut at_first_token = None;
    let mut streamed = Vec::new();
    let mut printed = 0usize;
    // The tokenizer's end-of-turn ids and the checkpoint's eos ids.
    let mut stop_ids = runner.stop_ids();
    for id in &generation_config.eos_token_ids {
        if !stop_ids.contains(id) {
            stop_ids.push(*id);
        }
    }
    let generate = GenerateOptions {
        max_new_tokens: a.max_new_tokens,
        stop_ids,
        sampling,
    };
    let gen_ = runner
        .model()
        .generate_in(&ids, &images, &generate, kv.as_mut(), &mut |id| {
            if at_first_token.is_none() {
                at_first_token = Some((streamed_now(), weights.kernel_read()));
                bar.finish_and_clear();
            }
            streamed.push(id);
            if !a.json
                && let Ok(Some(text)) = runner.decode(&streamed)
                && text.len() > printed
                && text.is_char_boundary(printed)
            {
                print!("{}", &text[printed..]);
                let _ = std::io::stdout().flush();
                printed = text.len();
            }
        })?;
    bar.finish_and_clear();
    let text = runner.decode(&gen_.generated_ids)?;
    if text.is_none() && !a.json {
        println!(
            "(no tokenizer.json in the folder: the reply as ids) {:?}",
            gen_.generated_ids
        );
    }
    if let Some(path) = &a.dump {
        dump(&runner, &ids, &images, &gen_.generated_logits, path)?;
    }
    let stats = manager.stats();
    let tokens = gen_.generated_ids.len().max(1) as f64;
    let decode_steps = gen_.generated_ids.len().saturating_sub(1);
    let streamed_per_decode_token = match at_first_token {
        Some((b0, _)) if decode_steps > 0 => {
            (stats.counters.bytes_in[host] + weights.staged_bytes()).saturating_sub(b0) as f64
                / decode_steps as f64
        }
        _ => 0.0,
    };
    // The decode kernels' own read speed over the decode steps, and their share of its time.
    let (kernel_gb_s, kernel_share) = match at_first_token {
        Some((_, (kb0, ks0))) if decode_steps > 0 => {
            let (kb, ks) = weights.kernel_read();
            let (bytes, secs) = (kb.saturating_sub(kb0) as f64, ks - ks0);
            let decode_s = gen_.decode_time.as_secs_f64();
            (
                if secs > 0.0 { bytes / secs / 1e9 } else { 0.0 },
                if decode_s > 0.0 { secs / decode_s } else { 0.0 },
            )
        }
        _ => (0.0, 0.0),
    };
    let weight_bytes = checkpoint.total_bytes();
    let device_w = stats.resident.get(Tier::Device, TensorKind::Weight);
    let host_w = stats.resident.get(Tier::Host, TensorKind::Weight);
    // Weights with no faster copy are read in place from the checkpoint (the disk tier).
    let disk_only_w = weight_bytes.saturating_sub(device_w + host_w);
    if a.json {
        let st = weights.staging();
        let streaming = json!({
            "staging_area_bytes": st.capacity_bytes,
            "kept_bytes": st.kept_bytes,
            "streamed_bytes": st.streamed_bytes,
            "streamed_tensors": st.streamed_tensors,
            "streamed_pieces": st.streamed_pieces,
            "buffer_bytes": st.buffer_bytes,
            "read_ahead": st.stats.filled,
            "read_ahead_bytes": st.stats.filled_bytes,
            "taken": st.stats.hits,
            "waited": st.stats.waits,
            "read_on_demand": st.stats.misses,
            "dropped_unused": st.stats.dropped,
        });
        let p = &generate.sampling;
        let v = json!({
            "prompt_ids": ids,
            "generated_ids": gen_.generated_ids,
            "text": text,
            "finish_reason": gen_.finish_reason.as_str(),
            "stop_ids": generate.stop_ids,
            "sampling": {
                "mode": if p.is_greedy() { "greedy" } else { "sample" },
                "temperature": f32_json(p.temperature),
                "top_k": p.top_k,
                "top_p": f32_json(p.top_p),
                "min_p": f32_json(p.min_p),
                "repetition_penalty": f32_json(p.repetition_penalty),
                "presence_penalty": f32_json(p.presence_penalty),
                "frequency_penalty": f32_json(p.frequency_penalty),
                "seed": gen_.seed,
                "from_generation_config": generation_config.do_sample,
            },
            "tokens_per_s": gen_.decode_tokens_per_s(),
            "plan_bound_tokens_per_s": plan_bound,
            "time_to_first_token_s": gen_.time_to_first_token.as_secs_f64(),
            "open_s": open_s,
            "memory": {
                "host_weight_bytes": stats.resident.get(Tier::Host, TensorKind::Weight),
                "device_weight_bytes": stats.resident.get(Tier::Device, TensorKind::Weight),
                "bytes_into_host_per_token": stats.counters.bytes_in[host] as f64 / tokens,
                "host_hit_ratio": stats.counters.hit_ratio(Tier::Host),
                "tiers": manager.describe_tiers(),
                "tier_bytes": {
                    "device": stats.resident.tier_total(Tier::Device),
                    "host": stats.resident.tier_total(Tier::Host),
                    "disk": stats.resident.tier_total(Tier::Disk),
                },
                "weight_bytes": {
                    "total": weight_bytes,
                    "device": device_w,
                    "host": host_w,
                    "disk_only": disk_only_w,
                },
                "bytes_streamed_per_decode_token": streamed_per_decode_token,
                "staged_bytes": weights.staged_bytes(),
                "prefetch_layers": weights.prefetch_layers(),
                "streaming": streaming,
                "prefetch_hints": weights.prefetch_hints(),
                "peak_rss_bytes": vlmem_core::profile::process_peak_rss_bytes(),
            },
            "gpu": gpu.as_ref().map(|(_, report)| {
                let r = report();
                json!({
                    "device": r.device,
                    "layers": r.layers,
                    "weight_bytes": r.weight_bytes,
                    "kernel_read_bytes": r.kernel_bytes,
                    "kernel_s": r.kernel_s,
                    "kernel_read_gb_per_s": if r.kernel_s > 0.0 {
                        r.kernel_bytes as f64 / r.kernel_s / 1e9
                    } else {
                        0.0
                    },
                    "cpu_fallbacks": r.fallbacks,
                })
            }),
            "kernel": vlmem_runner::kernels::isa(),
            "kernel_read_gb_per_s": kernel_gb_s,
            "kernel_share_of_decode": kernel_share,
            "kv_cache": match &kv_pool {
                Some(pool) => {
                    let k = pool.stats();
                    json!({
                        "paged": true,
                        "block_tokens": KV_BLOCK_TOKENS,
                        "blocks": k.blocks,
                        "resident_blocks": k.resident_blocks,
                        "swap_outs": k.swap_outs,
                        "swap_ins": k.swap_ins,
                    })
                }
                None => json!({ "paged": false }),
            },
            "activations": match &gen_.activations {
                Activations::Arena {
                    tier,
                    capacity_bytes,
                    peak_bytes,
                    steps,
                } => json!({
                    "in_arena": true,
                    "tier": tier.to_string(),
                    "arena_bytes": capacity_bytes,
                    "peak_bytes": peak_bytes,
                    "steps": steps,
                }),
                Activations::InProcess { reason } => json!({
                    "in_arena": false,
                    "reason": reason,
                }),
            },
            "vision_cache": vision_cache.as_ref().map(|c| {
                let v = c.stats();
                json!({ "hits": v.hits, "misses": v.misses, "resident_bytes": v.resident_bytes })
            }),
        });
        println!(
            "{}",
            serde_json::to_string_pretty(&v).map_err(CliError::failure)?
        );
        return Ok(());
    }
    println!();
    println!("---");
    println!(
        "{} prompt ids, {} image(s), {} generated; open {:.2} s, time to first token {:.2} s, decode {:.2} tokens/s",
        ids.len(),
        images.len(),
        gen_.generated_ids.len(),
        open_s,
        gen_.time_to_first_token.as_secs_f64(),
        gen_.decode_tokens_per_s()
    );
    let p = &generate.sampling;
    let choice = match gen_.seed {
        Some(seed) => format!(
            "sampled (temperature {}, top_k {}, top_p {}, min_p {}, seed {seed})",
            p.temperature, p.top_k, p.top_p, p.min_p
        ),
        None => "greedy".to_string(),
    };
    let penalties = if p.has_penalties() {
        format!(
            ", penalties: repetition {}, presence {}, frequency {}",
            p.repetition_penalty, p.presence_penalty, p.frequency_penalty
        )
    } else {
        String::new()
    };
    println!(
        "tokens: {choice}{penalties}; finished: {}",
        match gen_.finish_reason {
            vlmem_runner::FinishReason::Stop => "stop id",
            vlmem_runner::FinishReason::Length => "--max-new-tokens reached",
        }
    );
    if let Some(b) = plan_bound.filter(|&b| b > 0.0) {
        println!(
            "decode against the plan's bound: {:.2} of {:.2} tokens/s ({:.0}%; the bound uses profile {}'s bandwidths, see vlmem plan)",
            gen_.decode_tokens_per_s(),
            b,
            gen_.decode_tokens_per_s() / b * 100.0,
            profile.name
        );
    }
    println!(
        "memory: weights resident in RAM {}, on the device {}; {} into RAM per generated token (first loads included); RAM hit ratio {:.3}",
        format_bytes(stats.resident.get(Tier::Host, TensorKind::Weight)),
        format_bytes(stats.resident.get(Tier::Device, TensorKind::Weight)),
        format_bytes((stats.counters.bytes_in[host] as f64 / tokens) as u64),
        stats.counters.hit_ratio(Tier::Host)
    );
    println!(
        "weights by tier: device {}, host {}, read in place from disk {} (of {}); streamed per decode token {}; prefetch {} layer(s) ahead, {} hint(s); decode kernel {} reading {:.1} GB/s, {:.0}% of decode time",
        format_bytes(device_w),
        format_bytes(host_w),
        format_bytes(disk_only_w),
        format_bytes(weight_bytes),
        format_bytes(streamed_per_decode_token as u64),
        weights.prefetch_layers(),
        weights.prefetch_hints(),
        vlmem_runner::kernels::isa(),
        kernel_gb_s,
        kernel_share * 100.0,
    );
    if let Some((_, report)) = &gpu {
        let r = report();
        println!(
            "GPU: {}, decoder layers 0..{} ({}) compute there, kernels read {} in {:.3} s; {} CPU fallback(s)",
            r.device,
            r.layers,
            format_bytes(r.weight_bytes),
            format_bytes(r.kernel_bytes),
            r.kernel_s,
            r.fallbacks
        );
    }
    match &kv_pool {
        Some(pool) => {
            let k = pool.stats();
            println!(
                "KV cache: paged in the manager, {} blocks of {} tokens ({} on the host), {} whole-layer swap-outs, {} swap-ins",
                k.blocks, KV_BLOCK_TOKENS, k.resident_blocks, k.swap_outs, k.swap_ins
            );
        }
        None => println!("KV cache: in process (the host has no KV budget for one block)"),
    }
    match &gen_.activations {
        Activations::Arena {
            tier,
            capacity_bytes,
            peak_bytes,
            steps,
        } => println!(
            "activations: in a step arena of the manager on the {tier} tier, {} (peak {}), {steps} decode step(s)",
            format_bytes(*capacity_bytes),
            format_bytes(*peak_bytes)
        ),
        Activations::InProcess { reason } => println!("activations: in process ({reason})"),
    }
    if let Some(c) = &vision_cache {
        let v = c.stats();
        println!(
            "vision cache: {} hit(s), {} miss(es), {} held",
            v.hits,
            v.misses,
            format_bytes(v.resident_bytes)
        );
    }
    if let Some(rss) = vlmem_core::profile::process_peak_rss_bytes() {
        println!(
            "process: peak resident memory {} (the tiers' pages in use, candle's buffers for the prompt and the vision tower, and the rest)",
            format_bytes(rss)
        );
    }
    for t in manager.describe_tiers() {
        println!("tier: {t}");
    }
    Ok(())
}

/// The manager's tiers for this request. Swap holds what the host cannot: the KV blocks of
/// layers swapped out (the weights are read in place from the checkpoint). It is 1 GiB (at
/// most the profile's free disk), grown so that the disk's KV budget holds the request's whole
/// KV cache (`kv_need_bytes` for `context_tokens`); a request whose KV cache fits neither is refused here, before
/// any work, rather than failing mid-prompt.
fn size_tiers(
    profile: &HardwareProfile,
    context_tokens: u64,
    kv_need_bytes: u64,
    kv_block_bytes: u64,
) -> Result<ManagerConfig, CliError> {
    let mut config = ManagerConfig::from_profile(profile);
    // Tier capacities are whole MiBs.
    let mib = vlmem_core::bytes::MIB;
    let disk_free = profile.disk.free_bytes / mib * mib;
    config.disk_bytes = config.disk_bytes.min(1 << 30);
    config.budgets =
        vlmem::Budgets::default_split([config.device_bytes, config.host_bytes, config.disk_bytes]);
    let (disk, kv) = (Tier::Disk.index(), TensorKind::KvCache.index());
    let disk_kv = config.budgets.bytes[disk][kv];
    if kv_need_bytes > disk_kv {
        // Whole MiBs, within the free disk.
        let extra = (kv_need_bytes - disk_kv)
            .div_ceil(mib)
            .saturating_mul(mib)
            .min(disk_free.saturating_sub(config.disk_bytes));
        config.disk_bytes += extra;
        config.budgets.bytes[disk][kv] += extra;
    }
    let host_kv = config.budgets.get(Tier::Host, TensorKind::KvCache);
    let room = host_kv + config.budgets.bytes[disk][kv];
    // With no host KV budget for one block the cache stays in process, unbounded.
    if host_kv >= kv_block_bytes && kv_need_bytes > room {
        return Err(CliError::failure(format!(
            "the KV cache of this request needs {} ({} tokens of context): the host's KV budget holds {} and the disk's {} ({} free for swap); give more --host-mem, fewer --max-new-tokens, or --disk-path on a disk with room",
            format_bytes(kv_need_bytes),
            context_tokens,
            format_bytes(host_kv),
            format_bytes(config.budgets.bytes[disk][kv]),
            format_bytes(disk_free),
        )));
    }
    if kv_block_bytes.is_multiple_of(256) {
        config.kv_block_bytes = Some(kv_block_bytes);
    }
    Ok(config)
}

/// A bar on stderr when it is a terminal, hidden otherwise (tests, pipes, logs).
fn prefill_bar() -> indicatif::ProgressBar {
    use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let b = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
    if let Ok(style) =
        ProgressStyle::with_template("{msg:>28} [{bar:30}] {pos}/{len} {elapsed_precise}")
    {
        b.set_style(style.progress_chars("=> "));
    }
    b
}

/// Moves the bar to where the prompt's forward pass is.
fn show_prefill(bar: &indicatif::ProgressBar, p: vlmem_runner::PrefillProgress) {
    use vlmem_runner::PrefillProgress;
    let (msg, done, total) = match p {
        PrefillProgress::Vision {
            image,
            images,
            done,
            total,
        } => (
            format!("image {}/{images}: vision blocks", image + 1),
            done,
            total,
        ),
        PrefillProgress::Prompt {
            tokens,
            done,
            total,
        } => (format!("prompt ({tokens} tokens): layers"), done, total),
    };
    if bar.message() != msg {
        // A new stage (an image, or the decoder): start the bar over.
        bar.reset();
        bar.set_message(msg);
        bar.set_length(total as u64);
    }
    bar.set_position(done as u64);
}

/// The plan's decode bound (tokens/s) for this checkpoint, profile, prompt and images; `None`
/// when the plan cannot be made.
fn plan_bound(
    a: &RunArgs,
    profile: &HardwareProfile,
    images: &[vlmem_runner::ImageInput],
    prompt_len: usize,
) -> Option<f64> {
    use vlmem_qwen3vl::plan::{ModelSource, PlanRequest, plan};
    let model = ModelSource::resolve(a.model.to_str()?).ok()?;
    let req = PlanRequest {
        context_tokens: prompt_len.saturating_add(a.max_new_tokens).max(1) as u64,
        images: images
            .iter()
            .map(|i| (i.grid_thw[2] as u64 * 16, i.grid_thw[1] as u64 * 16))
            .collect(),
        ..PlanRequest::default()
    };
    plan(&model, profile, &req)
        .ok()
        .map(|p| p.decode_tokens_per_s_bound)
}

/// Whether this build can compute on a GPU and one is present.
fn gpu_present() -> bool {
    #[cfg(feature = "cuda")]
    {
        vlmem_tier::cuda::probe().is_some()
    }
    #[cfg(not(feature = "cuda"))]
    {
        false
    }
}

/// The GPU source over `weights` and a way to read its report, when `use_gpu` (the
/// manager's device tier is the GPU; only with the `cuda` feature).
type GpuParts = (
    Arc<dyn vlmem_runner::WeightSource>,
    Box<dyn Fn() -> vlmem_runner::gpu::GpuReport>,
);

fn gpu_layers(
    use_gpu: bool,
    weights: &Arc<ManagedWeights>,
    checkpoint: &Checkpoint,
    plan: &vlmem_runner::gpu::GpuLayerPlan,
) -> Result<Option<GpuParts>, CliError> {
    #[cfg(feature = "cuda")]
    {
        if !use_gpu {
            return Ok(None);
        }
        let kernels = vlmem_runner::kernels::cuda::GpuKernels::new(0)?;
        let layers = Arc::new(vlmem_runner::gpu::GpuLayers::new(
            weights.clone(),
            checkpoint,
            plan,
            kernels,
        )?);
        let reporter = layers.clone();
        Ok(Some((layers, Box::new(move || reporter.report()))))
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (use_gpu, weights, checkpoint, plan);
        Ok(None)
    }
}

/// The prompt's logits and the generated logits, as safetensors.
fn dump(
    runner: &Runner,
    ids: &[u32],
    images: &[vlmem_runner::ImageInput],
    generated_logits: &[Vec<f32>],
    path: &PathBuf,
) -> Result<(), CliError> {
    let model = runner.model();
    let mut kv = model.new_kv_cache();
    let opts = PrefillOptions {
        logits: LogitsFor::All,
        ..PrefillOptions::default()
    };
    let pre = model.prefill(ids, images, &mut kv, opts)?;
    let logits = pre
        .logits
        .ok_or_else(|| CliError::failure("prefill returned no logits"))?
        .unsqueeze(0)
        .map_err(CliError::failure)?;
    let vocab = logits.dim(2).map_err(CliError::failure)?;
    let flat: Vec<f32> = generated_logits.iter().flatten().copied().collect();
    let generated = Tensor::from_vec(flat, (generated_logits.len(), vocab), &Device::Cpu)
        .map_err(CliError::failure)?;
    let mut tensors = HashMap::new();
    tensors.insert("logits".to_string(), logits);
    tensors.insert("generated_logits".to_string(), generated);
    candle_core::safetensors::save(&tensors, path)
        .map_err(|e| CliError::failure(format!("{}: {e}", path.display())))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vlmem_core::bytes::{GIB, MIB};

    /// The laptop with `host` bytes of RAM and `disk` free for swap.
    fn laptop(host: u64, disk: u64) -> HardwareProfile {
        let mut p = HardwareProfile::resolve("laptop-i5-10210u-mx250").unwrap();
        p.host.memory_bytes = host;
        p.host.reserved_bytes = 0;
        p.disk.free_bytes = disk;
        p
    }

    /// qwen3-vl-2b: 28 layers, blocks of 16 tokens x 8 KiB.
    const BLOCK: u64 = 16 * 8192;
    fn kv_need(tokens: u64) -> u64 {
        28 * tokens.div_ceil(16) * BLOCK
    }

    #[test]
    fn swap_is_one_gib_while_the_kv_cache_fits_it() {
        let c = size_tiers(&laptop(GIB, 200 * GIB), 500, kv_need(500), BLOCK).unwrap();
        assert_eq!(c.disk_bytes, GIB);
        assert_eq!(c.kv_block_bytes, Some(BLOCK));
    }

    #[test]
    fn swap_grows_to_hold_a_long_requests_whole_kv_cache() {
        // 3,005 tokens of context: 673 MB of KV, more than the 40% of 1 GiB the disk's KV
        // budget would hold (the run that failed mid-prompt before).
        let need = kv_need(3005);
        let c = size_tiers(&laptop(GIB, 200 * GIB), 3005, need, BLOCK).unwrap();
        let disk_kv = c.budgets.get(Tier::Disk, TensorKind::KvCache);
        assert!(disk_kv >= need, "{disk_kv} < {need}");
        assert!(disk_kv < need + MIB, "grown by whole MiBs only: {disk_kv}");
        assert_eq!(c.disk_bytes - GIB, disk_kv - (GIB as f64 * 0.40) as u64);
    }

    #[test]
    fn a_kv_cache_larger_than_host_and_disk_is_refused_before_any_work() {
        let need = kv_need(100_000);
        let err = size_tiers(&laptop(GIB, 2 * GIB), 100_000, need, BLOCK).unwrap_err();
        assert_eq!(err.code, 1, "{}", err.message);
        assert!(
            err.message.contains("100000 tokens of context"),
            "{}",
            err.message
        );
        // With no host KV budget for one block, the cache is in process and unbounded.
        assert!(size_tiers(&laptop(0, 2 * GIB), 100_000, need, BLOCK).is_ok());
    }
}
