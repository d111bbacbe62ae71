//! A released size's real shapes (qwen3-vl-2b: vocab 151,936, head_dim 128, M-RoPE sections
//! [24, 20, 20], a 24-block 1024-wide ViT with a 48x48 position grid, DeepStack after vision
//! blocks 5/11/17), synthesized with random weights and cut to 2 text layers so it fits a
//! test. Ignored by default (writes ~1.5 GB): `cargo test -p vlmem-runner --release --test
//! real_shapes -- --ignored --nocapture`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;
use vlmem_qwen3vl::checkpoint::Checkpoint;
use vlmem_qwen3vl::synth::{SynthOptions, synth};
use vlmem_runner::preprocess::{load_image, preprocess};
use vlmem_runner::{
    CachedWeights, CheckpointWeights, GenerateOptions, PrefillOptions, PreprocessConfig, Qwen3Vl,
};

#[test]
#[ignore = "writes a ~1.5 GB checkpoint; run by hand"]
fn qwen3_vl_2b_shapes_run_end_to_end() {
    let tmp = tempfile::tempdir().unwrap();
    let t0 = Instant::now();
    synth(
        "qwen3-vl-2b",
        tmp.path(),
        &SynthOptions {
            layers: Some(2),
            ..SynthOptions::default()
        },
    )
    .unwrap();
    eprintln!("synth: {:.1} s", t0.elapsed().as_secs_f64());
    let ckpt = Checkpoint::open(tmp.path()).unwrap();
    let device = candle_core::Device::Cpu;
    let weights = CachedWeights::new(CheckpointWeights::new(&ckpt, &device).unwrap());
    let model = Qwen3Vl::new(ckpt.config.clone(), Arc::new(weights), &device).unwrap();
    let cfg = model.config().clone();
    let fixture =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/qwen3-vl-tiny/image0.png");
    let image = preprocess(
        &load_image(&fixture).unwrap(),
        &PreprocessConfig::for_vision(&cfg.vision),
    )
    .unwrap();
    let pads = image.num_tokens(2);
    let mut ids = vec![151644u32, 872, 198, cfg.vision_start_token_id];
    ids.extend(std::iter::repeat_n(cfg.image_token_id, pads));
    ids.extend([
        cfg.vision_end_token_id,
        74785,
        419,
        2168,
        13,
        151645,
        198,
        151644,
        77091,
        198,
    ]);
    let images = vec![image];
    let t0 = Instant::now();
    let g = model
        .generate(
            &ids,
            &images,
            &GenerateOptions {
                max_new_tokens: 8,
                stop_ids: vec![],
                ..Default::default()
            },
            &mut |_| {},
        )
        .unwrap();
    eprintln!(
        "first call (stages weights): ttft {:.0} ms, decode {:.2} tok/s, ids {:?}",
        g.time_to_first_token.as_secs_f64() * 1e3,
        g.decode_tokens_per_s(),
        g.generated_ids
    );
    assert!(t0.elapsed().as_secs() < 600);
    assert!(g.generated_logits.iter().flatten().all(|v| v.is_finite()));
    // Resident now: a second run measures compute only, and agrees with the first.
    let g2 = model
        .generate(
            &ids,
            &images,
            &GenerateOptions {
                max_new_tokens: 8,
                stop_ids: vec![],
                ..Default::default()
            },
            &mut |_| {},
        )
        .unwrap();
    eprintln!(
        "resident: ttft {:.0} ms, decode {:.2} tok/s",
        g2.time_to_first_token.as_secs_f64() * 1e3,
        g2.decode_tokens_per_s()
    );
    assert_eq!(g.generated_ids, g2.generated_ids);
    // The cached decode agrees with recomputing prompt + first generated id.
    let mut seq = ids.clone();
    seq.push(g.generated_ids[0]);
    if g.generated_ids[0] != cfg.image_token_id {
        let mut kv = model.new_kv_cache();
        let pre = model
            .prefill(&seq, &images, &mut kv, PrefillOptions::default())
            .unwrap();
        let last = pre
            .logits
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let err = last
            .iter()
            .zip(&g.generated_logits[1])
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        eprintln!("cached decode vs recompute: max-abs {err:e}");
        assert!(err < 1e-4);
    }
}
