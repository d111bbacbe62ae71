//! The inner loops of [`super::matvec`] for [`super::WeightFormat::Q8_0`] weights, on one thread's
//! share of rows: `y = W x` with the input `x` quantized once per call to the same blocks of
//! 32 ([`Q8Input`]: an f32 scale and 32 `i8` per block), so each block's product is an exact
//! integer dot product of 32 `i8` pairs, scaled by `d_w * d_x` and accumulated in f32 (as
//! llama.cpp's `ggml_vec_dot_q8_0_q8_0`, except that the input's scales stay f32 instead of
//! being rounded to f16).
//!
//! Three paths: AVX2 (`vpmaddubsw` + `vpmaddwd`) and portable scalar code, chosen at run
//! time ([`Isa::best`]), and AVX-512 VNNI (`vpdpbusd`, 256-bit), tested and timed but not
//! preferred (see [`Isa::best`]). Both vector paths use the sign
//! trick: `|w|` as unsigned bytes times `x` carrying `w`'s sign. It is exact: `|w| <= 128`
//! and `|x| <= 127` (the quantizer's range), so a pair of products is at most
//! `2 * 128 * 127 = 32512`, inside `vpmaddubsw`'s saturating i16.
//!
//! Callers (the parent module) have checked every length; the vector functions re-check
//! with `assert!`s so a wrong call cannot read out of bounds.

#![allow(unsafe_code)]

use vlmem_qwen3vl::format::q8_0::{BLOCK_BYTES, BLOCK_ELEMS, block_value, quantize_block};

/// An input vector quantized to Q8 blocks: `d[b] * q[32 b + i]` approximates value
/// `32 b + i`, with `|q| <= 127`.
#[derive(Debug, Clone, Default)]
pub struct Q8Input {
    /// One scale per block (`max|x| / 127` of the block, in f32).
    pub d: Vec<f32>,
    /// The quants, 32 per block.
    pub q: Vec<i8>,
}

impl Q8Input {
    /// Quantizes `x` (the format's reference rule, [`quantize_block`]); its length should be
    /// whole blocks (the caller's check: a Q8_0 matrix's columns are), and a partial last
    /// block is quantized as if padded with zeros. Uses AVX2 where the CPU has it, with the
    /// same result bit for bit.
    pub fn new(x: &[f32]) -> Self {
        #[cfg(target_arch = "x86_64")]
        if super::bf16::has_avx2_fma() {
            let blocks = x.len().div_ceil(BLOCK_ELEMS);
            let whole = x.len() / BLOCK_ELEMS * BLOCK_ELEMS;
            let mut input = Q8Input {
                d: vec![0f32; blocks],
                q: vec![0i8; blocks * BLOCK_ELEMS],
            };
            // SAFETY: avx2 and fma were detected just above; the function reads and writes
            // only inside the slices it is given (checked inside).
            unsafe { x86::quantize(&x[..whole], &mut input.d, &mut input.q) };
            if whole < x.len() {
                let mut xs = [0f32; BLOCK_ELEMS];
                xs[..x.len() - whole].copy_from_slice(&x[whole..]);
                let mut qb = [0i8; BLOCK_ELEMS];
                input.d[blocks - 1] = quantize_block(&xs, &mut qb);
                input.q[whole..].copy_from_slice(&qb);
            }
            return input;
        }
        Self::new_scalar(x)
    }

    /// The portable path of [`Q8Input::new`].
    pub fn new_scalar(x: &[f32]) -> Self {
        let blocks = x.len().div_ceil(BLOCK_ELEMS);
        let mut d = Vec::with_capacity(blocks);
        let mut q = vec![0i8; blocks * BLOCK_ELEMS];
        for (xb, qb) in x.chunks(BLOCK_ELEMS).zip(q.chunks_exact_mut(BLOCK_ELEMS)) {
            let mut xs = [0f32; BLOCK_ELEMS];
            xs[..xb.len()].copy_from_slice(xb);
            let mut qs = [0i8; BLOCK_ELEMS];
            d.push(quantize_block(&xs, &mut qs));
            qb.copy_from_slice(&qs);
        }
        Q8Input { d, q }
    }

    /// Value `i` as quantized (`d * q`, in f64 so it is exact).
    pub fn value(&self, i: usize) -> f64 {
        f64::from(self.d[i / BLOCK_ELEMS]) * f64::from(self.q[i])
    }
}

