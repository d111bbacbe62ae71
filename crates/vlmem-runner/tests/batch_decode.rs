//! A batched decode step gives each sequence what it gets alone. On every fixture, requests
//! mixing prompt lengths and images are generated one at a time by the engine, then
//! together through `Qwen3Vl::decode_batch` in batches of 1, 3 and 8 (sequences leaving the
//! batch as their own replies end): the greedy ids are identical and every step's logits
//! are within 1e-4 of the request's alone; a batch of one is the single-row step bit for bit.

mod common;
use common::{FIXTURES, fixture_dir, ids as ids_of, max_abs};

use vlmem_runner::kv::KvDtype;
use vlmem_runner::model::argmax;
use vlmem_runner::{
    BatchRow, Engine, ImageInput, KvCache, KvStore, PrefillOptions, Request, RequestImage,
    SamplingParams,
};

/// Tokens each request generates at most.
const NEW_TOKENS: usize = 6;

/// `n` text ids below `bound`, from `seed`.
fn text_ids(n: usize, seed: u32, bound: u32) -> Vec<u32> {
    let mut x = seed.wrapping_mul(0x9E37_79B9) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x % bound
        })
        .collect()
}

/// A request prepared by the engine: its ids and preprocessed images.
struct Prepared {
    ids: Vec<u32>,
    images: Vec<ImageInput>,
}

/// The eight requests: the reference prompt with its image twice, text prompts of six
/// lengths.
fn requests(engine: &Engine, fixture: &str) -> Vec<(Request, Prepared)> {
    let dir = fixture_dir(fixture);
    // Text ids below the vision tokens and inside the vocabulary.
    let cfg = engine.runner().model().config();
    let below = [
        cfg.text.vocab_size as u32,
        cfg.image_token_id,
        cfg.video_token_id,
        cfg.vision_start_token_id,
        cfg.vision_end_token_id,
    ]
    .into_iter()
    .min()
    .unwrap();
    let with_image = || {
        Request::ids(ids_of(&common::reference(&dir)["input_ids"]))
            .image(RequestImage::Path(dir.join("image0.png")))
    };
    let all = [
        with_image(),
        Request::ids(text_ids(5, 1, below)),
        Request::ids(text_ids(11, 2, below)),
        Request::ids(text_ids(2, 3, below)),
        with_image(),
        Request::ids(text_ids(17, 4, below)),
        Request::ids(text_ids(8, 5, below)),
        Request::ids(text_ids(1, 6, below)),
    ];
    all.into_iter()
        .map(|r| {
            let r = r
                .max_new_tokens(NEW_TOKENS)
                .sampling(SamplingParams::greedy());
            let (ids, images) = common::prepared(engine, &r);
            (r, Prepared { ids, images })
        })
        .collect()
}

/// Each request's greedy ids and generated logits, generated together in one batch: every
/// prompt prefilled, then decode steps over the sequences still running, a sequence leaving
/// when it has as many ids as `alone` gave it.
fn generate_batched(
    engine: &Engine,
    prepared: &[&Prepared],
    lengths: &[usize],
) -> Vec<(Vec<u32>, Vec<Vec<f32>>)> {
    let model = engine.runner().model();
    let layers = model.config().text.num_hidden_layers as usize;
    let mut kvs: Vec<KvCache> = prepared
        .iter()
        .map(|_| KvCache::with_dtype(layers, KvDtype::F32))
        .collect();
    let mut out = Vec::new();
    let mut positions = Vec::new();
    for (p, kv) in prepared.iter().zip(kvs.iter_mut()) {
        let pre = model
            .prefill(&p.ids, &p.images, kv, PrefillOptions::default())
            .unwrap();
        let logits = pre.logits.unwrap().squeeze(0).unwrap().to_vec1().unwrap();
        out.push((vec![argmax(&logits)], vec![logits]));
        positions.push(pre.positions.next_position);
    }
    loop {
        let running: Vec<usize> = (0..prepared.len())
            .filter(|&i| out[i].0.len() < lengths[i])
            .collect();
        if running.is_empty() {
            return out;
        }
        let mut rows: Vec<BatchRow<'_>> = Vec::new();
        let mut kv_refs: Vec<Option<&mut KvCache>> = kvs.iter_mut().map(Some).collect();
        for &i in &running {
            rows.push(BatchRow {
                token: *out[i].0.last().unwrap(),
                position: positions[i],
                kv: kv_refs[i].take().unwrap() as &mut dyn KvStore,
            });
        }
        let logits = model.decode_batch(&mut rows).unwrap();
        drop(rows);
        for (&i, l) in running.iter().zip(logits) {
            out[i].0.push(argmax(&l));
            out[i].1.push(l);
            positions[i] += 1;
        }
    }
}

#[test]
fn batched_decode_matches_each_request_alone() {
    for fixture in FIXTURES {
        let engine = Engine::builder(fixture_dir(fixture))
            .kv_dtype(KvDtype::F32)
            .build()
            .unwrap();
        let reqs = requests(&engine, fixture);
        let alone: Vec<_> = reqs
            .iter()
            .map(|(r, _)| engine.generate(r, &mut |_| {}).unwrap())
            .collect();
        for batch in [1, 3, 8] {
            let prepared: Vec<&Prepared> = reqs[..batch].iter().map(|(_, p)| p).collect();
            let lengths: Vec<usize> = alone[..batch].iter().map(|a| a.ids.len()).collect();
            let got = generate_batched(&engine, &prepared, &lengths);
            let mut worst = 0f32;
            for (i, ((ids, logits), a)) in got.iter().zip(&alone).enumerate() {
                assert_eq!(ids, &a.ids, "{fixture}, batch of {batch}, request {i}");
                for (step, (l, al)) in logits.iter().zip(&a.generated_logits).enumerate() {
                    let d = max_abs(l, al);
                    worst = worst.max(d);
                    assert!(
                        d <= 1e-4,
                        "{fixture}, batch of {batch}, request {i}, step {step}: {d}"
                    );
                    if batch == 1 {
                        assert!(d == 0.0, "{fixture}: a batch of one differs by {d}");
                    }
                }
            }
            eprintln!("{fixture}: batch of {batch}: largest logit difference {worst:e}");
        }
    }
}
