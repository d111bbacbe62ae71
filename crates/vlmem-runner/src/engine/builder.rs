//! Building an engine: the checkpoint's placement plan, the manager's tiers sized for it,
//! the weights registered in place, the KV pool, the vision cache and the step arena.

use super::request::{context_of, prepare_with};
use super::{
    Engine, EngineError, EngineResult, GpuReporter, KV_BLOCK_TOKENS, Request, RequestImage,
};
use crate::managed::ManagedWeights;
use crate::model::{PrefillProgress, PrefillProgressFn};
use crate::preprocess::PreprocessConfig;
use crate::runner::Runner;
use crate::sample::GenerationConfig;
use crate::weights::WeightSource;
use candle_core::Device;
use std::path::PathBuf;
use std::sync::Arc;
use vlmem::vision_cache::VisionCache;
use vlmem::{KvPool, KvPoolConfig, ManagerConfig, MemoryManager, TensorKind, Tier};
use vlmem_core::profile::{HardwareProfile, Overrides};
use vlmem_core::sync::Mutex;
use vlmem_qwen3vl::checkpoint::Checkpoint;
use vlmem_qwen3vl::format::WeightFormat;
use vlmem_qwen3vl::kv_dtype::KvDtype;
use vlmem_qwen3vl::placement::WeightPlacement;
use vlmem_qwen3vl::plan::{ModelSource, Plan, PlanRequest};
use vlmem_qwen3vl::quantize::{cache_root, load_format, quantized_copy};

/// Builds an [`Engine`]: see [`Engine::builder`].
pub struct EngineBuilder {
    pub(super) dir: PathBuf,
    pub(super) profile: Option<HardwareProfile>,
    pub(super) overrides: Overrides,
    pub(super) disk_path: Option<PathBuf>,
    pub(super) prefetch_layers: usize,
    pub(super) max_context_tokens: u64,
    pub(super) max_seqs: u64,
    pub(super) plan_images: Vec<(u64, u64)>,
    pub(super) progress: Option<Arc<PrefillProgressFn>>,
    pub(super) kv_dtype: KvDtype,
    pub(super) quant: Quantize,
}

/// How the weights are held (see [`EngineBuilder::quant`]).
#[derive(Debug, Clone, Default)]
pub(super) struct Quantize {
    /// The block format asked for (`None`: as stored, or as the kernels need).
    format: Option<WeightFormat>,
    /// Where quantized copies are kept (`None`: the cache folder).
    cache_root: Option<PathBuf>,
    /// A progress bar while a copy is written.
    progress: bool,
}

