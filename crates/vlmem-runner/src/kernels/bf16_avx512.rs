//! The AVX-512 inner loop of [`super::bf16::matvec_rows`] for bf16 weights: exact (each
//! weight widened to f32 in registers, f32 fused multiply-adds), 16 lanes wide, eight rows
//! at a time.
//!
//! A bf16 value is the top half of an f32, so a 32-bit lane holding two adjacent bf16
//! values (column `2i` in its low half, `2i + 1` in its high half: little-endian) gives both
//! as f32 with one instruction each: shifted left by 16 (the even column) or with the low
//! half masked off (the odd one). Each step loads 32 values (64 bytes, one cache line) of a
//! row with one plain load and multiplies its two halves by the input reordered once per
//! call to match ([`super::bf16::SplitInput`]: per block of 32 values, the 16 at even
//! positions, then the 16 at odd ones). That is 4 vector operations per 32 weights against
//! 6 for widening each value with `vpmovzxwd` (a shuffle) and a shift; both are exact.
//!
//! Eight rows share each step's input vectors (loaded once), each row has its own
//! accumulator, and each row stream asks for the cache line [`PREFETCH_BYTES`] ahead.
//! Rows left over take the four-row kernel, then the one-row one. Every kernel adds a row's
//! products in the same order into one accumulator per row (even lanes, then odd, block
//! after block) and sums its lanes the same way, so a row's result does not depend on which
//! kernel ran it, that is on how the rows were split into tasks.
//!
//! The loops are inline assembly: the AVX-512 intrinsics and target features are newer than
//! the workspace's minimum Rust (1.88). Each kernel is a function of its own
//! (`#[inline(never)]`) whose body is the assembly alone: it writes only zmm0-15 (declared
//! clobbered through their ymm halves; the ABI makes every vector register caller-saved) and
//! the output buffer, and ends with `vzeroupper`.
//!
//! Only AVX-512 F is needed (`vpslld`, `vpandd`, `vfmadd231ps`, `vmovdqu32` on zmm).

#![allow(unsafe_code)]

use std::arch::asm;

/// How far ahead of its reads each row stream asks for a line (bytes): 8 lines per row, 64
/// lines over the eight rows. On the 2-vCPU development VM 384-1024 bytes read memory at the
/// same speed within its noise (192 and 2048 slower; `examples/bf16_matvec.rs`).
pub const PREFETCH_BYTES: usize = 512;

/// Values per step of a row (one 64-byte line of bf16): the block size of
/// [`super::bf16::SplitInput`].
pub const BLOCK: usize = 32;

/// Whether this kernel can run here: AVX-512 F (the standard library's detection also
/// checks that the OS saves the registers), beside the AVX2 + FMA + F16C that the callers'
/// other paths need.
pub fn available() -> bool {
    super::bf16::has_avx2_fma() && std::is_x86_feature_detected!("avx512f")
}

/// One row's step: its 32 values at `[$row]` split into the even (shifted up) and odd
/// (low halves masked off by zmm13) lanes, multiplied by the input's even (zmm14) and odd
/// (zmm15) lanes into accumulators `$ae` and `$ao`; then a prefetch of the row's line
/// `{pf}` bytes ahead. `$t` and `$u` are scratch registers.
#[rustfmt::skip]
macro_rules! split_row {
    ($row:literal, $ae:literal, $ao:literal, $t:literal, $u:literal) => {
        concat!(
            "vmovdqu32 zmm", $u, ", zmmword ptr [", $row, "]\n",
            "vpslld zmm", $t, ", zmm", $u, ", 16\n",
            "vpandd zmm", $u, ", zmm", $u, ", zmm13\n",
            "vfmadd231ps zmm", $ae, ", zmm", $t, ", zmm14\n",
            "vfmadd231ps zmm", $ao, ", zmm", $u, ", zmm15\n",
            "prefetcht0 [", $row, "+{pf}]"
        )
    };
}

/// Zeroes accumulator `$a`.
#[rustfmt::skip]
macro_rules! zero {
    ($a:literal) => {
        concat!("vpxord zmm", $a, ", zmm", $a, ", zmm", $a)
    };
}

