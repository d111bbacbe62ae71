//! The shared vocabulary of vlmem.
//!
//! Every other crate speaks in these terms: what a tensor is for ([`TensorKind`]), where its
//! bytes live ([`Tier`]), how many bytes ([`bytes`]), what the machine can hold and move
//! ([`profile`]), and which lock and atomic types are in use ([`sync`], switched to loom
//! under `--cfg vlmem_loom`).

pub mod block;
pub mod bytes;
pub mod kind;
pub mod profile;
pub mod sync;

pub use block::{AllocError, ArenaUsage, Block, OffsetAllocator, new_allocator_id};
pub use kind::{TensorKind, Tier};
