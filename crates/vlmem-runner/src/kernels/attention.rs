//! Fused scaled dot-product attention on the CPU (flash-attention style): for each head and
//! block of [`BLOCK_Q`] query rows, the keys are streamed [`BLOCK_K`] at a time; the scores
//! of one block are computed with vectorized f32 products, folded into a running maximum and
//! sum per row (online softmax), exponentiated with a polynomial [`exp`], and multiplied into
//! the output rows at once. No `[rows, keys]` score matrix exists beyond one
//! `BLOCK_Q x BLOCK_K` tile per task. Tasks (head, query block) run on [`super::pool::global`].
//!
//! Supports full attention (the vision tower), causal attention after `past` cached keys
//! (query `i` sees keys `0..=past + i`), grouped-query attention (query head `h` reads kv head
//! `h / (heads / kv_heads)`), any head size and any lengths. AVX2 + FMA is chosen at run time
//! ([`Isa::best`]), else a portable scalar loop. (No AVX-512 path: its intrinsics need a newer
//! Rust than the crate's minimum.)
//!
//! Numerics: against exact attention, each score `s = scale * q.k` is an f32 dot product of
//! length `d` whose rounding error is at most `~d u sum|q_c k_c|` (`u = 2^-24`), the same
//! bound as a plain matmul in another order; the exponential is within 2 ulp; the rescaling
//! by `exp(m_old - m_new)` when the running maximum grows adds one rounding per key block
//! (`keys / BLOCK_K` of them); and the output is a convex combination of value rows, so its
//! absolute error is bounded by `max|v| * (|score error| + (keys/BLOCK_K + 4) u)` plus the
//! f32 sum of `keys` products (`keys u max|v|` at worst, far less in practice since the
//! products are summed per block). For unit-sized activations and `d <= 128`, `keys <= 8192`,
//! that is well under `1e-4`, which is what the model-level reference tests require; the
//! unit tests below check `1e-5` against an f64 reference on random data.

#![allow(unsafe_code)]

use crate::error::{Result, RunnerError};

/// Query rows a task owns.
pub const BLOCK_Q: usize = 64;
/// Keys one score tile covers (a multiple of every ISA's lanes times two).
pub const BLOCK_K: usize = 64;
/// Below this many query rows, scores are plain dot products (no transposed keys).
const MIN_ROWS_TRANSPOSED: usize = 4;

/// Shape of one attention call. Tensors are row-major: `q: [heads, n, d]`,
/// `k: [kv_heads, keys, d]`, `v: [kv_heads, keys, dv]`, output `[heads, n, dv]`.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    /// Query heads (batch folded in).
    pub heads: usize,
    /// Key/value heads; divides `heads`.
    pub kv_heads: usize,
    /// Query rows per head.
    pub n: usize,
    /// Keys per head.
    pub keys: usize,
    /// Query/key size.
    pub d: usize,
    /// Value size.
    pub dv: usize,
    /// Factor of the scores (`1 / sqrt(d)` usually).
    pub scale: f32,
    /// `Some(past)`: causal after `past` keys (`keys == past + n`); `None`: full attention.
    pub past: Option<usize>,
}

/// Instruction set a call runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// AVX2 + FMA (8 lanes).
    Avx2,
    /// Portable scalar code.
    Scalar,
}

impl Isa {
    /// The widest set this CPU has.
    pub fn best() -> Isa {
        Isa::available()[0]
    }

    /// Every set this CPU can run, widest first (scalar last).
    pub fn available() -> Vec<Isa> {
        let mut out = Vec::new();
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 =
                std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma");
            if avx2 {
                out.push(Isa::Avx2);
            }
        }
        out.push(Isa::Scalar);
        out
    }

    /// Its name, for logs and benchmarks.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Avx2 => "avx2+fma",
            Isa::Scalar => "scalar",
        }
    }
}

