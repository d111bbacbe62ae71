//! The GPU path (feature `cuda`): the committed PTX is built from the committed CUDA source;
//! the kernels, run by a CPU emulation of the GPU, equal a reference (the float kernels) and
//! the CPU kernels (Q8_0 and Q4_K); on a machine with a GPU, the GPU kernels equal the CPU
//! kernels, bad calls are errors, and
//! the runner with its first decoder layers on the GPU (the manager's CUDA device tier)
//! reproduces the reference outputs on all four fixtures. The tests that need a GPU are
//! `#[ignore]`d (so a machine without one reports them as ignored, not passed); `.ci/gpu/check`
//! runs them with `--include-ignored`.

mod common;

use common::{FIXTURES, fixture_dir, ids, reference};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use vlmem_runner::kernels::{self, WeightFormat};

fn kernels_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src/kernels/cuda")
}

/// decode.ptx records the SHA-256 of the decode.cu it was generated from (gen_ptx.py): an
/// edit of the source without regenerating the PTX fails here, on every machine.
#[test]
fn committed_ptx_is_generated_from_the_committed_source() {
    let src = std::fs::read(kernels_dir().join("decode.cu")).unwrap();
    let ptx = std::fs::read_to_string(kernels_dir().join("decode.ptx")).unwrap();
    let digest: String = Sha256::digest(&src)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let first = ptx.lines().next().unwrap_or_default();
    assert_eq!(
        first,
        format!("// source sha256: {digest}"),
        "decode.ptx is stale: run src/kernels/cuda/gen_ptx.py"
    );
    // SM 6.1 (the MX250) is the oldest target, with a PTX ISA drivers from 525 on accept.
    assert!(ptx.contains("\n.target sm_61\n"), "target");
    assert!(ptx.contains("\n.version 8.0\n"), "PTX ISA version");
    for k in [
        "matmul_bf16",
        "matmul_bf16_v8",
        "matmul_f16",
        "matmul_f32",
        "matmul_q8_0",
        "matmul_q4_k",
    ] {
        assert!(
            ptx.contains(&format!(".visible .entry {k}(")),
            "kernel {k} missing"
        );
    }
}

/// The kernels of decode.cu, compiled as C++ and run on the CPU (one thread per GPU thread,
/// warp shuffles through a barrier, `dp4a` and f16 widening emulated, every load checked for
/// the alignment a GPU needs: kernels/cuda/emulate.cpp): the float kernels equal a
/// double-precision reference for every stored type, odd and aligned widths and 1 or 3 input
/// rows, and the Q8_0 and Q4_K kernels equal the CPU kernels on the same bytes
/// ([`emulated_quantized_kernels_equal_the_cpu_kernels`]). This checks their indexing, vector
/// paths, remainders and reductions on machines without a GPU; it is skipped (with a message)
/// where no C++20 compiler is installed.
#[test]
fn gpu_kernels_pass_their_cpu_emulation() {
    let dir = tempfile::tempdir().unwrap();
    let exe = dir.path().join("emulate");
    let Some(compiler) = ["c++", "g++", "clang++"].into_iter().find(|c| {
        std::process::Command::new(c)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    }) else {
        eprintln!("skipped: no C++ compiler here");
        return;
    };
    let built = std::process::Command::new(compiler)
        .args(["-std=c++20", "-O1", "-pthread"])
        .arg(kernels_dir().join("emulate.cpp"))
        .arg("-o")
        .arg(&exe)
        .output()
        .unwrap();
    assert!(
        built.status.success(),
        "{compiler}: {}",
        String::from_utf8_lossy(&built.stderr)
    );
    let out = std::process::Command::new(&exe).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("44 of 44 checks passed"), "{text}");
    emulated_quantized_kernels_equal_the_cpu_kernels(&exe, dir.path());
}

/// Deterministic values in [-1, 1).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

/// A `rows x cols` Q8_0 or Q4_K weight whose rows differ in magnitude and some in sign balance
/// (so Q4_K's mins matter).
fn quantized_weight(ty: WeightFormat, rows: usize, cols: usize, seed: u64) -> Vec<u8> {
    let mut w = Vec::new();
    for (r, row) in values(rows * cols, seed).chunks(cols.max(1)).enumerate() {
        let (scale, shift) = ([0.02f32, 1.0, 7.5][r % 3], [0.0f32, 0.6, -0.3, 0.0][r % 4]);
        let row: Vec<f32> = row.iter().map(|v| (v + shift) * scale).collect();
        w.extend(match ty {
            WeightFormat::Q8_0 => vlmem_qwen3vl::format::q8_0::quantize_row(&row).unwrap(),
            WeightFormat::Q4_K => vlmem_qwen3vl::format::q4_k::quantize_row(&row).unwrap(),
            _ => unreachable!("a quantized format"),
        });
    }
    w
}

