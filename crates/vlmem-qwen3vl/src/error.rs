//! The crate's one error type. Messages say what is wrong and what to do.

use std::path::PathBuf;
use thiserror::Error;

/// Everything that can go wrong reading, planning or writing a Qwen3-VL checkpoint.
#[derive(Debug, Error)]
pub enum Error {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// config.json is not a Qwen3-VL config, or is malformed.
    #[error("{path}: not a usable Qwen3-VL config: {message}")]
    Config {
        /// The file (or `<catalog>`).
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A safetensors file or its index is malformed.
    #[error("{path}: malformed safetensors: {message}")]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The checkpoint folder lacks a file.
    #[error("{path}: {message}")]
    Missing {
        /// The folder or file.
        path: PathBuf,
        /// What is missing.
        message: String,
    },
    /// A model name that is not in the catalog and not a folder.
    #[error("unknown model '{0}': use one of {names} or a checkpoint folder", names = crate::catalog::NAMES.join(", "))]
    UnknownModel(String),
    /// A plan or image request that makes no sense (0x0 image, absurd sizes).
    #[error("{0}")]
    BadRequest(String),
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
    pub(crate) fn config(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::Config {
            path: path.into(),
            message: message.into(),
        }
    }
    pub(crate) fn safetensors(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::Safetensors {
            path: path.into(),
            message: message.into(),
        }
    }
}
