//! How a manager is built: tier capacities, per-kind budgets per tier, and the allocator that
//! manages each tier's arena.

use std::sync::Arc;
use vlmem_core::bytes::MIB;
use vlmem_core::profile::HardwareProfile;
use vlmem_core::{AllocError, OffsetAllocator, TensorKind, Tier};
use vlmem_tier::{DiskOptions, EngineConfig, FirstFitAllocator};

/// Makes the allocator of one tier's arena: `(capacity_bytes, granule_bytes)`.
pub type AllocatorFactory =
    Arc<dyn Fn(u64, u64) -> Result<Arc<dyn OffsetAllocator>, AllocError> + Send + Sync>;

/// Byte budgets: for each tier, how many bytes each kind may hold there. A kind over its
/// budget evicts only its own tensors, so one class cannot flush another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budgets {
    /// `bytes[tier.index()][kind.index()]`.
    pub bytes: [[u64; 5]; 3],
}

impl Budgets {
    /// Splits each tier's capacity by fractions per kind (in [`TensorKind::ALL`] order).
    pub fn split(capacity_bytes: [u64; 3], fractions: [[f64; 5]; 3]) -> Self {
        let mut bytes = [[0u64; 5]; 3];
        for t in 0..3 {
            for k in 0..5 {
                bytes[t][k] = (capacity_bytes[t] as f64 * fractions[t][k]) as u64;
            }
        }
        Budgets { bytes }
    }

    /// The default split. Device: weights 55%, KV 25%, activations 10%, vision 5%, scratch 5%.
    /// Host: weights 65%, KV 15%, activations 5%, vision 10%, scratch 5%. Disk: weights 50%,
    /// KV 40%, vision 10%; activations and scratch are never swapped.
    pub fn default_split(capacity_bytes: [u64; 3]) -> Self {
        Budgets::split(
            capacity_bytes,
            [
                [0.55, 0.25, 0.10, 0.05, 0.05],
                [0.65, 0.15, 0.05, 0.10, 0.05],
                [0.50, 0.40, 0.0, 0.10, 0.0],
            ],
        )
    }

    /// The budget of `kind` on `tier`.
    pub fn get(&self, tier: Tier, kind: TensorKind) -> u64 {
        self.bytes[tier.index()][kind.index()]
    }
}

/// Everything a [`crate::MemoryManager`] is built from.
#[derive(Clone)]
pub struct ManagerConfig {
    /// Bytes of the device tier (simulated in host memory where there is no GPU).
    pub device_bytes: u64,
    /// Bandwidth cap of the simulated device's link, bytes/s (`None`: uncapped).
    pub device_link_bytes_per_s: Option<u64>,
    /// Bytes of the host tier.
    pub host_bytes: u64,
    /// Bytes of swap on the disk tier.
    pub disk_bytes: u64,
    /// Disk tier options (swap directory, O_DIRECT, encryption).
    pub disk: DiskOptions,
    /// Per-kind budgets per tier.
    pub budgets: Budgets,
    /// Handle-table shards (lock striping).
    pub shards: usize,
    /// Transfer engine settings.
    pub engine: EngineConfig,
    /// Prefetches in flight at most; further hints are dropped (and counted).
    pub max_prefetches_in_flight: usize,
    /// The allocator of each tier's arena.
    pub allocator: AllocatorFactory,
    /// Overwrite a block with zeros when it is freed (deallocation, demotion, relocation), so
    /// no tensor's bytes reach the block's next owner. Costs one write of the block.
    pub zero_on_free: bool,
    /// Read every write-back to the disk tier back and compare it with its source before
    /// dropping the source (on by default: it costs one disk read per swap-out, and keeps a
    /// swap-out corrupted on its way down from losing the tensor).
    pub verify_write_backs: bool,
    /// The paged KV cache's block size, if known when the manager is built: the device and
    /// host arenas then keep a slab region of that many-byte blocks at their bottom, as large
    /// as the tier's KV budget, and KV blocks come from it (O(1), never scattered among
    /// variable tensors, never taken by another kind). A multiple of 256.
    pub kv_block_bytes: Option<u64>,
    /// Back the host arena with transparent 2 MiB pages where the kernel offers them
    /// (madvise; on by default): weights read at memory speed cross fewer TLB entries and
    /// the hardware prefetcher is not restarted at every 4 KiB boundary.
    pub host_huge_pages: bool,
    /// The most one public call of the manager waits for other threads, in all: for a busy
    /// tensor (moved, written or lent by another thread) and for room that tensors being
    /// moved may free, however deeply its reservations nest (a pin that demotes that writes
    /// back that demotes). Past it the call gives up with a typed error
    /// ([`crate::ManagerError::Busy`] or [`crate::ManagerError::OutOfMemory`]) and changes
    /// nothing. The call's own copies are not waits: it returns within this bound plus the
    /// time of its own I/O. 2 s by default.
    pub max_call_wait: std::time::Duration,
    /// The device tier on a real GPU: CUDA device `Some(ordinal)` when vlmem-tier is built
    /// with its `cuda` feature and a driver and that GPU are present; otherwise (and with
    /// `None`, the default) the simulated device in host memory.
    pub gpu_ordinal: Option<usize>,
}

