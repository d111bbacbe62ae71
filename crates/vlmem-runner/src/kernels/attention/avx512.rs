//! The AVX-512 kernels of [`super`]'s fused attention: three micro-kernels on 16-lane f32
//! vectors, each over one tile of [`super::BLOCK_K`] keys and [`ROWS`] query rows.
//!
//! - [`Kernels::scores`]: `S = scale Q Kt` for the rows against a tile of keys transposed
//!   (`d` rows of 64 keys, 256 bytes each): the 6 x 64 scores stay in 24 registers while
//!   each step loads one row of the keys (4 vectors) and broadcasts each query's value once
//!   (10 loads for 24 multiply-adds);
//! - [`Kernels::softmax`]: the online softmax's update of every row of a tile of scores: the
//!   row's maximum (folded with the running one), `alpha = exp(m_old - m_new)`, the scores
//!   replaced by `exp(s - m_new)`, and the running sum (16 partial sums a row, added up once
//!   at the end) scaled by `alpha` plus the new ones;
//! - [`Kernels::pv`]: `O = alpha O + P V` for the rows over 64 (or 16) value columns: the
//!   output tile stays in registers while each step loads one value row and broadcasts each
//!   row's probability (the rescale by `alpha` is folded into the load of the output).
//!
//! The exponential is [`super::exp`]'s: the same reduction `x = n ln2 + r` and polynomial,
//! `2^n` applied with `vscalefps`, 0 below [`super::EXP_LO`] (and for NaN, which a row of
//! `-inf` gives); it takes `x <= 0` (softmax's arguments).
//!
//! The loops are inline assembly: the AVX-512 intrinsics and target features are newer than
//! the workspace's minimum Rust (1.88). Each kernel is a function of its own
//! (`#[inline(never)]`) whose body is the assembly alone, so no value of the caller lives in
//! a vector or mask register across it (the ABI makes every vector register caller-saved:
//! zmm16-31 and k1-k7, which the blocks use without naming them as operands, as
//! [`super::super::gemm::x86`] does). Each safe wrapper checks the lengths its assembly
//! reads and writes.

use super::{EXP_LO, LN2_HI, LN2_LO, LOG2E, P0, P1, P2, P3, P4, P5};
use std::arch::asm;

/// Query rows of one micro-tile.
pub const ROWS: usize = 6;
/// Keys of one tile (the scores' row length) and value columns of one [`Kernels::pv`] pass.
pub const TILE: usize = 64;
/// Partial sums per row that [`Kernels::softmax`] keeps.
pub const SUM_LANES: usize = 16;

const _: () = assert!(TILE == super::BLOCK_K);

/// The exponential's constants in the order the assembly reads them (byte offsets 0-40).
static EXP_CONSTS: [f32; 11] = [LOG2E, LN2_HI, LN2_LO, P0, P1, P2, P3, P4, P5, 1.0, EXP_LO];

/// Proof that the CPU runs the kernels: AVX-512 F, BW, VL and DQ with AVX2 + FMA
/// ([`super::super::gemm::x86::has_avx512`]); only [`Kernels::new`] makes one.
#[derive(Clone, Copy, Debug)]
pub struct Kernels(());

impl Kernels {
    /// The kernels, where this CPU has them.
    pub fn new() -> Option<Kernels> {
        super::super::gemm::x86::has_avx512().then_some(Kernels(()))
    }

    /// `s[r * 64 + j] = scale * sum_c q[r * qs + c] * kt[c * 64 + j]` for `r < 6`, `j < 64`,
    /// `c < d`.
    pub fn scores(self, q: &[f32], qs: usize, kt: &[f32], d: usize, scale: f32, s: &mut [f32]) {
        assert!(qs >= d && q.len() >= (ROWS - 1) * qs + d);
        assert!(kt.len() >= d * TILE && s.len() >= ROWS * TILE);
        // SAFETY: the CPU has AVX-512 F (`self`); the block reads `q[r * qs + c]` and
        // `kt[..d * 64]` and writes `s[..384]`, all checked above.
        unsafe { scores_raw(q.as_ptr(), qs * 4, kt.as_ptr(), d, &scale, s.as_mut_ptr()) }
    }

