//! The inner loops of [`super::matvec`] for [`super::WeightFormat::Q4_K`] weights, on one
//! thread's share of rows: `y = W x` with the input `x` quantized once per call to 8-bit
//! blocks of 256 ([`Q8KInput`]: an f32 scale `dx`, 256 `i8` and the sum of each 32 of them,
//! the layout of llama.cpp's `block_q8_K` with per-32 instead of per-16 sums).
//!
//! # The product of one block
//!
//! A weight block is 8 sub-blocks of 32 values `d sc_j q_i - dmin m_j` (see
//! [`vlmem_qwen3vl::format::q4_k`]); with the input block `dx qx_i`, its product is
//!
//! ```text
//! sum_i w_i x_i = (d dx) sum_j sc_j (sum_{i in j} q_i qx_i) - (dmin dx) sum_j m_j (sum_{i in j} qx_i)
//! ```
//!
//! Both sums over `j` are exact integers (`q <= 15`, `sc, m <= 63`, `|qx| <= 128`: at most
//! `256 * 15 * 128 * 63 < 2^31` and `8 * 63 * 4096 < 2^22`), the second from the input's
//! stored sums. So each block costs two f32 products, and the vector paths keep the first sum
//! in i32 lanes (`vpmaddubsw` of the 4-bit quants as unsigned bytes with the input's signed
//! bytes, exact: a pair is at most `2 * 15 * 128`; then `vpmaddwd` with each sub-block's scale
//! broadcast, or `vpdpwssd` on AVX-512 VNNI), each lane at most `8 * 4 * 15 * 128 * 63 < 2^24`
//! so its conversion to f32 is exact.
//!
//! # Error bound
//!
//! Against the exact product of the dequantized weights `w` (exact reals `d sc q - dmin m`)
//! and the f32 input `x`, the result differs by two roundings:
//!
//! 1. the input's: `qx = round(x * (1 / dx))` with `dx = max|x| / 127` of its block of 256
//!    (the f32 reciprocal and product add a relative `2^-23` of `|x|`), so
//!    `|x - dx qx| <= dx / 2 + |x| 2^-23`, and row `r` moves by at most
//!    `sum_i |w_i| (dx / 2 + |x_i| 2^-23)`;
//! 2. f32 accumulation: per block, `d dx` and `dmin dx` round once each, the fused
//!    multiply-adds once per block and the horizontal sums and the final difference a few
//!    times more (the scalar path: the i32 sum's conversion, two products and a difference
//!    per block, then the running sum), each a relative error of at most `2^-24` of a
//!    partial sum no larger than `A = sum_i dx |qx_i| (d sc q_i + dmin m)` (the two terms
//!    taken apart: their difference may cancel). So `(blocks + 6) 2^-23 A` bounds it.
//!
//! The tests check the result against the exact product of the dequantized weights and the
//! quantized input within (2), and against the f32 input within (1) + (2).
//!
//! Three paths, chosen at run time ([`best_isa`]): AVX-512 VNNI (`vpdpwssd` on 256-bit
//! vectors, as inline assembly: the workspace's minimum Rust predates the AVX-512
//! intrinsics), AVX2 (with FMA and F16C; the laptop this engine targets has no AVX-512) and
//! portable scalar code. Callers (the parent module) have
//! checked every length; the vector functions re-check with `assert!`s so a wrong call
//! cannot read out of bounds.

#![allow(unsafe_code)]

pub use super::q8_0::Isa;
use vlmem_qwen3vl::format::q4_k::{
    BLOCK_BYTES, BLOCK_ELEMS, QUANTS_AT, SCALES_AT, SUB_BLOCKS, SUB_ELEMS, block_scales,
    block_value, dequantize_block_into, unpack_scale_words,
};

/// An input vector quantized to 8-bit blocks of 256: `d[b] * q[256 b + i]` approximates
/// value `256 b + i`, with `|q| <= 127`, and `sums[8 b + j]` is the sum of the 32 quants of
/// sub-block `j` of block `b`.
#[derive(Debug, Clone, Default)]
pub struct Q8KInput {
    /// One scale per block (`max|x| / 127` of the block, in f32).
    pub d: Vec<f32>,
    /// The quants, 256 per block.
    pub q: Vec<i8>,
    /// The sum of each 32 quants, 8 per block.
    pub sums: Vec<i16>,
}

