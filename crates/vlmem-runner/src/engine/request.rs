//! What a request asks ([`Request`]: a prompt, images, sampling) and what it gets back
//! ([`Reply`]), and a request prepared: its prompt as ids, its images preprocessed.

#[cfg(doc)]
use super::{Conversation, Engine};
use super::{DEFAULT_MAX_NEW_TOKENS, EngineError, EngineResult};
use crate::chat::Message;
use crate::model::{Activations, FinishReason};
use crate::preprocess::{ImageInput, PreprocessConfig, load_image, preprocess};
use crate::prompt::ChatTokenizer;
use crate::runner::Runner;
use crate::sample::SamplingParams;
use std::path::{Path, PathBuf};
use std::time::Duration;
use vlmem::KvPoolStats;

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
    pub(super) fn prompt_ids(&self) -> Option<&[u32]> {
        match &self.prompt {
            Prompt::Ids(ids) => Some(ids),
            _ => None,
        }
    }

    /// The preprocessed images when every image is.
    pub(super) fn preprocessed_images(&self) -> Option<Vec<ImageInput>> {
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

/// The prompt's tokens and `max_new_tokens` (saturating).
pub(super) fn context_of(prepared: &Request, max_new_tokens: usize) -> u64 {
    let prompt = prepared.prompt_ids().map_or(0, <[u32]>::len);
    prompt.saturating_add(max_new_tokens) as u64
}

/// One image of a request, preprocessed.
pub(super) fn preprocess_image(
    image: &RequestImage,
    cfg: &PreprocessConfig,
) -> EngineResult<ImageInput> {
    Ok(match image {
        RequestImage::Path(p) => preprocess(&load_image(p)?, cfg)?,
        RequestImage::Rgb(img) => preprocess(img, cfg)?,
        RequestImage::Preprocessed(x) => x.clone(),
    })
}

/// `request` with its prompt as ids and its images preprocessed.
pub(super) fn prepare_with(
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
