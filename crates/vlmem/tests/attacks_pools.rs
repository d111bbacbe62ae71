//! Attacks on the KV pool, the staging area and the vision cache: absurd configurations,
//! sharing while swapped, swaps, reads and finishes racing across threads, one sequence used
//! from two threads, crafted prefix-hash collisions, budgets of one block, a manager that
//! refuses or whose disk fills mid-swap, out-of-order producers, several consumers,
//! abandoned and failed fills, capacities of 0, 1 and `u64::MAX`, entries larger than the
//! cache's budget, concurrent clears, panics in every closure and computations that fail.
//! Every test body runs under a watchdog, so a hang fails instead of stalling the suite.

mod common;

use common::{KIB, MIB};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, mpsc};
use std::time::Duration;
use vlmem::vision_cache::VisionCache;
use vlmem::{
    KvError, KvPool, KvPoolConfig, ManagerConfig, ManagerError, MemoryManager, SeqId, StageBuf,
    StagingArea, TensorKind, Tier,
};

/// Runs `f` on its own thread; fails (instead of hanging) when it takes more than `secs`.
/// A panic inside `f` fails the test with its message.
fn watchdog<T: Send + 'static>(what: &str, secs: u64, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    let h = std::thread::spawn(move || {
        let r = f();
        let _ = tx.send(());
        r
    });
    match rx.recv_timeout(Duration::from_secs(secs)) {
        Ok(()) => h.join().unwrap(),
        Err(mpsc::RecvTimeoutError::Disconnected) => match h.join() {
            Ok(_) => unreachable!(),
            Err(p) => std::panic::resume_unwind(p),
        },
        Err(mpsc::RecvTimeoutError::Timeout) => {
            panic!("{what}: no return within {secs} s (a hang)")
        }
    }
}

// ---------------------------------------------------------------------------------------
// KV pool
// ---------------------------------------------------------------------------------------

const BT: u32 = 4;
const BPT: u64 = 64;
const BLOCK: u64 = BT as u64 * BPT;

/// A manager whose `compute` tier has a KV budget of `blocks` 256-byte blocks (everything
/// else generous), disk without O_DIRECT.
fn kv_manager(compute: Tier, blocks: u64, tweak: impl FnOnce(&mut ManagerConfig)) -> MemoryManager {
    let mut c = common::config([4 * MIB, 16 * MIB, 64 * MIB]);
    c.budgets.bytes[compute.index()][TensorKind::KvCache.index()] = blocks * BLOCK;
    c.disk.direct_io = false;
    tweak(&mut c);
    MemoryManager::new(c).unwrap()
}

fn kv_pool(m: &MemoryManager, compute: Tier) -> KvPool {
    KvPool::new(
        m.clone(),
        KvPoolConfig {
            block_tokens: BT,
            bytes_per_token: BPT,
            compute_tier: compute,
        },
    )
    .unwrap()
}

fn kv(position: usize, token: u32) -> Vec<u8> {
    common::xorshift_bytes((position as u64) << 32 | u64::from(token), BPT as usize)
}

fn append(p: &KvPool, seq: SeqId, from: usize, tokens: &[u32]) -> Result<(), KvError> {
    let bytes: Vec<u8> = tokens
        .iter()
        .enumerate()
        .flat_map(|(i, &t)| kv(from + i, t))
        .collect();
    p.append(seq, tokens, &bytes)
}

fn read_back(p: &KvPool, seq: SeqId, tokens: &[u32]) {
    let mut all = vec![0u8; tokens.len() * BPT as usize];
    p.read_range(seq, 0, &mut all).unwrap();
    for (i, chunk) in all.chunks(BPT as usize).enumerate() {
        assert_eq!(chunk, kv(i, tokens[i]).as_slice(), "token {i}");
    }
}

/// [`read_back`] that returns the pool's error instead of failing on it.
fn try_read_back(p: &KvPool, seq: SeqId, tokens: &[u32]) -> Result<(), KvError> {
    let mut all = vec![0u8; tokens.len() * BPT as usize];
    p.read_range(seq, 0, &mut all)?;
    for (i, chunk) in all.chunks(BPT as usize).enumerate() {
        assert_eq!(chunk, kv(i, tokens[i]).as_slice(), "token {i}");
    }
    Ok(())
}

/// Blocks of the pool that have a copy on `tier` now (over the given live sequences; a
/// shared block counted once).
fn blocks_on(p: &KvPool, m: &MemoryManager, seqs: &[SeqId], tier: Tier) -> u64 {
    let mut handles = std::collections::HashSet::new();
    for &s in seqs {
        for h in p.block_handles(s).unwrap() {
            handles.insert(h);
        }
    }
    handles
        .into_iter()
        .filter(|&h| m.residency(h).unwrap().0.contains(&tier))
        .count() as u64
}

/// KV that depends on the token alone, distinct for every token.
fn tok_kv(token: u32) -> Vec<u8> {
    common::xorshift_bytes(u64::from(token) << 1 | 1, BPT as usize)
}

/// FNV-1a chained as the pool documents it ("the hash of the previous block and this
/// block's token ids"), to craft salts that collide with another namespace's blocks.
fn chain_hash(previous: u64, tokens: &[u32]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ previous;
    for t in tokens {
        for b in t.to_le_bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01B3);
        }
    }
    h
}

/// "A block is counted on the compute tier exactly when it is there" and "the pool keeps at
/// most budget / block bytes blocks on the compute tier": one sequence longer than the
/// budget (no other sequence to swap out) makes the manager evict the sequence's own early
/// blocks. The pool's count must follow where the manager keeps them.
#[test]

fn kv_a_sequence_longer_than_the_budget_is_counted_where_the_manager_keeps_it() {
    watchdog("long sequence", 30, || {
        let m = kv_manager(Tier::Host, 2, |_| {});
        let p = kv_pool(&m, Tier::Host);
        assert_eq!(p.max_resident_blocks(), 2);
        let tokens: Vec<u32> = (1..=20).collect(); // 5 blocks
        let (s, _) = p.start(&tokens).unwrap();
        append(&p, s, 0, &tokens).unwrap();
        p.check().unwrap();
        let on_tier = blocks_on(&p, &m, &[s], Tier::Host);
        let st = p.stats();
        assert!(
            st.resident_blocks <= p.max_resident_blocks(),
            "{} counted on the tier, room for {}",
            st.resident_blocks,
            p.max_resident_blocks()
        );
        assert_eq!(
            st.resident_blocks, on_tier,
            "counted vs on the tier: {st:?}"
        );
        read_back(&p, s, &tokens);
        p.finish(s).unwrap();
    });
}

/// The same promise when something else makes room on the tier: an eviction the manager is
/// asked for directly (another component under memory pressure) moves idle KV blocks down;
/// the pool must not go on counting them on the tier.
#[test]

