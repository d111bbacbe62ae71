//! Tiled matrix products for prefill and the vision tower: `Y = X W^T (+ b)` for `n` input
//! rows `X: [n, in]` and a weight `W: [out, in]` read in its stored format, with no widened
//! copy of the weight. A few rows (a decode batch) go to the decode kernels instead
//! ([`route_for`]: [`super::batch`], or each row's [`super::matvec`] loop), whose work is the
//! rows there are, where a tile's is a whole tile.
//!
//! The loops (after Goto and van de Geijn's layered GEMM):
//! - `X` is packed once per chunk of up to [`CHUNK_ROWS`] rows ([`pack`]), in the lanes the
//!   kernel multiplies (f32 as given; bf16 pairs; three bf16 parts of each value; Q8 blocks
//!   quantized once, as the decode kernels quantize their input), tile by tile;
//! - the outputs are split into panels of whole micro-panels of `rn` outputs, one pool task
//!   each ([`super::pool`]). A task of the register-tile paths walks `in` in blocks of `kc`
//!   values, and for each block converts each micro-panel of its weights (`rn` rows x `kc`
//!   values, a few KiB that stay in L1) into the kernel's lanes, then runs the micro-kernel
//!   over every tile of `X` (whose block stays in L2), adding into the task's f32 tile
//!   buffer. A task of the AMX paths reads the weights' bf16 rows in place (the A tiles;
//!   only a micro-panel at the matrix's edge is copied, padded) and takes one tile of `X` at
//!   a time through every k block and micro-panel, so the tile's block of `X` and its sums
//!   stay in L1 while the weights stream from L2;
//! - the micro-kernel keeps a whole tile of `C` in registers: AMX 32 x 32 (`tdpbf16ps`, four
//!   16 x 16 tiles), AVX-512 12 x 32 (f32 FMAs, or `vdpbf16ps`) or 6 x 32 (`vpdpbusd` on Q8),
//!   AVX2 6 x 16 (f32) or 4 x 8 (`vpmaddwd` on Q8), or portable code, chosen at run time
//!   ([`Path`], [`path_for`]).
//!
//! Each output is the sum over `in` in order (block after block, part after part, f32
//! accumulation), so it does not depend on the split over threads, on the chunking of the
//! rows, or on where its weight row falls in a panel (a streamed weight multiplied piece by
//! piece gives the same bits as the whole weight).
//!
//! Rounding ([`Precision`]):
//! - [`Precision::Exact`] (the default) multiplies `X` as given: within f32 accumulation of
//!   the exact product of the stored weights and `X` (Q8_0 weights: `X` quantized to Q8
//!   blocks, exactly as [`super::matvec`] does). The AMX path splits each f32 of `X` into
//!   three bf16 that sum to it exactly (its top 8 significant bits, the next 8, the last 8),
//!   and every product of two bf16 is exact in f32, so it sums `3 in` exact products in f32:
//!   the bound is that of f32 accumulation of `3 in` terms (parts below bf16's normal range
//!   are flushed: under `2^-126` each). The reference fixtures match to 1e-4 on this path
//!   (their largest difference is about 6e-6).
//! - [`Precision::Bf16Input`] (`VLMEM_GEMM=bf16` or [`set_precision`]) rounds `X` to bf16
//!   (to nearest even) for bf16 weights on AMX CPUs, as llama.cpp rounds activations to its
//!   weights' type: one AMX pass instead of three. Each input moves by at most `2^-9` of
//!   itself, so a sum moves by at most `2^-8 sum |w x|` beyond f32 accumulation (the tests
//!   check `2^-8`; subnormal inputs flush to zero). The fixtures do not meet 1e-4 this way
//!   (the patch embedding of pixels rounded to bf16 is off by about 7e-3), so it is never
//!   the default. Without AMX it runs the exact f32 path: `vdpbf16ps` ([`Path::Bf16Avx512`])
//!   issues a quarter as fast as an FMA on the AVX-512 CPU measured, fewer multiply-adds per
//!   cycle than f32, and is kept only as a path tests and benchmarks can name.
//!
//! A format plugs in by how its rows widen: every format runs on the f32 paths through
//! [`crate::weights::widen_format_into`] of whole blocks (the k blocks are whole blocks of
//! any format of at most [`KC_F32`] values per block: Q4_K's 256 included); a format with an
//! integer product of its own (as Q8_0 here) adds its lanes, packers and kernels beside these.

#![allow(unsafe_code)]

mod pack;
#[cfg(test)]
mod tests;
#[cfg(target_arch = "x86_64")]
pub mod x86;

use super::{WeightFormat, pool};
use crate::error::{Result, RunnerError};
use pack::{PackedX, Panel, X_SCRATCH, X_SCRATCH_KEEP_BYTES, pack_x};
// A process-wide setting read once per call, not shared state a model checks: std's atomic
// (const-constructible in a static, also under the loom build), as `pool::global` uses std's
// `OnceLock`.
use std::sync::atomic::{AtomicU32, Ordering};
use vlmem_qwen3vl::format::q8_0::{BLOCK_BYTES as Q8_BLOCK_BYTES, BLOCK_ELEMS as Q8_BLOCK};

/// Rows of `X` per chunk: each chunk's packed `X` for one k block (`CHUNK_ROWS x kc`, at
/// most 512 KiB) stays in a core's L2 while the task's micro-panels pass over it.
pub const CHUNK_ROWS: usize = 512;

/// Values per k block on the f32 lanes: a 32-output micro-panel of f32 is 32 KiB (L1).
pub const KC_F32: usize = 256;

/// Values per k block on the bf16 and Q8 lanes (the same 32 KiB, or less).
pub const KC_PACKED: usize = 512;

/// Micro-panels per task at most: the task's tile buffer (`CHUNK_ROWS x 4 x 32` f32,
/// 256 KiB) stays in L2 beside the block of `X`.
const MAX_PANEL_MICRO: usize = 4;