/// Attention on the best instruction set; returns `[heads, n, dv]`.
pub fn attention(q: &[f32], k: &[f32], v: &[f32], shape: &Shape) -> Result<Vec<f32>> {
    attention_on(Isa::best(), q, k, v, shape)
}

/// Attention on `isa`, which must be one of [`Isa::available`] (else an error).
pub fn attention_on(isa: Isa, q: &[f32], k: &[f32], v: &[f32], shape: &Shape) -> Result<Vec<f32>> {
    let s = *shape;
    let bad = |m: String| Err(RunnerError::BadRequest(format!("attention: {m}")));
    if !Isa::available().contains(&isa) {
        return bad(format!("{} is not available on this CPU", isa.name()));
    }
    if s.kv_heads == 0 || !s.heads.is_multiple_of(s.kv_heads) {
        return bad(format!("{} heads over {} kv heads", s.heads, s.kv_heads));
    }
    if let Some(past) = s.past
        && past + s.n != s.keys
    {
        return bad(format!(
            "causal attention of {} queries after {past} tokens over {} keys",
            s.n, s.keys
        ));
    }
    let want = |what: &str, got: usize, want: Option<usize>| match want {
        Some(w) if w == got => Ok(()),
        _ => Err(RunnerError::BadRequest(format!(
            "attention: {what} has {got} values, the shape {s:?} takes {want:?}"
        ))),
    };
    let prod = |a: usize, b: usize, c: usize| a.checked_mul(b).and_then(|x| x.checked_mul(c));
    want("q", q.len(), prod(s.heads, s.n, s.d))?;
    want("k", k.len(), prod(s.kv_heads, s.keys, s.d))?;
    want("v", v.len(), prod(s.kv_heads, s.keys, s.dv))?;
    let out_len = prod(s.heads, s.n, s.dv)
        .ok_or_else(|| RunnerError::BadRequest("attention: output overflows".into()))?;
    let mut out = vec![0f32; out_len];
    if out_len == 0 {
        return Ok(out);
    }
    if s.keys == 0 {
        return bad("no keys".into());
    }
    // Keys transposed per kv head, `[kv_heads, d, keys_pad]` with zero padding, so a score
    // tile is an outer-product update (broadcast a query value, multiply a row of keys).
    let keys_pad = s.keys.next_multiple_of(BLOCK_K);
    let kt = if s.n >= MIN_ROWS_TRANSPOSED {
        let mut kt = vec![0f32; s.kv_heads * s.d * keys_pad];
        if s.d > 0 {
            super::pool::global().for_each(
                kt.chunks_mut(s.d * keys_pad).zip(k.chunks(s.keys * s.d)),
                |(dst, src)| {
                    for (j, row) in src.chunks_exact(s.d).enumerate() {
                        for (c, x) in row.iter().enumerate() {
                            dst[c * keys_pad + j] = *x;
                        }
                    }
                },
            );
        }
        kt
    } else {
        Vec::new()
    };
    let p = Problem {
        q,
        k,
        kt: &kt,
        keys_pad,
        v,
        s,
    };
    let items = out
        .chunks_mut(s.n * s.dv)
        .enumerate()
        .flat_map(|(h, head)| {
            head.chunks_mut(BLOCK_Q * s.dv)
                .enumerate()
                .map(move |(b, o)| (h, b * BLOCK_Q, o))
        });
    super::pool::global().for_each(items, |(h, q0, o)| run_task(isa, &p, h, q0, o));
    Ok(out)
}

struct Problem<'a> {
    q: &'a [f32],
    k: &'a [f32],
    kt: &'a [f32],
    keys_pad: usize,
    v: &'a [f32],
    s: Shape,
}

fn run_task(isa: Isa, p: &Problem, h: usize, q0: usize, out: &mut [f32]) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => {
            // SAFETY: `attention_on` accepts `Avx2` only when AVX2 and FMA were detected.
            unsafe { x86::task_avx2(p, h, q0, out) }
        }
        _ => task(Scalar, p, h, q0, out),
    }
}

