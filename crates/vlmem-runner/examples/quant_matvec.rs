//! Times the decode matvec on bf16, Q8_0 and Q4_K weights of the 2B's MLP shapes
//! (2048 x 6144 and 6144 x 2048), the three interleaved in every repetition so all see the
//! same machine, and prints the weight bytes read per second (GB/s), the ratios of the median
//! times and the ratios of the bytes; then each quantized path this CPU has over the pool,
//! and one thread's compute rate on a matrix in cache.
//!
//! `cargo run --release -p vlmem-runner --example quant_matvec [iterations]`

use std::time::Instant;
use vlmem_runner::kernels::{self, WeightFormat, q4_k, q8_0};

/// The formats timed, in the order printed.
const FORMATS: [WeightFormat; 3] = [WeightFormat::Bf16, WeightFormat::Q8_0, WeightFormat::Q4_K];

/// `values` stored as `ty`.
fn stored(ty: WeightFormat, values: &[f32]) -> Result<Vec<u8>, Box<dyn std::error::Error>> {
    Ok(match ty {
        WeightFormat::Bf16 => values
            .iter()
            .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
            .collect(),
        WeightFormat::F16 => values
            .iter()
            .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
            .collect(),
        WeightFormat::F32 => values.iter().flat_map(|&v| v.to_le_bytes()).collect(),
        WeightFormat::Q8_0 => vlmem_qwen3vl::format::q8_0::quantize_row(values)?,
        WeightFormat::Q4_K => vlmem_qwen3vl::format::q4_k::quantize_row(values)?,
    })
}

fn median(t: &mut [f64]) -> f64 {
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let iters: usize = std::env::args().nth(1).map_or(Ok(200), |s| s.parse())?;
    let iters = iters.max(1);
    println!(
        "kernels: {} (bf16), {} (q8_0), {} (q4_k); {} threads",
        kernels::isa(),
        kernels::q8_0_isa(),
        kernels::q4_k_isa(),
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
        let mats: Vec<(WeightFormat, Vec<u8>)> = FORMATS
            .iter()
            .map(|&ty| stored(ty, &values).map(|w| (ty, w)))
            .collect::<Result<_, _>>()?;
        drop(values);
        let x: Vec<f32> = (0..cols).map(|_| uniform()).collect();
        let mut y = vec![0f32; rows];
        // Warm up (page faults, pool threads).
        for (ty, w) in &mats {
            for _ in 0..5 {
                kernels::matvec_into(w, *ty, rows, cols, &x, &mut y)?;
            }
        }
        let mut times = vec![Vec::with_capacity(iters); mats.len()];
        for _ in 0..iters {
            for (k, (ty, w)) in mats.iter().enumerate() {
                let t = Instant::now();
                kernels::matvec_into(w, *ty, rows, cols, &x, &mut y)?;
                times[k].push(t.elapsed().as_secs_f64());
            }
        }
        let mut medians = Vec::new();
        for ((ty, w), t) in mats.iter().zip(&mut times) {
            let m = median(t);
            let best = t[0];
            medians.push(m);
            println!(
                "{rows:>5} x {cols:<5} {ty:<5} {:>6.1} MB  median {:>7.1} us  {:>6.1} GB/s  (best {:>7.1} us, {:>6.1} GB/s)",
                w.len() as f64 / 1e6,
                m * 1e6,
                w.len() as f64 / m / 1e9,
                best * 1e6,
                w.len() as f64 / best / 1e9,
            );
        }
        for (a, b) in [(1usize, 0usize), (2, 0), (2, 1)] {
            println!(
                "{rows:>5} x {cols:<5} {} time / {} time = {:.3} (bytes ratio {:.3})",
                mats[a].0,
                mats[b].0,
                medians[a] / medians[b],
                mats[a].1.len() as f64 / mats[b].1.len() as f64
            );
        }
        paths_over_the_pool(rows, cols, &mats, &x, iters)?;
    }
    cache_resident(&mut uniform)?;
    Ok(())
}