/// Stores the 16 lanes of `$a` at `out + $off` bytes.
#[rustfmt::skip]
macro_rules! store {
    ($a:literal, $off:literal) => {
        concat!("vmovups zmmword ptr [{out}+", $off, "], zmm", $a)
    };
}

/// The parts every kernel shares: the odd-lane mask in zmm13, the loop over `{n}` steps
/// around `$body` (the input's two vectors loaded first, `{w}`, `{v}` and `{x}` advanced
/// after), then `$stores`.
macro_rules! kernel {
    ([$($body:expr),* $(,)?], [$($stores:expr),* $(,)?], $($operands:tt)*) => {
        asm!(
            zero!(0), zero!(1), zero!(2), zero!(3),
            zero!(4), zero!(5), zero!(6), zero!(7),
            "mov {t:e}, 0xFFFF0000",
            "vpbroadcastd zmm13, {t:e}",
            "test {n}, {n}",
            "jz 3f",
            ".p2align 5",
            "2:",
            "vmovups zmm14, zmmword ptr [{x}]",
            "vmovups zmm15, zmmword ptr [{x}+64]",
            $($body,)*
            "add {w}, 64",
            "add {v}, 64",
            "add {x}, 128",
            "dec {n}",
            "jnz 2b",
            "3:",
            $($stores,)*
            "vzeroupper",
            $($operands)*
            t = out(reg) _,
            pf = const PREFETCH_BYTES,
            out("ymm0") _, out("ymm1") _, out("ymm2") _, out("ymm3") _,
            out("ymm4") _, out("ymm5") _, out("ymm6") _, out("ymm7") _,
            out("ymm8") _, out("ymm9") _, out("ymm10") _, out("ymm11") _,
            out("ymm12") _, out("ymm13") _, out("ymm14") _, out("ymm15") _,
            options(nostack),
        )
    };
}

/// Rows 0-7 of `w` (rows `s` bytes apart), `n` steps: row `r`'s 16 partial sums to
/// `out[16 r..16 r + 16]`.
///
/// # Safety
/// The CPU must have AVX-512 F; `w + r * s` must be valid for reading `64 n` bytes for each
/// `r < 8`, `xs` for reading `32 n` f32, `out` for writing 128 f32.
#[inline(never)]
unsafe fn rows8(w: *const u8, s: usize, xs: *const f32, n: usize, out: *mut f32) {
    // SAFETY: the caller guarantees every access above (the prefetches read nothing and
    // cannot fault) and AVX-512 F; the block writes only the declared registers and `out`.
    unsafe {
        kernel!(
            [
                split_row!("{w}", 0, 0, 8, 9),
                split_row!("{w}+{s}", 1, 1, 10, 11),
                split_row!("{w}+{s}*2", 2, 2, 12, 8),
                split_row!("{w}+{s3}", 3, 3, 9, 10),
                split_row!("{v}", 4, 4, 11, 12),
                split_row!("{v}+{s}", 5, 5, 8, 9),
                split_row!("{v}+{s}*2", 6, 6, 10, 11),
                split_row!("{v}+{s3}", 7, 7, 12, 8),
            ],
            [
                store!(0, 0), store!(1, 64), store!(2, 128), store!(3, 192),
                store!(4, 256), store!(5, 320), store!(6, 384), store!(7, 448),
            ],
            w = inout(reg) w => _,
            v = inout(reg) w.wrapping_add(4 * s) => _,
            s = in(reg) s,
            s3 = in(reg) 3 * s,
            x = inout(reg) xs => _,
            n = inout(reg) n => _,
            out = in(reg) out,
        )
    }
}