    /// The online softmax's step for `rows` rows of 64 scores (`s`, rows 64 apart, `-inf`
    /// where masked): per row `m_new = max(m[r], max s)`, `alpha[r] = exp(m[r] - m_new)`,
    /// `s = exp(s - m_new)`, `l[16 r..][..16] = alpha[r] l[..] + (the row's 4 vectors added)`,
    /// `m[r] = m_new`. A row of `-inf` after `m[r] = -inf` gives zeros and `alpha = 0`.
    /// `alpha` holds `rows` rounded up to a multiple of 16 (the values past `rows` are
    /// overwritten). The maxima are found for every row first, then the alphas 16 rows at a
    /// time, then the exponentials: each row's exponentials wait on no long chain.
    pub fn softmax(
        self,
        s: &mut [f32],
        rows: usize,
        m: &mut [f32],
        l: &mut [f32],
        alpha: &mut [f32],
    ) {
        assert!(s.len() >= rows * TILE && m.len() >= rows);
        assert!(alpha.len() >= rows.next_multiple_of(SUM_LANES) && l.len() >= rows * SUM_LANES);
        // SAFETY: the CPU has AVX-512 F (`self`); the block reads and writes `s[..64 rows]`,
        // `m[..rows]`, `alpha[..rows rounded up to 16]`, `l[..16 rows]` (checked above) and
        // reads the 11 constants.
        unsafe {
            softmax_raw(
                s.as_mut_ptr(),
                rows,
                m.as_mut_ptr(),
                l.as_mut_ptr(),
                alpha.as_mut_ptr(),
                EXP_CONSTS.as_ptr(),
            )
        }
    }

    /// `o[r * os + c] = alpha[r] o[r * os + c] + sum_j p[r * 64 + j] v[j * vs + c]` for
    /// `r < 6`, `j < nk`, and `c < 64` (`wide`) or `c < 16`.
    #[allow(clippy::too_many_arguments)]
    pub fn pv(
        self,
        wide: bool,
        p: &[f32],
        v: &[f32],
        vs: usize,
        nk: usize,
        alpha: &[f32],
        o: &mut [f32],
        os: usize,
    ) {
        let cols = if wide { TILE } else { SUM_LANES };
        assert!(nk <= TILE && p.len() >= (ROWS - 1) * TILE + nk && alpha.len() >= ROWS);
        assert!(vs >= cols && (nk == 0 || v.len() >= (nk - 1) * vs + cols));
        assert!(os >= cols && o.len() >= (ROWS - 1) * os + cols);
        let (pp, vp, ap, op) = (p.as_ptr(), v.as_ptr(), alpha.as_ptr(), o.as_mut_ptr());
        // SAFETY: the CPU has AVX-512 F (`self`); the block reads `p[r * 64 + j]`,
        // `v[j * vs..][..cols]` (`j < nk`), `alpha[..6]` and reads and writes
        // `o[r * os..][..cols]` (`r < 6`), all checked above.
        unsafe {
            if wide {
                pv64_raw(pp, vp, vs * 4, nk, ap, op, os * 4)
            } else {
                pv16_raw(pp, vp, vs * 4, nk, ap, op, os * 4)
            }
        }
    }
}

/// Broadcasts the f32 at `$addr` into `zmm$t` and multiplies it into four accumulators
/// against the four vectors in zmm24-27.
#[rustfmt::skip]
macro_rules! bcast4 {
    ($addr:literal, $t:literal, $a0:literal, $a1:literal, $a2:literal, $a3:literal) => {
        concat!(
            "vbroadcastss zmm", $t, ", dword ptr [", $addr, "]\n",
            "vfmadd231ps zmm", $a0, ", zmm", $t, ", zmm24\n",
            "vfmadd231ps zmm", $a1, ", zmm", $t, ", zmm25\n",
            "vfmadd231ps zmm", $a2, ", zmm", $t, ", zmm26\n",
            "vfmadd231ps zmm", $a3, ", zmm", $t, ", zmm27"
        )
    };
}