/// The instruction sets the Q8_0 kernels have a path for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// Portable code.
    Scalar,
    /// AVX2 + FMA + F16C: `vpmaddubsw` then `vpmaddwd`.
    Avx2,
    /// AVX-512 VNNI + VL (with AVX2 + FMA + F16C): `vpdpbusd` on 256-bit vectors.
    Avx512Vnni,
}

impl Isa {
    /// Every path, slowest first.
    pub const ALL: [Isa; 3] = [Isa::Scalar, Isa::Avx2, Isa::Avx512Vnni];

    /// Whether this CPU can run the path.
    pub fn available(self) -> bool {
        match self {
            Isa::Scalar => true,
            Isa::Avx2 => super::bf16::has_avx2_fma(),
            Isa::Avx512Vnni => {
                #[cfg(target_arch = "x86_64")]
                {
                    super::bf16::has_avx2_fma()
                        && std::is_x86_feature_detected!("avx512vnni")
                        && std::is_x86_feature_detected!("avx512vl")
                        && std::is_x86_feature_detected!("avx512bw")
                        && std::is_x86_feature_detected!("avx512f")
                }
                #[cfg(not(target_arch = "x86_64"))]
                {
                    false
                }
            }
        }
    }

    /// The path the kernels take on this CPU (the standard library caches the detection):
    /// AVX2 where the CPU has it, else scalar. The VNNI path is not preferred: on an AMD
    /// EPYC with AVX-512 VNNI it ran about 16% slower than AVX2 on a matrix in cache (27.6
    /// against 32.8 weights/ns on one thread; both keep the sign trick's two `vpsignb`, and
    /// `vpdpbusd` saves one instruction per block but not time there) and the same on
    /// matrices read from memory; run it with [`matvec_rows_on`].
    pub fn best() -> Isa {
        if Isa::Avx2.available() {
            Isa::Avx2
        } else {
            Isa::Scalar
        }
    }

    /// The name reports use.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512Vnni => "avx512vnni",
        }
    }
}

/// `y[r] = sum_c W[r, c] x[c]` for the `y.len()` Q8_0 rows held by `w`, with `x` quantized
/// as `xq`, on the fastest path this CPU has.
pub fn matvec_rows(w: &[u8], cols: usize, xq: &Q8Input, y: &mut [f32]) {
    matvec_rows_on(Isa::best(), w, cols, xq, y);
}

/// [`matvec_rows`] on a given path; a path this CPU lacks runs the scalar one.
pub fn matvec_rows_on(isa: Isa, w: &[u8], cols: usize, xq: &Q8Input, y: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    match isa {
        Isa::Avx512Vnni if isa.available() => {
            // SAFETY: avx512vnni, avx512vl, avx2, fma and f16c were detected (`available`),
            // which is all the target_feature function requires; its accesses are checked.
            unsafe { x86::matvec_rows_vnni(w, cols, xq, y) };
            return;
        }
        Isa::Avx2 if isa.available() => {
            // SAFETY: avx2, fma and f16c were detected; accesses are checked inside.
            unsafe { x86::matvec_rows_avx2(w, cols, xq, y) };
            return;
        }
        Isa::Scalar | Isa::Avx2 | Isa::Avx512Vnni => {}
    }
    let _ = isa;
    matvec_rows_scalar(w, cols, xq, y);
}

/// The portable path of [`matvec_rows`]: per block, the exact i32 dot product times
/// `d_w * d_x`, summed in f32 in block order.
pub fn matvec_rows_scalar(w: &[u8], cols: usize, xq: &Q8Input, y: &mut [f32]) {
    let blocks = cols / BLOCK_ELEMS;
    let row_bytes = blocks * BLOCK_BYTES;
    for (r, out) in y.iter_mut().enumerate() {
        let row = &w[r * row_bytes..(r + 1) * row_bytes];
        let mut acc = 0f32;
        for (b, blk) in row.chunks_exact(BLOCK_BYTES).enumerate() {
            let dw = half::f16::from_le_bytes([blk[0], blk[1]]).to_f32();
            let xs = &xq.q[b * BLOCK_ELEMS..(b + 1) * BLOCK_ELEMS];
            let sum: i32 = blk[2..]
                .iter()
                .zip(xs)
                .map(|(&wq, &xq)| i32::from(wq as i8) * i32::from(xq))
                .sum();
            acc += dw * xq.d[b] * sum as f32;
        }
        *out = acc;
    }
}

