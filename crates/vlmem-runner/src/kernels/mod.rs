//! Matrix-vector kernels for decode: one input row against a weight matrix read in its stored
//! type (bf16, f16 or f32 little-endian bytes, e.g. a tensor pinned in the manager's host
//! tier), accumulated in f32. Decode is bound by reading weights, so the weights are never
//! widened into a second buffer: each element is widened in registers as it is used.
//!
//! - [`matvec`]: `y = W x` for `W: [out, in]` (a linear layer, `x @ W^T`);
//! - [`vecmat`]: `y = x W` for `W: [in, out]` (the released layout's fused experts, `x @ W`);
//! - [`matmul`]: `Y = X W^T` for several rows of `X`: for a few rows (a decode batch) the
//!   batched kernels of [`batch`], which read each weight row once for every input row; for
//!   more (prefill, the vision tower) the tiled product of [`gemm`], which packs panels of
//!   weight rows into the micro-kernels' lanes (f32, bf16 pairs or Q8) a few KiB at a time,
//!   never the whole weight;
//! - [`read_bandwidth_probe`]: a vectorized read of a buffer on all cores, to measure the
//!   machine's memory read bandwidth.
//!
//! AVX2 + FMA is used when the CPU has it (detected at run time), else a portable scalar loop.
//! Q8_0 weights ([`q8_0`]) are multiplied by the input quantized once per call to Q8 blocks
//! of 32: integer dot products per block (AVX-512 VNNI, AVX2 or scalar), f32 accumulation;
//! [`vecmat`] reads them dequantized. Q4_K weights ([`q4_k`]) likewise, with the input
//! quantized once per call to 8-bit blocks of 256 with per-32 sums (integer products per
//! super-block, two f32 products per block); [`vecmat`] dequantizes each row's blocks once.
//! Rows (or, for [`vecmat`], output columns) are split across [`pool::global`], a pool whose
//! threads spin briefly between jobs, so the few hundred short products of a decode step do
//! not each wait for sleeping threads. The crate's `unsafe` lives in this module's
//! [`bf16`] (SIMD), [`q8_0`] (SIMD), [`q4_k`] (SIMD), [`batch`] (SIMD), [`gemm`] (SIMD, and
//! the output its tasks share), [`pool`] (a job's borrowed function) and `cuda` submodules.

pub mod attention;
pub mod batch;
pub mod bf16;
#[cfg(target_arch = "x86_64")]
pub mod bf16_avx512;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod gelu;
pub mod gemm;
pub mod pool;
pub mod q4_k;
pub mod q8_0;
#[cfg(test)]
pub(crate) mod test_util;

use crate::error::{Result, RunnerError};
pub use vlmem_qwen3vl::format::WeightFormat;

/// Elements of weight below which a call stays on the calling thread (the fork costs more).
const MIN_ELEMS_PER_TASK: usize = 1 << 16;

/// Bytes of one row of `cols` values of `ty`, as the kernels index memory; an error when the
/// format cannot store such a row (not whole blocks) or the bytes pass the address space.
pub fn row_bytes(ty: WeightFormat, cols: usize) -> Result<usize> {
    ty.row_bytes(cols as u64)
        .map_err(|e| RunnerError::BadRequest(e.to_string()))
        .and_then(|b| {
            usize::try_from(b).map_err(|_| {
                RunnerError::BadRequest(format!("a row of {cols} {ty} values is {b} bytes"))
            })
        })
}

/// Bytes of a `rows x cols` matrix of `ty`; an error as for [`row_bytes`].
pub fn matrix_bytes(ty: WeightFormat, rows: usize, cols: usize) -> Result<usize> {
    row_bytes(ty, cols)?
        .checked_mul(rows)
        .ok_or_else(|| RunnerError::BadRequest(format!("a {rows} x {cols} {ty} matrix overflows")))
}

/// Which instruction set the Q8_0 kernels use on this machine.
pub fn q8_0_isa() -> &'static str {
    q8_0::Isa::best().name()
}

/// Which instruction set the Q4_K kernels use on this machine.
pub fn q4_k_isa() -> &'static str {
    q4_k::best_isa().name()
}

/// The input as the kernels read it: f32 for the plain formats, quantized once to Q8 blocks
/// of 32 when a Q8_0 matrix is among those multiplied, and to 8-bit blocks of 256 when a
/// Q4_K matrix is.
struct Input<'a> {
    x: &'a [f32],
    q8: Option<q8_0::Q8Input>,
    q8k: Option<q4_k::Q8KInput>,
    /// `x` reordered for the bf16 split kernels, when a bf16 matrix is among those multiplied.
    split: Option<bf16::SplitInput>,
    /// `x` as the batched Q8_0 kernel's one input row, where that kernel has AVX-512 VNNI:
    /// its unsigned-input form (one `vpdpbusd` per block, the weights' sum subtracted once)
    /// gives the single-row kernel's integers, so the same bits, in about 0.6 of its time.
    q8_batch: Option<batch::BatchInput<'a>>,
}

impl<'a> Input<'a> {
    fn new(x: &'a [f32], formats: impl Iterator<Item = WeightFormat>) -> Self {
        let (mut q8, mut q8k, mut split) = (false, false, false);
        for ty in formats {
            q8 |= ty == WeightFormat::Q8_0;
            q8k |= ty == WeightFormat::Q4_K;
            split |= ty == WeightFormat::Bf16 && bf16::Isa::best().splits();
        }
        let q8_batch = (q8 && batch::path_for(WeightFormat::Q8_0) == Some(batch::Path::Avx512))
            .then(|| batch::BatchInput::new(batch::Path::Avx512, WeightFormat::Q8_0, x, 1, x.len()))
            .flatten();
        Input {
            x,
            q8: (q8 && q8_batch.is_none()).then(|| q8_0::Q8Input::new(x)),
            q8k: q8k.then(|| q4_k::Q8KInput::new(x)),
            split: split.then(|| bf16::SplitInput::new(x)),
            q8_batch,
        }
    }