/// As [`rows8`] for rows 0-3 (`out` for 64 f32).
///
/// # Safety
/// As [`rows8`], for 4 rows.
#[inline(never)]
unsafe fn rows4(w: *const u8, s: usize, xs: *const f32, n: usize, out: *mut f32) {
    // SAFETY: as in `rows8`.
    unsafe {
        kernel!(
            [
                split_row!("{w}", 0, 0, 8, 9),
                split_row!("{w}+{s}", 1, 1, 10, 11),
                split_row!("{w}+{s}*2", 2, 2, 12, 8),
                split_row!("{w}+{s3}", 3, 3, 9, 10),
            ],
            [store!(0, 0), store!(1, 64), store!(2, 128), store!(3, 192)],
            w = inout(reg) w => _,
            v = inout(reg) w => _,
            s = in(reg) s,
            s3 = in(reg) 3 * s,
            x = inout(reg) xs => _,
            n = inout(reg) n => _,
            out = in(reg) out,
        )
    }
}

/// As [`rows8`] for row 0 alone (`out` for 16 f32).
///
/// # Safety
/// As [`rows8`], for 1 row.
#[inline(never)]
unsafe fn rows1(w: *const u8, xs: *const f32, n: usize, out: *mut f32) {
    // SAFETY: as in `rows8`.
    unsafe {
        kernel!(
            [split_row!("{w}", 0, 0, 8, 9)],
            [store!(0, 0)],
            w = inout(reg) w => _,
            v = inout(reg) w => _,
            x = inout(reg) xs => _,
            n = inout(reg) n => _,
            out = in(reg) out,
        )
    }
}

/// The sum of one row's 16 partial sums (a fixed order: halves, then quarters...).
#[inline]
pub(super) fn lanes_sum(p: &[f32]) -> f32 {
    let mut v = [0f32; 16];
    v.copy_from_slice(&p[..16]);
    let mut k = 8;
    while k > 0 {
        for i in 0..k {
            v[i] += v[i + k];
        }
        k /= 2;
    }
    v[0]
}

/// `y[r] = sum_c W[r, c] x[c]` for the `y.len()` bf16 rows of `cols` values in `w`, where
/// `xs` is `x` reordered into blocks ([`super::bf16::SplitInput`]). The whole blocks go
/// through the vector kernels; each row's last `cols % 32` columns are added by `tail`
/// (given the row's bytes, `x` and the first column left).
///
/// # Safety
/// The CPU must have AVX-512 F ([`available`]).
pub unsafe fn matvec_rows(
    w: &[u8],
    cols: usize,
    x: &[f32],
    xs: &[f32],
    y: &mut [f32],
    tail: impl Fn(&[u8], &[f32], usize) -> f32,
) {
    let rows = y.len();
    let row_bytes = cols * 2;
    let blocks = cols / BLOCK;
    let whole = blocks * BLOCK;
    assert!(w.len() >= rows * row_bytes && x.len() >= cols && xs.len() >= whole);
    let wp = w.as_ptr();
    let xp = xs.as_ptr();
    let mut sums = [0f32; 128];
    let mut r = 0;
    let finish = |r0: usize, count: usize, sums: &[f32], y: &mut [f32]| {
        for k in 0..count {
            let row = &w[(r0 + k) * row_bytes..(r0 + k + 1) * row_bytes];
            y[r0 + k] = lanes_sum(&sums[16 * k..]) + tail(row, x, whole);
        }
    };
    while r + 8 <= rows {
        // SAFETY: rows r..r+8 lie inside `w` (asserted above) and each is read for its first
        // 64 * blocks = 2 * whole <= row_bytes bytes; `xs` holds `whole` f32; `sums` holds
        // 128 f32; the caller guarantees AVX-512 F.
        unsafe {
            rows8(
                wp.add(r * row_bytes),
                row_bytes,
                xp,
                blocks,
                sums.as_mut_ptr(),
            )
        };
        finish(r, 8, &sums, y);
        r += 8;
    }
    if r + 4 <= rows {
        // SAFETY: as above, for rows r..r+4 and 64 f32 of `sums`.
        unsafe {
            rows4(
                wp.add(r * row_bytes),
                row_bytes,
                xp,
                blocks,
                sums.as_mut_ptr(),
            )
        };
        finish(r, 4, &sums, y);
        r += 4;
    }
    while r < rows {
        // SAFETY: as above, for row r and 16 f32 of `sums`.
        unsafe { rows1(wp.add(r * row_bytes), xp, blocks, sums.as_mut_ptr()) };
        finish(r, 1, &sums, y);
        r += 1;
    }
}
