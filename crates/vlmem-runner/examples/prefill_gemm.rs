//! Prefill's matrix products on the qwen3-vl-2b shapes (hidden 2048, 16 query and 8 key/value
//! heads of 128, intermediate 6144; the vision tower's hidden 1024 and intermediate 4096),
//! GFLOP/s of:
//! - `exact`: the tiled product ([`vlmem_runner::kernels::gemm`]) on bf16 weights on the
//!   path it takes at [`Precision::Exact`] (AMX on three bf16 parts of each input where the
//!   CPU has AMX, else f32 FMAs);
//! - `bf16-in`: the same at [`Precision::Bf16Input`] (inputs rounded to bf16);
//! - `f32fma`: the best f32-FMA path (what a CPU without AMX runs);
//! - `q8_0`: the same weights in Q8_0 (integer dot products);
//! - `candle`: candle's matmul on an f32 copy of the weight (the path prompts took before;
//!   `copy ms` is the copy, timed apart).
//!
//! Repetitions are interleaved (each round times every method once, in turn), and each
//! figure is the median round; `max|d|` is the largest difference between `exact` and
//! `candle`. Wall-clock GFLOP/s first; then, where Linux reports the threads' CPU time
//! (`/proc/self/task/*/schedstat`), GFLOP per CPU-second of the process's threads (the
//! kernels' pool spins a little between jobs, which counts), a figure that other processes
//! sharing the CPUs disturb less than the wall clock.
//!
//! `cargo run --release -p vlmem-runner --example prefill_gemm [-- ROWS [ROUNDS [METHOD]]]`
//! (512 rows and 5 rounds by default; METHOD times that method alone, e.g. for a profile).
//!
//! `... --example prefill_gemm -- e2e CHECKPOINT [TOKENS [ROUNDS]]` times whole prompts
//! instead: the engine `vlmem run` uses, built for the checkpoint with no GPU, one warm-up
//! request (the weights come into RAM), then per round one request of TOKENS prompt ids
//! (512 by default) and one generated token at each precision in turn; prefill tokens/s is
//! the prompt over the time to first token (median round), beside the CPU time the
//! process's threads spent in it.

use candle_core::{Device, Tensor};
use std::time::Instant;
use vlmem_runner::kernels::WeightFormat;
use vlmem_runner::kernels::gemm::{self, Path, Precision};

struct Rng(u64);
impl Rng {
    fn uniform(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * 0.05
    }
}