/// Quantizes one block of 256 input values into `q` and returns its scale
/// `d = max|x| / 127`: `q = round(x * (1 / d))`, halves away from zero (`q = 0` where
/// `d = 0`), as [`vlmem_qwen3vl::format::q8_0::quantize_block`] does for 32. Values that are
/// NaN or infinite give a non-finite scale; it never panics.
#[inline]
pub fn quantize_input_block(x: &[f32; BLOCK_ELEMS], q: &mut [i8; BLOCK_ELEMS]) -> f32 {
    let max = x.iter().fold(0f32, |m, v| {
        let a = v.abs();
        if a > m || a.is_nan() { a } else { m }
    });
    let d = max / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    for (qi, &xi) in q.iter_mut().zip(x) {
        // `as` saturates (and maps NaN to 0); finite values stay within 127.
        *qi = (xi * id).round() as i8;
    }
    d
}

/// The sums of each 32 of a block's 256 quants.
fn sub_block_sums(q: &[i8], sums: &mut [i16]) {
    for (s, qs) in sums.iter_mut().zip(q.chunks_exact(SUB_ELEMS)) {
        *s = qs.iter().map(|&v| i16::from(v)).sum();
    }
}

impl Q8KInput {
    /// Quantizes `x` ([`quantize_input_block`]); its length should be whole blocks of 256
    /// (the caller's check: a Q4_K matrix's columns are), and a partial last block is
    /// quantized as if padded with zeros. Uses AVX2 where the CPU has it, with the same
    /// result bit for bit.
    pub fn new(x: &[f32]) -> Self {
        #[cfg(target_arch = "x86_64")]
        if super::bf16::has_avx2_fma() {
            let blocks = x.len().div_ceil(BLOCK_ELEMS);
            let whole = x.len() / BLOCK_ELEMS * BLOCK_ELEMS;
            let mut input = Q8KInput {
                d: vec![0f32; blocks],
                q: vec![0i8; blocks * BLOCK_ELEMS],
                sums: vec![0i16; blocks * SUB_BLOCKS],
            };
            // SAFETY: avx2 and fma were detected just above; the function reads and writes
            // only inside the slices it is given (checked inside).
            unsafe { x86::quantize(&x[..whole], &mut input.d, &mut input.q, &mut input.sums) };
            if whole < x.len() {
                let last = Self::new_scalar(&x[whole..]);
                input.d[blocks - 1] = last.d[0];
                input.q[whole..].copy_from_slice(&last.q);
                input.sums[(blocks - 1) * SUB_BLOCKS..].copy_from_slice(&last.sums);
            }
            return input;
        }
        Self::new_scalar(x)
    }

    /// The portable path of [`Q8KInput::new`].
    pub fn new_scalar(x: &[f32]) -> Self {
        let blocks = x.len().div_ceil(BLOCK_ELEMS);
        let mut d = Vec::with_capacity(blocks);
        let mut q = vec![0i8; blocks * BLOCK_ELEMS];
        let mut sums = vec![0i16; blocks * SUB_BLOCKS];
        for ((xb, qb), sb) in x
            .chunks(BLOCK_ELEMS)
            .zip(q.chunks_exact_mut(BLOCK_ELEMS))
            .zip(sums.chunks_exact_mut(SUB_BLOCKS))
        {
            let mut xs = [0f32; BLOCK_ELEMS];
            xs[..xb.len()].copy_from_slice(xb);
            let qs: &mut [i8; BLOCK_ELEMS] = qb.try_into().expect("whole blocks");
            d.push(quantize_input_block(&xs, qs));
            sub_block_sums(qs, sb);
        }
        Q8KInput { d, q, sums }
    }

    /// Value `i` as quantized (`d * q`, in f64 so it is exact).
    pub fn value(&self, i: usize) -> f64 {
        f64::from(self.d[i / BLOCK_ELEMS]) * f64::from(self.q[i])
    }
}

/// The path the Q4_K kernels take on this CPU: AVX-512 VNNI where the CPU has it, else
/// AVX2, else scalar. `vpdpwssd` saves one instruction per sub-block; on the development VM
/// (Xeon, AVX-512 VNNI) it ran a matrix in L2 about 5% faster than AVX2 on one thread (best
/// of interleaved runs: 39-43 against 37-41 weights/ns, `quant_matvec`), where the Q8_0
/// kernels' VNNI path is slower than their AVX2 one and not preferred.
pub fn best_isa() -> Isa {
    [Isa::Avx512Vnni, Isa::Avx2]
        .into_iter()
        .find(|i| i.available())
        .unwrap_or(Isa::Scalar)
}

