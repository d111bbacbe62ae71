//! Decode for a batch of input rows: `Y[t] = W x_t` for `n` input rows (`t < n`, the
//! sequences of a continuous batch, 1 to 16 and more) against one weight matrix, each weight
//! row read from memory once for all `n` products, on one thread's share of rows (the caller
//! splits the rows over [`super::pool::global`], as [`super::matvec`] does:
//! [`super::gemm::gemm`] routes small `n` here).
//!
//! The inputs are prepared once per call ([`BatchInput`]): quantized to the same 8-bit
//! blocks as the single-row kernels quantize them ([`q8_0::Q8Input`], [`q4_k::Q8KInput`]) or
//! split for the bf16 kernels ([`bf16::SplitInput`]), then interleaved block by block (block
//! `b` of every row together), so one pointer walks the inputs of all the rows in step with
//! the weight row.
//!
//! # Bits
//!
//! Row `t` of the result equals [`super::matvec`] of input `t`, bit for bit: each path adds
//! each output's products in the single-row kernel's order, into the same lanes, with the
//! same horizontal sums, and only the number of dot products per weight block changes.
//! [`path_for`] gives, for each format, the path that matches the single-row path this CPU
//! runs:
//! - bf16: [`Path::Avx512`] matches [`bf16::Isa::Avx512Split`] (16 f32 lanes per output),
//!   [`Path::Avx2`] [`bf16::Isa::Avx2Split`] (8 lanes), [`Path::Scalar`] the scalar loop (four
//!   chains). Where the chunked loop below parks an accumulator in memory between two
//!   blocks of columns, it is stored and reloaded whole: the order of its additions is
//!   unchanged.
//! - Q8_0 and Q4_K: every vector path of the single-row kernels (AVX2, AVX-512 VNNI) gives
//!   the same bits (the integer dot products are exact, lane for lane), and so do both
//!   vector paths here. The VNNI path of Q8_0 takes the input as unsigned bytes `x + 128`
//!   against the signed weights (`vpdpbusd`), minus `128 sum w` per lane, computed once per
//!   weight block for all the inputs: the same exact i32 lanes as the single-row kernels'
//!   sign trick, one instruction per input and block instead of four. [`Path::Scalar`]
//!   matches the scalar single-row loops.
//!
//! # Loops
//!
//! - Q8_0 and Q4_K: a weight row at a time. Q8_0 takes the inputs in groups of up to 8 with
//!   their accumulators in registers (a second group reads the row again from L1); Q4_K
//!   widens each weight block's quants and sub-block scales once into registers and runs
//!   every input against them, its accumulators in L1.
//! - bf16: the inputs are f32 (4 bytes a column, 32 times the weight's bytes at 16 rows), so
//!   the columns are taken in chunks whose inputs stay in L1 ([`X_CHUNK_BYTES`]), and the
//!   rows in panels whose accumulators stay in L1 or L2 ([`ACC_PANEL_BYTES`]); each weight
//!   row's chunk is read from memory once and from L1 by the later groups of inputs
//!   (accumulators in registers: on AVX-512 two weight rows at a time, each input vector
//!   loaded once for both, up to 8 inputs a group, and a last odd row alone, up to 12; on
//!   AVX2 one row, up to 8). When all the inputs fit one chunk the rows run one after
//!   another, each row whole.
//!
//! The prepared inputs and the accumulators start on a cache line (`Aligned`): on the
//! development VM, 16 inputs against 64 bf16 rows of 1024 in L2 took 42 us with the inputs
//! where the allocator put them (every 64-byte load across two lines) and 27 us aligned.

#![allow(unsafe_code)]

use super::{WeightFormat, bf16, q4_k, q8_0};
use vlmem_qwen3vl::format::{q4_k as q4f, q8_0 as q8f};

/// The batched kernels' paths (per format: see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// Portable code.
    Scalar,
    /// AVX2 + FMA + F16C.
    Avx2,
    /// AVX-512 F for bf16 (inline assembly); AVX-512 VNNI + VL on 256-bit vectors for Q8_0
    /// and Q4_K.
    Avx512,
}

impl Path {
    /// Every path, slowest first.
    pub const ALL: [Path; 3] = [Path::Scalar, Path::Avx2, Path::Avx512];

    /// Whether this CPU can run the path for weights of `ty` (no path reads f16 or f32).
    pub fn available(self, ty: WeightFormat) -> bool {
        match (self, ty) {
            (_, WeightFormat::F16 | WeightFormat::F32) => false,
            (Path::Scalar, _) => true,
            (Path::Avx2, _) => bf16::has_avx2_fma(),
            #[cfg(target_arch = "x86_64")]
            (Path::Avx512, WeightFormat::Bf16) => super::bf16_avx512::available(),
            #[cfg(not(target_arch = "x86_64"))]
            (Path::Avx512, WeightFormat::Bf16) => false,
            (Path::Avx512, WeightFormat::Q8_0 | WeightFormat::Q4_K) => {
                q8_0::Isa::Avx512Vnni.available()
            }
        }
    }

    /// The name reports use.
    pub fn name(self) -> &'static str {
        match self {
            Path::Scalar => "scalar",
            Path::Avx2 => "avx2",
            Path::Avx512 => "avx512",
        }
    }
}

/// The path whose results equal [`super::matvec`]'s on this CPU bit for bit, for weights of
/// `ty`; `None` where there is no batched kernel (f16, f32, and bf16 on the older widening
/// path [`bf16::Isa::Avx2`], which only `VLMEM_BF16_ISA` picks).
pub fn path_for(ty: WeightFormat) -> Option<Path> {
    let vector = |ty| {
        if Path::Avx512.available(ty) {
            Path::Avx512
        } else {
            Path::Avx2
        }
    };
    match ty {
        WeightFormat::Bf16 => match bf16::Isa::best() {
            bf16::Isa::Avx512Split => Some(Path::Avx512),
            bf16::Isa::Avx2Split => Some(Path::Avx2),
            bf16::Isa::Scalar => Some(Path::Scalar),
            bf16::Isa::Avx2 => None,
        },
        WeightFormat::Q8_0 => match q8_0::Isa::best() {
            q8_0::Isa::Scalar => Some(Path::Scalar),
            q8_0::Isa::Avx2 | q8_0::Isa::Avx512Vnni => Some(vector(ty)),
        },
        WeightFormat::Q4_K => match q4_k::best_isa() {
            q8_0::Isa::Scalar => Some(Path::Scalar),
            q8_0::Isa::Avx2 | q8_0::Isa::Avx512Vnni => Some(vector(ty)),
        },
        WeightFormat::F16 | WeightFormat::F32 => None,
    }
}

/// Bytes of the bf16 inputs (all rows) per chunk of columns on [`Path::Avx512`]: they stay
/// in L1 while the panel's weight rows pass over them. On the development VM (48 KiB of L1
/// data), 16 rows of 2048-6144 columns against 128 weight rows in L2 ran 25-40% faster
/// with 32 KiB than with 16 KiB, and slower again with 48 KiB or more.
pub const X_CHUNK_BYTES_AVX512: usize = 32 << 10;

/// As [`X_CHUNK_BYTES_AVX512`] on [`Path::Avx2`]: half the 32 KiB of L1 data of the AVX2
/// laptops this path serves (on the development VM 8 and 16 KiB ran alike, 32 KiB slower).
pub const X_CHUNK_BYTES_AVX2: usize = 16 << 10;

/// Bytes of a bf16 panel's accumulators (its rows x inputs, 64 or 32 bytes each).
pub const ACC_PANEL_BYTES: usize = 32 << 10;

/// How far ahead of its reads a weight stream asks for lines (bytes), as the single-row
/// kernels do.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
const PREFETCH_BYTES: usize = 1024;

/// A buffer of `len` values whose first lies on a 64-byte boundary (a cache line), so a
/// kernel's 64-byte loads of it never straddle two lines.
struct Aligned<T> {
    buf: Vec<T>,
    start: usize,
    len: usize,
}

impl<T: Copy + Default> Aligned<T> {
    fn new(len: usize) -> Self {
        let pad = 64 / std::mem::size_of::<T>().max(1);
        let buf = vec![T::default(); len + pad];
        // Where the address cannot be aligned (never for these types), unaligned: the
        // kernels take any alignment.
        let start = Some(buf.as_ptr().align_offset(64))
            .filter(|&s| s <= pad)
            .unwrap_or(0);
        Aligned { buf, start, len }
    }

    fn as_slice(&self) -> &[T] {
        &self.buf[self.start..self.start + self.len]
    }

    fn as_mut_slice(&mut self) -> &mut [T] {
        &mut self.buf[self.start..self.start + self.len]
    }
}

/// The inputs as a path reads them.
enum Data {
    /// bf16: per whole block of 32 columns, each row's [`bf16::SplitInput`] block (the vector
    /// paths; empty for the scalar one, which reads `x`).
    Bf16 { xs: Aligned<f32> },
    /// Q8_0: per block, each row's 32 quants (as `q + 128` for [`Path::Avx512`]), and each
    /// row's scale.
    Q8 { q: Aligned<i8>, d: Vec<f32> },
    /// Q4_K: per block of 256, each row's quants, scale and 8 sums.
    Q4K {
        q: Aligned<i8>,
        d: Vec<f32>,
        sums: Vec<i16>,
    },
}

/// `n` input rows prepared once per product for a path and a format: the same quantization
/// as the single-row kernels, interleaved block by block.
pub struct BatchInput<'a> {
    path: Path,
    n: usize,
    cols: usize,
    /// The rows as given (`n x cols`).
    x: &'a [f32],
    data: Data,
}