/// The vector operations the kernel is written in. Implementations are zero-sized tokens
/// that exist only where their instructions run (see [`run_task`]).
trait Simd: Copy {
    const LANES: usize;
    type V: Copy;
    fn zero(self) -> Self::V;
    fn splat(self, x: f32) -> Self::V;
    /// Loads `LANES` values from the start of `x` (panics if shorter).
    fn load(self, x: &[f32]) -> Self::V;
    /// Stores `LANES` values to the start of `x` (panics if shorter).
    fn store(self, x: &mut [f32], v: Self::V);
    /// `a * b + c`.
    fn fma(self, a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    fn mul(self, a: Self::V, b: Self::V) -> Self::V;
    fn add(self, a: Self::V, b: Self::V) -> Self::V;
    fn sub(self, a: Self::V, b: Self::V) -> Self::V;
    fn max(self, a: Self::V, b: Self::V) -> Self::V;
    fn hsum(self, v: Self::V) -> f32;
    fn hmax(self, v: Self::V) -> f32;
    /// [`exp`] of each lane.
    fn exp(self, x: Self::V) -> Self::V;
}

// Cephes' single-precision exp: x = n ln2 + r with |r| <= ln2/2 (ln2 split in two so the
// reduction is exact to f32), exp(r) by a degree-7 polynomial in r (1 + r + r^2 P5(r)),
// times 2^n built in the exponent bits.
const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
const P0: f32 = 1.987_569_1e-4;
const P1: f32 = 1.398_199_9e-3;
const P2: f32 = 8.333_452e-3;
const P3: f32 = 4.166_579_6e-2;
const P4: f32 = 1.666_666_5e-1;
const P5: f32 = 0.5;
/// Inputs below this give 0 (exp would be subnormal, below 1.7e-38).
const EXP_LO: f32 = -87.0;
/// Inputs above this are clamped (softmax never passes 0).
const EXP_HI: f32 = 88.0;

/// `e^x` to within 2 ulp for `EXP_LO <= x <= EXP_HI`, 0 below (and for -inf).
pub fn exp(x: f32) -> f32 {
    if x.is_nan() || x < EXP_LO {
        return 0.0;
    }
    let x = x.min(EXP_HI);
    let n = (x * LOG2E).round();
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = P0;
    p = p * r + P1;
    p = p * r + P2;
    p = p * r + P3;
    p = p * r + P4;
    p = p * r + P5;
    let y = p * r * r + r + 1.0;
    y * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

#[derive(Clone, Copy)]
struct Scalar;

impl Simd for Scalar {
    const LANES: usize = 1;
    type V = f32;
    #[inline(always)]
    fn zero(self) -> f32 {
        0.0
    }
    #[inline(always)]
    fn splat(self, x: f32) -> f32 {
        x
    }
    #[inline(always)]
    fn load(self, x: &[f32]) -> f32 {
        x[0]
    }
    #[inline(always)]
    fn store(self, x: &mut [f32], v: f32) {
        x[0] = v;
    }
    #[inline(always)]
    fn fma(self, a: f32, b: f32, c: f32) -> f32 {
        a * b + c
    }
    #[inline(always)]
    fn mul(self, a: f32, b: f32) -> f32 {
        a * b
    }
    #[inline(always)]
    fn add(self, a: f32, b: f32) -> f32 {
        a + b
    }
    #[inline(always)]
    fn sub(self, a: f32, b: f32) -> f32 {
        a - b
    }
    #[inline(always)]
    fn max(self, a: f32, b: f32) -> f32 {
        a.max(b)
    }
    #[inline(always)]
    fn hsum(self, v: f32) -> f32 {
        v
    }
    #[inline(always)]
    fn hmax(self, v: f32) -> f32 {
        v
    }
    #[inline(always)]
    fn exp(self, x: f32) -> f32 {
        exp(x)
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::*;
    use std::arch::x86_64::*;

    /// AVX2 + FMA; made only in [`task_avx2`], which runs only where they exist.
    #[derive(Clone, Copy)]
    pub(super) struct Avx2(pub(super) ());

    /// # Safety
    /// The CPU must have AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn task_avx2(p: &Problem, h: usize, q0: usize, out: &mut [f32]) {
        task(Avx2(()), p, h, q0, out)
    }

    impl Simd for Avx2 {
        const LANES: usize = 8;
        type V = __m256;
        #[inline(always)]
        fn zero(self) -> __m256 {
            // SAFETY: an `Avx2` token exists only inside `task_avx2` (AVX2 + FMA detected).
            unsafe { _mm256_setzero_ps() }
        }
        #[inline(always)]
        fn splat(self, x: f32) -> __m256 {
            // SAFETY: as for `zero`.
            unsafe { _mm256_set1_ps(x) }
        }
        #[inline(always)]
        fn load(self, x: &[f32]) -> __m256 {
            let x = &x[..8];
            // SAFETY: AVX2 as for `zero`; `x` has the 8 values read (checked above).
            unsafe { _mm256_loadu_ps(x.as_ptr()) }
        }
        #[inline(always)]
        fn store(self, x: &mut [f32], v: __m256) {
            let x = &mut x[..8];
            // SAFETY: AVX2 as for `zero`; `x` has room for the 8 values (checked above).
            unsafe { _mm256_storeu_ps(x.as_mut_ptr(), v) }
        }
        #[inline(always)]
        fn fma(self, a: __m256, b: __m256, c: __m256) -> __m256 {
            // SAFETY: as for `zero`.
            unsafe { _mm256_fmadd_ps(a, b, c) }
        }
        #[inline(always)]
        fn mul(self, a: __m256, b: __m256) -> __m256 {
            // SAFETY: as for `zero`.
            unsafe { _mm256_mul_ps(a, b) }
        }
        #[inline(always)]
        fn add(self, a: __m256, b: __m256) -> __m256 {
            // SAFETY: as for `zero`.
            unsafe { _mm256_add_ps(a, b) }
        }
        #[inline(always)]
        fn sub(self, a: __m256, b: __m256) -> __m256 {
            // SAFETY: as for `zero`.
            unsafe { _mm256_sub_ps(a, b) }
        }
        #[inline(always)]
        fn max(self, a: __m256, b: __m256) -> __m256 {
            // SAFETY: as for `zero`.
            unsafe { _mm256_max_ps(a, b) }
        }
        #[inline(always)]
        fn hsum(self, v: __m256) -> f32 {
            // SAFETY: as for `zero`.
            unsafe {
                let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
                let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
                let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
                _mm_cvtss_f32(s)
            }
        }
        #[inline(always)]
        fn hmax(self, v: __m256) -> f32 {
            // SAFETY: as for `zero`.
            unsafe {
                let s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
                let s = _mm_max_ps(s, _mm_movehl_ps(s, s));
                let s = _mm_max_ss(s, _mm_shuffle_ps::<1>(s, s));
                _mm_cvtss_f32(s)
            }
        }
        #[inline(always)]
        fn exp(self, x: __m256) -> __m256 {
            // SAFETY: as for `zero`. Same steps as the scalar `exp`.
            unsafe {
                let keep = _mm256_cmp_ps::<_CMP_GE_OQ>(x, _mm256_set1_ps(EXP_LO));
                let x = _mm256_min_ps(
                    _mm256_max_ps(x, _mm256_set1_ps(EXP_LO)),
                    _mm256_set1_ps(EXP_HI),
                );
                let ni = _mm256_cvtps_epi32(_mm256_mul_ps(x, _mm256_set1_ps(LOG2E)));
                let n = _mm256_cvtepi32_ps(ni);
                let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), x);
                let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
                let mut p = _mm256_set1_ps(P0);
                p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(P1));
                p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(P2));
                p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(P3));
                p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(P4));
                p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(P5));
                let y = _mm256_fmadd_ps(
                    _mm256_mul_ps(p, r),
                    r,
                    _mm256_add_ps(r, _mm256_set1_ps(1.0)),
                );
                let pow2 = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(
                    ni,
                    _mm256_set1_epi32(127),
                )));
                _mm256_and_ps(_mm256_mul_ps(y, pow2), keep)
            }
        }
    }
}

