//! Times the Q8_0 matvec against the bf16 matvec on the 2B's MLP shapes (2048 x 6144 and
//! 6144 x 2048), interleaved in one run so both see the same machine, and prints the weight
//! bytes read per second (GB/s) and the ratio of the times.
//!
//! `cargo run --release -p vlmem-runner --example q8_0_matvec [iterations]`

use std::time::Instant;
use vlmem_qwen3vl::format::q8_0::quantize_row;
use vlmem_runner::kernels::q8_0::{Isa, Q8Input, matvec_rows_on};
use vlmem_runner::kernels::{self, WeightFormat};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let iters: usize = std::env::args().nth(1).map_or(Ok(200), |s| s.parse())?;
    println!(
        "kernels: {} (bf16), {} (q8_0); {} threads",
        kernels::isa(),
        kernels::q8_0_isa(),
        kernels::pool::global().threads()
    );
    let mut seed = 0x2545_F491_4F6C_DD1Du64;
    let mut uniform = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    };
    for (rows, cols) in [(2048usize, 6144usize), (6144, 2048)] {
        let values: Vec<f32> = (0..rows * cols).map(|_| uniform() * 0.05).collect();
        let bf16: Vec<u8> = values
            .iter()
            .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
            .collect();
        let q8 = quantize_row(&values)?;
        let x: Vec<f32> = (0..cols).map(|_| uniform()).collect();
        let mut y = vec![0f32; rows];
        let formats = [(WeightFormat::Bf16, &bf16), (WeightFormat::Q8_0, &q8)];
        // Warm up (page faults, pool threads).
        for (ty, w) in formats {
            for _ in 0..5 {
                kernels::matvec_into(w, ty, rows, cols, &x, &mut y)?;
            }
        }
        let mut times = [Vec::with_capacity(iters), Vec::with_capacity(iters)];
        for _ in 0..iters {
            for (k, (ty, w)) in formats.into_iter().enumerate() {
                let t = Instant::now();
                kernels::matvec_into(w, ty, rows, cols, &x, &mut y)?;
                times[k].push(t.elapsed().as_secs_f64());
            }
        }
        let mut medians = [0f64; 2];
        for (k, (ty, w)) in formats.into_iter().enumerate() {
            times[k].sort_by(f64::total_cmp);
            let median = times[k][iters / 2];
            let best = times[k][0];
            medians[k] = median;
            println!(
                "{rows:>5} x {cols:<5} {ty:<5} {:>6.1} MB  median {:>7.1} us  {:>6.1} GB/s  (best {:>7.1} us, {:>6.1} GB/s)",
                w.len() as f64 / 1e6,
                median * 1e6,
                w.len() as f64 / median / 1e9,
                best * 1e6,
                w.len() as f64 / best / 1e9,
            );
        }
        println!(
            "{rows:>5} x {cols:<5} q8_0 time / bf16 time = {:.3} (bytes ratio {:.3})",
            medians[1] / medians[0],
            q8.len() as f64 / bf16.len() as f64
        );
        // Each Q8_0 path this CPU has, over the pool (tasks of 64 rows), interleaved.
        let isas: Vec<Isa> = Isa::ALL.into_iter().filter(|i| i.available()).collect();
        let xq = Q8Input::new(&x);
        let row_bytes = q8.len() / rows;
        let mut times = vec![Vec::with_capacity(iters); isas.len() + 1];
        for _ in 0..iters {
            let t = Instant::now();
            kernels::matvec_into(&q8, WeightFormat::Q8_0, rows, cols, &x, &mut y)?;
            times[isas.len()].push(t.elapsed().as_secs_f64());
            for (k, &isa) in isas.iter().enumerate() {
                let t = Instant::now();
                let parts = y.chunks_mut(64).zip(q8.chunks(64 * row_bytes));
                kernels::pool::global()
                    .for_each(parts, |(y, w)| matvec_rows_on(isa, w, cols, &xq, y));
                times[k].push(t.elapsed().as_secs_f64());
            }
        }
        let names = isas.iter().map(|i| i.name()).chain(["matvec_into"]);
        for (name, mut t) in names.zip(times) {
            t.sort_by(f64::total_cmp);
            println!(
                "{rows:>5} x {cols:<5} q8_0 {:<11} median {:>7.1} us  {:>6.1} GB/s",
                name,
                t[iters / 2] * 1e6,
                q8.len() as f64 / t[iters / 2] / 1e9
            );
        }
    }
    cache_resident(&mut uniform);
    Ok(())
}

/// One thread on a matrix that stays in the L2 cache (256 x 2048): the kernels' compute
/// rate, weights per nanosecond, for every path this CPU has (no memory bound).
fn cache_resident(uniform: &mut impl FnMut() -> f32) {
    let (rows, cols, iters) = (256usize, 2048usize, 2000usize);
    let values: Vec<f32> = (0..rows * cols).map(|_| uniform() * 0.05).collect();
    let bf16: Vec<u8> = values
        .iter()
        .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
        .collect();
    let Ok(q8) = quantize_row(&values) else {
        return;
    };
    let x: Vec<f32> = (0..cols).map(|_| uniform()).collect();
    let mut y = vec![0f32; rows];
    let time = |f: &mut dyn FnMut()| {
        let mut best = f64::MAX;
        for _ in 0..5 {
            let t = Instant::now();
            for _ in 0..iters / 5 {
                f();
            }
            best = best.min(t.elapsed().as_secs_f64() / (iters / 5) as f64);
        }
        best
    };
    let per_ns = |secs: f64| (rows * cols) as f64 / secs / 1e9;
    let t = time(&mut || kernels::bf16::matvec_rows(&bf16, WeightFormat::Bf16, cols, &x, &mut y));
    println!(
        "one thread, {rows} x {cols} in cache: bf16 avx2+fma {:.2} weights/ns",
        per_ns(t)
    );
    let t = time(&mut || {
        let xq = Q8Input::new(&x);
        std::hint::black_box(&xq);
    });
    println!(
        "one thread: quantizing the {cols}-value input {:.2} us",
        t * 1e6
    );
    for isa in Isa::ALL.into_iter().filter(|i| i.available()) {
        let xq = Q8Input::new(&x);
        let t = time(&mut || matvec_rows_on(isa, &q8, cols, &xq, &mut y));
        println!(
            "one thread, {rows} x {cols} in cache: q8_0 {:<10} {:.2} weights/ns",
            isa.name(),
            per_ns(t)
        );
    }
}