fn kv_blocks_evicted_by_the_manager_are_not_counted_on_the_tier() {
    watchdog("external eviction", 30, || {
        let m = kv_manager(Tier::Host, 8, |_| {});
        let p = kv_pool(&m, Tier::Host);
        let tokens: Vec<u32> = (1..=12).collect();
        let (s, _) = p.start(&tokens).unwrap();
        append(&p, s, 0, &tokens).unwrap();
        m.evict(Tier::Host, 16 * MIB).unwrap();
        let on_tier = blocks_on(&p, &m, &[s], Tier::Host);
        assert_eq!(p.stats().resident_blocks, on_tier, "{:?}", p.stats());
        read_back(&p, s, &tokens);
        p.finish(s).unwrap();
    });
}

/// The pool computes on the host tier (its blocks are written through
/// `MemoryManager::write`, which lands on the host): another compute tier is refused with
/// `InvalidConfig`, never a pool that counts blocks on a tier they are not on. On the host,
/// a block counted there is there, and a swap-out frees the bytes the sequence holds there.
#[test]
fn kv_blocks_on_a_device_compute_tier_are_counted_only_while_there() {
    watchdog("device compute tier", 30, || {
        for tier in [Tier::Device, Tier::Disk] {
            let m = kv_manager(tier, 8, |_| {});
            match KvPool::new(
                m.clone(),
                KvPoolConfig {
                    block_tokens: BT,
                    bytes_per_token: BPT,
                    compute_tier: tier,
                },
            ) {
                Err(KvError::InvalidConfig(msg)) => {
                    assert!(msg.contains("host"), "{tier}: {msg}")
                }
                other => panic!("compute tier {tier}: {:?}", other.map(|_| ())),
            }
        }
        let m = kv_manager(Tier::Host, 8, |_| {});
        let p = kv_pool(&m, Tier::Host);
        let tokens: Vec<u32> = (1..=12).collect(); // 3 blocks
        let (s, _) = p.start(&tokens).unwrap();
        append(&p, s, 0, &tokens).unwrap();
        p.check().unwrap();
        let on_host = blocks_on(&p, &m, &[s], Tier::Host);
        let st = p.stats();
        assert_eq!((st.resident_blocks, on_host), (3, 3), "{st:?}");
        assert_eq!(
            p.swap_out(s).unwrap(),
            3 * BLOCK,
            "the bytes freed on the host"
        );
        assert_eq!(blocks_on(&p, &m, &[s], Tier::Host), 0);
        assert_eq!(p.stats().resident_blocks, 0);
        p.check().unwrap();
        read_back(&p, s, &tokens);
        p.finish(s).unwrap();
    });
}

/// Budgets of exactly one block: two sequences take turns, each use swapping the other out;
/// every byte comes back, the ledger holds after every step and the pool never counts more
/// than one block on the tier between calls.
#[test]
fn kv_a_budget_of_exactly_one_block_serves_two_sequences_byte_exact() {
    watchdog("one-block budget", 60, || {
        let m = kv_manager(Tier::Host, 1, |_| {});
        let p = kv_pool(&m, Tier::Host);
        assert_eq!(p.max_resident_blocks(), 1);
        let a_tok: Vec<u32> = (100..103).collect();
        let b_tok: Vec<u32> = (200..203).collect();
        let (a, _) = p.start(&a_tok).unwrap();
        let (b, _) = p.start(&b_tok).unwrap();
        for round in 0..6 {
            for (s, t) in [(a, &a_tok), (b, &b_tok)] {
                if round == 0 {
                    append(&p, s, 0, t).unwrap();
                }
                read_back(&p, s, t);
                p.check().unwrap();
                let st = p.stats();
                assert!(st.resident_blocks <= 1, "round {round}: {st:?}");
                assert_eq!(st.resident_blocks, blocks_on(&p, &m, &[a, b], Tier::Host));
            }
        }
        p.finish(a).unwrap();
        p.finish(b).unwrap();
        let st = p.stats();
        assert_eq!((st.blocks, st.resident_blocks), (0, 0));
        let ms = m.stats();
        for t in Tier::ALL {
            assert_eq!(ms.charged.get(t, TensorKind::KvCache), 0, "{t}");
        }
    });
}

/// A sequence that takes a sealed block by reference and reads it while the block's owner
/// is being swapped out by another thread: once both calls returned, the pool's count
/// agrees with the manager (`check` is exact while no call is in flight), and the bytes are
/// the owner's.
#[test]

fn kv_a_prefix_read_while_its_owner_swaps_out_stays_counted() {
    watchdog("prefix read during swap-out", 120, || {
        let m = kv_manager(Tier::Host, 64, |_| {});
        let p = Arc::new(kv_pool(&m, Tier::Host));
        let owner_tok: Vec<u32> = (1..=9).collect(); // 2 sealed blocks + 1 token
        let mut reader_tok: Vec<u32> = (1..=8).collect();
        reader_tok.push(999);
        for round in 0..400 {
            let (a, _) = p.start(&owner_tok).unwrap();
            append(&p, a, 0, &owner_tok).unwrap();
            let go = Arc::new(Barrier::new(2));
            let swapper = {
                let (p, go) = (p.clone(), go.clone());
                std::thread::spawn(move || {
                    go.wait();
                    p.swap_out(a).unwrap();
                })
            };
            let reader = {
                let (p, go, t) = (p.clone(), go.clone(), reader_tok.clone());
                std::thread::spawn(move || {
                    go.wait();
                    if round % 2 == 1 {
                        std::thread::yield_now();
                    }
                    let (n, reused) = p.start(&t).unwrap();
                    let mut buf = vec![0u8; reused * BPT as usize];
                    p.read_range(n, 0, &mut buf).unwrap();
                    for (i, c) in buf.chunks(BPT as usize).enumerate() {
                        assert_eq!(c, kv(i, t[i]).as_slice(), "round {round} token {i}");
                    }
                    n
                })
            };
            swapper.join().unwrap();
            let n = reader.join().unwrap();
            if let Err(e) = p.check() {
                panic!("round {round}: {e}; {:?}", p.stats());
            }
            p.finish(n).unwrap();
            p.finish(a).unwrap();
            p.check().unwrap();
        }
    });
}