impl std::fmt::Debug for EngineBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineBuilder")
            .field("dir", &self.dir)
            .field("overrides", &self.overrides)
            .field("disk_path", &self.disk_path)
            .field("prefetch_layers", &self.prefetch_layers)
            .field("max_context_tokens", &self.max_context_tokens)
            .field("kv_dtype", &self.kv_dtype)
            .field("quant", &self.quant)
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

    /// The longest context (prompt and new tokens) a request will have (default
    /// [`DEFAULT_CONTEXT_TOKENS`]): the plan gives the host's KV budget the KV cache of that
    /// many tokens (at most half the host), and the swap file grows so that the disk's KV
    /// budget holds it whole; a longer request is refused up front when its KV cache fits
    /// neither tier. [`EngineBuilder::build_for`] sizes them for its request instead.
    ///
    /// [`DEFAULT_CONTEXT_TOKENS`]: super::DEFAULT_CONTEXT_TOKENS
    pub fn max_context_tokens(mut self, tokens: u64) -> Self {
        self.max_context_tokens = tokens;
        self
    }

    /// Sequences the plan gives KV room for at once (default 1; a server's
    /// [`super::SchedulerConfig::max_seqs`]): the host's KV budget holds that many contexts
    /// of [`EngineBuilder::max_context_tokens`] (at most half the host) and the swap file the
    /// rest. 0 counts as 1.
    pub fn max_seqs(mut self, seqs: u64) -> Self {
        self.max_seqs = seqs.max(1);
        self
    }

    /// Images (width x height in pixels, after any scaling down) whose embeddings the vision
    /// cache has room for, when the engine is built without a request ([`EngineBuilder::build`];
    /// `build_for` makes room for its request's images). Without any, such an engine has no
    /// vision cache and encodes every image it is given.
    pub fn plan_images(mut self, sizes: Vec<(u64, u64)>) -> Self {
        self.plan_images = sizes;
        self
    }

    /// How the KV cache holds keys and values (default [`KvDtype::Bf16`]): the plan's KV
    /// budgets, the KV pool's blocks and every request's cache follow it. [`KvDtype::F32`]
    /// is exact; bf16 rounds each key and value to 8 significant bits, q8_0 to blocks of 32
    /// (a model whose `kv_heads * head_dim` is not a multiple of 32 is refused by `build`).
    pub fn kv_dtype(mut self, dtype: KvDtype) -> Self {
        self.kv_dtype = dtype;
        self
    }

    /// Holds the weights in the block format `format` (`q8_0`, `q4_k`; each tensor as
    /// `vlmem plan --dtype` sizes it). A checkpoint already in that format (written by
    /// `vlmem quantize`) loads as it is. Otherwise its quantized copy is loaded from the
    /// cache folder (`$VLMEM_CACHE`, else `~/.cache/vlmem`, under `quantized/`), and written
    /// there first if there is none yet (about as long as reading the checkpoint once);
    /// the copy is registered in place like any checkpoint, so weights streamed from disk
    /// are read quantized. A plain format (`bf16`) asks for nothing: the checkpoint loads
    /// as stored.
    ///
    /// An FP8 checkpoint (Qwen's `-FP8` releases), whose bytes the kernels do not read, is
    /// transcoded this way to q8_0 when no format is asked for.
    pub fn quant(mut self, format: WeightFormat) -> Self {
        self.quant.format = (!format.is_plain()).then_some(format);
        self
    }

    /// Where quantized copies are kept (default: `$VLMEM_CACHE`, else `~/.cache/vlmem`).
    pub fn quant_cache(mut self, root: impl Into<PathBuf>) -> Self {
        self.quant.cache_root = Some(root.into());
        self
    }

    /// Draws a progress bar on stderr while a quantized copy is written.
    pub fn quant_progress(mut self, show: bool) -> Self {
        self.quant.progress = show;
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
        // Weights in a block format asked for, or in the format the kernels need (an FP8
        // checkpoint is transcoded to q8_0): a quantized copy from the cache folder.
        let checkpoint = match self.quant.format.or_else(|| load_format(&checkpoint)) {
            Some(format) => {
                let root = self.quant.cache_root.clone().unwrap_or_else(cache_root);
                quantized_copy(&checkpoint, format, &root, self.quant.progress)?.checkpoint
            }
            None => checkpoint,
        };
        let generation_config = GenerationConfig::load(&checkpoint.dir)?;
        let tokenizer = Runner::open_tokenizer(&checkpoint)?;
        let preprocess_cfg = PreprocessConfig::for_vision(&checkpoint.config.vision);
        let shape = KvShape::of(&checkpoint, self.kv_dtype)?;
        let prepared = request
            .map(|r| prepare_with(tokenizer.as_ref(), &preprocess_cfg, &checkpoint.dir, r))
            .transpose()?;
        let context_tokens = match (&prepared, request) {
            (Some(p), Some(r)) => context_of(p, r.max_new_tokens),
            _ => self.max_context_tokens,
        };
        // With the `cuda` feature, a GPU and a device budget: the device tier is the GPU, and
        // the decoder layers the plan puts there compute there.
        let use_gpu = gpu_present() && profile.gpu_usable_bytes() > 0;
        let image_sizes: Vec<(u64, u64)> = prepared
            .iter()
            .flat_map(|p| &p.images)
            .filter_map(|i| match i {
                RequestImage::Preprocessed(x) => {
                    Some((x.resized_wh.0 as u64, x.resized_wh.1 as u64))
                }
                _ => None,
            })
            .collect();
        let image_sizes = match &prepared {
            Some(_) => image_sizes,
            None => std::mem::take(&mut self.plan_images),
        };
        let seqs = if prepared.is_some() { 1 } else { self.max_seqs };
        let plan = plan_for(
            &checkpoint,
            &profile,
            use_gpu,
            context_tokens,
            seqs,
            &image_sizes,
            shape.dtype,
        )?;
        let (mut config, room) = size_tiers(
            &profile,
            &plan.placement.budgets,
            context_tokens,
            // The swap file holds every planned sequence's whole context.
            shape.need_bytes(context_tokens).saturating_mul(seqs),
            shape.block_bytes(),
        )?;
        config.disk.dir = self.disk_path.clone();
        if use_gpu {
            config.gpu_ordinal = Some(0);
        }
        let placement = WeightPlacement {
            tensors: plan.placement.tensors.clone(),
            staging_bytes: plan.placement.host_staging_bytes,
            gpu_layers: plan.placement.gpu_layers,
        };
        let manager = MemoryManager::new(config)?;
        let weights = Arc::new(ManagedWeights::register_planned(
            manager.clone(),
            &checkpoint,
            Tier::Host,
            &Device::Cpu,
            &placement,
        )?);
        weights.set_prefetch_layers(self.prefetch_layers);
        let gpu = gpu_layers(use_gpu, &weights, &checkpoint, &placement)?;
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
                // The folder loaded: a quantized copy's embeddings differ from its source's.
                &format!("{}", checkpoint.dir.display()),
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
            plan,
            turn: Mutex::new(()),
        };
        Ok((engine, prepared))
    }
}

