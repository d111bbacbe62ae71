//! The engine: a Qwen3-VL checkpoint running through the memory manager, as one value a
//! program builds once and shares.
//!
//! [`Engine::builder`] takes a checkpoint folder, a hardware profile and budgets; `build`
//! sizes the manager's tiers, registers every weight in place (host-resident, streamed from
//! the checkpoint, or on the GPU with the `cuda` feature), and sets up the paged KV pool, the
//! vision cache and the decode steps' arena. [`Engine::generate`] then runs one
//! [`Request`] (a prompt as text, a conversation or ids; images; sampling) and returns its
//! [`Reply`]. [`Engine::conversation`] starts a multi-turn [`Conversation`] whose KV cache
//! stays between turns, so that a later turn prefills only its new tokens. Every failure is
//! an [`EngineError`] a caller can match.
//!
//! An engine is `Send + Sync` and is shared by `Arc`. Each request owns its state: its
//! sequences in the shared KV pool (a namespace of its own), its sampler and the sampler's
//! random generator. Requests run one at a time: the model's per-engine state (the weights'
//! read-ahead position, the step arena's share of the activation budget, the prefill progress
//! callback) assumes one forward pass at a time, so [`Engine::generate`] holds a lock for the
//! whole request, after its prompt is tokenized and its images preprocessed (which run
//! concurrently). Batching steps of several requests comes with the server.

use crate::chat::{Message, Part};
use crate::error::RunnerError;
use crate::kv::{KvStore, PagedKv};
use crate::managed::ManagedWeights;
use crate::model::{
    Activations, CachedPrefix, FinishReason, GenerateOptions, PrefillOptions, PrefillProgress,
    PrefillProgressFn,
};
use crate::preprocess::{ImageInput, PreprocessConfig, load_image, preprocess};
use crate::prompt::ChatTokenizer;
use crate::rope::MropePositions;
use crate::runner::Runner;
use crate::sample::{GenerationConfig, SamplingParams};
use crate::text::LogitsFor;
use crate::weights::WeightSource;
use candle_core::{Device, Tensor};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use thiserror::Error;
use vlmem::vision_cache::VisionCache;
use vlmem::{
    KvPool, KvPoolConfig, KvPoolStats, ManagerConfig, ManagerError, MemoryManager, TensorKind, Tier,
};
use vlmem_core::bytes::format_bytes;
use vlmem_core::profile::{HardwareProfile, Overrides};
use vlmem_core::sync::Mutex;
use vlmem_qwen3vl::checkpoint::Checkpoint;

/// Tokens per KV block (vLLM's default).
pub const KV_BLOCK_TOKENS: u32 = 16;

/// New tokens a [`Request`] asks for unless told otherwise.
pub const DEFAULT_MAX_NEW_TOKENS: usize = 16;

/// Everything that can go wrong building an engine or running a request.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum EngineError {
    /// The request's KV cache fits neither the host's KV budget nor the disk's: refused
    /// before any work.
    #[error(
        "the KV cache of this request needs {} ({context_tokens} tokens of context): the host's KV budget holds {} and the disk's {} ({} free for swap)",
        format_bytes(*need_bytes),
        format_bytes(*host_bytes),
        format_bytes(*disk_bytes),
        format_bytes(*disk_free_bytes)
    )]
    OutOfMemory {
        /// Bytes of KV the request needs (every layer's keys and values, whole blocks).
        need_bytes: u64,
        /// The prompt's tokens plus the new tokens asked for.
        context_tokens: u64,
        /// The host's KV budget.
        host_bytes: u64,
        /// The disk's KV budget (swap).
        disk_bytes: u64,
        /// Free disk space for swap, as the profile says.
        disk_free_bytes: u64,
    },
    /// A request that cannot run: an empty prompt, an id out of the vocabulary, images that
    /// do not match the prompt's image pads, an unreadable image, sampling values out of
    /// range, a text prompt for a checkpoint without a tokenizer.
    #[error("{0}")]
    BadRequest(String),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The checkpoint folder, its config or its safetensors headers are unusable.
    #[error(transparent)]
    Checkpoint(vlmem_qwen3vl::Error),
    /// The model failed: a weight missing or of the wrong shape, an unusable tokenizer, a
    /// weight the manager could not provide, a computation that failed.
    #[error(transparent)]
    Model(RunnerError),
    /// The memory manager refused (its configuration for these budgets, an allocation).
    #[error(transparent)]
    Manager(#[from] ManagerError),
    /// The hardware profile or a budget is unusable.
    #[error(transparent)]
    Profile(#[from] vlmem_core::profile::ProfileError),
}

impl From<vlmem_qwen3vl::Error> for EngineError {
    fn from(e: vlmem_qwen3vl::Error) -> Self {
        match e {
            vlmem_qwen3vl::Error::Io { path, source } => EngineError::Io { path, source },
            vlmem_qwen3vl::Error::BadRequest(m) => EngineError::BadRequest(m),
            other => EngineError::Checkpoint(other),
        }
    }
}

impl From<RunnerError> for EngineError {
    fn from(e: RunnerError) -> Self {
        match e {
            RunnerError::Checkpoint(c) => c.into(),
            RunnerError::Io { path, source } => EngineError::Io { path, source },
            RunnerError::TokenOutOfVocab { .. }
            | RunnerError::ImagePadMismatch(_)
            | RunnerError::Image { .. }
            | RunnerError::BadRequest(_) => EngineError::BadRequest(e.to_string()),
            other => EngineError::Model(other),
        }
    }
}

/// The engine's result type.
pub type EngineResult<T> = std::result::Result<T, EngineError>;

/// What the model is asked: a user's text, a whole conversation, or ids.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    /// One user turn: the request's images first, then this text, in the checkpoint's chat
    /// template with the opening of the assistant's reply.
    Text(String),
    /// A conversation rendered with the checkpoint's chat template (the opening of the
    /// assistant's reply added); its image parts take the request's images in order.
    Messages(Vec<Message>),
    /// The full prompt as ids, image pads already expanded.
    Ids(Vec<u32>),
}

/// One image of a request.
#[derive(Debug, Clone, PartialEq)]
pub enum RequestImage {
    /// A PNG or JPEG file.
    Path(PathBuf),
    /// Decoded pixels.
    Rgb(image::RgbImage),
    /// Already preprocessed for this checkpoint ([`Engine::prepare`]).
    Preprocessed(ImageInput),
}

