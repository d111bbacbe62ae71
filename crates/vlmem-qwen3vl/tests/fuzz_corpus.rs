//! Replays every committed fuzz corpus file (fuzz/corpus/<target>/) through the parsers the
//! fuzz targets drive, on stable, as part of `cargo test --workspace`: each input gives a
//! checked result or an error, never a panic. The checks are the fuzz targets' own.

use std::path::{Path, PathBuf};
use vlmem_qwen3vl::Qwen3VlConfig;
use vlmem_qwen3vl::checkpoint::{parse_file, parse_index};
use vlmem_qwen3vl::math::{WeightBytes, kv_bytes_per_token};
use vlmem_qwen3vl::tensors::Dtype;

fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/corpus")
        .join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "empty corpus in {}", dir.display());
    files
        .into_iter()
        .map(|p| {
            let bytes = std::fs::read(&p).unwrap();
            (p, bytes)
        })
        .collect()
}

#[test]
fn safetensors_header_corpus() {
    let mut ok = 0;
    let all = corpus("safetensors_header");
    for (path, data) in &all {
        if let Ok(entries) = parse_file(data) {
            ok += 1;
            let header_len = u64::from_le_bytes(data[..8].try_into().unwrap());
            let data_len = data.len() as u64 - 8 - header_len;
            let mut end = 0;
            for e in &entries {
                assert!(
                    e.begin <= e.end && e.end <= data_len,
                    "{}: {e:?}",
                    path.display()
                );
                assert!(e.begin >= end, "{}: overlap at {}", path.display(), e.name);
                end = e.end;
                let n: u64 = e.shape.iter().product();
                assert_eq!(n * e.dtype.size_bytes(), e.end - e.begin);
            }
        }
    }
    // The hand-made valid seeds parse; the malformed ones do not.
    assert!(ok >= 5 && ok < all.len(), "{ok} of {} parsed", all.len());
    for name in ["valid_two_tensors", "fixture_names_shrunk"] {
        let (_, d) = all.iter().find(|(p, _)| p.ends_with(name)).unwrap();
        assert!(parse_file(d).is_ok(), "{name}");
    }
    for name in [
        "len_u64_max",
        "offsets_huge",
        "shape_overflow",
        "overlap",
        "empty",
    ] {
        let (_, d) = all.iter().find(|(p, _)| p.ends_with(name)).unwrap();
        assert!(parse_file(d).is_err(), "{name}");
    }
}

#[test]
fn config_json_corpus() {
    let mut ok = 0;
    let all = corpus("config_json");
    for (path, data) in &all {
        let Ok(text) = std::str::from_utf8(data) else {
            continue;
        };
        if let Ok(cfg) = Qwen3VlConfig::from_json_str(text) {
            ok += 1;
            assert!(cfg.validate().is_ok(), "{}", path.display());
            let w = WeightBytes::of_config(&cfg, Dtype::BF16);
            assert!(w.total_bytes >= w.text_bytes);
            let _ = kv_bytes_per_token(&cfg, 2);
        }
    }
    // The four fixtures' configs parse; the malformed variants do not.
    assert!(ok >= 4 && ok < all.len(), "{ok} of {} parsed", all.len());
}

#[test]
fn safetensors_index_corpus() {
    let all = corpus("safetensors_index");
    let mut ok = 0;
    for (_, data) in &all {
        if let Ok(text) = std::str::from_utf8(data)
            && let Ok(map) = parse_index(text)
        {
            ok += 1;
            assert!(!map.is_empty());
        }
    }
    assert!(ok >= 1 && ok < all.len(), "{ok} of {} parsed", all.len());
}

/// Regression: sizes that passed `validate()` but overflowed the tensor-list arithmetic
/// (`d * spatial_merge_size^2` and friends), and an M-RoPE section sum that overflowed.
/// Each is now a typed error naming the field.
#[test]
fn oversized_vision_fields_and_mrope_overflow_are_errors() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/config_json");
    for (name, field) in [
        ("huge_merge", "spatial_merge_size"),
        ("huge_out_hidden", "out_hidden_size"),
        ("huge_temporal_patch", "temporal_patch_size"),
        ("huge_in_channels", "in_channels"),
        ("mrope_overflow", "mrope_section"),
    ] {
        let text = std::fs::read_to_string(dir.join(name)).unwrap();
        let err = Qwen3VlConfig::from_json_str(&text).unwrap_err();
        assert!(err.contains(field), "{name}: {err}");
    }
}
