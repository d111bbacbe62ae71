//! Decode kernel speed against the memory read bound on the same buffer.
//! `cargo run --release -p vlmem-bench --example matvec_bw [huge]`
use std::time::Instant;
use vlmem_runner::kernels::{self, WeightFormat};

fn main() {
    let huge = std::env::args().any(|a| a == "huge");
    let gap_us: u64 = std::env::var("GAP_US")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let len: usize = 1 << 30;
    let mut mem = vlmem_tier::HostBuffer::new(len, huge).unwrap();
    let buf = mem.as_mut_slice();
    for (i, b) in buf.iter_mut().enumerate() {
        *b = ((i * 7) % 61) as u8 + 0x20;
    }
    let shapes = vlmem_bench::QWEN3VL_2B_LAYER_SHAPES;
    let layer_bytes: usize = shapes.iter().map(|(r, c)| r * c * 2).sum();
    let layers = len / layer_bytes;
    let x: Vec<f32> = (0..6144).map(|i| (i as f32 * 0.001).sin()).collect();
    if std::env::var("LMHEAD").is_ok() {
        lm_head_probe(buf);
        return;
    }
    for round in 0..3 {
        let t = Instant::now();
        let mut sum = 0f32;
        let mut in_kernel = 0f64;
        for l in 0..layers {
            let mut off = l * layer_bytes;
            for &(r, c) in &shapes {
                let w = &buf[off..off + r * c * 2];
                if gap_us > 0 {
                    std::thread::sleep(std::time::Duration::from_micros(gap_us));
                }
                let t0 = Instant::now();
                let y = kernels::matvec(w, WeightFormat::Bf16, r, c, &x[..c]).unwrap();
                in_kernel += t0.elapsed().as_secs_f64();
                sum += y[0];
                off += r * c * 2;
            }
        }
        let _ = t;
        let mv = (layers * layer_bytes) as f64 / in_kernel / 1e9;
        let t = Instant::now();
        let s = kernels::read_bandwidth_probe(&buf[..layers * layer_bytes]);
        let rd = (layers * layer_bytes) as f64 / t.elapsed().as_secs_f64() / 1e9;
        std::hint::black_box((sum, s));
        println!(
            "round {round} huge={huge}: matvec {mv:.1} GB/s, read probe {rd:.1} GB/s, ratio {:.2}",
            mv / rd
        );
    }
}

#[allow(dead_code)]
fn lm_head_probe(buf: &[u8]) {
    let (r, c) = (151936usize, 2048usize);
    let w = &buf[..r * c * 2];
    let x: Vec<f32> = (0..c).map(|i| (i as f32 * 0.001).sin()).collect();
    for _ in 0..5 {
        let t = Instant::now();
        let y = kernels::matvec(w, WeightFormat::Bf16, r, c, &x).unwrap();
        let s = t.elapsed().as_secs_f64();
        std::hint::black_box(&y);
        println!(
            "lm_head-shaped matvec: {:.1} GB/s",
            (r * c * 2) as f64 / s / 1e9
        );
    }
}