impl From<PathBuf> for RequestImage {
    fn from(p: PathBuf) -> Self {
        RequestImage::Path(p)
    }
}

/// One generation request.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// The prompt.
    pub prompt: Prompt,
    /// Its images, in prompt order.
    pub images: Vec<RequestImage>,
    /// Tokens to generate at most.
    pub max_new_tokens: usize,
    /// How each token is chosen; `None`: the checkpoint's generation_config.json (greedy
    /// unless it sets `do_sample`).
    pub sampling: Option<SamplingParams>,
    /// Ids that end the reply besides the tokenizer's end-of-turn ids and the checkpoint's
    /// eos ids.
    pub stop_ids: Vec<u32>,
}

impl Request {
    /// A request for `prompt`, no images, [`DEFAULT_MAX_NEW_TOKENS`], the checkpoint's
    /// sampling.
    pub fn new(prompt: Prompt) -> Self {
        Request {
            prompt,
            images: Vec::new(),
            max_new_tokens: DEFAULT_MAX_NEW_TOKENS,
            sampling: None,
            stop_ids: Vec::new(),
        }
    }

    /// One user turn of `text`.
    pub fn text(text: impl Into<String>) -> Self {
        Self::new(Prompt::Text(text.into()))
    }

    /// A prompt given as ids.
    pub fn ids(ids: Vec<u32>) -> Self {
        Self::new(Prompt::Ids(ids))
    }

    /// Adds an image.
    pub fn image(mut self, image: impl Into<RequestImage>) -> Self {
        self.images.push(image.into());
        self
    }

    /// Sets the most tokens to generate.
    pub fn max_new_tokens(mut self, n: usize) -> Self {
        self.max_new_tokens = n;
        self
    }

    /// Sets how tokens are chosen.
    pub fn sampling(mut self, p: SamplingParams) -> Self {
        self.sampling = Some(p);
        self
    }

    /// The prompt's ids when it is given as ids.
    fn prompt_ids(&self) -> Option<&[u32]> {
        match &self.prompt {
            Prompt::Ids(ids) => Some(ids),
            _ => None,
        }
    }

    /// The preprocessed images when every image is.
    fn preprocessed_images(&self) -> Option<Vec<ImageInput>> {
        self.images
            .iter()
            .map(|i| match i {
                RequestImage::Preprocessed(x) => Some(x.clone()),
                _ => None,
            })
            .collect()
    }
}

/// How long a request took.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Timings {
    /// Tokenizing the prompt and preprocessing the images.
    pub prepare: Duration,
    /// Waiting for the requests ahead of this one.
    pub queued: Duration,
    /// From the start of the forward pass to the first generated id (vision tower, prefill,
    /// token choice).
    pub time_to_first_token: Duration,
    /// The remaining tokens.
    pub decode: Duration,
}

/// What a request cost, besides its time.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestStats {
    /// Where the decode steps kept their activations.
    pub activations: Activations,
    /// Bytes brought into RAM or read past it (staged) per decode step after the first token.
    pub streamed_bytes_per_decode_token: f64,
    /// The decode kernels' own read speed over the decode steps, GB/s.
    pub kernel_read_gb_per_s: f64,
    /// The decode kernels' share of the decode time.
    pub kernel_share_of_decode: f64,
    /// The KV pool as the request left it, before its sequences were freed (`None`: the KV
    /// cache was in process).
    pub kv_pool: Option<KvPoolStats>,
    /// Prompt tokens run through the model's prompt pass (the whole prompt, or in a
    /// [`Conversation`] only what its KV cache did not hold already).
    pub prefilled_tokens: usize,
    /// Prompt tokens whose keys and values came from a [`Conversation`]'s KV cache
    /// (earlier turns' prompts and replies): `prefilled_tokens + reused_tokens` is the prompt.
    pub reused_tokens: usize,
    /// Tokens a [`Conversation`]'s KV cache held that the conversation, rendered again, does
    /// not start with (an earlier reply that the chat template renders to other ids): dropped
    /// from the cache and prefilled again.
    pub dropped_tokens: usize,
    /// Why a [`Conversation`] prefilled its whole prompt again although its KV cache held a
    /// part of it (`None`: it reused what it could).
    pub kv_reuse_fallback: Option<String>,
}

/// The result of a request.
#[derive(Debug, Clone)]
pub struct Reply {
    /// The prompt as the model received it.
    pub prompt_ids: Vec<u32>,
    /// The generated ids, in order (a stop id, when one ended the reply, is the last).
    pub ids: Vec<u32>,
    /// The generated ids as text, special tokens dropped (`None` without a tokenizer).
    pub text: Option<String>,
    /// `[generated, vocab]`: the logits each generated id was chosen from.
    pub generated_logits: Vec<Vec<f32>>,
    /// Why generation ended.
    pub finish_reason: FinishReason,
    /// The token choice used.
    pub sampling: SamplingParams,
    /// The seed the sampled ids were drawn with (`None` when greedy).
    pub seed: Option<u64>,
    /// The ids that would have ended the reply.
    pub stop_ids: Vec<u32>,
    /// The caller's `on_token` stopped it ([`Conversation::send`]).
    pub cancelled: bool,
    /// Its times.
    pub timings: Timings,
    /// Its costs.
    pub stats: RequestStats,
}

impl Reply {
    /// Decode speed after the first token, tokens per second (0 when fewer than 2).
    pub fn decode_tokens_per_s(&self) -> f64 {
        let n = self.ids.len().saturating_sub(1);
        let secs = self.timings.decode.as_secs_f64();
        if n == 0 || secs == 0.0 {
            0.0
        } else {
            n as f64 / secs
        }
    }
}

/// Builds an [`Engine`]: see [`Engine::builder`].
pub struct EngineBuilder {
    dir: PathBuf,
    profile: Option<HardwareProfile>,
    overrides: Overrides,
    disk_path: Option<PathBuf>,
    prefetch_layers: usize,
    max_context_tokens: u64,
    progress: Option<Arc<PrefillProgressFn>>,
}

impl std::fmt::Debug for EngineBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineBuilder")
            .field("dir", &self.dir)
            .field("overrides", &self.overrides)
            .field("disk_path", &self.disk_path)
            .field("prefetch_layers", &self.prefetch_layers)
            .field("max_context_tokens", &self.max_context_tokens)
            .finish_non_exhaustive()
    }
}

impl EngineBuilder {
    /// The hardware the tiers are sized for (default: detected).
    pub fn profile(mut self, profile: HardwareProfile) -> Self {
        self.profile = Some(profile);
        self
    }