/// As [`bcast4!`] against the one vector in zmm24.
#[rustfmt::skip]
macro_rules! bcast1 {
    ($addr:literal, $t:literal, $a:literal) => {
        concat!(
            "vbroadcastss zmm", $t, ", dword ptr [", $addr, "]\n",
            "vfmadd231ps zmm", $a, ", zmm", $t, ", zmm24"
        )
    };
}

/// Scales accumulator `zmm$a` by zmm28 and stores it at `{s} + $off` bytes.
#[rustfmt::skip]
macro_rules! store_scaled {
    ($a:literal, $off:literal) => {
        concat!(
            "vmulps zmm", $a, ", zmm", $a, ", zmm28\n",
            "vmovups zmmword ptr [{s}+", $off, "], zmm", $a
        )
    };
}

/// The vector registers every block writes, declared through their ymm halves (zmm16-31
/// and the mask registers: see the module doc).
macro_rules! kernel_asm {
    ($($body:expr),* $(,)?; $($operands:tt)*) => {
        asm!(
            $($body,)*
            "vzeroupper",
            $($operands)*
            out("ymm0") _, out("ymm1") _, out("ymm2") _, out("ymm3") _,
            out("ymm4") _, out("ymm5") _, out("ymm6") _, out("ymm7") _,
            out("ymm8") _, out("ymm9") _, out("ymm10") _, out("ymm11") _,
            out("ymm12") _, out("ymm13") _, out("ymm14") _, out("ymm15") _,
            options(nostack),
        )
    };
}

/// # Safety
/// AVX-512 F; `q + r * qs` bytes valid for reading `d` f32 for `r < 6`, `kt` for `64 d`
/// f32, `scale` for one, `s` for writing 384.
#[inline(never)]
unsafe fn scores_raw(
    q: *const f32,
    qs: usize,
    kt: *const f32,
    d: usize,
    scale: *const f32,
    s: *mut f32,
) {
    // SAFETY: the caller guarantees every access and AVX-512 F.
    unsafe {
        kernel_asm!(
            "vpxord zmm0, zmm0, zmm0", "vpxord zmm1, zmm1, zmm1",
            "vpxord zmm2, zmm2, zmm2", "vpxord zmm3, zmm3, zmm3",
            "vpxord zmm4, zmm4, zmm4", "vpxord zmm5, zmm5, zmm5",
            "vpxord zmm6, zmm6, zmm6", "vpxord zmm7, zmm7, zmm7",
            "vpxord zmm8, zmm8, zmm8", "vpxord zmm9, zmm9, zmm9",
            "vpxord zmm10, zmm10, zmm10", "vpxord zmm11, zmm11, zmm11",
            "vpxord zmm12, zmm12, zmm12", "vpxord zmm13, zmm13, zmm13",
            "vpxord zmm14, zmm14, zmm14", "vpxord zmm15, zmm15, zmm15",
            "vpxord zmm16, zmm16, zmm16", "vpxord zmm17, zmm17, zmm17",
            "vpxord zmm18, zmm18, zmm18", "vpxord zmm19, zmm19, zmm19",
            "vpxord zmm20, zmm20, zmm20", "vpxord zmm21, zmm21, zmm21",
            "vpxord zmm22, zmm22, zmm22", "vpxord zmm23, zmm23, zmm23",
            "lea {q3}, [{q}+{qs}*2]",
            "add {q3}, {qs}",
            "test {n}, {n}",
            "jz 3f",
            ".p2align 5",
            "2:",
            "vmovups zmm24, zmmword ptr [{kt}]",
            "vmovups zmm25, zmmword ptr [{kt}+64]",
            "vmovups zmm26, zmmword ptr [{kt}+128]",
            "vmovups zmm27, zmmword ptr [{kt}+192]",
            bcast4!("{q}", 28, 0, 1, 2, 3),
            bcast4!("{q}+{qs}", 29, 4, 5, 6, 7),
            bcast4!("{q}+{qs}*2", 28, 8, 9, 10, 11),
            bcast4!("{q3}", 29, 12, 13, 14, 15),
            bcast4!("{q3}+{qs}", 28, 16, 17, 18, 19),
            bcast4!("{q3}+{qs}*2", 29, 20, 21, 22, 23),
            "add {q}, 4",
            "add {q3}, 4",
            "add {kt}, 256",
            "dec {n}",
            "jnz 2b",
            "3:",
            "vbroadcastss zmm28, dword ptr [{scale}]",
            store_scaled!(0, 0), store_scaled!(1, 64), store_scaled!(2, 128),
            store_scaled!(3, 192), store_scaled!(4, 256), store_scaled!(5, 320),
            store_scaled!(6, 384), store_scaled!(7, 448), store_scaled!(8, 512),
            store_scaled!(9, 576), store_scaled!(10, 640), store_scaled!(11, 704),
            store_scaled!(12, 768), store_scaled!(13, 832), store_scaled!(14, 896),
            store_scaled!(15, 960), store_scaled!(16, 1024), store_scaled!(17, 1088),
            store_scaled!(18, 1152), store_scaled!(19, 1216), store_scaled!(20, 1280),
            store_scaled!(21, 1344), store_scaled!(22, 1408), store_scaled!(23, 1472);
            q = inout(reg) q => _,
            q3 = out(reg) _,
            qs = in(reg) qs,
            kt = inout(reg) kt => _,
            n = inout(reg) d => _,
            scale = in(reg) scale,
            s = in(reg) s,
        )
    }
}

