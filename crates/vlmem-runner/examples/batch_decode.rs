//! Times decode for a batch of `B` sequences (B = 1, 2, 4, 8, 16) against one weight in
//! bf16, Q8_0 and Q4_K, on the 2B's MLP shapes (2048 x 6144 and 6144 x 2048), four ways:
//!
//! - `matvec`: B calls of the matrix-vector kernel (`kernels::matvec_into`);
//! - `rows`: the GEMM's rows route (each input row through the matrix-vector kernel against
//!   L2-sized blocks of the weight; the old `gemm` up to 2 rows);
//! - `tiled`: the tiled GEMM on `gemm::path_for`'s micro-kernel (the old `gemm` from 3 rows);
//!   for bf16 also `tiled-bf16in` (inputs rounded to bf16, `VLMEM_GEMM=bf16`) where the CPU
//!   has AMX;
//! - `batch`: the batched decode kernels (`kernels::batch`, each weight row read once).
//!
//! With `VLMEM_BENCH_AVX2=1` on an AVX-512 CPU, also `tiled-avx2` and `batch-avx2`: the
//! AVX2 micro-kernels and batched kernels an AVX2-only CPU runs.
//!
//! Every way runs once per repetition, all interleaved, so all see the same machine; the
//! table gives the median and the best milliseconds and weight bytes read per second
//! (GB/s) at each, and what `kernels::gemm::route_for` picks.
//!
//! `cargo run --release -p vlmem-runner --example batch_decode [repetitions] [B,B,...]`

use std::time::Instant;
use vlmem_runner::kernels::gemm::{self, Path, Precision, Route};
use vlmem_runner::kernels::{self, WeightFormat, batch};

const FORMATS: [WeightFormat; 3] = [WeightFormat::Bf16, WeightFormat::Q8_0, WeightFormat::Q4_K];
const BATCHES: [usize; 5] = [1, 2, 4, 8, 16];

/// `values` stored as `ty`.
fn stored(ty: WeightFormat, values: &[f32]) -> Result<Vec<u8>, Box<dyn std::error::Error>> {
    Ok(match ty {
        WeightFormat::Bf16 => values
            .iter()
            .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
            .collect(),
        WeightFormat::Q8_0 => vlmem_qwen3vl::format::q8_0::quantize_row(values)?,
        WeightFormat::Q4_K => vlmem_qwen3vl::format::q4_k::quantize_row(values)?,
        WeightFormat::F16 | WeightFormat::F32 => unreachable!("not timed"),
    })
}

