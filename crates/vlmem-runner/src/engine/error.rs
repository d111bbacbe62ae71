//! What can go wrong building an engine or running a request.

use crate::error::RunnerError;
use std::path::PathBuf;
use thiserror::Error;
use vlmem::ManagerError;
use vlmem_core::bytes::format_bytes;

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
            // Out of memory with its numbers, whichever part asked the manager.
            RunnerError::Weight {
                source: source @ ManagerError::OutOfMemory { .. },
                ..
            }
            | RunnerError::Arena {
                source: source @ ManagerError::OutOfMemory { .. },
                ..
            }
            | RunnerError::VisionCache(source @ ManagerError::OutOfMemory { .. })
            | RunnerError::KvCache(vlmem::KvError::Manager(
                source @ ManagerError::OutOfMemory { .. },
            )) => EngineError::Manager(source),
            other => EngineError::Model(other),
        }
    }
}

/// The engine's result type.
pub type EngineResult<T> = std::result::Result<T, EngineError>;