/// `y[j] = sum_r x[r] W[r, col0 + j]` for a Q8_0 `W: [rows, cols]`, each weight dequantized
/// (`d * q`) as it is used and `x` kept in f32 (a portable loop: the fused-expert layout
/// this serves is not stored in Q8_0 yet).
pub fn vecmat_cols(w: &[u8], rows: usize, cols: usize, col0: usize, x: &[f32], y: &mut [f32]) {
    let row_bytes = cols / BLOCK_ELEMS * BLOCK_BYTES;
    y.fill(0.0);
    for (r, &xr) in x.iter().enumerate().take(rows) {
        let row = &w[r * row_bytes..(r + 1) * row_bytes];
        for (j, out) in y.iter_mut().enumerate() {
            let c = col0 + j;
            let b = c / BLOCK_ELEMS;
            *out += xr
                * block_value(
                    &row[b * BLOCK_BYTES..(b + 1) * BLOCK_BYTES],
                    c % BLOCK_ELEMS,
                );
        }
    }
}

/// Value `i` of a row-major Q8_0 matrix whose rows are `cols` long.
#[inline]
pub fn elem(w: &[u8], cols: usize, i: usize) -> f32 {
    let (r, c) = (i / cols, i % cols);
    let at = r * (cols / BLOCK_ELEMS * BLOCK_BYTES) + c / BLOCK_ELEMS * BLOCK_BYTES;
    block_value(&w[at..at + BLOCK_BYTES], c % BLOCK_ELEMS)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{BLOCK_BYTES, BLOCK_ELEMS, Q8Input};
    use std::arch::x86_64::*;

    /// How far ahead of its reads each row stream asks for lines (bytes).
    const PREFETCH_BYTES: usize = 1024;

    /// Quantizes the whole blocks of `x` into `d` (one scale each) and `q`, exactly as
    /// [`super::quantize_block`] does: the same `max|x| / 127`, the same f32 product
    /// `x * (1 / d)`, rounded half away from zero (truncate, then step away from zero where
    /// the fraction, exact in f32, is at least one half). A block holding a NaN or an
    /// infinity is left to the scalar rule (the conversions would differ there).
    ///
    /// # Safety
    /// The CPU must have avx2 and fma.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn quantize(x: &[f32], d: &mut [f32], q: &mut [i8]) {
        let blocks = x.len() / BLOCK_ELEMS;
        assert!(d.len() >= blocks && q.len() >= blocks * BLOCK_ELEMS);
        let sign = _mm256_set1_ps(-0.0);
        let half = _mm256_set1_ps(0.5);
        let one = _mm256_set1_ps(1.0);
        let inf = _mm256_set1_ps(f32::INFINITY);
        let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        for b in 0..blocks {
            let xb = &x[b * BLOCK_ELEMS..(b + 1) * BLOCK_ELEMS];
            let mut v = [_mm256_setzero_ps(); 4];
            for (k, vk) in v.iter_mut().enumerate() {
                // SAFETY: values 8k..8k+8 of the 32 in `xb`; an unaligned load.
                *vk = unsafe { _mm256_loadu_ps(xb.as_ptr().add(8 * k)) };
            }
            let abs = v.map(|v| _mm256_andnot_ps(sign, v));
            // NaN (unordered) or infinite values: `max` would drop a NaN.
            let odd = abs.iter().fold(_mm256_setzero_ps(), |acc, &a| {
                _mm256_or_ps(acc, _mm256_cmp_ps::<_CMP_NLT_UQ>(a, inf))
            });
            let qb = &mut q[b * BLOCK_ELEMS..(b + 1) * BLOCK_ELEMS];
            if _mm256_movemask_ps(odd) != 0 {
                let mut xs = [0f32; BLOCK_ELEMS];
                xs.copy_from_slice(xb);
                let mut qs = [0i8; BLOCK_ELEMS];
                d[b] = super::quantize_block(&xs, &mut qs);
                qb.copy_from_slice(&qs);
                continue;
            }
            let m = _mm256_max_ps(_mm256_max_ps(abs[0], abs[1]), _mm256_max_ps(abs[2], abs[3]));
            let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
            let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
            let m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 0b01));
            let db = _mm_cvtss_f32(m) / 127.0;
            let id = _mm256_set1_ps(if db != 0.0 { 1.0 / db } else { 0.0 });
            let r = v.map(|v| {
                let p = _mm256_mul_ps(v, id);
                let t = _mm256_round_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(p);
                let frac = _mm256_andnot_ps(sign, _mm256_sub_ps(p, t));
                let away = _mm256_cmp_ps::<_CMP_GE_OQ>(frac, half);
                let step = _mm256_or_ps(one, _mm256_and_ps(p, sign));
                _mm256_cvtps_epi32(_mm256_add_ps(t, _mm256_and_ps(away, step)))
            });
            // i32 -> i16 -> i8 with saturation (never reached: |r| <= 127), then undo the
            // per-128-bit-lane interleaving of the packs.
            let lo = _mm256_packs_epi32(r[0], r[1]);
            let hi = _mm256_packs_epi32(r[2], r[3]);
            let packed = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(lo, hi), order);
            // SAFETY: `qb` is 32 writable bytes; an unaligned store.
            unsafe { _mm256_storeu_si256(qb.as_mut_ptr() as *mut __m256i, packed) };
            d[b] = db;
        }
    }

    /// The f16 scale at `p` as f32.
    ///
    /// # Safety
    /// `p` must be valid for reading 2 bytes; the CPU must have f16c.
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn scale(p: *const u8) -> f32 {
        // SAFETY: the caller guarantees 2 readable bytes; an unaligned read.
        let bits = unsafe { (p as *const u16).read_unaligned() };
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(bits))))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps(v, 1);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 0b01));
        _mm_cvtss_f32(s)
    }

    /// Eight i32 partial sums of the products of 32 `i8` weights `w` and 32 `i8` inputs
    /// `x`, with AVX2: `|w|` (unsigned) times `x` with `w`'s sign, pairs summed to i16
    /// (exact, see the module doc), then pairs of those to i32.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn dot_avx2(w: __m256i, x: __m256i) -> __m256i {
        let aw = _mm256_sign_epi8(w, w);
        let sx = _mm256_sign_epi8(x, w);
        let pairs = _mm256_maddubs_epi16(aw, sx);
        _mm256_madd_epi16(pairs, _mm256_set1_epi16(1))
    }

    /// As [`dot_avx2`], with one `vpdpbusd` (u8 x i8, four products summed into each i32).
    /// Written as inline assembly: the AVX-512 intrinsics and target features are newer than
    /// the workspace's minimum Rust.
    ///
    /// # Safety
    /// The CPU must have avx512vnni and avx512vl (and avx2).
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn dot_vnni(w: __m256i, x: __m256i) -> __m256i {
        let aw = _mm256_sign_epi8(w, w);
        let sx = _mm256_sign_epi8(x, w);
        let mut acc = _mm256_setzero_si256();
        // SAFETY: the instruction reads and writes only these three registers (no memory,
        // no stack, no flags); the caller guarantees the CPU has avx512vnni and avx512vl,
        // which its EVEX encoding on 256-bit registers needs.
        unsafe {
            std::arch::asm!(
                "{{evex}} vpdpbusd {acc}, {a}, {b}",
                acc = inout(ymm_reg) acc,
                a = in(ymm_reg) aw,
                b = in(ymm_reg) sx,
                options(pure, nomem, nostack, preserves_flags),
            );
        }
        acc
    }

    /// The shared loop: four rows at a time (each input block loaded once for four rows),
    /// then single rows. `DOT` picks the integer dot product.
    ///
    /// # Safety
    /// The CPU must have avx2, fma and f16c, and whatever `dot` needs.
    #[inline(always)]
    unsafe fn rows_with(
        w: &[u8],
        cols: usize,
        xq: &Q8Input,
        y: &mut [f32],
        dot: impl Fn(__m256i, __m256i) -> __m256i,
    ) {
        let blocks = cols / BLOCK_ELEMS;
        let row_bytes = blocks * BLOCK_BYTES;
        let rows = y.len();
        assert!(
            w.len() >= rows * row_bytes
                && xq.q.len() >= blocks * BLOCK_ELEMS
                && xq.d.len() >= blocks
        );
        let wp = w.as_ptr();
        let xp = xq.q.as_ptr();
        let mut r = 0;
        while r + 4 <= rows {
            // SAFETY: rows r..r+4 lie inside `w` (asserted above); block b of a row is the
            // bytes b * 34 .. b * 34 + 34 < row_bytes of it (scale then 32 quants), and the
            // input block b is q[32 b .. 32 b + 32] with b < blocks. Prefetches never fault.
            unsafe {
                let p0 = wp.add(r * row_bytes);
                let p1 = p0.add(row_bytes);
                let p2 = p1.add(row_bytes);
                let p3 = p2.add(row_bytes);
                let mut acc = [_mm256_setzero_ps(); 4];
                for b in 0..blocks {
                    let o = b * BLOCK_BYTES;
                    for p in [p0, p1, p2, p3] {
                        _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(o + PREFETCH_BYTES) as *const i8);
                    }
                    let xv = _mm256_loadu_si256(xp.add(b * BLOCK_ELEMS) as *const __m256i);
                    let dx = *xq.d.get_unchecked(b);
                    for (a, p) in acc.iter_mut().zip([p0, p1, p2, p3]) {
                        let wv = _mm256_loadu_si256(p.add(o + 2) as *const __m256i);
                        let s = _mm256_cvtepi32_ps(dot(wv, xv));
                        *a = _mm256_fmadd_ps(_mm256_set1_ps(scale(p.add(o)) * dx), s, *a);
                    }
                }
                for (k, a) in acc.into_iter().enumerate() {
                    y[r + k] = hsum(a);
                }
            }
            r += 4;
        }
        while r < rows {
            // SAFETY: row r lies inside `w`; blocks as above.
            unsafe {
                let p0 = wp.add(r * row_bytes);
                let mut acc = _mm256_setzero_ps();
                for b in 0..blocks {
                    let o = b * BLOCK_BYTES;
                    let xv = _mm256_loadu_si256(xp.add(b * BLOCK_ELEMS) as *const __m256i);
                    let wv = _mm256_loadu_si256(p0.add(o + 2) as *const __m256i);
                    let s = _mm256_cvtepi32_ps(dot(wv, xv));
                    let d = scale(p0.add(o)) * *xq.d.get_unchecked(b);
                    acc = _mm256_fmadd_ps(_mm256_set1_ps(d), s, acc);
                }
                y[r] = hsum(acc);
            }
            r += 1;
        }
    }

    /// # Safety
    /// The CPU must have avx2, fma and f16c.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn matvec_rows_avx2(w: &[u8], cols: usize, xq: &Q8Input, y: &mut [f32]) {
        // SAFETY: the caller guarantees the features `rows_with` and `dot_avx2` need.
        unsafe { rows_with(w, cols, xq, y, |a, b| dot_avx2(a, b)) }
    }

    /// # Safety
    /// The CPU must have avx2, fma, f16c, avx512vnni and avx512vl.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn matvec_rows_vnni(w: &[u8], cols: usize, xq: &Q8Input, y: &mut [f32]) {
        // SAFETY: the caller guarantees the features `rows_with` and `dot_vnni` need.
        unsafe { rows_with(w, cols, xq, y, |a, b| dot_vnni(a, b)) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_util::Rng;
    use vlmem_qwen3vl::format::q8_0::quantize_row;

    /// A `rows x cols` Q8_0 matrix of values of varied magnitude per row, its bytes placed
    /// `offset` bytes into a buffer (so loads are misaligned), and its dequantized values.
    fn q8_matrix(rng: &mut Rng, rows: usize, cols: usize, offset: usize) -> (Vec<u8>, Vec<f64>) {
        let mut buf = vec![0u8; offset];
        for _ in 0..rows {
            let scale = [1e-3f32, 0.05, 1.0, 30.0][rng.below(4)];
            let row: Vec<f32> = (0..cols).map(|_| rng.uniform() * scale).collect();
            buf.extend(quantize_row(&row).unwrap());
        }
        let values = (0..rows * cols)
            .map(|i| f64::from(elem(&buf[offset..], cols, i)))
            .collect();
        (buf, values)
    }

    /// The bound on f32 accumulation error of one row: every block adds `d_w * d_x * s`
    /// where the i32 sum `s` (at most 32 * 128 * 127 < 2^24) converts to f32 exactly; the
    /// scale product rounds once, the fused multiply-add of each lane once per block, and the
    /// final horizontal sum three times, each a relative error of at most 2^-24 of a partial
    /// sum no larger than `sum_b |d_w d_x| sum_i |q_w q_x|`. So `(blocks + 5) * 2^-23` of
    /// that magnitude bounds it, with room to spare.
    fn accumulation_bound(w: &[f64], xq: &Q8Input, r: usize, cols: usize) -> f64 {
        let blocks = cols / BLOCK_ELEMS;
        let magnitude: f64 = (0..cols)
            .map(|c| (w[r * cols + c] * xq.value(c)).abs())
            .sum();
        (blocks as f64 + 5.0) * f64::from(f32::EPSILON) * magnitude
    }

    /// Every path this CPU has (and the scalar one) against the exact product of the
    /// dequantized weights and the quantized input, computed in f64, over odd row counts,
    /// columns up to 4096 and misaligned weight bytes; and every path against the scalar
    /// one.
    #[test]
    fn every_path_gives_the_exact_quantized_product_within_f32_accumulation() {
        let mut rng = Rng(17);
        let isas: Vec<Isa> = Isa::ALL.into_iter().filter(|i| i.available()).collect();
        eprintln!("q8_0 paths here: {isas:?}");
        let mut cases: Vec<(usize, usize)> = (1..=70).map(|r| (r, 32 * (1 + r % 5))).collect();
        cases.extend([
            (1, 4096),
            (5, 4096),
            (9, 2048),
            (70, 1024),
            (4, 3072),
            (3, 96),
        ]);
        for _ in 0..40 {
            cases.push((1 + rng.below(70), 32 * (1 + rng.below(128))));
        }
        for (k, &(rows, cols)) in cases.iter().enumerate() {
            let offset = k % 5;
            let (buf, wv) = q8_matrix(&mut rng, rows, cols, offset);
            let w = &buf[offset..];
            let x: Vec<f32> = (0..cols).map(|_| rng.uniform() * 3.0).collect();
            let xq = Q8Input::new(&x);
            let mut scalar = vec![f32::NAN; rows];
            matvec_rows_scalar(w, cols, &xq, &mut scalar);
            for &isa in &isas {
                let mut y = vec![f32::NAN; rows];
                matvec_rows_on(isa, w, cols, &xq, &mut y);
                for r in 0..rows {
                    let exact: f64 = (0..cols).map(|c| wv[r * cols + c] * xq.value(c)).sum();
                    let bound = accumulation_bound(&wv, &xq, r, cols);
                    let err = (f64::from(y[r]) - exact).abs();
                    assert!(
                        err <= bound,
                        "{isa:?} {rows}x{cols}+{offset} row {r}: {} vs {exact} (err {err:e} > {bound:e})",
                        y[r]
                    );
                    let apart = (f64::from(y[r]) - f64::from(scalar[r])).abs();
                    assert!(
                        apart <= 2.0 * bound,
                        "{isa:?} vs scalar {rows}x{cols} row {r}: {} vs {}",
                        y[r],
                        scalar[r]
                    );
                }
            }
        }
    }

    /// The product with the quantized input is within what rounding the input to Q8 can
    /// move it from the product with the exact input `x`: each input value moves by at most
    /// half its block's step, `|x - d_x q_x| <= d_x / 2` (`q = round(x * (1 / d_x))`, where
    /// the f32 reciprocal and product add a relative `2^-23` of `|x|`), so row `r` moves by at
    /// most `sum_b (d_x,b / 2) sum_{i in b} |w_i| + 2^-23 sum_i |w_i x_i|`, plus the f32
    /// accumulation bound above.
    #[test]
    fn the_result_is_within_the_input_rounding_of_the_exact_product() {
        let mut rng = Rng(29);
        for &(rows, cols) in &[(7usize, 2048usize), (33, 512), (1, 4096), (64, 32)] {
            let (w, wv) = q8_matrix(&mut rng, rows, cols, 0);
            let x: Vec<f32> = (0..cols).map(|_| rng.uniform()).collect();
            let xq = Q8Input::new(&x);
            let mut y = vec![0f32; rows];
            matvec_rows(&w, cols, &xq, &mut y);
            for r in 0..rows {
                let row = &wv[r * cols..(r + 1) * cols];
                let exact: f64 = row.iter().zip(&x).map(|(w, &x)| w * f64::from(x)).sum();
                let rounding: f64 = row
                    .iter()
                    .zip(&x)
                    .enumerate()
                    .map(|(c, (w, &x))| {
                        w.abs()
                            * (f64::from(xq.d[c / BLOCK_ELEMS]) / 2.0
                                + f64::from(x.abs()) * f64::from(f32::EPSILON))
                    })
                    .sum();
                let bound = rounding + accumulation_bound(&wv, &xq, r, cols);
                let err = (f64::from(y[r]) - exact).abs();
                assert!(
                    err <= bound,
                    "{rows}x{cols} row {r}: err {err:e} > {bound:e}"
                );
                // The bound is not vacuous: it is a small part of the row's magnitude.
                let magnitude: f64 = row
                    .iter()
                    .zip(&x)
                    .map(|(w, &x)| (w * f64::from(x)).abs())
                    .sum();
                assert!(bound < magnitude * 0.02, "{rows}x{cols} row {r}");
            }
        }
    }

    /// The vector quantizer gives the scalar rule's scales and quants bit for bit, ties
    /// (values at exactly half a step) and odd blocks (NaN, infinities, zeros) included.
    #[test]
    fn the_vector_quantizer_equals_the_scalar_rule() {
        let mut rng = Rng(53);
        let mut inputs: Vec<Vec<f32>> = (0..200)
            .map(|k| {
                let scale = [1e-6f32, 1e-2, 1.0, 1e3][k % 4];
                (0..32 * (1 + k % 9))
                    .map(|_| rng.uniform() * scale)
                    .collect()
            })
            .collect();
        // Exact halves: with max |x| = 127 the step is 1, so k + 0.5 is a tie.
        let mut ties: Vec<f32> = (0..32).map(|k| k as f32 - 15.5).collect();
        ties[0] = 127.0;
        ties[1] = -126.5;
        inputs.push(ties);
        let mut odd = vec![0.5f32; 128];
        odd[3] = f32::NAN;
        odd[40] = f32::INFINITY;
        odd[70] = f32::NEG_INFINITY;
        odd[96..].fill(0.0);
        inputs.push(odd);
        inputs.push(vec![0.25; 40]); // a partial last block
        for x in &inputs {
            let (fast, slow) = (Q8Input::new(x), Q8Input::new_scalar(x));
            assert_eq!(fast.q, slow.q, "{x:?}");
            let bits = |d: &[f32]| d.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&fast.d), bits(&slow.d), "{x:?}");
        }
    }

    /// Weights of -128 (possible in bytes that did not come from the quantizer) and inputs
    /// at +-127 reach the largest pair sums; the sign trick stays exact there.
    #[test]
    fn extreme_quants_do_not_saturate() {
        let cols = 64;
        let mut w = Vec::new();
        for q in [-128i8, 127] {
            for _ in 0..cols / BLOCK_ELEMS {
                w.extend_from_slice(&half::f16::ONE.to_le_bytes());
                w.extend(std::iter::repeat_n(q as u8, BLOCK_ELEMS));
            }
        }
        let xs = [vec![-1.0f32; cols], vec![1.0f32; cols]];
        for x in xs {
            let xq = Q8Input::new(&x);
            let want: Vec<f32> = [-128f32, 127.0]
                .iter()
                .map(|&q| q * cols as f32 * x[0] * xq.d[0] * 127.0)
                .collect();
            for isa in Isa::ALL.into_iter().filter(|i| i.available()) {
                let mut y = vec![0f32; 2];
                matvec_rows_on(isa, &w, cols, &xq, &mut y);
                assert_eq!(y, want, "{isa:?}");
            }
        }
    }

    #[test]
    fn vecmat_reads_q8_0_dequantized() {
        let mut rng = Rng(41);
        let (rows, cols) = (13usize, 96usize);
        let (w, wv) = q8_matrix(&mut rng, rows, cols, 0);
        let x: Vec<f32> = (0..rows).map(|_| rng.uniform()).collect();
        let col0 = 5;
        let mut y = vec![f32::NAN; 70];
        vecmat_cols(&w, rows, cols, col0, &x, &mut y);
        for (j, &yj) in y.iter().enumerate() {
            let want: f64 = (0..rows)
                .map(|r| wv[r * cols + col0 + j] * f64::from(x[r]))
                .sum();
            assert!(
                (f64::from(yj) - want).abs() <= 1e-5 * (1.0 + want.abs()),
                "col {j}"
            );
        }
    }
}