/// Dot product of `a` and `b` (same length).
#[inline(always)]
fn dot<S: Simd>(s: S, a: &[f32], b: &[f32]) -> f32 {
    let l = S::LANES;
    let whole = a.len() / (2 * l) * (2 * l);
    let (mut x0, mut x1) = (s.zero(), s.zero());
    let mut c = 0;
    while c < whole {
        x0 = s.fma(s.load(&a[c..]), s.load(&b[c..]), x0);
        x1 = s.fma(s.load(&a[c + l..]), s.load(&b[c + l..]), x1);
        c += 2 * l;
    }
    let mut acc = s.hsum(s.add(x0, x1));
    for (x, y) in a[whole..].iter().zip(&b[whole..]) {
        acc += x * y;
    }
    acc
}

/// Scores of `R` query rows (`q`, rows of `d`) against one key tile of the transposed keys
/// (`kt` from the tile's first key, rows of `stride`): `sc[r * BLOCK_K + j]`, scaled.
#[inline(always)]
fn score_tile<S: Simd, const R: usize>(
    s: S,
    q: &[f32],
    d: usize,
    kt: &[f32],
    stride: usize,
    scale: f32,
    sc: &mut [f32],
) {
    let l = S::LANES;
    let mut j = 0;
    while j < BLOCK_K {
        let mut acc = [[s.zero(); 2]; R];
        for c in 0..d {
            let krow = &kt[c * stride + j..];
            let (k0, k1) = (s.load(krow), s.load(&krow[l..]));
            for (r, a) in acc.iter_mut().enumerate() {
                let qb = s.splat(q[r * d + c]);
                a[0] = s.fma(qb, k0, a[0]);
                a[1] = s.fma(qb, k1, a[1]);
            }
        }
        let sv = s.splat(scale);
        for (r, a) in acc.iter().enumerate() {
            s.store(&mut sc[r * BLOCK_K + j..], s.mul(a[0], sv));
            s.store(&mut sc[r * BLOCK_K + j + l..], s.mul(a[1], sv));
        }
        j += 2 * l;
    }
}