/// Loads row `r`'s four output vectors at `$base` scaled by its `alpha` (at `{al} + $ao`)
/// into `zmm$a0..`.
#[rustfmt::skip]
macro_rules! load_scaled4 {
    ($base:literal, $ao:literal, $a0:literal, $a1:literal, $a2:literal, $a3:literal) => {
        concat!(
            "vbroadcastss zmm28, dword ptr [{al}+", $ao, "]\n",
            "vmulps zmm", $a0, ", zmm28, zmmword ptr [", $base, "]\n",
            "vmulps zmm", $a1, ", zmm28, zmmword ptr [", $base, "+64]\n",
            "vmulps zmm", $a2, ", zmm28, zmmword ptr [", $base, "+128]\n",
            "vmulps zmm", $a3, ", zmm28, zmmword ptr [", $base, "+192]"
        )
    };
}

/// Stores `zmm$a0..` (four vectors) at `$base`.
#[rustfmt::skip]
macro_rules! store4 {
    ($base:literal, $a0:literal, $a1:literal, $a2:literal, $a3:literal) => {
        concat!(
            "vmovups zmmword ptr [", $base, "], zmm", $a0, "\n",
            "vmovups zmmword ptr [", $base, "+64], zmm", $a1, "\n",
            "vmovups zmmword ptr [", $base, "+128], zmm", $a2, "\n",
            "vmovups zmmword ptr [", $base, "+192], zmm", $a3
        )
    };
}

