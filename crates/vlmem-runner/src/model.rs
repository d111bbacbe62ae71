//! The whole model: vision tower + text decoder over one [`WeightSource`], the prompt's
//! forward pass (prefill) and greedy generation with a KV cache.

use crate::error::{Result, RunnerError};
use crate::kv::{KvCache, KvStore};
use crate::nn::Params;
use crate::preprocess::ImageInput;
use crate::rope::{MropePositions, rope_index};
use crate::sample::{Sampler, SamplingParams};
use crate::text::{Deepstack, LogitsFor, Outputs, TextDecoder};
use crate::vision::{VisionOutput, VisionTower};
use crate::weights::WeightSource;
use candle_core::{Device, Tensor};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vlmem_qwen3vl::Qwen3VlConfig;

/// What the prompt's forward pass should return besides filling the KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrefillOptions {
    /// Which positions get logits.
    pub logits: LogitsFor,
    /// Keep the decoder's hidden states (embedding output, each layer, final norm).
    pub hidden_states: bool,
    /// Keep the vision tower's intermediates.
    pub vision_trace: bool,
}

impl Default for PrefillOptions {
    fn default() -> Self {
        PrefillOptions {
            logits: LogitsFor::Last,
            hidden_states: false,
            vision_trace: false,
        }
    }
}

/// The prompt's forward pass.
#[derive(Debug, Clone)]
pub struct Prefill {
    /// Logits as asked for: `[tokens, vocab]` or `[1, vocab]`.
    pub logits: Option<Tensor>,
    /// `layers + 1` tensors `[tokens, hidden]` when asked for.
    pub hidden_states: Vec<Tensor>,
    /// Per image: merged embeddings, DeepStack features, optional trace.
    pub vision: Vec<VisionOutput>,
    /// The prompt's multimodal RoPE positions.
    pub positions: MropePositions,
}

/// Where the prompt's forward pass is, for a progress display
/// ([`Qwen3Vl::on_prefill_progress`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrefillProgress {
    /// The vision tower has run `done` of its `total` blocks over image `image` (from 0) of
    /// `images`. An image found in the vision cache reports nothing.
    Vision {
        /// The image, from 0.
        image: usize,
        /// Images in the prompt.
        images: usize,
        /// Blocks run.
        done: usize,
        /// Blocks in the tower.
        total: usize,
    },
    /// The decoder has run `done` of its `total` layers over the prompt's `tokens` tokens.
    Prompt {
        /// The prompt's tokens.
        tokens: usize,
        /// Layers run.
        done: usize,
        /// Layers in the decoder.
        total: usize,
    },
}

/// A progress callback: see [`Qwen3Vl::on_prefill_progress`].
pub type PrefillProgressFn = dyn Fn(PrefillProgress) + Send + Sync;

/// Generation settings. The default samples nothing: greedy, as the reference outputs were
/// made.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct GenerateOptions {
    /// Tokens to generate at most.
    pub max_new_tokens: usize,
    /// Ids that end generation (kept as the last generated id).
    pub stop_ids: Vec<u32>,
    /// How each token is chosen ([`SamplingParams::default`] is greedy); checked before any
    /// work ([`SamplingParams::validate`]).
    pub sampling: SamplingParams,
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop id was generated (it is the last generated id).
    Stop,
    /// `max_new_tokens` were generated.
    Length,
}

impl FinishReason {
    /// `"stop"` or `"length"`, as the OpenAI and vLLM APIs name them.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

impl std::fmt::Display for FinishReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The result of generation.
#[derive(Debug, Clone)]
pub struct Generation {
    /// The prompt as the model received it.
    pub prompt_ids: Vec<u32>,
    /// The generated ids, in order.
    pub generated_ids: Vec<u32>,
    /// `[generated, vocab]`: the logits each generated id was chosen from.
    pub generated_logits: Vec<Vec<f32>>,
    /// From the call to the first generated id (vision tower + prefill + token choice).
    pub time_to_first_token: Duration,
    /// Time spent on the remaining tokens.
    pub decode_time: Duration,
    /// Where the decode steps kept their activations.
    pub activations: Activations,
    /// Why it ended: a stop id, or `max_new_tokens` (also when that is 0).
    pub finish_reason: FinishReason,
    /// The seed the sampled ids were drawn with (drawn from entropy when the options gave
    /// none; the same seed and settings replay them); `None` when greedy.
    pub seed: Option<u64>,
    /// The caller stopped it ([`Qwen3Vl::generate_after`]'s `on_token` returned false):
    /// `finish_reason` is then [`FinishReason::Length`] unless the last id was a stop id.
    pub cancelled: bool,
}

/// The leading tokens of a prompt whose keys and values a KV cache already holds
/// ([`Qwen3Vl::generate_after`]): a later turn of a conversation prefills only the rest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CachedPrefix {
    /// Leading prompt tokens in the cache.
    pub tokens: usize,
    /// The multimodal position the first token after them takes on every axis (after an
    /// image this is not the token count: see [`crate::rope::rope_index`]).
    pub next_position: i64,
}