/// Rows of `X` up to which [`gemm`] multiplies weights that have no batched kernel (f16,
/// f32: [`super::batch::path_for`]) one input row at a time against L2-cached blocks of the
/// stored weights ([`Route::Rows`]: the matrix-vector kernel's row loop, so each row equals
/// [`super::matvec`] of it bit for bit) instead of packing tiles, whose work is a whole tile
/// (12 or 32 rows) whatever the rows. bf16, Q8_0 and Q4_K weights take [`Route::Batch`]
/// up to [`batch_max_n`] rows instead.
pub const ROWS_PATH_MAX_N: usize = 2;

/// Which loop [`gemm`] runs a product with ([`route_for`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Each input row through the matrix-vector kernel, against L2-sized blocks of the
    /// weight: each output row equals [`super::matvec`]'s bit for bit.
    Rows,
    /// The batched decode kernels ([`super::batch`]): each weight row read once for every
    /// input row, each output row equal to [`super::matvec`]'s bit for bit.
    Batch,
    /// The tiled product on [`path_for`]'s micro-kernel.
    Tiled,
}

/// The most rows of `X` [`gemm`] gives the batched kernels for weights of `ty` at
/// `precision` (0 where `ty` has no batched kernel on this CPU): the batched kernels' time
/// grows with the rows (each row is its own dot products), the tiled product's by whole
/// tiles, so past some rows the tiles win. Measured on the development VM (2 vCPUs of a
/// Xeon with AVX-512 VNNI and BF16, no AMX exposed; `examples/batch_decode.rs`, medians of
/// interleaved runs, 2048 x 6144 and 6144 x 2048), batched against tiled:
///
/// | weights | AVX-512 (batched / tiled ms)              | AVX2 paths on the same CPU       |
/// |---------|-------------------------------------------|----------------------------------|
/// | bf16    | 32 rows: 5.1 / 8.5, 11.2 / 16.8; 48: tie  | 32: 7.4 / 9.8, 15.0 / 21.1; 48: tie |
/// | Q8_0    | 24: 3.9 / 4.4, 7.9 / 9.7; 32: tie         | 32: 7.3 / 8.3, 15.4 / 17.1; 48: tie |
/// | Q4_K    | 48: 5.7 / 9.7, 12.2 / 19.6                | 48: 6.3 / 12.0, 15.1 / 28.3       |
///
/// so bf16 up to 32 rows, Q8_0 up to 24 (AVX-512 VNNI tiles) or 32 (AVX2 tiles), Q4_K (whose
/// tiles widen the weights to f32) up to 48. The AMX tiles (32 rows a tile) and the portable
/// paths were not measured (the VM has no AMX): 16 rows there, the decode batches.
pub fn batch_max_n(ty: WeightFormat, precision: Precision) -> usize {
    let Some(batched) = super::batch::path_for(ty) else {
        return 0;
    };
    if batched == super::batch::Path::Scalar {
        return 16;
    }
    match (ty, path_for(ty, precision)) {
        (_, Path::AmxExact | Path::AmxBf16) => 16,
        (WeightFormat::Bf16, _) => 32,
        (WeightFormat::Q8_0, Path::Q8Avx512) => 24,
        (WeightFormat::Q8_0, Path::Q8Avx2) => 32,
        (WeightFormat::Q4_K, Path::F32Avx512 | Path::F32Avx2) => 48,
        _ => 16,
    }
}

/// The loop [`gemm`] takes for `n` rows of `X` and weights of `ty` at [`precision`]:
/// [`Route::Batch`] from 2 rows up to [`batch_max_n`], else [`Route::Rows`] up to
/// [`ROWS_PATH_MAX_N`] rows (one row: [`super::matvec`] itself; the batched kernels read
/// each weight once either way, and on one row ran no faster), else [`Route::Tiled`]. At 2
/// and 3 rows the batched kernels ran as fast as the rows route or faster (best of 41
/// interleaved runs: bf16 0.66 against 0.72 ms, Q8_0 0.40 against 0.63, Q4_K 0.36 against
/// 0.38 on 2048 x 6144 and 2 rows).
pub fn route_for(ty: WeightFormat, n: usize) -> Route {
    if n >= 2 && n <= batch_max_n(ty, precision()) {
        Route::Batch
    } else if n <= ROWS_PATH_MAX_N {
        Route::Rows
    } else {
        Route::Tiled
    }
}

/// How the activations enter a product (the module doc gives the bounds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    /// `X` in f32 as given (Q8_0 weights: `X` quantized to Q8 blocks, as decode does).
    Exact,
    /// bf16 weights multiply `X` rounded to bf16 where the CPU has AVX-512 BF16; every
    /// other case as [`Precision::Exact`].
    Bf16Input,
}

/// The process's precision: unset (0), exact (1) or bf16 inputs (2).
static PRECISION: AtomicU32 = AtomicU32::new(0);

/// The precision [`gemm`] uses: the last [`set_precision`], else `VLMEM_GEMM` (`exact` or
/// `bf16`), else [`Precision::Exact`].
pub fn precision() -> Precision {
    match PRECISION.load(Ordering::Relaxed) {
        1 => Precision::Exact,
        2 => Precision::Bf16Input,
        _ => {
            let p = match std::env::var("VLMEM_GEMM").as_deref().map(str::trim) {
                Ok("bf16") => Precision::Bf16Input,
                _ => Precision::Exact,
            };
            // A racing `set_precision` wins: only an unset value is replaced.
            let _ = PRECISION.compare_exchange(0, code(p), Ordering::Relaxed, Ordering::Relaxed);
            p
        }
    }
}

fn code(p: Precision) -> u32 {
    match p {
        Precision::Exact => 1,
        Precision::Bf16Input => 2,
    }
}

/// Sets the precision of every later [`gemm`] in the process.
pub fn set_precision(p: Precision) {
    PRECISION.store(code(p), Ordering::Relaxed);
}