/// Each Q8_0 and Q4_K path this CPU has, over the pool (tasks of 64 rows), interleaved with
/// `matvec_into` (which picks the path and quantizes the input in the call).
fn paths_over_the_pool(
    rows: usize,
    cols: usize,
    mats: &[(WeightFormat, Vec<u8>)],
    x: &[f32],
    iters: usize,
) -> Result<(), Box<dyn std::error::Error>> {
    let isas: Vec<q8_0::Isa> = q8_0::Isa::ALL
        .into_iter()
        .filter(|i| i.available())
        .collect();
    let x8 = q8_0::Q8Input::new(x);
    let xk = q4_k::Q8KInput::new(x);
    let mut y = vec![0f32; rows];
    for (ty, w) in mats.iter().filter(|(ty, _)| !ty.is_plain()) {
        let row_bytes = w.len() / rows;
        let mut times = vec![Vec::with_capacity(iters); isas.len() + 1];
        for _ in 0..iters {
            let t = Instant::now();
            kernels::matvec_into(w, *ty, rows, cols, x, &mut y)?;
            times[isas.len()].push(t.elapsed().as_secs_f64());
            for (k, &isa) in isas.iter().enumerate() {
                let t = Instant::now();
                let parts = y.chunks_mut(64).zip(w.chunks(64 * row_bytes));
                kernels::pool::global().for_each(parts, |(y, w)| match ty {
                    WeightFormat::Q4_K => q4_k::matvec_rows_on(isa, w, cols, &xk, y),
                    _ => q8_0::matvec_rows_on(isa, w, cols, &x8, y),
                });
                times[k].push(t.elapsed().as_secs_f64());
            }
        }
        let names = isas.iter().map(|i| i.name()).chain(["matvec_into"]);
        for (name, mut t) in names.zip(times) {
            let m = median(&mut t);
            println!(
                "{rows:>5} x {cols:<5} {ty:<5} {name:<11} median {:>7.1} us  {:>6.1} GB/s",
                m * 1e6,
                w.len() as f64 / m / 1e9
            );
        }
    }
    Ok(())
}

/// One thread on a matrix that stays in the L2 cache (256 x 2048): the kernels' compute
/// rate, weights per nanosecond, for every path this CPU has (no memory bound).
fn cache_resident(uniform: &mut impl FnMut() -> f32) -> Result<(), Box<dyn std::error::Error>> {
    let (rows, cols, iters) = (256usize, 2048usize, 2000usize);
    let values: Vec<f32> = (0..rows * cols).map(|_| uniform() * 0.05).collect();
    let bf16 = stored(WeightFormat::Bf16, &values)?;
    let q8 = stored(WeightFormat::Q8_0, &values)?;
    let q4 = stored(WeightFormat::Q4_K, &values)?;
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
        "one thread, {rows} x {cols} in cache: bf16 {:<10} {:.2} weights/ns",
        kernels::isa(),
        per_ns(t)
    );
    let t = time(&mut || {
        std::hint::black_box(q8_0::Q8Input::new(&x));
    });
    let tk = time(&mut || {
        std::hint::black_box(q4_k::Q8KInput::new(&x));
    });
    println!(
        "one thread: quantizing the {cols}-value input {:.2} us (blocks of 32), {:.2} us (blocks of 256)",
        t * 1e6,
        tk * 1e6
    );
    let x8 = q8_0::Q8Input::new(&x);
    let xk = q4_k::Q8KInput::new(&x);
    for isa in q8_0::Isa::ALL.into_iter().filter(|i| i.available()) {
        let t8 = time(&mut || q8_0::matvec_rows_on(isa, &q8, cols, &x8, &mut y));
        let t4 = time(&mut || q4_k::matvec_rows_on(isa, &q4, cols, &xk, &mut y));
        println!(
            "one thread, {rows} x {cols} in cache: {:<10} q8_0 {:.2} weights/ns, q4_k {:.2} weights/ns",
            isa.name(),
            per_ns(t8),
            per_ns(t4)
        );
    }
    Ok(())
}