/// # Safety
/// AVX-512 F; `p + 256 r` bytes valid for reading `nk` f32 (`r < 6`), `v + j vs` bytes for
/// reading 64 (`j < nk`), `alpha` for 6, `o + r os` bytes for reading and writing 64.
#[inline(never)]
unsafe fn pv64_raw(
    p: *const f32,
    v: *const f32,
    vs: usize,
    nk: usize,
    alpha: *const f32,
    o: *mut f32,
    os: usize,
) {
    // SAFETY: the caller guarantees every access and AVX-512 F.
    unsafe {
        kernel_asm!(
            "lea {o3}, [{o}+{os}*2]",
            "add {o3}, {os}",
            load_scaled4!("{o}", 0, 0, 1, 2, 3),
            load_scaled4!("{o}+{os}", 4, 4, 5, 6, 7),
            load_scaled4!("{o}+{os}*2", 8, 8, 9, 10, 11),
            load_scaled4!("{o3}", 12, 12, 13, 14, 15),
            load_scaled4!("{o3}+{os}", 16, 16, 17, 18, 19),
            load_scaled4!("{o3}+{os}*2", 20, 20, 21, 22, 23),
            "test {n}, {n}",
            "jz 3f",
            ".p2align 5",
            "2:",
            "vmovups zmm24, zmmword ptr [{v}]",
            "vmovups zmm25, zmmword ptr [{v}+64]",
            "vmovups zmm26, zmmword ptr [{v}+128]",
            "vmovups zmm27, zmmword ptr [{v}+192]",
            bcast4!("{p}", 28, 0, 1, 2, 3),
            bcast4!("{p}+256", 29, 4, 5, 6, 7),
            bcast4!("{p}+512", 28, 8, 9, 10, 11),
            bcast4!("{p}+768", 29, 12, 13, 14, 15),
            bcast4!("{p}+1024", 28, 16, 17, 18, 19),
            bcast4!("{p}+1280", 29, 20, 21, 22, 23),
            "add {p}, 4",
            "add {v}, {vs}",
            "dec {n}",
            "jnz 2b",
            "3:",
            store4!("{o}", 0, 1, 2, 3),
            store4!("{o}+{os}", 4, 5, 6, 7),
            store4!("{o}+{os}*2", 8, 9, 10, 11),
            store4!("{o3}", 12, 13, 14, 15),
            store4!("{o3}+{os}", 16, 17, 18, 19),
            store4!("{o3}+{os}*2", 20, 21, 22, 23);
            p = inout(reg) p => _,
            v = inout(reg) v => _,
            vs = in(reg) vs,
            n = inout(reg) nk => _,
            al = in(reg) alpha,
            o = in(reg) o,
            o3 = out(reg) _,
            os = in(reg) os,
        )
    }
}

/// Loads row `r`'s output vector at `$base` scaled by its `alpha` (at `{al} + $ao`).
#[rustfmt::skip]
macro_rules! load_scaled1 {
    ($base:literal, $ao:literal, $a:literal) => {
        concat!(
            "vbroadcastss zmm28, dword ptr [{al}+", $ao, "]\n",
            "vmulps zmm", $a, ", zmm28, zmmword ptr [", $base, "]"
        )
    };
}

/// # Safety
/// As [`pv64_raw`] for 16 columns.
#[inline(never)]
unsafe fn pv16_raw(
    p: *const f32,
    v: *const f32,
    vs: usize,
    nk: usize,
    alpha: *const f32,
    o: *mut f32,
    os: usize,
) {
    // SAFETY: the caller guarantees every access and AVX-512 F.
    unsafe {
        kernel_asm!(
            "lea {o3}, [{o}+{os}*2]",
            "add {o3}, {os}",
            load_scaled1!("{o}", 0, 0),
            load_scaled1!("{o}+{os}", 4, 1),
            load_scaled1!("{o}+{os}*2", 8, 2),
            load_scaled1!("{o3}", 12, 3),
            load_scaled1!("{o3}+{os}", 16, 4),
            load_scaled1!("{o3}+{os}*2", 20, 5),
            "test {n}, {n}",
            "jz 3f",
            ".p2align 5",
            "2:",
            "vmovups zmm24, zmmword ptr [{v}]",
            bcast1!("{p}", 28, 0),
            bcast1!("{p}+256", 29, 1),
            bcast1!("{p}+512", 28, 2),
            bcast1!("{p}+768", 29, 3),
            bcast1!("{p}+1024", 28, 4),
            bcast1!("{p}+1280", 29, 5),
            "add {p}, 4",
            "add {v}, {vs}",
            "dec {n}",
            "jnz 2b",
            "3:",
            "vmovups zmmword ptr [{o}], zmm0",
            "vmovups zmmword ptr [{o}+{os}], zmm1",
            "vmovups zmmword ptr [{o}+{os}*2], zmm2",
            "vmovups zmmword ptr [{o3}], zmm3",
            "vmovups zmmword ptr [{o3}+{os}], zmm4",
            "vmovups zmmword ptr [{o3}+{os}*2], zmm5";
            p = inout(reg) p => _,
            v = inout(reg) v => _,
            vs = in(reg) vs,
            n = inout(reg) nk => _,
            al = in(reg) alpha,
            o = in(reg) o,
            o3 = out(reg) _,
            os = in(reg) os,
        )
    }
}

