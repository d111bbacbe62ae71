//! The paged KV pool: prefix blocks shared by content with reference counts, whole-sequence
//! swap-out under pressure with every byte kept, typed errors, and eight threads of
//! sequences ending with a ledger of every token's KV.

mod common;

use std::sync::Arc;
use vlmem::{KvError, KvPool, KvPoolConfig, ManagerConfig, MemoryManager, TensorKind, Tier};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
/// 256 bytes of KV per token, 16 tokens per block: 4 KiB blocks.
const BPT: u64 = 256;

fn pool(host_kv_bytes: u64) -> KvPool {
    let caps = [4 * MIB, 16 * MIB, 64 * MIB];
    let mut c = ManagerConfig::with_capacities(caps[0], caps[1], caps[2]);
    for t in Tier::ALL {
        for k in TensorKind::ALL {
            c.budgets.bytes[t.index()][k.index()] = caps[t.index()];
        }
    }
    c.budgets.bytes[Tier::Host.index()][TensorKind::KvCache.index()] = host_kv_bytes;
    c.shards = 4;
    let m = MemoryManager::new(c).unwrap();
    KvPool::new(
        m,
        KvPoolConfig {
            block_tokens: 16,
            bytes_per_token: BPT,
            compute_tier: Tier::Host,
        },
    )
    .unwrap()
}

/// The KV bytes of `token` at `position` (what a model would compute: a function of the
/// prefix, here of the position and the token).
fn kv_of(position: usize, token: u32) -> Vec<u8> {
    common::xorshift_bytes((position as u64) << 32 | u64::from(token), BPT as usize)
}

fn append_all(p: &KvPool, seq: vlmem::SeqId, from: usize, tokens: &[u32]) {
    let mut kv = Vec::new();
    for (i, &t) in tokens.iter().enumerate() {
        kv.extend(kv_of(from + i, t));
    }
    p.append(seq, tokens, &kv).unwrap();
}

fn check_all(p: &KvPool, seq: vlmem::SeqId, tokens: &[u32]) {
    assert_eq!(p.len(seq).unwrap(), tokens.len());
    let mut buf = vec![0u8; BPT as usize];
    for (i, &t) in tokens.iter().enumerate() {
        p.read_token(seq, i, &mut buf).unwrap();
        assert_eq!(buf, kv_of(i, t), "token {i}");
    }
}

#[test]
fn prompts_with_a_common_prefix_share_full_blocks() {
    let p = pool(MIB);
    let system: Vec<u32> = (0..40).collect(); // 2 full blocks + 8 tokens
    let mut a = system.clone();
    a.extend([900, 901, 902]);
    let (sa, reused) = p.start(&a).unwrap();
    assert_eq!(reused, 0, "nothing cached yet");
    append_all(&p, sa, 0, &a);
    // Same 40-token prefix, different tail: the two full blocks (32 tokens) are shared.
    let mut b = system.clone();
    b.extend([700, 701]);
    let (sb, reused) = p.start(&b).unwrap();
    assert_eq!(reused, 32);
    append_all(&p, sb, 32, &b[32..]);
    let s = p.stats();
    assert_eq!(s.shared_blocks, 2);
    assert_eq!(s.blocks, 3 + 1, "a: 3 blocks; b: a's 2 full ones + 1 own");
    assert_eq!(s.block_refs, 3 + 3);
    assert_eq!(s.prefix_hit_tokens, 32);
    check_all(&p, sa, &a);
    check_all(&p, sb, &b);
    // A prompt that differs inside the first block shares nothing.
    let mut c = system.clone();
    c[3] = 12345;
    let (sc, reused) = p.start(&c).unwrap();
    assert_eq!(reused, 0);
    // A prompt that is exactly two blocks long reuses only the first: its last token must
    // be computed for its logits.
    let (sd, reused) = p.start(&system[..32]).unwrap();
    assert_eq!(reused, 16);
    // Finishing a keeps what b still references.
    p.finish(sa).unwrap();
    check_all(&p, sb, &b);
    assert_eq!(
        p.stats().shared_blocks,
        1,
        "b and d still share block 0; b alone holds block 1"
    );
    for s in [sb, sc, sd] {
        p.finish(s).unwrap();
    }
    let s = p.stats();
    assert_eq!((s.sequences, s.blocks, s.block_refs), (0, 0, 0));
}