/// The micro-kernels ([`x86`] and the portable ones here).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Path {
    /// f32 lanes, portable (4 x 8 tiles).
    F32Scalar,
    /// f32 lanes, AVX2 + FMA (6 x 16).
    F32Avx2,
    /// f32 lanes, AVX-512 F (12 x 32).
    F32Avx512,
    /// bf16 pairs, AVX-512 BF16 `vdpbf16ps` (12 x 32): `X` rounded to bf16.
    Bf16Avx512,
    /// Q8 pairs of `i16`, portable (4 x 8).
    Q8Scalar,
    /// Q8 pairs of `i16`, AVX2 `vpmaddwd` (4 x 8).
    Q8Avx2,
    /// Q8 quads, AVX-512 VNNI `vpdpbusd` (6 x 32).
    Q8Avx512,
    /// bf16 weights, AMX `tdpbf16ps` (32 x 32), each f32 input split into three bf16 parts
    /// that sum to it exactly (the exact path: every product is exact in f32).
    AmxExact,
    /// bf16 weights, AMX `tdpbf16ps` (32 x 32), `X` rounded to bf16.
    AmxBf16,
}

/// How the kernel's 4-byte lanes hold values (in the weight panel and the packed `X`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lanes {
    /// One f32.
    F32,
    /// Two bf16 (the lower index in the low half).
    Bf16Pairs,
    /// Four Q8 quants: weights as unsigned `q + 128`, inputs signed.
    Q8Quads,
    /// Two Q8 quants widened to `i16`.
    Q8Pairs,
    /// Two bf16, as the AMX kernel's tiles hold them: `X` in B tiles (16 pairs of k x 16
    /// input rows), a k step of 32 values at a time; the weights are A tiles read in place
    /// (bf16 rows as stored), or at the matrix's edges a zero-padded row-major copy.
    AmxPairs,
}

impl Lanes {
    /// Values per lane.
    fn group(self) -> usize {
        match self {
            Lanes::F32 => 1,
            Lanes::Bf16Pairs | Lanes::Q8Pairs | Lanes::AmxPairs => 2,
            Lanes::Q8Quads => 4,
        }
    }

    /// Lane groups per k step (a row's groups are padded with zeros to whole steps).
    fn step(self) -> usize {
        match self {
            Lanes::AmxPairs => 16,
            Lanes::F32 | Lanes::Bf16Pairs | Lanes::Q8Pairs | Lanes::Q8Quads => 1,
        }
    }

    /// Lane groups of `values` values, in whole steps.
    fn groups(self, values: usize) -> usize {
        values.div_ceil(self.group()).div_ceil(self.step()) * self.step()
    }

    /// Index (in 4-byte lanes, from a tile's start) of row `r`, group `g` of a tile of `X`
    /// with `rm` rows and `groups` groups per row.
    fn x_at(self, groups: usize, rm: usize, g: usize, r: usize) -> usize {
        match self {
            // B tiles: per step, input rows 0-15 then 16-31, each 16 pairs x 16 rows.
            Lanes::AmxPairs => (g / 16) * 16 * rm + (r / 16) * 256 + (g % 16) * 16 + r % 16,
            Lanes::F32 | Lanes::Bf16Pairs | Lanes::Q8Pairs | Lanes::Q8Quads => {
                let _ = groups;
                g * rm + r
            }
        }
    }

    /// Index (in 4-byte lanes) of group `g`, output `j` of a micro-panel of `rn` outputs
    /// and `groups` groups.
    fn w_at(self, rn: usize, groups: usize, g: usize, j: usize) -> usize {
        match self {
            // The AMX kernel's weights: rows as stored (an edge's zero-padded copy).
            Lanes::AmxPairs => j * groups + g,
            Lanes::F32 | Lanes::Bf16Pairs | Lanes::Q8Pairs | Lanes::Q8Quads => g * rn + j,
        }
    }

    fn quantized(self) -> bool {
        matches!(self, Lanes::Q8Quads | Lanes::Q8Pairs)
    }
}

impl Path {
    /// Every path.
    pub const ALL: [Path; 9] = [
        Path::F32Scalar,
        Path::F32Avx2,
        Path::F32Avx512,
        Path::Bf16Avx512,
        Path::Q8Scalar,
        Path::Q8Avx2,
        Path::Q8Avx512,
        Path::AmxExact,
        Path::AmxBf16,
    ];