    /// Usable GPU memory (with no GPU in the profile, a non-zero value simulates a device).
    pub fn gpu_mem(mut self, bytes: u64) -> Self {
        self.overrides.gpu_bytes = Some(bytes);
        self
    }

    /// Usable host memory; 0 streams every weight from the checkpoint on disk.
    pub fn host_mem(mut self, bytes: u64) -> Self {
        self.overrides.host_bytes = Some(bytes);
        self
    }

    /// Most disk space for swap files (default: the profile's free disk).
    pub fn disk_mem(mut self, bytes: u64) -> Self {
        self.overrides.disk_bytes = Some(bytes);
        self
    }

    /// Where swap files go (default: a private temporary folder).
    pub fn disk_path(mut self, dir: impl Into<PathBuf>) -> Self {
        self.disk_path = Some(dir.into());
        self
    }

    /// Decoder layers whose weights are prefetched while one computes (0: none).
    pub fn prefetch_layers(mut self, layers: usize) -> Self {
        self.prefetch_layers = layers;
        self
    }

    /// The longest context (prompt and new tokens) a request will have: the swap file grows
    /// so that the disk's KV budget holds its whole KV cache (default 0: a 1 GiB swap file;
    /// a longer request is refused up front when its KV cache fits neither tier).
    pub fn max_context_tokens(mut self, tokens: u64) -> Self {
        self.max_context_tokens = tokens;
        self
    }

    /// `f` is told where each prompt's forward pass is (vision blocks, then decoder layers).
    pub fn on_prefill_progress(
        mut self,
        f: impl Fn(PrefillProgress) + Send + Sync + 'static,
    ) -> Self {
        self.progress = Some(Arc::new(f));
        self
    }

    /// Builds the engine.
    pub fn build(self) -> EngineResult<Engine> {
        Ok(self.build_inner(None)?.0)
    }

    /// Builds the engine with its tiers sized for `request`'s context (its prompt and new
    /// tokens, as [`EngineBuilder::max_context_tokens`]; refused up front when its KV cache
    /// fits neither tier), and returns the request prepared ([`Engine::prepare`]) so that it
    /// runs without tokenizing or preprocessing again.
    pub fn build_for(self, request: &Request) -> EngineResult<(Engine, Request)> {
        let (engine, prepared) = self.build_inner(Some(request))?;
        let prepared = prepared
            .ok_or_else(|| EngineError::BadRequest("the request was not prepared".into()))?;
        Ok((engine, prepared))
    }

    fn build_inner(mut self, request: Option<&Request>) -> EngineResult<(Engine, Option<Request>)> {
        let profile = match self.profile.take() {
            Some(p) => p,
            None => HardwareProfile::resolve("detect")?,
        }
        .with_overrides(self.overrides);
        let checkpoint = Checkpoint::open(&self.dir)?;
        let generation_config = GenerationConfig::load(&checkpoint.dir)?;
        let tokenizer = Runner::open_tokenizer(&checkpoint)?;
        let preprocess_cfg = PreprocessConfig::for_vision(&checkpoint.config.vision);
        let shape = KvShape::of(&checkpoint);
        let prepared = request
            .map(|r| prepare_with(tokenizer.as_ref(), &preprocess_cfg, &checkpoint.dir, r))
            .transpose()?;
        let context_tokens = match (&prepared, request) {
            (Some(p), Some(r)) => context_of(p, r.max_new_tokens),
            _ => self.max_context_tokens,
        };
        let (mut config, room) = size_tiers(
            &profile,
            context_tokens,
            shape.need_bytes(context_tokens),
            shape.block_bytes(),
        )?;
        config.disk.dir = self.disk_path.clone();
        // With the `cuda` feature, a GPU and a device budget: the device tier is the GPU, and
        // the first decoder layers that fit it compute there.
        let use_gpu = gpu_present() && config.device_bytes > 0;
        let gpu_plan = if use_gpu {
            config.gpu_ordinal = Some(0);
            crate::gpu::GpuLayerPlan::new(
                &checkpoint,
                config.budgets.get(Tier::Device, TensorKind::Weight),
            )
        } else {
            crate::gpu::GpuLayerPlan::default()
        };
        let manager = MemoryManager::new(config)?;
        let weights = Arc::new(ManagedWeights::register_except(
            manager.clone(),
            &checkpoint,
            Tier::Host,
            &Device::Cpu,
            &gpu_plan.matrices,
        )?);
        weights.set_prefetch_layers(self.prefetch_layers);
        let gpu = gpu_layers(use_gpu, &weights, &checkpoint, &gpu_plan)?;
        let source: Arc<dyn WeightSource> = match &gpu {
            Some((g, _)) => g.clone(),
            None => weights.clone(),
        };
        let runner = Runner::with_tokenizer(&checkpoint, source, &Device::Cpu, tokenizer)?;
        // Image embeddings by content, in the manager, under the host's vision budget.
        let vision_budget = manager
            .stats()
            .budgets
            .get(Tier::Host, TensorKind::VisionEmbedding);
        let vision_cache = (vision_budget > 0).then(|| {
            Arc::new(VisionCache::new(
                manager.clone(),
                &format!("{}", self.dir.display()),
                vision_budget,
            ))
        });
        if let Some(c) = &vision_cache {
            runner.model().use_vision_cache(c.clone());
        }
        // Decode steps' activations in a step arena on the host, under its activation budget.
        runner.model().use_step_arena(manager.clone(), Tier::Host);
        if let Some(f) = self.progress.take() {
            runner.model().on_prefill_progress(f);
        }
        // The KV cache in the manager's paged pool when the host's KV budget holds a block;
        // the plain in-process cache otherwise (no host memory).
        let kv_pool = KvPool::new(
            manager.clone(),
            KvPoolConfig {
                block_tokens: KV_BLOCK_TOKENS,
                bytes_per_token: shape.bytes_per_token(),
                compute_tier: Tier::Host,
            },
        )
        .ok()
        .map(Arc::new);
        let mut stop_ids = runner.stop_ids();
        push_new(&mut stop_ids, &generation_config.eos_token_ids);
        let engine = Engine {
            checkpoint,
            profile,
            generation_config,
            stop_ids,
            manager,
            weights,
            runner,
            kv_pool,
            vision_cache,
            gpu: gpu.map(|(_, report)| report),
            shape,
            room,
            turn: Mutex::new(()),
        };
        Ok((engine, prepared))
    }
}