/// Nanoseconds of CPU time this process's threads have run, if Linux reports it.
fn cpu_ns() -> Option<u64> {
    let mut total = 0u64;
    for task in std::fs::read_dir("/proc/self/task").ok()? {
        let stat = std::fs::read_to_string(task.ok()?.path().join("schedstat")).ok()?;
        total += stat.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(total)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

const METHODS: [&str; 5] = ["exact", "bf16-in", "f32fma", "q8_0", "candle"];

/// Whole prompts through the engine: see the module documentation.
fn e2e(dir: &str, tokens: usize, rounds: usize) {
    use vlmem_runner::engine::{Engine, Request};
    let engine = Engine::builder(dir).gpu_mem(0).build().expect("engine");
    let mut rng = Rng(7);
    let ids: Vec<u32> = (0..tokens)
        .map(|_| 100 + ((rng.uniform() + 0.05) * 10.0 * 149_000.0) as u32 % 149_000)
        .collect();
    let request = Request::ids(ids).max_new_tokens(1);
    let warm = Instant::now();
    engine.generate(&request, &mut |_| {}).expect("warm-up");
    println!(
        "{tokens} prompt ids, {} threads; warm-up request {:.2} s",
        vlmem_runner::kernels::pool::global().threads(),
        warm.elapsed().as_secs_f64()
    );
    let precisions = [Precision::Exact, Precision::Bf16Input];
    let mut ttft: [Vec<f64>; 2] = Default::default();
    let mut cpu: [Vec<f64>; 2] = Default::default();
    for _ in 0..rounds {
        for (i, &p) in precisions.iter().enumerate() {
            gemm::set_precision(p);
            let c0 = cpu_ns();
            let reply = engine.generate(&request, &mut |_| {}).expect("request");
            ttft[i].push(reply.timings.time_to_first_token.as_secs_f64());
            if let (Some(a), Some(b)) = (c0, cpu_ns()) {
                cpu[i].push((b - a) as f64 / 1e9);
            }
        }
    }
    for (i, p) in precisions.iter().enumerate() {
        let t = median(ttft[i].clone());
        println!(
            "{p:?} ({}): prefill {:.1} tokens/s (time to first token {:.2} s, median of {rounds}; all: {:?}), {:.2} CPU-s",
            gemm::path_for(WeightFormat::Bf16, *p).name(),
            tokens as f64 / t,
            t,
            ttft[i]
                .iter()
                .map(|v| (v * 100.0).round() / 100.0)
                .collect::<Vec<_>>(),
            median(cpu[i].clone()),
        );
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("e2e") {
        let Some(dir) = args.get(1) else {
            eprintln!("usage: prefill_gemm e2e CHECKPOINT [TOKENS [ROUNDS]]");
            std::process::exit(2);
        };
        let tokens = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(512);
        let rounds = args.get(3).and_then(|a| a.parse().ok()).unwrap_or(3);
        e2e(dir, tokens, rounds);
        return;
    }
    let n: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(512);
    let rounds: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(5).max(1);
    let only = args.get(2).cloned();
    let shapes: [(&str, usize, usize); 10] = [
        ("q_proj", 2048, 2048),
        ("k_proj", 1024, 2048),
        ("v_proj", 1024, 2048),
        ("o_proj", 2048, 2048),
        ("gate_proj", 6144, 2048),
        ("up_proj", 6144, 2048),
        ("down_proj", 2048, 6144),
        ("vision.qkv", 3072, 1024),
        ("vision.fc1", 4096, 1024),
        ("vision.fc2", 1024, 4096),
    ];
    let exact_path = gemm::path_for(WeightFormat::Bf16, Precision::Exact);
    let bf16_path = gemm::path_for(WeightFormat::Bf16, Precision::Bf16Input);
    let fma_path = [Path::F32Avx512, Path::F32Avx2, Path::F32Scalar]
        .into_iter()
        .find(|p| p.available())
        .unwrap_or(Path::F32Scalar);
    let q8_path = gemm::path_for(WeightFormat::Q8_0, Precision::Exact);
    println!(
        "{n} rows, {rounds} rounds, {} threads; paths: exact {}, bf16-in {}, f32fma {}, q8_0 {}",
        vlmem_runner::kernels::pool::global().threads(),
        exact_path.name(),
        bf16_path.name(),
        fma_path.name(),
        q8_path.name(),
    );
    println!(
        "{:<11} {:>5} {:>5} | GFLOP/s {:>7} {:>7} {:>7} {:>7} {:>7} | {:>7} {:>8}",
        "weight",
        "out",
        "in",
        METHODS[0],
        METHODS[1],
        METHODS[2],
        METHODS[3],
        METHODS[4],
        "copy ms",
        "max|d|"
    );
    let run = |m: &str| only.as_deref().is_none_or(|o| o == m);
    let mut rng = Rng(1);
    let mut totals = [0f64; 6];
    let mut cpu_totals = [0f64; 5];
    for (name, out, inp) in shapes {
        let values: Vec<f32> = (0..out * inp).map(|_| rng.uniform()).collect();
        let w: Vec<u8> = values
            .iter()
            .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
            .collect();
        let q8: Vec<u8> = values
            .chunks(inp)
            .flat_map(|row| vlmem_qwen3vl::format::q8_0::quantize_row(row).unwrap())
            .collect();
        drop(values);
        let x: Vec<f32> = (0..n * inp).map(|_| rng.uniform() * 20.0).collect();
        let xt = Tensor::from_slice(&x, (n, inp), &Device::Cpu).unwrap();
        let flops = 2.0 * (n * out * inp) as f64;
        // Per method (METHODS order), then the f32 copy.
        let mut times: [Vec<f64>; 6] = Default::default();
        let mut cpu: [Vec<f64>; 5] = Default::default();
        let mut diff = 0f32;
        let bf16 = WeightFormat::Bf16;
        for _ in 0..rounds {
            let mut exact = Vec::new();
            for (i, &m) in METHODS.iter().enumerate() {
                if !run(m) {
                    continue;
                }
                let c0 = cpu_ns();
                let t = Instant::now();
                let y = match m {
                    "exact" => gemm::gemm_on(exact_path, &w, bf16, out, inp, &x, n, None),
                    "bf16-in" => gemm::gemm_on(bf16_path, &w, bf16, out, inp, &x, n, None),
                    "f32fma" => gemm::gemm_on(fma_path, &w, bf16, out, inp, &x, n, None),
                    "q8_0" => {
                        gemm::gemm_on(q8_path, &q8, WeightFormat::Q8_0, out, inp, &x, n, None)
                    }
                    _ => {
                        // The old path: the whole weight widened to f32 (what `tensor_f32`
                        // stages), then candle's matmul.
                        let wf: Vec<f32> = w
                            .chunks_exact(2)
                            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                            .collect();
                        let wt = Tensor::from_vec(wf, (out, inp), &Device::Cpu).unwrap();
                        times[5].push(t.elapsed().as_secs_f64());
                        let c0 = cpu_ns();
                        let t = Instant::now();
                        let y = xt.matmul(&wt.t().unwrap()).unwrap();
                        times[i].push(t.elapsed().as_secs_f64());
                        if let (Some(a), Some(b)) = (c0, cpu_ns()) {
                            cpu[i].push((b - a) as f64 / 1e9);
                        }
                        let y = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                        diff = exact
                            .iter()
                            .zip(&y)
                            .map(|(a, b): (&f32, &f32)| (a - b).abs())
                            .fold(diff, f32::max);
                        continue;
                    }
                }
                .unwrap();
                times[i].push(t.elapsed().as_secs_f64());
                if let (Some(a), Some(b)) = (c0, cpu_ns()) {
                    cpu[i].push((b - a) as f64 / 1e9);
                }
                if m == "exact" {
                    exact = y;
                }
            }
        }
        let med: Vec<f64> = times.into_iter().map(median).collect();
        let cpu_med: Vec<f64> = cpu.into_iter().map(median).collect();
        for (t, m) in totals.iter_mut().zip(&med) {
            if m.is_finite() {
                *t += m;
            }
        }
        for (t, m) in cpu_totals.iter_mut().zip(&cpu_med) {
            if m.is_finite() {
                *t += m;
            }
        }
        let g = |i: usize| flops / med[i] / 1e9;
        let gc = |i: usize| flops / cpu_med[i] / 1e9;
        println!(
            "{name:<11} {out:>5} {inp:>5} | GFLOP/s {:>7.1} {:>7.1} {:>7.1} {:>7.1} {:>7.1} | {:>7.1} {:>8.1e} | per CPU-s {:>6.1} {:>6.1} {:>6.1} {:>6.1} {:>6.1}",
            g(0),
            g(1),
            g(2),
            g(3),
            g(4),
            med[5] * 1e3,
            diff,
            gc(0),
            gc(1),
            gc(2),
            gc(3),
            gc(4),
        );
    }
    println!(
        "sum of medians (ms): exact {:.1}, bf16-in {:.1}, f32fma {:.1}, q8_0 {:.1}, candle {:.1} (+ {:.1} for the f32 copies)",
        totals[0] * 1e3,
        totals[1] * 1e3,
        totals[2] * 1e3,
        totals[3] * 1e3,
        totals[4] * 1e3,
        totals[5] * 1e3
    );
    println!(
        "sum of medians (CPU-s): exact {:.3}, bf16-in {:.3}, f32fma {:.3}, q8_0 {:.3}, candle {:.3}",
        cpu_totals[0], cpu_totals[1], cpu_totals[2], cpu_totals[3], cpu_totals[4]
    );
}
