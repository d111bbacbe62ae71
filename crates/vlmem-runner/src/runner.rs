//! A checkpoint folder ready to run: config, weights, tokenizer and preprocessor together.

use crate::error::{Result, RunnerError};
use crate::model::{GenerateOptions, Generation, Qwen3Vl};
use crate::preprocess::{ImageInput, PreprocessConfig, load_image, preprocess};
use crate::prompt::ChatTokenizer;
use crate::weights::{CachedWeights, CheckpointWeights, WeightSource};
use candle_core::Device;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use vlmem_qwen3vl::checkpoint::Checkpoint;

/// A loaded checkpoint folder.
#[derive(Debug)]
pub struct Runner {
    dir: PathBuf,
    model: Qwen3Vl,
    /// `None` when the folder has no tokenizer.json (a synthesized checkpoint): prompts then
    /// come as ids and replies are reported as ids.
    tokenizer: Option<ChatTokenizer>,
    preprocess: PreprocessConfig,
}

impl Runner {
    /// Opens `dir` (config.json, model.safetensors or shards, tokenizer.json) on the CPU,
    /// keeping each weight resident after its first use. No weight data is read here.
    pub fn open(dir: &Path) -> Result<Self> {
        let device = Device::Cpu;
        let checkpoint = Checkpoint::open(dir)?;
        let weights = CachedWeights::new(CheckpointWeights::new(&checkpoint, &device)?);
        Self::with_weights(&checkpoint, Arc::new(weights), &device)
    }

    /// Opens `checkpoint` with weights from `weights` (for example a tiered source) computing
    /// on `device`.
    pub fn with_weights(
        checkpoint: &Checkpoint,
        weights: Arc<dyn WeightSource>,
        device: &Device,
    ) -> Result<Self> {
        let tokenizer = Self::open_tokenizer(checkpoint)?;
        Self::with_tokenizer(checkpoint, weights, device, tokenizer)
    }

    /// The checkpoint's tokenizer.json, checked against its config; `None` when the folder
    /// has none (it still runs from ids); a tokenizer.json that is there but broken is an
    /// error.
    pub fn open_tokenizer(checkpoint: &Checkpoint) -> Result<Option<ChatTokenizer>> {
        let path = checkpoint.dir.join("tokenizer.json");
        if path.exists() {
            Ok(Some(ChatTokenizer::from_file(&path, &checkpoint.config)?))
        } else {
            Ok(None)
        }
    }

    /// [`Runner::with_weights`] with the tokenizer already opened ([`Runner::open_tokenizer`]),
    /// e.g. to count a prompt's tokens before the memory manager is sized.
    pub fn with_tokenizer(
        checkpoint: &Checkpoint,
        weights: Arc<dyn WeightSource>,
        device: &Device,
        tokenizer: Option<ChatTokenizer>,
    ) -> Result<Self> {
        let config = checkpoint.config.clone();
        let preprocess = PreprocessConfig::for_vision(&config.vision);
        let model = Qwen3Vl::new(config, weights, device)?;
        Ok(Runner {
            dir: checkpoint.dir.clone(),
            model,
            tokenizer,
            preprocess,
        })
    }

    /// The checkpoint folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The model.
    pub fn model(&self) -> &Qwen3Vl {
        &self.model
    }

    /// The tokenizer; `None` when the folder has no tokenizer.json.
    pub fn tokenizer(&self) -> Option<&ChatTokenizer> {
        self.tokenizer.as_ref()
    }

    /// The tokenizer, or the error that says text needs one.
    fn require_tokenizer(&self) -> Result<&ChatTokenizer> {
        self.tokenizer
            .as_ref()
            .ok_or_else(|| Self::no_tokenizer(&self.dir))
    }

    /// The error of a text prompt for the checkpoint folder `dir`, which has no tokenizer.
    pub fn no_tokenizer(dir: &Path) -> RunnerError {
        RunnerError::MissingFile {
            path: dir.join("tokenizer.json"),
            message: "no tokenizer.json: text prompts need one (give --prompt-ids instead)".into(),
        }
    }

    /// Ids that end a reply (none without a tokenizer).
    pub fn stop_ids(&self) -> Vec<u32> {
        self.tokenizer
            .as_ref()
            .map(ChatTokenizer::stop_ids)
            .unwrap_or_default()
    }

    /// The image preprocessor's settings.
    pub fn preprocess_config(&self) -> &PreprocessConfig {
        &self.preprocess
    }

    /// Loads and preprocesses image files (PNG or JPEG).
    pub fn load_images(&self, paths: &[PathBuf]) -> Result<Vec<ImageInput>> {
        paths
            .iter()
            .map(|p| preprocess(&load_image(p)?, &self.preprocess))
            .collect()
    }

    /// The chat-template ids of one user turn with `images`.
    pub fn chat_ids(&self, user_text: &str, images: &[ImageInput]) -> Result<Vec<u32>> {
        Self::chat_ids_with(
            self.require_tokenizer()?,
            &self.preprocess,
            user_text,
            images,
        )
    }

    /// [`Runner::chat_ids`] before a runner exists: `tokenizer` from
    /// [`Runner::open_tokenizer`], `preprocess` as [`PreprocessConfig::for_vision`] makes it.
    pub fn chat_ids_with(
        tokenizer: &ChatTokenizer,
        preprocess: &PreprocessConfig,
        user_text: &str,
        images: &[ImageInput],
    ) -> Result<Vec<u32>> {
        let counts: Vec<usize> = images
            .iter()
            .map(|i| i.num_tokens(preprocess.merge_size))
            .collect();
        tokenizer.encode_chat(user_text, &counts)
    }

    /// Greedy generation from full prompt ids (image pads already expanded).
    pub fn generate_ids(
        &self,
        ids: &[u32],
        images: &[ImageInput],
        max_new_tokens: usize,
        on_token: &mut dyn FnMut(u32),
    ) -> Result<Generation> {
        let opts = GenerateOptions {
            max_new_tokens,
            stop_ids: self.stop_ids(),
            ..GenerateOptions::default()
        };
        self.model.generate(ids, images, &opts, on_token)
    }

    /// Decodes generated ids to text (special tokens dropped); `None` without a tokenizer.
    pub fn decode(&self, ids: &[u32]) -> Result<Option<String>> {
        self.tokenizer
            .as_ref()
            .map(|t| t.decode(ids, true))
            .transpose()
    }
}