/// For each output (input row t, weight row r) of `Y = X W^T` with a Q8_0 or Q4_K weight:
/// the exact product of the dequantized weights and the input as the CPU kernels quantize it
/// (in f64, exact for these data), and the magnitude the error bounds scale with, the sum over
/// the row of `|xq|` times the weight's terms taken apart (`|d q|` for Q8_0,
/// `|d| sc q + |dmin| m` for Q4_K, whose difference may cancel).
fn quantized_exact(
    ty: WeightFormat,
    w: &[u8],
    rows: usize,
    cols: usize,
    x: &[f32],
    n: usize,
) -> (Vec<f64>, Vec<f64>) {
    use vlmem_qwen3vl::format::{q4_k, q8_0};
    // Each weight's exact value and two-term magnitude.
    let mut wv = Vec::with_capacity(rows * cols);
    match ty {
        WeightFormat::Q8_0 => {
            for blk in w.chunks_exact(q8_0::BLOCK_BYTES) {
                for i in 0..q8_0::BLOCK_ELEMS {
                    let v = f64::from(q8_0::block_value(blk, i));
                    wv.push((v, v.abs()));
                }
            }
        }
        WeightFormat::Q4_K => {
            for blk in w.chunks_exact(q4_k::BLOCK_BYTES) {
                let (d, dmin) = q4_k::block_scales(blk);
                let packed: &[u8; q4_k::SCALES_BYTES] =
                    blk[q4_k::SCALES_AT..q4_k::QUANTS_AT].try_into().unwrap();
                for i in 0..q4_k::BLOCK_ELEMS {
                    let (sc, m) = q4_k::scale_min(packed, i / q4_k::SUB_ELEMS);
                    let (at, high) = q4_k::quant_position(i);
                    let q = if high { blk[at] >> 4 } else { blk[at] & 15 };
                    let a = f64::from(d) * f64::from(sc) * f64::from(q);
                    let b = f64::from(dmin) * f64::from(m);
                    wv.push((a - b, a.abs() + b.abs()));
                }
            }
        }
        _ => unreachable!("a quantized format"),
    }
    assert_eq!(wv.len(), rows * cols);
    let xq: Vec<f64> = match ty {
        WeightFormat::Q8_0 => {
            let q = kernels::q8_0::Q8Input::new(x);
            (0..x.len()).map(|i| q.value(i)).collect()
        }
        _ => {
            let q = kernels::q4_k::Q8KInput::new(x);
            (0..x.len()).map(|i| q.value(i)).collect()
        }
    };
    let (mut exact, mut mag) = (Vec::new(), Vec::new());
    for t in 0..n {
        for r in 0..rows {
            let (mut e, mut a) = (0f64, 0f64);
            for c in 0..cols {
                let (v, m) = wv[r * cols + c];
                e += v * xq[t * cols + c];
                a += m * xq[t * cols + c].abs();
            }
            exact.push(e);
            mag.push(a);
        }
    }
    (exact, mag)
}