    /// Whether this CPU can run the path.
    pub fn available(self) -> bool {
        match self {
            Path::F32Scalar | Path::Q8Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Path::F32Avx2 | Path::Q8Avx2 => x86::has_avx2_fma(),
            #[cfg(target_arch = "x86_64")]
            Path::F32Avx512 => x86::has_avx512(),
            #[cfg(target_arch = "x86_64")]
            Path::Bf16Avx512 => x86::has_avx512_bf16(),
            #[cfg(target_arch = "x86_64")]
            Path::Q8Avx512 => x86::has_avx512_vnni(),
            #[cfg(target_arch = "x86_64")]
            Path::AmxExact | Path::AmxBf16 => x86::has_amx_bf16(),
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// Whether the path multiplies weights of `ty`: the f32 paths any format (widened as
    /// they are packed), the bf16 path bf16, the Q8 paths Q8_0.
    pub fn reads(self, ty: WeightFormat) -> bool {
        match self.lanes() {
            Lanes::F32 => true,
            Lanes::Bf16Pairs | Lanes::AmxPairs => ty == WeightFormat::Bf16,
            Lanes::Q8Quads | Lanes::Q8Pairs => ty == WeightFormat::Q8_0,
        }
    }

    /// The name reports use.
    pub fn name(self) -> &'static str {
        match self {
            Path::F32Scalar => "f32-scalar",
            Path::F32Avx2 => "f32-avx2",
            Path::F32Avx512 => "f32-avx512",
            Path::Bf16Avx512 => "bf16-avx512bf16",
            Path::Q8Scalar => "q8-scalar",
            Path::Q8Avx2 => "q8-avx2",
            Path::Q8Avx512 => "q8-avx512vnni",
            Path::AmxExact => "bf16-amx-split3",
            Path::AmxBf16 => "bf16-amx",
        }
    }

    fn lanes(self) -> Lanes {
        match self {
            Path::F32Scalar | Path::F32Avx2 | Path::F32Avx512 => Lanes::F32,
            Path::Bf16Avx512 => Lanes::Bf16Pairs,
            Path::Q8Scalar | Path::Q8Avx2 => Lanes::Q8Pairs,
            Path::Q8Avx512 => Lanes::Q8Quads,
            Path::AmxExact | Path::AmxBf16 => Lanes::AmxPairs,
        }
    }

    /// Whether the path rounds `X` to bf16 (the [`Precision::Bf16Input`] paths).
    pub fn rounds_inputs(self) -> bool {
        matches!(self, Path::Bf16Avx512 | Path::AmxBf16)
    }

    /// Parts each input value is split into (the exact AMX path's three bf16 parts).
    fn parts(self) -> usize {
        if self == Path::AmxExact { 3 } else { 1 }
    }

    /// Tile rows and outputs.
    fn tile(self) -> (usize, usize) {
        match self {
            Path::F32Scalar | Path::Q8Scalar => (4, 8),
            #[cfg(target_arch = "x86_64")]
            Path::F32Avx2 => x86::F32_256_TILE,
            #[cfg(target_arch = "x86_64")]
            Path::F32Avx512 | Path::Bf16Avx512 => x86::F32_512_TILE,
            #[cfg(target_arch = "x86_64")]
            Path::Q8Avx2 => x86::Q8_256_TILE,
            #[cfg(target_arch = "x86_64")]
            Path::Q8Avx512 => x86::Q8_512_TILE,
            #[cfg(target_arch = "x86_64")]
            Path::AmxExact | Path::AmxBf16 => x86::AMX_TILE,
            #[cfg(not(target_arch = "x86_64"))]
            _ => (4, 8),
        }
    }

    /// Values per k block for weights of `ty`: whole blocks of the format.
    fn kc(self, ty: WeightFormat) -> usize {
        let base = match self {
            // A tile's k block of X stays in L1 (all three parts: 24 KiB, or one: 16 KiB).
            Path::AmxExact => 128,
            Path::AmxBf16 => 256,
            _ => match self.lanes() {
                Lanes::F32 => KC_F32,
                Lanes::Bf16Pairs | Lanes::Q8Quads | Lanes::Q8Pairs | Lanes::AmxPairs => KC_PACKED,
            },
        };
        let block = usize::try_from(ty.block_elems()).unwrap_or(1).max(1);
        base.div_ceil(block) * block
    }
}

/// The path [`gemm`] takes for weights of `ty` at `precision` on this CPU.
pub fn path_for(ty: WeightFormat, precision: Precision) -> Path {
    let first = |paths: &[Path]| {
        paths
            .iter()
            .copied()
            .find(|p| p.available())
            .unwrap_or(Path::F32Scalar)
    };
    match ty {
        WeightFormat::Q8_0 => first(&[Path::Q8Avx512, Path::Q8Avx2, Path::Q8Scalar]),
        WeightFormat::Bf16 if precision == Precision::Bf16Input => first(&[
            Path::AmxBf16,
            Path::F32Avx512,
            Path::F32Avx2,
            Path::F32Scalar,
        ]),
        WeightFormat::Bf16 => first(&[
            Path::AmxExact,
            Path::F32Avx512,
            Path::F32Avx2,
            Path::F32Scalar,
        ]),
        _ => first(&[Path::F32Avx512, Path::F32Avx2, Path::F32Scalar]),
    }
}

/// Where a product's outputs go: element `(t, j)` (input row `t`, weight row `j`) at
/// `t * stride + col0 + j` of a buffer of `len` values. Tasks write disjoint sets of
/// elements (their own weight rows), each through [`Out::store`], which checks bounds.
struct Out {
    ptr: *mut f32,
    len: usize,
    stride: usize,
    col0: usize,
}

// SAFETY: `Out` only hands out writes to elements inside the buffer it was made from,
// which the caller borrows mutably for the whole product; the tasks that share it write
// disjoint elements (each task its own weight rows), so no element is written twice at
// once and none is read through it.
unsafe impl Sync for Out {}
// SAFETY: as above; the pointer is only used while the borrow lives (inside `run`).
unsafe impl Send for Out {}

impl Out {
    /// Writes `vals[i] + bias[j0 + i]` to row `t`, weight rows `j0..j0 + vals.len()`.
    fn store(&self, t: usize, j0: usize, vals: &[f32], bias: Option<&[f32]>) {
        let start = t * self.stride + self.col0 + j0;
        assert!(start + vals.len() <= self.len, "gemm output out of bounds");
        // SAFETY: the range lies inside the buffer (asserted); this task alone writes
        // these elements (see the `Sync` impl), and nothing reads them during the product.
        let dst = unsafe { std::slice::from_raw_parts_mut(self.ptr.add(start), vals.len()) };
        match bias {
            Some(b) => {
                for ((d, v), b) in dst.iter_mut().zip(vals).zip(&b[j0..j0 + vals.len()]) {
                    *d = v + b;
                }
            }
            None => dst.copy_from_slice(vals),
        }
    }
}

/// The weight matrix a product reads: `rows x cols` of `ty`, rows `row_bytes` apart.
#[derive(Clone, Copy)]
struct Weights<'a> {
    w: &'a [u8],
    ty: WeightFormat,
    rows: usize,
    cols: usize,
    row_bytes: usize,
}

/// `C += X W` for one tile with the portable f32 kernel (`rm x rn` from the path).
fn f32_scalar(w: &[f32], x: &[f32], groups: usize, c: &mut [f32], rm: usize, rn: usize) {
    for g in 0..groups {
        let wg = &w[g * rn..(g + 1) * rn];
        for r in 0..rm {
            let xv = x[g * rm + r];
            for (cj, &wj) in c[r * rn..(r + 1) * rn].iter_mut().zip(wg) {
                *cj += xv * wj;
            }
        }
    }
}