/// The KV cache's layout: every layer's keys and values per token, in `dtype`.
#[derive(Debug, Clone, Copy)]
pub(super) struct KvShape {
    pub(super) layers: usize,
    pub(super) kv_heads: usize,
    pub(super) head_dim: usize,
    pub(super) dtype: KvDtype,
    /// One layer's keys and values of one token in `dtype`.
    token_bytes: u64,
}

impl KvShape {
    /// The checkpoint's KV layout in `dtype`; refused when its rows are not whole blocks of
    /// it (the plan sizes the same bytes: [`vlmem_qwen3vl::placement::kv_layer_bytes_per_token`]).
    fn of(checkpoint: &Checkpoint, dtype: KvDtype) -> EngineResult<Self> {
        let token_bytes =
            vlmem_qwen3vl::placement::kv_layer_bytes_per_token(&checkpoint.config, dtype)
                .map_err(|e| EngineError::BadRequest(format!("KV dtype: {e}")))?;
        let t = &checkpoint.config.text;
        Ok(KvShape {
            layers: t.num_hidden_layers as usize,
            kv_heads: t.num_key_value_heads as usize,
            head_dim: t.head_dim as usize,
            dtype,
            token_bytes,
        })
    }

    /// One layer's keys and values of one token.
    fn bytes_per_token(&self) -> u64 {
        self.token_bytes
    }

    fn block_bytes(&self) -> u64 {
        KV_BLOCK_TOKENS as u64 * self.bytes_per_token()
    }

    /// Every layer's whole blocks for `context_tokens` (saturating: an absurd context is
    /// refused, not an overflow).
    pub(super) fn need_bytes(&self, context_tokens: u64) -> u64 {
        (self.layers as u64)
            .saturating_mul(context_tokens.div_ceil(KV_BLOCK_TOKENS as u64))
            .saturating_mul(self.block_bytes())
    }
}

/// The KV budgets the manager was sized with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct KvRoom {
    host_bytes: u64,
    disk_bytes: u64,
    disk_free_bytes: u64,
    block_bytes: u64,
}

impl KvRoom {
    /// The KV bytes the pool may hold: the host's KV budget and the disk's.
    pub(super) fn budget_bytes(&self) -> u64 {
        self.host_bytes.saturating_add(self.disk_bytes)
    }