/// "A sequence is used by one thread at a time; a second thread gets SequenceBusy": two
/// threads append to one sequence at once; each call either goes in whole or is refused,
/// and what is stored is exactly the accepted calls' tokens, in some order, byte for byte.
#[test]
fn kv_the_same_sequence_from_two_threads_is_busy_never_corrupt() {
    watchdog("one sequence, two threads", 60, || {
        let m = kv_manager(Tier::Host, 4, |_| {});
        let p = Arc::new(kv_pool(&m, Tier::Host));
        let (s, _) = p.start(&[1, 2, 3]).unwrap();
        let busy = Arc::new(AtomicU64::new(0));
        let threads: Vec<_> = (0..2u32)
            .map(|t| {
                let (p, busy) = (p.clone(), busy.clone());
                std::thread::spawn(move || {
                    let mut accepted = Vec::new();
                    for i in 0..300u32 {
                        let tok = [t * 100_000 + i * 2, t * 100_000 + i * 2 + 1];
                        // The token alone decides its KV, so the stored order can be read back.
                        let bytes: Vec<u8> = tok.iter().flat_map(|&x| tok_kv(x)).collect();
                        match p.append(s, &tok, &bytes) {
                            Ok(()) => accepted.push(tok),
                            Err(KvError::SequenceBusy(_)) => {
                                busy.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(e) => panic!("{e}"),
                        }
                        if i % 3 == 0 {
                            let mut one = vec![0u8; BPT as usize];
                            match p.read_token(s, 0, &mut one) {
                                Ok(()) | Err(KvError::SequenceBusy(_)) => {}
                                Err(e) => panic!("{e}"),
                            }
                        }
                        if i % 50 == 0 {
                            match p.swap_out(s) {
                                Ok(_) | Err(KvError::SequenceBusy(_)) => {}
                                Err(e) => panic!("{e}"),
                            }
                        }
                    }
                    accepted
                })
            })
            .collect();
        let mut accepted: std::collections::HashMap<Vec<u8>, u32> = Default::default();
        let mut pairs = std::collections::HashSet::new();
        for t in threads {
            for tok in t.join().unwrap() {
                for x in tok {
                    accepted.insert(tok_kv(x), x);
                }
                pairs.insert(tok[0]);
            }
        }
        let n = p.len(s).unwrap();
        assert_eq!(n, accepted.len());
        let mut all = vec![0u8; n * BPT as usize];
        p.read_range(s, 0, &mut all).unwrap();
        let stored: Vec<u32> = all
            .chunks(BPT as usize)
            .enumerate()
            .map(|(i, c)| {
                *accepted
                    .get(c)
                    .unwrap_or_else(|| panic!("token {i}: foreign bytes"))
            })
            .collect();
        // Each accepted call's two tokens lie together, each call once.
        for pair in stored.chunks(2) {
            assert!(pairs.remove(&pair[0]) && pair[1] == pair[0] + 1, "{pair:?}");
        }
        assert!(pairs.is_empty());
        eprintln!("SequenceBusy refusals: {}", busy.load(Ordering::Relaxed));
        p.check().unwrap();
        p.finish(s).unwrap();
    });
}

/// Six threads start sequences with shared prefixes (four families, two salts), append,
/// read, swap out explicitly, race `finish` against other threads' swap-outs for room, on a
/// pool of 6 blocks: no call hangs, every read returns the sequence's own bytes, no error
/// but the documented ones, and at the end the pool and the manager are empty.
#[test]
fn kv_swaps_reads_and_finishes_across_threads_keep_every_byte_and_the_ledger() {
    kv_storm(false);
}

/// The same storm, where every block a read needs is one a pin can make room for: each
/// thread pins at most one block at a time and there are as many blocks of room as
/// threads, so no read may be refused while the tier holds unpinned blocks ("when
/// everything of that kind on the tier is pinned, returns OutOfMemory at once").
#[test]
fn kv_reads_under_contention_are_not_refused_while_the_tier_holds_unpinned_blocks() {
    // Intermittent (about one run in four): ten runs.
    for _ in 0..10 {
        kv_storm(true);
    }
}

fn kv_storm(strict: bool) {
    watchdog("kv storm", 240, move || {
        let m = kv_manager(Tier::Host, 6, |_| {});
        let p = Arc::new(kv_pool(&m, Tier::Host));
        let threads: Vec<_> = (0..6u64)
            .map(|t| {
                let p = p.clone();
                std::thread::spawn(move || {
                    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ (t + 1);
                    let mut rnd = move |n: u64| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        x % n
                    };
                    for _ in 0..60 {
                        let family = rnd(4) as u32;
                        let salt = rnd(2);
                        let prefix_len = 4 * (1 + rnd(3) as usize);
                        let mut tok: Vec<u32> =
                            (0..prefix_len as u32).map(|i| family * 1000 + i).collect();
                        let tail = 1 + rnd(6) as u32;
                        tok.extend((0..tail).map(|i| 50_000 + t as u32 * 100 + i));
                        let (s, reused) = p.start_salted(salt, &tok).unwrap();
                        // A refusal by the manager is a typed error the pool documents; the
                        // strict run (see above) counts it as a failure.
                        let refused = |e: KvError| match e {
                            KvError::Manager(ManagerError::OutOfMemory { .. }) if !strict => {}
                            e => panic!("{e}"),
                        };
                        if let Err(e) = append(&p, s, reused, &tok[reused..]) {
                            refused(e);
                            p.finish(s).unwrap();
                            continue;
                        }
                        for _ in 0..rnd(3) {
                            match rnd(3) {
                                0 => {
                                    p.swap_out(s).unwrap();
                                }
                                _ => {
                                    if let Err(e) = try_read_back(&p, s, &tok) {
                                        refused(e);
                                    }
                                }
                            }
                        }
                        if let Err(e) = try_read_back(&p, s, &tok) {
                            refused(e);
                        }
                        p.finish(s).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        p.check().unwrap();
        let st = p.stats();
        assert_eq!(
            (st.sequences, st.blocks, st.resident_blocks),
            (0, 0, 0),
            "{st:?}"
        );
        let ms = m.stats();
        for t in Tier::ALL {
            assert_eq!(ms.charged.get(t, TensorKind::KvCache), 0, "{t}: {ms:?}");
        }
        assert_eq!(ms.tensors, 0);
    });
}

/// "A hash match is checked against the block's parent and tokens, so a collision never
/// shares wrong KV", and salts keep namespaces apart: a salt crafted so that its first
/// block hashes like salt 0's second block, and a second-level collision on the tokens.
#[test]
fn kv_a_salt_crafted_to_collide_never_shares_wrong_kv() {
    watchdog("salt collision", 30, || {
        let m = kv_manager(Tier::Host, 64, |_| {});
        let p = kv_pool(&m, Tier::Host);
        let a_tok: Vec<u32> = (1..=9).collect();
        let (a, _) = p.start(&a_tok).unwrap();
        append(&p, a, 0, &a_tok).unwrap();
        // Salt whose first block [5,6,7,8] hashes exactly like a's second block.
        let salt = chain_hash(0, &[1, 2, 3, 4]);
        assert_eq!(
            chain_hash(salt, &[5, 6, 7, 8]),
            chain_hash(chain_hash(0, &[1, 2, 3, 4]), &[5, 6, 7, 8])
        );
        let b_tok = vec![5, 6, 7, 8, 42];
        let (b, reused) = p.start_salted(salt, &b_tok).unwrap();
        assert_eq!(
            reused, 0,
            "a block of another salt and another parent is not shared"
        );
        append(&p, b, 0, &b_tok).unwrap();
        // Salt 0 with a first block whose hash equals the salted namespace's start: the
        // chained hash of salt 0 over [1,2,3,4] is `salt`; a sequence of that salt with
        // [1,2,3,4] is another namespace.
        let (c, reused) = p.start_salted(salt ^ 1, &a_tok).unwrap();
        assert_eq!(reused, 0);
        append(&p, c, 0, &a_tok).unwrap();
        read_back(&p, a, &a_tok);
        read_back(&p, b, &b_tok);
        read_back(&p, c, &a_tok);
        p.check().unwrap();
        for s in [a, b, c] {
            p.finish(s).unwrap();
        }
        assert_eq!(p.stats().blocks, 0);
    });
}

/// "A new sequence whose prompt starts with the same tokens takes the sealed blocks by
/// reference instead of recomputing them"; "two sequences that fill identical blocks
/// independently keep both until one finishes (the index points at the first)". Once the
/// first finishes, the identical block that is left is still there to share.
#[test]

fn kv_an_identical_block_left_after_the_first_finishes_is_still_shared() {
    watchdog("identical block survivor", 30, || {
        let m = kv_manager(Tier::Host, 64, |_| {});
        let p = kv_pool(&m, Tier::Host);
        let tok: Vec<u32> = (1..=5).collect();
        // Both start before either sealed anything: they fill identical blocks.
        let (a, ra) = p.start(&tok).unwrap();
        let (b, rb) = p.start(&tok).unwrap();
        assert_eq!((ra, rb), (0, 0));
        append(&p, a, 0, &tok).unwrap();
        append(&p, b, 0, &tok).unwrap();
        p.finish(a).unwrap();
        let (c, rc) = p.start(&tok).unwrap();
        assert_eq!(
            rc, 4,
            "b's sealed block [1,2,3,4] is live and could be shared"
        );
        append(&p, c, rc, &tok[rc..]).unwrap();
        read_back(&p, c, &tok);
        p.finish(b).unwrap();
        p.finish(c).unwrap();
    });
}

/// Absurd configurations and positions are typed errors, never panics.
#[test]
fn kv_absurd_configs_and_positions_are_typed_errors() {
    watchdog("absurd kv", 30, || {
        let m = kv_manager(Tier::Host, 8, |_| {});
        for (bt, bpt) in [
            (u32::MAX, u64::MAX),
            (u32::MAX, 1),
            (1, u64::MAX),
            (2, u64::MAX / 2 + 1),
            (0, 1),
            (1, 0),
            (1, 8 * BLOCK + 1),
        ] {
            for tier in Tier::ALL {
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    KvPool::new(
                        m.clone(),
                        KvPoolConfig {
                            block_tokens: bt,
                            bytes_per_token: bpt,
                            compute_tier: tier,
                        },
                    )
                    .map(|_| ())
                }));
                match r {
                    Ok(Ok(())) | Ok(Err(KvError::InvalidConfig(_))) => {}
                    Ok(Err(e)) => panic!("({bt}, {bpt}, {tier}): {e}"),
                    Err(_) => panic!("({bt}, {bpt}, {tier}) panicked"),
                }
            }
        }
        let p = kv_pool(&m, Tier::Host);
        let (s, _) = p.start(&[]).unwrap();
        let mut one = vec![0u8; BPT as usize];
        assert!(matches!(
            p.read_token(s, usize::MAX, &mut one),
            Err(KvError::OutOfRange { .. })
        ));
        assert!(matches!(
            p.read_range(s, usize::MAX, &mut one),
            Err(KvError::OutOfRange { .. })
        ));
        assert!(matches!(
            p.read_token(s, 0, &mut [0u8; 3]),
            Err(KvError::BadLength { .. })
        ));
        assert!(matches!(
            p.append(s, &[1, 2], &[0u8; 64]),
            Err(KvError::BadLength { .. })
        ));
        assert!(matches!(p.read_range(s, 0, &mut []), Ok(())));
        p.finish(s).unwrap();
        assert!(matches!(p.finish(s), Err(KvError::UnknownSequence(_))));
        assert!(matches!(p.swap_out(s), Err(KvError::UnknownSequence(_))));
        assert!(matches!(
            append(&p, s, 0, &[1]),
            Err(KvError::UnknownSequence(_))
        ));
        p.check().unwrap();
    });
}

/// A disk that fills in the middle of a sequence's swap-out: the call fails with a typed
/// error, nothing is lost (every byte reads back), the ledger holds, and after the
/// sequences finish the manager holds nothing.
#[test]
fn kv_a_disk_that_fills_mid_swap_out_is_an_error_and_loses_nothing() {
    watchdog("full disk mid swap", 60, || {
        // 64 KiB blocks (16 tokens x 4 KiB); the disk (1 MiB) holds 16 of them.
        let mut c = common::config([4 * MIB, 16 * MIB, MIB]);
        c.disk.direct_io = false;
        c.disk.unit_bytes = 4 * KIB;
        let m = MemoryManager::new(c).unwrap();
        let p = KvPool::new(
            m.clone(),
            KvPoolConfig {
                block_tokens: 16,
                bytes_per_token: 4096,
                compute_tier: Tier::Host,
            },
        )
        .unwrap();
        let tokens: Vec<u32> = (1..=16 * 20).collect(); // 20 blocks
        let (s, _) = p.start(&tokens).unwrap();
        let bytes: Vec<u8> = tokens
            .iter()
            .enumerate()
            .flat_map(|(i, &t)| common::xorshift_bytes((i as u64) << 32 | u64::from(t), 4096))
            .collect();
        p.append(s, &tokens, &bytes).unwrap();
        let r = p.swap_out(s);
        assert!(r.is_err(), "20 blocks cannot all go to a disk of 16: {r:?}");
        p.check().unwrap();
        let mut back = vec![0u8; bytes.len()];
        p.read_range(s, 0, &mut back).unwrap();
        assert!(back == bytes, "bytes changed across a failed swap-out");
        p.check().unwrap();
        // A second sequence still gets room (the first is idle and swappable where the disk
        // has room, or the manager refuses with a typed error).
        let t2: Vec<u32> = (5000..5008).collect();
        let (s2, _) = p.start(&t2).unwrap();
        let b2: Vec<u8> = vec![7u8; t2.len() * 4096];
        match p.append(s2, &t2, &b2) {
            Ok(()) | Err(KvError::Manager(_)) => {}
            Err(e) => panic!("{e}"),
        }
        p.finish(s).unwrap();
        p.finish(s2).unwrap();
        p.check().unwrap();
        let ms = m.stats();
        for t in Tier::ALL {
            assert_eq!(ms.charged.get(t, TensorKind::KvCache), 0, "{t}");
        }
    });
}

// ---------------------------------------------------------------------------------------
// Staging area
// ---------------------------------------------------------------------------------------

/// "Returns None ... when its buffer would take more than the capacity": with an area of
/// `u64::MAX` that already holds a buffer, a fill of `usize::MAX` bytes is refused, not a
/// panic (an overflow in the room check), and the area stays usable.
#[test]

fn staging_a_fill_larger_than_the_address_space_is_refused_not_a_panic() {
    watchdog("huge fill", 10, || {
        let a: StagingArea<u64> = StagingArea::new(u64::MAX);
        let b = a.begin_fill(1, 10, || true, |_| false).unwrap();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            a.begin_fill(2, usize::MAX, || true, |_| false).is_none()
        }));
        assert!(
            matches!(r, Ok(true)),
            "a fill of usize::MAX bytes: {:?}",
            r.is_ok()
        );
        a.finish_fill(1, 1, b, 0..10, true);
        assert_eq!(a.take(1).map(|s| s.len()), Some(10));
        a.check().unwrap();
        assert_eq!(a.held_bytes(), 0);
    });
}