/// Where decode steps keep their activations (the per-step vectors: hidden states, q/k/v,
/// attention scores, the MLP's intermediates, the layer's keys and values, the logits).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Activations {
    /// In a step arena of the memory manager, pinned on `tier` for the generation and
    /// reset at each step (see [`Qwen3Vl::use_step_arena`]).
    Arena {
        /// The tier the arena is pinned on.
        tier: vlmem::Tier,
        /// The arena's size: a step at the generation's longest context.
        capacity_bytes: u64,
        /// The most any step used.
        peak_bytes: u64,
        /// Decode steps run in it.
        steps: u64,
    },
    /// In buffers the tensor library allocates (process memory, outside the manager's
    /// budgets): no arena configured, none needed, or no room for one.
    InProcess {
        /// Why.
        reason: String,
    },
}

impl Generation {
    /// Decode speed after the first token, in tokens per second (0 when fewer than 2).
    pub fn decode_tokens_per_s(&self) -> f64 {
        let n = self.generated_ids.len().saturating_sub(1);
        let secs = self.decode_time.as_secs_f64();
        if n == 0 || secs == 0.0 {
            0.0
        } else {
            n as f64 / secs
        }
    }
}

/// Qwen3-VL (dense or MoE) over a weight source.
pub struct Qwen3Vl {
    config: Qwen3VlConfig,
    weights: Arc<dyn WeightSource>,
    vision: VisionTower,
    text: TextDecoder,
    device: Device,
    /// Image embeddings by content, in the memory manager (set once, optional).
    vision_cache: std::sync::OnceLock<Arc<vlmem::vision_cache::VisionCache>>,
    /// Where decode steps take their step arena from (set once, optional).
    step_arena: std::sync::OnceLock<(vlmem::MemoryManager, vlmem::Tier)>,
    /// Bound on one attention score tensor in the prompt's pass and the vision tower, bytes.
    score_bytes: std::sync::atomic::AtomicUsize,
    /// Told where the prompt's forward pass is (set once, optional).
    progress: std::sync::OnceLock<Arc<PrefillProgressFn>>,
}

impl std::fmt::Debug for Qwen3Vl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qwen3Vl")
            .field("model_type", &self.config.model_type)
            .field("device", &self.device)
            .finish()
    }
}

impl Qwen3Vl {
    /// A model for `config` reading weights from `weights`; checks that every weight exists
    /// with the shape the config implies (shapes only: no data is read).
    pub fn new(
        config: Qwen3VlConfig,
        weights: Arc<dyn WeightSource>,
        device: &Device,
    ) -> Result<Self> {
        let vision = VisionTower::new(&config.vision, device);
        let text = TextDecoder::new(&config.text, device)?;
        let m = Qwen3Vl {
            config,
            weights,
            vision,
            text,
            device: device.clone(),
            vision_cache: std::sync::OnceLock::new(),
            step_arena: std::sync::OnceLock::new(),
            score_bytes: std::sync::atomic::AtomicUsize::new(crate::nn::ATTENTION_SCORE_BYTES),
            progress: std::sync::OnceLock::new(),
        };
        let p = m.params();
        m.vision.check_weights(&p)?;
        m.text.check_weights(&p)?;
        Ok(m)
    }

    /// The model's config.
    pub fn config(&self) -> &Qwen3VlConfig {
        &self.config
    }

    /// The compute device.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The weight source.
    pub fn weights(&self) -> &Arc<dyn WeightSource> {
        &self.weights
    }