fn median(t: &mut [f64]) -> f64 {
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

/// One way of computing the batch.
#[derive(Clone, Copy, PartialEq)]
enum Way {
    Matvec,
    Rows,
    Tiled,
    TiledBf16In,
    Batch,
    TiledAvx2,
    BatchAvx2,
}

impl Way {
    fn name(self) -> &'static str {
        match self {
            Way::Matvec => "matvec",
            Way::Rows => "rows",
            Way::Tiled => "tiled",
            Way::TiledBf16In => "tiled-bf16in",
            Way::Batch => "batch",
            Way::TiledAvx2 => "tiled-avx2",
            Way::BatchAvx2 => "batch-avx2",
        }
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let reps: usize = std::env::args().nth(1).map_or(Ok(15), |s| s.parse())?;
    let reps = reps.max(1);
    let batches: Vec<usize> = match std::env::args().nth(2) {
        Some(list) => list.split(',').map(str::parse).collect::<Result<_, _>>()?,
        None => BATCHES.to_vec(),
    };
    println!(
        "{} threads; batched paths: bf16 {:?}, q8_0 {:?}, q4_k {:?}; tiled paths: bf16 {}, q8_0 {}, q4_k {}",
        kernels::pool::global().threads(),
        batch::path_for(WeightFormat::Bf16).map(|p| p.name()),
        batch::path_for(WeightFormat::Q8_0).map(|p| p.name()),
        batch::path_for(WeightFormat::Q4_K).map(|p| p.name()),
        gemm::path_for(WeightFormat::Bf16, Precision::Exact).name(),
        gemm::path_for(WeightFormat::Q8_0, Precision::Exact).name(),
        gemm::path_for(WeightFormat::Q4_K, Precision::Exact).name(),
    );
    let amx_bf16 = Path::AmxBf16.available();
    // With `VLMEM_BENCH_AVX2=1` on an AVX-512 CPU, also the AVX2 paths (what an AVX2-only
    // CPU runs): the tiled product on the AVX2 micro-kernels and the AVX2 batched kernels.
    let avx2_too = std::env::var("VLMEM_BENCH_AVX2").as_deref() == Ok("1")
        && batch::Path::Avx2.available(WeightFormat::Bf16);
    let mut seed = 0x2545_F491_4F6C_DD1Du64;
    let mut uniform = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    };
    println!(
        "{:>11} {:<5} {:>2} {:<12} {:>9} {:>8} {:>9} {:>8}  route",
        "shape", "type", "B", "way", "median ms", "GB/s", "best ms", "GB/s"
    );
    for (rows, cols) in [(2048usize, 6144usize), (6144, 2048)] {
        let values: Vec<f32> = (0..rows * cols).map(|_| uniform() * 0.05).collect();
        let mats: Vec<(WeightFormat, Vec<u8>)> = FORMATS
            .iter()
            .map(|&ty| stored(ty, &values).map(|w| (ty, w)))
            .collect::<Result<_, _>>()?;
        drop(values);
        for &n in &batches {
            let x: Vec<f32> = (0..n * cols).map(|_| uniform()).collect();
            let mut y = vec![0f32; rows];
            // (format, way) pairs, in the order run and printed.
            let mut runs: Vec<(usize, Way)> = Vec::new();
            for (k, (ty, _)) in mats.iter().enumerate() {
                runs.extend([(k, Way::Matvec), (k, Way::Rows), (k, Way::Tiled)]);
                if *ty == WeightFormat::Bf16 && amx_bf16 {
                    runs.push((k, Way::TiledBf16In));
                }
                runs.push((k, Way::Batch));
                if avx2_too {
                    runs.extend([(k, Way::TiledAvx2), (k, Way::BatchAvx2)]);
                }
            }
            let run = |k: usize,
                       way: Way,
                       y: &mut [f32]|
             -> Result<(), Box<dyn std::error::Error>> {
                let (ty, w) = (&mats[k].0, &mats[k].1);
                match way {
                    Way::Matvec => {
                        for xt in x.chunks_exact(cols) {
                            kernels::matvec_into(w, *ty, rows, cols, xt, y)?;
                        }
                    }
                    Way::Rows => {
                        std::hint::black_box(gemm::gemm_via(
                            Route::Rows,
                            w,
                            *ty,
                            rows,
                            cols,
                            &x,
                            n,
                            None,
                        )?);
                    }
                    Way::Tiled => {
                        std::hint::black_box(gemm::gemm_via(
                            Route::Tiled,
                            w,
                            *ty,
                            rows,
                            cols,
                            &x,
                            n,
                            None,
                        )?);
                    }
                    Way::TiledBf16In => {
                        std::hint::black_box(gemm::gemm_on(
                            Path::AmxBf16,
                            w,
                            *ty,
                            rows,
                            cols,
                            &x,
                            n,
                            None,
                        )?);
                    }
                    Way::Batch => {
                        std::hint::black_box(gemm::gemm_via(
                            Route::Batch,
                            w,
                            *ty,
                            rows,
                            cols,
                            &x,
                            n,
                            None,
                        )?);
                    }
                    Way::TiledAvx2 => {
                        let path = if *ty == WeightFormat::Q8_0 {
                            Path::Q8Avx2
                        } else {
                            Path::F32Avx2
                        };
                        std::hint::black_box(gemm::gemm_on(path, w, *ty, rows, cols, &x, n, None)?);
                    }
                    Way::BatchAvx2 => {
                        let path = batch::Path::Avx2;
                        std::hint::black_box(gemm::gemm_batch_on(
                            path, w, *ty, rows, cols, &x, n, None,
                        )?);
                    }
                }
                Ok(())
            };
            // Warm up (page faults, pool threads, caches of packed inputs).
            for &(k, way) in &runs {
                run(k, way, &mut y)?;
            }
            let mut times = vec![Vec::with_capacity(reps); runs.len()];
            for _ in 0..reps {
                for (i, &(k, way)) in runs.iter().enumerate() {
                    let t = Instant::now();
                    run(k, way, &mut y)?;
                    times[i].push(t.elapsed().as_secs_f64());
                }
            }
            for (i, &(k, way)) in runs.iter().enumerate() {
                let (ty, w) = (&mats[k].0, &mats[k].1);
                let m = median(&mut times[i]);
                let best = times[i][0];
                let route = gemm::route_for(*ty, n);
                let picked = match (way, route) {
                    (Way::Rows, Route::Rows)
                    | (Way::Tiled, Route::Tiled)
                    | (Way::Batch, Route::Batch) => "  <- gemm",
                    _ => "",
                };
                println!(
                    "{:>5}x{:<5} {:<5} {:>2} {:<12} {:>9.3} {:>8.1} {:>9.3} {:>8.1}{picked}",
                    rows,
                    cols,
                    ty.to_string(),
                    n,
                    way.name(),
                    m * 1e3,
                    w.len() as f64 / m / 1e9,
                    best * 1e3,
                    w.len() as f64 / best / 1e9,
                );
            }
        }
    }
    Ok(())
}
