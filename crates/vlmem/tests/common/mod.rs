//! Helpers shared by the manager's integration tests (each test file includes what it uses).
#![allow(dead_code)]

use vlmem::{ManagerConfig, MemoryManager, TensorHandle, TensorKind, Tier};

pub const KIB: u64 = 1 << 10;
pub const MIB: u64 = 1 << 20;

/// Tiers of `caps` bytes (device, host, disk), each tier's whole capacity for every kind,
/// 4 shards, swap not preallocated.
pub fn config(caps: [u64; 3]) -> ManagerConfig {
    let mut c = ManagerConfig::with_capacities(caps[0], caps[1], caps[2]);
    for t in Tier::ALL {
        for k in TensorKind::ALL {
            c.budgets.bytes[t.index()][k.index()] = caps[t.index()];
        }
    }
    c.shards = 4;
    c.disk.preallocate = false;
    c
}

/// A manager over [`config`].
pub fn manager_with(caps: [u64; 3]) -> MemoryManager {
    MemoryManager::new(config(caps)).unwrap()
}

/// Seeded pseudo-random bytes (xorshift): a tensor's expected content.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    xorshift_bytes(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15), len)
}

/// `len` bytes of a xorshift stream started from `state` (made odd, so never zero).
pub fn xorshift_bytes(state: u64, len: usize) -> Vec<u8> {
    let mut x = state | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// The whole tensor, through `MemoryManager::read`.
pub fn read_all(m: &MemoryManager, h: TensorHandle, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    m.read(h, 0, &mut buf).unwrap();
    buf
}

/// Lines up the process's allocator id counters before a manager with a KV slab is built:
/// its split arenas take a slab pool's id and a general allocator's id next, and those two
/// must differ (a split arena routes a freed block by the id it carries). Where every
/// allocator draws from one counter this changes nothing that matters; where the slab pools
/// and the general allocators had counters of their own, it makes them meet, so the next
/// split arena gets two equal ids and a test over it shows what that breaks.
pub fn align_allocator_ids() {
    use vlmem_core::OffsetAllocator;
    let general = || {
        let a = vlmem_tier::FirstFitAllocator::new(4096, 4096).expect("allocator");
        let b = a.allocate(4096).expect("block");
        let id = b.allocator_id();
        a.free(b).expect("free");
        id
    };
    let slab = || {
        vlmem_alloc::SlabPool::new(vlmem_alloc::SlabConfig {
            block_bytes: 4096,
            capacity_blocks: 1,
            cache_blocks: 1,
            caches: 1,
            kind: None,
        })
        .expect("slab")
        .id()
    };
    let (g, s) = (general(), slab());
    // Far apart: ids that carry their kind, nothing to line up.
    if g.abs_diff(s) > 10_000 {
        return;
    }
    for _ in s..g {
        slab();
    }
    for _ in g..s {
        general();
    }
}

/// Runs `f` on its own thread and fails the test if it does not finish within `limit`.
pub fn bounded<T: Send + 'static>(
    name: &str,
    limit: std::time::Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    let worker = std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let r = f();
            let _ = tx.send(());
            r
        })
        .unwrap();
    match rx.recv_timeout(limit) {
        Ok(()) | Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => worker
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p)),
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            panic!("{name}: no answer within {limit:?} (a hang)")
        }
    }
}
