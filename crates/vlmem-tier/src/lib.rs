//! Tier backends and the transfer engine of vlmem.
//!
//! Three tiers, one trait ([`TierBackend`]): L1 the device (the [simulated
//! device](MemoryTier::simulated_device) in host memory by default, CUDA behind the `cuda`
//! feature), L2 the [host arena](MemoryTier::host), L3 the [disk](DiskTier) (unlinked
//! O_DIRECT swap files with a CRC32C per unit, optional encryption at rest, and read-only
//! extents of checkpoint files). Each tier is an arena whose space an
//! [`vlmem_core::OffsetAllocator`] manages. The [`TransferEngine`] moves tensors between tiers
//! asynchronously with priorities, chunking, bounded queues and cancellation.
//!
//! All disk I/O goes through [`io::FileIo`] and all tier copies through [`TierBackend`], so
//! tests inject ENOSPC, EIO, short transfers, bit flips and delays at every I/O point
//! ([`fault`], [`io::FaultyFileIo`], [`FaultyTier`]).
//!
//! Locks: every lock in this crate is a leaf (tier tables, the link of the simulated device,
//! buffer pools, the engine's scheduler and job states); none is held across a copy or an
//! I/O.

pub mod align;
pub mod backend;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod disk;
pub mod engine;
pub mod error;
pub mod fault;
pub mod faulty;
pub mod io;
pub mod mem;
mod registry;
pub mod simple;
mod sys;

pub(crate) use vlmem_core::sync;

pub use align::{AlignedBuf, IO_ALIGN_BYTES};
pub use backend::{Reservation, TierBackend};
pub use disk::{DiskOptions, DiskTier};
pub use engine::{
    EngineConfig, EngineStats, Move, Priority, Ticket, TransferEngine, TransferReport,
};
pub use error::{Result, TierError};
pub use fault::{FaultKind, FaultPlan, FaultRule, IoPoint};
pub use faulty::FaultyTier;
pub use mem::{HostOptions, MemoryTier};
pub use simple::FirstFitAllocator;
pub use sys::{HUGE_PAGE_BYTES, HostBuffer, advise_huge_pages};

#[cfg(feature = "cuda")]
pub use cuda::detect_device;

/// The device tier to use: with feature `cuda`, GPU `ordinal` when a driver and a GPU are
/// present; otherwise (and always without the feature) the simulated device with the
/// allocator's capacity and `bandwidth_bytes_per_s` as its link cap.
#[cfg(not(feature = "cuda"))]
pub fn detect_device(
    alloc: std::sync::Arc<dyn vlmem_core::OffsetAllocator>,
    bandwidth_bytes_per_s: Option<u64>,
    _ordinal: usize,
) -> Result<std::sync::Arc<dyn TierBackend>> {
    Ok(std::sync::Arc::new(MemoryTier::simulated_device(
        alloc,
        bandwidth_bytes_per_s,
    )?))
}
