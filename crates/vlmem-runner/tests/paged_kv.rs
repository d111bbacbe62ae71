//! The KV cache in the manager's paged pool gives the same logits, bit for bit, as the
//! simple in-process cache of the same KV dtype: with room for every block, and with room for
//! only a few blocks (whole layers' sequences swapped out to the disk tier and back at every
//! step).

mod common;
use common::fixture_dir;

use candle_core::Tensor;
use std::sync::Arc;
use vlmem::{KvPool, KvPoolConfig, ManagerConfig, MemoryManager, TensorKind, Tier};
use vlmem_runner::Activations;
use vlmem_runner::kv::KvDtype;
use vlmem_runner::model::argmax;
use vlmem_runner::text::KV_CHUNK_TOKENS;
use vlmem_runner::{KvCache, KvStore, PagedKv, PrefillOptions, Runner};

const MIB: u64 = 1 << 20;

/// A paged KV store of `layers` layers of `heads x dim` in `dtype` over a new pool of
/// 16-token blocks in `m`'s host tier, and the pool.
fn paged(
    m: MemoryManager,
    layers: usize,
    heads: usize,
    dim: usize,
    dtype: KvDtype,
) -> (Arc<KvPool>, PagedKv) {
    let pool = Arc::new(
        KvPool::new(
            m,
            KvPoolConfig {
                block_tokens: 16,
                bytes_per_token: dtype.token_bytes(heads as u64, dim as u64).unwrap(),
                compute_tier: Tier::Host,
            },
        )
        .unwrap(),
    );
    let kv = PagedKv::new(pool.clone(), layers, heads, dim, dtype).unwrap();
    (pool, kv)
}

