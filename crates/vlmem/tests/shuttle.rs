//! Shuttle: the real manager (handle table, tiers, transfer-engine threads) under randomized
//! and PCT schedules from 4 threads, each schedule ending with the ledger check: every
//! tensor's bytes, no pin left, budget counters equal to the recount, and, once every tensor
//! is freed, every tier's arena empty.
//!
//! The manager harness runs over several configurations ([`Variant`]): the plain one, a KV
//! slab (KV blocks beside the weights), `zero_on_free` with the default 1 MiB disk unit,
//! checkpoint extents with explicit swap-outs of extents and tensors on every tier, and a
//! disk too small for everything. A last harness races reads against lends and pinned
//! writes: readers never get an error, see the old or the new bytes of a whole write, and a
//! step arena's lend locks only the slices it lends.
//!
//! Run: `RUSTFLAGS="--cfg vlmem_shuttle" cargo test -p vlmem --release --test shuttle`.
#![cfg(vlmem_shuttle)]

mod common;

use vlmem::{ManagerConfig, ManagerError, MemoryManager, TensorHandle, TensorKind, Tier};
use vlmem_core::sync::Arc;
use vlmem_core::sync::thread;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const LEN: usize = 128 * KIB as usize;
/// Checkpoint extents of the extents variant: this many, of this size, back to back.
const EXTENTS: usize = 4;
const EXTENT_LEN: usize = 100_000;
const KV_BLOCK_BYTES: u64 = 4096;

fn pattern(seed: u64) -> Vec<u8> {
    (0..LEN)
        .map(|i| (seed as usize * 31 + i * 7) as u8)
        .collect()
}

/// A manager configuration of the matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Variant {
    Plain,
    /// `kv_block_bytes` set: KV blocks from a slab region, allocated beside the others.
    KvSlab,
    /// Freed blocks zeroed, on a disk of 1 MiB integrity units (tensors of 128 KiB).
    ZeroOnFree,
    /// Checkpoint extents pinned and read, and explicit swap-outs of extents and of shared
    /// tensors on every tier.
    ExtentsSwapOuts,
    /// A 1 MiB disk under 1.25 MiB of shared tensors: write-backs find it full.
    TinyDisk,
}

fn config(v: Variant) -> ManagerConfig {
    let caps = match v {
        Variant::TinyDisk => [MIB, 2 * MIB, MIB],
        _ => [MIB, 2 * MIB, 4 * MIB],
    };
    let mut c = ManagerConfig::with_capacities(caps[0], caps[1], caps[2]);
    for t in Tier::ALL {
        for k in TensorKind::ALL {
            c.budgets.bytes[t.index()][k.index()] = caps[t.index()];
        }
    }
    c.shards = 2;
    c.engine.workers = 2;
    c.disk.direct_io = false;
    c.disk.preallocate = false;
    c.disk.unit_bytes = 64 * KIB;
    match v {
        Variant::KvSlab => {
            c.kv_block_bytes = Some(KV_BLOCK_BYTES);
            for t in [Tier::Device, Tier::Host] {
                c.budgets.bytes[t.index()][TensorKind::KvCache.index()] = 64 * KIB;
            }
            common::align_allocator_ids();
        }
        Variant::ZeroOnFree => {
            c.zero_on_free = true;
            c.disk.unit_bytes = MIB;
        }
        _ => {}
    }
    c
}

