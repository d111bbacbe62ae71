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
