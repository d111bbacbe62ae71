//! The runner against the reference implementation's outputs on the four bundled fixtures
//! (dense and MoE, transformers-5.x and released layouts): preprocessing, positions, chat
//! ids, every intermediate the reference recorded, the logits and greedy generation.

mod common;
use common::{fixture_dir, ids as ids_of};

use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use vlmem_runner::kv::KvDtype;
use vlmem_runner::preprocess::{load_image, preprocess};
use vlmem_runner::{GenerateOptions, KvCache, LogitsFor, PrefillOptions, Runner};

/// Logits, hidden states and embeddings: the bound the engine promises against the reference.
const TOL_ACTIVATIONS: f32 = 1e-4;
/// Preprocessed pixels.
const TOL_PIXELS: f32 = 1e-5;

fn reference(name: &str) -> HashMap<String, Tensor> {
    common::reference(&fixture_dir(name))
}

/// Max |a - b| over all elements; the element counts must agree.
fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(
        a.elem_count(),
        b.elem_count(),
        "{:?} vs {:?}",
        a.shape(),
        b.shape()
    );
    let a = a.flatten_all().unwrap().to_dtype(DType::F32).unwrap();
    let b = b.flatten_all().unwrap().to_dtype(DType::F32).unwrap();
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn check(report: &mut Vec<String>, what: &str, got: &Tensor, want: &Tensor, tol: f32) {
    let err = max_abs(got, want);
    report.push(format!("{what}: max-abs {err:.3e}"));
    assert!(err <= tol, "{what}: max-abs error {err:e} exceeds {tol:e}");
}

fn run_fixture(name: &str) {
    run_fixture_with(name, None);
}

