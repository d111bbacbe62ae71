//! Writes an FP8 checkpoint in the layout of Qwen's official `-FP8` releases from a bf16
//! one: every decoder layer's 2-D projection (attention and MLP) as `F8_E4M3` with a bf16
//! `weight_scale_inv` per 128 x 128 tile (scale = the tile's largest magnitude / 448, the
//! values rounded to nearest), everything else (embedding, norms, vision tower) copied in
//! bf16, and `quantization_config` in config.json. It made fixtures/qwen3-vl-tiny-fp8:
//!
//! ```sh
//! cargo run -p vlmem-qwen3vl --example make_fp8_fixture -- fixtures/qwen3-vl-tiny fixtures/qwen3-vl-tiny-fp8
//! ```

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use vlmem_qwen3vl::checkpoint::{Checkpoint, TensorInfo};
use vlmem_qwen3vl::format::fp8;
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
    let values: Vec<f32> = bytes
        .chunks_exact(2)
        .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
        .collect();
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
    let scale_bytes = scales
        .iter()
        .flat_map(|&s| half::bf16::from_f32(s).to_le_bytes())
        .collect();
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
    let mut header = serde_json::Map::new();
    let mut data = Vec::new();
    let mut put = |name: &str, dtype: &str, shape: &[u64], bytes: &[u8]| {
        let begin = data.len();
        data.extend_from_slice(bytes);
        header.insert(
            name.to_string(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [begin, data.len()]}),
        );
    };
    let mut converted = 0;
    for t in &ckpt.tensors {
        let bytes = read(t);
        let projection = matches!(t.class, Some(TensorClass::Attention | TensorClass::Mlp));
        match (projection, t.dtype, &t.shape[..]) {
            (true, Dtype::BF16, &[rows, cols]) => {
                let (q, scales) = to_fp8(&bytes, rows as usize, cols as usize);
                put(&t.name, "F8_E4M3", &t.shape, &q);
                let shape = fp8::scale_shape(rows, cols);
                put(&fp8::scale_name(&t.name), "BF16", &shape, &scales);
                converted += 1;
            }
            _ => put(&t.name, t.dtype.safetensors_name(), &t.shape, &bytes),
        }
    }
    let mut h = serde_json::to_vec(&serde_json::Value::Object(header)).expect("header");
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut file = (h.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(&h);
    file.extend_from_slice(&data);
    std::fs::write(out.join("model.safetensors"), file).expect("write weights");

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