/// Checks `got` (`n x rows`, from a GPU kernel or its emulation) for a Q8_0 or Q4_K weight
/// against the CPU kernels on the same bytes (`kernels::matvec`, one input row at a time) and
/// against the exact product of the dequantized weights and the quantized input.
///
/// Both paths quantize the input with the same code (the GPU's host side calls the CPU
/// kernels' quantizer) and both form each block's products as exact integers, so they differ
/// only in the f32 operations that scale and sum those integers. With `u = 2^-24`, `B` blocks
/// per row and `S` the magnitude of [`quantized_exact`], a sum whose every term passes through
/// at most `k` roundings (products, conversions, additions) is within `k u S` of the exact
/// value (to first order; the `(1 + u)^k` remainder is far below the margin left below):
///
/// * Q8_0. The block dot product is below `32 * 127 * 128 < 2^24`, so its f32 conversion is
///   exact. GPU: `d_w * d_x` (1), times the dot (1, or fused into the add), then a lane's
///   `ceil(B / 8)` additions and the warp's 5 shuffle additions: `k = ceil(B / 8) + 7`. CPU
///   (AVX2, VNNI or scalar): `d_w * d_x` (1), one fused multiply-add (or product and add) per
///   block into each of eight lanes (B + 1), an eight-lane horizontal sum (3):
///   `k = B + 5`. So `|gpu - cpu| <= (2 B + 12) u S`; allowed: `(2 B + 16) u S`.
/// * Q4_K. The block's scaled dot product is below `256 * 15 * 128 * 63 < 2^25` (its
///   conversion rounds once), the mins term below `2^21` (exact). GPU: the conversion (1),
///   `d dx` and `dmin dx` and the two products (2 on each path), the difference (1), then
///   `ceil(B / 4) + 5` additions: `k = ceil(B / 4) + 9`. CPU: the bound its module proves,
///   `(B + 6) 2^-23 A = (2 B + 12) u A`. So `|gpu - cpu| <= (2 B + 12 + ceil(B / 4) + 9) u A
///   <= (3 B + 21) u A`; allowed: `(3 B + 24) u A`.
///
/// Against the exact product the GPU alone is held to `(k + 2) u S`. A wrong quant, scale or
/// block moves an output by about `S / cols` or more, over a thousand times these bounds.
fn check_quantized(
    what: &str,
    ty: WeightFormat,
    (w, rows, cols): (&[u8], usize, usize),
    (x, n): (&[f32], usize),
    got: &[f32],
) {
    let u = f64::from(f32::EPSILON) / 2.0;
    let (cpu_k, gpu_k) = match ty {
        WeightFormat::Q8_0 => {
            let b = cols / 32;
            (2 * b + 16, b.div_ceil(8) + 7)
        }
        _ => {
            let b = cols / 256;
            (3 * b + 24, b.div_ceil(4) + 9)
        }
    };
    let (exact, mag) = quantized_exact(ty, w, rows, cols, x, n);
    assert_eq!(got.len(), n * rows, "{what}");
    let mut worst = 0f64;
    for t in 0..n {
        let cpu = kernels::matvec(w, ty, rows, cols, &x[t * cols..(t + 1) * cols]).unwrap();
        for r in 0..rows {
            let (g, c, i) = (
                f64::from(got[t * rows + r]),
                f64::from(cpu[r]),
                t * rows + r,
            );
            let tol = cpu_k as f64 * u * mag[i];
            assert!(
                (g - c).abs() <= tol,
                "{what} [{t}, {r}]: gpu {g} cpu {c}, |diff| {:e} > {tol:e}",
                (g - c).abs()
            );
            let own = (gpu_k + 2) as f64 * u * mag[i];
            assert!(
                (g - exact[i]).abs() <= own,
                "{what} [{t}, {r}]: gpu {g} exact {}, |diff| {:e} > {own:e}",
                exact[i],
                (g - exact[i]).abs()
            );
            if tol > 0.0 {
                worst = worst.max((g - c).abs() / tol);
            }
        }
    }
    eprintln!("{what}: largest |gpu - cpu| is {worst:.3} of the bound");
}

/// The input of the Q8_0 and Q4_K kernels as the host packs it for the GPU (the feature-gated
/// `kernels::cuda::QuantizedInput`, which a test under `--features cuda` holds to this): the
/// CPU kernels' quantizer's int8 quants, then its f32 scales, then for Q4_K its i16 sums of
/// 32; with where the scales and the sums start.
fn packed_input(ty: WeightFormat, x: &[f32]) -> (Vec<u8>, usize, usize) {
    let (q, d, sums): (Vec<i8>, Vec<f32>, Vec<i16>) = match ty {
        WeightFormat::Q8_0 => {
            let xq = kernels::q8_0::Q8Input::new(x);
            (xq.q, xq.d, Vec::new())
        }
        _ => {
            let xq = kernels::q4_k::Q8KInput::new(x);
            (xq.q, xq.d, xq.sums)
        }
    };
    let mut bytes: Vec<u8> = q.iter().map(|&v| v as u8).collect();
    let d_at = bytes.len();
    bytes.extend(d.iter().flat_map(|v| v.to_le_bytes()));
    let s_at = bytes.len();
    bytes.extend(sums.iter().flat_map(|v| v.to_le_bytes()));
    (bytes, d_at, s_at)
}