impl<'a> BatchInput<'a> {
    /// Prepares the `n` rows of `cols` values in `x` for weights of `ty` on `path` (a path
    /// this CPU lacks runs the scalar one). `None` for f16 and f32 weights, or if `x` is not
    /// `n x cols` values. Q8_0 and Q4_K columns should be whole blocks (the caller's check).
    pub fn new(path: Path, ty: WeightFormat, x: &'a [f32], n: usize, cols: usize) -> Option<Self> {
        if n.checked_mul(cols) != Some(x.len()) || !Path::Scalar.available(ty) {
            return None;
        }
        let path = if path.available(ty) {
            path
        } else {
            Path::Scalar
        };
        let rows = || x.chunks_exact(cols.max(1)).take(n);
        let data = match ty {
            WeightFormat::Bf16 => {
                let whole = cols / bf16::SPLIT_BLOCK * bf16::SPLIT_BLOCK;
                let mut xs = Aligned::new(0);
                if path != Path::Scalar {
                    xs = Aligned::new(n * whole);
                    let xs = xs.as_mut_slice();
                    for (t, xt) in rows().enumerate() {
                        let s = bf16::SplitInput::new(xt);
                        for (b, blk) in s.values().chunks_exact(bf16::SPLIT_BLOCK).enumerate() {
                            let at = (b * n + t) * bf16::SPLIT_BLOCK;
                            xs[at..at + bf16::SPLIT_BLOCK].copy_from_slice(blk);
                        }
                    }
                }
                Data::Bf16 { xs }
            }
            WeightFormat::Q8_0 => {
                let blocks = cols.div_ceil(q8f::BLOCK_ELEMS);
                let mut qa = Aligned::new(n * blocks * q8f::BLOCK_ELEMS);
                let q = qa.as_mut_slice();
                let mut d = vec![0f32; n * blocks];
                // The VNNI path reads the quants as unsigned `q + 128` (the top bit flipped).
                let flip = if path == Path::Avx512 { 0x80u8 } else { 0 };
                for (t, xt) in rows().enumerate() {
                    let xq = q8_0::Q8Input::new(xt);
                    for b in 0..blocks {
                        let at = (b * n + t) * q8f::BLOCK_ELEMS;
                        let src = &xq.q[b * q8f::BLOCK_ELEMS..(b + 1) * q8f::BLOCK_ELEMS];
                        for (dst, &v) in q[at..at + q8f::BLOCK_ELEMS].iter_mut().zip(src) {
                            *dst = (v as u8 ^ flip) as i8;
                        }
                        d[b * n + t] = xq.d[b];
                    }
                }
                Data::Q8 { q: qa, d }
            }
            WeightFormat::Q4_K => {
                let blocks = cols.div_ceil(q4f::BLOCK_ELEMS);
                let mut qa = Aligned::new(n * blocks * q4f::BLOCK_ELEMS);
                let q = qa.as_mut_slice();
                let mut d = vec![0f32; n * blocks];
                let mut sums = vec![0i16; n * blocks * q4f::SUB_BLOCKS];
                for (t, xt) in rows().enumerate() {
                    let xq = q4_k::Q8KInput::new(xt);
                    for b in 0..blocks {
                        let at = (b * n + t) * q4f::BLOCK_ELEMS;
                        q[at..at + q4f::BLOCK_ELEMS].copy_from_slice(
                            &xq.q[b * q4f::BLOCK_ELEMS..(b + 1) * q4f::BLOCK_ELEMS],
                        );
                        d[b * n + t] = xq.d[b];
                        let s = (b * n + t) * q4f::SUB_BLOCKS;
                        sums[s..s + q4f::SUB_BLOCKS].copy_from_slice(
                            &xq.sums[b * q4f::SUB_BLOCKS..(b + 1) * q4f::SUB_BLOCKS],
                        );
                    }
                }
                Data::Q4K { q: qa, d, sums }
            }
            WeightFormat::F16 | WeightFormat::F32 => return None,
        };
        Some(BatchInput {
            path,
            n,
            cols,
            x,
            data,
        })
    }

    /// The path the input was prepared for.
    pub fn path(&self) -> Path {
        self.path
    }

    /// The number of input rows.
    pub fn rows(&self) -> usize {
        self.n
    }

    /// The format the input was prepared for.
    pub fn format(&self) -> WeightFormat {
        match self.data {
            Data::Bf16 { .. } => WeightFormat::Bf16,
            Data::Q8 { .. } => WeightFormat::Q8_0,
            Data::Q4K { .. } => WeightFormat::Q4_K,
        }
    }
}

/// `y[t * rows + r] = sum_c W[r, c] x_t[c]` for the `rows = y.len() / n` weight rows held by
/// `w` (whole rows of the input's format and columns) and every input row `t`: row-major
/// `n x rows`, one output row per input row. Panics if `w` or `y` is too short.
pub fn rows_into(input: &BatchInput<'_>, w: &[u8], y: &mut [f32]) {
    let n = input.n;
    if n == 0 {
        return;
    }
    let rows = y.len() / n;
    assert_eq!(y.len(), rows * n, "batch: the output is not whole rows");
    let row_bytes = match input.format().row_bytes(input.cols as u64) {
        Ok(b) => b as usize,
        Err(e) => panic!("batch: {e}"),
    };
    assert!(w.len() >= rows * row_bytes, "batch: the weight is short");
    if rows == 0 {
        return;
    }
    match &input.data {
        Data::Bf16 { xs } => bf16_rows(input, xs.as_slice(), w, y, rows),
        Data::Q8 { q, d } => q8_rows(input, q.as_slice(), d, w, y, rows),
        Data::Q4K { q, d, sums } => q4k_rows(input, q.as_slice(), d, sums, w, y, rows),
    }
}

/// Splits `n` inputs into as few groups of at most `max` as possible, of sizes differing by
/// at most one: `(first, count)` each.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
fn groups(n: usize, max: usize) -> Vec<(usize, usize)> {
    let count = n.div_ceil(max.max(1)).max(1);
    let (base, extra) = (n / count, n % count);
    let mut out = Vec::with_capacity(count);
    let mut first = 0;
    for g in 0..count {
        let size = base + usize::from(g < extra);
        if size > 0 {
            out.push((first, size));
        }
        first += size;
    }
    out
}

/// The sum of 8 lanes in the order of the single-row kernels' AVX2 horizontal sum
/// (`((v0 + v4) + (v2 + v6)) + ((v1 + v5) + (v3 + v7))`).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
fn hsum8(v: &[f32]) -> f32 {
    let s: [f32; 4] = std::array::from_fn(|i| v[i] + v[i + 4]);
    hsum4(&s)
}

/// The sum of 4 lanes in that order (`(v0 + v2) + (v1 + v3)`).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
fn hsum4(s: &[f32]) -> f32 {
    (s[0] + s[2]) + (s[1] + s[3])
}

// ---------------------------------------------------------------------------------------
// bf16

fn bf16_rows(input: &BatchInput<'_>, xs: &[f32], w: &[u8], y: &mut [f32], rows: usize) {
    match input.path {
        #[cfg(target_arch = "x86_64")]
        Path::Avx512 => {
            let two: &Bf16Kernel2<'_> = &|gs, w, ws, x, nb, acc, acs, pf| {
                x86::bf16_rows2_avx512(gs, w, ws, x, input.n * 32, nb, acc, acs, pf)
            };
            let one: &Bf16Kernel<'_> = &|gs, w, x, nb, acc, pf| {
                x86::bf16_group_avx512(gs, w, x, input.n * 32, nb, acc, pf)
            };
            bf16_chunked(
                input,
                xs,
                w,
                y,
                rows,
                16,
                X_CHUNK_BYTES_AVX512,
                (12, one),
                Some((8, two)),
            )
        }
        #[cfg(target_arch = "x86_64")]
        Path::Avx2 => {
            let one: &Bf16Kernel<'_> =
                &|gs, w, x, nb, acc, pf| x86::bf16_group_avx2(gs, w, x, input.n * 32, nb, acc, pf);
            bf16_chunked(input, xs, w, y, rows, 8, X_CHUNK_BYTES_AVX2, (8, one), None)
        }
        _ => bf16_scalar(input, w, y, rows),
    }
}

/// The portable bf16 loop: per row, each input's four chains of products in column order,
/// summed as `(a0 + a1) + (a2 + a3)` ([`bf16::matvec_rows_scalar`]'s order), each weight
/// widened once for all the inputs.
fn bf16_scalar(input: &BatchInput<'_>, w: &[u8], y: &mut [f32], rows: usize) {
    let (n, cols) = (input.n, input.cols);
    let mut acc = vec![[0f32; 4]; n];
    for r in 0..rows {
        let row = &w[r * cols * 2..(r + 1) * cols * 2];
        acc.fill([0.0; 4]);
        for (c, pair) in row.chunks_exact(2).enumerate() {
            let wv = f32::from_bits(u32::from(u16::from_le_bytes([pair[0], pair[1]])) << 16);
            for (t, a) in acc.iter_mut().enumerate() {
                a[c % 4] += wv * input.x[t * cols + c];
            }
        }
        for (t, a) in acc.iter().enumerate() {
            y[t * rows + r] = (a[0] + a[1]) + (a[2] + a[3]);
        }
    }
}

/// A bf16 group kernel: adds `nb` blocks of one weight row (`w`, 64 bytes a block) times a
/// group of `gs` inputs (`x`: input `k`'s split block at `32 k`, the next block `32 n`
/// values on) into the group's accumulators (`acc`, `lanes` f32 per input), asking for the
/// line `pf` bytes past each block.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
type Bf16Kernel<'k> = dyn Fn(usize, &[u8], &[f32], usize, &mut [f32], usize) + 'k;

/// As [`Bf16Kernel`] for two weight rows at once: the second row `ws` bytes past the first
/// (in `w`), its accumulators `acs` f32 past the first's (in `acc`).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
type Bf16Kernel2<'k> = dyn Fn(usize, &[u8], usize, &[f32], usize, &mut [f32], usize, usize) + 'k;

