//! The bundled tiny checkpoints (fixtures/, made with transformers 5.24) read byte for byte,
//! in both config layouts, dense and MoE; synthesized checkpoints read back exactly; bad
//! checkpoints give typed errors.

use std::path::{Path, PathBuf};
use vlmem_qwen3vl::checkpoint::{Checkpoint, read_header};
use vlmem_qwen3vl::math::WeightBytes;
use vlmem_qwen3vl::plan::{ModelSource, PlanRequest, plan};
use vlmem_qwen3vl::synth::{SynthOptions, synth_config};
use vlmem_qwen3vl::tensors::{Dtype, TensorClass, expected_tensors};
use vlmem_qwen3vl::{Error, Qwen3VlConfig};

const FIXTURES: [&str; 4] = [
    "qwen3-vl-tiny",
    "qwen3-vl-tiny-released-layout",
    "qwen3-vl-moe-tiny",
    "qwen3-vl-moe-tiny-released-layout",
];

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures")
        .join(name)
}

/// Bytes of the data section of a safetensors file: file size - 8 - header length.
fn data_section_bytes(path: &Path) -> u64 {
    let bytes = std::fs::read(path).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap());
    bytes.len() as u64 - 8 - header_len
}

#[test]
fn fixtures_read_byte_for_byte() {
    for name in FIXTURES {
        let dir = fixture(name);
        let ckpt = Checkpoint::open(&dir).unwrap();
        // Only model.safetensors is weights; reference.safetensors is not.
        assert_eq!(ckpt.files, vec![dir.join("model.safetensors")], "{name}");
        let data = data_section_bytes(&dir.join("model.safetensors"));
        assert_eq!(ckpt.total_bytes(), data, "{name}");
        let w = WeightBytes::of_checkpoint(&ckpt);
        assert_eq!(w.total_bytes, data);
        assert_eq!(w.other_bytes, 0, "{name}: every tensor is classified");
        assert_eq!(w.text_bytes + w.vision_bytes, data);
        // Every tensor lies inside the file.
        let len = std::fs::metadata(dir.join("model.safetensors"))
            .unwrap()
            .len();
        for t in &ckpt.tensors {
            assert!(t.file_offset_bytes + t.bytes <= len);
            assert!(t.class.is_some(), "{}", t.name);
        }
        // The plan counts exactly the same bytes.
        let model = ModelSource::resolve(dir.to_str().unwrap()).unwrap();
        let profile = vlmem_core::profile::builtin("laptop-i5-10210u-mx250").unwrap();
        let p = plan(&model, &profile, &PlanRequest::default()).unwrap();
        assert_eq!(p.weights.total_bytes, data, "{name}");
        assert_eq!(
            p.placement.gpu_bytes + p.placement.host_bytes + p.placement.disk_bytes,
            data
        );
        assert!(p.fits);
    }
}

#[test]
fn both_layouts_give_the_same_config_and_tensor_list() {
    for (a, b) in [
        ("qwen3-vl-tiny", "qwen3-vl-tiny-released-layout"),
        ("qwen3-vl-moe-tiny", "qwen3-vl-moe-tiny-released-layout"),
    ] {
        let ca = Checkpoint::open(&fixture(a)).unwrap();
        let cb = Checkpoint::open(&fixture(b)).unwrap();
        assert_eq!(ca.config, cb.config, "{a} vs {b}");
        assert_eq!(ca.tensors.len(), cb.tensors.len());
    }
    let dense = Checkpoint::open(&fixture("qwen3-vl-tiny")).unwrap().config;
    assert!(!dense.is_moe());
    assert!(dense.text.tie_word_embeddings);
    assert_eq!(dense.text.mrope_section, vec![4, 2, 2]);
    assert_eq!(dense.text.rope_theta, 5_000_000.0);
    // Special ids come from the config (the fixtures remap them).
    assert_eq!(
        (
            dense.vision_start_token_id,
            dense.vision_end_token_id,
            dense.image_token_id,
            dense.video_token_id
        ),
        (1000, 1001, 1002, 1003)
    );
    let moe = Checkpoint::open(&fixture("qwen3-vl-moe-tiny"))
        .unwrap()
        .config;
    let m = moe.text.moe.as_ref().unwrap();
    assert_eq!(
        (
            m.num_experts,
            m.num_experts_per_tok,
            m.moe_intermediate_size
        ),
        (4, 2, 48)
    );
    assert!(!moe.text.tie_word_embeddings);
}

#[test]
fn fixture_tensors_match_the_catalog_tensor_list() {
    for name in FIXTURES {
        let ckpt = Checkpoint::open(&fixture(name)).unwrap();
        let expected = expected_tensors(&ckpt.config, Dtype::BF16);
        assert_eq!(expected.len(), ckpt.tensors.len(), "{name}");
        for e in &expected {
            let t = ckpt
                .tensor(&e.name)
                .unwrap_or_else(|| panic!("{name}: {} missing", e.name));
            assert_eq!(t.dtype, e.dtype, "{}", e.name);
            assert_eq!(t.class, Some(e.class), "{}", e.name);
            if e.class == TensorClass::Expert && !name.ends_with("released-layout") {
                // transformers 5.x stores experts transposed: [E, 2I, H] and [E, H, I].
                assert_eq!(
                    t.shape,
                    vec![e.shape[0], e.shape[2], e.shape[1]],
                    "{}",
                    e.name
                );
            } else {
                assert_eq!(t.shape, e.shape, "{}", e.name);
            }
        }
    }
}