/// The Q8_0 and Q4_K kernels, run by the emulator `exe`: for rows not a multiple of 8
/// (partial thread blocks), 1 to 3 blocks per row (lanes past the row's end) and more than a
/// warp's step (Q8_0: 11 blocks, two steps of 8; Q4_K: 5 blocks, two steps of 4), 1 and 3
/// input rows (one with a block of zeros, whose scale is 0), and weights only 2 (Q8_0) or 4
/// (Q4_K) bytes past a 16-byte boundary (the emulator aborts on a load the GPU would fault
/// on), each output equals the CPU kernels' within [`check_quantized`]'s bound.
fn emulated_quantized_kernels_equal_the_cpu_kernels(exe: &Path, dir: &Path) {
    let cases = [
        (
            WeightFormat::Q8_0,
            0u32,
            32usize,
            [1usize, 7, 13, 33, 9],
            [1usize, 2, 3, 1, 11],
        ),
        (
            WeightFormat::Q4_K,
            1,
            256,
            [1, 7, 13, 10, 3],
            [1, 2, 3, 5, 1],
        ),
    ];
    let mut seed = 100;
    for (ty, code, block, row_counts, block_counts) in cases {
        for (k, (&rows, &blocks)) in row_counts.iter().zip(&block_counts).enumerate() {
            for n in [1usize, 3] {
                seed += 1;
                let cols = blocks * block;
                let offset: u32 = match ty {
                    WeightFormat::Q8_0 => [2, 6, 0, 14, 10][k],
                    _ => [4, 12, 0, 8, 4][k],
                };
                let w = quantized_weight(ty, rows, cols, seed);
                let mut x: Vec<f32> = values(n * cols, seed + 1000)
                    .iter()
                    .map(|v| v * 3.0)
                    .collect();
                if n > 1 {
                    x[cols..cols + 32].fill(0.0);
                }
                let mut file = Vec::new();
                for h in [code, rows as u32, cols as u32, n as u32, offset] {
                    file.extend(h.to_le_bytes());
                }
                file.extend(&w);
                file.extend(packed_input(ty, &x).0);
                let (input, output) = (dir.join("case.in"), dir.join("case.out"));
                std::fs::write(&input, &file).unwrap();
                let what = format!("emulated {ty:?} {rows}x{cols} (+{offset} B) n={n}");
                let run = std::process::Command::new(exe)
                    .arg(&input)
                    .arg(&output)
                    .output()
                    .unwrap();
                assert!(
                    run.status.success(),
                    "{what}: {}",
                    String::from_utf8_lossy(&run.stderr)
                );
                let got: Vec<f32> = std::fs::read(&output)
                    .unwrap()
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                    .collect();
                check_quantized(&what, ty, (&w, rows, cols), (&x, n), &got);
            }
        }
    }
}

/// The GPU's share of the plan for `budget` bytes of GPU weights.
fn gpu_plan(
    ckpt: &vlmem_qwen3vl::checkpoint::Checkpoint,
    budget: u64,
) -> vlmem_runner::gpu::GpuLayerPlan {
    let tensors = vlmem_runner::managed::plan_tensors(ckpt);
    let placement =
        vlmem_qwen3vl::placement::place_weights(&ckpt.config, &tensors, budget, u64::MAX);
    vlmem_runner::gpu::GpuLayerPlan::of(&placement)
}

/// The plan gives the GPU whole decoder layers from layer 0 up while its budget holds them,
/// only their 2-D matrices (never norms or 3-D expert stacks), and nothing else.
#[test]
fn gpu_layer_plan_takes_whole_layers_from_the_first() {
    use vlmem_qwen3vl::checkpoint::Checkpoint;
    use vlmem_runner::gpu::GpuLayerPlan;
    for name in FIXTURES {
        let dir = fixture_dir(name);
        let ckpt = Checkpoint::open(&dir).unwrap();
        let layers = ckpt.config.text.num_hidden_layers as usize;
        let matrices = |l: u64| {
            ckpt.tensors
                .iter()
                .filter(move |t| t.layer == Some(l) && t.shape.len() == 2)
        };
        let bytes = |l: u64| matrices(l).map(|t| t.bytes).sum::<u64>();
        let all: u64 = (0..layers as u64).map(bytes).sum();
        assert_eq!(gpu_plan(&ckpt, 0), GpuLayerPlan::default(), "{name}");
        assert_eq!(gpu_plan(&ckpt, bytes(0) - 1).layers, 0, "{name}");
        let one = gpu_plan(&ckpt, bytes(0) + bytes(1) - 1);
        assert_eq!((one.layers, one.weight_bytes), (1, bytes(0)), "{name}");
        assert_eq!(
            one.matrices,
            matrices(0).map(|t| t.name.clone()).collect(),
            "{name}"
        );
        let every = gpu_plan(&ckpt, u64::MAX);
        assert_eq!((every.layers, every.weight_bytes), (layers, all), "{name}");
        for t in &ckpt.tensors {
            let want = t.layer.is_some() && t.shape.len() == 2;
            assert_eq!(every.contains(&t.name), want, "{name}: {}", t.name);
        }
    }
}