/// Capacities of 0 and 1: never more held than the capacity, nothing waits, the ledger
/// holds; with aligned I/O buffers (4 KiB each) a capacity below one page refuses every
/// fill.
#[test]
fn staging_capacities_zero_and_one_never_hold_more_than_capacity() {
    watchdog("tiny capacities", 10, || {
        for cap in [0u64, 1] {
            let a: StagingArea<u64> = StagingArea::new(cap);
            for len in [0usize, 1, 2] {
                if let Some(b) = a.begin_fill(len as u64, len, || true, |_| false) {
                    assert!(a.held_bytes() <= cap);
                    a.finish_fill(len as u64, 0, b, 0..len, true);
                }
                assert!(a.held_bytes() <= cap);
                a.check().unwrap();
                let _ = a.take(len as u64);
                a.wake();
            }
            let io: StagingArea<u64, vlmem_tier::AlignedBuf> = StagingArea::new(cap);
            assert!(io.begin_fill(1, 0, || true, |_| false).is_none());
            assert!(io.begin_fill(2, 1, || true, |_| false).is_none());
            io.check().unwrap();
        }
        let io: StagingArea<u64, vlmem_tier::AlignedBuf> = StagingArea::new(4095);
        assert!(io.begin_fill(1, 1, || true, |_| false).is_none());
        assert_eq!(io.held_bytes(), 0);
    });
}