impl std::fmt::Debug for ManagerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ManagerConfig")
            .field("device_bytes", &self.device_bytes)
            .field("device_link_bytes_per_s", &self.device_link_bytes_per_s)
            .field("host_bytes", &self.host_bytes)
            .field("disk_bytes", &self.disk_bytes)
            .field("disk", &self.disk)
            .field("budgets", &self.budgets)
            .field("shards", &self.shards)
            .field("engine", &self.engine)
            .field("zero_on_free", &self.zero_on_free)
            .field("verify_write_backs", &self.verify_write_backs)
            .field("kv_block_bytes", &self.kv_block_bytes)
            .field("host_huge_pages", &self.host_huge_pages)
            .field("gpu_ordinal", &self.gpu_ordinal)
            .field("max_call_wait", &self.max_call_wait)
            .finish_non_exhaustive()
    }
}

/// The default arena allocator: first fit over granules.
pub fn default_allocator() -> AllocatorFactory {
    Arc::new(|capacity_bytes, granule_bytes| {
        FirstFitAllocator::new(capacity_bytes, granule_bytes)
            .map(|a| Arc::new(a) as Arc<dyn OffsetAllocator>)
    })
}

/// [`ManagerConfig::max_call_wait`] unless told otherwise.
pub const DEFAULT_MAX_CALL_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Swap preallocated by [`ManagerConfig::from_profile`] unless told otherwise.
pub const DEFAULT_MAX_SWAP_BYTES: u64 = 8 << 30;

/// Rounds down to a multiple of 1 MiB (arenas are whole MiB so every granule divides them).
fn whole_mib(bytes: u64) -> u64 {
    bytes / MIB * MIB
}

impl ManagerConfig {
    /// Tiers of the given sizes with the default budget split.
    pub fn with_capacities(device_bytes: u64, host_bytes: u64, disk_bytes: u64) -> Self {
        let caps = [
            whole_mib(device_bytes),
            whole_mib(host_bytes),
            whole_mib(disk_bytes),
        ];
        ManagerConfig {
            device_bytes: caps[0],
            device_link_bytes_per_s: None,
            host_bytes: caps[1],
            disk_bytes: caps[2],
            disk: DiskOptions::default(),
            budgets: Budgets::default_split(caps),
            shards: 16,
            engine: EngineConfig::default(),
            max_prefetches_in_flight: 8,
            allocator: default_allocator(),
            zero_on_free: false,
            verify_write_backs: true,
            host_huge_pages: true,
            gpu_ordinal: None,
            kv_block_bytes: None,
            max_call_wait: DEFAULT_MAX_CALL_WAIT,
        }
    }

    /// Tiers sized from a hardware profile: the GPU's usable memory (simulated, with the
    /// profile's link bandwidth, when no CUDA device backs it), usable RAM, and swap of the
    /// free disk but at most [`DEFAULT_MAX_SWAP_BYTES`] (swap files are preallocated; weights
    /// on disk are read in place and need no swap).
    pub fn from_profile(profile: &HardwareProfile) -> Self {
        let mut c = ManagerConfig::with_capacities(
            profile.gpu_usable_bytes(),
            profile.host.usable_bytes(),
            profile.disk.free_bytes.min(DEFAULT_MAX_SWAP_BYTES),
        );
        c.device_link_bytes_per_s = profile.gpu.as_ref().map(|g| g.link.bytes_per_s as u64);
        c
    }
}