/// The largest absolute difference between two runs' logits, step by step.
fn max_abs(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.concat()
        .iter()
        .zip(b.concat())
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

/// Prefill and 5 greedy decode steps through `kv`; every step's logits.
fn run(runner: &Runner, kv: &mut dyn KvStore) -> Vec<Vec<f32>> {
    let dir = runner.dir().to_path_buf();
    let images = runner.load_images(&[dir.join("image0.png")]).unwrap();
    let ids = runner.chat_ids("Describe this image.", &images).unwrap();
    let model = runner.model();
    let pre = model
        .prefill(&ids, &images, kv, PrefillOptions::default())
        .unwrap();
    let first = pre.positions.next_position;
    let last = |t: Tensor| -> Vec<f32> { t.flatten_all().unwrap().to_vec1().unwrap() };
    let mut all = vec![last(pre.logits.unwrap())];
    for position in first..first + 5 {
        let next = argmax(all.last().unwrap());
        all.push(last(model.decode_step(next, position, kv).unwrap()));
    }
    all
}

#[test]
fn paged_kv_matches_the_simple_cache_whatever_the_room() {
    for (name, dtype) in [
        ("qwen3-vl-tiny", KvDtype::F32),
        ("qwen3-vl-moe-tiny", KvDtype::F32),
        ("qwen3-vl-tiny", KvDtype::Bf16),
        ("qwen3-vl-moe-tiny", KvDtype::Q8_0),
    ] {
        let runner = Runner::open(&fixture_dir(name)).unwrap();
        let text = &runner.model().config().text;
        let (layers, kv_heads, head_dim) = (
            text.num_hidden_layers as usize,
            text.num_key_value_heads as usize,
            text.head_dim as usize,
        );
        let expected = run(&runner, &mut KvCache::with_dtype(layers, dtype));
        if dtype == KvDtype::F32 {
            assert_eq!(
                expected,
                run(&runner, &mut runner.model().new_kv_cache()),
                "the model's own cache is f32"
            );
        }
        let bytes_per_token = dtype.token_bytes(kv_heads as u64, head_dim as u64).unwrap();
        let block_bytes = 16 * bytes_per_token;
        // Ample room, then room for 3 blocks: most layers live on the disk between uses.
        for host_kv_bytes in [8 * MIB, 3 * block_bytes] {
            let mut c = ManagerConfig::with_capacities(0, 16 * MIB, 16 * MIB);
            c.budgets.bytes[Tier::Host.index()][TensorKind::KvCache.index()] = host_kv_bytes;
            c.disk.preallocate = false;
            let m = MemoryManager::new(c).unwrap();
            let (pool, mut kv) = paged(m.clone(), layers, kv_heads, head_dim, dtype);
            let got = run(&runner, &mut kv);
            assert_eq!(
                got, expected,
                "{name} in {dtype} with {host_kv_bytes} bytes of KV room"
            );
            let s = pool.stats();
            assert!(s.blocks as usize >= layers, "{s:?}");
            if host_kv_bytes < MIB {
                // Never more than the room on the host; the rest went to the disk and came
                // back (whole sequences swapped, or a sequence's own oldest blocks moved down
                // and brought back one at a time).
                assert!(s.resident_blocks <= 3, "{s:?}");
                let counters = m.stats().counters;
                assert!(counters.write_backs[Tier::Host.index()] > 0, "{s:?}");
                assert!(counters.bytes_in[Tier::Host.index()] > 0, "{s:?}");
            }
            drop(kv);
            assert_eq!(pool.stats().blocks, 0);
        }
    }
}

#[test]
fn generation_through_the_paged_pool_matches() {
    let dir = fixture_dir("qwen3-vl-tiny");
    let runner = Runner::open(&dir).unwrap();
    let images = runner.load_images(&[dir.join("image0.png")]).unwrap();
    let ids = runner.chat_ids("Describe this image.", &images).unwrap();
    let opts = vlmem_runner::GenerateOptions {
        max_new_tokens: 6,
        stop_ids: vec![],
        ..Default::default()
    };
    let model = runner.model();
    let plain = model.generate(&ids, &images, &opts, &mut |_| {}).unwrap();
    let text = &model.config().text;
    let (layers, heads, dim) = (
        text.num_hidden_layers as usize,
        text.num_key_value_heads as usize,
        text.head_dim as usize,
    );
    let m = MemoryManager::new(ManagerConfig::with_capacities(0, 16 * MIB, 16 * MIB)).unwrap();
    let (_, mut kv) = paged(m, layers, heads, dim, KvDtype::F32);
    let paged = model
        .generate_in(&ids, &images, &opts, &mut kv, &mut |_| {})
        .unwrap();
    assert_eq!(paged.generated_ids, plain.generated_ids);
    assert_eq!(paged.generated_logits, plain.generated_logits);
}

/// Decode with its activations in the manager's step arena: through the paged pool (ample
/// room, and room for 3 blocks so layers swap out and back) the logits equal, bit for bit,
/// the arena path through the simple cache, and they agree with the tensor-library path
/// (the same arithmetic, summed in another order) within 1e-5 with the same greedy ids.
/// With no activation budget there is no arena, and the generation says why.
#[test]
fn decode_in_the_step_arena_matches_with_either_cache() {
    for name in ["qwen3-vl-tiny", "qwen3-vl-moe-tiny-released-layout"] {
        let dir = fixture_dir(name);
        let plain_runner = Runner::open(&dir).unwrap();
        let images = plain_runner.load_images(&[dir.join("image0.png")]).unwrap();
        let ids = plain_runner
            .chat_ids("Describe this image.", &images)
            .unwrap();
        let opts = vlmem_runner::GenerateOptions {
            max_new_tokens: 6,
            stop_ids: vec![],
            ..Default::default()
        };
        let plain = plain_runner
            .model()
            .generate(&ids, &images, &opts, &mut |_| {})
            .unwrap();
        assert!(matches!(plain.activations, Activations::InProcess { .. }));
        let text = &plain_runner.model().config().text;
        let (layers, heads, dim) = (
            text.num_hidden_layers as usize,
            text.num_key_value_heads as usize,
            text.head_dim as usize,
        );
        let bytes_per_token = KvDtype::F32.token_bytes(heads as u64, dim as u64).unwrap();
        let run = |host_kv_bytes: Option<u64>, activation_bytes: u64| {
            let mut c = ManagerConfig::with_capacities(0, 16 * MIB, 16 * MIB);
            c.budgets.bytes[Tier::Host.index()][TensorKind::Activation.index()] = activation_bytes;
            c.disk.preallocate = false;
            if let Some(b) = host_kv_bytes {
                c.budgets.bytes[Tier::Host.index()][TensorKind::KvCache.index()] = b;
            }
            let m = MemoryManager::new(c).unwrap();
            let runner = Runner::open(&dir).unwrap();
            assert!(runner.model().use_step_arena(m.clone(), Tier::Host));
            let g = match host_kv_bytes {
                None => runner
                    .model()
                    .generate(&ids, &images, &opts, &mut |_| {})
                    .unwrap(),
                Some(_) => {
                    let (_, mut kv) = paged(m.clone(), layers, heads, dim, KvDtype::F32);
                    runner
                        .model()
                        .generate_in(&ids, &images, &opts, &mut kv, &mut |_| {})
                        .unwrap()
                }
            };
            assert_eq!(m.stats().pins, 0);
            g
        };
        let in_arena = run(None, 4 * MIB);
        let Activations::Arena {
            steps,
            peak_bytes,
            capacity_bytes,
            ..
        } = in_arena.activations
        else {
            panic!("{name}: {:?}", in_arena.activations);
        };
        assert_eq!(steps, 5);
        assert!(peak_bytes <= capacity_bytes);
        assert_eq!(in_arena.generated_ids, plain.generated_ids, "{name}");
        let err = max_abs(&in_arena.generated_logits, &plain.generated_logits);
        assert!(
            err < 1e-5,
            "{name}: arena vs tensor library max-abs {err:e}"
        );
        for kv_room in [8 * MIB, 3 * 16 * bytes_per_token] {
            let paged = run(Some(kv_room), 4 * MIB);
            assert!(matches!(paged.activations, Activations::Arena { .. }));
            assert_eq!(paged.generated_ids, in_arena.generated_ids, "{name}");
            assert_eq!(
                paged.generated_logits, in_arena.generated_logits,
                "{name}, {kv_room} B of KV room"
            );
        }
        // No activation budget: the tensor library's buffers, and the reason.
        let outside = run(None, 0);
        match &outside.activations {
            Activations::InProcess { reason } => {
                assert!(reason.contains("step arena"), "{reason}")
            }
            other => panic!("{name}: {other:?}"),
        }
        assert_eq!(outside.generated_logits, plain.generated_logits, "{name}");
    }
}

/// A context longer than the arena's KV chunk ([`KV_CHUNK_TOKENS`]): each decode step's
/// attention reads the cache in several chunks (a running softmax across them), through
/// both caches, and still agrees with the tensor library's path within 1e-5, same ids.
#[test]
fn decode_in_the_arena_over_several_kv_chunks() {
    for name in ["qwen3-vl-tiny", "qwen3-vl-moe-tiny"] {
        let dir = fixture_dir(name);
        let runner = Runner::open(&dir).unwrap();
        let ids: Vec<u32> = (0..KV_CHUNK_TOKENS as u32 * 2 + 37)
            .map(|i| 10 + (i * 7) % 900)
            .collect();
        let opts = vlmem_runner::GenerateOptions {
            max_new_tokens: 4,
            stop_ids: vec![],
            ..Default::default()
        };
        let plain = runner
            .model()
            .generate(&ids, &[], &opts, &mut |_| {})
            .unwrap();
        let text = &runner.model().config().text;
        let (layers, heads, dim) = (
            text.num_hidden_layers as usize,
            text.num_key_value_heads as usize,
            text.head_dim as usize,
        );
        let mut results = Vec::new();
        for through_pool in [false, true] {
            let m =
                MemoryManager::new(ManagerConfig::with_capacities(0, 64 * MIB, 16 * MIB)).unwrap();
            let r = Runner::open(&dir).unwrap();
            assert!(r.model().use_step_arena(m.clone(), Tier::Host));
            let g = if through_pool {
                let (_, mut kv) = paged(m.clone(), layers, heads, dim, KvDtype::F32);
                r.model()
                    .generate_in(&ids, &[], &opts, &mut kv, &mut |_| {})
                    .unwrap()
            } else {
                r.model().generate(&ids, &[], &opts, &mut |_| {}).unwrap()
            };
            assert!(
                matches!(g.activations, Activations::Arena { steps: 3, .. }),
                "{name}: {:?}",
                g.activations
            );
            assert_eq!(g.generated_ids, plain.generated_ids, "{name}");
            let err = max_abs(&g.generated_logits, &plain.generated_logits);
            assert!(err < 1e-5, "{name} (paged {through_pool}): max-abs {err:e}");
            results.push(g.generated_logits);
        }
        assert_eq!(results[0], results[1], "{name}: the two caches differ");
    }
}