    /// `y = W x` for the rows of `w` (whole rows of `cols` values of `ty`).
    fn rows_into(&self, w: &[u8], ty: WeightFormat, cols: usize, y: &mut [f32]) {
        if let (WeightFormat::Q8_0, Some(b)) = (ty, &self.q8_batch) {
            return batch::rows_into(b, w, y);
        }
        match (ty, &self.q8, &self.q8k) {
            (WeightFormat::Q8_0, Some(xq), _) => q8_0::matvec_rows(w, cols, xq, y),
            (WeightFormat::Q4_K, _, Some(xq)) => q4_k::matvec_rows(w, cols, xq, y),
            (
                WeightFormat::Bf16
                | WeightFormat::F16
                | WeightFormat::F32
                | WeightFormat::Q8_0
                | WeightFormat::Q4_K,
                _,
                _,
            ) => bf16::matvec_rows_prepared(w, ty, cols, self.x, self.split.as_ref(), y),
        }
    }
}

/// Which instruction sets the kernels use on this machine, the widest first: `amx` where
/// the tiled product of bf16 weights runs on AMX tiles, `avx512` where any of the decode,
/// prefill or attention kernels runs on 512-bit vectors (`+vnni` where the Q8_0 kernels use
/// `vpdpbusd`), else `avx2+fma` or `scalar` (the paths [`bf16::Isa::best`],
/// [`q8_0::Isa::best`], [`gemm::path_for`] and [`attention::Isa::best`] choose).
pub fn isa() -> &'static str {
    use gemm::Path;
    let bf16_gemm = gemm::path_for(WeightFormat::Bf16, gemm::precision());
    let amx = matches!(bf16_gemm, Path::AmxExact | Path::AmxBf16);
    let avx512 = bf16::Isa::best() == bf16::Isa::Avx512Split
        || gemm::path_for(WeightFormat::F32, gemm::precision()) == Path::F32Avx512
        || attention::Isa::best() == attention::Isa::Avx512;
    let vnni = q8_0::Isa::best() == q8_0::Isa::Avx512Vnni;
    match (amx, avx512 || vnni, vnni) {
        (true, _, true) => "amx+avx512+vnni",
        (true, true, false) => "amx+avx512",
        (true, false, false) => "amx",
        (false, true, true) => "avx512+vnni",
        (false, true, false) => "avx512",
        (false, false, _) if bf16::has_avx2_fma() => "avx2+fma",
        (false, false, _) => "scalar",
    }
}

fn check(
    what: &str,
    w: &[u8],
    ty: WeightFormat,
    rows: usize,
    cols: usize,
    x_len: usize,
    x_want: usize,
) -> Result<()> {
    let want = matrix_bytes(ty, rows, cols)
        .map_err(|e| RunnerError::BadRequest(format!("{what}: {rows} x {cols}: {e}")))?;
    if w.len() != want {
        return Err(RunnerError::BadRequest(format!(
            "{what}: weight has {} bytes, a {rows} x {cols} {ty:?} matrix needs {want}",
            w.len()
        )));
    }
    if x_len != x_want {
        return Err(RunnerError::BadRequest(format!(
            "{what}: input has {x_len} values, the matrix takes {x_want}"
        )));
    }
    Ok(())
}

/// Bytes of weights per parallel task: small enough that the threads finish together (a
/// thread descheduled for a moment holds up at most one task), large enough that claiming a
/// task (one atomic add) costs nothing beside reading it.
const TASK_BYTES: usize = 1 << 20;

/// Rows per parallel task: a multiple of 4 (the AVX2 kernel's row block) holding about at
/// least [`MIN_ELEMS_PER_TASK`] weights and at most about [`TASK_BYTES`] of them (rows of
/// `row_bytes`), with at least two tasks per thread where the matrix has the rows. Where the
/// matrix is split, the tasks are made as many as a multiple of the threads and as equal as
/// the row block allows: tasks are claimed one at a time, so 7 equal tasks on 2 threads take
/// 4 tasks' time where 8 smaller ones take 3.5 (a quantized matrix's few bytes per row give
/// few 1 MiB tasks, e.g. 7 for the 2B's MLP matrices in Q4_K).
fn rows_per_task(rows: usize, cols: usize, row_bytes: usize) -> usize {
    let threads = pool::global().threads();
    let by_balance = rows.div_ceil(threads * 2);
    let by_size = MIN_ELEMS_PER_TASK.div_ceil(cols.max(1));
    let by_bytes = TASK_BYTES.div_ceil(row_bytes.max(1));
    let per_task = by_bytes.min(by_balance).max(by_size).max(1).div_ceil(4) * 4;
    if per_task >= rows {
        return per_task;
    }
    let tasks = rows.div_ceil(per_task).next_multiple_of(threads);
    rows.div_ceil(tasks).div_ceil(4) * 4
}

/// `y = W x`: `w` holds `W` as `rows x cols` row-major elements of `ty` (little-endian),
/// `x` has `cols` values; returns `rows` values, each accumulated in f32.
pub fn matvec(w: &[u8], ty: WeightFormat, rows: usize, cols: usize, x: &[f32]) -> Result<Vec<f32>> {
    // Checked before the output is allocated: `rows` may be absurd.
    check("matvec", w, ty, rows, cols, x.len(), cols)?;
    let mut y = vec![0f32; rows];
    matvec_into(w, ty, rows, cols, x, &mut y)?;
    Ok(y)
}

/// [`matvec`] into `y` (`rows` values, e.g. a view of the step arena), overwritten.
pub fn matvec_into(
    w: &[u8],
    ty: WeightFormat,
    rows: usize,
    cols: usize,
    x: &[f32],
    y: &mut [f32],
) -> Result<()> {
    check("matvec", w, ty, rows, cols, x.len(), cols)?;
    check_out("matvec", y.len(), rows)?;
    if rows == 0 {
        return Ok(());
    }
    if cols == 0 {
        y.fill(0.0);
        return Ok(());
    }
    let row_bytes = row_bytes(ty, cols)?;
    let per_task = rows_per_task(rows, cols, row_bytes);
    let input = Input::new(x, std::iter::once(ty));
    if per_task >= rows {
        input.rows_into(w, ty, cols, y);
    } else {
        let parts = y.chunks_mut(per_task).zip(w.chunks(per_task * row_bytes));
        pool::global().for_each(parts, |(y, w)| input.rows_into(w, ty, cols, y));
    }
    Ok(())
}