#[test]
fn pressure_swaps_out_whole_sequences_and_nothing_is_lost() {
    // Room for 8 blocks (32 KiB) on the host; three sequences of 5 blocks each.
    let p = pool(32 * KIB);
    assert_eq!(p.max_resident_blocks(), 8);
    let prompts: Vec<Vec<u32>> = (0..3u32)
        .map(|s| (0..80).map(|i| s * 1000 + i).collect())
        .collect();
    let mut seqs = Vec::new();
    for pr in &prompts {
        let (s, reused) = p.start(pr).unwrap();
        assert_eq!(reused, 0);
        append_all(&p, s, 0, pr);
        seqs.push(s);
    }
    let st = p.stats();
    assert!(st.swap_outs >= 1, "{st:?}");
    assert!(st.resident_blocks <= 8, "{st:?}");
    // The first sequence went out whole when the second needed room, and the second when
    // the third did (latest idle sequence first).
    let swapped: Vec<bool> = seqs.iter().map(|&s| p.is_swapped(s).unwrap()).collect();
    assert!(swapped.iter().any(|&x| x));
    assert!(!swapped[2], "the sequence being appended to stays in");
    // Every byte comes back, swapping sequences in and out as each is read.
    for (s, pr) in seqs.iter().zip(&prompts) {
        check_all(&p, *s, pr);
    }
    let st = p.stats();
    assert!(st.swap_ins >= 1, "{st:?}");
    assert!(st.resident_blocks <= 8, "{st:?}");
    let m = p.stats();
    assert_eq!(m.blocks, 15);
}

#[test]
fn bad_input_is_typed() {
    let p = pool(MIB);
    let (s, _) = p.start(&[1, 2, 3]).unwrap();
    assert!(matches!(
        p.append(s, &[1, 2], &[0u8; 10]),
        Err(KvError::BadLength { .. })
    ));
    append_all(&p, s, 0, &[1, 2, 3]);
    let mut buf = vec![0u8; BPT as usize];
    assert!(matches!(
        p.read_token(s, 3, &mut buf),
        Err(KvError::OutOfRange { position: 3, .. })
    ));
    assert!(matches!(
        p.read_token(s, 0, &mut [0u8; 3]),
        Err(KvError::BadLength { .. })
    ));
    p.finish(s).unwrap();
    assert!(matches!(p.finish(s), Err(KvError::UnknownSequence(_))));
    assert!(matches!(
        p.append(s, &[1], &vec![0u8; BPT as usize]),
        Err(KvError::UnknownSequence(_))
    ));
    // A budget below one block is refused at construction.
    let caps = [4 * MIB, 16 * MIB, 64 * MIB];
    let mut c = ManagerConfig::with_capacities(caps[0], caps[1], caps[2]);
    c.budgets.bytes[Tier::Host.index()][TensorKind::KvCache.index()] = KIB;
    let m = MemoryManager::new(c).unwrap();
    let cfg = KvPoolConfig {
        block_tokens: 16,
        bytes_per_token: BPT,
        compute_tier: Tier::Host,
    };
    assert!(matches!(
        KvPool::new(m.clone(), cfg),
        Err(KvError::InvalidConfig(_))
    ));
    assert!(matches!(
        KvPool::new(
            m,
            KvPoolConfig {
                block_tokens: 0,
                ..cfg
            }
        ),
        Err(KvError::InvalidConfig(_))
    ));
}