    /// Refuses `need_bytes` of KV for `context_tokens` when the pool cannot hold it. With no
    /// host KV budget for one block the cache stays in process, unbounded.
    pub(super) fn check(&self, context_tokens: u64, need_bytes: u64) -> EngineResult<()> {
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

/// The manager's tiers for requests of up to `context_tokens` of context: the GPU's and the
/// host's class budgets as the plan sized them from the request (`budgets`). Swap holds what
/// the host cannot: the KV blocks of layers swapped out (the weights are read in place from
/// the checkpoint). It is 1 GiB (at most the profile's free disk), grown so that the disk's
/// KV budget holds the whole KV cache (`kv_need_bytes`); a context whose KV cache fits
/// neither is refused here, before any work, rather than failing mid-prompt.
fn size_tiers(
    profile: &HardwareProfile,
    budgets: &vlmem_qwen3vl::placement::Budgets,
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
    let row = |c: &vlmem_qwen3vl::placement::ClassBudgets| {
        [c.weights, c.kv, c.activations, c.vision, c.scratch]
    };
    if budgets.gpu.total() > 0 && budgets.gpu.total() <= config.device_bytes {
        config.budgets.bytes[Tier::Device.index()] = row(&budgets.gpu);
    }
    if budgets.host.total() <= config.host_bytes {
        config.budgets.bytes[Tier::Host.index()] = row(&budgets.host);
    }
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

/// The one placement plan of this engine: the checkpoint on the profile (its GPU only when
/// one computes here) for a request of `context_tokens` with `images`, its KV cache in
/// `kv_dtype`.
fn plan_for(
    checkpoint: &Checkpoint,
    profile: &HardwareProfile,
    use_gpu: bool,
    context_tokens: u64,
    seqs: u64,
    image_sizes: &[(u64, u64)],
    kv_dtype: KvDtype,
) -> EngineResult<Plan> {
    let mut profile = profile.clone();
    if !use_gpu {
        profile.gpu = None;
    }
    let request = PlanRequest {
        // An absurd context is refused by the KV check with its numbers, not here.
        context_tokens: context_tokens.min(MAX_PLAN_CONTEXT_TOKENS),
        batch: seqs,
        images: image_sizes.to_vec(),
        dtype: None,
        kv_dtype,
    };
    let model = ModelSource::of_checkpoint(&checkpoint.dir.display().to_string(), checkpoint);
    Ok(vlmem_qwen3vl::plan::plan(&model, &profile, &request)?)
}

/// The longest context the plan is asked about.
const MAX_PLAN_CONTEXT_TOKENS: u64 = 1 << 32;

/// Appends the ids of `more` that `ids` lacks.
pub(super) fn push_new(ids: &mut Vec<u32>, more: &[u32]) {
    for id in more {
        if !ids.contains(id) {
            ids.push(*id);
        }
    }
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
    plan: &WeightPlacement,
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
            &crate::gpu::GpuLayerPlan::of(plan),
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

    /// The tiers for a qwen3-vl-2b request of `tokens` on `profile`, its budgets planned.
    fn tiers(
        profile: &HardwareProfile,
        tokens: u64,
        need: u64,
    ) -> EngineResult<(ManagerConfig, KvRoom)> {
        let cfg = vlmem_qwen3vl::catalog::config("qwen3-vl-2b").unwrap();
        let needs = vlmem_qwen3vl::placement::RequestNeeds {
            context_tokens: tokens,
            batch: 1,
            image_bytes: vec![],
            kv_dtype: KvDtype::F32,
        };
        let budgets =
            vlmem_qwen3vl::placement::budgets(&cfg, 0, profile.host.usable_bytes(), &needs)
                .unwrap();
        size_tiers(profile, &budgets, tokens, need, BLOCK)
    }

    /// qwen3-vl-2b: 28 layers, blocks of 16 tokens x 8 KiB (f32).
    const BLOCK: u64 = 16 * 8192;
    fn kv_need(tokens: u64) -> u64 {
        28 * tokens.div_ceil(16) * BLOCK
    }

    #[test]
    fn swap_is_one_gib_while_the_kv_cache_fits_it() {
        let (c, _) = tiers(&laptop(GIB, 200 * GIB), 500, kv_need(500)).unwrap();
        assert_eq!(c.disk_bytes, GIB);
        assert_eq!(c.kv_block_bytes, Some(BLOCK));
    }

    #[test]
    fn swap_grows_to_hold_a_long_requests_whole_kv_cache() {
        // 3,005 tokens of context: 673 MB of KV, more than the 40% of 1 GiB the disk's KV
        // budget would hold (the run that failed mid-prompt before).
        let need = kv_need(3005);
        let (c, room) = tiers(&laptop(GIB, 200 * GIB), 3005, need).unwrap();
        let disk_kv = c.budgets.get(Tier::Disk, TensorKind::KvCache);
        assert!(disk_kv >= need, "{disk_kv} < {need}");
        assert!(disk_kv < need + MIB, "grown by whole MiBs only: {disk_kv}");
        assert_eq!(c.disk_bytes - GIB, disk_kv - (GIB as f64 * 0.40) as u64);
        assert_eq!(room.disk_bytes, disk_kv);
    }

    #[test]
    fn a_kv_cache_larger_than_host_and_disk_is_refused_before_any_work() {
        let need = kv_need(100_000);
        let err = tiers(&laptop(GIB, 2 * GIB), 100_000, need).unwrap_err();
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
        assert!(tiers(&laptop(0, 2 * GIB), 100_000, need).is_ok());
    }

    #[test]
    fn a_refusal_says_what_the_kv_cache_needs_and_what_each_tier_holds() {
        let need = kv_need(100_000);
        let err = tiers(&laptop(GIB, 2 * GIB), 100_000, need).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("100000 tokens of context"), "{msg}");
        assert!(msg.contains("the host's KV budget holds"), "{msg}");
    }
}