/// Matrices planned for the GPU leave the RAM plan: with no RAM for weights, the streamed set
/// shrinks by exactly those matrices, and a run that still asks the CPU source for them (as
/// after a failed device pin) reproduces the reference ids.
#[test]
fn matrices_planned_for_the_gpu_leave_the_ram_plan() {
    use candle_core::Device;
    use std::sync::Arc;
    use vlmem::{ManagerConfig, MemoryManager, TensorKind, Tier};
    use vlmem_qwen3vl::checkpoint::Checkpoint;
    use vlmem_runner::{GenerateOptions, ManagedWeights, Runner};
    let dir = fixture_dir("qwen3-vl-tiny");
    let ckpt = Checkpoint::open(&dir).unwrap();
    let layer0: u64 = ckpt
        .tensors
        .iter()
        .filter(|t| t.layer == Some(0) && t.shape.len() == 2)
        .map(|t| t.bytes)
        .sum();
    let plan = gpu_plan(&ckpt, layer0);
    assert_eq!(plan.layers, 1);
    let manager = || {
        let mut c = ManagerConfig::with_capacities(0, 8 << 20, 4 << 20);
        c.budgets.bytes[Tier::Host.index()][TensorKind::Weight.index()] = 0;
        MemoryManager::new(c).unwrap()
    };
    let all = ManagedWeights::register(manager(), &ckpt, Tier::Host, &Device::Cpu)
        .unwrap()
        .staging();
    let tensors = vlmem_runner::managed::plan_tensors(&ckpt);
    let placement = vlmem_qwen3vl::placement::place_weights(&ckpt.config, &tensors, layer0, 0);
    let except =
        ManagedWeights::register_planned(manager(), &ckpt, Tier::Host, &Device::Cpu, &placement)
            .unwrap();
    let st = except.staging();
    assert_eq!(
        st.streamed_tensors,
        all.streamed_tensors - plan.matrices.len()
    );
    assert_eq!(st.streamed_bytes, all.streamed_bytes - plan.weight_bytes);
    let r = reference(&dir);
    let want = ids(&r["generated_ids"]);
    let runner = Runner::with_weights(&ckpt, Arc::new(except), &Device::Cpu).unwrap();
    let images = runner.load_images(&[dir.join("image0.png")]).unwrap();
    let g = runner
        .model()
        .generate(
            &ids(&r["input_ids"]),
            &images,
            &GenerateOptions {
                max_new_tokens: want.len(),
                stop_ids: vec![],
                ..Default::default()
            },
            &mut |_| {},
        )
        .unwrap();
    assert_eq!(g.generated_ids, want);
}

#[cfg(feature = "cuda")]
mod on_gpu {
    use super::common::{FIXTURES, fixture_dir, flat, ids, max_abs, reference};
    use super::{check_quantized, packed_input, quantized_weight, values};
    use candle_core::Device;
    use half::{bf16, f16};
    use std::sync::Arc;
    use vlmem::{ManagerConfig, MemoryManager, TensorKind, Tier};
    use vlmem_qwen3vl::checkpoint::Checkpoint;
    use vlmem_runner::gpu::{GpuLayerPlan, GpuLayers};
    use vlmem_runner::kernels::cuda::GpuKernels;
    use vlmem_runner::kernels::{self, WeightFormat};
    use vlmem_runner::{GenerateOptions, LogitsFor, ManagedWeights, PrefillOptions, Runner};

    const MIB: u64 = 1 << 20;

