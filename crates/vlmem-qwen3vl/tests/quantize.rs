//! `vlmem quantize` on the bundled checkpoints: the folder it writes opens as a checkpoint,
//! holds each tensor in the format the plan's math chooses (so its plan equals its
//! source's plan in that format), holds exactly the blocks of the source's values, and is
//! never left half-written.

use std::path::{Path, PathBuf};
use vlmem_qwen3vl::checkpoint::Checkpoint;
use vlmem_qwen3vl::format::{WeightFormat, q8_0};
use vlmem_qwen3vl::math::{WeightBytes, WeightTensor};
use vlmem_qwen3vl::quantize::{
    NOTE_FILE, QuantizeOptions, QuantizeReport, quantize_checkpoint, quantized_copy,
};
use vlmem_qwen3vl::tensors::Dtype;

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

fn read_tensor(ckpt: &Checkpoint, name: &str) -> Vec<u8> {
    use std::io::{Read, Seek, SeekFrom};
    let t = ckpt.tensor(name).unwrap();
    let mut f = std::fs::File::open(&t.file).unwrap();
    f.seek(SeekFrom::Start(t.file_offset_bytes)).unwrap();
    let mut buf = vec![0u8; t.bytes as usize];
    f.read_exact(&mut buf).unwrap();
    buf
}

fn values_of(ckpt: &Checkpoint, name: &str) -> Vec<f32> {
    let t = ckpt.tensor(name).unwrap();
    let bytes = read_tensor(ckpt, name);
    match t.dtype {
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect(),
        other => panic!("{name}: {other}"),
    }
}

fn quantize(name: &str, format: WeightFormat) -> (tempfile::TempDir, Checkpoint, QuantizeReport) {
    let src = Checkpoint::open(&fixture(name)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("q");
    let report = quantize_checkpoint(&src, &out, &QuantizeOptions::new(format)).unwrap();
    let ckpt = Checkpoint::open(&out).unwrap();
    (dir, ckpt, report)
}

#[test]
fn quantized_folders_hold_what_the_plan_counts() {
    for name in FIXTURES {
        let src = Checkpoint::open(&fixture(name)).unwrap();
        let (_dir, q, report) = quantize(name, WeightFormat::Q8_0);
        assert_eq!(q.config, src.config, "{name}");
        assert_eq!(q.tensors.len(), src.tensors.len(), "{name}");
        let mut quantized = 0;
        for s in &src.tensors {
            let t = q.tensor(&s.name).unwrap();
            let want = WeightTensor::from(s).held_format(Some(WeightFormat::Q8_0));
            assert_eq!(t.format, want, "{name} {}", s.name);
            assert_eq!(t.shape, s.shape, "{name} {}", s.name);
            if t.format == Some(WeightFormat::Q8_0) {
                quantized += 1;
                assert_eq!(t.dtype, Dtype::U8);
            } else {
                assert_eq!((t.dtype, t.bytes), (s.dtype, s.bytes), "{}", s.name);
                assert_eq!(read_tensor(&q, &s.name), read_tensor(&src, &s.name));
            }
        }
        assert!(quantized > 0, "{name}: nothing quantized");
        // The quantized folder's bytes are the source's bytes held in q8_0, class by class.
        let src_tensors = WeightTensor::of_checkpoint(&src);
        let held = WeightBytes::of_tensors(&src_tensors, Some(WeightFormat::Q8_0)).unwrap();
        assert_eq!(WeightBytes::of_checkpoint(&q), held, "{name}");
        assert_eq!(report.written_bytes, held.total_bytes, "{name}");
        assert_eq!(report.tensors_by_format["q8_0"], quantized, "{name}");
        // And asking for q8_0 again changes nothing.
        let q_tensors = WeightTensor::of_checkpoint(&q);
        assert_eq!(
            WeightBytes::of_tensors(&q_tensors, Some(WeightFormat::Q8_0)).unwrap(),
            held
        );
    }
}

#[test]
fn quantized_blocks_are_the_source_rows_quantized() {
    let name = "qwen3-vl-tiny";
    let src = Checkpoint::open(&fixture(name)).unwrap();
    let (_dir, q, _) = quantize(name, WeightFormat::Q8_0);
    let mut checked = 0;
    for t in q
        .tensors
        .iter()
        .filter(|t| t.format == Some(WeightFormat::Q8_0))
    {
        let values = values_of(&src, &t.name);
        let cols = *t.shape.last().unwrap() as usize;
        let want: Vec<u8> = values
            .chunks_exact(cols)
            .flat_map(|row| q8_0::quantize_row(row).unwrap())
            .collect();
        assert_eq!(read_tensor(&q, &t.name), want, "{}", t.name);
        let mut back = vec![0f32; values.len()];
        q8_0::dequantize_row_into(&read_tensor(&q, &t.name), &mut back).unwrap();
        // Each value within half a step of its block's scale (amax / 127).
        for (block, (v, b)) in values.chunks(32).zip(back.chunks(32)).enumerate() {
            let amax = v.iter().fold(0f32, |m, x| m.max(x.abs()));
            for (x, y) in v.iter().zip(b) {
                assert!(
                    (x - y).abs() <= amax / 127.0 * 0.5 + amax * 1e-3,
                    "{} block {block}: {x} vs {y}",
                    t.name
                );
            }
        }
        checked += 1;
    }
    assert!(checked >= 10, "{checked}");
}

#[test]
fn the_folder_carries_the_other_files_and_a_note() {
    let (_dir, q, report) = quantize("qwen3-vl-tiny", WeightFormat::Q8_0);
    for f in [
        "config.json",
        "tokenizer.json",
        "chat_template.json",
        "generation_config.json",
    ] {
        assert_eq!(
            std::fs::read(q.dir.join(f)).unwrap(),
            std::fs::read(fixture("qwen3-vl-tiny").join(f)).unwrap(),
            "{f}"
        );
    }
    assert!(!q.dir.join("reference.safetensors").exists());
    let note: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(q.dir.join(NOTE_FILE)).unwrap()).unwrap();
    assert_eq!(note["format"], "q8_0");
    assert_eq!(note["written_bytes"], report.written_bytes);
}

