//! The manager's error type. No variant means data was lost: a failed move leaves the source
//! copy intact, and the caller may retry.

use thiserror::Error;
use vlmem_core::{AllocError, TensorKind, Tier};
use vlmem_tier::TierError;

/// Why a manager operation was refused or failed.
#[derive(Debug, Error)]
pub enum ManagerError {
    /// The handle's slot was freed (and maybe reused): the tensor is gone.
    #[error(
        "stale tensor handle (slot {slot}, generation {generation}): the tensor was deallocated"
    )]
    Stale {
        /// Slot of the handle.
        slot: u32,
        /// Generation the handle carries.
        generation: u32,
    },
    /// The handle was made by another manager or by hand.
    #[error("foreign or forged tensor handle (slot {slot})")]
    Foreign {
        /// Slot of the handle.
        slot: u32,
    },
    /// A request for zero bytes.
    #[error("zero-size tensor: ask for at least one byte")]
    ZeroSize,
    /// More bytes than the tier can ever hold for the kind: its budget there, or the part of
    /// the tier's arena the kind can use (all of it, less the KV slab for other kinds),
    /// whichever is smaller (`budget_bytes` is that limit).
    #[error(
        "{kind} tensor of {requested_bytes} bytes exceeds the {tier} tier's budget of {budget_bytes} bytes for that kind"
    )]
    TooLarge {
        /// The tier.
        tier: Tier,
        /// The kind.
        kind: TensorKind,
        /// Bytes asked for.
        requested_bytes: u64,
        /// The kind's budget on the tier.
        budget_bytes: u64,
    },
    /// No room, even after evicting every unpinned tensor of the kind from the tier.
    #[error(
        "out of memory on the {tier} tier for {kind}: requested {requested_bytes} bytes, {free_bytes} free in the kind's budget, {pinned_bytes} pinned there; release pins and retry"
    )]
    OutOfMemory {
        /// The tier.
        tier: Tier,
        /// The kind.
        kind: TensorKind,
        /// Bytes asked for.
        requested_bytes: u64,
        /// Bytes left in the kind's budget on the tier.
        free_bytes: u64,
        /// Bytes of that kind pinned on the tier (cannot be evicted).
        pinned_bytes: u64,
    },
    /// The tensor is pinned (or being moved), so it cannot be deallocated now.
    #[error("tensor {id} is pinned {pins} time(s); drop its pins before deallocating")]
    Pinned {
        /// The tensor's id.
        id: u64,
        /// Pins held.
        pins: u32,
    },
    /// The call waited as long as one call may (`ManagerConfig::max_call_wait`) for another
    /// thread's move, write or lend of the tensor, and gave up; nothing changed.
    #[error(
        "tensor {id} stayed busy for {waited_ms} ms (another thread moves, writes or lends it); nothing changed, retry"
    )]
    Busy {
        /// The tensor's id.
        id: u64,
        /// How long the call waited in all.
        waited_ms: u64,
    },
    /// A computation asked, on the thread computing it, for the very value it computes (a
    /// vision embedding whose computation looks its own image up): it would wait for itself.
    #[error("re-entrant {what}: asked for by the thread computing it (it would wait for itself)")]
    Reentrant {
        /// What was asked for.
        what: String,
    },
    /// Read or write outside the tensor.
    #[error("range {offset_bytes}+{len_bytes} is outside the tensor's {tensor_bytes} bytes")]
    OutOfRange {
        /// Offset asked for.
        offset_bytes: u64,
        /// Length asked for.
        len_bytes: u64,
        /// The tensor's size.
        tensor_bytes: u64,
    },
    /// The tensor is a read-only extent of a checkpoint file.
    #[error("tensor {id} is read-only (a checkpoint extent)")]
    ReadOnly {
        /// The tensor's id.
        id: u64,
    },
    /// The tensor was never written, so it has no bytes to read or move.
    #[error("tensor {id} has never been written")]
    Uninitialized {
        /// The tensor's id.
        id: u64,
    },
    /// A write through a pin needs the pinned copy to be the tensor's only one.
    #[error("tensor {id} has copies on other tiers; write it with MemoryManager::write")]
    NotExclusive {
        /// The tensor's id.
        id: u64,
    },
    /// A tier or the transfer engine failed; the source copy is intact.
    #[error(transparent)]
    Tier(#[from] TierError),
    /// An allocator refused.
    #[error(transparent)]
    Alloc(#[from] AllocError),
    /// A configuration that cannot work.
    #[error("invalid manager configuration: {0}")]
    InvalidConfig(String),
}

/// The manager's result type.
pub type Result<T, E = ManagerError> = std::result::Result<T, E>;