/// The KV cache's layout: every layer's f32 keys and values per token.
#[derive(Debug, Clone, Copy)]
struct KvShape {
    layers: usize,
    kv_heads: usize,
    head_dim: usize,
}

impl KvShape {
    fn of(checkpoint: &Checkpoint) -> Self {
        let t = &checkpoint.config.text;
        KvShape {
            layers: t.num_hidden_layers as usize,
            kv_heads: t.num_key_value_heads as usize,
            head_dim: t.head_dim as usize,
        }
    }

    /// One layer's keys and values of one token.
    fn bytes_per_token(&self) -> u64 {
        (2 * self.kv_heads * self.head_dim * 4) as u64
    }

    fn block_bytes(&self) -> u64 {
        KV_BLOCK_TOKENS as u64 * self.bytes_per_token()
    }

    /// Every layer's whole blocks for `context_tokens` (saturating: an absurd context is
    /// refused, not an overflow).
    fn need_bytes(&self, context_tokens: u64) -> u64 {
        (self.layers as u64)
            .saturating_mul(context_tokens.div_ceil(KV_BLOCK_TOKENS as u64))
            .saturating_mul(self.block_bytes())
    }
}

/// The KV budgets the manager was sized with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct KvRoom {
    host_bytes: u64,
    disk_bytes: u64,
    disk_free_bytes: u64,
    block_bytes: u64,
}

impl KvRoom {
    /// Refuses `need_bytes` of KV for `context_tokens` when the pool cannot hold it. With no
    /// host KV budget for one block the cache stays in process, unbounded.
    fn check(&self, context_tokens: u64, need_bytes: u64) -> EngineResult<()> {
        if self.host_bytes >= self.block_bytes && need_bytes > self.host_bytes + self.disk_bytes {
            return Err(EngineError::OutOfMemory {
                need_bytes,
                context_tokens,
                host_bytes: self.host_bytes,
                disk_bytes: self.disk_bytes,
                disk_free_bytes: self.disk_free_bytes,
            });
        }
        Ok(())
    }
}

/// The manager's tiers for requests of up to `context_tokens` of context. Swap holds what the
/// host cannot: the KV blocks of layers swapped out (the weights are read in place from the
/// checkpoint). It is 1 GiB (at most the profile's free disk), grown so that the disk's KV
/// budget holds the whole KV cache (`kv_need_bytes`); a context whose KV cache fits neither
/// is refused here, before any work, rather than failing mid-prompt.
fn size_tiers(
    profile: &HardwareProfile,
    context_tokens: u64,
    kv_need_bytes: u64,
    kv_block_bytes: u64,
) -> EngineResult<(ManagerConfig, KvRoom)> {
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
    let room = KvRoom {
        host_bytes: config.budgets.get(Tier::Host, TensorKind::KvCache),
        disk_bytes: config.budgets.bytes[disk][kv],
        disk_free_bytes: disk_free,
        block_bytes: kv_block_bytes,
    };
    room.check(context_tokens, kv_need_bytes)?;
    if kv_block_bytes.is_multiple_of(256) {
        config.kv_block_bytes = Some(kv_block_bytes);
    }
    Ok((config, room))
}

/// The prompt's tokens and `max_new_tokens` (saturating).
fn context_of(prepared: &Request, max_new_tokens: usize) -> u64 {
    let prompt = prepared.prompt_ids().map_or(0, <[u32]>::len);
    prompt.saturating_add(max_new_tokens) as u64
}

/// Appends the ids of `more` that `ids` lacks.
fn push_new(ids: &mut Vec<u32>, more: &[u32]) {
    for id in more {
        if !ids.contains(id) {
            ids.push(*id);
        }
    }
}

/// One image of a request, preprocessed.
fn preprocess_image(image: &RequestImage, cfg: &PreprocessConfig) -> EngineResult<ImageInput> {
    Ok(match image {
        RequestImage::Path(p) => preprocess(&load_image(p)?, cfg)?,
        RequestImage::Rgb(img) => preprocess(img, cfg)?,
        RequestImage::Preprocessed(x) => x.clone(),
    })
}

/// `request` with its prompt as ids and its images preprocessed.
fn prepare_with(
    tokenizer: Option<&ChatTokenizer>,
    preprocess_cfg: &PreprocessConfig,
    dir: &Path,
    request: &Request,
) -> EngineResult<Request> {
    let images = request
        .images
        .iter()
        .map(|i| preprocess_image(i, preprocess_cfg))
        .collect::<EngineResult<Vec<_>>>()?;
    let counts: Vec<usize> = images
        .iter()
        .map(|i| i.num_tokens(preprocess_cfg.merge_size))
        .collect();
    // A text prompt for a checkpoint without a tokenizer is the caller's mistake.
    let no_tokenizer = || EngineError::BadRequest(Runner::no_tokenizer(dir).to_string());
    let ids = match &request.prompt {
        Prompt::Ids(ids) => ids.clone(),
        Prompt::Text(text) => tokenizer
            .ok_or_else(no_tokenizer)?
            .encode_chat(text, &counts)?,
        Prompt::Messages(messages) => tokenizer
            .ok_or_else(no_tokenizer)?
            .encode_messages(messages, &counts, true)?,
    };
    Ok(Request {
        prompt: Prompt::Ids(ids),
        images: images.into_iter().map(RequestImage::Preprocessed).collect(),
        ..request.clone()
    })
}

/// The GPU's report, when decoder layers compute there.
type GpuReporter = Box<dyn Fn() -> crate::gpu::GpuReport + Send + Sync>;

/// A Qwen3-VL checkpoint ready to serve requests through the memory manager: see the module
/// documentation.
pub struct Engine {
    checkpoint: Checkpoint,
    profile: HardwareProfile,
    generation_config: GenerationConfig,
    /// The tokenizer's end-of-turn ids and the checkpoint's eos ids.
    stop_ids: Vec<u32>,
    manager: MemoryManager,
    weights: Arc<ManagedWeights>,
    runner: Runner,
    kv_pool: Option<Arc<KvPool>>,
    vision_cache: Option<Arc<VisionCache>>,
    gpu: Option<GpuReporter>,
    shape: KvShape,
    room: KvRoom,
    /// Held for a whole request's forward passes: requests run one at a time.
    turn: Mutex<()>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("dir", &self.checkpoint.dir)
            .field("profile", &self.profile.name)
            .field("paged_kv", &self.kv_pool.is_some())
            .field("vision_cache", &self.vision_cache.is_some())
            .field("gpu", &self.gpu.is_some())
            .finish_non_exhaustive()
    }
}

