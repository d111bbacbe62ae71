//! Times the fused attention kernel against candle's score-tensor path on two shapes, the
//! vision tower's full attention (16 heads, 4,096 x 4,096, head size 64) and a causal prompt
//! block (16 heads over 8 kv heads, 512 queries, head size 128), interleaved so both see the
//! same machine load: the kernel on each instruction set over `[heads, rows, d]` operands,
//! and on the best one as the vision tower calls it (queries, keys and values read in place
//! from one projection's rows, each output row's heads side by side).
//!
//! `cargo run --release -p vlmem-runner --example attention_bench [reps] [fused]`: with
//! `fused`, only the fused kernel on each instruction set (for profiling).

use candle_core::{Device, Tensor};
use std::time::Instant;
use vlmem_runner::kernels::attention::{Isa, Output, Shape, View, attention_on, attention_views};
use vlmem_runner::nn::{
    ATTENTION_SCORE_BYTES, attention_in_row_chunks, attention_in_row_chunks_candle,
};

fn tensor(shape: (usize, usize, usize, usize), seed: u32) -> Tensor {
    let n = shape.0 * shape.1 * shape.2 * shape.3;
    let values: Vec<f32> = (0..n as u32)
        .map(|i| {
            let x = i.wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8;
            (x % 2001) as f32 / 1000.0 - 1.0
        })
        .collect();
    Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
}

fn repeat_kv(x: &Tensor, groups: usize) -> Tensor {
    let (b, h, s, d) = x.dims4().unwrap();
    x.unsqueeze(2)
        .unwrap()
        .expand((b, h, groups, s, d))
        .unwrap()
        .reshape((b, h * groups, s, d))
        .unwrap()
}

fn main() {
    let reps: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(3);
    let fused_only = std::env::args().nth(2).as_deref() == Some("fused");
    println!(
        "threads {}, attention isa {}",
        vlmem_runner::kernels::pool::global().threads(),
        Isa::best().name()
    );
    // (name, heads, kv heads, queries, keys, head size, causal past)
    let shapes = [
        ("vision 16h 4096x4096 d64", 16, 16, 4096, 4096, 64, None),
        (
            "text causal 16h/8kv 512q d128",
            16,
            8,
            512,
            512,
            128,
            Some(0),
        ),
    ];
    for (name, heads, kvh, n, keys, d, past) in shapes {
        let q = tensor((1, heads, n, d), 1);
        let k = tensor((1, kvh, keys, d), 2);
        let v = tensor((1, kvh, keys, d), 3);
        // candle's path needs the kv heads repeated (as the prompt pass does); the fused
        // kernel reads the grouped heads directly.
        let (kr, vr) = (
            repeat_kv(&k, heads / kvh).contiguous().unwrap(),
            repeat_kv(&v, heads / kvh).contiguous().unwrap(),
        );
        let scale = (d as f64).powf(-0.5);
        // Multiply-adds of Q K^T and P V over the pairs each query sees.
        let pairs = match past {
            None => (n * keys) as f64,
            Some(p) => (0..n).map(|i| (p + i + 1) as f64).sum(),
        };
        let flops = 4.0 * heads as f64 * pairs * d as f64;
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let (qs, ks, vs) = (flat(&q), flat(&k), flat(&v));
        // The same operands as one projection's rows: `[n, q heads | k heads | v heads]`.
        let pitch = (heads + 2 * kvh) * d;
        let mut rows = vec![0f32; n.max(keys) * pitch];
        for (h, src, at) in [
            (heads, &qs, 0),
            (kvh, &ks, heads * d),
            (kvh, &vs, (heads + kvh) * d),
        ] {
            let len = src.len() / (h * d);
            for hh in 0..h {
                for i in 0..len {
                    let dst = i * pitch + at + hh * d;
                    rows[dst..dst + d].copy_from_slice(&src[(hh * len + i) * d..][..d]);
                }
            }
        }
        let view = |offset: usize| View {
            values: &rows,
            offset,
            head_stride: d,
            row_stride: pitch,
        };
        let in_rows = || {
            attention_views(
                Isa::best(),
                view(0),
                view(heads * d),
                view((heads + kvh) * d),
                &Shape {
                    heads,
                    kv_heads: kvh,
                    n,
                    keys,
                    d,
                    dv: d,
                    scale: scale as f32,
                    past,
                },
                Output::RowsMajor,
            )
            .unwrap()
        };
        let mut best_rows = f64::INFINITY;
        let shape = Shape {
            heads,
            kv_heads: kvh,
            n,
            keys,
            d,
            dv: d,
            scale: scale as f32,
            past,
        };
        // The kernel alone on each vector instruction set this CPU has (the laptop: AVX2).
        let isas: Vec<Isa> = Isa::available()
            .into_iter()
            .filter(|i| *i != Isa::Scalar)
            .collect();
        let (mut best_old, mut best_new) = (f64::INFINITY, f64::INFINITY);
        let mut best_isa = vec![f64::INFINITY; isas.len()];
        let mut max_diff = 0f32;
        // Each repetition runs every variant once, so a change in machine load hits all.
        for _ in 0..reps {
            let t = Instant::now();
            std::hint::black_box(in_rows());
            best_rows = best_rows.min(t.elapsed().as_secs_f64());
            if fused_only {
                for (isa, best) in isas.iter().zip(&mut best_isa) {
                    let t = Instant::now();
                    std::hint::black_box(attention_on(*isa, &qs, &ks, &vs, &shape).unwrap());
                    *best = best.min(t.elapsed().as_secs_f64());
                }
                continue;
            }
            let t = Instant::now();
            let old =
                attention_in_row_chunks_candle(&q, &kr, &vr, scale, past, ATTENTION_SCORE_BYTES)
                    .unwrap();
            best_old = best_old.min(t.elapsed().as_secs_f64());
            let t = Instant::now();
            let new =
                attention_in_row_chunks(&q, &k, &v, scale, past, ATTENTION_SCORE_BYTES).unwrap();
            best_new = best_new.min(t.elapsed().as_secs_f64());
            for (isa, best) in isas.iter().zip(&mut best_isa) {
                let t = Instant::now();
                std::hint::black_box(attention_on(*isa, &qs, &ks, &vs, &shape).unwrap());
                *best = best.min(t.elapsed().as_secs_f64());
            }
            let diff = (old - new)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            max_diff = max_diff.max(diff);
        }
        for (isa, best) in isas.iter().zip(&best_isa) {
            println!(
                "{name}: fused on {}: {:.1} ms ({:.1} GFLOP/s)",
                isa.name(),
                best * 1e3,
                flops / best / 1e9
            );
        }
        println!(
            "{name}: fused on {}, in place, rows out: {:.1} ms ({:.1} GFLOP/s)",
            Isa::best().name(),
            best_rows * 1e3,
            flops / best_rows / 1e9
        );
        if fused_only {
            continue;
        }
        println!(
            "{name}: candle {:.1} ms ({:.1} GFLOP/s), fused {:.1} ms ({:.1} GFLOP/s), {:.2}x, max |diff| {max_diff:.2e}",
            best_old * 1e3,
            flops / best_old / 1e9,
            best_new * 1e3,
            flops / best_new / 1e9,
            best_old / best_new
        );
    }
}