    /// The GPU path packs the quantized input exactly as the emulation test feeds it to the
    /// emulated kernels (so that test speaks for the real path), and not at all for the
    /// formats whose kernels read f32. Needs no GPU.
    #[test]
    fn the_gpu_path_packs_the_input_the_emulated_kernels_read() {
        use vlmem_runner::kernels::cuda::QuantizedInput;
        for (ty, cols) in [(WeightFormat::Q8_0, 96), (WeightFormat::Q4_K, 768)] {
            for n in [1, 3] {
                let x: Vec<f32> = values(n * cols, 7 + n as u64)
                    .iter()
                    .map(|v| v * 5.0)
                    .collect();
                let got = QuantizedInput::new(ty, &x).unwrap();
                let (bytes, d_at, s_at) = packed_input(ty, &x);
                assert_eq!((got.d_at, got.s_at), (d_at, s_at), "{ty:?}");
                assert_eq!(got.bytes, bytes, "{ty:?}");
                // Quants from 0, scales 4-byte aligned, sums (Q4_K) 4-byte aligned.
                assert_eq!(d_at, n * cols);
                assert!(d_at % 32 == 0 && s_at % 4 == 0);
            }
        }
        for ty in [WeightFormat::Bf16, WeightFormat::F16, WeightFormat::F32] {
            assert!(QuantizedInput::new(ty, &[1.0; 64]).is_none());
        }
    }

    /// These tests are ignored by default (most machines have no GPU): `.ci/gpu/check` runs
    /// them with `--include-ignored`, and there a missing GPU is a failure, not a pass.
    const NEEDS_GPU: &str = "needs an NVIDIA GPU: run with --include-ignored (.ci/gpu/check)";

    fn require_gpu() {
        assert!(
            vlmem_tier::cuda::probe().is_some(),
            "no CUDA driver or GPU here: {NEEDS_GPU}"
        );
    }

    /// A manager whose device tier is GPU 0, with `device_weight_bytes` of it for weights.
    fn gpu_manager(device_weight_bytes: u64, host_weight_bytes: u64) -> MemoryManager {
        let mut c = ManagerConfig::with_capacities(64 * MIB, 64 * MIB, 16 * MIB);
        c.gpu_ordinal = Some(0);
        c.budgets.bytes[Tier::Device.index()][TensorKind::Weight.index()] = device_weight_bytes;
        c.budgets.bytes[Tier::Host.index()][TensorKind::Weight.index()] = host_weight_bytes;
        let m = MemoryManager::new(c).unwrap();
        assert!(m.device_is_gpu(), "{:?}", m.describe_tiers());
        m
    }

    fn stored(v: &[f32], ty: WeightFormat) -> Vec<u8> {
        match ty {
            WeightFormat::Bf16 => v
                .iter()
                .flat_map(|&x| bf16::from_f32(x).to_le_bytes())
                .collect(),
            WeightFormat::F16 => v
                .iter()
                .flat_map(|&x| f16::from_f32(x).to_le_bytes())
                .collect(),
            WeightFormat::F32 => v.iter().flat_map(|&x| x.to_le_bytes()).collect(),
            WeightFormat::Q8_0 => vlmem_qwen3vl::format::q8_0::quantize_row(v).unwrap(),
            WeightFormat::Q4_K => vlmem_qwen3vl::format::q4_k::quantize_row(v).unwrap(),
        }
    }