impl Engine {
    /// A builder for the checkpoint folder `model_dir` (config.json, safetensors,
    /// tokenizer.json), the detected hardware, no budget overrides.
    pub fn builder(model_dir: impl Into<PathBuf>) -> EngineBuilder {
        EngineBuilder {
            dir: model_dir.into(),
            profile: None,
            overrides: Overrides::default(),
            disk_path: None,
            prefetch_layers: crate::managed::DEFAULT_PREFETCH_LAYERS,
            max_context_tokens: 0,
            progress: None,
        }
    }

    /// `request` with its prompt as ids (the chat template rendered and tokenized, image pads
    /// expanded) and its images preprocessed; its other settings as they are.
    pub fn prepare(&self, request: &Request) -> EngineResult<Request> {
        let dir = &self.checkpoint.dir;
        let prepared = prepare_with(
            self.runner.tokenizer(),
            self.runner.preprocess_config(),
            dir,
            request,
        )?;
        // The ids against the vocabulary and the images' pads.
        let ids = prepared.prompt_ids().unwrap_or_default();
        let images = prepared.preprocessed_images().unwrap_or_default();
        self.runner.model().positions(ids, &images)?;
        Ok(prepared)
    }

    /// Refuses up front a request that cannot run: a bad prompt or image, or a KV cache that
    /// fits neither the host's KV budget nor the disk's ([`EngineError::OutOfMemory`]).
    pub fn check_request(&self, request: &Request) -> EngineResult<()> {
        let prepared = self.prepare(request)?;
        self.check_prepared(&prepared)
    }

    fn check_prepared(&self, prepared: &Request) -> EngineResult<()> {
        let context = context_of(prepared, prepared.max_new_tokens);
        self.room.check(context, self.shape.need_bytes(context))?;
        if let Some(p) = &prepared.sampling {
            p.validate()?;
        }
        Ok(())
    }

    /// The token choice of `request`: its own, or the checkpoint's.
    pub fn sampling_for(&self, request: &Request) -> SamplingParams {
        request
            .sampling
            .clone()
            .unwrap_or_else(|| self.generation_config.sampling())
    }

    /// Runs `request`: prefill, then each token chosen and fed back until its
    /// `max_new_tokens` or a stop id. `on_token` sees each id as it is chosen. Requests run
    /// one at a time (see the module documentation); the prompt is prepared before waiting.
    pub fn generate(
        &self,
        request: &Request,
        on_token: &mut dyn FnMut(u32),
    ) -> EngineResult<Reply> {
        let started = Instant::now();
        let prepared = self.prepare(request)?;
        self.check_prepared(&prepared)?;
        let ids = prepared.prompt_ids().unwrap_or_default();
        let images = prepared.preprocessed_images().unwrap_or_default();
        let opts = self.options(
            prepared.max_new_tokens,
            prepared.sampling.as_ref(),
            &prepared.stop_ids,
        )?;
        let prepare_time = started.elapsed();

        let _turn = self.turn.lock();
        let queued = started.elapsed() - prepare_time;
        let mut kv = self.new_kv_store()?;
        let reply = self.run_locked(
            Pass {
                ids,
                cached: CachedPrefix::default(),
                images: &images,
                opts,
            },
            kv.as_mut(),
            &mut |id| {
                on_token(id);
                true
            },
            Timings {
                prepare: prepare_time,
                queued,
                ..Timings::default()
            },
        )?;
        drop(kv);
        Ok(reply)
    }

    /// The generation settings of a request: its sampling (or the checkpoint's), checked, and
    /// every stop id.
    fn options(
        &self,
        max_new_tokens: usize,
        sampling: Option<&SamplingParams>,
        stop_ids: &[u32],
    ) -> EngineResult<GenerateOptions> {
        let sampling = sampling
            .cloned()
            .unwrap_or_else(|| self.generation_config.sampling());
        sampling.validate()?;
        let mut all = self.stop_ids.clone();
        push_new(&mut all, stop_ids);
        Ok(GenerateOptions {
            max_new_tokens,
            stop_ids: all,
            sampling,
        })
    }

    /// An empty KV cache for one request or conversation: a sequence per layer in the paged
    /// pool (its own namespace, freed on drop), or in process when there is no pool.
    fn new_kv_store(&self) -> EngineResult<Box<dyn KvStore + Send>> {
        Ok(match &self.kv_pool {
            Some(pool) => Box::new(PagedKv::new(
                pool.clone(),
                self.shape.layers,
                self.shape.kv_heads,
                self.shape.head_dim,
            )?),
            None => Box::new(self.runner.model().new_kv_cache()),
        })
    }

    /// Runs `pass` on `kv` (the caller holds the request lock): the prompt's uncached tokens
    /// prefilled, then each token chosen and fed back; `timings` brings the time spent
    /// before the lock.
    fn run_locked(
        &self,
        pass: Pass<'_>,
        kv: &mut dyn KvStore,
        on_token: &mut dyn FnMut(u32) -> bool,
        timings: Timings,
    ) -> EngineResult<Reply> {
        let Pass {
            ids,
            cached,
            images,
            opts,
        } = pass;
        // Bytes brought into RAM or read past it (staged), and the kernels' reads, from the
        // first token on.
        let host = Tier::Host.index();
        let streamed_now =
            || self.manager.stats().counters.bytes_in[host] + self.weights.staged_bytes();
        let mut at_first_token = None;
        let generation =
            self.runner
                .model()
                .generate_after(ids, cached, images, &opts, kv, &mut |id| {
                    if at_first_token.is_none() {
                        at_first_token = Some((streamed_now(), self.weights.kernel_read()));
                    }
                    on_token(id)
                })?;
        let kv_pool = self.kv_pool.as_ref().map(|p| p.stats());
        let decode_steps = generation.generated_ids.len().saturating_sub(1);
        let (streamed, kernel_gb_s, kernel_share) = match at_first_token {
            Some((b0, (kb0, ks0))) if decode_steps > 0 => {
                let streamed = streamed_now().saturating_sub(b0) as f64 / decode_steps as f64;
                let (kb, ks) = self.weights.kernel_read();
                let (bytes, secs) = (kb.saturating_sub(kb0) as f64, ks - ks0);
                let decode_s = generation.decode_time.as_secs_f64();
                (
                    streamed,
                    if secs > 0.0 { bytes / secs / 1e9 } else { 0.0 },
                    if decode_s > 0.0 { secs / decode_s } else { 0.0 },
                )
            }
            _ => (0.0, 0.0, 0.0),
        };
        let text = self.decode(&generation.generated_ids)?;
        Ok(Reply {
            text,
            prompt_ids: generation.prompt_ids,
            ids: generation.generated_ids,
            generated_logits: generation.generated_logits,
            finish_reason: generation.finish_reason,
            sampling: opts.sampling,
            seed: generation.seed,
            stop_ids: opts.stop_ids,
            cancelled: generation.cancelled,
            timings: Timings {
                time_to_first_token: generation.time_to_first_token,
                decode: generation.decode_time,
                ..timings
            },
            stats: RequestStats {
                activations: generation.activations,
                streamed_bytes_per_decode_token: streamed,
                kernel_read_gb_per_s: kernel_gb_s,
                kernel_share_of_decode: kernel_share,
                kv_pool,
                prefilled_tokens: ids.len() - cached.tokens,
                reused_tokens: cached.tokens,
                dropped_tokens: 0,
                kv_reuse_fallback: None,
            },
        })
    }