#[test]
fn eight_threads_of_sequences_with_shared_prefixes_keep_every_token() {
    // 24 blocks of room; 8 threads each run 6 sequences of up to 70 tokens over one of two
    // system prompts, so sharing, sealing, swapping and freeing all interleave.
    let p = Arc::new(pool(96 * KIB));
    // One long-lived sequence per system prompt keeps its sealed blocks shareable.
    let anchors: Vec<_> = (0..2u32)
        .map(|k| {
            let mut prompt: Vec<u32> = (0..33).map(|i| k * 100_000 + i).collect();
            prompt.push(7);
            let (s, _) = p.start(&prompt).unwrap();
            append_all(&p, s, 0, &prompt);
            (s, prompt)
        })
        .collect();
    let threads: Vec<_> = (0..8u32)
        .map(|t| {
            let p = p.clone();
            std::thread::spawn(move || {
                for r in 0..6u32 {
                    let system: Vec<u32> = (0..33).map(|i| (t % 2) * 100_000 + i).collect();
                    let mut prompt = system.clone();
                    prompt.extend((0..(5 + (t + r) % 7)).map(|i| t * 1000 + r * 10 + i));
                    let (s, reused) = p.start(&prompt).unwrap();
                    assert_eq!(reused, 32, "the anchor's two sealed blocks");
                    append_all(&p, s, reused, &prompt[reused..]);
                    // Decode a few tokens one by one.
                    let mut all = prompt.clone();
                    for k in 0..(10 + r) {
                        let tok = 50_000 + t * 100 + k;
                        append_all(&p, s, all.len(), &[tok]);
                        all.push(tok);
                    }
                    check_all(&p, s, &all);
                    p.finish(s).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    for (s, prompt) in anchors {
        check_all(&p, s, &prompt);
        p.finish(s).unwrap();
    }
    let s = p.stats();
    assert_eq!((s.sequences, s.blocks, s.block_refs), (0, 0, 0), "{s:?}");
    assert_eq!(s.prefix_hit_tokens, 8 * 6 * 32, "{s:?}");
}

/// A 4 MiB host whose budgets are oversubscribed: KV may take 1 MiB, activations 4 MiB.
fn crowded_pool(slab: bool) -> (KvPool, MemoryManager) {
    let caps = [4 * MIB, 4 * MIB, 64 * MIB];
    let mut c = ManagerConfig::with_capacities(caps[0], caps[1], caps[2]);
    for t in Tier::ALL {
        for k in TensorKind::ALL {
            c.budgets.bytes[t.index()][k.index()] = caps[t.index()];
        }
    }
    c.budgets.bytes[Tier::Host.index()][TensorKind::KvCache.index()] = MIB;
    c.shards = 4;
    if slab {
        c.kv_block_bytes = Some(16 * BPT);
    }
    let m = MemoryManager::new(c).unwrap();
    let cfg = KvPoolConfig {
        block_tokens: 16,
        bytes_per_token: BPT,
        compute_tier: Tier::Host,
    };
    (KvPool::new(m.clone(), cfg).unwrap(), m)
}

/// Fills the host with activations, then asks for 200 KV blocks.
fn kv_after_activations_fill_the_host(slab: bool) -> Result<(), KvError> {
    let (p, m) = crowded_pool(slab);
    let len = 64 * KIB as usize;
    let acts: Vec<_> = (0..64u64)
        .map(|i| {
            let h = m.allocate(len as u64, TensorKind::Activation, i).unwrap();
            m.write(h, 0, &vec![i as u8; len]).unwrap();
            h
        })
        .collect();
    let tokens: Vec<u32> = (0..200 * 16).collect();
    let (s, _) = p.start(&tokens[..1]).unwrap();
    let mut kv = Vec::new();
    for (i, &t) in tokens.iter().enumerate() {
        kv.extend(kv_of(i, t));
    }
    let r = p.append(s, &tokens, &kv);
    if r.is_ok() {
        check_all(&p, s, &tokens);
    }
    // Whatever happened, no activation lost a byte.
    for (i, h) in acts.into_iter().enumerate() {
        let mut buf = vec![0u8; len];
        m.read(h, 0, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == i as u8));
    }
    r
}

#[test]
fn kv_blocks_come_from_their_slab_region_which_no_other_kind_can_take() {
    // With the slab region the KV cache keeps its 1 MiB whatever the activations do (they
    // spill to the disk instead) ...
    kv_after_activations_fill_the_host(true).unwrap();
    // ... without it the activations took the whole arena and KV blocks find no room (KV
    // eviction can only evict KV). This is what the region prevents.
    assert!(matches!(
        kv_after_activations_fill_the_host(false),
        Err(KvError::Manager(vlmem::ManagerError::OutOfMemory { .. }))
    ));
}

#[test]
fn ranges_read_across_blocks_and_salts_keep_namespaces_apart() {
    let p = pool(MIB);
    let prompt: Vec<u32> = (0..50).collect();
    let (a, _) = p.start_salted(1, &prompt).unwrap();
    append_all(&p, a, 0, &prompt);
    // Another namespace with the same tokens shares nothing; the same namespace does.
    let (b, reused) = p.start_salted(2, &prompt).unwrap();
    assert_eq!(reused, 0);
    let (c, reused) = p.start_salted(1, &prompt).unwrap();
    assert_eq!(reused, 48);
    // A range over three blocks equals the token-by-token reads.
    let mut range = vec![0u8; 30 * BPT as usize];
    p.read_range(a, 10, &mut range).unwrap();
    for (k, chunk) in range.chunks(BPT as usize).enumerate() {
        assert_eq!(
            chunk,
            kv_of(10 + k, prompt[10 + k]).as_slice(),
            "token {}",
            10 + k
        );
    }
    assert!(matches!(
        p.read_range(a, 40, &mut vec![0u8; 11 * BPT as usize]),
        Err(KvError::OutOfRange { .. })
    ));
    assert!(matches!(
        p.read_range(a, 0, &mut [0u8; 3]),
        Err(KvError::BadLength { .. })
    ));
    for s in [a, b, c] {
        p.finish(s).unwrap();
    }
}
