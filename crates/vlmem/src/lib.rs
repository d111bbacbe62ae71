//! vlmem: the unified memory manager for running Qwen3-VL on hardware whose GPU cannot hold
//! it. One thread-safe [`MemoryManager`] owns every tensor (weights, KV cache, activations,
//! vision embeddings, scratch) and keeps each in the right tier: L1 device (GPU memory, or a
//! simulated device), L2 host RAM, L3 disk. See docs/ARCHITECTURE.md.

pub mod arena;
pub mod config;
mod entry;
pub mod error;
pub mod kv_pool;
mod manager;
pub mod policy;
pub mod readahead;
pub mod staging;
pub mod stats;
pub mod vision_cache;

pub use arena::{ArenaSlice, StepArena};
pub use config::{Budgets, ManagerConfig};
pub use error::{ManagerError, Result};
pub use kv_pool::{KvError, KvPool, KvPoolConfig, KvPoolStats, SeqId};
pub use manager::{Audit, CompactionReport, MemoryManager, PinGuard, TensorHandle, fragmentation};
pub use readahead::{Cursor, ReadAhead};
pub use staging::{StageBuf, Staged, StagingArea, StagingStats};
pub use stats::ManagerStats;
pub use vlmem_core::{TensorKind, Tier};