    fn params(&self) -> Params<'_> {
        Params::new(self.weights.as_ref())
    }

    /// A KV cache sized for this model's layers.
    pub fn new_kv_cache(&self) -> KvCache {
        KvCache::new(self.text.num_layers())
    }

    /// Runs the vision tower over one image.
    pub fn encode_image(&self, image: &ImageInput, trace: bool) -> Result<VisionOutput> {
        self.run_vision(image, trace, (0, 1))
    }

    /// The vision tower over image `which.0` of `which.1`, telling the progress callback.
    fn run_vision(
        &self,
        image: &ImageInput,
        trace: bool,
        which: (usize, usize),
    ) -> Result<VisionOutput> {
        let on_block = |done, total| {
            self.tell(PrefillProgress::Vision {
                image: which.0,
                images: which.1,
                done,
                total,
            })
        };
        self.vision.forward(
            &self.params(),
            image,
            trace,
            self.attention_score_bytes(),
            &on_block,
        )
    }

    /// Tells the progress callback, if there is one.
    fn tell(&self, p: PrefillProgress) {
        if let Some(f) = self.progress.get() {
            f(p);
        }
    }

    /// `f` is told where each prompt's forward pass is: each vision block run per image, then
    /// each decoder layer run over the prompt (e.g. for a progress bar: a large image or a
    /// long prompt takes minutes on a laptop's CPU). Set once: false if already set.
    pub fn on_prefill_progress(&self, f: Arc<PrefillProgressFn>) -> bool {
        self.progress.set(f).is_ok()
    }

    /// Bounds each attention score tensor of the prompt's forward pass and of the vision
    /// tower to `bytes` (default [`crate::nn::ATTENTION_SCORE_BYTES`], 32 MiB): attention
    /// runs a block of query rows at a time, at least one row per block, so the scores of a
    /// long prompt or a large image never exist whole. The results do not depend on it.
    pub fn set_attention_score_bytes(&self, bytes: usize) {
        self.score_bytes
            .store(bytes, std::sync::atomic::Ordering::Relaxed);
    }

    /// See [`Qwen3Vl::set_attention_score_bytes`].
    pub fn attention_score_bytes(&self) -> usize {
        self.score_bytes.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Decode steps keep their activations in a step arena of `manager` pinned on `tier`
    /// (CPU-addressable: the host, or a simulated device), under its activation budget:
    /// [`Qwen3Vl::generate_in`] takes one sized for the generation's longest context and
    /// gives it back at the end; with no room for it, decode falls back to the tensor
    /// library's buffers and says so ([`Generation::activations`]). Set once: false if
    /// already set.
    pub fn use_step_arena(&self, manager: vlmem::MemoryManager, tier: vlmem::Tier) -> bool {
        self.step_arena.set((manager, tier)).is_ok()
    }

    /// A step arena for decode steps up to `tokens` tokens of context, or why there is none.
    fn new_step_arena(&self, tokens: usize) -> std::result::Result<vlmem::StepArena, String> {
        let Some((manager, tier)) = self.step_arena.get() else {
            return Err("no step arena configured".into());
        };
        if !matches!(self.device, Device::Cpu) {
            return Err(format!("the model computes on {:?}", self.device));
        }
        let bytes = self.text.step_arena_bytes(tokens);
        vlmem::StepArena::new(manager, vlmem::TensorKind::Activation, *tier, bytes).map_err(|e| {
            format!(
                "no room for a {} KiB step arena on the {tier} tier: {e}",
                bytes.div_ceil(1024)
            )
        })
    }

    /// Keeps image embeddings (and DeepStack features) in `cache`, keyed by the preprocessed
    /// pixels: a repeated image skips the vision tower. Set once; false if one was set.
    pub fn use_vision_cache(&self, cache: Arc<vlmem::vision_cache::VisionCache>) -> bool {
        self.vision_cache.set(cache).is_ok()
    }

    /// The vision cache, if one is in use.
    pub fn vision_cache(&self) -> Option<&Arc<vlmem::vision_cache::VisionCache>> {
        self.vision_cache.get()
    }

    /// [`Qwen3Vl::encode_image`] through the vision cache when there is one (and no trace
    /// is asked for: traces are never cached).
    fn encode_image_cached(
        &self,
        image: &ImageInput,
        trace: bool,
        which: (usize, usize),
    ) -> Result<VisionOutput> {
        let Some(cache) = self.vision_cache.get().filter(|_| !trace) else {
            return self.run_vision(image, trace, which);
        };
        // An embedding larger than the whole cache is computed and used, not cached.
        if encoded_vision_bytes(&self.config, image) > cache.budget_bytes() {
            return self.run_vision(image, false, which);
        }
        let mut key = Vec::with_capacity(image.pixel_values.len() * 4 + 32);
        for d in image.grid_thw.iter().chain([&image.patch_len]) {
            key.extend_from_slice(&(*d as u64).to_le_bytes());
        }
        for v in &image.pixel_values {
            key.extend_from_slice(&v.to_le_bytes());
        }
        let mut failed = None;
        let got =
            cache.get_or_try_insert_with(&key, || match self.run_vision(image, false, which) {
                Ok(out) => encode_vision(&out).map_err(|e| {
                    let msg = e.to_string();
                    failed = Some(e);
                    vlmem::ManagerError::InvalidConfig(msg)
                }),
                Err(e) => {
                    let msg = e.to_string();
                    failed = Some(e);
                    Err(vlmem::ManagerError::InvalidConfig(msg))
                }
            });
        if let Some(e) = failed {
            return Err(e);
        }
        let (embedding, _hit) = got.map_err(RunnerError::VisionCache)?;
        let bytes = embedding.to_vec().map_err(RunnerError::VisionCache)?;
        decode_vision(&bytes, &self.device)
    }

    /// Checks `ids` against the vocabulary and the images, and computes their positions.
    pub fn positions(&self, ids: &[u32], images: &[ImageInput]) -> Result<MropePositions> {
        self.check_vocab(ids)?;
        let grids: Vec<[usize; 3]> = images.iter().map(|i| i.grid_thw).collect();
        rope_index(
            ids,
            &grids,
            self.config.vision.spatial_merge_size as usize,
            self.config.image_token_id,
            self.config.video_token_id,
        )
    }

    /// An error for an empty prompt or an id outside the vocabulary.
    fn check_vocab(&self, ids: &[u32]) -> Result<()> {
        if ids.is_empty() {
            return Err(RunnerError::BadRequest("the prompt is empty".into()));
        }
        let vocab = self.text.vocab_size();
        if let Some((position, &id)) = ids
            .iter()
            .enumerate()
            .find(|(_, id)| **id as usize >= vocab)
        {
            return Err(RunnerError::TokenOutOfVocab {
                id,
                position,
                vocab_size: vocab,
            });
        }
        Ok(())
    }

    /// The prompt's forward pass: vision tower per image, embeddings with the image rows
    /// substituted at the image pads, the decoder with DeepStack, filling `kv`.
    pub fn prefill(
        &self,
        ids: &[u32],
        images: &[ImageInput],
        kv: &mut dyn KvStore,
        opts: PrefillOptions,
    ) -> Result<Prefill> {
        self.prefill_after(ids, images, kv, opts, 0)
    }

    /// [`Qwen3Vl::prefill`] of tokens that follow the ones `kv` already holds: `ids` take
    /// their multimodal positions from `first_position` on (the position after the cached
    /// tokens) and attend to the cached tokens and to each other causally. `images` are the
    /// images whose pads are in `ids`; `ids` must not start inside an image's run of pads.
    pub fn prefill_after(
        &self,
        ids: &[u32],
        images: &[ImageInput],
        kv: &mut dyn KvStore,
        opts: PrefillOptions,
        first_position: i64,
    ) -> Result<Prefill> {
        let mut positions = self.positions(ids, images)?;
        if first_position != 0 {
            for axis in &mut positions.thw {
                for p in axis.iter_mut() {
                    *p += first_position;
                }
            }
            positions.next_position += first_position;
        }
        self.prefill_piece(ids, positions, images, 0, kv, opts)
    }

    /// A piece of a prompt whose earlier tokens `kv` already holds, with its `positions`
    /// (the piece's share of the whole prompt's [`Qwen3Vl::positions`]; `next_position` is
    /// returned as given). `images` are the images whose pads lie in `ids`, in order; the
    /// first may have had its first `skip_rows` pads in the tokens before the piece, and
    /// its rows from there on go to this piece's pads. Unlike [`Qwen3Vl::prefill_after`] a
    /// piece may start inside an image (after a prefix shared in whole KV blocks).
    pub fn prefill_piece(
        &self,
        ids: &[u32],
        positions: MropePositions,
        images: &[ImageInput],
        skip_rows: usize,
        kv: &mut dyn KvStore,
        opts: PrefillOptions,
    ) -> Result<Prefill> {
        self.check_vocab(ids)?;
        if positions.len() != ids.len() {
            return Err(RunnerError::BadRequest(format!(
                "{} positions for a piece of {} tokens",
                positions.len(),
                ids.len()
            )));
        }
        let p = self.params();
        let mut vision = Vec::with_capacity(images.len());
        for (i, img) in images.iter().enumerate() {
            vision.push(self.encode_image_cached(img, opts.vision_trace, (i, images.len()))?);
        }
        let text_embeds = self.text.embed(&p, ids)?;
        let (embeds, deepstack) = if vision.is_empty() {
            (text_embeds, None)
        } else {
            let pads: Vec<u32> = ids
                .iter()
                .enumerate()
                .filter(|(_, id)| **id == self.config.image_token_id)
                .map(|(i, _)| i as u32)
                .collect();
            let image_rows: Vec<&Tensor> = vision.iter().map(|v| &v.image_embeds).collect();
            let image_rows = Tensor::cat(&image_rows, 0)?;
            // The rows of this piece's pads: past the ones an earlier piece took.
            let have = image_rows.dim(0)?;
            if skip_rows + pads.len() > have {
                return Err(RunnerError::BadRequest(format!(
                    "{} image pads after {skip_rows} earlier ones, for images of {have} rows",
                    pads.len()
                )));
            }
            let image_rows = image_rows.narrow(0, skip_rows, pads.len())?;
            // Gather from [text rows; image rows]: position i takes its own text row unless
            // it is the k-th image pad, which takes image row k.
            let n = ids.len();
            let mut gather: Vec<u32> = (0..n as u32).collect();
            for (k, &pos) in pads.iter().enumerate() {
                gather[pos as usize] = (n + k) as u32;
            }
            let table = Tensor::cat(&[&text_embeds, &image_rows], 0)?;
            let gather = Tensor::from_vec(gather, n, &self.device)?;
            let embeds = table.index_select(&gather, 0)?;
            let levels = vision.iter().map(|v| v.deepstack.len()).min().unwrap_or(0);
            let mut features = Vec::with_capacity(levels);
            for level in 0..levels {
                let parts: Vec<&Tensor> = vision.iter().map(|v| &v.deepstack[level]).collect();
                features.push(Tensor::cat(&parts, 0)?.narrow(0, skip_rows, pads.len())?);
            }
            let ds = Deepstack {
                positions: Tensor::from_vec(pads.clone(), pads.len(), &self.device)?,
                features,
            };
            (embeds, Some(ds))
        };
        let tokens = ids.len();
        let on_layer = |done, total| {
            self.tell(PrefillProgress::Prompt {
                tokens,
                done,
                total,
            })
        };
        let out = self.text.forward(
            &p,
            &embeds,
            &positions,
            kv,
            deepstack.as_ref(),
            Outputs {
                logits: opts.logits,
                hidden_states: opts.hidden_states,
                score_bytes: self.attention_score_bytes(),
                on_layer: &on_layer,
            },
        )?;
        Ok(Prefill {
            logits: out.logits,
            hidden_states: out.hidden_states,
            vision,
            positions,
        })
    }

    /// One decode step: `token` at multimodal position `(position, position, position)`
    /// after the tokens in `kv`; returns the next-token logits `[vocab]`.
    pub fn decode_step(&self, token: u32, position: i64, kv: &mut dyn KvStore) -> Result<Tensor> {
        let p = self.params();
        let embeds = self.text.embed(&p, &[token])?;
        let positions = MropePositions::text(position, 1);
        let out = self.text.forward(
            &p,
            &embeds,
            &positions,
            kv,
            None,
            Outputs {
                logits: LogitsFor::Last,
                hidden_states: false,
                score_bytes: self.attention_score_bytes(),
                on_layer: &|_, _| {},
            },
        )?;
        let logits = out
            .logits
            .ok_or_else(|| RunnerError::BadRequest("decoder returned no logits".into()))?;
        Ok(logits.squeeze(0)?)
    }

    /// One decode step for a batch of sequences in one pass over the weights (see
    /// [`crate::text::BatchRow`]); returns each row's next-token logits `[vocab]`, in order.
    /// A row's logits do not depend on the other rows: they are those of its sequence
    /// decoded alone through the same kernels.
    pub fn decode_batch(&self, rows: &mut [crate::text::BatchRow<'_>]) -> Result<Vec<Vec<f32>>> {
        self.text.decode_batch(&self.params(), rows)
    }

    /// Generation: prefill, then choose each id per `opts.sampling` (greedy by default: the
    /// arg-max) and feed it back until `max_new_tokens` or a stop id. `on_token` sees each id
    /// as it is chosen.
    pub fn generate(
        &self,
        ids: &[u32],
        images: &[ImageInput],
        opts: &GenerateOptions,
        on_token: &mut dyn FnMut(u32),
    ) -> Result<Generation> {
        self.generate_in(ids, images, opts, &mut self.new_kv_cache(), on_token)
    }

    /// [`Qwen3Vl::generate`] with the KV cache given (e.g. a [`crate::PagedKv`] in the
    /// memory manager's paged pool); `kv` must be empty.
    pub fn generate_in(
        &self,
        ids: &[u32],
        images: &[ImageInput],
        opts: &GenerateOptions,
        kv: &mut dyn KvStore,
        on_token: &mut dyn FnMut(u32),
    ) -> Result<Generation> {
        self.generate_after(ids, CachedPrefix::default(), images, opts, kv, &mut |id| {
            on_token(id);
            true
        })
    }

    /// Generation after a prompt whose first `cached.tokens` tokens are already in `kv`
    /// (a conversation's earlier turns): only `ids[cached.tokens..]` are prefilled, at
    /// positions from `cached.next_position` on; `images` are the images whose pads are in
    /// that suffix. `ids` is the whole prompt (the sampler's penalties see all of it), and at
    /// least its last token is prefilled (its logits choose the first id). `on_token` sees
    /// each id as it is chosen and returns false to stop there (the reply is then
    /// [`Generation::cancelled`]). `kv` holds the prompt and every generated id but the last
    /// afterwards.
    pub fn generate_after(
        &self,
        ids: &[u32],
        cached: CachedPrefix,
        images: &[ImageInput],
        opts: &GenerateOptions,
        kv: &mut dyn KvStore,
        on_token: &mut dyn FnMut(u32) -> bool,
    ) -> Result<Generation> {
        let start = Instant::now();
        if cached.tokens >= ids.len().max(1) || kv.len_tokens() != cached.tokens {
            return Err(RunnerError::BadRequest(format!(
                "a prompt of {} tokens after {} cached ones, in a KV cache holding {}: at least \
                 the last prompt token must be prefilled",
                ids.len(),
                cached.tokens,
                kv.len_tokens()
            )));
        }
        let new_ids = &ids[cached.tokens..];
        let mut sampler = Sampler::new(opts.sampling.clone())?;
        let mut generation = Generation {
            prompt_ids: ids.to_vec(),
            generated_ids: Vec::new(),
            generated_logits: Vec::new(),
            time_to_first_token: Duration::ZERO,
            decode_time: Duration::ZERO,
            activations: Activations::InProcess {
                reason: "no decode step".into(),
            },
            finish_reason: FinishReason::Length,
            seed: sampler.seed(),
            cancelled: false,
        };
        if opts.max_new_tokens == 0 {
            self.positions(new_ids, images)?;
            return Ok(generation);
        }
        let prefill = self.prefill_after(
            new_ids,
            images,
            kv,
            PrefillOptions::default(),
            cached.next_position,
        )?;
        // The longest context a decode step sees: the prompt and every generated id but the
        // last (which is never fed back).
        let mut arena = if opts.max_new_tokens > 1 {
            self.new_step_arena(ids.len().saturating_add(opts.max_new_tokens - 1))
        } else {
            Err("no decode step".into())
        };
        let p = self.params();
        let mut logits = prefill
            .logits
            .ok_or_else(|| RunnerError::BadRequest("prefill returned no logits".into()))?
            .squeeze(0)?
            .to_vec1::<f32>()?;
        let mut position = prefill.positions.next_position;
        let mut decode_start = start;
        loop {
            let next = sampler.sample(&logits, ids, &generation.generated_ids)?;
            generation.generated_ids.push(next);
            generation.generated_logits.push(logits);
            let go_on = on_token(next);
            if generation.generated_ids.len() == 1 {
                generation.time_to_first_token = start.elapsed();
                decode_start = Instant::now();
            }
            if opts.stop_ids.contains(&next) {
                generation.finish_reason = FinishReason::Stop;
                break;
            }
            if generation.generated_ids.len() >= opts.max_new_tokens {
                break;
            }
            if !go_on {
                generation.cancelled = true;
                break;
            }
            logits = match arena.as_mut() {
                Ok(a) => self.text.decode_in_arena(&p, next, position, kv, a)?,
                Err(_) => self.decode_step(next, position, kv)?.to_vec1::<f32>()?,
            };
            position += 1;
        }
        generation.decode_time = decode_start.elapsed();
        generation.activations = match arena {
            Ok(a) => Activations::Arena {
                tier: a.tier(),
                capacity_bytes: a.capacity_bytes(),
                peak_bytes: a.peak_bytes(),
                steps: a.steps(),
            },
            Err(reason) => Activations::InProcess { reason },
        };
        Ok(generation)
    }
}

/// Bytes [`encode_vision`] gives for `image`'s vision output: the header, then the
/// embedding and each DeepStack feature (`tokens x out_hidden_size` f32 each).
fn encoded_vision_bytes(cfg: &vlmem_qwen3vl::Qwen3VlConfig, image: &ImageInput) -> u64 {
    let v = &cfg.vision;
    let tokens = image.num_tokens(v.spatial_merge_size.max(1) as usize) as u64;
    let levels = 1 + v.deepstack_visual_indexes.len() as u64;
    levels
        .saturating_mul(tokens)
        .saturating_mul(v.out_hidden_size)
        .saturating_mul(4)
        .saturating_add(24)
}

/// A vision output as bytes: `[rows, cols, levels]` as u64, then the image embedding and
/// each DeepStack feature, f32 little-endian.
fn encode_vision(out: &VisionOutput) -> Result<Vec<u8>> {
    let (rows, cols) = out.image_embeds.dims2()?;
    let mut bytes = Vec::with_capacity(24 + (1 + out.deepstack.len()) * rows * cols * 4);
    for x in [rows, cols, out.deepstack.len()] {
        bytes.extend_from_slice(&(x as u64).to_le_bytes());
    }
    for t in std::iter::once(&out.image_embeds).chain(&out.deepstack) {
        if t.dims2()? != (rows, cols) {
            return Err(RunnerError::BadRequest(format!(
                "a DeepStack feature of shape {:?} beside an embedding of {rows}x{cols}",
                t.dims()
            )));
        }
        for v in t.flatten_all()?.to_vec1::<f32>()? {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
    }
    Ok(bytes)
}

/// The inverse of [`encode_vision`]; a malformed buffer is an error.
fn decode_vision(bytes: &[u8], device: &Device) -> Result<VisionOutput> {
    let bad = || RunnerError::MalformedEmbedding;
    let word = |i: usize| -> Result<usize> {
        let b = bytes.get(i * 8..i * 8 + 8).ok_or_else(bad)?;
        Ok(u64::from_le_bytes(b.try_into().map_err(|_| bad())?) as usize)
    };
    let (rows, cols, levels) = (word(0)?, word(1)?, word(2)?);
    let each = rows.checked_mul(cols).ok_or_else(bad)?;
    let want = each
        .checked_mul(4)
        .and_then(|b| b.checked_mul(levels + 1))
        .and_then(|b| b.checked_add(24))
        .ok_or_else(bad)?;
    if bytes.len() != want {
        return Err(bad());
    }
    let mut tensors = (0..=levels).map(|k| {
        let start = 24 + k * each * 4;
        let vals: Vec<f32> = bytes[start..start + each * 4]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        Tensor::from_vec(vals, (rows, cols), device)
    });
    let image_embeds = tensors.next().ok_or_else(bad)??;
    let deepstack = tensors.collect::<candle_core::Result<Vec<_>>>()?;
    Ok(VisionOutput {
        image_embeds,
        deepstack,
        trace: None,
    })
}

/// Index of the largest value (the first one on ties, as torch's argmax).
pub fn argmax(values: &[f32]) -> u32 {
    let mut best = 0usize;
    for (i, &v) in values.iter().enumerate() {
        if v > values[best] {
            best = i;
        }
    }
    best as u32
}