/// [`run_fixture`] with each attention score tensor bounded to `score_bytes` when given.
fn run_fixture_with(name: &str, score_bytes: Option<usize>) {
    let dir = fixture_dir(name);
    let r = reference(name);
    let runner = Runner::open(&dir).expect("fixture opens");
    let model = runner.model();
    if let Some(bytes) = score_bytes {
        model.set_attention_score_bytes(bytes);
    }
    let mut report = Vec::new();

    // Preprocessing.
    let img = preprocess(
        &load_image(&dir.join("image0.png")).unwrap(),
        runner.preprocess_config(),
    )
    .unwrap();
    let grid: Vec<u32> = ids_of(&r["image_grid_thw"]);
    assert_eq!(
        img.grid_thw.iter().map(|&x| x as u32).collect::<Vec<_>>(),
        grid
    );
    let pixels = Tensor::from_slice(
        &img.pixel_values,
        (img.num_patches(), img.patch_len),
        &Device::Cpu,
    )
    .unwrap();
    check(
        &mut report,
        "pixel_values",
        &pixels,
        &r["pixel_values"],
        TOL_PIXELS,
    );

    // Positions.
    let ids = ids_of(&r["input_ids"]);
    let images = vec![img];
    let pos = model.positions(&ids, &images).unwrap();
    let want_pos = r["position_ids"]
        .to_dtype(DType::I64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<i64>()
        .unwrap();
    let got_pos: Vec<i64> = pos.thw.iter().flatten().copied().collect();
    assert_eq!(got_pos, want_pos, "position_ids");

    // The prompt's forward pass with every intermediate, its KV cache exact (f32): the
    // reference's bound holds for it.
    let layers = model.config().text.num_hidden_layers as usize;
    let mut kv = KvCache::with_dtype(layers, KvDtype::F32);
    let pre = model
        .prefill(
            &ids,
            &images,
            &mut kv,
            PrefillOptions {
                logits: LogitsFor::All,
                hidden_states: true,
                vision_trace: true,
            },
        )
        .unwrap();
    let v = &pre.vision[0];
    let trace = v.trace.as_ref().unwrap();
    check(
        &mut report,
        "vision.patch_embed",
        &trace.patch_embed,
        &r["vision.patch_embed"],
        TOL_ACTIVATIONS,
    );
    check(
        &mut report,
        "vision.embeddings",
        &trace.embeddings,
        &r["vision.embeddings"],
        TOL_ACTIVATIONS,
    );
    for (b, t) in trace.blocks.iter().enumerate() {
        let key = format!("vision.block.{b}");
        check(&mut report, &key, t, &r[&key], TOL_ACTIVATIONS);
    }
    check(
        &mut report,
        "image_embeds",
        &v.image_embeds,
        &r["image_embeds"],
        TOL_ACTIVATIONS,
    );
    let n_ds = r
        .keys()
        .filter(|k| k.starts_with("deepstack_embeds."))
        .count();
    assert_eq!(v.deepstack.len(), n_ds);
    for (k, t) in v.deepstack.iter().enumerate() {
        let key = format!("deepstack_embeds.{k}");
        check(&mut report, &key, t, &r[&key], TOL_ACTIVATIONS);
    }
    let n_hidden = r.keys().filter(|k| k.starts_with("hidden_states.")).count();
    assert_eq!(pre.hidden_states.len(), n_hidden);
    for (n, t) in pre.hidden_states.iter().enumerate() {
        let key = format!("hidden_states.{n}");
        check(&mut report, &key, t, &r[&key], TOL_ACTIVATIONS);
    }
    check(
        &mut report,
        "logits",
        pre.logits.as_ref().unwrap(),
        &r["logits"],
        TOL_ACTIVATIONS,
    );

    // Greedy generation with an f32 KV cache.
    let want_ids = ids_of(&r["generated_ids"]);
    let gen_ = model
        .generate_in(
            &ids,
            &images,
            &GenerateOptions {
                max_new_tokens: want_ids.len(),
                stop_ids: Vec::new(),
                ..Default::default()
            },
            &mut KvCache::with_dtype(layers, KvDtype::F32),
            &mut |_| {},
        )
        .unwrap();
    assert_eq!(gen_.generated_ids, want_ids, "generated_ids");
    let flat: Vec<f32> = gen_.generated_logits.concat();
    let got = Tensor::from_vec(
        flat,
        (want_ids.len(), gen_.generated_logits[0].len()),
        &Device::Cpu,
    )
    .unwrap();
    check(
        &mut report,
        "generated_logits",
        &got,
        &r["generated_logits"],
        TOL_ACTIVATIONS,
    );

    eprintln!("{name}:\n  {}", report.join("\n  "));
}

#[test]
fn dense_transformers5_layout_matches_reference() {
    run_fixture("qwen3-vl-tiny");
}

#[test]
fn dense_released_layout_matches_reference() {
    run_fixture("qwen3-vl-tiny-released-layout");
}

#[test]
fn moe_transformers5_layout_matches_reference() {
    run_fixture("qwen3-vl-moe-tiny");
}

#[test]
fn moe_released_layout_matches_reference() {
    run_fixture("qwen3-vl-moe-tiny-released-layout");
}

/// Attention one query row at a time (a 1-byte score bound) in the prompt's pass and the
/// vision tower, and in blocks that do not divide the rows evenly (the fixtures have 4
/// heads, 320 patches and 91 prompt tokens: 7 rows per vision block, 24 per prompt block):
/// the same outputs.
#[test]
fn attention_in_query_blocks_matches_reference() {
    for name in common::FIXTURES {
        for score_bytes in [1, 7 * 4 * 4 * 320] {
            run_fixture_with(name, Some(score_bytes));
        }
    }
}

#[test]
fn chat_prompt_ids_match_reference() {
    for name in [
        "qwen3-vl-tiny",
        "qwen3-vl-tiny-released-layout",
        "qwen3-vl-moe-tiny",
        "qwen3-vl-moe-tiny-released-layout",
    ] {
        let dir = fixture_dir(name);
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
                .unwrap();
        let chat = &json["chat_prompt"];
        let want: Vec<u32> = chat["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let runner = Runner::open(&dir).unwrap();
        let images = runner.load_images(&[dir.join("image0.png")]).unwrap();
        let got = runner
            .chat_ids(chat["user_text"].as_str().unwrap(), &images)
            .unwrap();
        assert_eq!(got, want, "{name}: chat prompt ids");
        // The reference's decode of its greedy ids, special tokens kept.
        let check = &chat["decode_check"];
        let ids: Vec<u32> = check["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let text = runner.tokenizer().unwrap().decode(&ids, false).unwrap();
        assert_eq!(text, check["text"].as_str().unwrap(), "{name}: decode");
        // The chat prompt is a valid model input with this image.
        runner.model().positions(&got, &images).unwrap();
    }
}