/// `C += X W` for one tile with the portable Q8 kernel on `i16` pairs: per block the exact
/// integer sums, then `d_w * d_x` times each, added in f32.
#[allow(clippy::too_many_arguments)]
fn q8_scalar(
    w: &[u32],
    x: &[u32],
    blocks: usize,
    c: &mut [f32],
    dw: &[f32],
    dx: &[f32],
    rm: usize,
    rn: usize,
) {
    let split = |v: u32| {
        (
            i32::from(v as u16 as i16),
            i32::from((v >> 16) as u16 as i16),
        )
    };
    let mut sums = vec![0i32; rm * rn];
    for b in 0..blocks {
        sums.fill(0);
        for g in b * 16..(b + 1) * 16 {
            for r in 0..rm {
                let (x0, x1) = split(x[g * rm + r]);
                for j in 0..rn {
                    let (w0, w1) = split(w[g * rn + j]);
                    sums[r * rn + j] += w0 * x0 + w1 * x1;
                }
            }
        }
        for r in 0..rm {
            for j in 0..rn {
                c[r * rn + j] += sums[r * rn + j] as f32 * (dw[b * rn + j] * dx[b * rm + r]);
            }
        }
    }
}

/// One micro-kernel call's operands: the weight micro-panel, the tile of `X`, the lane
/// groups, and the block scales of
/// Q8 lanes (`dw`: `rn` per block, `dx`/`corr`: `rm` per block).
struct Operands<'a> {
    w: &'a [u8],
    x: &'a [u8],
    groups: usize,
    dw: &'a [f32],
    dx: &'a [f32],
    corr: &'a [i32],
}

/// Runs `path`'s micro-kernel: `C (rm x rn) += X tile x W micro-panel`.
fn kernel(path: Path, o: &Operands<'_>, c: &mut [f32]) {
    let (rm, rn) = path.tile();
    let blocks = o.groups * path.lanes().group() / Q8_BLOCK;
    let (w, x, groups) = (o.w, o.x, o.groups);
    match path {
        #[cfg(target_arch = "x86_64")]
        Path::F32Avx512 if path.available() => {
            // SAFETY: the CPU has AVX-512 F (checked); the kernel checks lengths.
            unsafe { x86::f32_12x32(w, x, groups, c) }
        }
        #[cfg(target_arch = "x86_64")]
        Path::Bf16Avx512 if path.available() => {
            // SAFETY: the CPU has AVX-512 BF16 (checked); the kernel checks lengths.
            unsafe { x86::bf16_12x32(w, x, groups, c) }
        }
        #[cfg(target_arch = "x86_64")]
        Path::Q8Avx512 if path.available() => {
            // SAFETY: the CPU has AVX-512 VNNI (checked); the kernel checks lengths.
            unsafe { x86::q8_6x32(w, x, blocks, c, o.dw, o.dx, o.corr) }
        }
        #[cfg(target_arch = "x86_64")]
        Path::F32Avx2 if path.available() => {
            // SAFETY: the CPU has AVX2 and FMA (checked); the kernel checks lengths.
            unsafe { x86::f32_6x16(w, x, groups, c) }
        }
        #[cfg(target_arch = "x86_64")]
        Path::Q8Avx2 if path.available() => {
            // SAFETY: the CPU has AVX2 and FMA (checked); the kernel checks lengths.
            unsafe { x86::q8_4x8(w, x, blocks, c, o.dw, o.dx) }
        }
        Path::F32Scalar => f32_scalar(
            &bytemuck::cast_slice(w)[..groups * rn],
            &bytemuck::cast_slice(x)[..groups * rm],
            groups,
            c,
            rm,
            rn,
        ),
        Path::Q8Scalar => q8_scalar(
            bytemuck::cast_slice(w),
            bytemuck::cast_slice(x),
            blocks,
            c,
            o.dw,
            o.dx,
            rm,
            rn,
        ),
        // A path this CPU lacks (never chosen: `path_for` and `gemm_on` check), or AMX (its
        // own task loop, `amx_task`).
        _ => unreachable!("gemm path {path:?} has no tile kernel on this CPU"),
    }
}

/// Checks a product's sizes; returns the bytes of one weight row.
fn check(
    w: &[u8],
    ty: WeightFormat,
    rows: usize,
    cols: usize,
    x_len: usize,
    n: usize,
    bias: Option<&[f32]>,
) -> Result<usize> {
    let x_want = n
        .checked_mul(cols)
        .ok_or_else(|| RunnerError::BadRequest(format!("gemm: {n} x {cols} inputs overflow")))?;
    super::check("gemm", w, ty, rows, cols, x_len, x_want)?;
    if let Some(b) = bias
        && b.len() != rows
    {
        return Err(RunnerError::BadRequest(format!(
            "gemm: bias has {} values, the matrix gives {rows}",
            b.len()
        )));
    }
    super::row_bytes(ty, cols)
}

/// `Y = X W^T (+ b)`: `w` holds `W` as `rows x cols` elements of `ty` (`rows` outputs),
/// `x` holds `n` input rows of `cols` values, `bias` (if any) `rows` values; returns
/// `n x rows` values (row-major), on the route [`route_for`] gives: a few rows through the
/// decode kernels (each row equal to [`super::matvec`] of it, bit for bit, plus the bias),
/// more through the tiled product on the path [`path_for`] gives at [`precision`].
pub fn gemm(
    w: &[u8],
    ty: WeightFormat,
    rows: usize,
    cols: usize,
    x: &[f32],
    n: usize,
    bias: Option<&[f32]>,
) -> Result<Vec<f32>> {
    check(w, ty, rows, cols, x.len(), n, bias)?;
    let mut y = vec![0f32; n * rows];
    gemm_into(w, ty, rows, cols, x, n, bias, &mut y)?;
    Ok(y)
}

