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
use std::time::Instant;
use vlmem::{TensorKind, Tier};
use vlmem_core::bytes::format_bytes;
use vlmem_core::profile::{HardwareProfile, Overrides};
use vlmem_runner::engine::KV_BLOCK_TOKENS;
use vlmem_runner::{
    Activations, Engine, EngineError, FinishReason, GenerationConfig, Prompt, Request,
    RequestImage, RunnerError, SamplingParams,
};

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
    /// The hardware and the budgets.
    #[command(flatten)]
    pub(crate) budget: BudgetArgs,
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
pub(crate) struct SamplingArgs {
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
pub(crate) fn sampling_params(
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

impl From<EngineError> for CliError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::BadRequest(_) | EngineError::Profile(_) => CliError::bad_input(e),
            EngineError::Io { ref source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
                CliError::bad_input(e)
            }
            EngineError::Checkpoint(c) => c.into(),
            EngineError::Model(r) => r.into(),
            EngineError::OutOfMemory { .. } => CliError::failure(format!(
                "{e}; give more --host-mem, fewer --max-new-tokens, or --disk-path on a disk with room"
            )),
            _ => CliError::failure(e),
        }
    }
}

/// The hardware profile and the tiers' budgets, shared by `vlmem run` and `vlmem chat`.
#[derive(Debug, clap::Args)]
pub(crate) struct BudgetArgs {
    /// A built-in profile, `detect`, or a .toml file: sizes the tiers.
    #[arg(long, default_value = "detect")]
    pub(crate) profile: String,
    /// Usable GPU memory (the simulated device without a GPU), e.g. 0 or 512MiB.
    #[arg(long)]
    pub(crate) gpu_mem: Option<String>,
    /// Usable host memory; 0 streams every weight from the checkpoint on disk.
    #[arg(long)]
    pub(crate) host_mem: Option<String>,
    /// Where swap files go (default: a private temp folder, removed at exit).
    #[arg(long)]
    pub(crate) disk_path: Option<PathBuf>,
    /// Most disk space for swap files (default: the profile's free disk). The swap file is
    /// 1 GiB, grown to hold the KV cache of the longest request when it needs more.
    #[arg(long)]
    pub(crate) disk_mem: Option<String>,
}

impl BudgetArgs {
    /// An engine builder for `model` on this profile, with these budgets and swap folder.
    pub(crate) fn builder(
        &self,
        model: &std::path::Path,
    ) -> Result<vlmem_runner::EngineBuilder, CliError> {
        let overrides = Overrides::parse(
            self.gpu_mem.as_deref(),
            self.host_mem.as_deref(),
            self.disk_mem.as_deref(),
        )?;
        let profile = HardwareProfile::resolve(&self.profile)?.with_overrides(overrides);
        let mut builder = Engine::builder(model).profile(profile);
        if let Some(dir) = &self.disk_path {
            builder = builder.disk_path(dir);
        }
        Ok(builder)
    }
}