#[test]
fn shards_split_a_large_model_with_an_index() {
    let src = Checkpoint::open(&fixture("qwen3-vl-tiny")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("q");
    let opts = QuantizeOptions {
        shard_max_bytes: 64 << 10,
        ..QuantizeOptions::new(WeightFormat::Q8_0)
    };
    quantize_checkpoint(&src, &out, &opts).unwrap();
    let q = Checkpoint::open(&out).unwrap();
    assert!(q.files.len() > 1, "{:?}", q.files);
    assert!(out.join("model.safetensors.index.json").is_file());
    let (_one_dir, one, _) = quantize("qwen3-vl-tiny", WeightFormat::Q8_0);
    for t in &one.tensors {
        assert_eq!(
            read_tensor(&q, &t.name),
            read_tensor(&one, &t.name),
            "{}",
            t.name
        );
    }
}

#[test]
fn refuses_what_it_cannot_do_and_leaves_nothing_behind() {
    let src = Checkpoint::open(&fixture("qwen3-vl-tiny")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let err = |out: &Path, f: WeightFormat| {
        quantize_checkpoint(&src, out, &QuantizeOptions::new(f))
            .unwrap_err()
            .to_string()
    };
    assert!(err(&dir.path().join("a"), WeightFormat::Bf16).contains("not a block format"));
    std::fs::create_dir(dir.path().join("taken")).unwrap();
    assert!(err(&dir.path().join("taken"), WeightFormat::Q8_0).contains("already exists"));

    // A quantized folder is not quantized again.
    let (_d, q, _) = quantize("qwen3-vl-tiny", WeightFormat::Q8_0);
    let again = quantize_checkpoint(
        &q,
        &dir.path().join("b"),
        &QuantizeOptions::new(WeightFormat::Q8_0),
    );
    assert!(again.unwrap_err().to_string().contains("already quantized"));

    // A source truncated after its header was read: a typed error, no folder, no partial.
    let copy = dir.path().join("src");
    std::fs::create_dir(&copy).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture("qwen3-vl-tiny").join(f), copy.join(f)).unwrap();
    }
    let ckpt = Checkpoint::open(&copy).unwrap();
    let weights = copy.join("model.safetensors");
    let len = std::fs::metadata(&weights).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&weights)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let out = dir.path().join("cut");
    let e =
        quantize_checkpoint(&ckpt, &out, &QuantizeOptions::new(WeightFormat::Q8_0)).unwrap_err();
    assert!(
        matches!(
            e,
            vlmem_qwen3vl::Error::Io { .. } | vlmem_qwen3vl::Error::Safetensors { .. }
        ),
        "{e}"
    );
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        !left.iter().any(|n| n == "cut" || n.contains("partial")),
        "{left:?}"
    );
}

