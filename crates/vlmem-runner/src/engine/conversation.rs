//! Multi-turn conversations whose KV cache stays between turns.

#[cfg(doc)]
use super::RequestStats;
use super::request::preprocess_image;
use super::{
    DEFAULT_MAX_NEW_TOKENS, Engine, EngineError, EngineResult, Pass, Reply, RequestImage, Timings,
};
use crate::chat::{Message, Part};
use crate::kv::KvStore;
use crate::model::CachedPrefix;
use crate::preprocess::ImageInput;
use crate::rope::MropePositions;
use crate::runner::Runner;
use crate::sample::SamplingParams;
use std::time::Instant;

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
    pub(super) engine: &'e Engine,
    /// The conversation so far (a system message first, if any).
    pub(super) messages: Vec<Message>,
    /// Its images, preprocessed, in order.
    pub(super) images: Vec<ImageInput>,
    pub(super) kv: Box<dyn KvStore + Send>,
    /// The ids whose keys and values `kv` holds.
    pub(super) cached_ids: Vec<u32>,
    /// Per cached id: whether it was computed as an image's row (an image pad of a
    /// prompt), not as a text token (a generated id equal to the pad's id).
    pub(super) cached_image_rows: Vec<bool>,
    /// The M-RoPE position the token after the cached ones takes.
    pub(super) next_position: i64,
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