/// `zmm$p = exp(zmm$x)` ([`super::exp`]'s steps; 0 where `x < EXP_LO` or NaN, through mask
/// `k$k`); `zmm$n` and `zmm$r` are scratch, `zmm$x` is overwritten. Constants at `{c}`.
#[rustfmt::skip]
macro_rules! exp16 {
    ($x:literal, $n:literal, $r:literal, $p:literal, $k:literal) => {
        concat!(
            "vmulps zmm", $n, ", zmm", $x, ", dword ptr [{c}]{{1to16}}\n",
            "vrndscaleps zmm", $n, ", zmm", $n, ", 8\n",
            "vcmpps k", $k, ", zmm", $x, ", dword ptr [{c}+40]{{1to16}}, 29\n",
            "vmovaps zmm", $r, ", zmm", $x, "\n",
            "vfnmadd231ps zmm", $r, ", zmm", $n, ", dword ptr [{c}+4]{{1to16}}\n",
            "vfnmadd231ps zmm", $r, ", zmm", $n, ", dword ptr [{c}+8]{{1to16}}\n",
            "vbroadcastss zmm", $p, ", dword ptr [{c}+12]\n",
            "vfmadd213ps zmm", $p, ", zmm", $r, ", dword ptr [{c}+16]{{1to16}}\n",
            "vfmadd213ps zmm", $p, ", zmm", $r, ", dword ptr [{c}+20]{{1to16}}\n",
            "vfmadd213ps zmm", $p, ", zmm", $r, ", dword ptr [{c}+24]{{1to16}}\n",
            "vfmadd213ps zmm", $p, ", zmm", $r, ", dword ptr [{c}+28]{{1to16}}\n",
            "vfmadd213ps zmm", $p, ", zmm", $r, ", dword ptr [{c}+32]{{1to16}}\n",
            "vmulps zmm", $p, ", zmm", $p, ", zmm", $r, "\n",
            "vaddps zmm", $x, ", zmm", $r, ", dword ptr [{c}+36]{{1to16}}\n",
            "vfmadd213ps zmm", $p, ", zmm", $r, ", zmm", $x, "\n",
            "vscalefps zmm", $p, " {{k", $k, "}} {{z}}, zmm", $p, ", zmm", $n
        )
    };
}

