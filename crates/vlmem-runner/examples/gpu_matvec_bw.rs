//! The GPU decode kernel's read speed beside the GPU's own copy speed, in the same run
//! (feature `cuda`, a GPU needed):
//!
//! ```text
//! cargo run --release -p vlmem-runner --features cuda --example gpu_matvec_bw [-- --json]
//! ```
//!
//! For each of Qwen3-VL-2B's decode matrix shapes (bf16, pinned on the memory manager's CUDA
//! device tier) it times `GpuKernels::matmul` with one input row: the whole call (input copy
//! in, kernel, output copy back, stream wait) and reports the weight bytes read per second.
//! The baseline is a 1 GiB device-to-device copy (cuMemcpyDtoD), counted as bytes read plus
//! bytes written per second: what the GPU's memory moves when it only streams. The ratio is
//! the kernel's share of that bound. It also times the smallest call (1 x 8), the fixed cost
//! of one call that decode pays about 200 times per token.

use std::time::Instant;
use vlmem::{ManagerConfig, MemoryManager, TensorKind, Tier};
use vlmem_runner::kernels::WeightFormat;
use vlmem_runner::kernels::cuda::GpuKernels;

const GIB: u64 = 1 << 30;

fn main() {
    let json = std::env::args().any(|a| a == "--json");
    if vlmem_tier::cuda::probe().is_none() {
        eprintln!("no CUDA driver or GPU here");
        std::process::exit(2);
    }
    let mut c = ManagerConfig::with_capacities(4 * GIB, GIB, GIB);
    c.gpu_ordinal = Some(0);
    c.budgets.bytes[Tier::Device.index()][TensorKind::Weight.index()] = 3 * GIB;
    let m = MemoryManager::new(c).expect("manager");
    assert!(m.device_is_gpu());
    let k = GpuKernels::new(0).expect("kernels");

    // Baseline: device-to-device copy of 1 GiB, best of 5.
    let ctx = cudarc::driver::CudaContext::new(0).expect("context");
    let stream = ctx.default_stream();
    let n = (GIB / 4) as usize;
    let src = stream.alloc_zeros::<f32>(n).expect("alloc");
    let mut dst = stream.alloc_zeros::<f32>(n).expect("alloc");
    let mut copy_gbps: f64 = 0.0;
    for _ in 0..5 {
        stream.synchronize().expect("sync");
        let t = Instant::now();
        stream.memcpy_dtod(&src, &mut dst).expect("copy");
        stream.synchronize().expect("sync");
        copy_gbps = copy_gbps.max(2.0 * GIB as f64 / t.elapsed().as_secs_f64() / 1e9);
    }
    drop((src, dst));

    // Qwen3-VL-2B decode shapes (rows = out, cols = in) and a tiny one for the call cost.
    let shapes: [(&str, usize, usize); 6] = [
        ("k_proj/v_proj", 1024, 2048),
        ("q_proj/o_proj", 2048, 2048),
        ("gate_proj/up_proj", 6144, 2048),
        ("down_proj", 2048, 6144),
        ("lm_head", 151_936, 2048),
        ("tiny (call cost)", 1, 8),
    ];
    let mut rows_out = Vec::new();
    for (i, &(name, rows, cols)) in shapes.iter().enumerate() {
        let bytes = rows * cols * 2;
        let w: Vec<u8> = (0..bytes)
            .map(|b| ((b * 7 + i) % 251) as u8 & 0x3f)
            .collect();
        let h = m
            .allocate_on(bytes as u64, TensorKind::Weight, i as u64, Tier::Device)
            .expect("allocate");
        m.write(h, 0, &w).expect("write");
        let pin = m.pin(h, Tier::Device).expect("pin");
        let x = vec![0.5f32; cols];
        for _ in 0..3 {
            k.matmul(&pin, WeightFormat::Bf16, rows, cols, &x, 1)
                .expect("warm");
        }
        let iters = (2_000_000_000 / bytes).clamp(20, 2000);
        let t = Instant::now();
        for _ in 0..iters {
            k.matmul(&pin, WeightFormat::Bf16, rows, cols, &x, 1)
                .expect("matmul");
        }
        let per_call_s = t.elapsed().as_secs_f64() / iters as f64;
        let gbps = bytes as f64 / per_call_s / 1e9;
        rows_out.push((name, rows, cols, per_call_s, gbps));
        drop(pin);
        m.deallocate(h).expect("free");
    }
    if json {
        let shapes: Vec<String> = rows_out
            .iter()
            .map(|(name, rows, cols, s, gbps)| {
                format!(
                    "{{\"name\":\"{name}\",\"rows\":{rows},\"cols\":{cols},\"us_per_call\":{:.2},\"read_gb_per_s\":{gbps:.1},\"of_copy_bound\":{:.3}}}",
                    s * 1e6,
                    gbps / copy_gbps
                )
            })
            .collect();
        println!(
            "{{\"gpu\":\"{}\",\"copy_read_plus_write_gb_per_s\":{copy_gbps:.1},\"shapes\":[{}]}}",
            k.describe(),
            shapes.join(",")
        );
    } else {
        println!(
            "{}: device-to-device copy {copy_gbps:.1} GB/s (read + write)",
            k.describe()
        );
        for (name, rows, cols, s, gbps) in rows_out {
            println!(
                "{name:>18} {rows:>6} x {cols:<5} {:>9.1} us/call  {gbps:>7.1} GB/s  {:.3} of the copy bound",
                s * 1e6,
                gbps / copy_gbps
            );
        }
    }
}
