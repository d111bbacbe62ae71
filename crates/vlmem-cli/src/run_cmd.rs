//! `vlmem run`: a Qwen3-VL checkpoint through the memory manager, greedy or sampled, on the
//! CPU (and,
//! built with `cuda` on a machine with a GPU, the first decoder layers on the GPU).

use crate::CliError;
use crate::run_report;
use candle_core::{Device, Tensor};
use clap::Args;
use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::Instant;
use vlmem_core::profile::{HardwareProfile, Overrides};
use vlmem_qwen3vl::format::WeightFormat;
use vlmem_qwen3vl::kv_dtype::KvDtype;
use vlmem_runner::{
    Engine, EngineError, GenerationConfig, Prompt, Request, RequestImage, RunnerError,
    SamplingParams,
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

impl From<RunnerError> for CliError {
    fn from(e: RunnerError) -> Self {
        match e {
            RunnerError::Candle(_)
            | RunnerError::Weight { .. }
            | RunnerError::WeightBuffer { .. }
            | RunnerError::VisionCache(_)
            | RunnerError::MalformedEmbedding
            | RunnerError::Gpu(_)
            | RunnerError::Arena { .. }
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

/// The hardware profile, the tiers' budgets and the formats held in them, shared by
/// `vlmem run` and `vlmem chat`.
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
    /// Hold the weights quantized: q8_0 or q4_k (q4_k: the decoder layers' projections; the
    /// embedding, router and vision tower in q8_0). The quantized copy is written once to
    /// the cache folder ($VLMEM_CACHE, else ~/.cache/vlmem) and reused; a folder written by
    /// `vlmem quantize` loads as it is. Default: the weights as stored.
    #[arg(long, value_name = "FORMAT")]
    pub(crate) quant: Option<String>,
    /// How the KV cache holds keys and values: f32, bf16 (the default) or q8_0.
    #[arg(long, value_name = "DTYPE")]
    pub(crate) kv_dtype: Option<String>,
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
        if let Some(name) = &self.quant {
            let format: WeightFormat = name
                .parse()
                .map_err(|e| CliError::bad_input(format!("--quant: {e}")))?;
            builder = builder
                .quant(format)
                .quant_progress(std::io::stderr().is_terminal());
        }
        if let Some(name) = &self.kv_dtype {
            let dtype: KvDtype = name
                .parse()
                .map_err(|e| CliError::bad_input(format!("--kv-dtype: {e}")))?;
            builder = builder.kv_dtype(dtype);
        }
        Ok(builder)
    }
}

/// The request the flags ask for: the prompt (text or ids), its images, the token limit.
fn request_of(a: &RunArgs) -> Result<Request, CliError> {
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
    Ok(request)
}

pub fn run(a: RunArgs) -> Result<(), CliError> {
    let started = Instant::now();
    let request = request_of(&a)?;
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
    let image_count = request.images.len();

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
    if reply.text.is_none() && !a.json {
        println!(
            "(no tokenizer.json in the folder: the reply as ids) {:?}",
            reply.ids
        );
    }
    if let Some(path) = &a.dump {
        dump(&engine, &request, &reply.generated_logits, path)?;
    }
    if a.json {
        let report = run_report::json(&engine, &reply, open_s);
        println!(
            "{}",
            serde_json::to_string_pretty(&report).map_err(CliError::failure)?
        );
        return Ok(());
    }
    run_report::print_text(&engine, &reply, image_count, open_s);
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
