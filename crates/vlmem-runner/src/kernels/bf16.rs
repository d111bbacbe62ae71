//! The inner loops of [`super::matvec`], [`super::vecmat`] and
//! [`super::read_bandwidth_probe`] on one thread's share: AVX2 + FMA (+ F16C for half) when
//! the CPU has them, else portable scalar code. Weights are little-endian bytes of any
//! alignment; each element is widened to f32 in registers and accumulated in f32.
//!
//! Callers (the parent module) have checked every length: `w` holds exactly the rows asked
//! for, `x` and `y` have the lengths the shapes imply. The vector functions re-check with
//! `assert!`s that cost nothing beside the loops, so a wrong call cannot read out of bounds.

#![allow(unsafe_code)]

use super::WeightFormat;

/// Whether the AVX2 + FMA + F16C paths can run here.
pub fn has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && std::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Bytes of one value of `ty`, for the formats that store each value on its own; `None` for
/// a block format (its rows have their own kernels, e.g. [`super::q8_0`]).
#[inline]
const fn value_bytes(ty: WeightFormat) -> Option<usize> {
    match ty {
        WeightFormat::Bf16 | WeightFormat::F16 => Some(2),
        WeightFormat::F32 => Some(4),
        WeightFormat::Q8_0 => None,
    }
}

/// Value `i` of the row-major matrix `w` whose rows are `cols` values of `ty`.
#[inline]
fn elem(w: &[u8], ty: WeightFormat, cols: usize, i: usize) -> f32 {
    match ty {
        WeightFormat::Bf16 => {
            f32::from_bits(u32::from(u16::from_le_bytes([w[2 * i], w[2 * i + 1]])) << 16)
        }
        WeightFormat::F16 => half::f16::from_le_bytes([w[2 * i], w[2 * i + 1]]).to_f32(),
        WeightFormat::F32 => {
            f32::from_le_bytes([w[4 * i], w[4 * i + 1], w[4 * i + 2], w[4 * i + 3]])
        }
        WeightFormat::Q8_0 => super::q8_0::elem(w, cols, i),
    }
}

/// `y[r] = sum_c W[r, c] x[c]` for the `y.len()` rows held by `w`. Q8_0 rows go to
/// [`super::q8_0::matvec_rows`] with `x` quantized here (callers that run many row blocks
/// quantize once and call it themselves).
pub fn matvec_rows(w: &[u8], ty: WeightFormat, cols: usize, x: &[f32], y: &mut [f32]) {
    if value_bytes(ty).is_none() {
        let xq = super::q8_0::Q8Input::new(&x[..cols]);
        super::q8_0::matvec_rows(w, cols, &xq, y);
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the CPU supports avx2, fma and f16c (checked just above), which is all the
        // target_feature function requires; its memory accesses are bounds-checked inside.
        unsafe { x86::matvec_rows(w, ty, cols, x, y) };
        return;
    }
    matvec_rows_scalar(w, ty, cols, x, y);
}

/// The portable path of [`matvec_rows`] (for Q8_0, each weight dequantized and `x` kept in
/// f32).
pub fn matvec_rows_scalar(w: &[u8], ty: WeightFormat, cols: usize, x: &[f32], y: &mut [f32]) {
    for (r, out) in y.iter_mut().enumerate() {
        let base = r * cols;
        let mut acc = [0f32; 4];
        for (c, &xc) in x.iter().enumerate().take(cols) {
            acc[c % 4] += elem(w, ty, cols, base + c) * xc;
        }
        *out = (acc[0] + acc[1]) + (acc[2] + acc[3]);
    }
}

/// `y[j] = sum_r x[r] W[r, col0 + j]` for `W: [rows, cols]`.
pub fn vecmat_cols(
    w: &[u8],
    ty: WeightFormat,
    rows: usize,
    cols: usize,
    col0: usize,
    x: &[f32],
    y: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: as in `matvec_rows`: the features were detected, accesses are checked.
        unsafe { x86::vecmat_cols(w, ty, rows, cols, col0, x, y) };
        return;
    }
    vecmat_cols_scalar(w, ty, rows, cols, col0, x, y);
}

/// The portable path of [`vecmat_cols`].
pub fn vecmat_cols_scalar(
    w: &[u8],
    ty: WeightFormat,
    rows: usize,
    cols: usize,
    col0: usize,
    x: &[f32],
    y: &mut [f32],
) {
    y.fill(0.0);
    for (r, &xr) in x.iter().enumerate().take(rows) {
        let base = r * cols + col0;
        for (j, out) in y.iter_mut().enumerate() {
            *out += xr * elem(w, ty, cols, base + j);
        }
    }
}