/// # Safety
/// AVX-512 F; `s` valid for reading and writing `64 rows` f32, `m` for `rows`, `alpha` for
/// `rows` rounded up to a multiple of 16, `l` for `16 rows`; `c` for reading the 11
/// constants of [`EXP_CONSTS`].
#[inline(never)]
unsafe fn softmax_raw(
    s: *mut f32,
    rows: usize,
    m: *mut f32,
    l: *mut f32,
    alpha: *mut f32,
    c: *const f32,
) {
    // SAFETY: the caller guarantees every access and AVX-512 F.
    unsafe {
        kernel_asm!(
            "test {n}, {n}",
            "jz 9f",
            // Pass 1, each row: m_new = max(m_old, the row's maximum); alpha = m_old - m_new.
            "mov {i}, 0",
            ".p2align 5",
            "2:",
            "vmovups zmm0, zmmword ptr [{s}]",
            "vmaxps zmm0, zmm0, zmmword ptr [{s}+64]",
            "vmovups zmm1, zmmword ptr [{s}+128]",
            "vmaxps zmm1, zmm1, zmmword ptr [{s}+192]",
            "vmaxps zmm0, zmm0, zmm1",
            "vextractf64x4 ymm1, zmm0, 1",
            "vmaxps ymm0, ymm0, ymm1",
            "vextractf128 xmm1, ymm0, 1",
            "vmaxps xmm0, xmm0, xmm1",
            "vpermilps xmm1, xmm0, 0x4E",
            "vmaxps xmm0, xmm0, xmm1",
            "vpermilps xmm1, xmm0, 0xB1",
            "vmaxps xmm0, xmm0, xmm1",
            "vmovss xmm2, dword ptr [{m}+{i}*4]",
            "vmaxss xmm0, xmm2, xmm0",
            "vsubss xmm2, xmm2, xmm0",
            "vmovss dword ptr [{m}+{i}*4], xmm0",
            "vmovss dword ptr [{al}+{i}*4], xmm2",
            "add {s}, 256",
            "inc {i}",
            "cmp {i}, {n}",
            "jb 2b",
            // Pass 2, 16 rows at a time: alpha = exp(m_old - m_new).
            "mov {i}, 0",
            "4:",
            "vmovups zmm0, zmmword ptr [{al}+{i}*4]",
            exp16!(0, 1, 2, 3, 1),
            "vmovups zmmword ptr [{al}+{i}*4], zmm3",
            "add {i}, 16",
            "cmp {i}, {n}",
            "jb 4b",
            // Pass 3, each row: s = exp(s - m_new); l = alpha l + the new sums.
            "mov {t}, {n}",
            "shl {t}, 8",
            "sub {s}, {t}",
            "mov {i}, 0",
            ".p2align 5",
            "5:",
            "vbroadcastss zmm7, dword ptr [{m}+{i}*4]",
            "vmovups zmm0, zmmword ptr [{s}]",
            "vmovups zmm1, zmmword ptr [{s}+64]",
            "vmovups zmm2, zmmword ptr [{s}+128]",
            "vmovups zmm3, zmmword ptr [{s}+192]",
            "vsubps zmm0, zmm0, zmm7",
            "vsubps zmm1, zmm1, zmm7",
            "vsubps zmm2, zmm2, zmm7",
            "vsubps zmm3, zmm3, zmm7",
            exp16!(0, 11, 12, 13, 2),
            exp16!(1, 14, 15, 16, 3),
            exp16!(2, 17, 18, 19, 4),
            exp16!(3, 20, 21, 22, 5),
            "vmovups zmmword ptr [{s}], zmm13",
            "vmovups zmmword ptr [{s}+64], zmm16",
            "vmovups zmmword ptr [{s}+128], zmm19",
            "vmovups zmmword ptr [{s}+192], zmm22",
            "vaddps zmm23, zmm13, zmm16",
            "vaddps zmm24, zmm19, zmm22",
            "vaddps zmm23, zmm23, zmm24",
            "vbroadcastss zmm10, dword ptr [{al}+{i}*4]",
            "vmovups zmm25, zmmword ptr [{l}]",
            "vfmadd213ps zmm25, zmm10, zmm23",
            "vmovups zmmword ptr [{l}], zmm25",
            "add {s}, 256",
            "add {l}, 64",
            "inc {i}",
            "cmp {i}, {n}",
            "jb 5b",
            "9:";
            s = inout(reg) s => _,
            n = in(reg) rows,
            m = in(reg) m,
            l = inout(reg) l => _,
            al = in(reg) alpha,
            c = in(reg) c,
            i = out(reg) _,
            t = out(reg) _,
        )
    }
}
