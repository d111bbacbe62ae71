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

mod builder;
mod conversation;
mod error;
mod queue;
mod request;
mod scheduler;
mod spans;

pub use builder::EngineBuilder;
pub use conversation::{Conversation, Turn};
pub use error::{EngineError, EngineResult};
pub use request::{Prompt, Reply, Request, RequestImage, RequestStats, Timings};
pub use scheduler::{
    DEFAULT_PREFILL_CHUNK_TOKENS, Finished, Scheduler, SchedulerConfig, SchedulerStats, SeqEvent,
    Sink, SubmitError, Ticket,
};

use crate::error::RunnerError;
use crate::kv::{KvCache, KvDtype, KvStore, PagedKv};
use crate::managed::ManagedWeights;
use crate::model::{CachedPrefix, GenerateOptions, PrefillOptions};
use crate::preprocess::{ImageInput, PreprocessConfig};
use crate::prompt::ChatTokenizer;
use crate::runner::Runner;
use crate::sample::{GenerationConfig, SamplingParams};
use crate::text::LogitsFor;
use builder::{KvRoom, KvShape, push_new};
use candle_core::Tensor;
use request::{context_of, prepare_with};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;
use vlmem::vision_cache::VisionCache;
use vlmem::{KvPool, MemoryManager, Tier};
use vlmem_core::profile::{HardwareProfile, Overrides};
use vlmem_core::sync::Mutex;
use vlmem_qwen3vl::checkpoint::Checkpoint;
use vlmem_qwen3vl::plan::Plan;

/// Tokens per KV block (vLLM's default; the plan's [`vlmem_qwen3vl::placement::KV_BLOCK_TOKENS`]).
pub const KV_BLOCK_TOKENS: u32 = vlmem_qwen3vl::placement::KV_BLOCK_TOKENS as u32;

/// The context an engine built without a request is planned for (`vlmem plan`'s default).
pub const DEFAULT_CONTEXT_TOKENS: u64 = 4096;

/// New tokens a [`Request`] asks for unless told otherwise.
pub const DEFAULT_MAX_NEW_TOKENS: usize = 16;

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
    /// The placement plan the engine executes.
    plan: Plan,
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
            max_context_tokens: DEFAULT_CONTEXT_TOKENS,
            max_seqs: 1,
            plan_images: Vec::new(),
            progress: None,
            kv_dtype: KvDtype::default(),
            quant: Default::default(),
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
        self.generate_until(request, &mut |id| {
            on_token(id);
            true
        })
    }

    /// [`Engine::generate`], where `on_token` returns false to end the reply at that id
    /// ([`Reply::cancelled`]; a server stops a request whose client went away). The prompt's
    /// forward pass is not interrupted: the first chance to stop is the first generated id.
    pub fn generate_until(
        &self,
        request: &Request,
        on_token: &mut dyn FnMut(u32) -> bool,
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
            on_token,
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
                self.shape.dtype,
            )?),
            None => Box::new(KvCache::with_dtype(self.shape.layers, self.shape.dtype)),
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
    /// forward pass, its KV cache in process, in the engine's KV dtype, and dropped).
    pub fn prompt_logits(&self, request: &Request) -> EngineResult<Tensor> {
        let prepared = self.prepare(request)?;
        let ids = prepared.prompt_ids().unwrap_or_default();
        let images = prepared.preprocessed_images().unwrap_or_default();
        let _turn = self.turn.lock();
        let model = self.runner.model();
        let mut kv = KvCache::with_dtype(self.shape.layers, self.shape.dtype);
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

    /// The placement plan the engine executes: where each weight lives, the staging area,
    /// each class's budget (`vlmem plan` prints the same for the same model, profile,
    /// budgets and request).
    pub fn plan(&self) -> &Plan {
        &self.plan
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

    /// How the KV cache holds keys and values ([`EngineBuilder::kv_dtype`]; the plan's
    /// `kv_dtype`).
    pub fn kv_dtype(&self) -> KvDtype {
        self.shape.dtype
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