fn check_out(what: &str, have: usize, want: usize) -> Result<()> {
    if have == want {
        Ok(())
    } else {
        Err(RunnerError::BadRequest(format!(
            "{what}: output has room for {have} values, the matrix gives {want}"
        )))
    }
}

/// [`matvec`] of several matrices against the same input (q/k/v, gate/up) in one parallel
/// pass: one fork-join instead of one per matrix, and the small matrices' rows balance the
/// large ones'. `mats` holds each matrix's bytes, type and rows; all take `cols` inputs.
/// Each result equals [`matvec`] of that matrix bit for bit.
pub fn matvec_many(
    mats: &[(&[u8], WeightFormat, usize)],
    cols: usize,
    x: &[f32],
) -> Result<Vec<Vec<f32>>> {
    for &(w, ty, rows) in mats {
        check("matvec_many", w, ty, rows, cols, x.len(), cols)?;
    }
    let mut ys: Vec<Vec<f32>> = mats.iter().map(|&(_, _, rows)| vec![0f32; rows]).collect();
    let mut views: Vec<&mut [f32]> = ys.iter_mut().map(|y| y.as_mut_slice()).collect();
    matvec_many_into(mats, cols, x, &mut views)?;
    Ok(ys)
}

/// [`matvec_many`] into `ys` (one output per matrix, each its rows long), overwritten.
pub fn matvec_many_into(
    mats: &[(&[u8], WeightFormat, usize)],
    cols: usize,
    x: &[f32],
    ys: &mut [&mut [f32]],
) -> Result<()> {
    if ys.len() != mats.len() {
        return Err(RunnerError::BadRequest(format!(
            "matvec_many: {} outputs for {} matrices",
            ys.len(),
            mats.len()
        )));
    }
    for (&(w, ty, rows), y) in mats.iter().zip(ys.iter()) {
        check("matvec_many", w, ty, rows, cols, x.len(), cols)?;
        check_out("matvec_many", y.len(), rows)?;
    }
    if cols == 0 {
        ys.iter_mut().for_each(|y| y.fill(0.0));
        return Ok(());
    }
    let total_rows: usize = mats.iter().map(|&(_, _, rows)| rows).sum();
    let max_row_bytes = mats
        .iter()
        .map(|m| row_bytes(m.1, cols))
        .try_fold(0, |max, b| b.map(|b| max.max(b)))?;
    let per_task = rows_per_task(total_rows, cols, max_row_bytes);
    let mut tasks: Vec<(&[u8], WeightFormat, &mut [f32])> = Vec::new();
    for (&(w, ty, _), y) in mats.iter().zip(ys.iter_mut()) {
        let row_bytes = row_bytes(ty, cols)?;
        for (yc, wc) in y.chunks_mut(per_task).zip(w.chunks(per_task * row_bytes)) {
            tasks.push((wc, ty, yc));
        }
    }
    let input = Input::new(x, mats.iter().map(|m| m.1));
    pool::global().for_each(tasks, |(w, ty, y)| input.rows_into(w, ty, cols, y));
    Ok(())
}

/// [`matvec`] on f32 values in memory (a resident f32 tensor).
pub fn matvec_f32(w: &[f32], rows: usize, cols: usize, x: &[f32]) -> Result<Vec<f32>> {
    matvec(bf16::f32_bytes(w), WeightFormat::F32, rows, cols, x)
}

/// The most rows of `X` [`matmul`] takes: any number (kept as the default of
/// [`crate::weights::WeightSource::matmul_rows_max`]).
pub const MATMUL_MAX_ROWS: usize = usize::MAX;

/// `Y = X W^T`: `w` holds `W` as `rows x cols` elements of `ty`, `x` holds `n` input rows of
/// `cols` values; returns `n x rows` values (row-major), each accumulated in f32:
/// [`gemm::gemm`] on the stored bytes (no widened copy of the weight). Where it takes the
/// decode kernels ([`gemm::route_for`]: bf16, Q8_0 and Q4_K weights up to
/// [`gemm::batch_max_n`] rows, the batched kernels of [`batch`]; f16 and f32 up to
/// [`gemm::ROWS_PATH_MAX_N`] rows), row `t` of the result equals [`matvec`] of input row `t`
/// bit for bit; past them (the tiled product), within f32 accumulation of the same product.
pub fn matmul(
    w: &[u8],
    ty: WeightFormat,
    rows: usize,
    cols: usize,
    x: &[f32],
    n: usize,
) -> Result<Vec<f32>> {
    gemm::gemm(w, ty, rows, cols, x, n, None)
}

/// `y = x W`: `w` holds `W` as `rows x cols` row-major elements of `ty` (`rows` inputs,
/// `cols` outputs), `x` has `rows` values; returns `cols` values accumulated in f32.
pub fn vecmat(w: &[u8], ty: WeightFormat, rows: usize, cols: usize, x: &[f32]) -> Result<Vec<f32>> {
    check("vecmat", w, ty, rows, cols, x.len(), rows)?;
    let mut y = vec![0f32; cols];
    vecmat_into(w, ty, rows, cols, x, &mut y)?;
    Ok(y)
}

/// [`vecmat`] into `y` (`cols` values), overwritten.
pub fn vecmat_into(
    w: &[u8],
    ty: WeightFormat,
    rows: usize,
    cols: usize,
    x: &[f32],
    y: &mut [f32],
) -> Result<()> {
    check("vecmat", w, ty, rows, cols, x.len(), rows)?;
    check_out("vecmat", y.len(), cols)?;
    y.fill(0.0);
    if rows == 0 || cols == 0 {
        return Ok(());
    }
    let threads = pool::global().threads();
    // Column blocks: multiples of 8 (one AVX2 vector), at least MIN_ELEMS_PER_TASK weights;
    // for Q4_K whole blocks of 256 (each row's blocks are dequantized once per task).
    let by_balance = cols.div_ceil(threads * 2);
    let by_size = MIN_ELEMS_PER_TASK.div_ceil(rows);
    let align = match ty {
        WeightFormat::Q4_K => vlmem_qwen3vl::format::q4_k::BLOCK_ELEMS,
        WeightFormat::Bf16 | WeightFormat::F16 | WeightFormat::F32 | WeightFormat::Q8_0 => 8,
    };
    let per_task = (by_balance.max(by_size).max(1).div_ceil(align) * align).min(cols);
    let cols_into = |col0: usize, y: &mut [f32]| match ty {
        WeightFormat::Q4_K => q4_k::vecmat_cols(w, rows, cols, col0, x, y),
        WeightFormat::Bf16 | WeightFormat::F16 | WeightFormat::F32 | WeightFormat::Q8_0 => {
            bf16::vecmat_cols(w, ty, rows, cols, col0, x, y)
        }
    };
    if per_task >= cols {
        cols_into(0, y);
    } else {
        pool::global().for_each(y.chunks_mut(per_task).enumerate(), |(i, y)| {
            cols_into(i * per_task, y)
        });
    }
    Ok(())
}

