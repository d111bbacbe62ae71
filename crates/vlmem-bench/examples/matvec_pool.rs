//! The decode kernel split across threads two ways, on the same buffer in the same run:
//! rayon's `par_chunks` (what the kernels once used) and the kernels' spinning
//! work pool (`kernels::pool`), beside the memory read probe.
//! `cargo run --release -p vlmem-bench --example matvec_pool`
use rayon::prelude::*;
use std::time::Instant;
use vlmem_bench::QWEN3VL_2B_LAYER_SHAPES as SHAPES;
use vlmem_runner::kernels::{self, WeightFormat, bf16, pool};

/// Rows per task: about 1 MiB of bf16 weights, a multiple of 4 rows.
fn rows_per_task(cols: usize) -> usize {
    ((1usize << 20) / (cols * 2)).max(4) / 4 * 4
}

/// Calls `f(weights, rows, cols)` for every matrix of the first `layers` layers laid out
/// back to back in `buf`.
fn each_matrix(buf: &[u8], layers: usize, mut f: impl FnMut(&[u8], usize, usize)) {
    let mut off = 0;
    for _ in 0..layers {
        for &(r, c) in &SHAPES {
            f(&buf[off..off + r * c * 2], r, c);
            off += r * c * 2;
        }
    }
}

fn main() {
    let len: usize = 1 << 30;
    let mut mem = vlmem_tier::HostBuffer::new(len, true).expect("1 GiB host buffer");
    for (i, b) in mem.as_mut_slice().iter_mut().enumerate() {
        *b = ((i * 7) % 61) as u8 + 0x20;
    }
    let buf = mem.as_slice();
    let layer_bytes: usize = SHAPES.iter().map(|(r, c)| r * c * 2).sum();
    let layers = len / layer_bytes;
    let bytes = (layers * layer_bytes) as f64;
    let x: Vec<f32> = (0..6144).map(|i| (i as f32 * 0.001).sin()).collect();
    let pool = pool::global();
    println!(
        "{} threads in the pool, {} in rayon's",
        pool.threads(),
        rayon::current_num_threads()
    );
    for round in 0..4 {
        let mut check = 0f32;
        let t = Instant::now();
        each_matrix(buf, layers, |w, r, c| {
            let mut y = vec![0f32; r];
            let per = rows_per_task(c);
            y.par_chunks_mut(per)
                .zip(w.par_chunks(per * c * 2))
                .for_each(|(y, w)| bf16::matvec_rows(w, WeightFormat::Bf16, c, &x[..c], y));
            check += y[0];
        });
        let rayon_gbps = bytes / t.elapsed().as_secs_f64() / 1e9;
        let t = Instant::now();
        each_matrix(buf, layers, |w, r, c| {
            let mut y = vec![0f32; r];
            let per = rows_per_task(c);
            let parts = y.chunks_mut(per).zip(w.chunks(per * c * 2));
            pool.for_each(parts, |(y, w)| {
                bf16::matvec_rows(w, WeightFormat::Bf16, c, &x[..c], y)
            });
            check += y[0];
        });
        let pool_gbps = bytes / t.elapsed().as_secs_f64() / 1e9;
        let t = Instant::now();
        let sum = kernels::read_bandwidth_probe(&buf[..layers * layer_bytes]);
        let probe_gbps = bytes / t.elapsed().as_secs_f64() / 1e9;
        std::hint::black_box((check, sum));
        println!(
            "round {round}: rayon {rayon_gbps:.1} GB/s ({:.2} of the probe), pool {pool_gbps:.1} GB/s ({:.2}), probe {probe_gbps:.1} GB/s",
            rayon_gbps / probe_gbps,
            pool_gbps / probe_gbps
        );
    }
}
