//! The inner loops of [`super::matvec`], [`super::vecmat`] and
//! [`super::read_bandwidth_probe`] on one thread's share: AVX2 + FMA (+ F16C for half) when
//! the CPU has them, else portable scalar code. Weights are little-endian bytes of any
//! alignment; each element is widened to f32 in registers and accumulated in f32.
//!
//! Decode's bf16 matrix-vector product has its own paths ([`Isa`], chosen once per process:
//! the fastest this CPU has, or `VLMEM_BF16_ISA`). The split paths read a row's bf16 pairs
//! as 32-bit lanes and take the even column with a shift and the odd one with a mask, against
//! the input reordered once per call to match ([`SplitInput`]), eight rows a step: AVX-512
//! ([`super::bf16_avx512`], inline assembly) and AVX2 (intrinsics, [`Isa::Avx2Split`]). They
//! stay exact: every weight is widened to f32 and the input stays f32. (`vdpbf16ps` against
//! the input rounded to bf16, as llama.cpp does, ran no faster on the development VM: 75-78
//! GB/s on one core from L2 for both, eight rows a step, and the same from memory, which
//! bounds decode; and with the input rounded the engine's fixture test misses its 1e-4.)
//!
//! Callers (the parent module) have checked every length: `w` holds exactly the rows asked
//! for, `x` and `y` have the lengths the shapes imply. The vector functions re-check with
//! `assert!`s that cost nothing beside the loops, so a wrong call cannot read out of bounds.

#![allow(unsafe_code)]

use super::WeightFormat;
// A process-wide setting read once per call, not shared state a model checks: std's atomic
// (const-constructible in a static, also under the loom build), as `pool::global` uses std's
// `OnceLock`.
use std::sync::atomic::{AtomicU32, Ordering};

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

/// The paths of the bf16 matrix-vector product ([`matvec_rows_on`]). f16 and f32 weights run
/// [`Isa::Avx2`] on every vector path, and block formats their own kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// Portable code.
    Scalar,
    /// AVX2 + FMA + F16C, each weight widened as it is loaded (`vpmovzxwd`, shift), four rows
    /// a step (the path before the split ones; `VLMEM_BF16_ISA=avx2` keeps it for
    /// comparisons).
    Avx2,
    /// AVX2 + FMA (+ F16C for the other formats): bf16 pairs split into even and odd lanes,
    /// eight rows a step.
    Avx2Split,
    /// AVX-512 F: the same on 16 lanes ([`super::bf16_avx512`]).
    Avx512Split,
}

/// The process's path: unset (0), else its index in [`Isa::ALL`] plus one.
static CHOSEN: AtomicU32 = AtomicU32::new(0);

impl Isa {
    /// Every path, slowest first.
    pub const ALL: [Isa; 4] = [Isa::Scalar, Isa::Avx2, Isa::Avx2Split, Isa::Avx512Split];

    /// Whether this CPU can run the path.
    pub fn available(self) -> bool {
        match self {
            Isa::Scalar => true,
            Isa::Avx2 | Isa::Avx2Split => has_avx2_fma(),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Split => super::bf16_avx512::available(),
            #[cfg(not(target_arch = "x86_64"))]
            Isa::Avx512Split => false,
        }
    }

    /// The fastest path this CPU has: AVX-512 split, else AVX2 split, else scalar.
    pub fn detected() -> Isa {
        [Isa::Avx512Split, Isa::Avx2Split]
            .into_iter()
            .find(|i| i.available())
            .unwrap_or(Isa::Scalar)
    }

    /// The path [`matvec_rows`] takes in this process: `VLMEM_BF16_ISA` (a [`Isa::name`])
    /// where it names a path this CPU has, else [`Isa::detected`]. Read once.
    pub fn best() -> Isa {
        let code = CHOSEN.load(Ordering::Relaxed);
        if let Some(&isa) = code.checked_sub(1).and_then(|i| Isa::ALL.get(i as usize)) {
            return isa;
        }
        let isa = std::env::var("VLMEM_BF16_ISA")
            .ok()
            .and_then(|v| Isa::parse(&v))
            .filter(|i| i.available())
            .unwrap_or_else(Isa::detected);
        let code = Isa::ALL
            .iter()
            .position(|&i| i == isa)
            .map_or(0, |i| i as u32 + 1);
        CHOSEN.store(code, Ordering::Relaxed);
        isa
    }

