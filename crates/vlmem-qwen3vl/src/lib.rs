//! Qwen3-VL for vlmem: what the model is (config, catalog, tensor list), what a checkpoint on
//! disk holds (safetensors headers, read without touching tensor data), how many bytes each
//! part costs (memory math), where each part should live on a machine (placement plan), and
//! synthetic checkpoints of real size (`vlmem synth`).

pub mod catalog;
pub mod checkpoint;
pub mod config;
pub mod error;
pub mod format;
pub mod kv_dtype;
pub mod math;
pub mod placement;
pub mod plan;
pub mod quantize;
pub mod synth;
pub mod tensors;

pub use config::Qwen3VlConfig;
pub use error::{Error, Result};
pub use kv_dtype::KvDtype;