fn harness(v: Variant) {
    let m = Arc::new(MemoryManager::new(config(v)).expect("manager"));
    let tiny = v == Variant::TinyDisk;
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
    // Checkpoint extents: read in place from their file.
    let dir = tempfile::tempdir().expect("dir");
    let file_bytes = common::pattern(77, EXTENTS * EXTENT_LEN);
    let extents: Arc<Vec<TensorHandle>> = Arc::new(if v == Variant::ExtentsSwapOuts {
        let path = dir.path().join("checkpoint.bin");
        std::fs::write(&path, &file_bytes).expect("checkpoint");
        (0..EXTENTS)
            .map(|i| {
                m.register_extent(
                    &path,
                    (i * EXTENT_LEN) as u64,
                    EXTENT_LEN as u64,
                    TensorKind::Weight,
                    1000 + i as u64,
                )
                .expect("extent")
            })
            .collect()
    } else {
        Vec::new()
    });
    let file_bytes = Arc::new(file_bytes);
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let m = m.clone();
            let shared = shared.clone();
            let extents = extents.clone();
            let file_bytes = file_bytes.clone();
            thread::spawn(move || {
                for op in 0..4u64 {
                    let i = ((t * 3 + op * 5) % 10) as usize;
                    let tier = [Tier::Device, Tier::Host, Tier::Disk][((t + op) % 3) as usize];
                    match (t + op) % 4 {
                        0 if !extents.is_empty() => {
                            // A checkpoint extent pinned on some tier, read through the pin,
                            // then swapped out of that tier or of the disk.
                            let x = (t + op) as usize % extents.len();
                            let want = &file_bytes[x * EXTENT_LEN..(x + 1) * EXTENT_LEN];
                            match m.pin(extents[x], tier) {
                                Ok(g) => {
                                    let mut buf = vec![0u8; EXTENT_LEN];
                                    g.read(0, &mut buf).expect("read pinned extent");
                                    assert!(buf == want, "extent {x} on {tier}");
                                }
                                Err(ManagerError::OutOfMemory { .. }) => {}
                                Err(e) => panic!("pin extent: {e}"),
                            }
                            let out = if op % 2 == 0 { Tier::Disk } else { tier };
                            m.swap_out(extents[x], out).expect("swap out extent");
                        }
                        0 | 1 => match m.pin(shared[i], tier) {
                            Ok(g) => {
                                let mut buf = vec![0u8; LEN];
                                g.read(0, &mut buf).expect("read pinned");
                                assert_eq!(buf, pattern(i as u64), "tensor {i} on {tier}");
                            }
                            Err(ManagerError::OutOfMemory { .. }) => {}
                            Err(e) => panic!("pin: {e}"),
                        },
                        2 => {
                            let id = 100 + t * 10 + op;
                            match m.allocate(LEN as u64, TensorKind::Activation, id) {
                                Ok(h) => {
                                    match m.write(h, 0, &pattern(id)) {
                                        Ok(()) => {
                                            let mut buf = vec![0u8; LEN];
                                            m.read(h, 0, &mut buf).expect("read own");
                                            assert_eq!(buf, pattern(id));
                                        }
                                        Err(ManagerError::OutOfMemory { .. }) if tiny => {}
                                        Err(e) => panic!("write own: {e}"),
                                    }
                                    m.deallocate(h).expect("free own");
                                }
                                Err(ManagerError::OutOfMemory { .. }) if tiny => {}
                                Err(e) => panic!("allocate own: {e}"),
                            }
                            if v == Variant::KvSlab {
                                // A KV block from the slab, beside the others.
                                let h = m
                                    .allocate(KV_BLOCK_BYTES, TensorKind::KvCache, id + 50)
                                    .expect("allocate KV block");
                                let kv = vec![id as u8; KV_BLOCK_BYTES as usize];
                                m.write(h, 0, &kv).expect("write KV block");
                                let mut buf = vec![0u8; KV_BLOCK_BYTES as usize];
                                m.read(h, 0, &mut buf).expect("read KV block");
                                assert_eq!(buf, kv);
                                m.deallocate(h).expect("free KV block");
                            }
                        }
                        _ if v == Variant::ExtentsSwapOuts && t % 2 == 0 => {
                            // An explicit swap-out of a shared tensor.
                            match m.swap_out(shared[i], tier) {
                                Ok(_) | Err(ManagerError::OutOfMemory { .. }) => {}
                                Err(e) => panic!("swap out: {e}"),
                            }
                        }
                        _ if t % 2 == 0 => match m.evict(Tier::Device, 256 * KIB) {
                            Ok(_) => {}
                            Err(ManagerError::OutOfMemory { .. }) if tiny => {}
                            Err(e) => panic!("evict: {e}"),
                        },
                        _ => {
                            // Compaction of every tier under the others' pins, moves and
                            // frees.
                            for tier in Tier::ALL {
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
    for (x, &h) in extents.iter().enumerate() {
        let mut buf = vec![0u8; EXTENT_LEN];
        m.read(h, 0, &mut buf).expect("final read of an extent");
        assert!(
            buf == file_bytes[x * EXTENT_LEN..(x + 1) * EXTENT_LEN],
            "ledger: extent {x}"
        );
        // The checkpoint file stays the extent's disk copy.
        let (tiers, _) = m.residency(h).expect("residency");
        assert!(
            tiers.contains(&Tier::Disk),
            "extent {x} lost its file copy: {tiers:?}"
        );
    }
    let s = m.stats();
    assert_eq!(s.tensors, (shared.len() + extents.len()) as u64);
    assert_eq!(s.pins, 0);
    assert_eq!(s.resident, s.charged);
    let a = m.audit();
    assert_eq!((a.overlaps, a.entries_without_copy), (0, 0), "{a:?}");
    // Everything freed: every byte of every tier is back (zeroed or not, slab or not).
    for &h in shared.iter().chain(extents.iter()) {
        m.deallocate(h).expect("free");
    }
    let s = m.stats();
    assert_eq!(
        s.charged.bytes, [[0; 5]; 3],
        "charged after freeing everything"
    );
    for tier in Tier::ALL {
        let u = m.tier_usage(tier);
        assert_eq!(
            u.in_use_bytes, 0,
            "{v:?}: {tier} bytes in use after freeing everything"
        );
    }
}

#[test]
fn shuttle_manager_random_1000_schedules() {
    shuttle::check_random(|| harness(Variant::Plain), 1000);
}

#[test]
fn shuttle_manager_pct_300_schedules() {
    shuttle::check_pct(|| harness(Variant::Plain), 300, 3);
}

#[test]
fn shuttle_manager_with_a_kv_slab_random_500_schedules() {
    shuttle::check_random(|| harness(Variant::KvSlab), 500);
}

#[test]
fn shuttle_manager_with_zero_on_free_random_500_schedules() {
    shuttle::check_random(|| harness(Variant::ZeroOnFree), 500);
}

#[test]
fn shuttle_manager_with_extents_and_swap_outs_random_500_schedules() {
    shuttle::check_random(|| harness(Variant::ExtentsSwapOuts), 500);
}

#[test]
fn shuttle_manager_with_extents_and_swap_outs_pct_200_schedules() {
    shuttle::check_pct(|| harness(Variant::ExtentsSwapOuts), 200, 3);
}

#[test]
fn shuttle_manager_on_a_tiny_disk_random_500_schedules() {
    shuttle::check_random(|| harness(Variant::TinyDisk), 500);
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

/// Reads racing lends and pinned writes. Thread A holds a pin on a single-copy host tensor
/// and writes it whole through the pin, then rewrites it through a lend that fills it in
/// two halves with a yield between; thread B reads it with `MemoryManager::read`, thread C
/// through a pin of its own. Thread D lends slices s0 and s2 of a step arena and fills them
/// in two steps; while the lend runs, a thread it starts (and joins inside the lend) reads
/// s1, which is not lent: that read must not wait for the lend. Thread E reads s0 and s1.
/// Every read succeeds (no `Busy`, no `Uninitialized` for a tensor written before) and sees
/// the bytes of one whole write: old or new, never a mix.
fn lend_harness() {
    const N: usize = 8 * KIB as usize;
    const SLICE: u64 = 256;
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
    let h = m
        .allocate_on(N as u64, TensorKind::Activation, 1, Tier::Host)
        .expect("allocate");
    m.write(h, 0, &[1u8; N]).expect("first write");
    let arena = Arc::new(
        vlmem::StepArena::new(&m, TensorKind::Activation, Tier::Host, 64 * KIB).expect("arena"),
    );
    let s: Vec<_> = (0..3)
        .map(|i| {
            let s = arena.alloc(SLICE).expect("slice");
            let v = 10.0f32 + i as f32;
            let bytes: Vec<u8> = (0..SLICE / 4).flat_map(|_| v.to_le_bytes()).collect();
            arena.write(&s, 0, &bytes).expect("slice write");
            s
        })
        .collect();
    let (s0, s1, s2) = (s[0], s[1], s[2]);
    let uniform = |buf: &[u8], allowed: &[u8], what: &str| {
        assert!(
            allowed.contains(&buf[0]) && buf.iter().all(|&b| b == buf[0]),
            "{what}: a mix of writes or foreign bytes: first {}, {} bytes differ",
            buf[0],
            buf.iter().filter(|&&b| b != buf[0]).count()
        );
    };
    let floats = |buf: &[u8]| -> Vec<f32> {
        buf.chunks(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    };
    let mut threads = Vec::new();
    // A: a pinned writer.
    threads.push({
        let m = m.clone();
        thread::spawn(move || {
            let g = m.pin(h, Tier::Host).expect("pin");
            g.write(0, &[2u8; N]).expect("pinned write");
            g.with_bytes_mut(0, N as u64, |b| {
                b[..N / 2].fill(3);
                thread::yield_now();
                b[N / 2..].fill(3);
            })
            .expect("lend");
        })
    });
    // B: plain reads.
    threads.push({
        let m = m.clone();
        thread::spawn(move || {
            for _ in 0..2 {
                let mut buf = vec![0u8; N];
                m.read(h, 0, &mut buf).expect("read during a pinned write");
                uniform(&buf, &[1, 2, 3], "MemoryManager::read");
            }
        })
    });
    // C: reads through a pin of its own.
    threads.push({
        let m = m.clone();
        thread::spawn(move || {
            let g = m.pin(h, Tier::Host).expect("pin");
            for _ in 0..2 {
                let mut buf = vec![0u8; N];
                g.read(0, &mut buf)
                    .expect("pinned read during a pinned write");
                uniform(&buf, &[1, 2, 3], "PinGuard::read");
            }
        })
    });
    // D: lends s0 and s2; a reader of s1 runs to its end inside the lend.
    threads.push({
        let arena = arena.clone();
        thread::spawn(move || {
            arena
                .with_f32(&[s2, s0], |v| {
                    v[0].fill(20.0);
                    thread::yield_now();
                    let reader = {
                        let arena = arena.clone();
                        thread::spawn(move || {
                            let mut buf = vec![0u8; SLICE as usize];
                            arena
                                .read(&s1, 0, &mut buf)
                                .expect("read of an unlent slice");
                            buf
                        })
                    };
                    let buf = reader.join().expect("reader of s1");
                    assert!(floats(&buf).iter().all(|&x| x == 11.0), "s1 changed");
                    v[1].fill(20.0);
                })
                .expect("with_f32");
        })
    });
    // E: reads a lent slice and an unlent one.
    threads.push({
        let arena = arena.clone();
        thread::spawn(move || {
            let mut buf = vec![0u8; SLICE as usize];
            arena.read(&s0, 0, &mut buf).expect("read of a lent slice");
            let f = floats(&buf);
            assert!(
                (f[0] == 10.0 || f[0] == 20.0) && f.iter().all(|&x| x == f[0]),
                "s0: a mix of writes {f:?}"
            );
            arena
                .read(&s1, 0, &mut buf)
                .expect("read of an unlent slice");
            assert!(floats(&buf).iter().all(|&x| x == 11.0), "s1 changed");
        })
    });
    for t in threads {
        t.join().expect("thread");
    }
    let mut buf = vec![0u8; N];
    m.read(h, 0, &mut buf).expect("final read");
    uniform(&buf, &[3], "final");
    for (s, want) in [(s0, 20.0), (s1, 11.0), (s2, 20.0)] {
        let mut buf = vec![0u8; SLICE as usize];
        arena.read(&s, 0, &mut buf).expect("final slice read");
        assert!(
            floats(&buf).iter().all(|&x| x == want),
            "slice at {}",
            s.offset_bytes()
        );
    }
    drop(arena);
    m.deallocate(h).expect("free");
    let st = m.stats();
    assert_eq!((st.tensors, st.pins), (0, 0));
}

#[test]
fn shuttle_reads_racing_lends_and_pinned_writes_random_1000_schedules() {
    shuttle::check_random(lend_harness, 1000);
}

#[test]
fn shuttle_reads_racing_lends_and_pinned_writes_pct_300_schedules() {
    shuttle::check_pct(lend_harness, 300, 3);
}
