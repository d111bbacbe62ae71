//! One plan: `vlmem plan --json` and `vlmem run --json` report the same placement, tensor by
//! tensor (`placement.tensors`), and the same class budgets, for the same model, profile,
//! budgets and request; on every bundled fixture under several budgets, and on a synthesized
//! qwen3-vl-2b whose weights do not fit a 1 GiB host budget.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn vlmem(args: &[&str], cache: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vlmem"))
        .args(args)
        .env("VLMEM_CACHE", cache)
        .output()
        .expect("run vlmem")
}

/// `vlmem ARGS` with its cache folder (quantized copies) in `cache`.
fn json(args: &[&str], cache: &Path) -> serde_json::Value {
    let out = vlmem(args, cache);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("valid JSON")
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures")
        .join(name)
}

/// A PNG's width and height, from its IHDR chunk.
fn png_size(path: &Path) -> (u32, u32) {
    let b = std::fs::read(path).unwrap();
    let be = |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    (be(16), be(20))
}

/// Runs the request and plans it with the same budgets; asserts both report the same
/// placement and budgets, and returns the run's report.
fn assert_agree(
    model: &Path,
    prompt_ids: &[u32],
    image: Option<&Path>,
    max_new_tokens: usize,
    budgets: &[&str],
) -> serde_json::Value {
    assert_agree_held(model, prompt_ids, image, max_new_tokens, budgets, None)
}

/// [`assert_agree`] with the weights held in `format` (`run --quant`, `plan --dtype`).
fn assert_agree_held(
    model: &Path,
    prompt_ids: &[u32],
    image: Option<&Path>,
    max_new_tokens: usize,
    budgets: &[&str],
    format: Option<&str>,
) -> serde_json::Value {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let ids = prompt_ids
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let new = max_new_tokens.to_string();
    let dir = model.to_str().unwrap();
    let mut run = vec![
        "run",
        "--model",
        dir,
        "--prompt-ids",
        &ids,
        "--max-new-tokens",
        &new,
        "--profile",
        "laptop-i5-10210u-mx250",
        "--gpu-mem",
        "0",
        "--disk-path",
        tmp.path().to_str().unwrap(),
        "--json",
    ];
    let image_arg = image.map(|p| p.to_str().unwrap().to_string());
    if let Some(p) = &image_arg {
        run.extend(["--image", p.as_str()]);
    }
    run.extend(budgets);
    if let Some(f) = format {
        run.extend(["--quant", f]);
    }
    let ran = json(&run, &cache);
    let context = (prompt_ids.len() + max_new_tokens).to_string();
    let size = image.map(|p| {
        let (w, h) = png_size(p);
        format!("{w}x{h}")
    });
    let mut plan = vec![
        "plan",
        "--model",
        dir,
        "--profile",
        "laptop-i5-10210u-mx250",
        "--gpu-mem",
        "0",
        "--context",
        &context,
        "--json",
    ];
    if let Some(s) = &size {
        plan.extend(["--image", s.as_str()]);
    }
    plan.extend(budgets);
    if let Some(f) = format {
        plan.extend(["--dtype", f]);
    }
    let planned = json(&plan, &cache);
    let (a, b) = (&ran["placement"], &planned["placement"]);
    let tensors = a["tensors"]
        .as_array()
        .expect("run reports placement.tensors");
    assert!(!tensors.is_empty());
    for t in tensors {
        assert!(
            matches!(t["tier"].as_str(), Some("gpu" | "host" | "stream")),
            "{t}"
        );
        assert!(t["name"].is_string() && t["bytes"].is_u64(), "{t}");
    }
    assert_eq!(
        a["tensors"], b["tensors"],
        "{model:?} {budgets:?}: run and plan place tensors differently"
    );
    for field in [
        "budgets",
        "host_staging_bytes",
        "gpu_layers",
        "kv_tier",
        "kv_bytes",
    ] {
        assert_eq!(a[field], b[field], "{model:?} {budgets:?}: {field}");
    }
    ran
}

#[test]
fn plan_and_run_place_every_fixture_tensor_alike() {
    for name in [
        "qwen3-vl-tiny",
        "qwen3-vl-moe-tiny",
        "qwen3-vl-tiny-released-layout",
        "qwen3-vl-moe-tiny-released-layout",
    ] {
        let dir = fixture(name);
        // The reference prompt, with its image pads.
        let prompt = reference_prompt(&dir);
        let image = dir.join("image0.png");
        for budgets in [
            &[][..],
            &["--host-mem", "0"][..],
            &["--host-mem", "1MiB"][..],
            &["--host-mem", "3MiB"][..],
        ] {
            assert_agree(&dir, &prompt, Some(&image), 4, budgets);
        }
    }
}

#[test]
fn plan_and_run_agree_on_quantized_weights() {
    let dir = fixture("qwen3-vl-tiny");
    let prompt = reference_prompt(&dir);
    let image = dir.join("image0.png");
    for budgets in [
        &[][..],
        &["--host-mem", "0"][..],
        &["--host-mem", "1MiB"][..],
    ] {
        // Quantized at load, and planned in the same format.
        let ran = assert_agree_held(&dir, &prompt, Some(&image), 4, budgets, Some("q8_0"));
        let plain = assert_agree(&dir, &prompt, Some(&image), 4, budgets);
        let held = |r: &serde_json::Value| -> u64 {
            r["placement"]["tensors"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t["bytes"].as_u64().unwrap())
                .sum()
        };
        // 34 bytes per 32 values for nearly every weight, against 64 in bf16.
        assert!(
            held(&ran) * 3 < held(&plain) * 2,
            "{} bytes held in q8_0, {} in bf16",
            held(&ran),
            held(&plain)
        );
        // Qwen's FP8 layout, transcoded to q8_0 by run and planned so by plan.
        assert_agree(
            &fixture("qwen3-vl-tiny-fp8"),
            &prompt,
            Some(&image),
            4,
            budgets,
        );
    }
}

/// The reference prompt's ids (`input_ids` of reference.safetensors).
fn reference_prompt(dir: &Path) -> Vec<u32> {
    let r = candle_core::safetensors::load(
        dir.join("reference.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let ids: Vec<i64> = r["input_ids"].flatten_all().unwrap().to_vec1().unwrap();
    ids.into_iter().map(|i| i as u32).collect()
}

#[test]
fn plan_and_run_agree_on_a_real_sized_model_that_streams() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("qwen3-vl-2b-4-layers");
    let out = vlmem(
        &[
            "synth",
            "--model",
            "qwen3-vl-2b",
            "--out",
            dir.to_str().unwrap(),
            "--layers",
            "4",
        ],
        &tmp.path().join("cache"),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ran = assert_agree(&dir, &[1, 2, 3], None, 1, &["--host-mem", "1GiB"]);
    let tensors = ran["placement"]["tensors"].as_array().unwrap();
    let on = |tier: &str| {
        tensors
            .iter()
            .filter(|t| t["tier"] == tier)
            .map(|t| t["bytes"].as_u64().unwrap())
            .sum::<u64>()
    };
    // 1 GiB holds most of the decoder, not all of it, nor the vision tower.
    assert!(on("host") > 512 << 20, "{}", on("host"));
    assert!(on("stream") > 0);
    assert!(on("host") + ran["placement"]["host_staging_bytes"].as_u64().unwrap() <= 1 << 30);
    // What the run kept resident is what the plan keeps on the host.
    let resident = ran["memory"]["weight_bytes"]["host"].as_u64().unwrap();
    assert!(resident <= on("host"), "{resident} > {}", on("host"));
}
