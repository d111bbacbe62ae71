//! Shuttle: the real manager (handle table, tiers, transfer-engine threads) under randomized
//! and PCT schedules from 4 threads, each schedule ending with the ledger check: every
//! tensor's bytes, no pin left, budget counters equal to the recount.
//!
//! Run: `RUSTFLAGS="--cfg vlmem_shuttle" cargo test -p vlmem --release --test shuttle`.
#![cfg(vlmem_shuttle)]

use vlmem::{ManagerConfig, ManagerError, MemoryManager, TensorKind, Tier};
use vlmem_core::sync::Arc;
use vlmem_core::sync::thread;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const LEN: usize = 128 * KIB as usize;

fn pattern(seed: u64) -> Vec<u8> {
    (0..LEN)
        .map(|i| (seed as usize * 31 + i * 7) as u8)
        .collect()
}

fn harness() {
    let mut c = ManagerConfig::with_capacities(MIB, 2 * MIB, 4 * MIB);
    for t in Tier::ALL {
        for k in TensorKind::ALL {
            c.budgets.bytes[t.index()][k.index()] = [MIB, 2 * MIB, 4 * MIB][t.index()];
        }
    }
    c.shards = 2;
    c.engine.workers = 2;
    c.disk.direct_io = false;
    c.disk.preallocate = false;
    c.disk.unit_bytes = 64 * KIB;
    let m = Arc::new(MemoryManager::new(c).expect("manager"));
    // 10 shared tensors of 128 KiB: more than the device (1 MiB = 8), less than the host.
    let shared: Arc<Vec<_>> = Arc::new(
        (0..10u64)
            .map(|i| {
                let h = m
                    .allocate(LEN as u64, TensorKind::Weight, i)
                    .expect("allocate");
                m.write(h, 0, &pattern(i)).expect("write");
                h
            })
            .collect(),
    );
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let m = m.clone();
            let shared = shared.clone();
            thread::spawn(move || {
                for op in 0..4u64 {
                    let i = ((t * 3 + op * 5) % 10) as usize;
                    match (t + op) % 4 {
                        0 | 1 => {
                            let tier =
                                [Tier::Device, Tier::Host, Tier::Disk][((t + op) % 3) as usize];
                            match m.pin(shared[i], tier) {
                                Ok(g) => {
                                    let mut buf = vec![0u8; LEN];
                                    g.read(0, &mut buf).expect("read pinned");
                                    assert_eq!(buf, pattern(i as u64), "tensor {i} on {tier}");
                                }
                                Err(ManagerError::OutOfMemory { .. }) => {}
                                Err(e) => panic!("pin: {e}"),
                            }
                        }
                        2 => {
                            let id = 100 + t * 10 + op;
                            let h = m
                                .allocate(LEN as u64, TensorKind::Activation, id)
                                .expect("allocate own");
                            m.write(h, 0, &pattern(id)).expect("write own");
                            let mut buf = vec![0u8; LEN];
                            m.read(h, 0, &mut buf).expect("read own");
                            assert_eq!(buf, pattern(id));
                            m.deallocate(h).expect("free own");
                        }
                        _ if t % 2 == 0 => {
                            m.evict(Tier::Device, 256 * KIB).expect("evict");
                        }
                        _ => {
                            // Compaction of the host and device arenas under the others'
                            // pins, moves and frees.
                            for tier in [Tier::Host, Tier::Device] {
                                let r = m.compact_tier(tier).expect("compact");
                                assert_eq!(r.verify_failures, 0);
                            }
                        }
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("thread");
    }
    for (i, &h) in shared.iter().enumerate() {
        let mut buf = vec![0u8; LEN];
        m.read(h, 0, &mut buf).expect("final read");
        assert_eq!(buf, pattern(i as u64), "ledger: tensor {i}");
    }
    let s = m.stats();
    assert_eq!(s.tensors, 10);
    assert_eq!(s.pins, 0);
    assert_eq!(s.resident, s.charged);
    assert_eq!(m.audit().overlaps, 0);
}

#[test]
fn shuttle_manager_random_1000_schedules() {
    shuttle::check_random(harness, 1000);
}

#[test]
fn shuttle_manager_pct_300_schedules() {
    shuttle::check_pct(harness, 300, 3);
}

/// The paged KV pool: 3 threads start sequences over one shared system prompt (sharing
/// sealed blocks), append, read back and finish, with room for fewer blocks than they need
/// (whole-sequence swaps). The ledger: every token's KV reads back, and at the end no block,
/// reference or sequence is left.
fn kv_harness() {
    use vlmem::{KvPool, KvPoolConfig};
    const BPT: u64 = 64;
    let mut c = ManagerConfig::with_capacities(MIB, 2 * MIB, 4 * MIB);
    for t in Tier::ALL {
        for k in TensorKind::ALL {
            c.budgets.bytes[t.index()][k.index()] = [MIB, 2 * MIB, 4 * MIB][t.index()];
        }
    }
    // Room for 4 blocks of 4 tokens x 64 bytes on the host.
    c.budgets.bytes[Tier::Host.index()][TensorKind::KvCache.index()] = 4 * 4 * BPT;
    // KV blocks from the slab region of the host arena.
    c.kv_block_bytes = Some(4 * BPT);
    c.shards = 2;
    c.engine.workers = 2;
    c.disk.direct_io = false;
    c.disk.preallocate = false;
    c.disk.unit_bytes = 64 * KIB;
    let m = MemoryManager::new(c).expect("manager");
    let pool = Arc::new(
        KvPool::new(
            m,
            KvPoolConfig {
                block_tokens: 4,
                bytes_per_token: BPT,
                compute_tier: Tier::Host,
            },
        )
        .expect("pool"),
    );
    let kv = |pos: usize, tok: u32| -> Vec<u8> {
        (0..BPT as usize)
            .map(|i| (pos * 13 + tok as usize * 7 + i) as u8)
            .collect()
    };
    let threads: Vec<_> = (0..3u32)
        .map(|t| {
            let pool = pool.clone();
            thread::spawn(move || {
                let mut prompt: Vec<u32> = (0..9).collect();
                prompt.push(100 + t);
                let (s, reused) = pool.start(&prompt).expect("start");
                let mut bytes = Vec::new();
                for (i, &tok) in prompt.iter().enumerate().skip(reused) {
                    bytes.extend(kv(i, tok));
                }
                pool.append(s, &prompt[reused..], &bytes).expect("append");
                let mut buf = vec![0u8; BPT as usize];
                for (i, &tok) in prompt.iter().enumerate() {
                    pool.read_token(s, i, &mut buf).expect("read");
                    assert_eq!(buf, kv(i, tok), "thread {t} token {i}");
                }
                pool.finish(s).expect("finish");
            })
        })
        .collect();
    for t in threads {
        t.join().expect("thread");
    }
    let s = pool.stats();
    assert_eq!((s.sequences, s.blocks, s.block_refs), (0, 0, 0), "{s:?}");
}

#[test]
fn shuttle_kv_pool_random_500_schedules() {
    shuttle::check_random(kv_harness, 500);
}

/// A step arena shared by 3 threads: each allocates, writes and reads back its slices while
/// the others do (pinned writes make the tensor busy in turn); no slice is overwritten.
fn arena_harness() {
    let mut c = ManagerConfig::with_capacities(MIB, 2 * MIB, 4 * MIB);
    for t in Tier::ALL {
        for k in TensorKind::ALL {
            c.budgets.bytes[t.index()][k.index()] = [MIB, 2 * MIB, 4 * MIB][t.index()];
        }
    }
    c.shards = 2;
    c.engine.workers = 2;
    c.disk.direct_io = false;
    c.disk.preallocate = false;
    c.disk.unit_bytes = 64 * KIB;
    let m = MemoryManager::new(c).expect("manager");
    let a = Arc::new(
        vlmem::StepArena::new(&m, TensorKind::Activation, Tier::Host, 64 * KIB).expect("arena"),
    );
    let threads: Vec<_> = (0..3u8)
        .map(|t| {
            let a = a.clone();
            thread::spawn(move || {
                let mut mine = Vec::new();
                for i in 0..3u8 {
                    let s = a.alloc(100 + u64::from(t) * 10).expect("alloc");
                    a.write(&s, 0, &vec![t * 10 + i; s.len_bytes() as usize])
                        .expect("write");
                    mine.push((s, t * 10 + i));
                }
                // An f32 view lent in place (the arena's entry is busy meanwhile: the other
                // threads' reads and views wait for it).
                let f = a.alloc(16).expect("alloc");
                a.with_f32(&[f], |v| v[0].fill(f32::from(t))).expect("view");
                for (s, v) in mine {
                    let mut buf = vec![0u8; s.len_bytes() as usize];
                    a.read(&s, 0, &mut buf).expect("read");
                    assert!(buf.iter().all(|&b| b == v), "slice overwritten");
                }
                let kept = a
                    .with_f32(&[f], |v| v[0].iter().all(|&e| e == f32::from(t)))
                    .expect("view");
                assert!(kept, "view overwritten");
            })
        })
        .collect();
    for t in threads {
        t.join().expect("thread");
    }
    drop(a);
    let s = m.stats();
    assert_eq!((s.tensors, s.pins), (0, 0));
}

#[test]
fn shuttle_step_arena_random_300_schedules() {
    shuttle::check_random(arena_harness, 300);
}