#[test]
fn quantized_copies_are_made_once_and_remade_when_the_source_changes() {
    let root = tempfile::tempdir().unwrap();
    let copy = root.path().join("model");
    std::fs::create_dir(&copy).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(fixture("qwen3-vl-tiny").join(f), copy.join(f)).unwrap();
    }
    let cache = root.path().join("cache");
    let src = Checkpoint::open(&copy).unwrap();
    let first = quantized_copy(&src, WeightFormat::Q8_0, &cache, false).unwrap();
    assert!(first.written);
    assert!(first.checkpoint.dir.starts_with(&cache));
    let second = quantized_copy(&src, WeightFormat::Q8_0, &cache, false).unwrap();
    assert!(!second.written);
    assert_eq!(second.checkpoint.dir, first.checkpoint.dir);
    // Already in the format: the folder itself.
    let same = quantized_copy(&second.checkpoint, WeightFormat::Q8_0, &cache, false).unwrap();
    assert!(!same.written);
    assert_eq!(same.checkpoint.dir, first.checkpoint.dir);

    // A rewritten weight file (new length) gets a new copy.
    let weights = copy.join("model.safetensors");
    let mut bytes = std::fs::read(&weights).unwrap();
    bytes.extend_from_slice(&[0u8; 8]);
    std::fs::write(&weights, bytes).unwrap();
    let changed = Checkpoint::open(&copy).unwrap();
    let third = quantized_copy(&changed, WeightFormat::Q8_0, &cache, false).unwrap();
    assert!(third.written);
    assert_ne!(third.checkpoint.dir, first.checkpoint.dir);

    // A copy left without its note (an interrupted writer) is written again.
    std::fs::remove_file(third.checkpoint.dir.join(NOTE_FILE)).unwrap();
    let fourth = quantized_copy(&changed, WeightFormat::Q8_0, &cache, false).unwrap();
    assert!(fourth.written);
}

#[test]
fn fp8_weights_transcode_to_their_values_in_blocks() {
    use vlmem_qwen3vl::format::fp8;
    let src = Checkpoint::open(&fixture("qwen3-vl-tiny-fp8")).unwrap();
    let (_dir, q, report) = quantize("qwen3-vl-tiny-fp8", WeightFormat::Q8_0);
    // The scales are folded in: one tensor fewer per FP8 weight.
    let fp8_weights: Vec<_> = src
        .tensors
        .iter()
        .filter(|t| t.dtype == Dtype::F8E4M3)
        .collect();
    assert_eq!(fp8_weights.len(), 14);
    assert_eq!(report.tensors, src.tensors.len() - fp8_weights.len());
    assert!(
        q.tensors
            .iter()
            .all(|t| fp8::weight_of_scale(&t.name).is_none())
    );
    for w in fp8_weights {
        let scales_info = src.tensor(&fp8::scale_name(&w.name)).unwrap();
        let scales = values_of(&src, &scales_info.name);
        let bytes = read_tensor(&src, &w.name);
        let cols = w.shape[1] as usize;
        let mut want = vec![0f32; bytes.len()];
        for (row, (b, o)) in bytes.chunks(cols).zip(want.chunks_mut(cols)).enumerate() {
            fp8::decode_row_into(b, row, &scales, o).unwrap();
        }
        let t = q.tensor(&w.name).unwrap();
        assert_eq!(t.format, Some(WeightFormat::Q8_0), "{}", w.name);
        let mut got = vec![0f32; want.len()];
        q8_0::dequantize_row_into(&read_tensor(&q, &w.name), &mut got).unwrap();
        for (block, (v, g)) in want.chunks(32).zip(got.chunks(32)).enumerate() {
            let amax = v.iter().fold(0f32, |m, x| m.max(x.abs()));
            for (x, y) in v.iter().zip(g) {
                assert!(
                    (x - y).abs() <= amax / 254.0 + amax * 1e-3,
                    "{} block {block}: {x} vs {y}",
                    w.name
                );
            }
        }
    }
}