    /// The GPU kernels equal the CPU kernels (within f32 summation-order error) for every
    /// stored type, odd and aligned widths (the bf16 vector kernel and the scalar one), one
    /// input row and several; Q8_0 and Q4_K against `kernels::matvec` (the CPU's prefill
    /// matmul keeps a Q4_K input in f32, where decode and the GPU quantize it).
    #[test]
    #[ignore = "needs an NVIDIA GPU: run with --include-ignored (.ci/gpu/check)"]
    fn gpu_kernels_equal_the_cpu_kernels() {
        require_gpu();
        let m = gpu_manager(32 * MIB, 32 * MIB);
        let k = GpuKernels::new(0).unwrap();
        eprintln!("{}", k.describe());
        let shapes = [(1, 1), (7, 13), (3, 8), (33, 264), (64, 2048), (257, 1000)];
        let mut seed = 1;
        for ty in [WeightFormat::Bf16, WeightFormat::F16, WeightFormat::F32] {
            for &(rows, cols) in &shapes {
                for n in [1usize, 3, 40] {
                    seed += 1;
                    let w = stored(&values(rows * cols, seed), ty);
                    let x = values(n * cols, seed + 1000);
                    let h = m
                        .allocate_on(w.len() as u64, TensorKind::Weight, seed, Tier::Device)
                        .unwrap();
                    m.write(h, 0, &w).unwrap();
                    let pin = m.pin(h, Tier::Device).unwrap();
                    assert!(pin.device_address().unwrap().is_some());
                    let got = k.matmul(&pin, ty, rows, cols, &x, n).unwrap();
                    drop(pin);
                    let want = kernels::matmul(&w, ty, rows, cols, &x, n).unwrap();
                    assert_eq!(got.len(), want.len());
                    let tol = 1e-5 * (cols as f32).sqrt().max(1.0);
                    for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                        assert!(
                            (a - b).abs() <= tol,
                            "{ty:?} {rows}x{cols} n={n} [{i}]: gpu {a} cpu {b}"
                        );
                    }
                    m.deallocate(h).unwrap();
                }
            }
        }
        // Q8_0 and Q4_K: odd row counts, 1 to 16 blocks per row, 1, 3 and 40 input rows,
        // against the CPU kernels within check_quantized's bound.
        for (ty, block) in [(WeightFormat::Q8_0, 32), (WeightFormat::Q4_K, 256)] {
            for &(rows, blocks) in &[(1usize, 1usize), (7, 2), (13, 3), (33, 11), (257, 16)] {
                for n in [1usize, 3, 40] {
                    seed += 1;
                    let cols = blocks * block;
                    let w = quantized_weight(ty, rows, cols, seed);
                    let x: Vec<f32> = values(n * cols, seed + 1000)
                        .iter()
                        .map(|v| v * 3.0)
                        .collect();
                    let h = m
                        .allocate_on(w.len() as u64, TensorKind::Weight, seed, Tier::Device)
                        .unwrap();
                    m.write(h, 0, &w).unwrap();
                    let pin = m.pin(h, Tier::Device).unwrap();
                    let got = k.matmul(&pin, ty, rows, cols, &x, n).unwrap();
                    drop(pin);
                    let what = format!("GPU {ty:?} {rows}x{cols} n={n}");
                    check_quantized(&what, ty, (&w, rows, cols), (&x, n), &got);
                    m.deallocate(h).unwrap();
                }
            }
        }
        let (bytes, secs) = k.read_so_far();
        assert!(bytes > 0 && secs > 0.0);
    }

    /// Misuse is a typed error, never a panic or a launch on a wrong pointer: a weight
    /// pinned on the host, sizes that disagree with the pin, input of the wrong length.
    #[test]
    #[ignore = "needs an NVIDIA GPU: run with --include-ignored (.ci/gpu/check)"]
    fn gpu_kernels_refuse_bad_calls() {
        require_gpu();
        let m = gpu_manager(MIB, MIB);
        let k = GpuKernels::new(0).unwrap();
        let w = stored(&values(64, 1), WeightFormat::Bf16);
        let on_host = m.allocate(w.len() as u64, TensorKind::Weight, 1).unwrap();
        m.write(on_host, 0, &w).unwrap();
        let pin = m.pin(on_host, Tier::Host).unwrap();
        assert!(pin.device_address().unwrap().is_none());
        assert!(
            k.matmul(&pin, WeightFormat::Bf16, 8, 8, &[0.0; 8], 1)
                .is_err()
        );
        drop(pin);
        let on_dev = m
            .allocate_on(w.len() as u64, TensorKind::Weight, 2, Tier::Device)
            .unwrap();
        m.write(on_dev, 0, &w).unwrap();
        let pin = m.pin(on_dev, Tier::Device).unwrap();
        // 8 x 16 bf16 is 256 bytes, the pin holds 128.
        assert!(
            k.matmul(&pin, WeightFormat::Bf16, 8, 16, &[0.0; 16], 1)
                .is_err()
        );
        // 7 inputs for an 8-wide matrix.
        assert!(
            k.matmul(&pin, WeightFormat::Bf16, 8, 8, &[0.0; 7], 1)
                .is_err()
        );
        // Right at last; zero input rows give nothing.
        assert_eq!(
            k.matmul(&pin, WeightFormat::Bf16, 8, 8, &[1.0; 8], 1)
                .unwrap()
                .len(),
            8
        );
        assert!(
            k.matmul(&pin, WeightFormat::Bf16, 8, 8, &[], 0)
                .unwrap()
                .is_empty()
        );
    }

    /// The runner with decoder layers on the GPU reproduces the reference on all four
    /// fixtures: the prompt's logits and every generated logit within 1e-4, the same greedy
    /// ids. Device budgets: one layer (a budget smaller than the model), every layer, and
    /// none (all on the CPU); host budgets ample and zero (the CPU layers stream from disk).
    #[test]
    #[ignore = "needs an NVIDIA GPU: run with --include-ignored (.ci/gpu/check)"]
    fn gpu_layers_match_the_reference_on_every_fixture() {
        require_gpu();
        for name in FIXTURES {
            let dir = fixture_dir(name);
            let r = reference(&dir);
            let prompt = ids(&r["input_ids"]);
            let want_ids = ids(&r["generated_ids"]);
            let want_gen = flat(&r["generated_logits"]);
            let want_logits = flat(&r["logits"]);
            let ckpt = Checkpoint::open(&dir).unwrap();
            let layer_bytes: Vec<u64> = (0..ckpt.config.text.num_hidden_layers)
                .map(|l| {
                    ckpt.tensors
                        .iter()
                        .filter(|t| t.layer == Some(l) && t.shape.len() == 2)
                        .map(|t| t.bytes)
                        .sum()
                })
                .collect();
            let all: u64 = layer_bytes.iter().sum();
            for (device_w, host_w, want_layers) in [
                (layer_bytes[0], 8 * MIB, 1),
                (all, 8 * MIB, layer_bytes.len()),
                (layer_bytes[0] - 1, 8 * MIB, 0),
                (layer_bytes[0], 0, 1),
                (all, 0, layer_bytes.len()),
            ] {
                let what = format!("{name}, device {device_w} B, host {host_w} B");
                let m = gpu_manager(device_w, host_w);
                let placement = vlmem_qwen3vl::placement::place_weights(
                    &ckpt.config,
                    &vlmem_runner::managed::plan_tensors(&ckpt),
                    device_w,
                    host_w,
                );
                let plan = GpuLayerPlan::of(&placement);
                let weights = Arc::new(
                    ManagedWeights::register_planned(
                        m.clone(),
                        &ckpt,
                        Tier::Host,
                        &Device::Cpu,
                        &placement,
                    )
                    .unwrap(),
                );
                let layers = Arc::new(
                    GpuLayers::new(weights, &ckpt, &plan, GpuKernels::new(0).unwrap()).unwrap(),
                );
                assert_eq!(layers.report().layers, want_layers, "{what}");
                let runner = Runner::with_weights(&ckpt, layers.clone(), &Device::Cpu).unwrap();
                let images = runner.load_images(&[dir.join("image0.png")]).unwrap();
                let model = runner.model();
                let mut kv = model.new_kv_cache();
                let pre = model
                    .prefill(
                        &prompt,
                        &images,
                        &mut kv,
                        PrefillOptions {
                            logits: LogitsFor::All,
                            ..PrefillOptions::default()
                        },
                    )
                    .unwrap();
                let err = max_abs(&flat(&pre.logits.unwrap()), &want_logits);
                assert!(err < 1e-4, "{what}: prompt logits max-abs {err:e}");
                let g = model
                    .generate(
                        &prompt,
                        &images,
                        &GenerateOptions {
                            max_new_tokens: want_ids.len(),
                            stop_ids: vec![],
                            ..Default::default()
                        },
                        &mut |_| {},
                    )
                    .unwrap();
                assert_eq!(g.generated_ids, want_ids, "{what}");
                let err = max_abs(&g.generated_logits.concat(), &want_gen);
                assert!(err < 1e-4, "{what}: generated_logits max-abs {err:e}");
                let rep = layers.report();
                eprintln!("{what}: {rep:?}");
                assert_eq!(rep.fallbacks, 0, "{what}");
                if want_layers > 0 {
                    assert!(rep.kernel_bytes > 0, "{what}: nothing ran on the GPU");
                    let dev = m.stats().resident.get(Tier::Device, TensorKind::Weight);
                    assert!(dev > 0 && dev <= device_w, "{what}: {dev} B on the device");
                } else {
                    assert_eq!(rep.kernel_bytes, 0, "{what}");
                }
                drop(runner);
                assert_eq!(m.stats().pins, 0, "{what}");
            }
        }
    }
}