pub fn run(a: RunArgs) -> Result<(), CliError> {
    let started = Instant::now();
    let prompt = match (&a.prompt_ids, &a.prompt) {
        (Some(text), _) => Prompt::Ids(parse_ids(text)?),
        (None, Some(text)) => Prompt::Text(text.clone()),
        (None, None) => {
            return Err(CliError::bad_input(
                "give --prompt TEXT or --prompt-ids IDS",
            ));
        }
    };
    let mut request = Request::new(prompt).max_new_tokens(a.max_new_tokens);
    request.images = a.images.iter().cloned().map(RequestImage::Path).collect();
    // A progress bar for the prompt's forward pass (a large image or a long prompt takes
    // minutes on a laptop's CPU), on stderr when it is a terminal; cleared at the first token.
    let bar = prefill_bar();
    let builder = a
        .budget
        .builder(&a.model)?
        .prefetch_layers(a.prefetch_layers)
        .on_prefill_progress({
            let bar = bar.clone();
            move |p| show_prefill(&bar, p)
        });
    // The tiers sized for this request's context; the request comes back tokenized, its
    // images preprocessed.
    let (engine, mut request) = builder.build_for(&request)?;
    request.sampling = Some(sampling_params(&a.sampling, engine.generation_config())?);
    let open_s = started.elapsed().as_secs_f64();
    let images: Vec<vlmem_runner::ImageInput> = request
        .images
        .iter()
        .filter_map(|i| match i {
            RequestImage::Preprocessed(x) => Some(x.clone()),
            _ => None,
        })
        .collect();
    // The decode speed the placement plan allows on this profile (its bandwidths, these
    // budgets): what the report sets the measured speed against.
    let prompt_len = match &request.prompt {
        Prompt::Ids(ids) => ids.len(),
        _ => 0,
    };
    let plan_bound = plan_bound(&a, engine.profile(), &images, prompt_len);

    let mut streamed = Vec::new();
    let mut printed = 0usize;
    let reply = engine.generate(&request, &mut |id| {
        if streamed.is_empty() {
            bar.finish_and_clear();
        }
        streamed.push(id);
        if !a.json
            && let Ok(Some(text)) = engine.decode(&streamed)
            && text.len() > printed
            && text.is_char_boundary(printed)
        {
            print!("{}", &text[printed..]);
            let _ = std::io::stdout().flush();
            printed = text.len();
        }
    })?;
    bar.finish_and_clear();
    let ids = &reply.prompt_ids;
    if reply.text.is_none() && !a.json {
        println!(
            "(no tokenizer.json in the folder: the reply as ids) {:?}",
            reply.ids
        );
    }
    if let Some(path) = &a.dump {
        dump(&engine, &request, &reply.generated_logits, path)?;
    }
    let (manager, weights) = (engine.manager(), engine.weights());
    let stats = manager.stats();
    let host = Tier::Host.index();
    let tokens = reply.ids.len().max(1) as f64;
    let rs = &reply.stats;
    let weight_bytes = engine.checkpoint().total_bytes();
    let device_w = stats.resident.get(Tier::Device, TensorKind::Weight);
    let host_w = stats.resident.get(Tier::Host, TensorKind::Weight);
    // Weights with no faster copy are read in place from the checkpoint (the disk tier).
    let disk_only_w = weight_bytes.saturating_sub(device_w + host_w);
    let gpu = engine.gpu_report();
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
        let p = &reply.sampling;
        let v = json!({
            "prompt_ids": ids,
            "generated_ids": reply.ids,
            "text": reply.text,
            "finish_reason": reply.finish_reason.as_str(),
            "stop_ids": reply.stop_ids,
            "sampling": {
                "mode": if p.is_greedy() { "greedy" } else { "sample" },
                "temperature": f32_json(p.temperature),
                "top_k": p.top_k,
                "top_p": f32_json(p.top_p),
                "min_p": f32_json(p.min_p),
                "repetition_penalty": f32_json(p.repetition_penalty),
                "presence_penalty": f32_json(p.presence_penalty),
                "frequency_penalty": f32_json(p.frequency_penalty),
                "seed": reply.seed,
                "from_generation_config": engine.generation_config().do_sample,
            },
            "tokens_per_s": reply.decode_tokens_per_s(),
            "plan_bound_tokens_per_s": plan_bound,
            "time_to_first_token_s": reply.timings.time_to_first_token.as_secs_f64(),
            "open_s": open_s,
            "memory": {
                "host_weight_bytes": host_w,
                "device_weight_bytes": device_w,
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
                "bytes_streamed_per_decode_token": rs.streamed_bytes_per_decode_token,
                "staged_bytes": weights.staged_bytes(),
                "prefetch_layers": weights.prefetch_layers(),
                "streaming": streaming,
                "prefetch_hints": weights.prefetch_hints(),
                "peak_rss_bytes": vlmem_core::profile::process_peak_rss_bytes(),
            },
            "gpu": gpu.as_ref().map(|r| {
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
            "kernel_read_gb_per_s": rs.kernel_read_gb_per_s,
            "kernel_share_of_decode": rs.kernel_share_of_decode,
            "kv_cache": match &rs.kv_pool {
                Some(k) => json!({
                    "paged": true,
                    "block_tokens": KV_BLOCK_TOKENS,
                    "blocks": k.blocks,
                    "resident_blocks": k.resident_blocks,
                    "swap_outs": k.swap_outs,
                    "swap_ins": k.swap_ins,
                }),
                None => json!({ "paged": false }),
            },
            "activations": match &rs.activations {
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
            "vision_cache": engine.vision_cache().map(|c| {
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
        reply.ids.len(),
        open_s,
        reply.timings.time_to_first_token.as_secs_f64(),
        reply.decode_tokens_per_s()
    );
    let p = &reply.sampling;
    let choice = match reply.seed {
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
        match reply.finish_reason {
            FinishReason::Stop => "stop id",
            FinishReason::Length => "--max-new-tokens reached",
        }
    );
    if let Some(b) = plan_bound.filter(|&b| b > 0.0) {
        println!(
            "decode against the plan's bound: {:.2} of {:.2} tokens/s ({:.0}%; the bound uses profile {}'s bandwidths, see vlmem plan)",
            reply.decode_tokens_per_s(),
            b,
            reply.decode_tokens_per_s() / b * 100.0,
            engine.profile().name
        );
    }
    println!(
        "memory: weights resident in RAM {}, on the device {}; {} into RAM per generated token (first loads included); RAM hit ratio {:.3}",
        format_bytes(host_w),
        format_bytes(device_w),
        format_bytes((stats.counters.bytes_in[host] as f64 / tokens) as u64),
        stats.counters.hit_ratio(Tier::Host)
    );
    println!(
        "weights by tier: device {}, host {}, read in place from disk {} (of {}); streamed per decode token {}; prefetch {} layer(s) ahead, {} hint(s); decode kernel {} reading {:.1} GB/s, {:.0}% of decode time",
        format_bytes(device_w),
        format_bytes(host_w),
        format_bytes(disk_only_w),
        format_bytes(weight_bytes),
        format_bytes(rs.streamed_bytes_per_decode_token as u64),
        weights.prefetch_layers(),
        weights.prefetch_hints(),
        vlmem_runner::kernels::isa(),
        rs.kernel_read_gb_per_s,
        rs.kernel_share_of_decode * 100.0,
    );
    if let Some(r) = &gpu {
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
    match &rs.kv_pool {
        Some(k) => {
            println!(
                "KV cache: paged in the manager, {} blocks of {} tokens ({} on the host), {} whole-layer swap-outs, {} swap-ins",
                k.blocks, KV_BLOCK_TOKENS, k.resident_blocks, k.swap_outs, k.swap_ins
            );
        }
        None => println!("KV cache: in process (the host has no KV budget for one block)"),
    }
    match &rs.activations {
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
    if let Some(c) = engine.vision_cache() {
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

/// The prompt's logits and the generated logits, as safetensors.
fn dump(
    engine: &Engine,
    request: &Request,
    generated_logits: &[Vec<f32>],
    path: &PathBuf,
) -> Result<(), CliError> {
    let logits = engine
        .prompt_logits(request)?
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