/// `y[r] = sum_c W[r, c] x[c]` for the `y.len()` Q4_K rows held by `w`, with `x` quantized
/// as `xq`, on the fastest path this CPU has.
pub fn matvec_rows(w: &[u8], cols: usize, xq: &Q8KInput, y: &mut [f32]) {
    matvec_rows_on(best_isa(), w, cols, xq, y);
}

/// [`matvec_rows`] on a given path; a path this CPU lacks runs the scalar one.
pub fn matvec_rows_on(isa: Isa, w: &[u8], cols: usize, xq: &Q8KInput, y: &mut [f32]) {
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

/// The portable path of [`matvec_rows`]: per block, the two exact integer sums of the
/// module doc, scaled by `d dx` and `dmin dx`, summed in f32 in block order.
pub fn matvec_rows_scalar(w: &[u8], cols: usize, xq: &Q8KInput, y: &mut [f32]) {
    let blocks = cols / BLOCK_ELEMS;
    let row_bytes = blocks * BLOCK_BYTES;
    for (r, out) in y.iter_mut().enumerate() {
        let row = &w[r * row_bytes..(r + 1) * row_bytes];
        let mut acc = 0f32;
        for (b, blk) in row.chunks_exact(BLOCK_BYTES).enumerate() {
            let (d, dmin) = block_scales(blk);
            let word = |k: usize| {
                let at = SCALES_AT + k;
                u32::from_le_bytes([blk[at], blk[at + 1], blk[at + 2], blk[at + 3]])
            };
            let (sc, m) = unpack_scale_words(word(0), word(4), word(8));
            let (sc, m) = (sc.to_le_bytes(), m.to_le_bytes());
            let xs = &xq.q[b * BLOCK_ELEMS..(b + 1) * BLOCK_ELEMS];
            let mut dot = 0i32;
            for (g, bytes) in blk[QUANTS_AT..].chunks_exact(32).enumerate() {
                let (x_lo, x_hi) = xs[64 * g..64 * g + 64].split_at(32);
                let (mut lo, mut hi) = (0i32, 0i32);
                for ((&q, &a), &b) in bytes.iter().zip(x_lo).zip(x_hi) {
                    lo += i32::from(q & 0x0F) * i32::from(a);
                    hi += i32::from(q >> 4) * i32::from(b);
                }
                dot += i32::from(sc[2 * g]) * lo + i32::from(sc[2 * g + 1]) * hi;
            }
            let sums = &xq.sums[b * SUB_BLOCKS..(b + 1) * SUB_BLOCKS];
            let mins: i32 = m
                .iter()
                .zip(sums)
                .map(|(&m, &s)| i32::from(m) * i32::from(s))
                .sum();
            let dx = xq.d[b];
            acc += d * dx * dot as f32 - dmin * dx * mins as f32;
        }
        *out = acc;
    }
}

/// `y[j] = sum_r x[r] W[r, col0 + j]` for a Q4_K `W: [rows, cols]`: each row's blocks under
/// the columns asked for are dequantized once into a buffer, then scaled by `x[r]` and added,
/// all in f32.
pub fn vecmat_cols(w: &[u8], rows: usize, cols: usize, col0: usize, x: &[f32], y: &mut [f32]) {
    y.fill(0.0);
    let n = y.len();
    if n == 0 {
        return;
    }
    let row_bytes = cols / BLOCK_ELEMS * BLOCK_BYTES;
    let (b0, b1) = (col0 / BLOCK_ELEMS, (col0 + n).div_ceil(BLOCK_ELEMS));
    let skip = col0 - b0 * BLOCK_ELEMS;
    let mut buf = vec![0f32; (b1 - b0) * BLOCK_ELEMS];
    for (r, &xr) in x.iter().enumerate().take(rows) {
        let blocks = &w[r * row_bytes + b0 * BLOCK_BYTES..r * row_bytes + b1 * BLOCK_BYTES];
        for (blk, out) in blocks
            .chunks_exact(BLOCK_BYTES)
            .zip(buf.chunks_exact_mut(BLOCK_ELEMS))
        {
            dequantize_block_into(blk, out);
        }
        for (yj, &v) in y.iter_mut().zip(&buf[skip..skip + n]) {
            *yj += xr * v;
        }
    }
}

/// Value `i` of a row-major Q4_K matrix whose rows are `cols` long.
#[inline]
pub fn elem(w: &[u8], cols: usize, i: usize) -> f32 {
    let (r, c) = (i / cols, i % cols);
    let at = r * (cols / BLOCK_ELEMS * BLOCK_BYTES) + c / BLOCK_ELEMS * BLOCK_BYTES;
    block_value(&w[at..at + BLOCK_BYTES], c % BLOCK_ELEMS)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{BLOCK_BYTES, BLOCK_ELEMS, Q8KInput, QUANTS_AT, SCALES_AT, SUB_BLOCKS, SUB_ELEMS};
    use std::arch::x86_64::*;
    use vlmem_qwen3vl::format::q4_k::unpack_scale_words;

    /// How far ahead of its reads a row stream asks for lines (bytes).
    const PREFETCH_BYTES: usize = 1024;

    /// Quantizes the whole blocks of `x` into `d`, `q` and `sums` exactly as
    /// [`super::quantize_input_block`] and the sums of 32 do: the same `max|x| / 127`, the
    /// same f32 product `x * (1 / d)`, rounded half away from zero (truncate, then step away
    /// from zero where the fraction, exact in f32, is at least one half). A block holding a
    /// NaN or an infinity is left to the scalar rule.
    ///
    /// # Safety
    /// The CPU must have avx2 and fma.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn quantize(x: &[f32], d: &mut [f32], q: &mut [i8], sums: &mut [i16]) {
        let blocks = x.len() / BLOCK_ELEMS;
        assert!(
            d.len() >= blocks
                && q.len() >= blocks * BLOCK_ELEMS
                && sums.len() >= blocks * SUB_BLOCKS
        );
        let sign = _mm256_set1_ps(-0.0);
        let half = _mm256_set1_ps(0.5);
        let one = _mm256_set1_ps(1.0);
        let inf = _mm256_set1_ps(f32::INFINITY);
        let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        for b in 0..blocks {
            let xb = &x[b * BLOCK_ELEMS..(b + 1) * BLOCK_ELEMS];
            let xp = xb.as_ptr();
            let mut max = _mm256_setzero_ps();
            let mut odd = _mm256_setzero_ps();
            for k in 0..BLOCK_ELEMS / 8 {
                // SAFETY: values 8k..8k+8 of the 256 in `xb`; an unaligned load.
                let a = _mm256_andnot_ps(sign, unsafe { _mm256_loadu_ps(xp.add(8 * k)) });
                // NaN (unordered) or infinite values: `max` would drop a NaN.
                odd = _mm256_or_ps(odd, _mm256_cmp_ps::<_CMP_NLT_UQ>(a, inf));
                max = _mm256_max_ps(max, a);
            }
            let qb = &mut q[b * BLOCK_ELEMS..(b + 1) * BLOCK_ELEMS];
            let sb = &mut sums[b * SUB_BLOCKS..(b + 1) * SUB_BLOCKS];
            if _mm256_movemask_ps(odd) != 0 {
                let xs: &[f32; BLOCK_ELEMS] = xb.try_into().expect("a whole block");
                let qs: &mut [i8; BLOCK_ELEMS] = qb.try_into().expect("a whole block");
                d[b] = super::quantize_input_block(xs, qs);
                super::sub_block_sums(qs, sb);
                continue;
            }
            let m = _mm_max_ps(_mm256_castps256_ps128(max), _mm256_extractf128_ps(max, 1));
            let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
            let m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 0b01));
            let db = _mm_cvtss_f32(m) / 127.0;
            let id = _mm256_set1_ps(if db != 0.0 { 1.0 / db } else { 0.0 });
            for (j, sum) in sb.iter_mut().enumerate() {
                let r: [__m256i; 4] = std::array::from_fn(|k| {
                    // SAFETY: values 32j + 8k .. 32j + 8k + 8 of the 256 in `xb`.
                    let v = unsafe { _mm256_loadu_ps(xp.add(SUB_ELEMS * j + 8 * k)) };
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
                // SAFETY: bytes 32j .. 32j + 32 of `qb` (256 bytes); an unaligned store.
                unsafe {
                    _mm256_storeu_si256(qb.as_mut_ptr().add(SUB_ELEMS * j) as *mut __m256i, packed)
                };
                let s =
                    _mm256_add_epi32(_mm256_add_epi32(r[0], r[1]), _mm256_add_epi32(r[2], r[3]));
                let s = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
                let s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
                let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01));
                // At most 32 * 127 in magnitude: an i16.
                *sum = _mm_cvtsi128_si32(s) as i16;
            }
            d[b] = db;
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        hsum4(s)
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn hsum4(s: __m128) -> f32 {
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 0b01));
        _mm_cvtss_f32(s)
    }

    /// `acc + madd(p, s)` with AVX2: pairs of i16 products summed into the i32 lanes.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn dot_avx2(acc: __m256i, p: __m256i, s: __m256i) -> __m256i {
        _mm256_add_epi32(acc, _mm256_madd_epi16(p, s))
    }

    /// As [`dot_avx2`], in one `vpdpwssd`. Inline assembly: the AVX-512 intrinsics and target
    /// features are newer than the workspace's minimum Rust.
    ///
    /// # Safety
    /// The CPU must have avx512vnni and avx512vl (and avx2).
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn dot_vnni(mut acc: __m256i, p: __m256i, s: __m256i) -> __m256i {
        // SAFETY: the instruction reads and writes only these three registers (no memory,
        // no stack, no flags); the caller guarantees the CPU has avx512vnni and avx512vl,
        // which its EVEX encoding on 256-bit registers needs.
        unsafe {
            std::arch::asm!(
                "{{evex}} vpdpwssd {acc}, {p}, {s}",
                acc = inout(ymm_reg) acc,
                p = in(ymm_reg) p,
                s = in(ymm_reg) s,
                options(pure, nomem, nostack, preserves_flags),
            );
        }
        acc
    }

    /// The shared loop, one row at a time (a task's rows are one sequential stream of
    /// bytes). `DOT` adds the i16 pair products times the broadcast scale into i32 lanes.
    ///
    /// # Safety
    /// The CPU must have avx2, fma and f16c, and whatever `dot` needs.
    #[inline(always)]
    unsafe fn rows_with(
        w: &[u8],
        cols: usize,
        xq: &Q8KInput,
        y: &mut [f32],
        dot: impl Fn(__m256i, __m256i, __m256i) -> __m256i,
    ) {
        let blocks = cols / BLOCK_ELEMS;
        let row_bytes = blocks * BLOCK_BYTES;
        assert!(
            w.len() >= y.len() * row_bytes
                && xq.q.len() >= blocks * BLOCK_ELEMS
                && xq.d.len() >= blocks
                && xq.sums.len() >= blocks * SUB_BLOCKS
        );
        // SAFETY: register constants; the caller guarantees avx2.
        let nibble = unsafe { _mm256_set1_epi8(0x0F) };
        // Byte shuffles that broadcast i16 `j` of a 128-bit lane to all of it.
        let pick: [__m256i; SUB_BLOCKS] = std::array::from_fn(|j| {
            // SAFETY: as above.
            unsafe { _mm256_set1_epi16((((2 * j + 1) << 8) | (2 * j)) as i16) }
        });
        let wp = w.as_ptr();
        let xp = xq.q.as_ptr();
        let sp = xq.sums.as_ptr();
        for (r, out) in y.iter_mut().enumerate() {
            // SAFETY: row r lies inside `w` (asserted above); block b of the row is the bytes
            // b * 144 .. b * 144 + 144 < row_bytes of it (d and dmin, 12 bytes of scales from
            // byte 4, 128 bytes of quants from byte 16), input block b is
            // q[256 b .. 256 b + 256] and sums[8 b .. 8 b + 8] with b < blocks. Prefetches
            // never fault.
            unsafe {
                let row = wp.add(r * row_bytes);
                let mut acc = _mm256_setzero_ps();
                let mut acc_min = _mm_setzero_ps();
                for b in 0..blocks {
                    let p = row.add(b * BLOCK_BYTES);
                    _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH_BYTES) as *const i8);
                    _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH_BYTES + 64) as *const i8);
                    let dx = *xq.d.get_unchecked(b);
                    // d and dmin, both f16, widened at once.
                    let dd = _mm_cvtph_ps(_mm_cvtsi32_si128((p as *const i32).read_unaligned()));
                    let dd = _mm_mul_ps(dd, _mm_set1_ps(dx));
                    let words = p.add(SCALES_AT) as *const u32;
                    let (sc, m) = unpack_scale_words(
                        words.read_unaligned(),
                        words.add(1).read_unaligned(),
                        words.add(2).read_unaligned(),
                    );
                    let sc = _mm_cvtepu8_epi16(_mm_cvtsi64_si128(sc as i64));
                    let m = _mm_cvtepu8_epi16(_mm_cvtsi64_si128(m as i64));
                    let sums = _mm_loadu_si128(sp.add(b * SUB_BLOCKS) as *const __m128i);
                    let mins = _mm_cvtepi32_ps(_mm_madd_epi16(m, sums));
                    acc_min = _mm_fmadd_ps(_mm_shuffle_ps(dd, dd, 0b0101_0101), mins, acc_min);
                    let sc = _mm256_broadcastsi128_si256(sc);
                    let xb = xp.add(b * BLOCK_ELEMS);
                    let mut lo_sum = _mm256_setzero_si256();
                    let mut hi_sum = _mm256_setzero_si256();
                    for g in 0..4 {
                        let q4 = _mm256_loadu_si256(p.add(QUANTS_AT + 32 * g) as *const __m256i);
                        let lo = _mm256_and_si256(q4, nibble);
                        let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(q4), nibble);
                        let x_lo = _mm256_loadu_si256(xb.add(64 * g) as *const __m256i);
                        let x_hi = _mm256_loadu_si256(xb.add(64 * g + 32) as *const __m256i);
                        let p_lo = _mm256_maddubs_epi16(lo, x_lo);
                        let p_hi = _mm256_maddubs_epi16(hi, x_hi);
                        lo_sum = dot(lo_sum, p_lo, _mm256_shuffle_epi8(sc, pick[2 * g]));
                        hi_sum = dot(hi_sum, p_hi, _mm256_shuffle_epi8(sc, pick[2 * g + 1]));
                    }
                    let dots = _mm256_cvtepi32_ps(_mm256_add_epi32(lo_sum, hi_sum));
                    acc = _mm256_fmadd_ps(_mm256_broadcastss_ps(dd), dots, acc);
                }
                *out = hsum(acc) - hsum4(acc_min);
            }
        }
    }

    /// # Safety
    /// The CPU must have avx2, fma and f16c.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn matvec_rows_avx2(w: &[u8], cols: usize, xq: &Q8KInput, y: &mut [f32]) {
        // SAFETY: the caller guarantees the features `rows_with` and `dot_avx2` need.
        unsafe { rows_with(w, cols, xq, y, |a, p, s| dot_avx2(a, p, s)) }
    }

    /// # Safety
    /// The CPU must have avx2, fma, f16c, avx512vnni and avx512vl.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn matvec_rows_vnni(w: &[u8], cols: usize, xq: &Q8KInput, y: &mut [f32]) {
        // SAFETY: the caller guarantees the features `rows_with` and `dot_vnni` need.
        unsafe { rows_with(w, cols, xq, y, |a, p, s| dot_vnni(a, p, s)) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_util::Rng;
    use vlmem_qwen3vl::format::q4_k::quantize_row;

    /// Value `i` of a block as the exact real `d sc q - dmin m`, and its two terms'
    /// magnitudes summed (`d sc q + dmin m`), in f64 (exact: see the format's tests).
    fn exact_value(block: &[u8], i: usize) -> (f64, f64) {
        let (d, dmin) = block_scales(block);
        let packed: &[u8; 12] = block[4..16].try_into().unwrap();
        let (sc, m) = vlmem_qwen3vl::format::q4_k::scale_min(packed, i / 32);
        let (at, high) = vlmem_qwen3vl::format::q4_k::quant_position(i);
        let q = if high { block[at] >> 4 } else { block[at] & 15 };
        let a = f64::from(d) * f64::from(sc) * f64::from(q);
        let b = f64::from(dmin) * f64::from(m);
        (a - b, a + b)
    }

    /// A `rows x cols` Q4_K matrix of values of varied magnitude per row (some rows
    /// one-sided, so the mins matter), its bytes placed `offset` bytes into a buffer (so
    /// loads are misaligned), with each weight's exact value and two-term magnitude.
    fn q4_matrix(
        rng: &mut Rng,
        rows: usize,
        cols: usize,
        offset: usize,
    ) -> (Vec<u8>, Vec<f64>, Vec<f64>) {
        let mut buf = vec![0u8; offset];
        for r in 0..rows {
            let scale = [1e-3f32, 0.05, 1.0, 30.0][rng.below(4)];
            let shift = [0.0f32, 0.0, 0.7, -0.4][r % 4];
            let row: Vec<f32> = (0..cols).map(|_| (rng.uniform() + shift) * scale).collect();
            buf.extend(quantize_row(&row).unwrap());
        }
        let w = &buf[offset..];
        let row_bytes = cols / 256 * 144;
        let (mut values, mut mags) = (Vec::new(), Vec::new());
        for r in 0..rows {
            for c in 0..cols {
                let at = r * row_bytes + c / 256 * 144;
                let (v, m) = exact_value(&w[at..at + 144], c % 256);
                values.push(v);
                mags.push(m);
            }
        }
        (buf, values, mags)
    }

    /// Bound (2) of the module doc for row `r`: `(blocks + 6) 2^-23 A`.
    fn accumulation_bound(mags: &[f64], xq: &Q8KInput, r: usize, cols: usize) -> f64 {
        let a: f64 = (0..cols)
            .map(|c| mags[r * cols + c] * xq.value(c).abs())
            .sum();
        (cols / 256 + 6) as f64 * f64::from(f32::EPSILON) * a
    }

    fn paths() -> Vec<Isa> {
        Isa::ALL.into_iter().filter(|i| i.available()).collect()
    }

    /// Every path this CPU has (and the scalar one) against the exact product of the
    /// dequantized weights and the quantized input, computed in f64, over odd row counts,
    /// columns up to 4096 and misaligned weight bytes: within the f32 accumulation bound.
    #[test]
    fn every_path_gives_the_exact_quantized_product_within_f32_accumulation() {
        let mut rng = Rng(17);
        let isas = paths();
        eprintln!("q4_k paths here: {isas:?}");
        let mut cases: Vec<(usize, usize)> = (1..=37).map(|r| (r, 256 * (1 + r % 4))).collect();
        cases.extend([(1, 4096), (5, 4096), (9, 2048), (3, 256), (66, 512)]);
        for _ in 0..12 {
            cases.push((1 + rng.below(40), 256 * (1 + rng.below(16))));
        }
        for (k, &(rows, cols)) in cases.iter().enumerate() {
            let offset = k % 7;
            let (buf, wv, mags) = q4_matrix(&mut rng, rows, cols, offset);
            let w = &buf[offset..];
            let x: Vec<f32> = (0..cols).map(|_| rng.uniform() * 3.0).collect();
            let xq = Q8KInput::new(&x);
            for &isa in &isas {
                let mut y = vec![f32::NAN; rows];
                matvec_rows_on(isa, w, cols, &xq, &mut y);
                for r in 0..rows {
                    let exact: f64 = (0..cols).map(|c| wv[r * cols + c] * xq.value(c)).sum();
                    let bound = accumulation_bound(&mags, &xq, r, cols);
                    let err = (f64::from(y[r]) - exact).abs();
                    assert!(
                        err <= bound,
                        "{isa:?} {rows}x{cols}+{offset} row {r}: {} vs {exact} (err {err:e} > {bound:e})",
                        y[r]
                    );
                }
            }
        }
    }

    /// The result is within the input's rounding (1) and the accumulation (2) of the exact
    /// product of the dequantized weights and the f32 input, and that bound is a small part
    /// of the row's magnitude (so the test can fail).
    #[test]
    fn the_result_is_within_the_input_rounding_of_the_exact_product() {
        let mut rng = Rng(29);
        for &(rows, cols) in &[(7usize, 2048usize), (33, 512), (1, 4096), (64, 256)] {
            let (w, wv, mags) = q4_matrix(&mut rng, rows, cols, 0);
            let x: Vec<f32> = (0..cols).map(|_| rng.uniform()).collect();
            let xq = Q8KInput::new(&x);
            for isa in paths() {
                let mut y = vec![0f32; rows];
                matvec_rows_on(isa, &w, cols, &xq, &mut y);
                for r in 0..rows {
                    let row = &wv[r * cols..(r + 1) * cols];
                    let exact: f64 = row.iter().zip(&x).map(|(w, &x)| w * f64::from(x)).sum();
                    let rounding: f64 = row
                        .iter()
                        .zip(&x)
                        .enumerate()
                        .map(|(c, (w, &x))| {
                            w.abs()
                                * (f64::from(xq.d[c / 256]) / 2.0
                                    + f64::from(x.abs()) * f64::from(f32::EPSILON))
                        })
                        .sum();
                    let bound = rounding + accumulation_bound(&mags, &xq, r, cols);
                    let err = (f64::from(y[r]) - exact).abs();
                    assert!(
                        err <= bound,
                        "{isa:?} {rows}x{cols} row {r}: err {err:e} > {bound:e}"
                    );
                    let magnitude: f64 = row
                        .iter()
                        .zip(&x)
                        .map(|(w, &x)| (w * f64::from(x)).abs())
                        .sum();
                    assert!(bound < magnitude * 0.02, "{rows}x{cols} row {r}");
                }
            }
        }
    }

    /// The vector quantizer gives the scalar rule's scales, quants and sums bit for bit,
    /// ties and odd blocks (NaN, infinities, zeros, a partial last block) included.
    #[test]
    fn the_vector_quantizer_equals_the_scalar_rule() {
        let mut rng = Rng(53);
        let mut inputs: Vec<Vec<f32>> = (0..60)
            .map(|k| {
                let scale = [1e-6f32, 1e-2, 1.0, 1e3][k % 4];
                (0..256 * (1 + k % 5))
                    .map(|_| rng.uniform() * scale)
                    .collect()
            })
            .collect();
        // Exact halves: with max |x| = 127 the step is 1, so k + 0.5 is a tie.
        let mut ties: Vec<f32> = (0..256).map(|k| (k % 64) as f32 - 31.5).collect();
        ties[0] = 127.0;
        ties[1] = -126.5;
        inputs.push(ties);
        let mut odd = vec![0.5f32; 1024];
        odd[3] = f32::NAN;
        odd[300] = f32::INFINITY;
        odd[600] = f32::NEG_INFINITY;
        odd[768..].fill(0.0);
        inputs.push(odd);
        inputs.push(vec![0.25; 300]); // a partial last block
        inputs.push(vec![-1.0; 256]); // sums at their most negative
        for x in &inputs {
            let (fast, slow) = (Q8KInput::new(x), Q8KInput::new_scalar(x));
            assert_eq!(fast.q, slow.q, "{x:?}");
            assert_eq!(fast.sums, slow.sums, "{x:?}");
            let bits = |d: &[f32]| d.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&fast.d), bits(&slow.d), "{x:?}");
            // The sums are the quants' sums.
            for (s, q) in slow.sums.iter().zip(slow.q.chunks(32)) {
                assert_eq!(i32::from(*s), q.iter().map(|&v| i32::from(v)).sum::<i32>());
            }
        }
        let x = vec![-1.0f32; 256];
        assert_eq!(Q8KInput::new(&x).sums, vec![-32 * 127; 8]);
    }

    /// The largest quants, scales and mins (every byte 0xFF: q = 15, sc = m = 63) with
    /// inputs at +-127 and at -128 (which the quantizer never gives, but the kernels must
    /// still sum exactly): no saturation in any path.
    #[test]
    fn extreme_quants_do_not_saturate() {
        let cols = 512;
        let mut w = Vec::new();
        for (d, dmin) in [(1.0f32, 1.0f32), (2.0, 0.0), (0.0, 0.5)] {
            for _ in 0..cols / 256 {
                w.extend_from_slice(&half::f16::from_f32(d).to_le_bytes());
                w.extend_from_slice(&half::f16::from_f32(dmin).to_le_bytes());
                w.extend(std::iter::repeat_n(0xFFu8, 140));
            }
        }
        for qx in [127i8, -127, -128] {
            let xq = Q8KInput {
                d: vec![0.5; cols / 256],
                q: vec![qx; cols],
                sums: vec![32 * i16::from(qx); cols / 256 * 8],
            };
            // Each weight d * 63 * 15 - dmin * 63, times 0.5 * qx, over 512 columns.
            let want: Vec<f32> = [(1.0f32, 1.0f32), (2.0, 0.0), (0.0, 0.5)]
                .iter()
                .map(|&(d, dmin)| (d * 945.0 - dmin * 63.0) * 0.5 * f32::from(qx) * cols as f32)
                .collect();
            for isa in Isa::ALL {
                let mut y = vec![0f32; 3];
                matvec_rows_on(isa, &w, cols, &xq, &mut y);
                assert_eq!(y, want, "{isa:?} qx {qx}");
            }
        }
    }

    #[test]
    fn vecmat_reads_q4_k_dequantized() {
        let mut rng = Rng(41);
        let (rows, cols) = (13usize, 768usize);
        let (w, wv, _) = q4_matrix(&mut rng, rows, cols, 0);
        let x: Vec<f32> = (0..rows).map(|_| rng.uniform()).collect();
        for (col0, n) in [(0usize, 768usize), (5, 300), (250, 7), (512, 256), (767, 1)] {
            let mut y = vec![f32::NAN; n];
            vecmat_cols(&w, rows, cols, col0, &x, &mut y);
            for (j, &yj) in y.iter().enumerate() {
                let want: f64 = (0..rows)
                    .map(|r| wv[r * cols + col0 + j] * f64::from(x[r]))
                    .sum();
                let mag: f64 = (0..rows)
                    .map(|r| (wv[r * cols + col0 + j] * f64::from(x[r])).abs())
                    .sum();
                assert!(
                    (f64::from(yj) - want).abs() <= 1e-6 * mag + 1e-30,
                    "col {}",
                    col0 + j
                );
            }
        }
        let mut y: Vec<f32> = Vec::new();
        vecmat_cols(&w, rows, cols, 10, &x, &mut y);
        // One value at a time gives the same values.
        for i in [0usize, 255, 256, 1000, rows * cols - 1] {
            let (r, c) = (i / cols, i % cols);
            assert_eq!(f64::from(elem(&w, cols, i)), wv[r * cols + c] as f32 as f64);
        }
    }
}