/// `o[r] += p[r] V` for `R` rows over `nk` value rows, columns `c0 .. c0 + NV * LANES`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn pv_tile<S: Simd, const R: usize, const NV: usize>(
    s: S,
    p: &[f32],
    v: &[f32],
    nk: usize,
    dv: usize,
    c0: usize,
    o: &mut [f32],
) {
    let l = S::LANES;
    let mut acc = [[s.zero(); NV]; R];
    for (r, a) in acc.iter_mut().enumerate() {
        for (t, x) in a.iter_mut().enumerate() {
            *x = s.load(&o[r * dv + c0 + t * l..]);
        }
    }
    for j in 0..nk {
        let vrow = &v[j * dv + c0..];
        let mut vv = [s.zero(); NV];
        for (t, x) in vv.iter_mut().enumerate() {
            *x = s.load(&vrow[t * l..]);
        }
        for (r, a) in acc.iter_mut().enumerate() {
            let pb = s.splat(p[r * BLOCK_K + j]);
            for (x, y) in a.iter_mut().zip(&vv) {
                *x = s.fma(pb, *y, *x);
            }
        }
    }
    for (r, a) in acc.iter().enumerate() {
        for (t, x) in a.iter().enumerate() {
            s.store(&mut o[r * dv + c0 + t * l..], *x);
        }
    }
}