/// The bytes of `values` in little-endian order, as the f32 kernels read them.
pub fn f32_bytes(values: &[f32]) -> &[u8] {
    #[cfg(target_endian = "little")]
    {
        // SAFETY: any initialised memory is valid as u8; the slice covers exactly the
        // `values.len() * 4` bytes of `values`, borrowed for the same lifetime; u8 needs no
        // alignment. Native order is little-endian here (the cfg above).
        unsafe {
            std::slice::from_raw_parts(values.as_ptr() as *const u8, std::mem::size_of_val(values))
        }
    }
    #[cfg(not(target_endian = "little"))]
    {
        compile_error!("the f32 kernels assume a little-endian target")
    }
}

/// The sum of every byte of `buf` (a read of the whole buffer).
pub fn read_sum(buf: &[u8]) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: avx2 was detected; the function reads only inside `buf`.
        return unsafe { x86::read_sum(buf) };
    }
    buf.iter().map(|&b| u64::from(b)).sum()
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{WeightFormat, elem, value_bytes};

    /// The value size of a plain format (the only ones these loops read: the public entry
    /// points send block formats elsewhere, and this falls back to the scalar loops if not).
    macro_rules! plain_or {
        ($ty:expr, $fallback:expr) => {
            match value_bytes($ty) {
                Some(es) => es,
                None => return $fallback,
            }
        };
    }
    use std::arch::x86_64::*;

    /// How far ahead of its reads each row stream asks for lines (bytes): about a dozen
    /// cache lines in flight per row, enough to cover memory latency at full bandwidth.
    const PREFETCH_BYTES: usize = 1024;

    /// Asks for the cache line `ahead` bytes past `p` (a hint: it never faults).
    #[inline]
    #[target_feature(enable = "avx2")]
    fn prefetch(p: *const u8, ahead: usize) {
        // A prefetch reads nothing architecturally and cannot fault, whatever the address;
        // `wrapping_add` computes it without claiming it is in bounds.
        _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(ahead) as *const i8);
    }

    /// Eight weights from `p` widened to f32.
    ///
    /// # Safety
    /// `p` must be valid for reading 8 elements of `ty` (16 or 32 bytes); the CPU must have
    /// avx2 and f16c.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(p: *const u8, ty: WeightFormat) -> __m256 {
        // SAFETY: the caller guarantees 8 readable elements; unaligned loads are used.
        unsafe {
            match ty {
                WeightFormat::Bf16 => {
                    let h = _mm_loadu_si128(p as *const __m128i);
                    _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
                }
                WeightFormat::F16 => _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)),
                WeightFormat::F32 => _mm256_loadu_ps(p as *const f32),
                // Never called with a block format (`plain_or!` above every caller); zeros
                // keep it total.
                WeightFormat::Q8_0 => _mm256_setzero_ps(),
            }
        }
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

    /// # Safety
    /// The CPU must have avx2, fma and f16c.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn matvec_rows(w: &[u8], ty: WeightFormat, cols: usize, x: &[f32], y: &mut [f32]) {
        let es = plain_or!(ty, super::matvec_rows_scalar(w, ty, cols, x, y));
        let rows = y.len();
        assert!(x.len() >= cols && w.len() >= rows * cols * es);
        let row_bytes = cols * es;
        let vec_cols = cols / 8 * 8;
        let wp = w.as_ptr();
        let xp = x.as_ptr();
        let mut r = 0;
        while r + 4 <= rows {
            // SAFETY: rows r..r+4 lie inside `w` (asserted above); every load reads columns
            // c..c+8 with c + 8 <= vec_cols <= cols of those rows, and of `x`.
            unsafe {
                let p0 = wp.add(r * row_bytes);
                let p1 = p0.add(row_bytes);
                let p2 = p1.add(row_bytes);
                let p3 = p2.add(row_bytes);
                let (mut a0, mut a1, mut a2, mut a3) = (
                    _mm256_setzero_ps(),
                    _mm256_setzero_ps(),
                    _mm256_setzero_ps(),
                    _mm256_setzero_ps(),
                );
                let (mut b0, mut b1, mut b2, mut b3) = (
                    _mm256_setzero_ps(),
                    _mm256_setzero_ps(),
                    _mm256_setzero_ps(),
                    _mm256_setzero_ps(),
                );
                let mut c = 0;
                // 16 columns per step. Every 32 columns (one 64-byte cache line of each
                // bf16/f16 row, two of f32) the step asks for the line PREFETCH_BYTES ahead in
                // every row: four rows are four streams, more than the hardware prefetcher
                // follows at full speed, and rows of 4 KiB cross a page (where it stops) every
                // step or two. A prefetch past the row's end reads nothing it may fault on
                // (prefetches never fault) and is a hint only.
                while c + 16 <= vec_cols {
                    if c % 32 == 0 {
                        let o = c * es;
                        prefetch(p0.add(o), PREFETCH_BYTES);
                        prefetch(p1.add(o), PREFETCH_BYTES);
                        prefetch(p2.add(o), PREFETCH_BYTES);
                        prefetch(p3.add(o), PREFETCH_BYTES);
                        if es == 4 {
                            prefetch(p0.add(o), PREFETCH_BYTES + 64);
                            prefetch(p1.add(o), PREFETCH_BYTES + 64);
                            prefetch(p2.add(o), PREFETCH_BYTES + 64);
                            prefetch(p3.add(o), PREFETCH_BYTES + 64);
                        }
                    }
                    let xv = _mm256_loadu_ps(xp.add(c));
                    let xw = _mm256_loadu_ps(xp.add(c + 8));
                    let o = c * es;
                    let o2 = (c + 8) * es;
                    a0 = _mm256_fmadd_ps(load8(p0.add(o), ty), xv, a0);
                    a1 = _mm256_fmadd_ps(load8(p1.add(o), ty), xv, a1);
                    a2 = _mm256_fmadd_ps(load8(p2.add(o), ty), xv, a2);
                    a3 = _mm256_fmadd_ps(load8(p3.add(o), ty), xv, a3);
                    b0 = _mm256_fmadd_ps(load8(p0.add(o2), ty), xw, b0);
                    b1 = _mm256_fmadd_ps(load8(p1.add(o2), ty), xw, b1);
                    b2 = _mm256_fmadd_ps(load8(p2.add(o2), ty), xw, b2);
                    b3 = _mm256_fmadd_ps(load8(p3.add(o2), ty), xw, b3);
                    c += 16;
                }
                if c < vec_cols {
                    let xv = _mm256_loadu_ps(xp.add(c));
                    let o = c * es;
                    a0 = _mm256_fmadd_ps(load8(p0.add(o), ty), xv, a0);
                    a1 = _mm256_fmadd_ps(load8(p1.add(o), ty), xv, a1);
                    a2 = _mm256_fmadd_ps(load8(p2.add(o), ty), xv, a2);
                    a3 = _mm256_fmadd_ps(load8(p3.add(o), ty), xv, a3);
                }
                let mut s = [
                    hsum(_mm256_add_ps(a0, b0)),
                    hsum(_mm256_add_ps(a1, b1)),
                    hsum(_mm256_add_ps(a2, b2)),
                    hsum(_mm256_add_ps(a3, b3)),
                ];
                for (k, sk) in s.iter_mut().enumerate() {
                    let base = (r + k) * cols;
                    for (cc, &xc) in x.iter().enumerate().take(cols).skip(vec_cols) {
                        *sk += elem(w, ty, cols, base + cc) * xc;
                    }
                }
                y[r..r + 4].copy_from_slice(&s);
            }
            r += 4;
        }
        while r < rows {
            // SAFETY: row r lies inside `w`; loads stay below vec_cols as above.
            unsafe {
                let p0 = wp.add(r * row_bytes);
                let mut a0 = _mm256_setzero_ps();
                let mut c = 0;
                while c < vec_cols {
                    let xv = _mm256_loadu_ps(xp.add(c));
                    a0 = _mm256_fmadd_ps(load8(p0.add(c * es), ty), xv, a0);
                    c += 8;
                }
                let mut s = hsum(a0);
                let base = r * cols;
                for (cc, &xc) in x.iter().enumerate().take(cols).skip(vec_cols) {
                    s += elem(w, ty, cols, base + cc) * xc;
                }
                y[r] = s;
            }
            r += 1;
        }
    }

    /// # Safety
    /// The CPU must have avx2, fma and f16c.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn vecmat_cols(
        w: &[u8],
        ty: WeightFormat,
        rows: usize,
        cols: usize,
        col0: usize,
        x: &[f32],
        y: &mut [f32],
    ) {
        let es = plain_or!(ty, super::vecmat_cols_scalar(w, ty, rows, cols, col0, x, y));
        let n = y.len();
        assert!(col0 + n <= cols && x.len() >= rows && w.len() >= rows * cols * es);
        let vec_n = n / 8 * 8;
        y.fill(0.0);
        let wp = w.as_ptr();
        let yp = y.as_mut_ptr();
        let row_bytes = cols * es;
        let mut r = 0;
        while r + 4 <= rows {
            // SAFETY: rows r..r+4 lie inside `w`; columns col0 + j .. col0 + j + 8 with
            // j + 8 <= vec_n <= n stay inside each row (col0 + n <= cols) and inside `y`.
            unsafe {
                let p0 = wp.add(r * row_bytes + col0 * es);
                let p1 = p0.add(row_bytes);
                let p2 = p1.add(row_bytes);
                let p3 = p2.add(row_bytes);
                let x0 = _mm256_set1_ps(x[r]);
                let x1 = _mm256_set1_ps(x[r + 1]);
                let x2 = _mm256_set1_ps(x[r + 2]);
                let x3 = _mm256_set1_ps(x[r + 3]);
                let mut j = 0;
                while j < vec_n {
                    let o = j * es;
                    let mut acc = _mm256_loadu_ps(yp.add(j));
                    acc = _mm256_fmadd_ps(load8(p0.add(o), ty), x0, acc);
                    acc = _mm256_fmadd_ps(load8(p1.add(o), ty), x1, acc);
                    acc = _mm256_fmadd_ps(load8(p2.add(o), ty), x2, acc);
                    acc = _mm256_fmadd_ps(load8(p3.add(o), ty), x3, acc);
                    _mm256_storeu_ps(yp.add(j), acc);
                    j += 8;
                }
            }
            for (k, &xk) in x.iter().enumerate().skip(r).take(4) {
                let base = k * cols + col0;
                for (j, yj) in y.iter_mut().enumerate().skip(vec_n) {
                    *yj += xk * elem(w, ty, cols, base + j);
                }
            }
            r += 4;
        }
        while r < rows {
            // SAFETY: row r lies inside `w`; columns as above.
            unsafe {
                let p0 = wp.add(r * row_bytes + col0 * es);
                let x0 = _mm256_set1_ps(x[r]);
                let mut j = 0;
                while j < vec_n {
                    let acc = _mm256_loadu_ps(yp.add(j));
                    let acc = _mm256_fmadd_ps(load8(p0.add(j * es), ty), x0, acc);
                    _mm256_storeu_ps(yp.add(j), acc);
                    j += 8;
                }
            }
            let base = r * cols + col0;
            let xr = x[r];
            for (j, yj) in y.iter_mut().enumerate().skip(vec_n) {
                *yj += xr * elem(w, ty, cols, base + j);
            }
            r += 1;
        }
    }

    /// # Safety
    /// The CPU must have avx2.
    #[target_feature(enable = "avx2")]
    pub unsafe fn read_sum(buf: &[u8]) -> u64 {
        let n = buf.len() / 128 * 128;
        let p = buf.as_ptr();
        let zero = _mm256_setzero_si256();
        let mut acc = [_mm256_setzero_si256(); 4];
        let mut i = 0;
        while i < n {
            prefetch(p.wrapping_add(i), PREFETCH_BYTES);
            prefetch(p.wrapping_add(i), PREFETCH_BYTES + 64);
            // SAFETY: i + 128 <= n <= buf.len(): four 32-byte loads inside `buf`.
            unsafe {
                for (k, a) in acc.iter_mut().enumerate() {
                    let v = _mm256_loadu_si256(p.add(i + 32 * k) as *const __m256i);
                    *a = _mm256_add_epi64(*a, _mm256_sad_epu8(v, zero));
                }
            }
            i += 128;
        }
        let mut lanes = [0u64; 4];
        let total = _mm256_add_epi64(
            _mm256_add_epi64(acc[0], acc[1]),
            _mm256_add_epi64(acc[2], acc[3]),
        );
        // SAFETY: `lanes` is 32 writable bytes; an unaligned store.
        unsafe { _mm256_storeu_si256(lanes.as_mut_ptr() as *mut __m256i, total) };
        lanes.iter().sum::<u64>() + buf[n..].iter().map(|&b| u64::from(b)).sum::<u64>()
    }
}