/// Two consumers take one key while it is filling: one gets it, the other misses, both
/// return; the room comes back when the taker drops it.
#[test]
fn staging_two_consumers_of_one_key_get_it_once_and_both_return() {
    watchdog("two consumers", 20, || {
        for _ in 0..200 {
            let a = Arc::new(StagingArea::<u64>::new(100));
            let b = a.begin_fill(7, 50, || true, |_| false).unwrap();
            let go = Arc::new(Barrier::new(3));
            let takers: Vec<_> = (0..2)
                .map(|_| {
                    let (a, go) = (a.clone(), go.clone());
                    std::thread::spawn(move || {
                        go.wait();
                        a.take(7).map(|s| s.iter().all(|&v| v == 7))
                    })
                })
                .collect();
            go.wait();
            let mut b = b;
            b.fill(7);
            a.finish_fill(7, 0, b, 0..50, true);
            let got: Vec<Option<bool>> = takers.into_iter().map(|t| t.join().unwrap()).collect();
            assert_eq!(
                got.iter().filter(|g| **g == Some(true)).count(),
                1,
                "{got:?}"
            );
            assert_eq!(got.iter().filter(|g| g.is_none()).count(), 1, "{got:?}");
            a.check().unwrap();
            assert_eq!(a.held_bytes(), 0);
        }
    });
}

/// A take waiting for a filling key whose fill fails, or publishes a range outside its
/// buffer, misses (it does not wait for ever, and never sees the bytes).
#[test]
fn staging_a_failed_or_out_of_range_finish_turns_a_waiting_take_into_a_miss() {
    watchdog("failed fill", 10, || {
        for (ok, range) in [(false, 0..10), (true, 5..200), (true, 0..11 + 4096)] {
            let a = Arc::new(StagingArea::<u64>::new(100));
            let b = a.begin_fill(3, 10, || true, |_| false).unwrap();
            let t = {
                let a = a.clone();
                std::thread::spawn(move || a.take(3).is_none())
            };
            std::thread::sleep(Duration::from_millis(20));
            a.finish_fill(3, 0, b, range.clone(), ok);
            assert!(t.join().unwrap(), "({ok}, {range:?}) must miss");
            a.check().unwrap();
            assert_eq!(a.held_bytes(), 0);
        }
    });
}

/// "A take therefore never waits forever, whatever order the producer fills in, as long as
/// fills in flight are finished by a thread other than the one taking": the producer began
/// key 2 before key 1 (out of order) and a second producer thread waits for room to fill
/// key 1 while the consumer takes key 1.
/// - Key 2's read finished by a reader thread (the contract): the take of key 1 returns, a
///   miss (the fill of key 1 is given up: key 2's ready buffer is not stale and holds the
///   room), and the ledger holds.
/// - Key 2's buffer held by the taking thread itself (outside the contract): the take waits
///   for that fill, as documented, until the producer stops wanting key 1 (after a wake) or
///   the area closes; it then misses, and the thread finishes its fill.
#[test]
fn staging_a_take_never_waits_forever_whatever_order_the_producer_fills_in() {
    watchdog("out-of-order fill finished by a reader", 10, || {
        let a = Arc::new(StagingArea::<u64>::new(100));
        let mut b2 = a.begin_fill(2, 60, || true, |_| false).unwrap();
        let producer = {
            let a = a.clone();
            std::thread::spawn(move || a.begin_fill(1, 60, || true, |_| false).is_none())
        };
        // Let the producer register key 1 as coming.
        std::thread::sleep(Duration::from_millis(50));
        let reader = {
            let a = a.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(50));
                b2.fill(2);
                a.finish_fill(2, 2, b2, 0..60, true);
            })
        };
        assert!(a.take(1).is_none(), "key 1 cannot get room: a miss");
        reader.join().unwrap();
        assert!(producer.join().unwrap(), "the fill of key 1 is given up");
        let s = a.stats();
        assert_eq!((s.gave_up, s.misses), (1, 1), "{s:?}");
        a.check().unwrap();
        assert_eq!(
            a.take(2).map(|s| s.len()),
            Some(60),
            "key 2 is still served"
        );
        a.check().unwrap();
        assert_eq!(a.held_bytes(), 0);
    });
    watchdog("out-of-order fill held by the taker", 10, || {
        let a = Arc::new(StagingArea::<u64>::new(100));
        let want1 = Arc::new(AtomicBool::new(true));
        let b2 = a.begin_fill(2, 60, || true, |_| false).unwrap();
        let producer = {
            let (a, want1) = (a.clone(), want1.clone());
            std::thread::spawn(move || {
                a.begin_fill(1, 60, move || want1.load(Ordering::Acquire), |_| false)
                    .is_none()
            })
        };
        std::thread::sleep(Duration::from_millis(50));
        let returned = Arc::new(AtomicBool::new(false));
        let stopper = {
            let (a, want1, returned) = (a.clone(), want1.clone(), returned.clone());
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(200));
                // Still waiting for its own fill: the documented wait.
                let waited = !returned.load(Ordering::Acquire);
                want1.store(false, Ordering::Release);
                a.wake();
                waited
            })
        };
        let got = a.take(1);
        returned.store(true, Ordering::Release);
        assert!(got.is_none(), "a miss once the producer gave key 1 up");
        a.finish_fill(2, 2, b2, 0..60, true);
        assert!(
            stopper.join().unwrap(),
            "the take waited for the fill it holds"
        );
        assert!(producer.join().unwrap());
        a.check().unwrap();
        drop(a.take(2));
        assert_eq!(a.held_bytes(), 0);
        a.check().unwrap();
    });
}

