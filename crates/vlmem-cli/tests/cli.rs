//! The `vlmem` binary end to end: plan on the bundled fixtures (byte for byte), synth of a
//! real-sized model, and bad input (one error line, exit code 2, never a panic).

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

fn json(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("valid JSON")
}

/// Bad input: exit 2, one line on stderr starting with "error:", no panic.
fn assert_bad_input(args: &[&str]) -> String {
    let out = vlmem(args);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
    assert!(!err.contains("panicked"), "{args:?}: {err}");
    assert!(err.starts_with("error"), "{args:?}: {err}");
    err
}

#[test]
fn plan_json_matches_fixture_safetensors_byte_for_byte() {
    for name in [
        "qwen3-vl-tiny",
        "qwen3-vl-tiny-released-layout",
        "qwen3-vl-moe-tiny",
        "qwen3-vl-moe-tiny-released-layout",
    ] {
        let dir = fixture(name);
        let st = std::fs::read(dir.join("model.safetensors")).unwrap();
        let header_len = u64::from_le_bytes(st[..8].try_into().unwrap());
        let data_bytes = st.len() as u64 - 8 - header_len;
        let v = json(&vlmem(&[
            "plan",
            "--model",
            dir.to_str().unwrap(),
            "--json",
            "--image",
            "320x256",
        ]));
        assert_eq!(
            v["weights"]["total_bytes"].as_u64(),
            Some(data_bytes),
            "{name}"
        );
        let text = v["weights"]["text_bytes"].as_u64().unwrap();
        let vision = v["weights"]["vision_bytes"].as_u64().unwrap();
        assert_eq!(text + vision, data_bytes, "{name}");
        let p = &v["placement"];
        let placed = p["gpu_bytes"].as_u64().unwrap()
            + p["host_bytes"].as_u64().unwrap()
            + p["disk_bytes"].as_u64().unwrap();
        assert_eq!(placed, data_bytes);
        assert_eq!(v["fits"], true);
        // fixture: 2 layers x 2 KV heads x 16 x bf16 (the KV cache as the engine holds it by
        // default), K and V.
        assert_eq!(v["kv_dtype"], "bf16");
        assert_eq!(v["kv_bytes_per_token"].as_u64(), Some(2 * 2 * 2 * 16 * 2));
        let img = &v["images"][0];
        assert_eq!(
            (
                img["resized_width"].as_u64(),
                img["resized_height"].as_u64()
            ),
            (Some(320), Some(256))
        );
        assert_eq!(
            (img["patches"].as_u64(), img["tokens"].as_u64()),
            (Some(320), Some(80))
        );
        assert!(v["decode_tokens_per_s_bound"].as_f64().unwrap() > 0.0);
    }
}