    /// A conversation with this engine: see [`Conversation`].
    pub fn conversation(&self) -> EngineResult<Conversation<'_>> {
        Ok(Conversation {
            engine: self,
            messages: Vec::new(),
            images: Vec::new(),
            kv: self.new_kv_store()?,
            cached_ids: Vec::new(),
            cached_image_rows: Vec::new(),
            next_position: 0,
        })
    }

    /// The logits `[prompt tokens, vocab]` of every position of `request`'s prompt (one
    /// forward pass, its KV cache in process and dropped).
    pub fn prompt_logits(&self, request: &Request) -> EngineResult<Tensor> {
        let prepared = self.prepare(request)?;
        let ids = prepared.prompt_ids().unwrap_or_default();
        let images = prepared.preprocessed_images().unwrap_or_default();
        let _turn = self.turn.lock();
        let model = self.runner.model();
        let mut kv = model.new_kv_cache();
        let opts = PrefillOptions {
            logits: LogitsFor::All,
            ..PrefillOptions::default()
        };
        let pre = model.prefill(ids, &images, &mut kv, opts)?;
        pre.logits.ok_or_else(|| {
            EngineError::Model(RunnerError::BadRequest("prefill returned no logits".into()))
        })
    }

    /// Decodes ids to text (special tokens dropped); `None` without a tokenizer.
    pub fn decode(&self, ids: &[u32]) -> EngineResult<Option<String>> {
        Ok(self.runner.decode(ids)?)
    }

    /// The checkpoint.
    pub fn checkpoint(&self) -> &Checkpoint {
        &self.checkpoint
    }

    /// The checkpoint folder.
    pub fn model_dir(&self) -> &Path {
        &self.checkpoint.dir
    }

    /// The hardware profile the tiers were sized for (budget overrides applied).
    pub fn profile(&self) -> &HardwareProfile {
        &self.profile
    }

    /// The checkpoint's generation_config.json (defaults when it has none).
    pub fn generation_config(&self) -> &GenerationConfig {
        &self.generation_config
    }

    /// The tokenizer (`None` when the folder has no tokenizer.json: prompts come as ids).
    pub fn tokenizer(&self) -> Option<&ChatTokenizer> {
        self.runner.tokenizer()
    }

    /// The image preprocessor's settings.
    pub fn preprocess_config(&self) -> &PreprocessConfig {
        self.runner.preprocess_config()
    }

    /// The ids that end every reply: the tokenizer's end-of-turn ids and the checkpoint's
    /// eos ids.
    pub fn stop_ids(&self) -> &[u32] {
        &self.stop_ids
    }

    /// The memory manager.
    pub fn manager(&self) -> &MemoryManager {
        &self.manager
    }

    /// The weights in the manager (host-resident or streamed).
    pub fn weights(&self) -> &Arc<ManagedWeights> {
        &self.weights
    }

    /// The paged KV pool (`None` when the host's KV budget holds no block: the KV cache of
    /// each request is then in process).
    pub fn kv_pool(&self) -> Option<&Arc<KvPool>> {
        self.kv_pool.as_ref()
    }

    /// The vision cache (`None` when the host has no vision budget).
    pub fn vision_cache(&self) -> Option<&Arc<VisionCache>> {
        self.vision_cache.as_ref()
    }

    /// What runs on the GPU and its kernels' counters (`None`: nothing does).
    pub fn gpu_report(&self) -> Option<crate::gpu::GpuReport> {
        self.gpu.as_ref().map(|r| r())
    }

    /// The model, for lower-level use (its prefill and decode steps take no engine lock).
    pub fn runner(&self) -> &Runner {
        &self.runner
    }
}

/// One prompt's forward passes: the whole prompt, how much of it the KV cache holds, the
/// images of the rest, and how to generate.
struct Pass<'a> {
    ids: &'a [u32],
    cached: CachedPrefix,
    images: &'a [ImageInput],
    opts: GenerateOptions,
}

/// One user turn of a [`Conversation`]: its content (text and images in any order), its
/// images, and how to answer it.
#[derive(Debug, Clone, PartialEq)]
pub struct Turn {
    /// The user's message, text and image placeholders ([`Part::Image`]) in order.
    pub content: Vec<Part>,
    /// One image per [`Part::Image`] of `content`, in order.
    pub images: Vec<RequestImage>,
    /// Tokens to generate at most.
    pub max_new_tokens: usize,
    /// How each token is chosen; `None`: the checkpoint's generation_config.json.
    pub sampling: Option<SamplingParams>,
    /// Ids that end the reply besides the tokenizer's end-of-turn ids and the checkpoint's
    /// eos ids.
    pub stop_ids: Vec<u32>,
}

impl Turn {
    /// A turn of `content` with its `images` (one per [`Part::Image`], in order),
    /// [`DEFAULT_MAX_NEW_TOKENS`], the checkpoint's sampling.
    pub fn parts(content: Vec<Part>, images: Vec<RequestImage>) -> Self {
        Turn {
            content,
            images,
            max_new_tokens: DEFAULT_MAX_NEW_TOKENS,
            sampling: None,
            stop_ids: Vec::new(),
        }
    }

    /// A turn of `text`.
    pub fn text(text: impl Into<String>) -> Self {
        Self::parts(vec![Part::Text(text.into())], Vec::new())
    }