/// A buffer whose predicates and allocation may panic.
#[derive(Debug)]
struct Boom(Vec<u8>);
static BOOM_ALLOC: AtomicBool = AtomicBool::new(false);
impl StageBuf for Boom {
    fn capacity_for(len_bytes: usize) -> usize {
        len_bytes
    }
    fn alloc(len_bytes: usize) -> Option<Self> {
        if BOOM_ALLOC.load(Ordering::SeqCst) {
            panic!("allocation panicked");
        }
        Some(Boom(vec![0; len_bytes]))
    }
    fn capacity_bytes(&self) -> usize {
        self.0.len()
    }
    fn bytes(&self) -> &[u8] {
        &self.0
    }
}

/// A panic in `wanted`, in `stale` or in the buffer's allocation, on the first call or
/// after a wait: it reaches the producer, the key is withdrawn (a take waiting for it
/// misses), the room is given back and the area keeps working.
#[test]
fn staging_panics_in_every_closure_leave_the_area_usable() {
    watchdog("panicking closures", 20, || {
        let a = Arc::new(StagingArea::<u64, Boom>::new(100));
        // Panics on the first evaluation.
        for which in 0..2 {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                a.begin_fill(
                    1,
                    10,
                    || if which == 0 { panic!("wanted") } else { true },
                    |_| if which == 1 { panic!("stale") } else { false },
                )
            }));
            // `stale` only runs over ready buffers: with none, it is never called.
            if which == 0 {
                assert!(r.is_err());
            }
            if let Ok(Some(b)) = r {
                a.finish_fill(1, 0, b, 0..10, false);
            }
            a.check().unwrap();
        }
        // Panics after a wait, while a take waits for the key.
        let b = a.begin_fill(9, 90, || true, |_| false).unwrap();
        let armed = Arc::new(AtomicBool::new(false));
        let producer = {
            let (a, armed) = (a.clone(), armed.clone());
            std::thread::spawn(move || {
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    a.begin_fill(
                        2,
                        50,
                        || {
                            if armed.load(Ordering::SeqCst) {
                                panic!("wanted after a wait")
                            }
                            true
                        },
                        |_| false,
                    )
                }))
                .is_err()
            })
        };
        std::thread::sleep(Duration::from_millis(30));
        armed.store(true, Ordering::SeqCst);
        a.wake();
        assert!(producer.join().unwrap(), "the panic reached the producer");
        assert!(a.take(2).is_none());
        a.finish_fill(9, 9, b, 0..90, true);
        assert!(a.take(9).is_some());
        a.check().unwrap();
        a.wake();
        // A panicking allocation gives the room back.
        BOOM_ALLOC.store(true, Ordering::SeqCst);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            a.begin_fill(3, 100, || true, |_| false)
        }));
        BOOM_ALLOC.store(false, Ordering::SeqCst);
        // A free buffer of 90 may be reused for 3 of 100? No: too small; so alloc ran.
        assert!(r.is_err(), "the allocation's panic reaches the producer");
        assert_eq!(a.held_bytes(), 0);
        a.check().unwrap();
        let b = a.begin_fill(4, 100, || true, |_| false).unwrap();
        a.finish_fill(4, 4, b, 0..100, true);
        assert_eq!(a.take(4).map(|s| s.len()), Some(100));
        a.check().unwrap();
    });
}

/// `close` while producers wait for room and takes wait for coming and filling keys:
/// producers return `None`, takes of coming keys miss, a fill in flight still finishes (and
/// its take returns), lent buffers come back; the area ends empty.
#[test]
fn staging_close_while_fills_and_takes_wait_returns_everything() {
    watchdog("close", 20, || {
        let a = Arc::new(StagingArea::<u64>::new(100));
        let f0 = a.begin_fill(0, 60, || true, |_| false).unwrap();
        let f1 = a.begin_fill(1, 40, || true, |_| false).unwrap();
        let waiting_producer = {
            let a = a.clone();
            std::thread::spawn(move || a.begin_fill(2, 50, || true, |_| false).is_none())
        };
        std::thread::sleep(Duration::from_millis(20));
        let take1 = {
            let a = a.clone();
            std::thread::spawn(move || a.take(1).map(|s| s.len()))
        };
        std::thread::sleep(Duration::from_millis(20));
        a.close();
        assert!(waiting_producer.join().unwrap());
        a.finish_fill(1, 1, f1, 0..40, true);
        // The fill finished after close is not published: the take misses.
        assert_eq!(take1.join().unwrap(), None);
        a.finish_fill(0, 0, f0, 0..60, true);
        assert!(a.take(0).is_none());
        assert!(a.begin_fill(5, 1, || true, |_| false).is_none());
        a.check().unwrap();
        assert_eq!(a.held_bytes(), 0);
    });
}

/// Out-of-order producers (three threads beginning fills of a shuffled window of keys),
/// reader threads finishing them late and out of order, and two consumers taking keys in
/// order, each holding its lent buffer across its next take: nothing hangs, a taken buffer
/// carries its key's bytes, the ledger (by allocation, aligned 4 KiB buffers) holds after
/// every take and the area ends empty.
#[test]
fn staging_out_of_order_producers_and_two_consumers_never_hang_and_keep_the_ledger() {
    watchdog("out-of-order storm", 120, || {
        const KEYS: u64 = 600;
        let a = Arc::new(StagingArea::<u64, vlmem_tier::AlignedBuf>::new(
            5 * 4096 + 100,
        ));
        let cursor = Arc::new(AtomicU64::new(0));
        let done = Arc::new(AtomicBool::new(false));
        let (ftx, frx) = mpsc::channel::<(u64, vlmem_tier::AlignedBuf, usize)>();
        let frx = Arc::new(std::sync::Mutex::new(frx));
        let readers: Vec<_> = (0..2)
            .map(|r| {
                let (a, frx) = (a.clone(), frx.clone());
                std::thread::spawn(move || {
                    let mut x = 77u64 + r;
                    loop {
                        let job = frx.lock().unwrap().recv();
                        let Ok((k, mut b, len)) = job else { break };
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        if x.is_multiple_of(3) {
                            std::thread::sleep(Duration::from_micros(x % 300));
                        }
                        b.as_mut_slice()[..len].fill(k as u8);
                        a.finish_fill(k, k, b, 0..len, !x.is_multiple_of(29));
                    }
                })
            })
            .collect();
        let producers: Vec<_> = (0..3u64)
            .map(|pi| {
                let (a, cursor, done, ftx) = (a.clone(), cursor.clone(), done.clone(), ftx.clone());
                std::thread::spawn(move || {
                    let mut x = 1234u64 + pi;
                    while !done.load(Ordering::Acquire) {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let c = cursor.load(Ordering::Acquire);
                        // Any key of the next eight, in whatever order.
                        let k = c + x % 8;
                        if k >= KEYS {
                            std::thread::yield_now();
                            continue;
                        }
                        let len = 1 + (k as usize * 997) % 6000;
                        let c2 = cursor.clone();
                        let c3 = cursor.clone();
                        if let Some(b) = a.begin_fill(
                            k,
                            len,
                            move || c2.load(Ordering::Acquire) <= k,
                            move |t| t + 2 < c3.load(Ordering::Acquire),
                        ) {
                            ftx.send((k, b, len)).unwrap();
                        }
                    }
                })
            })
            .collect();
        drop(ftx);
        // Two consumers alternate keys: even keys one, odd keys the other, each keeping its
        // previous buffer lent while it takes its next key.
        let turn = Arc::new((std::sync::Mutex::new(0u64), std::sync::Condvar::new()));
        let hits = Arc::new(AtomicUsize::new(0));
        let consumers: Vec<_> = (0..2u64)
            .map(|ci| {
                let (a, cursor, turn, hits) =
                    (a.clone(), cursor.clone(), turn.clone(), hits.clone());
                std::thread::spawn(move || {
                    let mut held = None;
                    let mut k = ci;
                    while k < KEYS {
                        {
                            let (m, cv) = &*turn;
                            let mut g = m.lock().unwrap();
                            while *g != k {
                                g = cv.wait(g).unwrap();
                            }
                        }
                        cursor.store(k, Ordering::Release);
                        a.wake();
                        let got = a.take(k);
                        if let Some(s) = &got {
                            assert_eq!(s.len(), 1 + (k as usize * 997) % 6000);
                            assert!(s.iter().all(|&v| v == k as u8), "key {k}: foreign bytes");
                            hits.fetch_add(1, Ordering::Relaxed);
                        }
                        a.check().unwrap();
                        held = got.map(|g| (k, g));
                        let _ = &held;
                        {
                            let (m, cv) = &*turn;
                            *m.lock().unwrap() = k + 1;
                            cv.notify_all();
                        }
                        k += 2;
                    }
                    drop(held);
                })
            })
            .collect();
        for c in consumers {
            c.join().unwrap();
        }
        cursor.store(KEYS, Ordering::Release);
        done.store(true, Ordering::Release);
        a.wake();
        for p in producers {
            p.join().unwrap();
        }
        for r in readers {
            r.join().unwrap();
        }
        a.close();
        a.check().unwrap();
        assert_eq!(a.held_bytes(), 0);
        let s = a.stats();
        assert_eq!(s.hits + s.misses, KEYS, "{s:?}");
    });
}