/// [`gemm`] into `y` (`n x rows` values), overwritten.
#[allow(clippy::too_many_arguments)]
pub fn gemm_into(
    w: &[u8],
    ty: WeightFormat,
    rows: usize,
    cols: usize,
    x: &[f32],
    n: usize,
    bias: Option<&[f32]>,
    y: &mut [f32],
) -> Result<()> {
    gemm_cols_into(w, ty, rows, cols, x, n, bias, y, rows, 0)
}

/// [`gemm`] of a block of a weight's rows into columns `col0..col0 + rows` of `y`, an
/// `n x y_cols` row-major output (a streamed weight multiplied piece by piece); the other
/// columns are left as they are. `bias` holds this block's `rows` values.
#[allow(clippy::too_many_arguments)]
pub fn gemm_cols_into(
    w: &[u8],
    ty: WeightFormat,
    rows: usize,
    cols: usize,
    x: &[f32],
    n: usize,
    bias: Option<&[f32]>,
    y: &mut [f32],
    y_cols: usize,
    col0: usize,
) -> Result<()> {
    let row_bytes = check(w, ty, rows, cols, x.len(), n, bias)?;
    let out = out_view(y, n, y_cols, col0, rows)?;
    let wt = Weights {
        w,
        ty,
        rows,
        cols,
        row_bytes,
    };
    run_route(route_for(ty, n), wt, x, n, bias, &out)
}

/// Runs a product (sizes checked) on `route`; an error for [`Route::Batch`] where `ty` has
/// no batched kernel on this CPU.
fn run_route(
    route: Route,
    wt: Weights<'_>,
    x: &[f32],
    n: usize,
    bias: Option<&[f32]>,
    out: &Out,
) -> Result<()> {
    match route {
        Route::Rows => rows_path(wt, x, n, bias, out),
        Route::Batch => {
            let path = super::batch::path_for(wt.ty).ok_or_else(|| no_batch_kernel(wt.ty))?;
            batch_path(path, wt, x, n, bias, out)
        }
        Route::Tiled => run(path_for(wt.ty, precision()), wt, x, n, bias, out),
    }
}

/// [`gemm`] on a given route (tests and benchmarks): [`Route::Batch`] is an error where
/// `ty` has no batched kernel on this CPU.
#[allow(clippy::too_many_arguments)]
pub fn gemm_via(
    route: Route,
    w: &[u8],
    ty: WeightFormat,
    rows: usize,
    cols: usize,
    x: &[f32],
    n: usize,
    bias: Option<&[f32]>,
) -> Result<Vec<f32>> {
    let row_bytes = check(w, ty, rows, cols, x.len(), n, bias)?;
    let mut y = vec![0f32; n * rows];
    let out = out_view(&mut y, n, rows, 0, rows)?;
    let wt = Weights {
        w,
        ty,
        rows,
        cols,
        row_bytes,
    };
    run_route(route, wt, x, n, bias, &out)?;
    Ok(y)
}

/// [`gemm`] on a given path (tests and benchmarks): an error if this CPU lacks it or it
/// does not read `ty` ([`Path::reads`]).
#[allow(clippy::too_many_arguments)]
pub fn gemm_on(
    path: Path,
    w: &[u8],
    ty: WeightFormat,
    rows: usize,
    cols: usize,
    x: &[f32],
    n: usize,
    bias: Option<&[f32]>,
) -> Result<Vec<f32>> {
    let row_bytes = check(w, ty, rows, cols, x.len(), n, bias)?;
    if !path.available() || !path.reads(ty) {
        return Err(RunnerError::BadRequest(format!(
            "gemm path {} does not run {ty} weights on this CPU",
            path.name()
        )));
    }
    let mut y = vec![0f32; n * rows];
    let out = out_view(&mut y, n, rows, 0, rows)?;
    run(
        path,
        Weights {
            w,
            ty,
            rows,
            cols,
            row_bytes,
        },
        x,
        n,
        bias,
        &out,
    )?;
    Ok(y)
}

/// Checks that `y` holds `n` rows of `y_cols` with room for columns `col0..col0 + rows`.
fn out_view(y: &mut [f32], n: usize, y_cols: usize, col0: usize, rows: usize) -> Result<Out> {
    let fits = col0.checked_add(rows).is_some_and(|end| end <= y_cols)
        && n.checked_mul(y_cols) == Some(y.len());
    if !fits {
        return Err(RunnerError::BadRequest(format!(
            "gemm: output of {} values is not {n} rows of {y_cols} with room for columns {col0}..+{rows}",
            y.len()
        )));
    }
    Ok(Out {
        ptr: y.as_mut_ptr(),
        len: y.len(),
        stride: y_cols,
        col0,
    })
}