    /// The name reports and `VLMEM_BF16_ISA` use.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx2Split => "avx2-split",
            Isa::Avx512Split => "avx512-split",
        }
    }

    /// The path called `name` ([`Isa::name`], any case, spaces around ignored).
    pub fn parse(name: &str) -> Option<Isa> {
        let name = name.trim();
        Isa::ALL
            .into_iter()
            .find(|i| i.name().eq_ignore_ascii_case(name))
    }

    /// Whether the path reads bf16 rows against a [`SplitInput`].
    pub fn splits(self) -> bool {
        matches!(self, Isa::Avx2Split | Isa::Avx512Split)
    }
}

/// Values per block of [`SplitInput`] (one 64-byte line of a bf16 row).
pub const SPLIT_BLOCK: usize = 32;

/// The input as the split paths read it: per whole block of 32 values, the 16 at even
/// positions, then the 16 at odd positions (a row's 32-bit lane `i` holds columns `2i`, in
/// its low half, and `2i + 1`). Columns past the last whole block are read from `x` itself.
#[derive(Debug, Clone, Default)]
pub struct SplitInput {
    xs: Vec<f32>,
}

impl SplitInput {
    /// `x` reordered (its whole blocks).
    pub fn new(x: &[f32]) -> SplitInput {
        let mut xs = vec![0f32; x.len() / SPLIT_BLOCK * SPLIT_BLOCK];
        for (dst, src) in xs
            .chunks_exact_mut(SPLIT_BLOCK)
            .zip(x.chunks_exact(SPLIT_BLOCK))
        {
            let (even, odd) = dst.split_at_mut(SPLIT_BLOCK / 2);
            for (i, pair) in src.chunks_exact(2).enumerate() {
                even[i] = pair[0];
                odd[i] = pair[1];
            }
        }
        SplitInput { xs }
    }

    /// The reordered values.
    pub fn values(&self) -> &[f32] {
        &self.xs
    }
}

/// The sum of `x[c] * w[c]` over the columns `from..` of the bf16 row `row` (the columns
/// after the split paths' whole blocks; `from` is at most the row's length).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(super) fn bf16_tail(row: &[u8], x: &[f32], from: usize) -> f32 {
    let cols = row.len() / 2;
    let mut s = 0f32;
    for (pair, &xc) in row[2 * from..].chunks_exact(2).zip(&x[from..cols]) {
        s += f32::from_bits(u32::from(u16::from_le_bytes([pair[0], pair[1]])) << 16) * xc;
    }
    s
}

/// Bytes of one value of `ty`, for the formats that store each value on its own; `None` for
/// a block format (its rows have their own kernels, e.g. [`super::q8_0`]).
#[inline]
const fn value_bytes(ty: WeightFormat) -> Option<usize> {
    match ty {
        WeightFormat::Bf16 | WeightFormat::F16 => Some(2),
        WeightFormat::F32 => Some(4),
        WeightFormat::Q8_0 | WeightFormat::Q4_K => None,
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
        WeightFormat::Q4_K => super::q4_k::elem(w, cols, i),
    }
}

/// `y[r] = sum_c W[r, c] x[c]` for the `y.len()` rows held by `w`. Q8_0 and Q4_K rows go
/// to [`super::q8_0::matvec_rows`] and [`super::q4_k::matvec_rows`] with `x` quantized here
/// (callers that run many row blocks quantize once and call them themselves); bf16 rows take
/// [`Isa::best`] with the input split here where the path needs it.
pub fn matvec_rows(w: &[u8], ty: WeightFormat, cols: usize, x: &[f32], y: &mut [f32]) {
    matvec_rows_on(Isa::best(), w, ty, cols, x, None, y);
}

/// [`matvec_rows`] with the input's split form prepared by the caller (once per product,
/// shared by its tasks; made from the same `x`): the same bits as [`matvec_rows`].
pub fn matvec_rows_prepared(
    w: &[u8],
    ty: WeightFormat,
    cols: usize,
    x: &[f32],
    split: Option<&SplitInput>,
    y: &mut [f32],
) {
    matvec_rows_on(Isa::best(), w, ty, cols, x, split, y);
}

