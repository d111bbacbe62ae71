//! `vlmem run` end to end on the bundled fixtures: the reference prompt (ids as the reference
//! received them) with the fixture image, dumped logits within 1e-4 of the reference and the
//! greedy ids equal, whatever the tiering (`--host-mem 0 --gpu-mem 0` streams every weight
//! from the checkpoint on disk). Bad input: exit 2, one line, no panic.

use candle_core::Device;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn vlmem(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vlmem"))
        .args(args)
        .output()
        .expect("run vlmem")
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures")
        .join(name)
}

fn max_abs(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn run_matches_the_reference_in_every_tiering() {
    for name in ["qwen3-vl-tiny", "qwen3-vl-moe-tiny-released-layout"] {
        let dir = fixture(name);
        let reference =
            candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu)
                .unwrap();
        let prompt: Vec<i64> = reference["input_ids"]
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let prompt = prompt
            .iter()
            .map(|i| i.to_string())
            .collect::<Vec<_>>()
            .join(",");
        let expected_ids: Vec<i64> = reference["generated_ids"]
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        for tiering in [
            &[][..],
            &["--gpu-mem", "0", "--host-mem", "0"][..],
            &["--host-mem", "64KiB"][..],
        ] {
            let tmp = tempfile::tempdir().unwrap();
            let dump = tmp.path().join("dump.safetensors");
            let mut args = vec![
                "run",
                "--model",
                dir.to_str().unwrap(),
                "--prompt-ids",
                &prompt,
                "--image",
                dir.join("image0.png").to_str().unwrap(),
                "--max-new-tokens",
                "16",
                // The reference's KV cache is f32: compared to 1e-4, so held as it is.
                "--kv-dtype",
                "f32",
                "--profile",
                "laptop-i5-10210u-mx250",
                "--disk-path",
                tmp.path().to_str().unwrap(),
                "--dump",
                dump.to_str().unwrap(),
                "--json",
            ]
            .into_iter()
            .map(String::from)
            .collect::<Vec<_>>();
            args.extend(tiering.iter().map(|s| s.to_string()));
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            let out = vlmem(&refs);
            assert!(
                out.status.success(),
                "{name} {tiering:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            // The prefill's progress bar is drawn only on a terminal, never into a pipe.
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(!stderr.contains("vision blocks"), "{stderr}");
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            let got: Vec<i64> = v["generated_ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_i64().unwrap())
                .collect();
            assert_eq!(got, expected_ids, "{name} {tiering:?}");
            // The report sets the speed against the plan's bound for the laptop profile (0
            // where the plan says the budgets cannot hold a step, as with no RAM); no GPU
            // computes in a build without the cuda feature.
            let bound = v["plan_bound_tokens_per_s"].as_f64().unwrap();
            assert!(bound >= 0.0 && (bound > 0.0 || !tiering.is_empty()), "{v}");
            if cfg!(not(feature = "cuda")) {
                assert!(v["gpu"].is_null(), "{v}");
            }
            // Under a budget smaller than the decoder the report names the streaming plan:
            // tensors streamed, and at least one piece each (here the area is too small for
            // read-ahead buffers, so they are read on demand).
            let st = &v["memory"]["streaming"];
            if tiering == ["--host-mem", "64KiB"] {
                let tensors = st["streamed_tensors"].as_u64().unwrap();
                assert!(tensors > 0, "{v}");
                assert!(st["streamed_pieces"].as_u64().unwrap() >= tensors, "{v}");
                assert_eq!(st["buffer_bytes"], 0, "{v}");
                assert!(st["read_on_demand"].as_u64().unwrap() > 0, "{v}");
            }
            // Decode activations: in a step arena of the manager while the host's activation
            // budget holds one (not with no RAM at all, nor in 5% of 64 KiB), one step per
            // generated id after the first.
            let act = &v["activations"];
            if tiering.is_empty() {
                assert_eq!(act["in_arena"], true, "{v}");
                assert_eq!(act["tier"], "host", "{v}");
                assert_eq!(
                    act["steps"].as_u64().unwrap() as usize,
                    got.len() - 1,
                    "{v}"
                );
                let (peak, size) = (act["peak_bytes"].as_u64(), act["arena_bytes"].as_u64());
                assert!(peak > Some(0) && peak <= size, "{v}");
            } else {
                assert_eq!(act["in_arena"], false, "{v}");
                assert!(act["reason"].as_str().unwrap().contains("budget"), "{v}");
            }
            // The process's high-water mark, read from the kernel: a running vlmem holds more
            // than 1 MiB (its code alone).
            #[cfg(target_os = "linux")]
            assert!(
                v["memory"]["peak_rss_bytes"].as_u64().unwrap() > 1 << 20,
                "{v}"
            );
            if tiering.is_empty() {
                // With RAM to spare, the KV cache and the image embedding live in the
                // manager (paged blocks; one vision-cache miss for the one image).
                assert_eq!(v["kv_cache"]["paged"], true, "{v}");
                assert!(v["kv_cache"]["blocks"].as_u64().unwrap() > 0);
                assert_eq!(v["vision_cache"]["misses"], 1, "{v}");
            }
            let dumped = candle_core::safetensors::load(&dump, &Device::Cpu).unwrap();
            let logits_err = max_abs(&dumped["logits"], &reference["logits"]);
            let gen_err = max_abs(&dumped["generated_logits"], &reference["generated_logits"]);
            assert!(
                logits_err < 1e-4,
                "{name} {tiering:?}: logits max-abs {logits_err}"
            );
            assert!(
                gen_err < 1e-4,
                "{name} {tiering:?}: generated_logits max-abs {gen_err}"
            );
        }
    }
}

#[test]
fn run_bad_input_is_exit_2() {
    let dir = fixture("qwen3-vl-tiny");
    let d = dir.to_str().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let not_image = tmp.path().join("not.png");
    std::fs::write(&not_image, b"this is not a png").unwrap();
    let cases: Vec<Vec<&str>> = vec![
        vec!["run", "--model", "/no/such/folder", "--prompt", "hi"],
        vec![
            "run",
            "--model",
            d,
            "--prompt",
            "hi",
            "--image",
            not_image.to_str().unwrap(),
        ],
        vec!["run", "--model", d, "--prompt-ids", "1,2,999999"],
        vec!["run", "--model", d, "--prompt-ids", "1,x,3"],
        // Two image pads' worth of prompt, no image given.
        vec!["run", "--model", d, "--prompt-ids", "1000,1002,1002,1001"],
        vec!["run", "--model", d],
    ];
    for args in cases {
        let mut full = args.clone();
        full.extend([
            "--profile",
            "laptop-i5-10210u-mx250",
            "--disk-path",
            tmp.path().to_str().unwrap(),
        ]);
        let out = vlmem(&full);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(
            err.starts_with("error") && !err.contains("panicked"),
            "{args:?}: {err}"
        );
    }
}

/// A request whose KV cache fits neither the host's KV budget nor the disk's is refused
/// before any work, as a resource failure (exit 1), saying what it needs and what to change.
#[test]
fn a_kv_cache_with_no_room_is_refused_up_front() {
    let dir = fixture("qwen3-vl-tiny");
    let tmp = tempfile::tempdir().unwrap();
    // 2 layers x 631 blocks of 16 tokens x 2 KiB (bf16) = 2.46 MiB of KV for 94 + 10,000
    // tokens; the plan gives the host's KV budget at most half of 4 MiB, the disk's is 40% of
    // 1 MiB.
    let out = vlmem(&[
        "run",
        "--model",
        dir.to_str().unwrap(),
        "--prompt",
        "Describe the image.",
        "--image",
        dir.join("image0.png").to_str().unwrap(),
        "--max-new-tokens",
        "10000",
        "--host-mem",
        "4MiB",
        "--disk-mem",
        "1MiB",
        "--disk-path",
        tmp.path().to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("the KV cache of this request needs 2.46 MiB (10094 tokens of context)")
            && err.contains("--host-mem"),
        "{err}"
    );
    // An absurd number of new tokens is the same refusal, not an overflow.
    let out = vlmem(&[
        "run",
        "--model",
        dir.to_str().unwrap(),
        "--prompt-ids",
        "1,2,3",
        "--max-new-tokens",
        "18446744073709551615",
        "--disk-path",
        tmp.path().to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("the KV cache of this request needs") && !err.contains("panicked"),
        "{err}"
    );
}

/// `vlmem run --json` on the fixture's chat prompt and image, with `extra` flags.
fn run_json(extra: &[&str]) -> (Output, Option<serde_json::Value>) {
    run_json_in(&fixture("qwen3-vl-tiny"), extra)
}

/// [`run_json`] on the checkpoint folder `dir` (the fixture's image).
fn run_json_in(dir: &Path, extra: &[&str]) -> (Output, Option<serde_json::Value>) {
    let image = fixture("qwen3-vl-tiny").join("image0.png");
    let tmp = tempfile::tempdir().unwrap();
    let mut args = vec![
        "run",
        "--model",
        dir.to_str().unwrap(),
        "--prompt",
        "Describe this image in one sentence.",
        "--image",
        image.to_str().unwrap(),
        "--max-new-tokens",
        "12",
        "--profile",
        "laptop-i5-10210u-mx250",
        "--disk-path",
        tmp.path().to_str().unwrap(),
        "--json",
    ]
    .into_iter()
    .map(String::from)
    .collect::<Vec<_>>();
    args.extend(extra.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = vlmem(&refs);
    let v = serde_json::from_slice(&out.stdout).ok();
    (out, v)
}

fn generated(v: &serde_json::Value) -> Vec<u64> {
    v["generated_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect()
}

/// With no sampling flag the run is greedy (the fixture's generation_config.json does not ask
/// for sampling), and `--temperature 0` is that same greedy run; the JSON says why it ended
/// and which settings chose the tokens.
#[test]
fn run_temperature_zero_is_the_default_greedy_run() {
    let (out, default) = run_json(&[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let default = default.unwrap();
    let (out, zero) = run_json(&["--temperature", "0"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let zero = zero.unwrap();
    assert_eq!(generated(&default), generated(&zero));
    assert_eq!(generated(&default).len(), 12, "{default}");
    for v in [&default, &zero] {
        assert_eq!(v["finish_reason"], "length", "{v}");
        assert_eq!(v["sampling"]["mode"], "greedy", "{v}");
        assert_eq!(v["sampling"]["temperature"], 0.0, "{v}");
        assert!(v["sampling"]["seed"].is_null(), "{v}");
    }
}

/// A sampled run with a seed is repeatable, and reports the seed and settings it used.
#[test]
fn run_with_the_same_seed_samples_the_same_ids() {
    let flags = [
        "--temperature",
        "1.5",
        "--top-k",
        "50",
        "--top-p",
        "0.95",
        "--seed",
        "1234",
    ];
    let (out, a) = run_json(&flags);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (out, b) = run_json(&flags);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(generated(&a), generated(&b));
    let s = &a["sampling"];
    assert_eq!(s["mode"], "sample", "{a}");
    assert_eq!(s["seed"], 1234, "{a}");
    assert_eq!(s["top_k"], 50, "{a}");
    assert!(
        (s["temperature"].as_f64().unwrap() - 1.5).abs() < 1e-6,
        "{a}"
    );
    assert!(
        a["finish_reason"] == "length" || a["finish_reason"] == "stop",
        "{a}"
    );
    // Without a seed a sampled run still reports the one it drew, so it can be replayed.
    let (out, c) = run_json(&["--temperature", "1.5"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let c = c.unwrap();
    let seed = c["sampling"]["seed"].as_u64().expect("a drawn seed");
    let seed = seed.to_string();
    let (out, d) = run_json(&["--temperature", "1.5", "--seed", &seed]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(generated(&c), generated(&d.unwrap()));
}

/// Sampling values outside their ranges are bad input: exit 2, one line, no panic.
#[test]
fn run_refuses_bad_sampling_values_with_exit_2() {
    for flags in [
        &["--top-p", "2"][..],
        &["--top-p", "0"][..],
        &["--temperature", "-1"][..],
        &["--temperature", "NaN"][..],
        &["--min-p", "1.5"][..],
        &["--repetition-penalty", "0"][..],
        &["--presence-penalty", "inf"][..],
        &["--frequency-penalty", "-3"][..],
        &["--top-k", "-1"][..],
    ] {
        let (out, _) = run_json(flags);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flags:?}: {err}");
        assert!(
            err.starts_with("error") && !err.contains("panicked"),
            "{flags:?}: {err}"
        );
        assert_eq!(err.trim_end().lines().count(), 1, "{flags:?}: {err}");
    }
}

/// A checkpoint whose generation_config.json sets do_sample (as Qwen3-VL-Instruct's does) is
/// sampled with its settings and stops at its eos ids; `--temperature 0` makes it greedy.
#[test]
fn a_checkpoint_that_asks_to_sample_is_sampled_unless_temperature_is_zero() {
    let src = fixture("qwen3-vl-tiny");
    let tmp = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(src.join(f), tmp.path().join(f)).unwrap();
    }
    std::fs::write(
        tmp.path().join("generation_config.json"),
        r#"{"do_sample": true, "eos_token_id": [1005, 7], "top_k": 20, "top_p": 0.8,
            "repetition_penalty": 1.0, "temperature": 0.7}"#,
    )
    .unwrap();
    let (out, v) = run_json_in(tmp.path(), &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = v.unwrap();
    let s = &v["sampling"];
    assert_eq!(s["mode"], "sample", "{v}");
    assert_eq!(s["from_generation_config"], true, "{v}");
    assert_eq!(
        (
            s["temperature"].as_f64(),
            s["top_k"].as_u64(),
            s["top_p"].as_f64()
        ),
        (Some(0.7), Some(20), Some(0.8)),
        "{v}"
    );
    assert!(s["seed"].is_u64(), "{v}");
    let stops: Vec<u64> = v["stop_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect();
    assert!(stops.contains(&1005) && stops.contains(&7), "{v}");
    let (out, greedy) = run_json_in(tmp.path(), &["--temperature", "0"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let greedy = greedy.unwrap();
    assert_eq!(greedy["sampling"]["mode"], "greedy", "{greedy}");
    let (_, fixture_default) = run_json(&[]);
    assert_eq!(generated(&greedy), generated(&fixture_default.unwrap()));
    // A generation_config.json that is not JSON is bad input, not a panic.
    std::fs::write(tmp.path().join("generation_config.json"), "{ not json").unwrap();
    let (out, _) = run_json_in(tmp.path(), &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.starts_with("error") && err.contains("generation_config.json"),
        "{err}"
    );
}