#[test]
fn sharded_synth_reads_back_exactly() {
    let cfg = Checkpoint::open(&fixture("qwen3-vl-moe-tiny-released-layout"))
        .unwrap()
        .config;
    let dir = tempfile::tempdir().unwrap();
    let opts = SynthOptions {
        shard_max_bytes: 100_000,
        seed: 7,
        ..Default::default()
    };
    let report = synth_config(cfg.clone(), dir.path(), &opts).unwrap();
    assert!(
        report.files.len() > 3,
        "sharded into {} files",
        report.files.len()
    );
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    assert_eq!(ckpt.config, cfg);
    assert_eq!(ckpt.files.len(), report.files.len());
    assert_eq!(ckpt.total_bytes(), report.data_bytes);
    let expected = expected_tensors(&cfg, Dtype::BF16);
    let mut got: Vec<_> = ckpt
        .tensors
        .iter()
        .map(|t| (t.name.clone(), t.shape.clone(), t.dtype))
        .collect();
    let mut want: Vec<_> = expected
        .iter()
        .map(|t| (t.name.clone(), t.shape.clone(), t.dtype))
        .collect();
    got.sort();
    want.sort();
    assert_eq!(got, want);
    // Same seed, same bytes; the fixture's own weights are the same size.
    let dir2 = tempfile::tempdir().unwrap();
    synth_config(cfg, dir2.path(), &opts).unwrap();
    for f in &report.files {
        let twin = dir2.path().join(f.file_name().unwrap());
        assert_eq!(std::fs::read(f).unwrap(), std::fs::read(twin).unwrap());
    }
}

#[test]
fn bad_checkpoints_are_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    // Missing folder.
    assert!(matches!(
        Checkpoint::open(&dir.path().join("nope")),
        Err(Error::Missing { .. })
    ));
    // Folder without config.json.
    assert!(matches!(
        Checkpoint::open(dir.path()),
        Err(Error::Missing { .. })
    ));
    // A config that is not Qwen3-VL.
    let cfg_path = dir.path().join("config.json");
    std::fs::write(&cfg_path, r#"{"model_type": "llama", "hidden_size": 4096}"#).unwrap();
    let err = Checkpoint::open(dir.path()).unwrap_err();
    assert!(matches!(err, Error::Config { .. }), "{err}");
    assert!(err.to_string().contains("llama"));
    // Malformed JSON.
    std::fs::write(&cfg_path, "{ not json").unwrap();
    assert!(matches!(
        Checkpoint::open(dir.path()),
        Err(Error::Config { .. })
    ));
    // A valid config but no weights.
    std::fs::copy(fixture("qwen3-vl-tiny").join("config.json"), &cfg_path).unwrap();
    assert!(matches!(
        Checkpoint::open(dir.path()),
        Err(Error::Missing { .. })
    ));
    // A truncated safetensors file.
    let good = std::fs::read(fixture("qwen3-vl-tiny").join("model.safetensors")).unwrap();
    let st = dir.path().join("model.safetensors");
    std::fs::write(&st, &good[..good.len() / 2]).unwrap();
    let err = Checkpoint::open(dir.path()).unwrap_err();
    assert!(matches!(err, Error::Safetensors { .. }), "{err}");
    // A garbled header.
    let mut garbled = good.clone();
    garbled[20] = b'}';
    std::fs::write(&st, &garbled).unwrap();
    assert!(matches!(read_header(&st), Err(Error::Safetensors { .. })));
    // An index naming a shard that is not there.
    std::fs::write(&st, &good).unwrap();
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        r#"{"weight_map": {"lm_head.weight": "model-00001-of-00002.safetensors"}}"#,
    )
    .unwrap();
    assert!(matches!(
        Checkpoint::open(dir.path()),
        Err(Error::Missing { .. })
    ));
    // Zero or impossible config values.
    let text = std::fs::read_to_string(fixture("qwen3-vl-tiny").join("config.json")).unwrap();
    for (from, to) in [
        ("\"num_attention_heads\": 4", "\"num_attention_heads\": 0"),
        ("\"num_key_value_heads\": 2", "\"num_key_value_heads\": 3"),
        (
            "\"hidden_size\": 64,\n    \"initializer_range\": 0.05,\n    \"intermediate_size\": 128,\n    \"max",
            "\"hidden_size\": 0,\n    \"initializer_range\": 0.05,\n    \"intermediate_size\": 128,\n    \"max",
        ),
        (
            "\"vision_start_token_id\": 1000",
            "\"vision_start_token_id\": -1",
        ),
    ] {
        assert!(text.contains(from), "{from}");
        let bad = text.replace(from, to);
        assert!(Qwen3VlConfig::from_json_str(&bad).is_err(), "{to}");
    }
}