/// The vector bf16 loop (the module doc): chunks of columns, panels of rows, groups of
/// inputs; `lanes` f32 per accumulator, at most `gmax` inputs per kernel call; each output
/// the single-row kernel's lane sum plus its columns past the whole blocks.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
fn bf16_chunked(
    input: &BatchInput<'_>,
    xs: &[f32],
    w: &[u8],
    y: &mut [f32],
    rows: usize,
    lanes: usize,
    x_chunk_bytes: usize,
    (gmax, kernel): (usize, &Bf16Kernel<'_>),
    two: Option<(usize, &Bf16Kernel2<'_>)>,
) {
    let (n, cols) = (input.n, input.cols);
    let blocks = cols / bf16::SPLIT_BLOCK;
    let whole = blocks * bf16::SPLIT_BLOCK;
    let row_bytes = cols * 2;
    let chunk = (x_chunk_bytes / (n * 128)).clamp(1, blocks.max(1));
    // All the inputs in one chunk: the rows are one stream, read ahead as the single-row
    // kernels do; else the next rows' same chunk is asked for two rows ahead.
    let pf = if chunk >= blocks {
        PREFETCH_BYTES
    } else {
        2 * row_bytes
    };
    let panel = (ACC_PANEL_BYTES / (n * lanes * 4)).clamp(1, rows);
    let groups1 = groups(n, gmax);
    let groups2 = two.map(|(g2, _)| groups(n, g2)).unwrap_or_default();
    let reduce = |v: &[f32]| {
        if lanes == 16 {
            super::bf16_avx512::lanes_sum(v)
        } else {
            hsum8(v)
        }
    };
    let mut acc = Aligned::new(panel * n * lanes);
    let acc = acc.as_mut_slice();
    for p0 in (0..rows).step_by(panel) {
        let pr = panel.min(rows - p0);
        acc.fill(0.0);
        for c0 in (0..blocks).step_by(chunk) {
            let nb = chunk.min(blocks - c0);
            let mut r = p0;
            while r < p0 + pr {
                let at = r * row_bytes + c0 * 64;
                if let Some((_, kernel2)) = two
                    && r + 1 < p0 + pr
                {
                    let wrows = &w[at..at + row_bytes + nb * 64];
                    for &(g0, gs) in &groups2 {
                        let x = &xs[(c0 * n + g0) * 32..];
                        let a0 = ((r - p0) * n + g0) * lanes;
                        let acs = n * lanes;
                        let a = &mut acc[a0..a0 + acs + gs * lanes];
                        kernel2(gs, wrows, row_bytes, x, nb, a, acs, pf);
                    }
                    r += 2;
                    continue;
                }
                let wrow = &w[at..at + nb * 64];
                for &(g0, gs) in &groups1 {
                    let x = &xs[(c0 * n + g0) * 32..];
                    let a0 = ((r - p0) * n + g0) * lanes;
                    kernel(gs, wrow, x, nb, &mut acc[a0..a0 + gs * lanes], pf);
                }
                r += 1;
            }
        }
        for r in p0..p0 + pr {
            let row = &w[r * row_bytes..(r + 1) * row_bytes];
            for t in 0..n {
                let a0 = ((r - p0) * n + t) * lanes;
                let xt = &input.x[t * cols..(t + 1) * cols];
                y[t * rows + r] = reduce(&acc[a0..a0 + lanes]) + bf16::bf16_tail(row, xt, whole);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Q8_0

fn q8_rows(input: &BatchInput<'_>, q: &[i8], d: &[f32], w: &[u8], y: &mut [f32], rows: usize) {
    match input.path {
        #[cfg(target_arch = "x86_64")]
        Path::Avx2 | Path::Avx512 => {
            x86::q8_rows(input.path, input.n, input.cols, q, d, w, y, rows)
        }
        _ => q8_scalar(input.n, input.cols, q, d, w, y, rows),
    }
}

/// The portable Q8_0 loop ([`q8_0::matvec_rows_scalar`]'s order): per block the exact i32
/// dot product, times `d_w * d_x`, added in f32, each weight block for every input.
fn q8_scalar(n: usize, cols: usize, q: &[i8], d: &[f32], w: &[u8], y: &mut [f32], rows: usize) {
    let blocks = cols / q8f::BLOCK_ELEMS;
    let row_bytes = blocks * q8f::BLOCK_BYTES;
    let mut acc = vec![0f32; n];
    for r in 0..rows {
        let row = &w[r * row_bytes..(r + 1) * row_bytes];
        acc.fill(0.0);
        for (b, blk) in row.chunks_exact(q8f::BLOCK_BYTES).enumerate() {
            let dw = half::f16::from_le_bytes([blk[0], blk[1]]).to_f32();
            for (t, a) in acc.iter_mut().enumerate() {
                let at = (b * n + t) * q8f::BLOCK_ELEMS;
                let sum: i32 = blk[2..]
                    .iter()
                    .zip(&q[at..at + q8f::BLOCK_ELEMS])
                    .map(|(&wq, &xq)| i32::from(wq as i8) * i32::from(xq))
                    .sum();
                *a += dw * d[b * n + t] * sum as f32;
            }
        }
        for (t, &a) in acc.iter().enumerate() {
            y[t * rows + r] = a;
        }
    }
}

// ---------------------------------------------------------------------------------------
// Q4_K

#[allow(clippy::too_many_arguments)]
fn q4k_rows(
    input: &BatchInput<'_>,
    q: &[i8],
    d: &[f32],
    sums: &[i16],
    w: &[u8],
    y: &mut [f32],
    rows: usize,
) {
    match input.path {
        #[cfg(target_arch = "x86_64")]
        Path::Avx2 | Path::Avx512 => {
            x86::q4k_rows(input.path, input.n, input.cols, q, d, sums, w, y, rows)
        }
        _ => q4k_scalar(input.n, input.cols, q, d, sums, w, y, rows),
    }
}

/// The portable Q4_K loop ([`q4_k::matvec_rows_scalar`]'s order), each block's scales
/// unpacked once for every input.
#[allow(clippy::too_many_arguments)]
fn q4k_scalar(
    n: usize,
    cols: usize,
    q: &[i8],
    d: &[f32],
    sums: &[i16],
    w: &[u8],
    y: &mut [f32],
    rows: usize,
) {
    let blocks = cols / q4f::BLOCK_ELEMS;
    let row_bytes = blocks * q4f::BLOCK_BYTES;
    let mut acc = vec![0f32; n];
    for r in 0..rows {
        let row = &w[r * row_bytes..(r + 1) * row_bytes];
        acc.fill(0.0);
        for (b, blk) in row.chunks_exact(q4f::BLOCK_BYTES).enumerate() {
            let (dw, dmin) = q4f::block_scales(blk);
            let word = |k: usize| {
                let at = q4f::SCALES_AT + k;
                u32::from_le_bytes([blk[at], blk[at + 1], blk[at + 2], blk[at + 3]])
            };
            let (sc, m) = q4f::unpack_scale_words(word(0), word(4), word(8));
            let (sc, m) = (sc.to_le_bytes(), m.to_le_bytes());
            for (t, a) in acc.iter_mut().enumerate() {
                let at = (b * n + t) * q4f::BLOCK_ELEMS;
                let xs = &q[at..at + q4f::BLOCK_ELEMS];
                let mut dot = 0i32;
                for (g, bytes) in blk[q4f::QUANTS_AT..].chunks_exact(32).enumerate() {
                    let (x_lo, x_hi) = xs[64 * g..64 * g + 64].split_at(32);
                    let (mut lo, mut hi) = (0i32, 0i32);
                    for ((&qv, &a), &b) in bytes.iter().zip(x_lo).zip(x_hi) {
                        lo += i32::from(qv & 0x0F) * i32::from(a);
                        hi += i32::from(qv >> 4) * i32::from(b);
                    }
                    dot += i32::from(sc[2 * g]) * lo + i32::from(sc[2 * g + 1]) * hi;
                }
                let s = (b * n + t) * q4f::SUB_BLOCKS;
                let mins: i32 = m
                    .iter()
                    .zip(&sums[s..s + q4f::SUB_BLOCKS])
                    .map(|(&m, &s)| i32::from(m) * i32::from(s))
                    .sum();
                let dx = d[b * n + t];
                *a += dw * dx * dot as f32 - dmin * dx * mins as f32;
            }
        }
        for (t, &a) in acc.iter().enumerate() {
            y[t * rows + r] = a;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{PREFETCH_BYTES, Path, groups, hsum4, hsum8, q4f, q8f};
    use std::arch::asm;
    use std::arch::x86_64::*;

    /// The bits of an f32 lane that hold a pair's odd (high) bf16.
    const ODD_HALF: i32 = 0xFFFF_0000_u32 as i32;

    /// Asks for the cache line at `p` (a hint: it never faults).
    #[inline]
    #[target_feature(enable = "avx2")]
    fn prefetch(p: *const u8) {
        _mm_prefetch::<_MM_HINT_T0>(p as *const i8);
    }

    /// Checks what a bf16 group kernel reads and writes.
    fn check_bf16_group(
        gs: usize,
        w: &[u8],
        x: &[f32],
        xstride: usize,
        nb: usize,
        acc: &[f32],
        lanes: usize,
    ) {
        assert!(gs >= 1 && nb >= 1 && w.len() >= nb * 64 && acc.len() >= gs * lanes);
        assert!(x.len() >= (nb - 1) * xstride + gs * 32 && xstride >= gs * 32);
    }

    /// The AVX2 bf16 group kernel ([`super::Bf16Kernel`], 8 lanes, `gs <= 8`): per block,
    /// the row's two 256-bit halves split into even (shifted up) and odd (masked) lanes once,
    /// then each input's four fused multiply-adds in the order of
    /// [`super::bf16::Isa::Avx2Split`]'s kernel (half 0 even, odd; half 1 even, odd).
    pub fn bf16_group_avx2(
        gs: usize,
        w: &[u8],
        x: &[f32],
        xstride: usize,
        nb: usize,
        acc: &mut [f32],
        pf: usize,
    ) {
        check_bf16_group(gs, w, x, xstride, nb, acc, 8);
        assert!(super::bf16::has_avx2_fma());
        let (wp, xp, ap) = (w.as_ptr(), x.as_ptr(), acc.as_mut_ptr());
        // SAFETY: avx2 and fma were detected (asserted); the lengths each call reads and
        // writes were checked above (`nb` blocks of 64 bytes, the inputs' blocks `xstride`
        // apart, `gs` accumulators of 8 f32).
        unsafe {
            match gs {
                1 => bf16_avx2::<1>(wp, xp, xstride, nb, ap, pf),
                2 => bf16_avx2::<2>(wp, xp, xstride, nb, ap, pf),
                3 => bf16_avx2::<3>(wp, xp, xstride, nb, ap, pf),
                4 => bf16_avx2::<4>(wp, xp, xstride, nb, ap, pf),
                5 => bf16_avx2::<5>(wp, xp, xstride, nb, ap, pf),
                6 => bf16_avx2::<6>(wp, xp, xstride, nb, ap, pf),
                7 => bf16_avx2::<7>(wp, xp, xstride, nb, ap, pf),
                8 => bf16_avx2::<8>(wp, xp, xstride, nb, ap, pf),
                _ => panic!("bf16 batch: a group of {gs} inputs"),
            }
        }
    }

    /// # Safety
    /// The CPU must have avx2 and fma; `w` must be valid for `64 nb` bytes, `x` for block
    /// `b < nb` of inputs `k < G` at `b * xstride + 32 k` (32 f32), `acc` for `8 G` f32.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn bf16_avx2<const G: usize>(
        w: *const u8,
        x: *const f32,
        xstride: usize,
        nb: usize,
        acc: *mut f32,
        pf: usize,
    ) {
        let mask = _mm256_set1_epi32(ODD_HALF);
        // SAFETY: `acc` holds 8 G f32 (the caller's guarantee); unaligned loads.
        let mut a: [__m256; G] =
            std::array::from_fn(|k| unsafe { _mm256_loadu_ps(acc.add(8 * k)) });
        for b in 0..nb {
            // SAFETY: block b < nb of the row and of each input (the caller's guarantee);
            // unaligned loads; the prefetch never faults.
            unsafe {
                let q = w.add(64 * b);
                prefetch(q.wrapping_add(pf));
                let v0 = _mm256_loadu_si256(q as *const __m256i);
                let v1 = _mm256_loadu_si256(q.add(32) as *const __m256i);
                let e0 = _mm256_castsi256_ps(_mm256_slli_epi32::<16>(v0));
                let o0 = _mm256_castsi256_ps(_mm256_and_si256(v0, mask));
                let e1 = _mm256_castsi256_ps(_mm256_slli_epi32::<16>(v1));
                let o1 = _mm256_castsi256_ps(_mm256_and_si256(v1, mask));
                let xb = x.add(b * xstride);
                for (k, ak) in a.iter_mut().enumerate() {
                    let xk = xb.add(32 * k);
                    *ak = _mm256_fmadd_ps(e0, _mm256_loadu_ps(xk), *ak);
                    *ak = _mm256_fmadd_ps(o0, _mm256_loadu_ps(xk.add(16)), *ak);
                    *ak = _mm256_fmadd_ps(e1, _mm256_loadu_ps(xk.add(8)), *ak);
                    *ak = _mm256_fmadd_ps(o1, _mm256_loadu_ps(xk.add(24)), *ak);
                }
            }
        }
        for (k, ak) in a.into_iter().enumerate() {
            // SAFETY: as for the loads above.
            unsafe { _mm256_storeu_ps(acc.add(8 * k), ak) };
        }
    }

    /// One AVX-512 bf16 group kernel per group size: accumulators `zmm0..` (one per input,
    /// loaded from and stored back to `acc`, 64 bytes each), the odd-lane mask in zmm15; per
    /// block the row's 64 bytes are split once into even (zmm13, shifted up) and odd (zmm12,
    /// masked) lanes, then each input `k` adds even then odd products (its split block at
    /// `x + 128 k`, the even half first) as [`super::super::bf16_avx512`]'s kernels do.
    macro_rules! bf16_group_avx512 {
        ($name:ident, [$($k:literal),+]) => {
            /// # Safety
            /// The CPU must have AVX-512 F; `w` must be valid for `64 n` bytes, `x` for
            /// block `b < n` of inputs `k` of the group at `b * xs + 128 k` bytes (128
            /// bytes), `acc` for 64 bytes per input.
            #[inline(never)]
            unsafe fn $name(
                w: *const u8,
                x: *const f32,
                xs: usize,
                n: usize,
                acc: *mut f32,
                pf: usize,
            ) {
                // SAFETY: the caller guarantees every access above (the prefetches read
                // nothing and cannot fault) and AVX-512 F; the block writes only the
                // declared registers and `acc`.
                unsafe {
                    asm!(
                        "mov {t:e}, 0xFFFF0000",
                        "vpbroadcastd zmm15, {t:e}",
                        $(concat!("vmovups zmm", $k, ", zmmword ptr [{acc}+64*", $k, "]"),)+
                        "test {n}, {n}",
                        "jz 3f",
                        ".p2align 5",
                        "2:",
                        "vmovdqu32 zmm12, zmmword ptr [{w}]",
                        "vpslld zmm13, zmm12, 16",
                        "vpandd zmm12, zmm12, zmm15",
                        "prefetcht0 [{w}+{pf}]",
                        $(
                            concat!("vfmadd231ps zmm", $k, ", zmm13, zmmword ptr [{x}+128*", $k, "]"),
                            concat!("vfmadd231ps zmm", $k, ", zmm12, zmmword ptr [{x}+128*", $k, "+64]"),
                        )+
                        "add {w}, 64",
                        "add {x}, {xs}",
                        "dec {n}",
                        "jnz 2b",
                        "3:",
                        $(concat!("vmovups zmmword ptr [{acc}+64*", $k, "], zmm", $k),)+
                        "vzeroupper",
                        w = inout(reg) w => _,
                        x = inout(reg) x => _,
                        xs = in(reg) xs,
                        n = inout(reg) n => _,
                        acc = in(reg) acc,
                        pf = in(reg) pf,
                        t = out(reg) _,
                        out("ymm0") _, out("ymm1") _, out("ymm2") _, out("ymm3") _,
                        out("ymm4") _, out("ymm5") _, out("ymm6") _, out("ymm7") _,
                        out("ymm8") _, out("ymm9") _, out("ymm10") _, out("ymm11") _,
                        out("ymm12") _, out("ymm13") _, out("ymm14") _, out("ymm15") _,
                        options(nostack),
                    )
                }
            }
        };
    }

    bf16_group_avx512!(bf16_g1, [0]);
    bf16_group_avx512!(bf16_g2, [0, 1]);
    bf16_group_avx512!(bf16_g3, [0, 1, 2]);
    bf16_group_avx512!(bf16_g4, [0, 1, 2, 3]);
    bf16_group_avx512!(bf16_g5, [0, 1, 2, 3, 4]);
    bf16_group_avx512!(bf16_g6, [0, 1, 2, 3, 4, 5]);
    bf16_group_avx512!(bf16_g7, [0, 1, 2, 3, 4, 5, 6]);
    bf16_group_avx512!(bf16_g8, [0, 1, 2, 3, 4, 5, 6, 7]);
    bf16_group_avx512!(bf16_g9, [0, 1, 2, 3, 4, 5, 6, 7, 8]);
    bf16_group_avx512!(bf16_g10, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]);
    bf16_group_avx512!(bf16_g11, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
    bf16_group_avx512!(bf16_g12, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]);

    /// As [`bf16_group_avx512!`] for two weight rows (`w` and `w + ws`) at once: each input
    /// block is loaded once into zmm12-13 for both rows. Row 0's accumulators are `zmm0..`
    /// (at `acc`), row 1's `zmm16..` (at `acc + as`); row 0's halves in zmm8-9, row 1's in
    /// zmm10-11. zmm16-31 are not named as operands: the function's body is the block alone
    /// and the ABI makes them caller-saved, as in [`super::super::gemm::x86`].
    macro_rules! bf16_rows2_avx512 {
        ($name:ident, [$(($k:literal, $h:literal)),+]) => {
            /// # Safety
            /// As for the one-row kernels, for both rows (`w + ws` valid for `64 n` bytes,
            /// `acc + as` bytes for 64 bytes per input).
            #[inline(never)]
            #[allow(clippy::too_many_arguments)]
            unsafe fn $name(
                w: *const u8,
                ws: usize,
                x: *const f32,
                xs: usize,
                n: usize,
                acc: *mut f32,
                acs: usize,
                pf: usize,
            ) {
                // SAFETY: as in the one-row kernels.
                unsafe {
                    asm!(
                        "mov {t:e}, 0xFFFF0000",
                        "vpbroadcastd zmm15, {t:e}",
                        "lea {t}, [{acc}+{acs}]",
                        $(
                            concat!("vmovups zmm", $k, ", zmmword ptr [{acc}+64*", $k, "]"),
                            concat!("vmovups zmm", $h, ", zmmword ptr [{t}+64*", $k, "]"),
                        )+
                        "test {n}, {n}",
                        "jz 3f",
                        ".p2align 5",
                        "2:",
                        "vmovdqu32 zmm8, zmmword ptr [{w}]",
                        "vpslld zmm9, zmm8, 16",
                        "vpandd zmm8, zmm8, zmm15",
                        "vmovdqu32 zmm10, zmmword ptr [{w}+{ws}]",
                        "vpslld zmm11, zmm10, 16",
                        "vpandd zmm10, zmm10, zmm15",
                        "prefetcht0 [{w}+{pf}]",
                        "lea {t}, [{w}+{ws}]",
                        "prefetcht0 [{t}+{pf}]",
                        $(
                            concat!("vmovups zmm12, zmmword ptr [{x}+128*", $k, "]"),
                            concat!("vmovups zmm13, zmmword ptr [{x}+128*", $k, "+64]"),
                            concat!("vfmadd231ps zmm", $k, ", zmm9, zmm12"),
                            concat!("vfmadd231ps zmm", $k, ", zmm8, zmm13"),
                            concat!("vfmadd231ps zmm", $h, ", zmm11, zmm12"),
                            concat!("vfmadd231ps zmm", $h, ", zmm10, zmm13"),
                        )+
                        "add {w}, 64",
                        "add {x}, {xs}",
                        "dec {n}",
                        "jnz 2b",
                        "3:",
                        "lea {t}, [{acc}+{acs}]",
                        $(
                            concat!("vmovups zmmword ptr [{acc}+64*", $k, "], zmm", $k),
                            concat!("vmovups zmmword ptr [{t}+64*", $k, "], zmm", $h),
                        )+
                        "vzeroupper",
                        w = inout(reg) w => _,
                        ws = in(reg) ws,
                        x = inout(reg) x => _,
                        xs = in(reg) xs,
                        n = inout(reg) n => _,
                        acc = in(reg) acc,
                        acs = in(reg) acs,
                        pf = in(reg) pf,
                        t = out(reg) _,
                        out("ymm0") _, out("ymm1") _, out("ymm2") _, out("ymm3") _,
                        out("ymm4") _, out("ymm5") _, out("ymm6") _, out("ymm7") _,
                        out("ymm8") _, out("ymm9") _, out("ymm10") _, out("ymm11") _,
                        out("ymm12") _, out("ymm13") _, out("ymm14") _, out("ymm15") _,
                        options(nostack),
                    )
                }
            }
        };
    }

    bf16_rows2_avx512!(bf16_r2g1, [(0, 16)]);
    bf16_rows2_avx512!(bf16_r2g2, [(0, 16), (1, 17)]);
    bf16_rows2_avx512!(bf16_r2g3, [(0, 16), (1, 17), (2, 18)]);
    bf16_rows2_avx512!(bf16_r2g4, [(0, 16), (1, 17), (2, 18), (3, 19)]);
    bf16_rows2_avx512!(bf16_r2g5, [(0, 16), (1, 17), (2, 18), (3, 19), (4, 20)]);
    bf16_rows2_avx512!(
        bf16_r2g6,
        [(0, 16), (1, 17), (2, 18), (3, 19), (4, 20), (5, 21)]
    );
    bf16_rows2_avx512!(
        bf16_r2g7,
        [
            (0, 16),
            (1, 17),
            (2, 18),
            (3, 19),
            (4, 20),
            (5, 21),
            (6, 22)
        ]
    );
    bf16_rows2_avx512!(
        bf16_r2g8,
        [
            (0, 16),
            (1, 17),
            (2, 18),
            (3, 19),
            (4, 20),
            (5, 21),
            (6, 22),
            (7, 23)
        ]
    );

    /// The two-row AVX-512 bf16 kernel: rows `w[..64 nb]` and `w[ws..ws + 64 nb]`, their
    /// accumulators `acc[..16 gs]` and `acc[acs..acs + 16 gs]` (`gs <= 8`).
    #[allow(clippy::too_many_arguments)]
    pub fn bf16_rows2_avx512(
        gs: usize,
        w: &[u8],
        ws: usize,
        x: &[f32],
        xstride: usize,
        nb: usize,
        acc: &mut [f32],
        acs: usize,
        pf: usize,
    ) {
        assert!(w.len() >= ws + nb * 64 && acc.len() >= acs + gs * 16 && acs >= gs * 16);
        check_bf16_group(gs, w, x, xstride, nb, acc, 16);
        assert!(super::super::bf16_avx512::available());
        let (wp, xp, ap, xs) = (w.as_ptr(), x.as_ptr(), acc.as_mut_ptr(), xstride * 4);
        let acs = acs * 4;
        // SAFETY: AVX-512 F was detected (asserted); the lengths each kernel reads and
        // writes were checked above for both rows and both sets of accumulators.
        unsafe {
            match gs {
                1 => bf16_r2g1(wp, ws, xp, xs, nb, ap, acs, pf),
                2 => bf16_r2g2(wp, ws, xp, xs, nb, ap, acs, pf),
                3 => bf16_r2g3(wp, ws, xp, xs, nb, ap, acs, pf),
                4 => bf16_r2g4(wp, ws, xp, xs, nb, ap, acs, pf),
                5 => bf16_r2g5(wp, ws, xp, xs, nb, ap, acs, pf),
                6 => bf16_r2g6(wp, ws, xp, xs, nb, ap, acs, pf),
                7 => bf16_r2g7(wp, ws, xp, xs, nb, ap, acs, pf),
                8 => bf16_r2g8(wp, ws, xp, xs, nb, ap, acs, pf),
                _ => panic!("bf16 batch: a group of {gs} inputs"),
            }
        }
    }

    /// The AVX-512 bf16 group kernel ([`super::Bf16Kernel`], 16 lanes, `gs <= 12`).
    pub fn bf16_group_avx512(
        gs: usize,
        w: &[u8],
        x: &[f32],
        xstride: usize,
        nb: usize,
        acc: &mut [f32],
        pf: usize,
    ) {
        check_bf16_group(gs, w, x, xstride, nb, acc, 16);
        assert!(super::super::bf16_avx512::available());
        let (wp, xp, ap, xs) = (w.as_ptr(), x.as_ptr(), acc.as_mut_ptr(), xstride * 4);
        // SAFETY: AVX-512 F was detected (asserted); the lengths each kernel reads and
        // writes were checked above (`nb` blocks of 64 bytes, the inputs' 128-byte blocks
        // `4 xstride` bytes apart, `gs` accumulators of 64 bytes).
        unsafe {
            match gs {
                1 => bf16_g1(wp, xp, xs, nb, ap, pf),
                2 => bf16_g2(wp, xp, xs, nb, ap, pf),
                3 => bf16_g3(wp, xp, xs, nb, ap, pf),
                4 => bf16_g4(wp, xp, xs, nb, ap, pf),
                5 => bf16_g5(wp, xp, xs, nb, ap, pf),
                6 => bf16_g6(wp, xp, xs, nb, ap, pf),
                7 => bf16_g7(wp, xp, xs, nb, ap, pf),
                8 => bf16_g8(wp, xp, xs, nb, ap, pf),
                9 => bf16_g9(wp, xp, xs, nb, ap, pf),
                10 => bf16_g10(wp, xp, xs, nb, ap, pf),
                11 => bf16_g11(wp, xp, xs, nb, ap, pf),
                12 => bf16_g12(wp, xp, xs, nb, ap, pf),
                _ => panic!("bf16 batch: a group of {gs} inputs"),
            }
        }
    }

    /// The f16 scale at `p` as f32, in all 8 lanes. Broadcast before it is widened: a scalar
    /// insert into a vector register (`vpinsrw`, what the compiler makes of a scalar load
    /// here) merges with the register's old value, and the compiler picked an
    /// accumulator's, chaining every block's scale to the previous block's sums (three times
    /// slower on one input).
    ///
    /// # Safety
    /// `p` must be valid for reading 2 bytes; the CPU must have f16c.
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn scale8(p: *const u8) -> __m256 {
        // SAFETY: the caller guarantees 2 readable bytes; an unaligned read.
        let bits = unsafe { (p as *const u16).read_unaligned() };
        _mm256_cvtph_ps(_mm_set1_epi16(bits as i16))
    }

    /// The horizontal sum of the single-row kernels ([`super::hsum8`]'s order).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn hsum(v: __m256) -> f32 {
        let mut lanes = [0f32; 8];
        // SAFETY: `lanes` is 32 writable bytes; an unaligned store.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), v) };
        hsum8(&lanes)
    }

    /// `acc + vpdpbusd(a, b)`: each i32 lane adds the four products of its unsigned bytes
    /// of `a` and signed bytes of `b`.
    ///
    /// # Safety
    /// The CPU must have avx512vnni and avx512vl (and avx2).
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn dpbusd(mut acc: __m256i, a: __m256i, b: __m256i) -> __m256i {
        // SAFETY: the instruction reads and writes only these three registers (no memory,
        // no stack, no flags); the caller guarantees the CPU has avx512vnni and avx512vl,
        // which its EVEX encoding on 256-bit registers needs.
        unsafe {
            asm!(
                "{{evex}} vpdpbusd {acc}, {a}, {b}",
                acc = inout(ymm_reg) acc,
                a = in(ymm_reg) a,
                b = in(ymm_reg) b,
                options(pure, nomem, nostack, preserves_flags),
            );
        }
        acc
    }

    /// `acc + vpdpwssd(p, s)`: each i32 lane adds its two products of i16 pairs.
    ///
    /// # Safety
    /// As [`dpbusd`].
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn dpwssd(mut acc: __m256i, p: __m256i, s: __m256i) -> __m256i {
        // SAFETY: as in `dpbusd`.
        unsafe {
            asm!(
                "{{evex}} vpdpwssd {acc}, {p}, {s}",
                acc = inout(ymm_reg) acc,
                p = in(ymm_reg) p,
                s = in(ymm_reg) s,
                options(pure, nomem, nostack, preserves_flags),
            );
        }
        acc
    }

    /// Q8_0 rows on a vector path: per row, the inputs in groups of up to 8 (accumulators
    /// in registers), the results to `y[t * rows + r]`.
    #[allow(clippy::too_many_arguments)]
    pub fn q8_rows(
        path: Path,
        n: usize,
        cols: usize,
        q: &[i8],
        d: &[f32],
        w: &[u8],
        y: &mut [f32],
        rows: usize,
    ) {
        let blocks = cols / q8f::BLOCK_ELEMS;
        let row_bytes = blocks * q8f::BLOCK_BYTES;
        assert!(
            w.len() >= rows * row_bytes
                && q.len() >= n * blocks * q8f::BLOCK_ELEMS
                && d.len() >= n * blocks
                && y.len() >= n * rows
        );
        let vnni = path == Path::Avx512;
        assert!(
            super::bf16::has_avx2_fma()
                && (!vnni || Path::Avx512.available(super::WeightFormat::Q8_0))
        );
        let groups = groups(n, 8);
        for r in 0..rows {
            for &(g0, gs) in &groups {
                let mut out = [0f32; 8];
                // SAFETY: the features were checked above (avx2, fma and f16c; avx512vnni
                // and avx512vl for the VNNI kernel); row r lies inside `w`, and inputs
                // g0..g0 + gs of every block inside `q` and `d` (asserted above).
                unsafe {
                    let row = w.as_ptr().add(r * row_bytes);
                    let qp = q.as_ptr().add(g0 * q8f::BLOCK_ELEMS);
                    let dp = d.as_ptr().add(g0);
                    macro_rules! group {
                        ($g:literal) => {{
                            let s = if vnni {
                                q8_vnni::<$g>(row, blocks, qp, dp, n)
                            } else {
                                q8_avx2::<$g>(row, blocks, qp, dp, n)
                            };
                            out[..$g].copy_from_slice(&s);
                        }};
                    }
                    match gs {
                        1 => group!(1),
                        2 => group!(2),
                        3 => group!(3),
                        4 => group!(4),
                        5 => group!(5),
                        6 => group!(6),
                        7 => group!(7),
                        8 => group!(8),
                        _ => unreachable!("groups of at most 8"),
                    }
                }
                for (k, &v) in out[..gs].iter().enumerate() {
                    y[(g0 + k) * rows + r] = v;
                }
            }
        }
    }

    /// A group of `G` inputs against one Q8_0 row with AVX2: per block the row's quants'
    /// magnitudes once, then each input's sign trick, `vpmaddubsw`, `vpmaddwd` and one fused
    /// multiply-add of `d_w * d_x` ([`super::q8_0`]'s AVX2 kernel, input by input).
    ///
    /// # Safety
    /// The CPU must have avx2, fma and f16c; `row` valid for `blocks` Q8_0 blocks; `q` for
    /// 32 quants at `(b n + k) 32` and `d` for a scale at `b n + k`, `b < blocks`, `k < G`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q8_avx2<const G: usize>(
        row: *const u8,
        blocks: usize,
        q: *const i8,
        d: *const f32,
        n: usize,
    ) -> [f32; G] {
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_ps(); G];
        for b in 0..blocks {
            // SAFETY: block b of the row and of inputs k < G (the caller's guarantee);
            // unaligned loads; the prefetch never faults.
            unsafe {
                let p = row.add(b * q8f::BLOCK_BYTES);
                prefetch(p.wrapping_add(PREFETCH_BYTES));
                let wv = _mm256_loadu_si256(p.add(2) as *const __m256i);
                let aw = _mm256_sign_epi8(wv, wv);
                let dw = scale8(p);
                let xb = q.add(b * n * q8f::BLOCK_ELEMS);
                let db = d.add(b * n);
                for (k, a) in acc.iter_mut().enumerate() {
                    let xv = _mm256_loadu_si256(xb.add(32 * k) as *const __m256i);
                    let sx = _mm256_sign_epi8(xv, wv);
                    let s = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, sx), ones);
                    let dd = _mm256_mul_ps(dw, _mm256_set1_ps(*db.add(k)));
                    *a = _mm256_fmadd_ps(dd, _mm256_cvtepi32_ps(s), *a);
                }
            }
        }
        acc.map(|a| hsum(a))
    }

    /// As [`q8_avx2`] with `vpdpbusd`: the inputs' quants are `x + 128` (unsigned bytes), so
    /// each lane of `vpdpbusd(-128 sum w, x + 128, w)` is the exact sum of its four products
    /// `w x`; the correction `128 sum w` is one `vpdpbusd` per weight block for all inputs.
    ///
    /// # Safety
    /// As [`q8_avx2`], and the CPU must have avx512vnni and avx512vl.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q8_vnni<const G: usize>(
        row: *const u8,
        blocks: usize,
        q: *const i8,
        d: *const f32,
        n: usize,
    ) -> [f32; G] {
        let top = _mm256_set1_epi8(0x80u8 as i8);
        let zero = _mm256_setzero_si256();
        let mut acc = [_mm256_setzero_ps(); G];
        for b in 0..blocks {
            // SAFETY: as in `q8_avx2`; the caller guarantees the VNNI features.
            unsafe {
                let p = row.add(b * q8f::BLOCK_BYTES);
                prefetch(p.wrapping_add(PREFETCH_BYTES));
                let wv = _mm256_loadu_si256(p.add(2) as *const __m256i);
                let corr = _mm256_sub_epi32(zero, dpbusd(zero, top, wv));
                let dw = scale8(p);
                let xb = q.add(b * n * q8f::BLOCK_ELEMS);
                let db = d.add(b * n);
                for (k, a) in acc.iter_mut().enumerate() {
                    let xv = _mm256_loadu_si256(xb.add(32 * k) as *const __m256i);
                    let s = dpbusd(corr, xv, wv);
                    let dd = _mm256_mul_ps(dw, _mm256_set1_ps(*db.add(k)));
                    *a = _mm256_fmadd_ps(dd, _mm256_cvtepi32_ps(s), *a);
                }
            }
        }
        acc.map(|a| hsum(a))
    }

    /// Q4_K rows on a vector path: per block, the quants' nibbles (4 pairs of 256-bit
    /// vectors) and the 8 broadcast sub-block scales once, then every input against them
    /// ([`super::q4_k`]'s kernel, input by input: the same i32 lanes, the same two f32
    /// accumulators per output, kept in L1 here).
    #[allow(clippy::too_many_arguments)]
    pub fn q4k_rows(
        path: Path,
        n: usize,
        cols: usize,
        q: &[i8],
        d: &[f32],
        sums: &[i16],
        w: &[u8],
        y: &mut [f32],
        rows: usize,
    ) {
        let blocks = cols / q4f::BLOCK_ELEMS;
        let row_bytes = blocks * q4f::BLOCK_BYTES;
        assert!(
            w.len() >= rows * row_bytes
                && q.len() >= n * blocks * q4f::BLOCK_ELEMS
                && d.len() >= n * blocks
                && sums.len() >= n * blocks * q4f::SUB_BLOCKS
                && y.len() >= n * rows
        );
        assert!(super::bf16::has_avx2_fma());
        if path == Path::Avx512 {
            assert!(Path::Avx512.available(super::WeightFormat::Q4_K));
            // SAFETY: the features were checked (avx2, fma, f16c, avx512vnni, avx512vl);
            // the lengths above.
            unsafe { q4k_vnni(n, blocks, q, d, sums, w, y, rows) }
        } else {
            // SAFETY: avx2, fma and f16c were checked; the lengths above.
            unsafe { q4k_avx2(n, blocks, q, d, sums, w, y, rows) }
        }
    }

    /// `acc + madd(p, s)` with AVX2: pairs of i16 products summed into the i32 lanes.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn madd_add(acc: __m256i, p: __m256i, s: __m256i) -> __m256i {
        _mm256_add_epi32(acc, _mm256_madd_epi16(p, s))
    }

    /// # Safety
    /// As [`q4k_with`].
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q4k_avx2(
        n: usize,
        blocks: usize,
        q: &[i8],
        d: &[f32],
        sums: &[i16],
        w: &[u8],
        y: &mut [f32],
        rows: usize,
    ) {
        // SAFETY: the caller's guarantees, passed on.
        unsafe {
            q4k_with(n, blocks, q, d, sums, w, y, rows, |a, p, s| {
                madd_add(a, p, s)
            })
        }
    }

    /// # Safety
    /// As [`q4k_with`], and the CPU must have avx512vnni and avx512vl.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q4k_vnni(
        n: usize,
        blocks: usize,
        q: &[i8],
        d: &[f32],
        sums: &[i16],
        w: &[u8],
        y: &mut [f32],
        rows: usize,
    ) {
        // SAFETY: the caller's guarantees, passed on (the VNNI features `dpwssd` needs
        // included).
        unsafe { q4k_with(n, blocks, q, d, sums, w, y, rows, |a, p, s| dpwssd(a, p, s)) }
    }

    /// The shared Q4_K loop; `dot(acc, p, s)` adds the i16 pair products of `p` and `s` into
    /// the i32 lanes of `acc`.
    ///
    /// # Safety
    /// The CPU must have avx2, fma and f16c, and whatever `dot` needs; `w` must hold `rows`
    /// rows of `blocks` blocks, `q`, `d` and `sums` `n` inputs' `blocks` blocks, `y` `n x
    /// rows` values.
    #[allow(clippy::too_many_arguments)]
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q4k_with(
        n: usize,
        blocks: usize,
        q: &[i8],
        d: &[f32],
        sums: &[i16],
        w: &[u8],
        y: &mut [f32],
        rows: usize,
        dot: impl Fn(__m256i, __m256i, __m256i) -> __m256i,
    ) {
        use vlmem_qwen3vl::format::q4_k::unpack_scale_words;
        let row_bytes = blocks * q4f::BLOCK_BYTES;
        let nibble = _mm256_set1_epi8(0x0F);
        // Byte shuffles that broadcast i16 `j` of a 128-bit lane to all of it.
        let pick: [__m256i; q4f::SUB_BLOCKS] =
            std::array::from_fn(|j| _mm256_set1_epi16((((2 * j + 1) << 8) | (2 * j)) as i16));
        let mut acc = vec![_mm256_setzero_ps(); n];
        let mut acc_min = vec![_mm_setzero_ps(); n];
        let mut scales = [_mm256_setzero_si256(); q4f::SUB_BLOCKS];
        let (wp, xp, sp) = (w.as_ptr(), q.as_ptr(), sums.as_ptr());
        for r in 0..rows {
            acc.fill(_mm256_setzero_ps());
            acc_min.fill(_mm_setzero_ps());
            for b in 0..blocks {
                // SAFETY: row r, block b lies inside `w` (the caller's guarantee): d and
                // dmin, 12 bytes of scales from byte 4, 128 bytes of quants from byte 16;
                // input t's block b is q[(b n + t) 256..][..256] and sums[(b n + t) 8..][..8],
                // d[b n + t]. Unaligned loads; prefetches never fault.
                unsafe {
                    let p = wp.add(r * row_bytes + b * q4f::BLOCK_BYTES);
                    prefetch(p.wrapping_add(PREFETCH_BYTES));
                    prefetch(p.wrapping_add(PREFETCH_BYTES + 64));
                    // d and dmin, both f16, widened at once.
                    let ddw = _mm_cvtph_ps(_mm_cvtsi32_si128((p as *const i32).read_unaligned()));
                    let words = p.add(q4f::SCALES_AT) as *const u32;
                    let (sc, m) = unpack_scale_words(
                        words.read_unaligned(),
                        words.add(1).read_unaligned(),
                        words.add(2).read_unaligned(),
                    );
                    let sc = _mm_cvtepu8_epi16(_mm_cvtsi64_si128(sc as i64));
                    let m = _mm_cvtepu8_epi16(_mm_cvtsi64_si128(m as i64));
                    let sc = _mm256_broadcastsi128_si256(sc);
                    for (s, &pk) in scales.iter_mut().zip(&pick) {
                        *s = _mm256_shuffle_epi8(sc, pk);
                    }
                    let mut lo = [_mm256_setzero_si256(); 4];
                    let mut hi = [_mm256_setzero_si256(); 4];
                    for g in 0..4 {
                        let q4 =
                            _mm256_loadu_si256(p.add(q4f::QUANTS_AT + 32 * g) as *const __m256i);
                        lo[g] = _mm256_and_si256(q4, nibble);
                        hi[g] = _mm256_and_si256(_mm256_srli_epi16::<4>(q4), nibble);
                    }
                    for t in 0..n {
                        let at = b * n + t;
                        let xb = xp.add(at * q4f::BLOCK_ELEMS);
                        let mut lo_sum = _mm256_setzero_si256();
                        let mut hi_sum = _mm256_setzero_si256();
                        for g in 0..4 {
                            let x_lo = _mm256_loadu_si256(xb.add(64 * g) as *const __m256i);
                            let x_hi = _mm256_loadu_si256(xb.add(64 * g + 32) as *const __m256i);
                            let p_lo = _mm256_maddubs_epi16(lo[g], x_lo);
                            let p_hi = _mm256_maddubs_epi16(hi[g], x_hi);
                            lo_sum = dot(lo_sum, p_lo, scales[2 * g]);
                            hi_sum = dot(hi_sum, p_hi, scales[2 * g + 1]);
                        }
                        let dd = _mm_mul_ps(ddw, _mm_set1_ps(*d.get_unchecked(at)));
                        let s = _mm_loadu_si128(sp.add(at * q4f::SUB_BLOCKS) as *const __m128i);
                        let mins = _mm_cvtepi32_ps(_mm_madd_epi16(m, s));
                        let am = acc_min.get_unchecked_mut(t);
                        *am = _mm_fmadd_ps(_mm_shuffle_ps(dd, dd, 0b0101_0101), mins, *am);
                        let dots = _mm256_cvtepi32_ps(_mm256_add_epi32(lo_sum, hi_sum));
                        let a = acc.get_unchecked_mut(t);
                        *a = _mm256_fmadd_ps(_mm256_broadcastss_ps(dd), dots, *a);
                    }
                }
            }
            for t in 0..n {
                let mut m4 = [0f32; 4];
                // SAFETY: `m4` is 16 writable bytes; an unaligned store.
                unsafe { _mm_storeu_ps(m4.as_mut_ptr(), acc_min[t]) };
                y[t * rows + r] = hsum(acc[t]) - hsum4(&m4);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_util::Rng;

    const FORMATS: [WeightFormat; 3] = [WeightFormat::Bf16, WeightFormat::Q8_0, WeightFormat::Q4_K];

    /// A `rows x cols` matrix of `ty` with rows of varied magnitude (some one-sided, so the
    /// Q4_K mins matter), placed `offset` bytes into its buffer (misaligned loads).
    fn matrix(rng: &mut Rng, ty: WeightFormat, rows: usize, cols: usize, offset: usize) -> Vec<u8> {
        let mut buf = vec![0xA5u8; offset];
        for r in 0..rows {
            let scale = [1e-3f32, 0.05, 1.0, 30.0][rng.below(4)];
            let shift = [0.0f32, 0.0, 0.7, -0.4][r % 4];
            let row: Vec<f32> = (0..cols).map(|_| (rng.uniform() + shift) * scale).collect();
            match ty {
                WeightFormat::Bf16 => row
                    .iter()
                    .for_each(|&v| buf.extend(half::bf16::from_f32(v).to_le_bytes())),
                WeightFormat::Q8_0 => buf.extend(q8f::quantize_row(&row).unwrap()),
                WeightFormat::Q4_K => buf.extend(q4f::quantize_row(&row).unwrap()),
                WeightFormat::F16 | WeightFormat::F32 => unreachable!("no batched kernel"),
            }
        }
        buf
    }

    /// `n` input rows of varied magnitude, placed one f32 into their buffer (a slice that
    /// starts off the vector alignment).
    fn inputs(rng: &mut Rng, n: usize, cols: usize) -> Vec<f32> {
        let mut x = vec![0f32; 1];
        for t in 0..n {
            let scale = [1.0f32, 3.0, 0.01, 100.0][t % 4];
            x.extend((0..cols).map(|_| rng.uniform() * scale));
        }
        x
    }

    /// Every single-row path that gives the same bits as batch path `path` (module doc).
    fn single_row_twins(ty: WeightFormat, path: Path) -> Vec<SingleRow> {
        match (ty, path) {
            (WeightFormat::Bf16, Path::Scalar) => vec![SingleRow::Bf16(bf16::Isa::Scalar)],
            (WeightFormat::Bf16, Path::Avx2) => vec![SingleRow::Bf16(bf16::Isa::Avx2Split)],
            (WeightFormat::Bf16, Path::Avx512) => vec![SingleRow::Bf16(bf16::Isa::Avx512Split)],
            (_, Path::Scalar) => vec![SingleRow::Quant(q8_0::Isa::Scalar)],
            (_, Path::Avx2 | Path::Avx512) => [q8_0::Isa::Avx2, q8_0::Isa::Avx512Vnni]
                .into_iter()
                .filter(|i| i.available())
                .map(SingleRow::Quant)
                .collect(),
        }
    }

    #[derive(Debug, Clone, Copy)]
    enum SingleRow {
        Bf16(bf16::Isa),
        Quant(q8_0::Isa),
    }

    /// The single-row kernel `isa` on rows `w` for one input `x`.
    fn single_row(
        isa: SingleRow,
        ty: WeightFormat,
        w: &[u8],
        cols: usize,
        x: &[f32],
        rows: usize,
    ) -> Vec<f32> {
        let mut y = vec![f32::NAN; rows];
        match (isa, ty) {
            (SingleRow::Bf16(i), _) => bf16::matvec_rows_on(i, w, ty, cols, x, None, &mut y),
            (SingleRow::Quant(i), WeightFormat::Q8_0) => {
                q8_0::matvec_rows_on(i, w, cols, &q8_0::Q8Input::new(x), &mut y)
            }
            (SingleRow::Quant(i), _) => {
                q4_k::matvec_rows_on(i, w, cols, &q4_k::Q8KInput::new(x), &mut y)
            }
        }
        y
    }

    /// The exact product (f64) that row `r` approximates, and the bound on its f32
    /// accumulation error: bf16 against the f32 input (the scalar path's four chains, the
    /// deepest: `cols / 4 + 32` roundings of `2^-24 sum |w x|`); Q8_0 and Q4_K against the
    /// input as quantized, with the bounds of their single-row tests (`(blocks + 6) 2^-23`
    /// of the sum of both terms' magnitudes).
    fn reference(ty: WeightFormat, w: &[u8], cols: usize, x: &[f32], r: usize) -> (f64, f64) {
        let eps = f64::from(f32::EPSILON);
        match ty {
            WeightFormat::Bf16 => {
                let row = &w[r * cols * 2..(r + 1) * cols * 2];
                let (mut exact, mut mag) = (0f64, 0f64);
                for (pair, &xc) in row.chunks_exact(2).zip(x) {
                    let v = f64::from(half::bf16::from_le_bytes([pair[0], pair[1]]).to_f32());
                    exact += v * f64::from(xc);
                    mag += (v * f64::from(xc)).abs();
                }
                (exact, (cols / 4 + 32) as f64 * eps / 2.0 * mag)
            }
            WeightFormat::Q8_0 => {
                let xq = q8_0::Q8Input::new(x);
                let blocks = cols / 32;
                let row = &w[r * blocks * 34..(r + 1) * blocks * 34];
                let (mut exact, mut mag) = (0f64, 0f64);
                for (b, blk) in row.chunks_exact(34).enumerate() {
                    let d = f64::from(half::f16::from_le_bytes([blk[0], blk[1]]).to_f32())
                        * f64::from(xq.d[b]);
                    let (mut s, mut a) = (0i64, 0i64);
                    for (&wq, &xv) in blk[2..].iter().zip(&xq.q[32 * b..32 * b + 32]) {
                        s += i64::from(wq as i8) * i64::from(xv);
                        a += (i64::from(wq as i8) * i64::from(xv)).abs();
                    }
                    exact += d * s as f64;
                    mag += d.abs() * a as f64;
                }
                (exact, (blocks + 6) as f64 * eps * mag)
            }
            _ => {
                let xq = q4_k::Q8KInput::new(x);
                let blocks = cols / 256;
                let row = &w[r * blocks * 144..(r + 1) * blocks * 144];
                let (mut exact, mut mag) = (0f64, 0f64);
                for (b, blk) in row.chunks_exact(144).enumerate() {
                    let (d, dmin) = q4f::block_scales(blk);
                    let dx = f64::from(xq.d[b]);
                    let packed: &[u8; 12] = blk[4..16].try_into().unwrap();
                    for i in 0..256 {
                        let (sc, m) = q4f::scale_min(packed, i / 32);
                        let (at, high) = q4f::quant_position(i);
                        let qv = if high { blk[at] >> 4 } else { blk[at] & 15 };
                        let a = f64::from(d) * f64::from(sc) * f64::from(qv);
                        let bm = f64::from(dmin) * f64::from(m);
                        let xv = dx * f64::from(xq.q[256 * b + i]);
                        exact += (a - bm) * xv;
                        mag += (a + bm) * xv.abs();
                    }
                }
                (exact, (blocks + 6) as f64 * eps * mag)
            }
        }
    }

    /// Every batched path this CPU has, each format, over odd shapes (row counts that are
    /// not multiples of 4, 8 or a task; 1 to 3 blocks of columns, and for bf16 columns past
    /// the whole blocks), 1, 3, 5, 13, 16 and 25 input rows (groups of every size, and more
    /// than one group), misaligned weights and inputs: each output row equals the single-row
    /// kernels of the same path bit for bit, and lies within f32 accumulation of the exact
    /// product.
    #[test]
    fn every_path_equals_the_single_row_kernels_bit_for_bit() {
        let mut rng = Rng(101);
        for ty in FORMATS {
            let block = usize::try_from(ty.block_elems()).unwrap().max(32);
            let mut col_counts: Vec<usize> = (1..=3).map(|k| k * block).collect();
            if ty == WeightFormat::Bf16 {
                col_counts.extend([1, 7, 33, 70, 95, 161]);
            }
            let paths: Vec<Path> = Path::ALL.into_iter().filter(|p| p.available(ty)).collect();
            eprintln!("{ty} batched paths here: {paths:?}");
            for &cols in &col_counts {
                for (k, &rows) in [1usize, 3, 5, 7, 13, 37].iter().enumerate() {
                    for n in [1usize, 3, 5, 13, 16, 25] {
                        let offset = (k + n) % 5;
                        let buf = matrix(&mut rng, ty, rows, cols, offset);
                        let w = &buf[offset..];
                        let xbuf = inputs(&mut rng, n, cols);
                        let x = &xbuf[1..];
                        for &path in &paths {
                            let input = BatchInput::new(path, ty, x, n, cols).unwrap();
                            assert_eq!(input.path(), path);
                            let mut y = vec![f32::NAN; n * rows];
                            rows_into(&input, w, &mut y);
                            for t in 0..n {
                                let xt = &x[t * cols..(t + 1) * cols];
                                let got = &y[t * rows..(t + 1) * rows];
                                for twin in single_row_twins(ty, path) {
                                    let want = single_row(twin, ty, w, cols, xt, rows);
                                    let bits = |v: &[f32]| {
                                        v.iter().map(|f| f.to_bits()).collect::<Vec<_>>()
                                    };
                                    assert_eq!(
                                        bits(got),
                                        bits(&want),
                                        "{ty} {path:?} vs {twin:?}: {rows}x{cols}+{offset}, n {n}, row {t}"
                                    );
                                }
                                for (r, &g) in got.iter().enumerate() {
                                    let (exact, bound) = reference(ty, w, cols, xt, r);
                                    let err = (f64::from(g) - exact).abs();
                                    assert!(
                                        err <= bound,
                                        "{ty} {path:?} {rows}x{cols} n {n} input {t} row {r}: {g} vs {exact} (err {err:e} > {bound:e})"
                                    );
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// The bf16 loop over chunks of columns and panels of rows (more inputs and columns than
    /// one L1 chunk holds, more rows than a panel) still gives the single-row bits: each
    /// accumulator is parked in memory between chunks, whole.
    #[test]
    fn bf16_chunks_and_panels_keep_the_bits() {
        let mut rng = Rng(103);
        let ty = WeightFormat::Bf16;
        for (rows, cols, n) in [
            (70usize, 2048usize + 17, 16usize),
            (41, 4096, 9),
            (9, 1024, 2),
        ] {
            let w = matrix(&mut rng, ty, rows, cols, 0);
            let xbuf = inputs(&mut rng, n, cols);
            let x = &xbuf[1..];
            let chunk = X_CHUNK_BYTES_AVX2 / (n * 128);
            assert!(
                n < 3 || chunk < cols / 32,
                "{n} inputs of {cols} take one chunk"
            );
            for path in Path::ALL.into_iter().filter(|p| p.available(ty)) {
                let input = BatchInput::new(path, ty, x, n, cols).unwrap();
                let mut y = vec![f32::NAN; n * rows];
                rows_into(&input, &w, &mut y);
                for t in 0..n {
                    let xt = &x[t * cols..(t + 1) * cols];
                    for twin in single_row_twins(ty, path) {
                        let want = single_row(twin, ty, &w, cols, xt, rows);
                        assert_eq!(
                            &y[t * rows..(t + 1) * rows],
                            &want[..],
                            "{path:?} {rows}x{cols} n {n} row {t}"
                        );
                    }
                }
            }
        }
    }

    /// Extreme quants (Q8_0 weights of -128 and 127 against inputs at +-127; Q4_K bytes
    /// 0xFF, the largest quants, scales and mins) stay exact on every path: no saturation in
    /// the offset or sign tricks.
    #[test]
    fn extreme_quants_do_not_saturate() {
        let cols = 64;
        let mut w8 = Vec::new();
        for qv in [-128i8, 127, -1, 0] {
            for _ in 0..cols / 32 {
                w8.extend_from_slice(&half::f16::ONE.to_le_bytes());
                w8.extend(std::iter::repeat_n(qv as u8, 32));
            }
        }
        let x: Vec<f32> = [vec![-1.0f32; cols], vec![1.0f32; cols], vec![0.5f32; cols]].concat();
        for path in Path::ALL
            .into_iter()
            .filter(|p| p.available(WeightFormat::Q8_0))
        {
            let input = BatchInput::new(path, WeightFormat::Q8_0, &x, 3, cols).unwrap();
            let mut y = vec![0f32; 3 * 4];
            rows_into(&input, &w8, &mut y);
            for t in 0..3 {
                let xq = q8_0::Q8Input::new(&x[t * cols..(t + 1) * cols]);
                for (r, qv) in [-128f32, 127.0, -1.0, 0.0].into_iter().enumerate() {
                    let want = qv * f32::from(xq.q[0]) * xq.d[0] * cols as f32;
                    assert_eq!(y[t * 4 + r], want, "{path:?} input {t} row {r}");
                }
            }
        }
        let cols = 512;
        let mut w4 = Vec::new();
        for (d, dmin) in [(1.0f32, 1.0f32), (2.0, 0.0), (0.0, 0.5)] {
            for _ in 0..cols / 256 {
                w4.extend_from_slice(&half::f16::from_f32(d).to_le_bytes());
                w4.extend_from_slice(&half::f16::from_f32(dmin).to_le_bytes());
                w4.extend(std::iter::repeat_n(0xFFu8, 140));
            }
        }
        let x: Vec<f32> = [vec![-1.0f32; cols], vec![1.0f32; cols]].concat();
        for path in Path::ALL
            .into_iter()
            .filter(|p| p.available(WeightFormat::Q4_K))
        {
            let input = BatchInput::new(path, WeightFormat::Q4_K, &x, 2, cols).unwrap();
            let mut y = vec![0f32; 2 * 3];
            rows_into(&input, &w4, &mut y);
            for (t, sign) in [-1.0f32, 1.0].into_iter().enumerate() {
                let dx = 1.0f32 / 127.0;
                for (r, (d, dmin)) in [(1.0f32, 1.0f32), (2.0, 0.0), (0.0, 0.5)]
                    .into_iter()
                    .enumerate()
                {
                    let want = (d * 945.0 - dmin * 63.0) * dx * sign * 127.0 * cols as f32;
                    let got = y[t * 3 + r];
                    assert!(
                        (got - want).abs() <= 1e-5 * want.abs(),
                        "{path:?} input {t} row {r}: {got} vs {want}"
                    );
                }
            }
        }
    }

    /// Groups cover the inputs in order, as few as the largest size allows, sizes within one.
    #[test]
    fn groups_split_the_inputs_evenly() {
        for max in [1usize, 8, 12] {
            for n in 0..40 {
                let g = groups(n, max);
                assert_eq!(g.iter().map(|&(_, c)| c).sum::<usize>(), n);
                assert_eq!(g.len(), n.div_ceil(max), "{n} / {max}");
                let mut next = 0;
                for &(first, count) in &g {
                    assert_eq!(first, next);
                    assert!(count >= 1 && count <= max);
                    next += count;
                }
                let (lo, hi) = g
                    .iter()
                    .fold((usize::MAX, 0), |(lo, hi), &(_, c)| (lo.min(c), hi.max(c)));
                assert!(g.is_empty() || hi - lo <= 1);
            }
        }
    }

    /// Inputs that are not `n x cols` values, and formats without a batched kernel, give no
    /// input; a path this CPU lacks falls back to the scalar one.
    #[test]
    fn inputs_are_checked() {
        let x = vec![0.5f32; 64];
        assert!(BatchInput::new(Path::Scalar, WeightFormat::Bf16, &x, 3, 32).is_none());
        assert!(BatchInput::new(Path::Scalar, WeightFormat::F32, &x, 2, 32).is_none());
        assert!(BatchInput::new(Path::Scalar, WeightFormat::F16, &x, 2, 32).is_none());
        assert!(path_for(WeightFormat::F32).is_none());
        for ty in FORMATS {
            let p = BatchInput::new(Path::Avx512, ty, &x, 2, 32).unwrap().path();
            assert!(p.available(ty), "{ty} {p:?}");
            assert!(path_for(ty).is_none_or(|p| p.available(ty)));
        }
    }
}