// ---------------------------------------------------------------------------------------
// Vision cache
// ---------------------------------------------------------------------------------------

fn vcache(budget_bytes: u64) -> (Arc<VisionCache>, MemoryManager) {
    let m = common::manager_with([4 * MIB, 64 * MIB, 64 * MIB]);
    (
        Arc::new(VisionCache::new(m.clone(), "attack", budget_bytes)),
        m,
    )
}

fn vision_charged(m: &MemoryManager) -> u64 {
    let s = m.stats();
    Tier::ALL
        .iter()
        .map(|&t| s.charged.get(t, TensorKind::VisionEmbedding))
        .sum()
}

/// The same image from 16 threads at once: computed once, one tensor, every thread gets
/// the same bytes; a hit for the 15 others.
#[test]
fn vision_the_same_image_from_many_threads_is_computed_once() {
    watchdog("same image", 30, || {
        for _ in 0..20 {
            let (c, m) = vcache(MIB);
            let computed = Arc::new(AtomicUsize::new(0));
            let go = Arc::new(Barrier::new(16));
            let ts: Vec<_> = (0..16)
                .map(|_| {
                    let (c, computed, go) = (c.clone(), computed.clone(), go.clone());
                    std::thread::spawn(move || {
                        go.wait();
                        let (e, _) = c
                            .get_or_insert_with(b"one image", || {
                                computed.fetch_add(1, Ordering::SeqCst);
                                std::thread::sleep(Duration::from_millis(2));
                                vec![5u8; 4000]
                            })
                            .unwrap();
                        (e.handle(), e.to_vec().unwrap())
                    })
                })
                .collect();
            let got: Vec<_> = ts.into_iter().map(|t| t.join().unwrap()).collect();
            assert_eq!(computed.load(Ordering::SeqCst), 1);
            assert!(
                got.iter()
                    .all(|(h, v)| *h == got[0].0 && v == &vec![5u8; 4000])
            );
            let s = c.stats();
            assert_eq!((s.misses, s.hits, s.entries), (1, 15, 1), "{s:?}");
            drop(got);
            c.clear();
            assert_eq!(vision_charged(&m), 0, "the last share freed the tensor");
        }
    });
}

/// An embedding larger than the whole budget is never admitted (resident and peak stay
/// within the budget), and the threads that waited for it compute their own and return.
#[test]
fn vision_an_entry_larger_than_the_budget_is_never_admitted_and_waiters_go_on() {
    watchdog("oversized", 30, || {
        let (c, m) = vcache(1000);
        let computed = Arc::new(AtomicUsize::new(0));
        let go = Arc::new(Barrier::new(6));
        let ts: Vec<_> = (0..6)
            .map(|_| {
                let (c, computed, go) = (c.clone(), computed.clone(), go.clone());
                std::thread::spawn(move || {
                    go.wait();
                    let (e, hit) = c
                        .get_or_insert_with(b"huge", || {
                            computed.fetch_add(1, Ordering::SeqCst);
                            std::thread::sleep(Duration::from_millis(5));
                            vec![1u8; 1001]
                        })
                        .unwrap();
                    assert!(!hit);
                    e.len_bytes()
                })
            })
            .collect();
        for t in ts {
            assert_eq!(t.join().unwrap(), 1001);
        }
        assert_eq!(computed.load(Ordering::SeqCst), 6);
        let s = c.stats();
        assert_eq!(
            (s.entries, s.resident_bytes, s.rejected),
            (0, 0, 6),
            "{s:?}"
        );
        assert!(s.peak_resident_bytes <= 1000);
        // Exactly the budget fits.
        let (e, _) = c.get_or_insert_with(b"exact", || vec![2u8; 1000]).unwrap();
        assert_eq!(c.stats().resident_bytes, 1000);
        drop(e);
        assert!(c.get(b"huge").is_none());
        c.clear();
        assert_eq!(vision_charged(&m), 0);
    });
}

/// Budgets of 0 and `u64::MAX`: nothing admitted, or everything; no panic.
#[test]
fn vision_budgets_of_zero_and_u64_max_work() {
    watchdog("extreme budgets", 30, || {
        for budget in [0u64, 1, u64::MAX] {
            let (c, m) = vcache(budget);
            for i in 0..20u8 {
                let (e, _) = c.get_or_insert_with(&[i], || vec![i; 100]).unwrap();
                assert_eq!(e.to_vec().unwrap(), vec![i; 100]);
            }
            let s = c.stats();
            assert!(
                s.resident_bytes <= budget && s.peak_resident_bytes <= budget,
                "{s:?}"
            );
            assert_eq!(c.entries().len() as u64, s.entries);
            c.clear();
            assert_eq!(vision_charged(&m), 0, "budget {budget}");
        }
    });
}

