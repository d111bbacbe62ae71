//! Image embeddings cached by content in the memory manager: a repeated image skips the
//! vision tower and the outputs stay identical; another image misses; the embeddings are
//! `VisionEmbedding` tensors of the manager.

mod common;
use common::fixture_dir;

use candle_core::Tensor;
use std::sync::Arc;
use vlmem::vision_cache::VisionCache;
use vlmem::{ManagerConfig, MemoryManager, TensorKind, Tier};
use vlmem_runner::{ImageInput, PrefillOptions, Runner};

const MIB: u64 = 1 << 20;

fn prompt_logits(runner: &Runner, images: &[ImageInput]) -> Vec<f32> {
    let ids = runner.chat_ids("Describe this image.", images).unwrap();
    let model = runner.model();
    let mut kv = model.new_kv_cache();
    let pre = model
        .prefill(&ids, images, &mut kv, PrefillOptions::default())
        .unwrap();
    let t: Tensor = pre.logits.unwrap();
    t.flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn a_repeated_image_skips_the_vision_tower_and_changes_nothing() {
    for name in ["qwen3-vl-tiny", "qwen3-vl-moe-tiny"] {
        let dir = fixture_dir(name);
        let runner = Runner::open(&dir).unwrap();
        let image = runner.load_images(&[dir.join("image0.png")]).unwrap();
        let expected = prompt_logits(&runner, &image);

        let m = MemoryManager::new(ManagerConfig::with_capacities(0, 16 * MIB, 16 * MIB)).unwrap();
        let cache = Arc::new(VisionCache::new(m.clone(), name, 4 * MIB));
        assert!(runner.model().use_vision_cache(cache.clone()));
        assert!(!runner.model().use_vision_cache(cache.clone()), "set once");
        // First use computes, the second is served from the cache; same logits both times.
        assert_eq!(prompt_logits(&runner, &image), expected, "{name} miss");
        assert_eq!(prompt_logits(&runner, &image), expected, "{name} hit");
        let s = cache.stats();
        assert_eq!((s.misses, s.hits, s.entries), (1, 1, 1), "{name}: {s:?}");
        let st = m.stats();
        assert!(st.resident.get(Tier::Host, TensorKind::VisionEmbedding) > 0);
        // A different image (the same one flipped) is another entry.
        let mut flipped = image[0].clone();
        flipped.pixel_values.reverse();
        let other = prompt_logits(&runner, std::slice::from_ref(&flipped));
        assert_ne!(other, expected);
        let s = cache.stats();
        assert_eq!((s.misses, s.hits, s.entries), (2, 1, 2), "{name}: {s:?}");
        // A trace is never served from the cache (it needs the tower's intermediates).
        let ids = runner.chat_ids("Describe this image.", &image).unwrap();
        let mut kv = runner.model().new_kv_cache();
        let pre = runner
            .model()
            .prefill(
                &ids,
                &image,
                &mut kv,
                PrefillOptions {
                    vision_trace: true,
                    ..PrefillOptions::default()
                },
            )
            .unwrap();
        assert!(pre.vision[0].trace.is_some());
        assert_eq!(cache.stats().hits, 1);
    }
}

/// An embedding larger than the whole cache is computed and used, not cached: the request
/// runs and gives the uncached logits.
#[test]
fn an_image_larger_than_the_cache_runs_uncached() {
    let dir = fixture_dir("qwen3-vl-tiny");
    let runner = Runner::open(&dir).unwrap();
    let image = runner.load_images(&[dir.join("image0.png")]).unwrap();
    let expected = prompt_logits(&runner, &image);
    let m = MemoryManager::new(ManagerConfig::with_capacities(0, 16 * MIB, 16 * MIB)).unwrap();
    // Room for a few bytes: less than any embedding.
    let cache = Arc::new(VisionCache::new(m, "tiny", 64));
    assert!(runner.model().use_vision_cache(cache.clone()));
    assert_eq!(prompt_logits(&runner, &image), expected);
    assert_eq!(prompt_logits(&runner, &image), expected);
    let s = cache.stats();
    assert_eq!((s.hits, s.entries), (0, 0), "{s:?}");
}

/// An engine built for serving (no request) has a vision cache only when told which images
/// to make room for, and its host KV budget grows with the sequences it plans for.
#[test]
fn a_serving_engine_plans_its_vision_cache_and_kv_for_many_sequences() {
    let dir = fixture_dir("qwen3-vl-tiny");
    let plain = vlmem_runner::Engine::builder(&dir).build().unwrap();
    assert!(plain.vision_cache().is_none());
    let serving = vlmem_runner::Engine::builder(&dir)
        .max_seqs(8)
        .plan_images(vec![(1024, 1024); 2])
        .build()
        .unwrap();
    let cache = serving.vision_cache().expect("a vision cache");
    assert!(cache.budget_bytes() > 0);
    let blocks = |e: &vlmem_runner::Engine| e.kv_pool().unwrap().max_resident_blocks();
    assert!(
        blocks(&serving) >= 8 * blocks(&plain) - 8,
        "{} blocks for 8 sequences, {} for one",
        blocks(&serving),
        blocks(&plain)
    );
}