/// The tiled product on `path` (sizes checked).
fn run(
    path: Path,
    wt: Weights<'_>,
    x: &[f32],
    n: usize,
    bias: Option<&[f32]>,
    out: &Out,
) -> Result<()> {
    let (rm, rn) = path.tile();
    if n == 0 || wt.rows == 0 {
        return Ok(());
    }
    if wt.cols == 0 {
        let zeros = vec![0f32; wt.rows];
        (0..n).for_each(|t| out.store(t, 0, &zeros, bias));
        return Ok(());
    }
    let kc = path.kc(wt.ty);
    let lanes = path.lanes();
    let micro = wt.rows.div_ceil(rn);
    let threads = pool::global().threads();
    let mut per_task = micro.div_ceil(threads * 4).clamp(1, MAX_PANEL_MICRO);
    if lanes == Lanes::AmxPairs {
        per_task = per_task.min((AMX_TASK_WEIGHT_BYTES / (rn * wt.row_bytes).max(1)).max(1));
    }
    let tiles_total = n.div_ceil(rm);
    let chunk_tiles_max = (CHUNK_ROWS / rm).max(1);
    let chunks = tiles_total.div_ceil(chunk_tiles_max);
    let chunk_tiles = tiles_total.div_ceil(chunks);
    let failure: vlmem_core::sync::Mutex<Option<RunnerError>> = vlmem_core::sync::Mutex::new(None);
    let mut scratch = X_SCRATCH.with(|s| s.take());
    for chunk in 0..chunks {
        let tile0 = chunk * chunk_tiles;
        let tiles = chunk_tiles.min(tiles_total - tile0);
        let xp = pack_x(path, x, n, wt.cols, tile0 * rm, tiles, scratch);
        let panels = (0..micro)
            .step_by(per_task)
            .map(|m0| (m0, per_task.min(micro - m0)));
        pool::global().for_each(panels, |(m0, count)| {
            if let Err(e) = panel_task(path, wt, &xp, tile0, tiles, kc, (m0, count), n, bias, out) {
                failure.lock().get_or_insert(e);
            }
        });
        scratch = xp.buf.lines;
        if let Some(e) = failure.lock().take() {
            return Err(e);
        }
    }
    if scratch.len() * 64 <= X_SCRATCH_KEEP_BYTES {
        X_SCRATCH.with(|s| *s.borrow_mut() = scratch);
    }
    Ok(())
}

/// One task: micro-panels `m0..m0 + count` of the weight against the chunk's tiles.
#[allow(clippy::too_many_arguments)]
fn panel_task(
    path: Path,
    wt: Weights<'_>,
    xp: &PackedX,
    tile0: usize,
    tiles: usize,
    kc: usize,
    (m0, count): (usize, usize),
    n: usize,
    bias: Option<&[f32]>,
    out: &Out,
) -> Result<()> {
    #[cfg(target_arch = "x86_64")]
    if path.lanes() == Lanes::AmxPairs {
        return amx_task(path, wt, xp, tile0, tiles, kc, (m0, count), n, bias, out);
    }
    let (rm, rn) = path.tile();
    let lanes = path.lanes();
    let tile_len = rm * rn;
    let mut c = vec![0f32; count * tiles * tile_len];
    let mut panel = Panel::new(path, kc);
    let xbytes = xp.buf.bytes();
    for k0 in (0..wt.cols).step_by(kc) {
        let klen = kc.min(wt.cols - k0);
        // k blocks start on whole steps (kc is a multiple of every step's values).
        let (g0, groups) = (k0 / lanes.group(), lanes.groups(klen));
        let (b0, blocks) = (k0 / Q8_BLOCK, klen / Q8_BLOCK);
        for i in 0..count {
            panel.pack(path, wt, (m0 + i) * rn, k0, klen)?;
            let wbytes = &panel.buf.bytes()[..groups * rn * 4];
            for t in 0..tiles {
                let xa = (t * xp.groups * rm + lanes.x_at(xp.groups, rm, g0, 0)) * 4;
                let (dx, corr): (&[f32], &[i32]) = if lanes.quantized() {
                    let at = (t * xp.blocks + b0) * rm;
                    let dx = &xp.dx[at..at + blocks * rm];
                    let corr = xp.corr.get(at..at + blocks * rm).unwrap_or(&[]);
                    (dx, corr)
                } else {
                    (&[], &[])
                };
                let operands = Operands {
                    w: wbytes,
                    x: &xbytes[xa..],
                    groups,
                    dw: &panel.dw,
                    dx,
                    corr,
                };
                let ctile = &mut c[(i * tiles + t) * tile_len..(i * tiles + t + 1) * tile_len];
                kernel(path, &operands, ctile);
            }
        }
    }
    for i in 0..count {
        let j0 = (m0 + i) * rn;
        let width = rn.min(wt.rows - j0);
        for t in 0..tiles {
            let ctile = &c[(i * tiles + t) * tile_len..(i * tiles + t + 1) * tile_len];
            for r in 0..rm {
                let row = (tile0 + t) * rm + r;
                if row < n {
                    out.store(row, j0, &ctile[r * rn..r * rn + width], bias);
                }
            }
        }
    }
    Ok(())
}

/// Bytes of one task's weights (its micro-panels over the whole of `in`) that the AMX loop
/// keeps in L2 while every tile of `X` passes over them.
const AMX_TASK_WEIGHT_BYTES: usize = 1 << 20;

/// One task of the AMX paths: micro-panels `m0..m0 + count` against the chunk's tiles, one
/// tile of `X` at a time (its k block, every part, stays in L1 while the task's micro-panels
/// pass over it, and its C tiles stay in L1 over all of `in`); the weights are read in place
/// (whole micro-panels over a whole number of k steps) or from a zero-padded copy of the
/// micro-panel's rows (the edges), made once per task.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
fn amx_task(
    path: Path,
    wt: Weights<'_>,
    xp: &PackedX,
    tile0: usize,
    tiles: usize,
    kc: usize,
    (m0, count): (usize, usize),
    n: usize,
    bias: Option<&[f32]>,
    out: &Out,
) -> Result<()> {
    let (rm, rn) = path.tile();
    let lanes = path.lanes();
    let Some(amx) = x86::AmxTiles::configure() else {
        return Err(RunnerError::BadRequest(
            "gemm: this thread could not configure AMX tiles".into(),
        ));
    };
    let mut copies = Vec::new();
    for i in 0..count {
        let j0 = (m0 + i) * rn;
        let whole = j0 + rn <= wt.rows && wt.cols.is_multiple_of(32);
        copies.push(if whole {
            None
        } else {
            let mut panel = Panel::new(path, wt.cols);
            panel.pack(path, wt, j0, 0, wt.cols)?;
            Some(panel)
        });
    }
    // Each micro-panel's rows and the bytes between them.
    let sources: Vec<(&[u8], usize)> = copies
        .iter()
        .enumerate()
        .map(|(i, copy)| match copy {
            None => (&wt.w[(m0 + i) * rn * wt.row_bytes..], wt.row_bytes),
            Some(panel) => (panel.buf.bytes(), lanes.groups(wt.cols) * 4),
        })
        .collect();
    let xbytes = xp.buf.bytes();
    let mut c = vec![0f32; count * rm * rn];
    let mut column = vec![0f32; rn];
    for t in 0..tiles {
        c.fill(0.0);
        for k0 in (0..wt.cols).step_by(kc) {
            let klen = kc.min(wt.cols - k0);
            let steps = lanes.groups(klen) / lanes.step();
            let xa = (t * xp.groups * rm + lanes.x_at(xp.groups, rm, k0 / 2, 0)) * 4;
            for (&(w, stride), ct) in sources.iter().zip(c.chunks_exact_mut(rm * rn)) {
                x86::amx_32x32(
                    &amx,
                    &w[2 * k0..],
                    stride,
                    &xbytes[xa..],
                    steps,
                    path.parts(),
                    xp.part_bytes,
                    ct,
                );
            }
        }
        // C's tiles are transposed: output j's values are row j.
        for (i, ct) in c.chunks_exact(rm * rn).enumerate() {
            let j0 = (m0 + i) * rn;
            let width = rn.min(wt.rows - j0);
            for r in 0..rm {
                let row = (tile0 + t) * rm + r;
                if row >= n {
                    break;
                }
                for (j, v) in column[..width].iter_mut().enumerate() {
                    *v = ct[j * rm + r];
                }
                out.store(row, j0, &column[..width], bias);
            }
        }
    }
    Ok(())
}