/// Reads every byte of `buf` with vector loads, split across the kernels' pool, and
/// returns a checksum (so the reads cannot be optimised away). Time it to get the memory
/// read bandwidth.
pub fn read_bandwidth_probe(buf: &[u8]) -> u64 {
    // 4 MiB tasks, claimed one at a time: many more than threads, so the others take over
    // from a thread that the OS descheduled (a shared machine) instead of waiting for it.
    let per_task = 4 << 20;
    let mut sums = vec![0u64; buf.len().div_ceil(per_task)];
    let parts = buf.chunks(per_task).zip(sums.iter_mut());
    pool::global().for_each(parts, |(chunk, sum)| *sum = bf16::read_sum(chunk));
    sums.into_iter().fold(0u64, u64::wrapping_add)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_util::Rng;
    use half::{bf16 as Bf16, f16 as F16};

    /// The reported set names the 512-bit paths where a kernel takes one (on an AVX-512
    /// machine: not "avx2+fma").
    #[test]
    fn isa_names_the_widest_path_in_use() {
        let name = isa();
        let wide = attention::Isa::best() == attention::Isa::Avx512
            || bf16::Isa::best() == bf16::Isa::Avx512Split;
        assert_eq!(
            name.contains("avx512"),
            wide || name.contains("vnni"),
            "{name}"
        );
        assert_eq!(
            name.contains("vnni"),
            q8_0::Isa::best() == q8_0::Isa::Avx512Vnni,
            "{name}"
        );
        if !bf16::has_avx2_fma() {
            assert_eq!(name, "scalar");
        } else if !name.contains("avx512") && !name.contains("amx") {
            assert_eq!(name, "avx2+fma");
        }
    }

    /// The matrix as stored bytes of `ty` and as the exact values those bytes hold.
    fn matrix(rng: &mut Rng, ty: WeightFormat, n: usize) -> (Vec<u8>, Vec<f64>) {
        let mut bytes = Vec::with_capacity(n * 4);
        let mut values = Vec::with_capacity(n);
        for _ in 0..n {
            let v = rng.uniform();
            match ty {
                WeightFormat::Bf16 => {
                    let b = Bf16::from_f32(v);
                    bytes.extend_from_slice(&b.to_le_bytes());
                    values.push(b.to_f64());
                }
                WeightFormat::F16 => {
                    let b = F16::from_f32(v);
                    bytes.extend_from_slice(&b.to_le_bytes());
                    values.push(b.to_f64());
                }
                WeightFormat::F32 => {
                    bytes.extend_from_slice(&v.to_le_bytes());
                    values.push(f64::from(v));
                }
                WeightFormat::Q8_0 | WeightFormat::Q4_K => values.push(f64::from(v)),
            }
        }
        if ty == WeightFormat::Q8_0 {
            let x: Vec<f32> = values.iter().map(|&v| v as f32).collect();
            bytes = vlmem_qwen3vl::format::q8_0::quantize_row(&x).unwrap();
            let mut back = vec![0f32; n];
            vlmem_qwen3vl::format::q8_0::dequantize_row_into(&bytes, &mut back).unwrap();
            values = back.into_iter().map(f64::from).collect();
        }
        if ty == WeightFormat::Q4_K {
            let x: Vec<f32> = values.iter().map(|&v| v as f32).collect();
            bytes = vlmem_qwen3vl::format::q4_k::quantize_row(&x).unwrap();
            let mut back = vec![0f32; n];
            vlmem_qwen3vl::format::q4_k::dequantize_row_into(&bytes, &mut back).unwrap();
            values = back.into_iter().map(f64::from).collect();
        }
        (bytes, values)
    }

    /// Tolerance: f32 accumulation of `n` products of magnitude <= 1.
    fn tol(n: usize) -> f64 {
        1e-6 * (n as f64).max(16.0)
    }

    const SHAPES: [(usize, usize); 12] = [
        (1, 1),
        (1, 7),
        (3, 5),
        (4, 8),
        (5, 17),
        (9, 33),
        (13, 63),
        (31, 129),
        (64, 64),
        (257, 1001),
        (1030, 72),
        (2053, 1024),
    ];

    #[test]
    fn weights_must_be_exactly_the_formats_bytes() {
        for ty in WeightFormat::ALL {
            let (rows, cols) = (5, 256);
            let want = matrix_bytes(ty, rows, cols).unwrap();
            assert_eq!(want as u64, ty.tensor_bytes(&[5, 256]).unwrap());
            let x = vec![0.5f32; cols];
            let w = vec![0u8; want + 1];
            assert_eq!(
                matvec(&w[..want], ty, rows, cols, &x).unwrap(),
                vec![0.0; rows]
            );
            assert!(matvec(&w, ty, rows, cols, &x).is_err(), "{ty}");
            assert!(matvec(&w[..want - 1], ty, rows, cols, &x).is_err(), "{ty}");
            assert!(matmul(&w, ty, rows, cols, &x, 1).is_err(), "{ty}");
            assert!(vecmat(&w, ty, rows, cols, &x[..rows]).is_err(), "{ty}");
        }
        assert!(matches!(
            row_bytes(WeightFormat::F32, usize::MAX),
            Err(RunnerError::BadRequest(_))
        ));
        assert!(matches!(
            matrix_bytes(WeightFormat::Bf16, usize::MAX, 2),
            Err(RunnerError::BadRequest(_))
        ));
    }

    #[test]
    fn matvec_matches_f64_reference_on_odd_shapes() {
        let mut rng = Rng(7);
        for ty in [WeightFormat::Bf16, WeightFormat::F16, WeightFormat::F32] {
            for (rows, cols) in SHAPES {
                let (w, wv) = matrix(&mut rng, ty, rows * cols);
                let x: Vec<f32> = (0..cols).map(|_| rng.uniform()).collect();
                let y = matvec(&w, ty, rows, cols, &x).unwrap();
                assert_eq!(y.len(), rows);
                for r in 0..rows {
                    let want: f64 = (0..cols).map(|c| wv[r * cols + c] * f64::from(x[c])).sum();
                    let err = (f64::from(y[r]) - want).abs();
                    assert!(
                        err <= tol(cols),
                        "{ty:?} {rows}x{cols} row {r}: {} vs {want} (err {err:e})",
                        y[r]
                    );
                }
            }
        }
    }

    #[test]
    fn vecmat_matches_f64_reference_on_odd_shapes() {
        let mut rng = Rng(11);
        for ty in [WeightFormat::Bf16, WeightFormat::F16, WeightFormat::F32] {
            for (rows, cols) in SHAPES {
                let (w, wv) = matrix(&mut rng, ty, rows * cols);
                let x: Vec<f32> = (0..rows).map(|_| rng.uniform()).collect();
                let y = vecmat(&w, ty, rows, cols, &x).unwrap();
                assert_eq!(y.len(), cols);
                for c in 0..cols {
                    let want: f64 = (0..rows).map(|r| wv[r * cols + c] * f64::from(x[r])).sum();
                    let err = (f64::from(y[c]) - want).abs();
                    assert!(
                        err <= tol(rows),
                        "{ty:?} {rows}x{cols} col {c}: {} vs {want} (err {err:e})",
                        y[c]
                    );
                }
            }
        }
    }

    /// The vector path and the scalar path agree (the scalar path is what machines without
    /// AVX2 run), on unaligned weight bytes too.
    #[test]
    fn vector_and_scalar_paths_agree_on_unaligned_bytes() {
        let mut rng = Rng(3);
        for ty in [WeightFormat::Bf16, WeightFormat::F16, WeightFormat::F32] {
            let (rows, cols) = (37, 203);
            let (w, _) = matrix(&mut rng, ty, rows * cols);
            let mut shifted = vec![0u8; 1];
            shifted.extend_from_slice(&w);
            let w = &shifted[1..];
            let x: Vec<f32> = (0..cols).map(|_| rng.uniform()).collect();
            let mut fast = vec![0f32; rows];
            let mut slow = vec![0f32; rows];
            bf16::matvec_rows(w, ty, cols, &x, &mut fast);
            bf16::matvec_rows_scalar(w, ty, cols, &x, &mut slow);
            for (a, b) in fast.iter().zip(&slow) {
                assert!((a - b).abs() <= 1e-4, "{ty:?}: {a} vs {b}");
            }
            let xr: Vec<f32> = (0..rows).map(|_| rng.uniform()).collect();
            let mut fast = vec![0f32; cols];
            let mut slow = vec![0f32; cols];
            bf16::vecmat_cols(w, ty, rows, cols, 0, &xr, &mut fast);
            bf16::vecmat_cols_scalar(w, ty, rows, cols, 0, &xr, &mut slow);
            for (a, b) in fast.iter().zip(&slow) {
                assert!((a - b).abs() <= 1e-4, "{ty:?}: {a} vs {b}");
            }
        }
    }

    /// `a` and `b` agree as two f32 sums of `cols` products in different orders do: within
    /// `cols` roundings of the larger magnitude.
    fn assert_sums_agree(a: &[f32], b: &[f32], cols: usize, what: &str) {
        assert_eq!(a.len(), b.len(), "{what}");
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            let tol = 4.0 * cols as f32 * f32::EPSILON * (x.abs().max(y.abs()) + 1.0);
            assert!((x - y).abs() <= tol, "{what} [{i}]: {x} vs {y}");
        }
    }

    /// Every row of a [`matmul`] (the tiled GEMM) equals [`matvec`] of that input row up to
    /// the order of its sums, on odd shapes and all three types.
    #[test]
    fn matmul_rows_equal_matvec() {
        let mut rng = Rng(5);
        for ty in [WeightFormat::Bf16, WeightFormat::F16, WeightFormat::F32] {
            for (rows, cols) in SHAPES {
                for n in [2usize, 3, 7] {
                    let (w, _) = matrix(&mut rng, ty, rows * cols);
                    let x: Vec<f32> = (0..n * cols).map(|_| rng.uniform()).collect();
                    let y = matmul(&w, ty, rows, cols, &x, n).unwrap();
                    assert_eq!(y.len(), n * rows);
                    for t in 0..n {
                        let want =
                            matvec(&w, ty, rows, cols, &x[t * cols..(t + 1) * cols]).unwrap();
                        assert_sums_agree(
                            &y[t * rows..(t + 1) * rows],
                            &want,
                            cols,
                            &format!("{ty:?} {rows}x{cols} n {n} row {t}"),
                        );
                    }
                }
            }
        }
        // Large enough for several tasks.
        let (rows, cols) = (4099, 700);
        let (w, _) = matrix(&mut rng, WeightFormat::Bf16, rows * cols);
        let x: Vec<f32> = (0..5 * cols).map(|_| rng.uniform()).collect();
        let y = matmul(&w, WeightFormat::Bf16, rows, cols, &x, 5).unwrap();
        for t in 0..5 {
            let want = matvec(
                &w,
                WeightFormat::Bf16,
                rows,
                cols,
                &x[t * cols..(t + 1) * cols],
            )
            .unwrap();
            assert_sums_agree(
                &y[t * rows..(t + 1) * rows],
                &want,
                cols,
                &format!("{rows}x{cols} row {t}"),
            );
        }
        assert!(matmul(&w, WeightFormat::Bf16, rows, cols, &x[1..], 5).is_err());
        assert!(matmul(&w, WeightFormat::Bf16, rows, cols, &x, usize::MAX).is_err());
    }

    /// For bf16, Q8_0 and Q4_K weights, [`matmul`] of up to [`gemm::batch_max_n`] rows
    /// takes the batched kernels, and each of its rows equals [`matvec`] of that input row
    /// bit for bit, whatever the split over tasks (rows that are not a multiple of a task,
    /// several tasks), with a bias added after, and through a weight streamed in blocks of
    /// rows; every batched path this CPU has runs over the pool with the same results as on
    /// one thread.
    #[test]
    fn matmul_batches_equal_matvec_bit_for_bit() {
        let mut rng = Rng(44);
        for ty in [WeightFormat::Bf16, WeightFormat::Q8_0, WeightFormat::Q4_K] {
            let max = gemm::batch_max_n(ty, gemm::precision());
            assert!(max >= 16, "{ty}: batched up to {max} rows");
            let block = usize::try_from(ty.block_elems()).unwrap().max(32);
            for (rows, cols) in [
                (37usize, block),
                (1030, 2 * block),
                (4099, block + 64 * (ty == WeightFormat::Bf16) as usize),
            ] {
                let (w, _) = matrix(&mut rng, ty, rows * cols);
                for n in [2usize, 3, 5, 16] {
                    assert_eq!(gemm::route_for(ty, n), gemm::Route::Batch);
                    let x = rng.values(n * cols);
                    let y = matmul(&w, ty, rows, cols, &x, n).unwrap();
                    let bias = rng.values(rows);
                    let yb = gemm::gemm(&w, ty, rows, cols, &x, n, Some(&bias)).unwrap();
                    // The weight in two blocks of rows, as a streamed weight is multiplied.
                    let split = rows / 3;
                    let rb = row_bytes(ty, cols).unwrap();
                    let mut ys = vec![f32::NAN; n * rows];
                    for (first, count) in [(0, split), (split, rows - split)] {
                        let block = &w[first * rb..(first + count) * rb];
                        gemm::gemm_cols_into(
                            block, ty, count, cols, &x, n, None, &mut ys, rows, first,
                        )
                        .unwrap();
                    }
                    assert_eq!(ys, y, "{ty} {rows}x{cols} n {n} streamed");
                    for t in 0..n {
                        let want =
                            matvec(&w, ty, rows, cols, &x[t * cols..(t + 1) * cols]).unwrap();
                        assert_eq!(
                            &y[t * rows..(t + 1) * rows],
                            &want[..],
                            "{ty} {rows}x{cols} n {n} row {t}"
                        );
                        let with_bias: Vec<f32> =
                            want.iter().zip(&bias).map(|(v, b)| v + b).collect();
                        assert_eq!(
                            &yb[t * rows..(t + 1) * rows],
                            &with_bias[..],
                            "{ty} bias row {t}"
                        );
                    }
                    for path in batch::Path::ALL.into_iter().filter(|p| p.available(ty)) {
                        let pooled =
                            gemm::gemm_batch_on(path, &w, ty, rows, cols, &x, n, None).unwrap();
                        let input = batch::BatchInput::new(path, ty, &x, n, cols).unwrap();
                        let mut one = vec![f32::NAN; n * rows];
                        batch::rows_into(&input, &w, &mut one);
                        assert_eq!(pooled, one, "{ty} {path:?} {rows}x{cols} n {n}");
                    }
                }
            }
        }
        // f16 and f32 weights have no batched kernel: the rows route up to 2 rows, then tiles.
        assert_eq!(gemm::batch_max_n(WeightFormat::F32, gemm::precision()), 0);
        assert_eq!(gemm::route_for(WeightFormat::F16, 2), gemm::Route::Rows);
        assert_eq!(gemm::route_for(WeightFormat::F16, 3), gemm::Route::Tiled);
        assert_eq!(gemm::route_for(WeightFormat::Bf16, 1), gemm::Route::Rows);
        let (w, _) = matrix(&mut rng, WeightFormat::F32, 4 * 32);
        assert!(
            gemm::gemm_via(
                gemm::Route::Batch,
                &w,
                WeightFormat::F32,
                4,
                32,
                &[0.5; 64],
                2,
                None
            )
            .is_err()
        );
        assert!(
            gemm::gemm_batch_on(
                batch::Path::Scalar,
                &w,
                WeightFormat::F32,
                4,
                32,
                &[0.5; 64],
                2,
                None
            )
            .is_err()
        );
    }

    /// [`matvec_many`] gives each matrix's [`matvec`], bit for bit.
    #[test]
    fn matvec_many_equals_matvec() {
        let mut rng = Rng(9);
        let cols = 333;
        let shapes = [
            (1030usize, WeightFormat::Bf16),
            (7, WeightFormat::F16),
            (4099, WeightFormat::Bf16),
        ];
        let mats: Vec<(Vec<u8>, WeightFormat, usize)> = shapes
            .iter()
            .map(|&(rows, ty)| (matrix(&mut rng, ty, rows * cols).0, ty, rows))
            .collect();
        let x: Vec<f32> = (0..cols).map(|_| rng.uniform()).collect();
        let refs: Vec<(&[u8], WeightFormat, usize)> = mats
            .iter()
            .map(|(w, ty, rows)| (&w[..], *ty, *rows))
            .collect();
        let ys = matvec_many(&refs, cols, &x).unwrap();
        for ((w, ty, rows), y) in mats.iter().zip(&ys) {
            assert_eq!(y, &matvec(w, *ty, *rows, cols, &x).unwrap());
        }
        assert!(matvec_many(&refs, cols + 1, &x).is_err());
        assert!(matvec_many(&[], cols, &x).unwrap().is_empty());
    }

    /// The `_into` forms overwrite whatever the output held (an arena view is reused from
    /// step to step) and give what the allocating forms give, bit for bit.
    #[test]
    fn into_forms_overwrite_their_output() {
        let mut rng = Rng(21);
        let (rows, cols) = (301usize, 77usize);
        let (w, _) = matrix(&mut rng, WeightFormat::Bf16, rows * cols);
        let x: Vec<f32> = (0..cols).map(|_| rng.uniform()).collect();
        let xr: Vec<f32> = (0..rows).map(|_| rng.uniform()).collect();
        let mut y = vec![f32::NAN; rows];
        matvec_into(&w, WeightFormat::Bf16, rows, cols, &x, &mut y).unwrap();
        assert_eq!(y, matvec(&w, WeightFormat::Bf16, rows, cols, &x).unwrap());
        let mut y = vec![1e9f32; cols];
        vecmat_into(&w, WeightFormat::Bf16, rows, cols, &xr, &mut y).unwrap();
        assert_eq!(y, vecmat(&w, WeightFormat::Bf16, rows, cols, &xr).unwrap());
        let (w2, _) = matrix(&mut rng, WeightFormat::F16, 9 * cols);
        let mats = [
            (&w[..], WeightFormat::Bf16, rows),
            (&w2[..], WeightFormat::F16, 9),
        ];
        let (mut a, mut b) = (vec![f32::NAN; rows], vec![-7f32; 9]);
        matvec_many_into(&mats, cols, &x, &mut [&mut a, &mut b]).unwrap();
        let want = matvec_many(&mats, cols, &x).unwrap();
        assert_eq!((a, b), (want[0].clone(), want[1].clone()));
        // An output of the wrong length, or a missing one, is an error.
        assert!(matvec_into(&w, WeightFormat::Bf16, rows, cols, &x, &mut [0.0; 3]).is_err());
        assert!(vecmat_into(&w, WeightFormat::Bf16, rows, cols, &xr, &mut [0.0; 3]).is_err());
        assert!(matvec_many_into(&mats, cols, &x, &mut [&mut [0f32; 301][..]]).is_err());
    }

    /// Q8_0 through the public entry points: `matvec` is the quantized-input kernel (equal
    /// to the one-thread call, bit for bit, whatever the split over threads), `matmul` rows
    /// and `matvec_many` equal `matvec`, and `vecmat` reads the weights dequantized.
    #[test]
    fn q8_0_runs_through_every_entry_point() {
        let ty = WeightFormat::Q8_0;
        let mut rng = Rng(33);
        for (rows, cols) in [
            (1usize, 32usize),
            (5, 64),
            (37, 96),
            (1030, 256),
            (4099, 512),
        ] {
            let (w, wv) = matrix(&mut rng, ty, rows * cols);
            assert_eq!(w.len(), matrix_bytes(ty, rows, cols).unwrap());
            let x: Vec<f32> = (0..cols).map(|_| rng.uniform()).collect();
            let y = matvec(&w, ty, rows, cols, &x).unwrap();
            let xq = q8_0::Q8Input::new(&x);
            let mut one = vec![0f32; rows];
            q8_0::matvec_rows(&w, cols, &xq, &mut one);
            assert_eq!(y, one, "{rows}x{cols}");
            let mut via_rows = vec![0f32; rows];
            bf16::matvec_rows(&w, ty, cols, &x, &mut via_rows);
            assert_eq!(y, via_rows, "{rows}x{cols}");
            // Against the exact product: within the input's rounding to Q8 (half a step of
            // each block's scale) and f32 accumulation.
            for r in 0..rows {
                let row = &wv[r * cols..(r + 1) * cols];
                let exact: f64 = row.iter().zip(&x).map(|(w, &x)| w * f64::from(x)).sum();
                let bound: f64 = row
                    .iter()
                    .enumerate()
                    .map(|(c, w)| w.abs() * (f64::from(xq.d[c / 32]) / 2.0 + 1e-6))
                    .sum();
                assert!(
                    (f64::from(y[r]) - exact).abs() <= bound,
                    "{rows}x{cols} row {r}"
                );
            }
            let n = 3;
            let xs: Vec<f32> = (0..n * cols).map(|_| rng.uniform()).collect();
            let ys = matmul(&w, ty, rows, cols, &xs, n).unwrap();
            for t in 0..n {
                let want = matvec(&w, ty, rows, cols, &xs[t * cols..(t + 1) * cols]).unwrap();
                assert_sums_agree(
                    &ys[t * rows..(t + 1) * rows],
                    &want,
                    cols,
                    &format!("{rows}x{cols} row {t}"),
                );
            }
            let (w2, _) = matrix(&mut rng, WeightFormat::Bf16, 9 * cols);
            let mats = [(&w[..], ty, rows), (&w2[..], WeightFormat::Bf16, 9)];
            let many = matvec_many(&mats, cols, &x).unwrap();
            assert_eq!(many[0], y);
            assert_eq!(
                many[1],
                matvec(&w2, WeightFormat::Bf16, 9, cols, &x).unwrap()
            );
            let xr: Vec<f32> = (0..rows).map(|_| rng.uniform()).collect();
            let yv = vecmat(&w, ty, rows, cols, &xr).unwrap();
            for (c, &yc) in yv.iter().enumerate() {
                let want: f64 = (0..rows).map(|r| wv[r * cols + c] * f64::from(xr[r])).sum();
                assert!(
                    (f64::from(yc) - want).abs() <= tol(rows),
                    "{rows}x{cols} col {c}"
                );
            }
        }
        // Rows that are not whole blocks are typed errors, never panics.
        assert!(matches!(
            matvec(&[0u8; 34], ty, 1, 33, &[0.0; 33]),
            Err(RunnerError::BadRequest(_))
        ));
    }

    /// Q4_K through the public entry points, as Q8_0 above: `matvec` is the quantized-input
    /// kernel whatever the split over threads, `matmul` rows and `matvec_many` (beside a
    /// Q8_0 and a bf16 matrix, so the input is quantized both ways in one call) equal
    /// `matvec`, and `vecmat` reads the weights dequantized, split over threads in whole
    /// blocks.
    #[test]
    fn q4_k_runs_through_every_entry_point() {
        let ty = WeightFormat::Q4_K;
        let mut rng = Rng(34);
        for (rows, cols) in [
            (1usize, 256usize),
            (5, 512),
            (37, 768),
            (1030, 256),
            (4099, 512),
            (3, 4096),
        ] {
            let (w, wv) = matrix(&mut rng, ty, rows * cols);
            assert_eq!(w.len(), matrix_bytes(ty, rows, cols).unwrap());
            let x: Vec<f32> = (0..cols).map(|_| rng.uniform()).collect();
            let y = matvec(&w, ty, rows, cols, &x).unwrap();
            let xq = q4_k::Q8KInput::new(&x);
            let mut one = vec![0f32; rows];
            q4_k::matvec_rows(&w, cols, &xq, &mut one);
            assert_eq!(y, one, "{rows}x{cols}");
            let mut via_rows = vec![0f32; rows];
            bf16::matvec_rows(&w, ty, cols, &x, &mut via_rows);
            assert_eq!(y, via_rows, "{rows}x{cols}");
            // Against the exact product: within the input's rounding (half a step of each
            // block's scale) and f32 accumulation (see `q4_k`'s tests for the tight form).
            let within = |y: &[f32], x: &[f32], what: &str| {
                let xq = q4_k::Q8KInput::new(x);
                for (r, &yr) in y.iter().enumerate() {
                    let row = &wv[r * cols..(r + 1) * cols];
                    let exact: f64 = row.iter().zip(x).map(|(w, &x)| w * f64::from(x)).sum();
                    let rounding: f64 = row
                        .iter()
                        .enumerate()
                        .map(|(c, w)| w.abs() * (f64::from(xq.d[c / 256]) / 2.0 + 1.2e-7))
                        .sum();
                    let err = (f64::from(yr) - exact).abs();
                    assert!(
                        err <= rounding + tol(cols),
                        "{what} {rows}x{cols} row {r}: err {err:e}"
                    );
                }
            };
            within(&y, &x, "matvec");
            // A few input rows: each within the same bound of its exact product (whether
            // `matmul` quantizes the input or not).
            let n = 3;
            let xs: Vec<f32> = (0..n * cols).map(|_| rng.uniform()).collect();
            let ys = matmul(&w, ty, rows, cols, &xs, n).unwrap();
            for t in 0..n {
                within(
                    &ys[t * rows..(t + 1) * rows],
                    &xs[t * cols..(t + 1) * cols],
                    "matmul",
                );
            }
            let (w8, _) = matrix(&mut rng, WeightFormat::Q8_0, 7 * cols);
            let (w2, _) = matrix(&mut rng, WeightFormat::Bf16, 9 * cols);
            let mats = [
                (&w[..], ty, rows),
                (&w8[..], WeightFormat::Q8_0, 7),
                (&w2[..], WeightFormat::Bf16, 9),
            ];
            let many = matvec_many(&mats, cols, &x).unwrap();
            assert_eq!(many[0], y);
            assert_eq!(
                many[1],
                matvec(&w8, WeightFormat::Q8_0, 7, cols, &x).unwrap()
            );
            assert_eq!(
                many[2],
                matvec(&w2, WeightFormat::Bf16, 9, cols, &x).unwrap()
            );
            let xr: Vec<f32> = (0..rows).map(|_| rng.uniform()).collect();
            let yv = vecmat(&w, ty, rows, cols, &xr).unwrap();
            for (c, &yc) in yv.iter().enumerate() {
                let want: f64 = (0..rows).map(|r| wv[r * cols + c] * f64::from(xr[r])).sum();
                assert!(
                    (f64::from(yc) - want).abs() <= tol(rows),
                    "{rows}x{cols} col {c}"
                );
            }
        }
        // Rows that are not whole blocks are typed errors, never panics (a whole Q8_0 row
        // is not a whole Q4_K one).
        assert!(matches!(
            matvec(&[0u8; 144], ty, 1, 32, &[0.0; 32]),
            Err(RunnerError::BadRequest(_))
        ));
        assert!(matches!(
            vecmat(&[0u8; 144], ty, 1, 255, &[0.0; 1]),
            Err(RunnerError::BadRequest(_))
        ));
    }

    /// The tasks `rows_per_task` makes leave no thread idle at the end of a job: claimed
    /// one at a time, each by the thread that is free first, the busiest thread gets its
    /// fair share of rows plus at most the row block's rounding per task (before the tasks
    /// were made a multiple of the threads, the 2B's MLP matrices in Q4_K gave 7 tasks, and
    /// on 2 threads one thread 11% more than its share).
    #[test]
    fn tasks_split_rows_evenly_over_the_threads() {
        let threads = pool::global().threads();
        for (rows, cols) in [
            (2048usize, 6144usize),
            (6144, 2048),
            (151_936, 2048),
            (4096, 12_288),
            (1030, 512),
            (4099, 768),
        ] {
            for ty in WeightFormat::ALL {
                let rb = row_bytes(ty, cols).unwrap();
                let per = rows_per_task(rows, cols, rb);
                assert_eq!(per % 4, 0, "{ty} {rows}x{cols}");
                assert!(per * rb <= 2 * TASK_BYTES || per * cols <= 2 * MIN_ELEMS_PER_TASK);
                if per >= rows {
                    continue;
                }
                let mut load = vec![0usize; threads];
                let mut tasks = 0usize;
                for r0 in (0..rows).step_by(per) {
                    let free = (0..threads).min_by_key(|&t| load[t]).unwrap();
                    load[free] += per.min(rows - r0);
                    tasks += 1;
                }
                let busiest = load.iter().copied().max().unwrap();
                let bound = rows.div_ceil(threads) + 4 * tasks.div_ceil(threads);
                assert!(
                    busiest <= bound,
                    "{ty} {rows}x{cols}: {tasks} tasks of {per} rows, busiest thread {busiest} > {bound}"
                );
            }
        }
    }

    #[test]
    fn bad_sizes_are_errors() {
        let w = vec![0u8; 2 * 3 * 4];
        assert!(matvec(&w, WeightFormat::Bf16, 3, 4, &[0.0; 4]).is_ok());
        assert!(matvec(&w, WeightFormat::Bf16, 3, 4, &[0.0; 3]).is_err());
        assert!(matvec(&w, WeightFormat::Bf16, 4, 4, &[0.0; 4]).is_err());
        assert!(matvec(&w, WeightFormat::F32, 3, 4, &[0.0; 4]).is_err());
        assert!(vecmat(&w, WeightFormat::Bf16, 3, 4, &[0.0; 3]).is_ok());
        assert!(vecmat(&w, WeightFormat::Bf16, 3, 4, &[0.0; 4]).is_err());
        assert!(matvec(&w, WeightFormat::Bf16, usize::MAX, 4, &[0.0; 4]).is_err());
    }

    #[test]
    fn read_probe_sums_every_byte() {
        let buf: Vec<u8> = (0..100_003u32).map(|i| (i % 251) as u8).collect();
        let want: u64 = buf.iter().map(|&b| u64::from(b)).sum();
        assert_eq!(read_bandwidth_probe(&buf), want);
        assert_eq!(read_bandwidth_probe(&[]), 0);
    }
}