#[test]
fn plan_of_catalog_sizes() {
    let v = json(&vlmem(&[
        "plan",
        "--model",
        "qwen3-vl-2b",
        "--json",
        "--profile",
        "laptop-i5-10210u-mx250",
        "--image",
        "1024x1024",
    ]));
    assert_eq!(
        v["weights"]["total_bytes"].as_u64(),
        Some(2 * 2_127_532_032)
    );
    assert_eq!(v["images"][0]["tokens"].as_u64(), Some(1024));
    assert_eq!(v["images"][0]["patches"].as_u64(), Some(4096));
    let v = json(&vlmem(&["plan", "--model", "qwen3-vl-8b", "--json"]));
    // 36 layers x 8 KV heads x 128 x bf16, K and V.
    assert_eq!(v["kv_bytes_per_token"].as_u64(), Some(147_456));
    // A model that cannot run is still an answer: exit 0, fits false, a reason.
    let v = json(&vlmem(&["plan", "--model", "qwen3-vl-235b-a22b", "--json"]));
    assert_eq!(v["fits"], false);
    assert!(v["reason"].as_str().unwrap().len() > 10);
    // The human table says so plainly.
    let out = vlmem(&["plan", "--model", "qwen3-vl-235b-a22b"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("CANNOT RUN"));
    // Overrides reach the plan.
    let v = json(&vlmem(&[
        "plan",
        "--model",
        "qwen3-vl-2b",
        "--json",
        "--gpu-mem",
        "0",
        "--host-mem",
        "0",
    ]));
    assert_eq!(v["placement"]["gpu_bytes"].as_u64(), Some(0));
    assert_eq!(v["placement"]["host_bytes"].as_u64(), Some(0));
    assert_eq!(
        v["placement"]["disk_bytes"].as_u64(),
        Some(2 * 2_127_532_032)
    );
}

#[test]
fn bad_input_is_one_line_and_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let missing = d.join("missing");
    assert_bad_input(&["plan", "--model", missing.to_str().unwrap()]);
    assert_bad_input(&["plan", "--model", "qwen3-vl-7b"]);
    // Not a Qwen3-VL config.
    let not_qwen = d.join("llama");
    std::fs::create_dir(&not_qwen).unwrap();
    std::fs::write(not_qwen.join("config.json"), r#"{"model_type":"llama"}"#).unwrap();
    let err = assert_bad_input(&["plan", "--model", not_qwen.to_str().unwrap()]);
    assert!(err.contains("llama"));
    // Truncated and garbled safetensors.
    let trunc = d.join("trunc");
    std::fs::create_dir(&trunc).unwrap();
    std::fs::copy(
        fixture("qwen3-vl-tiny").join("config.json"),
        trunc.join("config.json"),
    )
    .unwrap();
    let st = std::fs::read(fixture("qwen3-vl-tiny").join("model.safetensors")).unwrap();
    std::fs::write(trunc.join("model.safetensors"), &st[..100]).unwrap();
    assert_bad_input(&["plan", "--model", trunc.to_str().unwrap()]);
    let mut garbled = st.clone();
    for b in &mut garbled[8..60] {
        *b = b'#';
    }
    std::fs::write(trunc.join("model.safetensors"), &garbled).unwrap();
    assert_bad_input(&["plan", "--model", trunc.to_str().unwrap()]);
    // Unknown profile, bad images, negative context, bad sizes.
    assert_bad_input(&["plan", "--model", "qwen3-vl-2b", "--profile", "cray-1"]);
    assert_bad_input(&["plan", "--model", "qwen3-vl-2b", "--image", "0x0"]);
    assert_bad_input(&["plan", "--model", "qwen3-vl-2b", "--image", "99999999x1"]);
    assert_bad_input(&["plan", "--model", "qwen3-vl-2b", "--image", "big"]);
    assert_bad_input(&["plan", "--model", "qwen3-vl-2b", "--context", "-5"]);
    assert_bad_input(&["plan", "--model", "qwen3-vl-2b", "--batch", "0"]);
    assert_bad_input(&["plan", "--model", "qwen3-vl-2b", "--gpu-mem", "lots"]);
    assert_bad_input(&[
        "synth",
        "--model",
        "qwen3-vl-2b",
        "--layers",
        "0",
        "--out",
        d.join("s").to_str().unwrap(),
    ]);
    assert_bad_input(&[
        "synth",
        "--model",
        "nope",
        "--out",
        d.join("s").to_str().unwrap(),
    ]);
}

#[test]
fn synth_2b_two_layers_writes_the_catalog_tensor_list() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("2b");
    let o = vlmem(&[
        "synth",
        "--model",
        "qwen3-vl-2b",
        "--layers",
        "2",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // Read the header back and compare names, shapes and dtypes with the catalog's list.
    let ckpt = vlmem_qwen3vl::checkpoint::Checkpoint::open(&out).unwrap();
    let mut cfg = vlmem_qwen3vl::catalog::config("qwen3-vl-2b").unwrap();
    cfg.text.num_hidden_layers = 2;
    assert_eq!(ckpt.config, cfg);
    let expected =
        vlmem_qwen3vl::tensors::expected_tensors(&cfg, vlmem_qwen3vl::tensors::Dtype::BF16);
    let mut want: Vec<_> = expected
        .iter()
        .map(|t| (t.name.clone(), t.shape.clone(), t.dtype))
        .collect();
    let mut got: Vec<_> = ckpt
        .tensors
        .iter()
        .map(|t| (t.name.clone(), t.shape.clone(), t.dtype))
        .collect();
    want.sort();
    got.sort();
    assert_eq!(got, want);
    assert!(
        got.iter()
            .any(|t| t.0 == "model.language_model.layers.1.mlp.down_proj.weight")
    );
    assert!(
        !got.iter()
            .any(|t| t.0.starts_with("model.language_model.layers.2."))
    );
    // And the plan of it counts exactly its bytes.
    let v = json(&vlmem(&[
        "plan",
        "--model",
        out.to_str().unwrap(),
        "--json",
    ]));
    assert_eq!(
        v["weights"]["total_bytes"].as_u64(),
        Some(ckpt.total_bytes())
    );
}

#[test]
fn profiles_list_show_and_round_trip() {
    let out = vlmem(&["profile"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for name in [
        "laptop-i5-10210u-mx250",
        "desktop-gtx1060-6gb",
        "desktop-gtx1080-8gb",
        "detect",
    ] {
        assert!(text.contains(name), "{name}");
    }
    let out = vlmem(&["profile", "laptop-i5-10210u-mx250"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("MX250") && text.contains("assumption"));
    // A profile written as TOML is accepted back by --profile FILE.
    let toml = vlmem(&["profile", "desktop-gtx1080-8gb", "--toml"]);
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("mine.toml");
    std::fs::write(&f, &toml.stdout).unwrap();
    let v = json(&vlmem(&[
        "plan",
        "--model",
        "qwen3-vl-4b",
        "--profile",
        f.to_str().unwrap(),
        "--json",
    ]));
    assert_eq!(v["profile"], "desktop-gtx1080-8gb");
    let out = vlmem(&["profile", "detect"]);
    assert!(out.status.success());
    assert_bad_input(&["profile", "no-such"]);
}

#[test]
fn inspect_shows_stats_and_compaction_under_load() {
    let out = vlmem(&["inspect", "--quick", "--json"]);
    let v = json(&out);
    let table = v["table"].as_str().unwrap();
    for needle in [
        "resident / budget",
        "hit %",
        "swap latency p50",
        "compaction:",
    ] {
        assert!(table.contains(needle), "{needle} missing from\n{table}");
    }
    let prom = v["prometheus"].as_str().unwrap();
    assert!(prom.contains("vlmem_swap_latency_us{quantile=\"0.99\"}"));
    assert!(prom.contains("vlmem_compaction_moves_total"));
    let lines = v["compaction"].as_array().unwrap();
    assert_eq!(lines.len(), 3);
    assert!(lines.iter().all(|l| l["passes"].as_u64().unwrap() >= 1));
    // The mixed workload frees and reallocates while it runs: compaction finds work.
    let moved: u64 = lines.iter().map(|l| l["moved"].as_u64().unwrap()).sum();
    assert!(moved > 0, "{v}");
    assert_bad_input(&["inspect", "--workload", "nope"]);
}

/// A reader that closes the output early (`vlmem plan | head -1`) ends vlmem quietly (the
/// shell's SIGPIPE status), never with a panic.
#[test]
fn a_closed_stdout_ends_quietly() {
    use std::io::Read;
    use std::process::Stdio;
    let mut child = Command::new(env!("CARGO_BIN_EXE_vlmem"))
        .args([
            "plan",
            "--model",
            "qwen3-vl-2b",
            "--profile",
            "laptop-i5-10210u-mx250",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Close the reading end before vlmem writes.
    drop(child.stdout.take());
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    let status = child.wait().unwrap();
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        status.success() || status.code() == Some(141),
        "{status:?}: {stderr}"
    );
}