/// `o[r] += p[r] V` for `R` rows, all `dv` columns.
#[inline(always)]
fn pv_rows<S: Simd, const R: usize>(
    s: S,
    p: &[f32],
    v: &[f32],
    nk: usize,
    dv: usize,
    o: &mut [f32],
) {
    let l = S::LANES;
    let mut c0 = 0;
    while c0 + 4 * l <= dv {
        pv_tile::<S, R, 4>(s, p, v, nk, dv, c0, o);
        c0 += 4 * l;
    }
    while c0 + l <= dv {
        pv_tile::<S, R, 1>(s, p, v, nk, dv, c0, o);
        c0 += l;
    }
    for c in c0..dv {
        for r in 0..R {
            let mut acc = o[r * dv + c];
            for j in 0..nk {
                acc += p[r * BLOCK_K + j] * v[j * dv + c];
            }
            o[r * dv + c] = acc;
        }
    }
}

/// One task: query rows `q0 .. q0 + out.len() / dv` of head `h`, into `out` (zeroed).
#[inline(always)]
fn task<S: Simd>(s: S, p: &Problem, h: usize, q0: usize, out: &mut [f32]) {
    let Shape {
        heads,
        kv_heads,
        n,
        keys,
        d,
        dv,
        scale,
        past,
    } = p.s;
    let l = S::LANES;
    let bq = out.len() / dv.max(1);
    let kvh = h / (heads / kv_heads);
    let q = &p.q[(h * n + q0) * d..][..bq * d];
    let k = &p.k[kvh * keys * d..][..keys * d];
    let v = &p.v[kvh * keys * dv..][..keys * dv];
    // Keys the block's last row sees; later tiles are masked for every row.
    let limit = past.map_or(keys, |past| (past + q0 + bq).min(keys));
    let mut m = vec![f32::NEG_INFINITY; bq];
    let mut sum = vec![0f32; bq];
    let mut sc = vec![0f32; bq * BLOCK_K];
    let mut k0 = 0;
    while k0 < limit {
        let nk = BLOCK_K.min(limit - k0);
        // Scores of the tile.
        if n >= MIN_ROWS_TRANSPOSED {
            let kt = &p.kt[kvh * d * p.keys_pad + k0..];
            let mut i = 0;
            while i + 4 <= bq {
                score_tile::<S, 4>(
                    s,
                    &q[i * d..],
                    d,
                    kt,
                    p.keys_pad,
                    scale,
                    &mut sc[i * BLOCK_K..],
                );
                i += 4;
            }
            while i < bq {
                score_tile::<S, 1>(
                    s,
                    &q[i * d..],
                    d,
                    kt,
                    p.keys_pad,
                    scale,
                    &mut sc[i * BLOCK_K..],
                );
                i += 1;
            }
        } else {
            for i in 0..bq {
                let qi = &q[i * d..][..d];
                for j in 0..nk {
                    sc[i * BLOCK_K + j] = dot(s, qi, &k[(k0 + j) * d..][..d]) * scale;
                }
            }
        }
        // Online softmax: fold the tile into each row's maximum and sum, rescale its output.
        for i in 0..bq {
            let row = &mut sc[i * BLOCK_K..][..BLOCK_K];
            let valid = past.map_or(nk, |past| (past + q0 + i + 1).saturating_sub(k0).min(nk));
            if valid == 0 {
                row.fill(0.0);
                continue;
            }
            row[valid..].fill(f32::NEG_INFINITY);
            let mut mx = s.splat(f32::NEG_INFINITY);
            for c in (0..BLOCK_K).step_by(l) {
                mx = s.max(mx, s.load(&row[c..]));
            }
            let m_new = m[i].max(s.hmax(mx));
            let alpha = exp(m[i] - m_new);
            let mv = s.splat(m_new);
            let mut acc = s.zero();
            for c in (0..BLOCK_K).step_by(l) {
                let e = s.exp(s.sub(s.load(&row[c..]), mv));
                s.store(&mut row[c..], e);
                acc = s.add(acc, e);
            }
            sum[i] = sum[i] * alpha + s.hsum(acc);
            m[i] = m_new;
            if alpha != 1.0 {
                out[i * dv..][..dv].iter_mut().for_each(|x| *x *= alpha);
            }
        }
        // Output += P V for the tile's values.
        let vt = &v[k0 * dv..][..nk * dv];
        let mut i = 0;
        while i + 2 <= bq {
            pv_rows::<S, 2>(s, &sc[i * BLOCK_K..], vt, nk, dv, &mut out[i * dv..]);
            i += 2;
        }
        if i < bq {
            pv_rows::<S, 1>(s, &sc[i * BLOCK_K..], vt, nk, dv, &mut out[i * dv..]);
        }
        k0 += BLOCK_K;
    }
    for (row, z) in out.chunks_exact_mut(dv.max(1)).zip(&sum) {
        let inv = 1.0 / z;
        row.iter_mut().for_each(|x| *x *= inv);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(len: usize, seed: u32) -> Vec<f32> {
        (0..len as u32)
            .map(|i| {
                let x = i
                    .wrapping_mul(2_654_435_761)
                    .wrapping_add(seed.wrapping_mul(97))
                    >> 8;
                (x % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    /// Scores, softmax, then P V, all in f64 on the whole score matrix.
    fn reference(q: &[f32], k: &[f32], v: &[f32], s: &Shape) -> Vec<f64> {
        let mut out = vec![0f64; s.heads * s.n * s.dv];
        let groups = s.heads / s.kv_heads;
        for h in 0..s.heads {
            let kvh = h / groups;
            for i in 0..s.n {
                let seen = s.past.map_or(s.keys, |p| p + i + 1);
                let qi = &q[(h * s.n + i) * s.d..][..s.d];
                let sc: Vec<f64> = (0..seen)
                    .map(|j| {
                        let kj = &k[(kvh * s.keys + j) * s.d..][..s.d];
                        let dot: f64 = qi.iter().zip(kj).map(|(a, b)| *a as f64 * *b as f64).sum();
                        dot * s.scale as f64
                    })
                    .collect();
                let mx = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = sc.iter().map(|x| (x - mx).exp()).sum();
                for c in 0..s.dv {
                    out[(h * s.n + i) * s.dv + c] = (0..seen)
                        .map(|j| (sc[j] - mx).exp() / z * v[(kvh * s.keys + j) * s.dv + c] as f64)
                        .sum();
                }
            }
        }
        out
    }

    #[test]
    fn exp_is_within_two_ulp_of_f64() {
        let mut worst = 0f64;
        let steps = 2_000_000;
        for i in 0..=steps {
            let x = EXP_LO * i as f32 / steps as f32;
            let want = (x as f64).exp();
            let got = exp(x) as f64;
            let ulp = (want as f32).abs() * f32::EPSILON;
            worst = worst.max((got - want).abs() / ulp as f64);
        }
        assert!(worst <= 2.0, "scalar exp: {worst} ulp");
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(0.0), 1.0);
    }

    /// The vector exps against f64 through the kernel's own lanes.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn vector_exp_is_within_two_ulp_of_f64() {
        #[target_feature(enable = "avx2,fma")]
        fn avx2(xs: &[f32], ys: &mut [f32]) {
            let s = x86::Avx2(());
            for (x, y) in xs.chunks_exact(8).zip(ys.chunks_exact_mut(8)) {
                s.store(y, s.exp(s.load(x)));
            }
        }
        let steps = 1 << 21;
        let mut xs: Vec<f32> = (0..steps)
            .map(|i| EXP_LO * i as f32 / steps as f32)
            .collect();
        xs.extend([
            0.0,
            -0.0,
            f32::NEG_INFINITY,
            -90.0,
            -87.5,
            -1e-8,
            -0.346,
            -0.347,
        ]);
        xs.resize(xs.len().next_multiple_of(8), -1.0);
        for isa in Isa::available() {
            let mut ys = vec![f32::NAN; xs.len()];
            match isa {
                // SAFETY: `Isa::available` detected the features `avx2` enables.
                Isa::Avx2 => unsafe { avx2(&xs, &mut ys) },
                Isa::Scalar => xs.iter().zip(&mut ys).for_each(|(x, y)| *y = exp(*x)),
            }
            let mut worst = 0f64;
            for (x, y) in xs.iter().zip(&ys) {
                if *x < EXP_LO {
                    assert_eq!(*y, 0.0, "{}: exp({x})", isa.name());
                    continue;
                }
                let want = (*x as f64).exp();
                let ulp = (want as f32).abs() * f32::EPSILON;
                worst = worst.max((*y as f64 - want).abs() / ulp as f64);
            }
            assert!(worst <= 2.0, "{}: {worst} ulp", isa.name());
        }
    }

    #[test]
    fn matches_f64_reference_on_every_isa() {
        let mut cases = 0;
        for &(n, keys_full) in &[
            (1, 1),
            (3, 3),
            (17, 17),
            (100, 100),
            (257, 257),
            (3, 100),
            (100, 17),
        ] {
            for d in [64, 128] {
                for (heads, groups) in [(1, 1), (3, 1), (2, 2), (6, 2)] {
                    for past in [None, Some(0), Some(5)] {
                        let keys = match past {
                            Some(p) => p + n,
                            None => keys_full,
                        };
                        let kv_heads = heads / groups;
                        let s = Shape {
                            heads,
                            kv_heads,
                            n,
                            keys,
                            d,
                            dv: d,
                            scale: (d as f32).powf(-0.5) * 2.0,
                            past,
                        };
                        let q = values(heads * n * d, 1);
                        let k = values(kv_heads * keys * d, 2);
                        let v = values(kv_heads * keys * d, 3);
                        let want = reference(&q, &k, &v, &s);
                        for isa in Isa::available() {
                            let got = attention_on(isa, &q, &k, &v, &s).unwrap();
                            let err = got
                                .iter()
                                .zip(&want)
                                .map(|(a, b)| (*a as f64 - b).abs())
                                .fold(0f64, f64::max);
                            assert!(err < 1e-5, "{} {s:?}: max-abs {err}", isa.name());
                        }
                        cases += 1;
                    }
                }
            }
        }
        assert_eq!(cases, 7 * 2 * 4 * 3);
    }

    #[test]
    fn odd_head_sizes_and_one_key() {
        for d in [1, 7, 24, 72, 100] {
            for (n, keys, past) in [
                (5, 1, None),
                (9, 130, None),
                (4, 4, Some(0)),
                (2, 9, Some(7)),
            ] {
                let s = Shape {
                    heads: 2,
                    kv_heads: 1,
                    n,
                    keys,
                    d,
                    dv: d + 3,
                    scale: 0.3,
                    past,
                };
                let q = values(2 * n * d, 4);
                let k = values(keys * d, 5);
                let v = values(keys * (d + 3), 6);
                let want = reference(&q, &k, &v, &s);
                for isa in Isa::available() {
                    let got = attention_on(isa, &q, &k, &v, &s).unwrap();
                    for (a, b) in got.iter().zip(&want) {
                        assert!(
                            (*a as f64 - b).abs() < 1e-5,
                            "{} {s:?}: {a} vs {b}",
                            isa.name()
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn rejects_bad_shapes() {
        let s = Shape {
            heads: 3,
            kv_heads: 2,
            n: 1,
            keys: 1,
            d: 1,
            dv: 1,
            scale: 1.0,
            past: None,
        };
        assert!(attention(&[0.0; 3], &[0.0; 2], &[0.0; 2], &s).is_err());
        let s = Shape {
            kv_heads: 1,
            past: Some(1),
            ..s
        };
        let err = attention(&[0.0; 3], &[0.0; 1], &[0.0; 1], &s).unwrap_err();
        assert!(
            err.to_string()
                .contains("1 queries after 1 tokens over 1 keys"),
            "{err}"
        );
        let s = Shape { past: None, ..s };
        assert!(attention(&[0.0; 2], &[0.0; 1], &[0.0; 1], &s).is_err());
    }
}
