//! Shared helpers of the integration tests.
#![allow(dead_code)]

use std::sync::Arc;
use vlmem_tier::io::{FaultyFileIo, FileIo, RealFileIo};
use vlmem_tier::{
    DiskOptions, DiskTier, EngineConfig, FaultPlan, FirstFitAllocator, HostOptions, MemoryTier,
    TierBackend, TransferEngine,
};

pub const MIB: u64 = 1 << 20;

pub fn alloc(capacity_bytes: u64) -> Arc<FirstFitAllocator> {
    Arc::new(FirstFitAllocator::new(capacity_bytes, 4096).expect("allocator"))
}

pub fn host(capacity_bytes: u64) -> Arc<MemoryTier> {
    Arc::new(MemoryTier::host(alloc(capacity_bytes), HostOptions::default()).expect("host"))
}

pub fn device(capacity_bytes: u64, cap: Option<u64>) -> Arc<MemoryTier> {
    Arc::new(MemoryTier::simulated_device(alloc(capacity_bytes), cap).expect("device"))
}

pub fn disk_in(dir: &std::path::Path, capacity_bytes: u64, io: Arc<dyn FileIo>) -> DiskTier {
    let opts = DiskOptions {
        dir: Some(dir.to_path_buf()),
        ..DiskOptions::default()
    };
    DiskTier::with_io(alloc(capacity_bytes), opts, io).expect("disk")
}

/// A disk tier in a fresh private directory under /work/tgt or the temp dir, with faults.
pub fn faulty_disk(capacity_bytes: u64, opts: DiskOptions) -> (DiskTier, Arc<FaultPlan>) {
    let plan = Arc::new(FaultPlan::new());
    let io = Arc::new(FaultyFileIo::new(Arc::new(RealFileIo), plan.clone()));
    let d = DiskTier::with_io(alloc(capacity_bytes), opts, io).expect("disk");
    (d, plan)
}

/// Deterministic test bytes (a seeded xorshift), different per `seed`.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

pub fn engine(tiers: &[Arc<dyn TierBackend>]) -> TransferEngine {
    TransferEngine::new(tiers, EngineConfig::default()).expect("engine")
}

pub fn read_all(t: &dyn TierBackend, res: &vlmem_tier::Reservation) -> Vec<u8> {
    let mut v = vec![0u8; res.len_bytes() as usize];
    t.read(res, 0, &mut v).expect("read back");
    v
}