/// Bytes of weights per task of the rows path: a block that stays in a core's L2 cache
/// while every input row passes over it.
const ROWS_BLOCK_BYTES: usize = 512 << 10;

/// The rows path: each input row through the matrix-vector kernel ([`super::matvec`]'s
/// row loop) against blocks of whole 4-row groups of the weight (so each output equals
/// `matvec` of its input row, bit for bit) small enough for L2, each block read from memory
/// once for all the rows.
fn rows_path(wt: Weights<'_>, x: &[f32], n: usize, bias: Option<&[f32]>, out: &Out) -> Result<()> {
    if n == 0 || wt.rows == 0 {
        return Ok(());
    }
    if wt.cols == 0 {
        let zeros = vec![0f32; wt.rows];
        (0..n).for_each(|t| out.store(t, 0, &zeros, bias));
        return Ok(());
    }
    let by_cache = (ROWS_BLOCK_BYTES / wt.row_bytes.max(1)).max(4) / 4 * 4;
    let per_task = by_cache
        .min(super::rows_per_task(wt.rows, wt.cols, wt.row_bytes))
        .max(4);
    let inputs: Vec<super::Input> = x
        .chunks(wt.cols)
        .map(|xt| super::Input::new(xt, std::iter::once(wt.ty)))
        .collect();
    pool::global().for_each((0..wt.rows).step_by(per_task), |r0| {
        let rb = per_task.min(wt.rows - r0);
        let wb = &wt.w[r0 * wt.row_bytes..(r0 + rb) * wt.row_bytes];
        let mut local = vec![0f32; rb];
        for (t, input) in inputs.iter().enumerate() {
            input.rows_into(wb, wt.ty, wt.cols, &mut local);
            out.store(t, r0, &local, bias);
        }
    });
    Ok(())
}

/// [`gemm`] on the batched route with a given batched path (tests and benchmarks: a path
/// other than [`super::batch::path_for`]'s may give other bits than [`super::matvec`]); an
/// error if this CPU lacks it or it does not read `ty`.
#[allow(clippy::too_many_arguments)]
pub fn gemm_batch_on(
    path: super::batch::Path,
    w: &[u8],
    ty: WeightFormat,
    rows: usize,
    cols: usize,
    x: &[f32],
    n: usize,
    bias: Option<&[f32]>,
) -> Result<Vec<f32>> {
    let row_bytes = check(w, ty, rows, cols, x.len(), n, bias)?;
    if !path.available(ty) {
        return Err(no_batch_kernel(ty));
    }
    let mut y = vec![0f32; n * rows];
    let out = out_view(&mut y, n, rows, 0, rows)?;
    let wt = Weights {
        w,
        ty,
        rows,
        cols,
        row_bytes,
    };
    batch_path(path, wt, x, n, bias, &out)?;
    Ok(y)
}

fn no_batch_kernel(ty: WeightFormat) -> RunnerError {
    RunnerError::BadRequest(format!(
        "gemm: no batched kernel for {ty} weights on this CPU"
    ))
}

/// The batched route: the inputs prepared once ([`super::batch::BatchInput`]: quantized or
/// split, as the matrix-vector kernels take them), then tasks of whole rows
/// ([`super::rows_per_task`]) over the pool, each reading its rows once for every input row.
fn batch_path(
    path: super::batch::Path,
    wt: Weights<'_>,
    x: &[f32],
    n: usize,
    bias: Option<&[f32]>,
    out: &Out,
) -> Result<()> {
    if n == 0 || wt.rows == 0 {
        return Ok(());
    }
    if wt.cols == 0 {
        let zeros = vec![0f32; wt.rows];
        (0..n).for_each(|t| out.store(t, 0, &zeros, bias));
        return Ok(());
    }
    let input = super::batch::BatchInput::new(path, wt.ty, x, n, wt.cols)
        .ok_or_else(|| no_batch_kernel(wt.ty))?;
    let per_task = super::rows_per_task(wt.rows, wt.cols, wt.row_bytes);
    pool::global().for_each((0..wt.rows).step_by(per_task), |r0| {
        let rb = per_task.min(wt.rows - r0);
        let wb = &wt.w[r0 * wt.row_bytes..(r0 + rb) * wt.row_bytes];
        let mut local = vec![0f32; n * rb];
        super::batch::rows_into(&input, wb, &mut local);
        for (t, yt) in local.chunks_exact(rb).enumerate() {
            out.store(t, r0, yt, bias);
        }
    });
    Ok(())
}
