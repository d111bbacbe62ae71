//! Files the checkpoint writer writes (`vlmem synth`, `vlmem quantize`, the FP8 fixture)
//! read back with [`Checkpoint::open`] and with the reference reader, the `safetensors`
//! crate, and both readers see the same tensors at the same bytes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use vlmem_qwen3vl::checkpoint::{
    Checkpoint, FORMAT_KEY_PREFIX, INDEX_FILE, ShardTensor, write_sharded,
};
use vlmem_qwen3vl::format::WeightFormat;
use vlmem_qwen3vl::quantize::{QuantizeOptions, quantize_checkpoint};
use vlmem_qwen3vl::synth::{SynthOptions, synth_config};
use vlmem_qwen3vl::tensors::Dtype;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures")
        .join(name)
}

/// Opens `dir` with both readers and checks that they agree on every tensor: name, dtype,
/// stored shape, bytes; each file's metadata says `format: pt` (when `pt`) and names
/// exactly the block-quantized tensors. Returns the checkpoint.
fn check_both_readers(dir: &Path, pt: bool) -> Checkpoint {
    let ckpt = Checkpoint::open(dir).unwrap();
    let mut seen = 0;
    for file in &ckpt.files {
        let bytes = std::fs::read(file).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .unwrap_or_else(|e| panic!("{}: {e:?}", file.display()));
        let (header_len, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        assert_eq!(header_len % 8, 0, "{}: data starts aligned", file.display());
        let mut want_meta = BTreeMap::new();
        if pt {
            want_meta.insert("format".to_string(), "pt".to_string());
        }
        for (name, view) in st.tensors() {
            let info = ckpt
                .tensor(&name)
                .unwrap_or_else(|| panic!("{name}: not seen by Checkpoint::open"));
            assert_eq!(&info.file, file, "{name}");
            assert_eq!(view.dtype().to_string(), info.dtype.safetensors_name());
            let stored: Vec<u64> = view.shape().iter().map(|&d| d as u64).collect();
            match info.format.filter(|f| !f.is_plain()) {
                Some(f) => {
                    assert_eq!(info.dtype, Dtype::U8, "{name}");
                    let mut values = stored.clone();
                    let last = values.last_mut().unwrap();
                    *last = *last / f.block_bytes() * f.block_elems();
                    assert_eq!(values, info.shape, "{name}");
                    want_meta.insert(format!("{FORMAT_KEY_PREFIX}{name}"), f.name().to_string());
                }
                None => assert_eq!(stored, info.shape, "{name}"),
            }
            let at = info.file_offset_bytes as usize;
            assert_eq!(view.data(), &bytes[at..at + info.bytes as usize], "{name}");
            seen += 1;
        }
        let got_meta: BTreeMap<String, String> = meta
            .metadata()
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect();
        assert_eq!(got_meta, want_meta, "{}", file.display());
    }
    assert_eq!(seen, ckpt.tensors.len());
    ckpt
}

#[test]
fn synthesized_checkpoints_read_back_with_both_readers() {
    let cfg = Checkpoint::open(&fixture("qwen3-vl-moe-tiny-released-layout"))
        .unwrap()
        .config;
    let dir = tempfile::tempdir().unwrap();
    for (sub, max) in [("one", u64::MAX), ("sharded", 100_000)] {
        let out = dir.path().join(sub);
        let opts = SynthOptions {
            shard_max_bytes: max,
            seed: 3,
            ..Default::default()
        };
        let report = synth_config(cfg.clone(), &out, &opts).unwrap();
        let ckpt = check_both_readers(&out, true);
        assert_eq!(ckpt.files, report.files);
        assert_eq!(ckpt.total_bytes(), report.data_bytes);
        assert_eq!(out.join(INDEX_FILE).is_file(), report.files.len() > 1);
        if sub == "sharded" {
            assert!(report.files.len() > 3, "{:?}", report.files);
        }
    }
    // Writing one file where shards were leaves no index behind to shadow it.
    let out = dir.path().join("sharded");
    synth_config(cfg, &out, &SynthOptions::default()).unwrap();
    assert!(!out.join(INDEX_FILE).exists());
    assert_eq!(check_both_readers(&out, true).files.len(), 1);
}

#[test]
fn quantized_checkpoints_read_back_with_both_readers() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["qwen3-vl-tiny", "qwen3-vl-moe-tiny", "qwen3-vl-tiny-fp8"] {
        let src = Checkpoint::open(&fixture(name)).unwrap();
        for format in [WeightFormat::Q8_0, WeightFormat::Q4_K] {
            for (sub, max) in [("one", u64::MAX), ("sharded", 64 << 10)] {
                let out = dir.path().join(format!("{name}-{format}-{sub}"));
                let opts = QuantizeOptions {
                    shard_max_bytes: max,
                    ..QuantizeOptions::new(format)
                };
                let report = quantize_checkpoint(&src, &out, &opts).unwrap();
                let ckpt = check_both_readers(&out, true);
                assert_eq!(ckpt.total_bytes(), report.written_bytes);
                // Some matrices are held in a block format and named in the metadata
                // (which one depends on each tensor's shape and role: held_format).
                assert!(
                    ckpt.tensors
                        .iter()
                        .any(|t| t.format.is_some_and(|f| !f.is_plain())),
                    "{name} in {format}: no block-quantized tensor"
                );
                assert_eq!(out.join(INDEX_FILE).is_file(), ckpt.files.len() > 1);
            }
        }
    }
}

#[test]
fn the_fp8_fixture_reads_back_with_both_readers() {
    // Written by examples/make_fp8_fixture.rs, with no metadata.
    let ckpt = check_both_readers(&fixture("qwen3-vl-tiny-fp8"), false);
    assert!(ckpt.tensors.iter().any(|t| t.dtype == Dtype::F8E4M3));
}

#[test]
fn the_writer_writes_the_fp8_fixture_byte_for_byte() {
    // The fixture's tensors, in its order, through the writer: the same file.
    let src = fixture("qwen3-vl-tiny-fp8");
    let ckpt = Checkpoint::open(&src).unwrap();
    let file = std::fs::read(src.join("model.safetensors")).unwrap();
    let headers: Vec<ShardTensor> = ckpt
        .tensors
        .iter()
        .map(|t| ShardTensor::new(&t.name, t.dtype, t.shape.clone()))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let written = write_sharded(dir.path(), &headers, u64::MAX, &BTreeMap::new(), |i, w| {
        let t = &ckpt.tensors[i];
        let at = t.file_offset_bytes as usize;
        w.write(&file[at..at + t.bytes as usize])
    })
    .unwrap();
    assert_eq!(written.files, [dir.path().join("model.safetensors")]);
    assert!(std::fs::read(&written.files[0]).unwrap() == file);
}