/// Eight threads over 40 images with a budget for about 6 of them, one thread clearing the
/// cache over and over, computations that fail or panic now and then: nothing hangs,
/// every embedding returned is its image's, resident bytes never exceed the budget, and at
/// the end the cache's ledger agrees with its entries and with the manager; once the cache
/// is cleared and the callers' shares are gone, the manager holds no embedding.
#[test]
fn vision_concurrent_clear_panics_and_errors_keep_the_budget_and_the_ledger() {
    watchdog("vision storm", 120, || {
        let budget = 6 * 1000;
        let (c, m) = vcache(budget);
        let stop = Arc::new(AtomicBool::new(false));
        let clearer = {
            let (c, stop) = (c.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Acquire) {
                    c.clear();
                    let s = c.stats();
                    assert!(s.resident_bytes <= budget, "{s:?}");
                    std::thread::sleep(Duration::from_micros(300));
                }
            })
        };
        let ts: Vec<_> = (0..8u64)
            .map(|t| {
                let c = c.clone();
                std::thread::spawn(move || {
                    let mut x = 99u64 + t;
                    let mut kept = Vec::new();
                    for _ in 0..400 {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let img = [(x % 40) as u8, 0xAB];
                        let len = 900 + (x % 40) as usize * 5;
                        let fate = (x >> 20) % 10;
                        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                            c.get_or_try_insert_with(&img, || {
                                if fate == 0 {
                                    panic!("tower panicked");
                                }
                                if fate == 1 {
                                    return Err(ManagerError::ZeroSize);
                                }
                                Ok(vec![img[0]; len])
                            })
                        }));
                        // Errors and panics are the computation's own; nothing to check.
                        if let Ok(Ok((e, _))) = r {
                            assert_eq!(e.to_vec().unwrap(), vec![img[0]; len]);
                            if x.is_multiple_of(7) {
                                kept.push(e);
                            }
                        }
                        if x.is_multiple_of(5)
                            && let Some(e) = c.get(&img)
                        {
                            assert_eq!(e.to_vec().unwrap(), vec![img[0]; len]);
                        }
                        if kept.len() > 4 {
                            kept.clear();
                        }
                    }
                })
            })
            .collect();
        for t in ts {
            t.join().unwrap();
        }
        stop.store(true, Ordering::Release);
        clearer.join().unwrap();
        let s = c.stats();
        let entries = c.entries();
        assert_eq!(entries.len() as u64, s.entries, "{s:?}");
        assert_eq!(
            entries.iter().map(|e| e.len_bytes()).sum::<u64>(),
            s.resident_bytes
        );
        assert!(s.peak_resident_bytes <= budget);
        assert_eq!(
            vision_charged(&m),
            s.resident_bytes,
            "the manager holds the cache's entries only"
        );
        drop(entries);
        c.clear();
        assert_eq!(vision_charged(&m), 0);
        assert_eq!(m.stats().tensors, 0);
    });
}

/// A manager that refuses every embedding (a vision budget smaller than one): the call
/// returns the typed error, waiting threads try and fail too, nothing is left in flight.
#[test]
fn vision_a_refusing_manager_is_an_error_for_every_caller_not_a_hang() {
    watchdog("refusing manager", 30, || {
        let mut cfg = common::config([4 * MIB, 64 * MIB, 64 * MIB]);
        for t in Tier::ALL {
            cfg.budgets.bytes[t.index()][TensorKind::VisionEmbedding.index()] = 100;
        }
        let m = MemoryManager::new(cfg).unwrap();
        let c = Arc::new(VisionCache::new(m.clone(), "refused", MIB));
        let go = Arc::new(Barrier::new(4));
        let ts: Vec<_> = (0..4)
            .map(|_| {
                let (c, go) = (c.clone(), go.clone());
                std::thread::spawn(move || {
                    go.wait();
                    c.get_or_insert_with(b"img", || vec![1u8; 1000]).is_err()
                })
            })
            .collect();
        for t in ts {
            assert!(t.join().unwrap());
        }
        assert!(c.get(b"img").is_none());
        assert_eq!(c.stats().entries, 0);
        // An empty embedding is a typed error too.
        assert!(matches!(
            c.get_or_insert_with(b"empty", Vec::new),
            Err(ManagerError::ZeroSize)
        ));
        assert!(c.get(b"empty").is_none());
    });
}

/// A computation that asks the cache for something: another image works; its own image
/// (a re-entrant lookup, e.g. a tower that consults the cache) does not wait for itself:
/// `get` finds nothing and a nested `get_or_insert_with` is a re-entrant-computation error,
/// at once; the outer computation then completes and is cached as usual.
#[test]
fn vision_a_computation_that_asks_for_its_own_image_does_not_hang() {
    let (c, _m) = vcache(MIB);
    let other = watchdog("re-entrant other image", 10, {
        let c = c.clone();
        move || {
            c.get_or_insert_with(b"outer", || {
                let (e, _) = c.get_or_insert_with(b"inner", || vec![3u8; 10]).unwrap();
                e.to_vec().unwrap()
            })
            .map(|(e, _)| e.len_bytes())
            .unwrap()
        }
    });
    assert_eq!(other, 10);
    watchdog("re-entrant same image", 5, move || {
        let (e, hit) = c
            .get_or_insert_with(b"self", || {
                assert!(c.get(b"self").is_none(), "not cached while being computed");
                match c.get_or_insert_with(b"self", || unreachable!("computed twice")) {
                    Err(ManagerError::Reentrant { what }) => {
                        assert!(what.contains("vision computation"), "{what}")
                    }
                    other => panic!("a re-entrant computation: {other:?}"),
                }
                vec![1u8; 10]
            })
            .unwrap();
        assert!(!hit);
        assert_eq!(e.to_vec().unwrap(), vec![1u8; 10]);
        let (again, hit) = c.get_or_insert_with(b"self", || unreachable!()).unwrap();
        assert!(hit);
        assert_eq!(again.handle(), e.handle());
        let s = c.stats();
        assert_eq!(s.misses, 3, "outer, inner, self: {s:?}");
    });
}

/// "A small change of the image changes the key": every one-bit flip and every one-byte
/// extension or truncation of images from 0 to 70 bytes gives a new key, and two caches
/// with different namespaces never share a key.
#[test]
fn vision_one_flipped_bit_or_byte_more_changes_the_key() {
    watchdog("keys", 30, || {
        let m = common::manager_with([MIB, 4 * MIB, 16 * MIB]);
        let a = VisionCache::new(m.clone(), "model-a", MIB);
        let b = VisionCache::new(m.clone(), "model-b", MIB);
        let mut seen = std::collections::HashSet::new();
        for len in 0..70usize {
            let base = common::xorshift_bytes(len as u64 + 1, len);
            let k = a.key_of(&base);
            assert_ne!(k, b.key_of(&base), "namespaces, len {len}");
            seen.insert(k);
            for i in 0..len * 8 {
                let mut v = base.clone();
                v[i / 8] ^= 1 << (i % 8);
                assert_ne!(a.key_of(&v), k, "len {len} bit {i}");
            }
            let mut longer = base.clone();
            longer.push(0);
            assert_ne!(a.key_of(&longer), k, "len {len} + a zero byte");
        }
        assert_eq!(seen.len(), 70);
    });
}