/// [`matvec_rows`] on a given path (tests and benchmarks); a path this CPU lacks runs the
/// scalar one. `split` is `x`'s [`SplitInput`] if the caller has it (else it is made here
/// when the path needs it).
pub fn matvec_rows_on(
    isa: Isa,
    w: &[u8],
    ty: WeightFormat,
    cols: usize,
    x: &[f32],
    split: Option<&SplitInput>,
    y: &mut [f32],
) {
    match ty {
        WeightFormat::Q8_0 => {
            let xq = super::q8_0::Q8Input::new(&x[..cols]);
            super::q8_0::matvec_rows(w, cols, &xq, y);
            return;
        }
        WeightFormat::Q4_K => {
            let xq = super::q4_k::Q8KInput::new(&x[..cols]);
            super::q4_k::matvec_rows(w, cols, &xq, y);
            return;
        }
        WeightFormat::Bf16 | WeightFormat::F16 | WeightFormat::F32 => {}
    }
    let isa = if isa.available() { isa } else { Isa::Scalar };
    #[cfg(target_arch = "x86_64")]
    if isa != Isa::Scalar {
        if isa.splits() && ty == WeightFormat::Bf16 {
            let whole = cols / SPLIT_BLOCK * SPLIT_BLOCK;
            let local;
            let xs = match split {
                Some(s) if s.values().len() == whole => s.values(),
                _ => {
                    local = SplitInput::new(&x[..cols]);
                    local.values()
                }
            };
            if isa == Isa::Avx512Split {
                // SAFETY: the path is available (checked above): the CPU has AVX-512 F; the
                // function checks every length it reads.
                unsafe { super::bf16_avx512::matvec_rows(w, cols, x, xs, y, bf16_tail) };
            } else {
                // SAFETY: avx2 and fma were detected (the path is available); accesses are
                // checked inside.
                unsafe { x86::matvec_rows_split(w, cols, x, xs, y) };
            }
            return;
        }
        // SAFETY: the CPU supports avx2, fma and f16c (every vector path is available only
        // where `has_avx2_fma` holds), which is all the target_feature function requires;
        // its memory accesses are bounds-checked inside.
        unsafe { x86::matvec_rows(w, ty, cols, x, y) };
        return;
    }
    let _ = (isa, split);
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

    /// The bits of an f32 lane that hold a pair's odd (high) bf16.
    const ODD_HALF: i32 = 0xFFFF_0000_u32 as i32;

    /// Rows `0..R` of `p` (rows `row_bytes` apart), `blocks` blocks of 32 bf16 each, against
    /// the split input `xs`: each row's sum. A row's 64-byte block is two 256-bit halves;
    /// each half's lanes hold 8 pairs, whose even columns (shifted up) meet split values
    /// `8h..8h + 8` of the block and whose odd ones (masked) values `16 + 8h..24 + 8h`. Each
    /// row adds into one accumulator in the same order whatever `R`, so its result does not
    /// depend on which rows it was run with.
    ///
    /// # Safety
    /// The CPU must have avx2 and fma; `p + r * row_bytes` must be valid for reading
    /// `64 * blocks` bytes for each `r < R`, and `xs` for `32 * blocks` f32.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn split_rows<const R: usize>(
        p: *const u8,
        row_bytes: usize,
        xs: *const f32,
        blocks: usize,
    ) -> [f32; R] {
        let mask = _mm256_set1_epi32(ODD_HALF);
        let mut acc = [_mm256_setzero_ps(); R];
        for b in 0..blocks {
            // SAFETY: block b < blocks of every row and of `xs` (the caller's guarantee);
            // unaligned loads; prefetches never fault.
            unsafe {
                let xb = xs.add(b * 32);
                let xe = [_mm256_loadu_ps(xb), _mm256_loadu_ps(xb.add(8))];
                let xo = [_mm256_loadu_ps(xb.add(16)), _mm256_loadu_ps(xb.add(24))];
                for (k, a) in acc.iter_mut().enumerate() {
                    let q = p.add(k * row_bytes + b * 64);
                    prefetch(q, PREFETCH_BYTES);
                    for h in 0..2 {
                        let v = _mm256_loadu_si256(q.add(32 * h) as *const __m256i);
                        let e = _mm256_castsi256_ps(_mm256_slli_epi32::<16>(v));
                        let o = _mm256_castsi256_ps(_mm256_and_si256(v, mask));
                        *a = _mm256_fmadd_ps(e, xe[h], *a);
                        *a = _mm256_fmadd_ps(o, xo[h], *a);
                    }
                }
            }
        }
        acc.map(|a| hsum(a))
    }

    /// The AVX2 split path of [`super::matvec_rows_on`] for bf16 rows: eight rows a step,
    /// then four, then one, each row's columns past the whole blocks added by
    /// [`super::bf16_tail`].
    ///
    /// # Safety
    /// The CPU must have avx2 and fma.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn matvec_rows_split(w: &[u8], cols: usize, x: &[f32], xs: &[f32], y: &mut [f32]) {
        let rows = y.len();
        let row_bytes = cols * 2;
        let blocks = cols / 32;
        let whole = blocks * 32;
        assert!(w.len() >= rows * row_bytes && x.len() >= cols && xs.len() >= whole);
        let wp = w.as_ptr();
        let xp = xs.as_ptr();
        let tail = |r: usize| super::bf16_tail(&w[r * row_bytes..(r + 1) * row_bytes], x, whole);
        let mut r = 0;
        while r + 8 <= rows {
            // SAFETY: rows r..r+8 lie inside `w` (asserted above), each read for its first
            // 64 * blocks = 2 * whole <= row_bytes bytes; `xs` holds `whole` f32.
            let s = unsafe { split_rows::<8>(wp.add(r * row_bytes), row_bytes, xp, blocks) };
            for (k, sk) in s.into_iter().enumerate() {
                y[r + k] = sk + tail(r + k);
            }
            r += 8;
        }
        if r + 4 <= rows {
            // SAFETY: as above, for rows r..r+4.
            let s = unsafe { split_rows::<4>(wp.add(r * row_bytes), row_bytes, xp, blocks) };
            for (k, sk) in s.into_iter().enumerate() {
                y[r + k] = sk + tail(r + k);
            }
            r += 4;
        }
        while r < rows {
            // SAFETY: as above, for row r.
            let s = unsafe { split_rows::<1>(wp.add(r * row_bytes), row_bytes, xp, blocks) };
            y[r] = s[0] + tail(r);
            r += 1;
        }
    }

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
                WeightFormat::Q8_0 | WeightFormat::Q4_K => _mm256_setzero_ps(),
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
            // SAFETY: row r lies inside `w`; loads stay below vec_cols as above. The sums
            // run in the order of the four-row loop's (16 columns a step in two chains, a
            // last 8 into the first), so a row's result does not depend on its neighbours.
            unsafe {
                let p0 = wp.add(r * row_bytes);
                let (mut a0, mut b0) = (_mm256_setzero_ps(), _mm256_setzero_ps());
                let mut c = 0;
                while c + 16 <= vec_cols {
                    let xv = _mm256_loadu_ps(xp.add(c));
                    let xw = _mm256_loadu_ps(xp.add(c + 8));
                    a0 = _mm256_fmadd_ps(load8(p0.add(c * es), ty), xv, a0);
                    b0 = _mm256_fmadd_ps(load8(p0.add((c + 8) * es), ty), xw, b0);
                    c += 16;
                }
                if c < vec_cols {
                    let xv = _mm256_loadu_ps(xp.add(c));
                    a0 = _mm256_fmadd_ps(load8(p0.add(c * es), ty), xv, a0);
                }
                let mut s = hsum(_mm256_add_ps(a0, b0));
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_util::Rng;

    const PLAIN: [WeightFormat; 3] = [WeightFormat::Bf16, WeightFormat::F16, WeightFormat::F32];

    /// `n` values of varied magnitude stored as `ty`, placed `offset` bytes into the buffer
    /// (so vector loads are misaligned), and the exact values the bytes hold.
    fn stored(rng: &mut Rng, ty: WeightFormat, n: usize, offset: usize) -> (Vec<u8>, Vec<f64>) {
        let mut bytes = vec![0xA5u8; offset];
        let mut values = Vec::with_capacity(n);
        for i in 0..n {
            let v = rng.uniform() * [1e-3f32, 0.05, 1.0, 30.0][i % 4];
            match ty {
                WeightFormat::Bf16 => {
                    let b = half::bf16::from_f32(v);
                    bytes.extend(b.to_le_bytes());
                    values.push(f64::from(b.to_f32()));
                }
                WeightFormat::F16 => {
                    let h = half::f16::from_f32(v);
                    bytes.extend(h.to_le_bytes());
                    values.push(f64::from(h.to_f32()));
                }
                _ => {
                    bytes.extend(v.to_le_bytes());
                    values.push(f64::from(v));
                }
            }
        }
        (bytes, values)
    }

    fn paths() -> Vec<Isa> {
        let isas: Vec<Isa> = Isa::ALL.into_iter().filter(|i| i.available()).collect();
        eprintln!("bf16 matvec paths here: {isas:?}");
        isas
    }

    /// Every path this CPU has, for every plain format, against the exact product (in f64)
    /// of the stored weights and the input: 1 to 9 rows and a few more (every remainder of
    /// the 8-, 4- and 1-row kernels), columns on both sides of the vector widths and block
    /// sizes (8, 16, 32, 64), weight bytes at offsets 0-3. Each result lies within f32
    /// accumulation of the exact sum: at most `cols / 4 + 32` roundings (the scalar path's
    /// four chains are the deepest) of a relative `2^-24` of a partial sum no larger than
    /// `sum |w x|`, and that bound is a small part of `sum |w x|` (a misplaced column or a
    /// lost block moves the result by far more).
    #[test]
    fn every_path_gives_the_exact_product_within_f32_accumulation() {
        let mut rng = Rng(71);
        let isas = paths();
        let row_counts: Vec<usize> = (1..=9).chain([12, 17, 23, 69]).collect();
        let col_counts = [
            1usize, 2, 3, 7, 8, 15, 16, 17, 31, 32, 33, 63, 64, 65, 95, 96, 100, 255, 256, 257,
            2065,
        ];
        for ty in PLAIN {
            for &rows in &row_counts {
                for &cols in &col_counts {
                    let offsets: Vec<usize> = if cols <= 100 {
                        (0..4).collect()
                    } else {
                        vec![(rows + cols) % 4]
                    };
                    for offset in offsets {
                        let (buf, wv) = stored(&mut rng, ty, rows * cols, offset);
                        let w = &buf[offset..];
                        let x: Vec<f32> = (0..cols).map(|_| rng.uniform() * 2.0).collect();
                        for &isa in &isas {
                            let mut y = vec![f32::NAN; rows];
                            matvec_rows_on(isa, w, ty, cols, &x, None, &mut y);
                            for (r, &yr) in y.iter().enumerate() {
                                let row = &wv[r * cols..(r + 1) * cols];
                                let exact: f64 =
                                    row.iter().zip(&x).map(|(w, &x)| w * f64::from(x)).sum();
                                let magnitude: f64 = row
                                    .iter()
                                    .zip(&x)
                                    .map(|(w, &x)| (w * f64::from(x)).abs())
                                    .sum();
                                let depth = (cols / 4 + 32) as f64;
                                let bound = depth * f64::from(f32::EPSILON) / 2.0 * magnitude;
                                let err = (f64::from(yr) - exact).abs();
                                assert!(
                                    err <= bound,
                                    "{isa:?} {ty:?} {rows}x{cols}+{offset} row {r}: {yr} vs \
                                     {exact} (err {err:e} > {bound:e})"
                                );
                                assert!(bound <= 1e-3 * magnitude);
                            }
                        }
                    }
                }
            }
        }
    }

    /// A caller's prepared split input gives the bits of the one made in the call; an input
    /// prepared for other columns is not used.
    #[test]
    fn a_prepared_split_input_gives_the_same_bits() {
        let mut rng = Rng(73);
        for isa in paths() {
            for (rows, cols) in [(13usize, 96usize), (9, 2048), (5, 70)] {
                let (w, _) = stored(&mut rng, WeightFormat::Bf16, rows * cols, 0);
                let x: Vec<f32> = (0..cols).map(|_| rng.uniform()).collect();
                let split = SplitInput::new(&x);
                let (mut a, mut b, mut c) = (vec![0f32; rows], vec![0f32; rows], vec![0f32; rows]);
                matvec_rows_on(isa, &w, WeightFormat::Bf16, cols, &x, None, &mut a);
                matvec_rows_on(isa, &w, WeightFormat::Bf16, cols, &x, Some(&split), &mut b);
                let other = SplitInput::new(&x[..cols - 32]);
                matvec_rows_on(isa, &w, WeightFormat::Bf16, cols, &x, Some(&other), &mut c);
                assert_eq!(a, b, "{isa:?} {rows}x{cols}");
                assert_eq!(a, c, "{isa:?} {rows}x{cols}");
            }
        }
    }

    /// A row's result has the same bits whichever rows it is run with (the 8-, 4- and 1-row
    /// kernels agree), so it does not depend on how a product is split into tasks.
    #[test]
    fn a_rows_result_does_not_depend_on_its_neighbours() {
        let mut rng = Rng(79);
        for isa in paths() {
            for ty in PLAIN {
                for cols in [64usize, 77, 2048] {
                    let rows = 21;
                    let (w, _) = stored(&mut rng, ty, rows * cols, 0);
                    let x: Vec<f32> = (0..cols).map(|_| rng.uniform()).collect();
                    let row_bytes = w.len() / rows;
                    let mut all = vec![0f32; rows];
                    matvec_rows_on(isa, &w, ty, cols, &x, None, &mut all);
                    for start in [1usize, 3, 4, 5, 13, 20] {
                        for end in [start + 1, (start + 4).min(rows), rows] {
                            let mut part = vec![0f32; end - start];
                            let wp = &w[start * row_bytes..end * row_bytes];
                            matvec_rows_on(isa, wp, ty, cols, &x, None, &mut part);
                            assert_eq!(
                                part,
                                all[start..end],
                                "{isa:?} {ty:?} {cols} {start}..{end}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// The split input holds each whole block's even positions, then its odd ones, and
    /// nothing of a partial last block.
    #[test]
    fn the_split_input_holds_evens_then_odds() {
        let x: Vec<f32> = (0..70).map(|i| i as f32).collect();
        let s = SplitInput::new(&x);
        let want: Vec<f32> = (0..2)
            .flat_map(|b| {
                let evens = (0..16).map(move |i| (32 * b + 2 * i) as f32);
                let odds = (0..16).map(move |i| (32 * b + 2 * i + 1) as f32);
                evens.chain(odds)
            })
            .collect();
        assert_eq!(s.values(), &want[..]);
        assert!(SplitInput::new(&x[..31]).values().is_empty());
    }

    /// A NaN or an infinity in a weight, in an even or an odd column (the two halves of a
    /// split lane), reaches its own row's result and no other.
    #[test]
    fn special_weights_stay_in_their_rows() {
        let (rows, cols) = (11usize, 64usize);
        for isa in paths() {
            for col in [6usize, 7, 40, 41] {
                let mut values = vec![0.5f32; rows * cols];
                values[2 * cols + col] = f32::NAN;
                values[9 * cols + col] = f32::INFINITY;
                let w: Vec<u8> = values
                    .iter()
                    .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
                    .collect();
                let x = vec![1f32; cols];
                let mut y = vec![0f32; rows];
                matvec_rows_on(isa, &w, WeightFormat::Bf16, cols, &x, None, &mut y);
                for (r, &yr) in y.iter().enumerate() {
                    match r {
                        2 => assert!(yr.is_nan(), "{isa:?} col {col}"),
                        9 => assert_eq!(yr, f32::INFINITY, "{isa:?} col {col}"),
                        _ => assert_eq!(yr, 32.0, "{isa:?} col {col} row {r}"),
                    }
                }
            }
        }
    }

    /// Every path's name parses back to it (any case), others parse to nothing, and the
    /// process's path is one this CPU has.
    #[test]
    fn path_names_parse() {
        for isa in Isa::ALL {
            assert_eq!(Isa::parse(isa.name()), Some(isa));
            assert_eq!(
                Isa::parse(&format!(" {} ", isa.name().to_uppercase())),
                Some(isa)
            );
        }
        assert_eq!(Isa::parse("avx512"), None);
        assert_eq!(Isa::parse(""), None);
        assert!(Isa::detected().available() && Isa::best().available());
        assert!(Isa::detected().splits() || Isa::detected() == Isa::Scalar);
    }
}
