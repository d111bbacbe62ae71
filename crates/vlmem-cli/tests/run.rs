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
    // 2 layers x 256 blocks of 16 tokens x 4 KiB = 2 MiB of KV for 94 + 4,000 tokens; the
    // host's KV budget holds 153 blocks (15% of 4 MiB), the disk's 102 (40% of 1 MiB).
    let out = vlmem(&[
        "run",
        "--model",
        dir.to_str().unwrap(),
        "--prompt",
        "Describe the image.",
        "--image",
        dir.join("image0.png").to_str().unwrap(),
        "--max-new-tokens",
        "4000",
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
        err.contains("the KV cache of this request needs 2.00 MiB (4094 tokens of context)")
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
