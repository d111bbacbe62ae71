//! The runner's one error type. Every failure a caller can cause (a missing file, a corrupt
//! checkpoint, an undecodable image, an out-of-vocabulary id, a prompt whose image pads do
//! not match its images) comes back as a value; nothing in the library panics on bad input.

use std::path::PathBuf;
use thiserror::Error;

/// Everything that can go wrong loading or running a Qwen3-VL checkpoint.
#[derive(Debug, Error)]
pub enum RunnerError {
    /// The checkpoint folder, its config or its safetensors headers are unusable.
    #[error(transparent)]
    Checkpoint(#[from] vlmem_qwen3vl::Error),
    /// A file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A file the runner needs is absent.
    #[error("{path}: {message}")]
    MissingFile {
        /// The file.
        path: PathBuf,
        /// What it is needed for.
        message: String,
    },
    /// A weight the model needs is not in the checkpoint.
    #[error("weight {name} is not in the checkpoint")]
    MissingTensor {
        /// The tensor name.
        name: String,
    },
    /// A weight has a shape the config does not allow.
    #[error("weight {name} has shape {found:?}, expected {expected}")]
    TensorShape {
        /// The tensor name.
        name: String,
        /// What the config implies.
        expected: String,
        /// What the file holds.
        found: Vec<usize>,
    },
    /// A weight is stored in an element type the runner cannot convert to f32.
    #[error("weight {name} is stored as {dtype}; the runner reads BF16, F16 and F32")]
    UnsupportedDtype {
        /// The tensor name.
        name: String,
        /// The stored type.
        dtype: String,
    },
    /// An input file is not a decodable PNG or JPEG image.
    #[error("{path}: not a readable image: {message}")]
    Image {
        /// The file (or `<memory>`).
        path: PathBuf,
        /// The decoder's complaint.
        message: String,
    },
    /// The tokenizer file is unusable or a text could not be encoded/decoded.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A prompt id is not a row of the embedding table.
    #[error(
        "prompt id {id} at position {position} is out of the vocabulary (vocab_size {vocab_size})"
    )]
    TokenOutOfVocab {
        /// The offending id.
        id: u32,
        /// Its index in the prompt.
        position: usize,
        /// Rows in the embedding table.
        vocab_size: usize,
    },
    /// The prompt's image pads do not match the images given.
    #[error("prompt and images disagree: {0}")]
    ImagePadMismatch(String),
    /// A request that makes no sense (empty prompt, zero-size image, ...).
    #[error("{0}")]
    BadRequest(String),
    /// The memory manager could not provide a weight (I/O error, corrupt data, no room).
    #[error("weight {name}: {source}")]
    Weight {
        /// The tensor name.
        name: String,
        /// What the manager said.
        source: vlmem::ManagerError,
    },
    /// No buffer could be had to read a weight into (a weight read on demand).
    #[error("weight {name}: no buffer to read it into: {source}")]
    WeightBuffer {
        /// The tensor name.
        name: String,
        /// Why.
        source: vlmem_tier::TierError,
    },
    /// The vision cache could not keep or lend an image's embedding.
    #[error("vision cache: {0}")]
    VisionCache(#[source] vlmem::ManagerError),
    /// A cached image embedding is not one the runner wrote.
    #[error("vision cache: malformed embedding")]
    MalformedEmbedding,
    /// The GPU kernels could not run (no driver, a launch or copy failed, a weight not in
    /// GPU memory).
    #[error("GPU: {0}")]
    Gpu(String),
    /// The step arena could not hold a decode step's activations (a sizing bug), or lending
    /// its views failed.
    #[error("step arena of a decode step at {tokens} tokens: {source}")]
    Arena {
        /// The step's context.
        tokens: usize,
        /// What the manager said.
        source: vlmem::ManagerError,
    },
    /// The paged KV pool refused (no room left in the KV budgets of the host and the disk, an
    /// I/O error while swapping).
    #[error("KV cache: {0}")]
    KvCache(#[from] vlmem::KvError),
    /// The tensor library failed (shape bugs, device errors).
    #[error("tensor computation failed: {0}")]
    Candle(#[from] candle_core::Error),
}

/// The runner's result type.
pub type Result<T, E = RunnerError> = std::result::Result<T, E>;

impl RunnerError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        RunnerError::Io {
            path: path.into(),
            source,
        }
    }
}
