//! Qwen3-VL on candle: the numerical core of `vlmem run`.
//!
//! - [`weights`]: the [`WeightSource`] trait, the one door weights come through, and its
//!   checkpoint-file and resident implementations (bf16 on disk, f32 when staged);
//! - [`preprocess`]: the released image processor (smart_resize, PIL bicubic, normalise,
//!   merge-block patch order);
//! - [`prompt`]: `tokenizer.json` and the chat template;
//! - [`rope`]: multimodal positions (`get_rope_index`), interleaved M-RoPE, 2-D vision rotary;
//! - [`vision`]: the vision tower with DeepStack mergers;
//! - [`text`]: the decoder (GQA, QK-norm, SwiGLU or MoE, DeepStack injection, lm_head);
//! - [`kv`]: the KV cache behind [`KvStore`];
//! - [`sample`]: how each generated token is chosen (greedy, or sampled with temperature,
//!   top-k, top-p, min-p and penalties) and the checkpoint's `generation_config.json`;
//! - [`model`]: prefill and generation; [`runner`]: a checkpoint folder ready to run;
//! - [`engine`]: the [`Engine`], a checkpoint through the memory manager (tiered weights, the
//!   paged KV pool, the vision cache, step arenas) serving [`Request`]s; what `vlmem run` uses.
//!
//! All arithmetic is f32, matching the reference implementation (bf16 weights upcast to f32,
//! eager attention) to about 1e-5 on the bundled fixtures.

#![warn(missing_docs)]

pub mod chat;
pub mod engine;
pub mod error;
pub mod gpu;
pub mod kernels;
pub mod kv;
pub mod managed;
pub mod model;
pub mod nn;
pub mod preprocess;
pub mod prompt;
pub mod rope;
pub mod runner;
pub mod sample;
pub mod text;
pub mod vision;
pub mod weights;

pub use chat::{ChatTemplate, Message, Part, Role};
pub use engine::{
    DEFAULT_PREFILL_CHUNK_TOKENS, Engine, EngineBuilder, EngineError, Finished, Prompt, Reply,
    Request, RequestImage, RequestStats, Scheduler, SchedulerConfig, SchedulerStats, SeqEvent,
    Sink, SubmitError, Ticket, Timings,
};
pub use error::{Result, RunnerError};
pub use kv::{KvCache, KvStore, PagedKv};
pub use managed::{ManagedWeights, ReaderActivity, StagingReport};
pub use model::{
    Activations, FinishReason, GenerateOptions, Generation, Prefill, PrefillOptions,
    PrefillProgress, Qwen3Vl,
};
pub use preprocess::{ImageInput, PreprocessConfig};
pub use runner::Runner;
pub use sample::{GenerationConfig, Sampler, SamplingParams};
pub use text::{BatchRow, LogitsFor};
pub use weights::{CachedWeights, CheckpointWeights, WeightSource};