    /// Adds an image after the turn's leading images, ahead of its text.
    pub fn image(mut self, image: impl Into<RequestImage>) -> Self {
        let at = self
            .content
            .iter()
            .take_while(|p| matches!(p, Part::Image))
            .count();
        self.content.insert(at, Part::Image);
        self.images.push(image.into());
        self
    }

    /// Sets the most tokens to generate.
    pub fn max_new_tokens(mut self, n: usize) -> Self {
        self.max_new_tokens = n;
        self
    }

    /// Sets how tokens are chosen.
    pub fn sampling(mut self, p: SamplingParams) -> Self {
        self.sampling = Some(p);
        self
    }
}

/// A multi-turn conversation with an [`Engine`] that keeps its KV cache between turns
/// ([`Engine::conversation`]).
///
/// Each [`Conversation::send`] renders the whole conversation (system message, every user
/// turn with its images, every earlier reply) with the checkpoint's chat template and
/// tokenizes it; the KV cache holds the ids of the previous turn's prompt and reply, and
/// only the tokens after the longest prefix the two share are prefilled, at the M-RoPE
/// positions that follow the cached ones. When the template renders an earlier reply to
/// other ids than were generated (a reply cut short, ids that decode and encode again
/// differently, a template that drops earlier thinking), the cache drops its tokens from
/// there ([`RequestStats::dropped_tokens`]); when a cache cannot drop tokens, the whole
/// prompt is prefilled again and [`RequestStats::kv_reuse_fallback`] says why.
///
/// The KV cache is a sequence per decoder layer in the engine's paged pool, in a namespace
/// of its own (in process when the engine has no pool); it stays in the pool between turns,
/// where the pool may swap it out, and is freed when the conversation is dropped. Turns
/// run on the engine's request lock like every request.
pub struct Conversation<'e> {
    engine: &'e Engine,
    /// The conversation so far (a system message first, if any).
    messages: Vec<Message>,
    /// Its images, preprocessed, in order.
    images: Vec<ImageInput>,
    kv: Box<dyn KvStore + Send>,
    /// The ids whose keys and values `kv` holds.
    cached_ids: Vec<u32>,
    /// Per cached id: whether it was computed as an image's row (an image pad of a
    /// prompt), not as a text token (a generated id equal to the pad's id).
    cached_image_rows: Vec<bool>,
    /// The M-RoPE position the token after the cached ones takes.
    next_position: i64,
}

impl std::fmt::Debug for Conversation<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conversation")
            .field("messages", &self.messages.len())
            .field("images", &self.images.len())
            .field("cached_tokens", &self.cached_ids.len())
            .field("next_position", &self.next_position)
            .finish_non_exhaustive()
    }
}

impl Conversation<'_> {
    /// Starts the conversation with a system message (replacing one set before; `None`
    /// removes it). Set after turns, the next turn prefills everything after the change.
    pub fn set_system(&mut self, text: Option<String>) {
        if matches!(self.messages.first(), Some(m) if m.role == crate::chat::Role::System) {
            self.messages.remove(0);
        }
        if let Some(t) = text {
            self.messages.insert(0, Message::system(t));
        }
    }

    /// The conversation so far: the system message, if any, then each user turn and reply.
    pub fn messages(&self) -> &[Message] {
        &self.messages
    }

    /// The ids whose keys and values the KV cache holds (the last prompt and the reply's
    /// ids but the last, which is never fed back).
    pub fn cached_ids(&self) -> &[u32] {
        &self.cached_ids
    }

    /// The M-RoPE position the token after the cached ones takes (after an image it is
    /// not the number of cached tokens).
    pub fn next_position(&self) -> i64 {
        self.next_position
    }

    /// Forgets every turn (the system message stays) and empties the KV cache.
    pub fn clear(&mut self) {
        self.messages
            .retain(|m| m.role == crate::chat::Role::System);
        self.images.clear();
        self.forget_cache();
    }

    fn forget_cache(&mut self) {
        self.kv.clear();
        self.cached_ids.clear();
        self.cached_image_rows.clear();
        self.next_position = 0;
    }

    /// Sends a user turn and generates the reply; `on_token` sees each id as it is chosen
    /// and returns false to end the reply there ([`Reply::cancelled`]). The reply joins
    /// the conversation (its text, as far as it went). Only the prompt tokens the KV cache
    /// does not hold are prefilled ([`RequestStats::prefilled_tokens`],
    /// [`RequestStats::reused_tokens`]). A turn that fails leaves the conversation as it
    /// was (its KV cache is emptied if the failure left it half-written).
    pub fn send(
        &mut self,
        turn: &Turn,
        on_token: &mut dyn FnMut(u32) -> bool,
    ) -> EngineResult<Reply> {
        let started = Instant::now();
        let engine = self.engine;
        let placeholders = turn
            .content
            .iter()
            .filter(|p| matches!(p, Part::Image))
            .count();
        if placeholders != turn.images.len() {
            return Err(EngineError::BadRequest(format!(
                "the turn places {placeholders} image(s) but {} were given",
                turn.images.len()
            )));
        }
        let preprocess_cfg = engine.runner.preprocess_config();
        let mut images = self.images.clone();
        for image in &turn.images {
            images.push(preprocess_image(image, preprocess_cfg)?);
        }
        let mut messages = self.messages.clone();
        messages.push(Message::user(turn.content.clone()));
        let counts: Vec<usize> = images
            .iter()
            .map(|i| i.num_tokens(preprocess_cfg.merge_size))
            .collect();
        let tokenizer = engine.tokenizer().ok_or_else(|| {
            EngineError::BadRequest(Runner::no_tokenizer(engine.model_dir()).to_string())
        })?;
        let ids = tokenizer.encode_messages(&messages, &counts, true)?;
        let positions = engine.runner.model().positions(&ids, &images)?;
        let context = ids.len().saturating_add(turn.max_new_tokens) as u64;
        engine
            .room
            .check(context, engine.shape.need_bytes(context))?;
        let opts = engine.options(turn.max_new_tokens, turn.sampling.as_ref(), &turn.stop_ids)?;
        let pad = engine.checkpoint.config.image_token_id;
        let mut keep = self.reusable_prefix(&ids, pad);
        let prepare = started.elapsed();

        let _turn = engine.turn.lock();
        let queued = started.elapsed() - prepare;
        let held = self.cached_ids.len();
        let mut fallback = None;
        if self.kv.len_tokens() != held {
            fallback = Some(format!(
                "the KV cache holds {} tokens where the conversation recorded {held}: the whole conversation is prefilled again",
                self.kv.len_tokens()
            ));
        } else if keep < held
            && let Err(e) = self.kv.truncate(keep)
        {
            fallback = Some(format!(
                "the KV cache could not drop its last {} tokens ({e}): the whole conversation is prefilled again",
                held - keep
            ));
        }
        if fallback.is_some() {
            self.forget_cache();
            keep = 0;
        }
        let dropped = held.saturating_sub(keep);
        self.cached_ids.truncate(keep);
        self.cached_image_rows.truncate(keep);
        let cached = CachedPrefix {
            tokens: keep,
            next_position: position_after(&positions, keep),
        };
        let first_image = image_runs(&ids[..keep], pad);
        let result = engine.run_locked(
            Pass {
                ids: &ids,
                cached,
                images: &images[first_image..],
                opts,
            },
            self.kv.as_mut(),
            on_token,
            Timings {
                prepare,
                queued,
                ..Timings::default()
            },
        );
        let mut reply = match result {
            Ok(r) => r,
            Err(e) => {
                // The common prefix is still there unless the failure wrote part of a layer.
                if self.kv.len_tokens() != keep || self.kv.truncate(keep).is_err() {
                    self.forget_cache();
                } else {
                    self.next_position = cached.next_position;
                }
                return Err(e);
            }
        };
        messages.push(Message::assistant(reply.text.clone().unwrap_or_default()));
        self.messages = messages;
        self.images = images;
        // The cache now holds the prompt and every generated id but the last.
        let held = self.kv.len_tokens();
        let sequence: Vec<u32> = ids.iter().chain(&reply.ids).copied().take(held).collect();
        if sequence.len() == held {
            self.cached_image_rows = ids
                .iter()
                .map(|&id| id == pad)
                .chain(std::iter::repeat(false))
                .take(held)
                .collect();
            self.cached_ids = sequence;
            self.next_position = position_after(&positions, held);
        } else {
            self.forget_cache();
        }
        reply.stats.dropped_tokens = dropped;
        reply.stats.kv_reuse_fallback = fallback;
        Ok(reply)
    }

    /// How many leading tokens of `ids` (the conversation rendered again) the KV cache holds
    /// as they are: the same ids, image pads computed as images, at least the last token
    /// left to prefill, and no image's run of pads split.
    fn reusable_prefix(&self, ids: &[u32], pad: u32) -> usize {
        let mut n = self
            .cached_ids
            .iter()
            .zip(&self.cached_image_rows)
            .zip(ids)
            .take_while(|((c, image_row), id)| c == id && **image_row == (**id == pad))
            .count()
            .min(ids.len().saturating_sub(1));
        while n > 0 && ids[n] == pad && ids[n - 1] == pad {
            n -= 1;
        }
        n
    }
}

