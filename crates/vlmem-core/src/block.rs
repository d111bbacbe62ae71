//! The contract between offset allocators (vlmem-alloc) and their users (tiers, pools, the
//! manager).
//!
//! Allocators hand out [`Block`]s: offsets into an arena (device memory, a host arena, a swap
//! file), never pointers, with bookkeeping kept outside the managed memory. A block carries
//! the allocator's id, a slot and a generation so that a stale (already freed), double-freed
//! or foreign block is detected and refused with a typed error; a block cannot be forged into
//! a live one.

use crate::TensorKind;
use thiserror::Error;

/// A live allocation: `len_bytes` bytes at `offset_bytes` in one allocator's arena.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[must_use = "a block that is dropped without being freed leaks its space"]
pub struct Block {
    allocator_id: u32,
    slot: u32,
    generation: u32,
    offset_bytes: u64,
    len_bytes: u64,
}

impl Block {
    /// Built by allocators only. A block made up by hand is refused by `free`: its
    /// allocator id, slot and generation must match a live allocation.
    #[doc(hidden)]
    pub const fn from_parts(
        allocator_id: u32,
        slot: u32,
        generation: u32,
        offset_bytes: u64,
        len_bytes: u64,
    ) -> Self {
        Block {
            allocator_id,
            slot,
            generation,
            offset_bytes,
            len_bytes,
        }
    }
    /// Offset of the first byte in the arena.
    pub const fn offset_bytes(&self) -> u64 {
        self.offset_bytes
    }
    /// Bytes reserved for this block (the request rounded up to the allocator's granule).
    pub const fn len_bytes(&self) -> u64 {
        self.len_bytes
    }
    /// One past the last byte.
    pub const fn end_bytes(&self) -> u64 {
        self.offset_bytes + self.len_bytes
    }
    /// The allocator that made this block.
    pub const fn allocator_id(&self) -> u32 {
        self.allocator_id
    }
    /// The allocator's slot for this block.
    pub const fn slot(&self) -> u32 {
        self.slot
    }
    /// The slot's generation when this block was made.
    pub const fn generation(&self) -> u32 {
        self.generation
    }
}

// Every allocator in the process draws its id here, whatever crate it lives in, so two
// allocators never share an id and a block always names the allocator that made it (a
// split arena routes each free by that id). A plain std atomic: loom atomics cannot live in
// a `static`, and nothing here needs model checking.
static NEXT_ALLOCATOR_ID: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(1);

/// A process-unique allocator id, never 0. Every [`OffsetAllocator`] takes its id from here
/// (never from a counter of its own), so ids cannot collide across allocator types or crates.
pub fn new_allocator_id() -> u32 {
    loop {
        let id = NEXT_ALLOCATOR_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if id != 0 {
            return id;
        }
    }
}

/// Why an allocation or a free was refused. Every variant carries the numbers.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AllocError {
    /// Not enough free space (or not enough contiguous free space) for the request.
    #[error(
        "out of memory{}: requested {requested_bytes} bytes, {free_bytes} free, largest free block {largest_free_bytes} bytes",
        kind.map(|k| format!(" in the {k} pool")).unwrap_or_default()
    )]
    OutOfMemory {
        /// The pool's kind, when the allocator serves a typed pool.
        kind: Option<TensorKind>,
        /// Bytes asked for.
        requested_bytes: u64,
        /// All free bytes.
        free_bytes: u64,
        /// The largest free contiguous run.
        largest_free_bytes: u64,
    },
    /// A request for zero bytes.
    #[error("zero-size allocation: ask for at least one byte")]
    ZeroSize,
    /// A request larger than the whole arena (or a budget).
    #[error("request of {requested_bytes} bytes exceeds the arena's {capacity_bytes} bytes")]
    TooLarge {
        /// Bytes asked for.
        requested_bytes: u64,
        /// The arena's (or budget's) capacity.
        capacity_bytes: u64,
    },
    /// The block was already freed.
    #[error("double free of block at offset {offset_bytes}")]
    DoubleFree {
        /// Offset of the block as given.
        offset_bytes: u64,
    },
    /// The block's generation does not match: it was freed and its slot reused.
    #[error("stale block at offset {offset_bytes}: it was freed and its slot reused")]
    Stale {
        /// Offset of the block as given.
        offset_bytes: u64,
    },
    /// The block was not made by this allocator, or does not describe a live block of it.
    #[error("foreign or forged block (allocator {allocator_id}, offset {offset_bytes})")]
    Foreign {
        /// The allocator id the block names.
        allocator_id: u32,
        /// Offset of the block as given.
        offset_bytes: u64,
    },
    /// An allocator was configured with impossible parameters.
    #[error("invalid allocator configuration: {0}")]
    InvalidConfig(String),
}

/// Usage of an arena at one instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ArenaUsage {
    /// The arena's capacity.
    pub capacity_bytes: u64,
    /// Bytes inside live blocks (as reserved, i.e. after rounding).
    pub in_use_bytes: u64,
    /// Free bytes.
    pub free_bytes: u64,
    /// The largest free contiguous run.
    pub largest_free_bytes: u64,
}

/// An offset allocator over one arena. Implementations are thread-safe.
pub trait OffsetAllocator: Send + Sync + std::fmt::Debug {
    /// Reserves at least `bytes` bytes.
    fn allocate(&self, bytes: u64) -> Result<Block, AllocError>;
    /// Returns a block. Stale, double-freed and foreign blocks are refused with an error and
    /// change nothing.
    fn free(&self, block: Block) -> Result<(), AllocError>;
    /// Size of the arena in bytes.
    fn capacity_bytes(&self) -> u64;
    /// A consistent view of the arena's usage.
    fn usage(&self) -> ArenaUsage;
}
