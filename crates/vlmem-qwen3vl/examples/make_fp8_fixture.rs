//! Writes an FP8 checkpoint in the layout of Qwen's official `-FP8` releases from a bf16
//! one: every decoder layer's 2-D projection (attention and MLP) as `F8_E4M3` with a bf16
//! `weight_scale_inv` per 128 x 128 tile (scale = the tile's largest magnitude / 448, the
//! values rounded to nearest), everything else (embedding, norms, vision tower) copied in
//! bf16, and `quantization_config` in config.json. It made fixtures/qwen3-vl-tiny-fp8:
//!
//! ```sh
//! cargo run -p vlmem-qwen3vl --example make_fp8_fixture -- fixtures/qwen3-vl-tiny fixtures/qwen3-vl-tiny-fp8
//! ```

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use vlmem_qwen3vl::checkpoint::{Checkpoint, ShardTensor, TensorInfo, write_sharded};
use vlmem_qwen3vl::format::{WeightFormat, fp8};
use vlmem_qwen3vl::tensors::{Dtype, TensorClass};

fn read(t: &TensorInfo) -> Vec<u8> {
    let mut f = std::fs::File::open(&t.file).expect("weights open");
    f.seek(SeekFrom::Start(t.file_offset_bytes)).expect("seek");
    let mut buf = vec![0u8; t.bytes as usize];
    f.read_exact(&mut buf).expect("read");
    buf
}

/// `[rows, cols]` bf16 bytes to FP8 bytes and bf16 tile scales.
fn to_fp8(bytes: &[u8], rows: usize, cols: usize) -> (Vec<u8>, Vec<u8>) {
    let mut values = vec![0f32; rows * cols];
    WeightFormat::Bf16
        .decode_row_into(bytes, &mut values)
        .expect("a bf16 matrix of rows x cols");
    let [tile_rows, tile_cols] = fp8::scale_shape(rows as u64, cols as u64).map(|d| d as usize);
    let mut scales = vec![0f32; tile_rows * tile_cols];
    for r in 0..rows {
        for c in 0..cols {
            let s = &mut scales[(r / fp8::TILE) * tile_cols + c / fp8::TILE];
            *s = s.max(values[r * cols + c].abs() / fp8::MAX);
        }
    }
    // The scales as stored (bf16), then the values divided by them.
    let scales: Vec<f32> = scales
        .iter()
        .map(|&s| half::bf16::from_f32(if s > 0.0 { s } else { 1.0 }).to_f32())
        .collect();
    let mut q = vec![0u8; rows * cols];
    for r in 0..rows {
        for c in 0..cols {
            let s = scales[(r / fp8::TILE) * tile_cols + c / fp8::TILE];
            q[r * cols + c] = fp8::from_f32(values[r * cols + c] / s);
        }
    }
    let mut scale_bytes = vec![0u8; scales.len() * 2];
    WeightFormat::Bf16
        .encode_row_into(&scales, &mut scale_bytes)
        .expect("two bytes a scale");
    (q, scale_bytes)
}

fn main() {
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    let [src, out] = &args[..] else {
        eprintln!("usage: make_fp8_fixture SRC_DIR OUT_DIR");
        std::process::exit(2);
    };
    let ckpt = Checkpoint::open(src).expect("the source checkpoint opens");
    std::fs::create_dir_all(out).expect("out folder");
    // Each tensor's header and bytes, in the source's order.
    let mut tensors: Vec<(ShardTensor, Vec<u8>)> = Vec::new();
    let mut converted = 0;
    for t in &ckpt.tensors {
        let bytes = read(t);
        let projection = matches!(t.class, Some(TensorClass::Attention | TensorClass::Mlp));
        match (projection, t.dtype, &t.shape[..]) {
            (true, Dtype::BF16, &[rows, cols]) => {
                let (q, scales) = to_fp8(&bytes, rows as usize, cols as usize);
                tensors.push((ShardTensor::new(&t.name, Dtype::F8E4M3, t.shape.clone()), q));
                let shape = fp8::scale_shape(rows, cols).to_vec();
                let scale_name = fp8::scale_name(&t.name);
                tensors.push((ShardTensor::new(scale_name, Dtype::BF16, shape), scales));
                converted += 1;
            }
            _ => tensors.push((ShardTensor::new(&t.name, t.dtype, t.shape.clone()), bytes)),
        }
    }
    let headers: Vec<ShardTensor> = tensors.iter().map(|(h, _)| h.clone()).collect();
    // One file, no metadata, as the fixture was written.
    write_sharded(out, &headers, u64::MAX, &BTreeMap::new(), |i, w| {
        w.write(&tensors[i].1)
    })
    .expect("write weights");

    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).expect("config"))
            .expect("config is JSON");
    config["quantization_config"] = serde_json::json!({
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [128, 128],
        "modules_to_not_convert": ["lm_head", "model.visual"]
    });
    std::fs::write(
        out.join("config.json"),
        serde_json::to_string_pretty(&config).expect("config"),
    )
    .expect("write config");
    for f in [
        "tokenizer.json",
        "chat_template.json",
        "generation_config.json",
        "image0.png",
    ] {
        let from = Path::new(src).join(f);
        if from.is_file() {
            std::fs::copy(&from, out.join(f)).expect("copy");
        }
    }
    println!(
        "{converted} projections in FP8 written to {}",
        out.display()
    );
}