/// The M-RoPE position after the first `tokens` of a prompt whose positions are
/// `positions` (positions grow along a prompt; after its end, one per token).
fn position_after(positions: &MropePositions, tokens: usize) -> i64 {
    if tokens > positions.len() {
        return positions.next_position + (tokens - positions.len()) as i64;
    }
    positions
        .thw
        .iter()
        .filter_map(|axis| axis[..tokens].iter().max())
        .max()
        .map_or(0, |p| p + 1)
}

/// How many runs of image pads `ids` holds (one per image).
fn image_runs(ids: &[u32], pad: u32) -> usize {
    ids.iter()
        .enumerate()
        .filter(|&(i, &id)| id == pad && (i == 0 || ids[i - 1] != pad))
        .count()
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

/// The GPU source over `weights` and its reporter, when `use_gpu` (the manager's device tier
/// is the GPU; only with the `cuda` feature).
fn gpu_layers(
    use_gpu: bool,
    weights: &Arc<ManagedWeights>,
    checkpoint: &Checkpoint,
    plan: &crate::gpu::GpuLayerPlan,
) -> EngineResult<Option<(Arc<dyn WeightSource>, GpuReporter)>> {
    #[cfg(feature = "cuda")]
    {
        if !use_gpu {
            return Ok(None);
        }
        let kernels = crate::kernels::cuda::GpuKernels::new(0)?;
        let layers = Arc::new(crate::gpu::GpuLayers::new(
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
        let (c, _) = size_tiers(&laptop(GIB, 200 * GIB), 500, kv_need(500), BLOCK).unwrap();
        assert_eq!(c.disk_bytes, GIB);
        assert_eq!(c.kv_block_bytes, Some(BLOCK));
    }

    #[test]
    fn swap_grows_to_hold_a_long_requests_whole_kv_cache() {
        // 3,005 tokens of context: 673 MB of KV, more than the 40% of 1 GiB the disk's KV
        // budget would hold (the run that failed mid-prompt before).
        let need = kv_need(3005);
        let (c, room) = size_tiers(&laptop(GIB, 200 * GIB), 3005, need, BLOCK).unwrap();
        let disk_kv = c.budgets.get(Tier::Disk, TensorKind::KvCache);
        assert!(disk_kv >= need, "{disk_kv} < {need}");
        assert!(disk_kv < need + MIB, "grown by whole MiBs only: {disk_kv}");
        assert_eq!(c.disk_bytes - GIB, disk_kv - (GIB as f64 * 0.40) as u64);
        assert_eq!(room.disk_bytes, disk_kv);
    }

    #[test]
    fn a_kv_cache_larger_than_host_and_disk_is_refused_before_any_work() {
        let need = kv_need(100_000);
        let err = size_tiers(&laptop(GIB, 2 * GIB), 100_000, need, BLOCK).unwrap_err();
        match err {
            EngineError::OutOfMemory {
                need_bytes,
                context_tokens,
                host_bytes,
                disk_bytes,
                ..
            } => {
                assert_eq!((need_bytes, context_tokens), (need, 100_000));
                assert!(need_bytes > host_bytes + disk_bytes);
            }
            other => panic!("not out of memory: {other}"),
        }
        // With no host KV budget for one block, the cache is in process and unbounded.
        assert!(size_tiers(&laptop(0, 2 * GIB), 100_000, need, BLOCK).is_ok());
    }

    #[test]
    fn a_refusal_says_what_the_kv_cache_needs_and_what_each_tier_holds() {
        let need = kv_need(100_000);
        let err = size_tiers(&laptop(GIB, 2 * GIB), 100_000, need, BLOCK).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("100000 tokens of context"), "{msg}");
        assert!(msg.contains("the host's KV budget holds"), "{msg}");
    }
}
