//! [`WeightFormat::Q4_K`] rows: quantizing f32 values to super-blocks and back.
//!
//! # Layout (GGUF's `block_q4_K`, byte for byte)
//!
//! A block holds 256 consecutive values of a row in 144 bytes:
//!
//! | bytes     | what |
//! |-----------|------|
//! | `0..2`    | `d`, the scale of the sub-block scales, little-endian f16 |
//! | `2..4`    | `dmin`, the scale of the sub-block mins, little-endian f16 |
//! | `4..16`   | 8 six-bit scales `sc[j]` and 8 six-bit mins `m[j]`, packed (below) |
//! | `16..144` | 256 four-bit quants `q` |
//!
//! The block is 8 sub-blocks of 32 values; value `i` is in sub-block `j = i / 32` and is
//! `d * sc[j] * q[i] - dmin * m[j]`, `q` in `0..=15`, so each sub-block is a grid of 16
//! evenly spaced levels starting at `-dmin * m[j]` (at or below zero).
//!
//! Quants: the 128 bytes are four groups of 32; group `g` holds values `64 g .. 64 g + 32`
//! (sub-block `2 g`) in its bytes' low nibbles and values `64 g + 32 .. 64 g + 64` (sub-block
//! `2 g + 1`) in their high nibbles, byte `l` of the group holding value `64 g + l` and
//! `64 g + 32 + l`.
//!
//! Scales and mins ([`pack_scales`], [`scale_min`]): for `j < 4`, byte `j` holds `sc[j]` in
//! its low six bits and byte `j + 4` holds `m[j]`; for `j >= 4`, byte `j + 4` holds the low
//! four bits of `sc[j]` (low nibble) and of `m[j]` (high nibble), and the two high bits of
//! `sc[j]` and `m[j]` sit in the top two bits of bytes `j - 4` and `j`. All 96 bits are
//! used, so every byte pattern is a valid block.
//!
//! # Quantizing
//!
//! As GGUF's reference quantizer (`quantize_row_q4_K_ref`) does, in three steps:
//!
//! 1. Each sub-block gets its own grid `s * l - mu` (`s >= 0`, `mu >= 0`, `l` in `0..=15`):
//!    starting from the grid that spans the sub-block's range exactly (from `min(x, 0)` to
//!    `max(x)`), 21 slightly denser and sparser grids are tried, each refitted by weighted
//!    least squares on the levels it picks, with weights `rms(x) + |x_i|` (the large values
//!    count most); the grid with the least weighted squared error is kept.
//! 2. The eight `s` and eight `mu` are rounded to six bits of their block's largest:
//!    `d = max(s) / 63`, `sc[j] = round(s[j] / d)`, and likewise `dmin`, `m`; `d` and `dmin`
//!    are stored rounded to f16.
//! 3. Each value takes the nearest level of its sub-block's stored grid
//!    (`q = round((x + dmin m) / (d sc))` clamped to `0..=15`).
//!
//! # Error bound
//!
//! Step 3 makes each value's error its distance to the stored grid. That distance is bounded
//! through the fitted grid: with `span = max(x) - min(x, 0)` of the sub-block,
//!
//! - the first grid tried has step `span / 15` and puts every value within half a step of a
//!   level, so its weighted squared error is at most `(span / 30)^2 * sum(w)`; the grid kept
//!   has no more, so one value's error is at most `(span / 30) * sqrt(sum(w) / w_i)`. Each
//!   `w_i >= rms(x)` and `sum(w) = 32 rms(x) + sum|x| <= 64 rms(x)` (Cauchy-Schwarz), so a
//!   value is within `8 * span / 30 = 4 span / 15` of the level `l` the fitted grid gives it;
//! - the stored grid moves level `l <= 15` by at most `15 |d sc - s| + |dmin m - mu|`, and
//!   rounding to six bits gives `|d sc - s| <= d / 2`, plus 63 times the f16 rounding of `d`
//!   (at most `max(d 2^-11, 2^-25)`); likewise for the mins.
//!
//! So `|x - value| <= 4 span / 15 + 15 (d / 2 + 64 eps_d) + dmin / 2 + 64 eps_m` (plus f32
//! rounding), a worst case; the usual error is at most half a step of the sub-block's grid
//! (the nearest level, for values inside the grid's span). The tests check both.

use super::{FormatError, WeightFormat};
use half::f16;

/// Values per block.
pub const BLOCK_ELEMS: usize = 256;
/// Sub-blocks per block, each with its own scale and min.
pub const SUB_BLOCKS: usize = 8;
/// Values per sub-block.
pub const SUB_ELEMS: usize = BLOCK_ELEMS / SUB_BLOCKS;
/// Where the packed scales and mins start in a block.
pub const SCALES_AT: usize = 4;
/// Bytes of packed scales and mins.
pub const SCALES_BYTES: usize = 12;
/// Where the quants start in a block.
pub const QUANTS_AT: usize = SCALES_AT + SCALES_BYTES;
/// Bytes per block: `d`, `dmin`, the packed scales and mins, then the 4-bit quants.
pub const BLOCK_BYTES: usize = QUANTS_AT + BLOCK_ELEMS / 2;
/// The largest quant.
pub const MAX_QUANT: u8 = 15;
/// The largest six-bit scale or min.
pub const MAX_SCALE: u8 = 63;

/// Packs eight six-bit scales and eight six-bit mins into the 12 bytes of a block (bits
/// above the sixth are dropped).
pub fn pack_scales(sc: &[u8; SUB_BLOCKS], m: &[u8; SUB_BLOCKS]) -> [u8; SCALES_BYTES] {
    let mut p = [0u8; SCALES_BYTES];
    for j in 0..4 {
        let (sc_hi, m_hi) = (sc[j + 4] & MAX_SCALE, m[j + 4] & MAX_SCALE);
        p[j] = (sc[j] & MAX_SCALE) | (sc_hi >> 4) << 6;
        p[j + 4] = (m[j] & MAX_SCALE) | (m_hi >> 4) << 6;
        p[j + 8] = (sc_hi & 0x0F) | (m_hi & 0x0F) << 4;
    }
    p
}

/// The scale and min of sub-block `j` (`< 8`) from a block's packed bytes, one at a time.
pub fn scale_min(p: &[u8; SCALES_BYTES], j: usize) -> (u8, u8) {
    if j < 4 {
        (p[j] & MAX_SCALE, p[j + 4] & MAX_SCALE)
    } else {
        (
            (p[j + 4] & 0x0F) | (p[j - 4] >> 6) << 4,
            (p[j + 4] >> 4) | (p[j] >> 6) << 4,
        )
    }
}

/// All eight scales and all eight mins at once from the packed bytes read as three
/// little-endian words `a` (bytes 0..4), `b` (4..8) and `c` (8..12): byte `j` of the first
/// result is `sc[j]`, of the second `m[j]` (little-endian), as [`scale_min`] gives them.
/// The kernels use this form: a dozen integer operations per block.
#[inline]
pub const fn unpack_scale_words(a: u32, b: u32, c: u32) -> (u64, u64) {
    const LOW6: u32 = 0x3F3F_3F3F;
    const LOW4: u32 = 0x0F0F_0F0F;
    const BITS45: u32 = 0x3030_3030;
    let sc_lo = a & LOW6;
    let m_lo = b & LOW6;
    // The top two bits of each byte of `a` (`b`), moved down to bits 4 and 5 of that byte.
    let sc_hi = (c & LOW4) | ((a >> 2) & BITS45);
    let m_hi = ((c >> 4) & LOW4) | ((b >> 2) & BITS45);
    (
        sc_lo as u64 | (sc_hi as u64) << 32,
        m_lo as u64 | (m_hi as u64) << 32,
    )
}

/// [`unpack_scale_words`] on the 12 bytes, as arrays.
#[inline]
pub fn unpack_scales(p: &[u8; SCALES_BYTES]) -> ([u8; SUB_BLOCKS], [u8; SUB_BLOCKS]) {
    let word = |k: usize| u32::from_le_bytes([p[k], p[k + 1], p[k + 2], p[k + 3]]);
    let (sc, m) = unpack_scale_words(word(0), word(4), word(8));
    (sc.to_le_bytes(), m.to_le_bytes())
}

/// The byte of a block holding value `i`'s quant, and whether it is the high nibble.
#[inline]
pub const fn quant_position(i: usize) -> (usize, bool) {
    (QUANTS_AT + 32 * (i / 64) + i % 32, (i / SUB_ELEMS) % 2 == 1)
}

/// A block's `d` and `dmin` as f32.
#[inline]
pub fn block_scales(block: &[u8]) -> (f32, f32) {
    (
        f16::from_le_bytes([block[0], block[1]]).to_f32(),
        f16::from_le_bytes([block[2], block[3]]).to_f32(),
    )
}

/// Value `i` of a block's bytes (`d sc q - dmin m` in f32: each product is exact, the
/// difference rounds once), for readers that need one value.
#[inline]
pub fn block_value(block: &[u8], i: usize) -> f32 {
    let (d, dmin) = block_scales(block);
    let packed: &[u8; SCALES_BYTES] = block[SCALES_AT..QUANTS_AT]
        .try_into()
        .expect("a block has 12 bytes of scales");
    let (sc, m) = scale_min(packed, i / SUB_ELEMS);
    let (at, high) = quant_position(i);
    let q = if high {
        block[at] >> 4
    } else {
        block[at] & 0x0F
    };
    d * f32::from(sc) * f32::from(q) - dmin * f32::from(m)
}

/// A sub-block's fitted grid: values near `scale * l - offset`, `l` in `0..=15`.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Fit {
    scale: f32,
    offset: f32,
}

/// The densities tried around the exact-span grid: `15 + STEP_FROM + STEP * k` levels over
/// the span, `k` in `0..=STEPS`.
const STEP_FROM: f32 = -1.0;
const STEP: f32 = 0.1;
const STEPS: u16 = 20;

/// Fits one sub-block's grid (step 1 of the module doc). Values are finite (the caller's
/// check); the result has `scale >= 0` and `offset >= 0`.
fn fit_sub_block(x: &[f32; SUB_ELEMS]) -> Fit {
    let lo = x.iter().fold(0f32, |m, &v| m.min(v));
    let hi = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    if hi <= lo {
        // Every value is `lo` (zero or one negative value): the grid's first level.
        return Fit {
            scale: 0.0,
            offset: -lo,
        };
    }
    let span = hi - lo;
    let rms = (x.iter().map(|v| v * v).sum::<f32>() / SUB_ELEMS as f32).sqrt();
    let w: [f32; SUB_ELEMS] = std::array::from_fn(|i| rms + x[i].abs());
    let sum_w: f32 = w.iter().sum();
    let sum_wx: f32 = w.iter().zip(x).map(|(w, x)| w * x).sum();
    let levels = |inv_step: f32, l: &mut [u8; SUB_ELEMS]| {
        for (li, &xi) in l.iter_mut().zip(x) {
            *li = ((xi - lo) * inv_step)
                .round_ties_even()
                .clamp(0.0, f32::from(MAX_QUANT)) as u8;
        }
    };
    // Weighted squared error of the grid `scale * l + base` (`base = -offset`).
    let error = |scale: f32, base: f32, l: &[u8; SUB_ELEMS]| -> f32 {
        l.iter()
            .zip(x)
            .zip(&w)
            .map(|((&li, &xi), &wi)| {
                let e = scale * f32::from(li) + base - xi;
                wi * e * e
            })
            .sum()
    };
    let mut l = [0u8; SUB_ELEMS];
    let inv_step = f32::from(MAX_QUANT) / span;
    levels(inv_step, &mut l);
    let mut best = Fit {
        scale: 1.0 / inv_step,
        offset: -lo,
    };
    let mut best_error = error(best.scale, lo, &l);
    for k in 0..=STEPS {
        let inv_step = (f32::from(MAX_QUANT) + STEP_FROM + STEP * f32::from(k)) / span;
        levels(inv_step, &mut l);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0f32, 0f32, 0f32);
        for ((&li, &xi), &wi) in l.iter().zip(x).zip(&w) {
            let lf = f32::from(li);
            sum_l += wi * lf;
            sum_l2 += wi * lf * lf;
            sum_xl += wi * lf * xi;
        }
        // The weighted least-squares line through (l, x): x ~ scale * l + base.
        let det = sum_w * sum_l2 - sum_l * sum_l;
        if det > 0.0 {
            let mut scale = (sum_w * sum_xl - sum_wx * sum_l) / det;
            let mut base = (sum_l2 * sum_wx - sum_l * sum_xl) / det;
            if base > 0.0 {
                // The format's lowest level is at or below zero: refit through the origin.
                base = 0.0;
                scale = sum_xl / sum_l2;
            }
            let e = error(scale, base, &l);
            if e < best_error {
                best_error = e;
                best = Fit {
                    scale,
                    offset: -base,
                };
            }
        }
    }
    best
}

/// `v` in six-bit steps of `max / 63` (0 where `max` is 0).
fn six_bits(v: f32, max: f32) -> u8 {
    if max > 0.0 {
        (v.max(0.0) * (f32::from(MAX_SCALE) / max))
            .round_ties_even()
            .min(f32::from(MAX_SCALE)) as u8
    } else {
        0
    }
}

/// Quantizes one block of 256 values into `out` (144 bytes); `block` is its index in the
/// row, for the error.
fn quantize_block(
    x: &[f32; BLOCK_ELEMS],
    out: &mut [u8; BLOCK_BYTES],
    block: usize,
) -> Result<(), FormatError> {
    let out_of_range = FormatError::OutOfRange {
        format: WeightFormat::Q4_K,
        block,
    };
    if x.iter().any(|v| !v.is_finite()) {
        return Err(out_of_range);
    }
    let fits: [Fit; SUB_BLOCKS] = std::array::from_fn(|j| {
        fit_sub_block(
            x[j * SUB_ELEMS..(j + 1) * SUB_ELEMS]
                .try_into()
                .expect("a sub-block is 32 values"),
        )
    });
    let max_scale = fits.iter().fold(0f32, |m, f| m.max(f.scale));
    let max_offset = fits.iter().fold(0f32, |m, f| m.max(f.offset));
    let sc: [u8; SUB_BLOCKS] = std::array::from_fn(|j| six_bits(fits[j].scale, max_scale));
    let m: [u8; SUB_BLOCKS] = std::array::from_fn(|j| six_bits(fits[j].offset, max_offset));
    let d = f16::from_f32(max_scale / f32::from(MAX_SCALE));
    let dmin = f16::from_f32(max_offset / f32::from(MAX_SCALE));
    if !d.is_finite() || !dmin.is_finite() {
        return Err(out_of_range);
    }
    out[..2].copy_from_slice(&d.to_le_bytes());
    out[2..4].copy_from_slice(&dmin.to_le_bytes());
    out[SCALES_AT..QUANTS_AT].copy_from_slice(&pack_scales(&sc, &m));
    let (d, dmin) = (d.to_f32(), dmin.to_f32());
    let mut q = [0u8; BLOCK_ELEMS];
    for (j, (qj, xj)) in q
        .chunks_exact_mut(SUB_ELEMS)
        .zip(x.chunks_exact(SUB_ELEMS))
        .enumerate()
    {
        let step = d * f32::from(sc[j]);
        let offset = dmin * f32::from(m[j]);
        if step == 0.0 {
            // Every level is `-offset`: quants of 0.
            continue;
        }
        for (qi, &xi) in qj.iter_mut().zip(xj) {
            *qi = ((xi + offset) / step)
                .round_ties_even()
                .clamp(0.0, f32::from(MAX_QUANT)) as u8;
        }
    }
    for (g, bytes) in out[QUANTS_AT..].chunks_exact_mut(32).enumerate() {
        for (l, b) in bytes.iter_mut().enumerate() {
            *b = q[64 * g + l] | q[64 * g + 32 + l] << 4;
        }
    }
    Ok(())
}

/// Bytes a row of `values` values takes; an error when it is not whole blocks.
fn row_bytes_of(values: usize) -> Result<usize, FormatError> {
    if !values.is_multiple_of(BLOCK_ELEMS) {
        return Err(FormatError::PartialBlock {
            format: WeightFormat::Q4_K,
            cols: values as u64,
            block_elems: BLOCK_ELEMS as u64,
        });
    }
    Ok(values / BLOCK_ELEMS * BLOCK_BYTES)
}

/// Quantizes `x` (whole blocks of 256 values) into `out` (144 bytes per block). Errors: `x`
/// is not whole blocks, `out` is not exactly its bytes, or a block has no finite f16 `d` or
/// `dmin` (a value is NaN or infinite, or the block's range is past about `15 * 63 * 65504`);
/// `out` is then unspecified.
pub fn quantize_row_into(x: &[f32], out: &mut [u8]) -> Result<(), FormatError> {
    let want = row_bytes_of(x.len())?;
    if out.len() != want {
        return Err(FormatError::Length {
            what: "quantizing a row",
            format: WeightFormat::Q4_K,
            have: out.len(),
            want,
        });
    }
    let blocks = x
        .chunks_exact(BLOCK_ELEMS)
        .zip(out.chunks_exact_mut(BLOCK_BYTES));
    for (block, (xb, ob)) in blocks.enumerate() {
        quantize_block(
            xb.try_into().expect("chunks_exact gives whole blocks"),
            ob.try_into().expect("chunks_exact gives whole blocks"),
            block,
        )?;
    }
    Ok(())
}

/// Quantizes `x` to a new row of bytes (see [`quantize_row_into`]).
pub fn quantize_row(x: &[f32]) -> Result<Vec<u8>, FormatError> {
    let mut out = vec![0u8; row_bytes_of(x.len())?];
    quantize_row_into(x, &mut out)?;
    Ok(out)
}

/// Dequantizes one block's bytes into 256 values.
#[inline]
pub fn dequantize_block_into(block: &[u8], out: &mut [f32]) {
    let (d, dmin) = block_scales(block);
    let packed: &[u8; SCALES_BYTES] = block[SCALES_AT..QUANTS_AT]
        .try_into()
        .expect("a block has 12 bytes of scales");
    let (sc, m) = unpack_scales(packed);
    for (g, (bytes, o)) in block[QUANTS_AT..BLOCK_BYTES]
        .chunks_exact(32)
        .zip(out.chunks_exact_mut(64))
        .enumerate()
    {
        let (lo, hi) = o.split_at_mut(32);
        let (d_lo, m_lo) = (d * f32::from(sc[2 * g]), dmin * f32::from(m[2 * g]));
        let (d_hi, m_hi) = (d * f32::from(sc[2 * g + 1]), dmin * f32::from(m[2 * g + 1]));
        for ((&b, ol), oh) in bytes.iter().zip(lo).zip(hi) {
            *ol = d_lo * f32::from(b & 0x0F) - m_lo;
            *oh = d_hi * f32::from(b >> 4) - m_hi;
        }
    }
}

/// Dequantizes `bytes` (whole 144-byte blocks) into `out`, 256 values per block, each
/// `d sc q - dmin m` (the products exact in f32, the difference rounded once). Errors when
/// `out` is not whole blocks or `bytes` is not exactly its blocks.
pub fn dequantize_row_into(bytes: &[u8], out: &mut [f32]) -> Result<(), FormatError> {
    let want = row_bytes_of(out.len())?;
    if bytes.len() != want {
        return Err(FormatError::Length {
            what: "dequantizing a row",
            format: WeightFormat::Q4_K,
            have: bytes.len(),
            want,
        });
    }
    for (b, o) in bytes
        .chunks_exact(BLOCK_BYTES)
        .zip(out.chunks_exact_mut(BLOCK_ELEMS))
    {
        dequantize_block_into(b, o);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }
        /// Uniform in [-1, 1).
        fn uniform(&mut self) -> f32 {
            (self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        }
        /// About normal, unit variance (a sum of 12 uniforms on [-1/2, 1/2)).
        fn normal(&mut self) -> f32 {
            (0..12).map(|_| self.uniform() / 2.0).sum()
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    /// The value of value `i` of a block by the layout table alone (bytes, nibbles and the
    /// per-index scale rule), in f64: exact.
    fn spec_value(block: &[u8], i: usize) -> f64 {
        let d = f16::from_le_bytes([block[0], block[1]]).to_f64();
        let dmin = f16::from_le_bytes([block[2], block[3]]).to_f64();
        let s = &block[4..16];
        let j = i / 32;
        let (sc, m) = if j < 4 {
            (s[j] & 63, s[j + 4] & 63)
        } else {
            (
                (s[j + 4] & 15) | ((s[j - 4] >> 6) << 4),
                (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
            )
        };
        let byte = block[16 + 32 * (i / 64) + i % 32];
        let q = if (i / 32).is_multiple_of(2) {
            byte & 15
        } else {
            byte >> 4
        };
        d * f64::from(sc) * f64::from(q) - dmin * f64::from(m)
    }

    /// Half an f16 ulp at `v` (normal or subnormal): what rounding to f16 may move a value
    /// that lands on `v`.
    fn f16_half_ulp(v: f32) -> f64 {
        (f64::from(v.abs()) * 2f64.powi(-11)).max(2f64.powi(-25))
    }

    /// The worst-case bound of the module doc for sub-block `j` of `x`, from the stored `d`
    /// and `dmin`, with a little room for f32 rounding.
    fn worst_case_bound(x: &[f32], block: &[u8]) -> f64 {
        let (d, dmin) = block_scales(block);
        let hi = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        let lo = x.iter().fold(0f32, |m, &v| m.min(v));
        let span = f64::from(hi) - f64::from(lo);
        let big = x.iter().fold(0f64, |m, &v| m.max(f64::from(v.abs())));
        4.0 * span / 15.0
            + 15.0 * (f64::from(d) / 2.0 + 64.0 * f16_half_ulp(d))
            + f64::from(dmin) / 2.0
            + 64.0 * f16_half_ulp(dmin)
            + (big + 15.0 * 63.0 * f64::from(d) + 63.0 * f64::from(dmin)) * 2f64.powi(-18)
    }

    /// Round-trips `x` and checks every value against the layout table, the worst-case
    /// bound, and the nearest-level rule; returns the squared errors' sum.
    fn check_round_trip(x: &[f32]) -> f64 {
        let bytes = quantize_row(x).unwrap();
        assert_eq!(bytes.len(), x.len() / 256 * 144);
        let mut back = vec![f32::NAN; x.len()];
        dequantize_row_into(&bytes, &mut back).unwrap();
        let mut sq = 0f64;
        for (b, (xb, yb)) in x.chunks(256).zip(back.chunks(256)).enumerate() {
            let blk = &bytes[b * 144..(b + 1) * 144];
            let (d, dmin) = block_scales(blk);
            let packed: &[u8; 12] = blk[4..16].try_into().unwrap();
            for j in 0..8 {
                let xs = &xb[32 * j..32 * (j + 1)];
                let bound = worst_case_bound(xs, blk);
                let (sc, m) = scale_min(packed, j);
                let step = f64::from(d) * f64::from(sc);
                let base = -(f64::from(dmin) * f64::from(m));
                for (k, &xi) in xs.iter().enumerate() {
                    let i = 32 * j + k;
                    let yi = yb[i];
                    let exact = spec_value(blk, i);
                    assert_eq!(yi, exact as f32, "block {b} value {i}");
                    assert_eq!(yi, block_value(blk, i));
                    let err = (f64::from(xi) - exact).abs();
                    sq += err * err;
                    assert!(
                        err <= bound,
                        "block {b} value {i}: {xi} -> {yi}, err {err:e} > {bound:e}"
                    );
                    // The nearest level of the stored grid: no level is closer (but for
                    // f32 rounding at a tie).
                    let nearest = (0..=15)
                        .map(|l| (f64::from(xi) - (step * f64::from(l) + base)).abs())
                        .fold(f64::INFINITY, f64::min);
                    let slop = (f64::from(xi.abs()) + step * 15.0 - base) * 2f64.powi(-21);
                    assert!(
                        err <= nearest + slop,
                        "block {b} value {i}: {xi} -> {yi} but a level is {nearest:e} away"
                    );
                }
            }
        }
        sq
    }

    #[test]
    fn scales_pack_and_unpack_through_either_rule() {
        let mut rng = Rng(1);
        for k in 0..2000 {
            let (sc, m): ([u8; 8], [u8; 8]) = if k < 64 {
                // Every six-bit value in every position.
                (
                    std::array::from_fn(|j| ((k + 7 * j) % 64) as u8),
                    std::array::from_fn(|j| ((k + 13 * j + 5) % 64) as u8),
                )
            } else {
                (
                    std::array::from_fn(|_| rng.below(64) as u8),
                    std::array::from_fn(|_| rng.below(64) as u8),
                )
            };
            let p = pack_scales(&sc, &m);
            assert_eq!(unpack_scales(&p), (sc, m));
            for j in 0..8 {
                assert_eq!(scale_min(&p, j), (sc[j], m[j]), "{sc:?} {m:?} {j}");
            }
        }
        // Any 12 bytes are a valid packing: both rules agree on random bytes, and packing
        // what they read gives the bytes back.
        for _ in 0..2000 {
            let p: [u8; 12] = std::array::from_fn(|_| rng.next() as u8);
            let (sc, m) = unpack_scales(&p);
            for j in 0..8 {
                assert_eq!(scale_min(&p, j), (sc[j], m[j]));
            }
            assert_eq!(pack_scales(&sc, &m), p);
        }
        // One by hand: sc = 0..8 and m = 63 - sc; sub-block 5 has sc 5 = 0b000101 and
        // m 58 = 0b111010: low nibbles 0b0101 | 0b1010 << 4 in byte 9, high bits 0b00 on
        // byte 1 and 0b11 on byte 5.
        let sc: [u8; 8] = std::array::from_fn(|j| j as u8);
        let m: [u8; 8] = std::array::from_fn(|j| 63 - j as u8);
        let p = pack_scales(&sc, &m);
        assert_eq!(p[9], 0b1010_0101);
        assert_eq!(p[1] >> 6, 0b00);
        assert_eq!(p[5] >> 6, 0b11);
        assert_eq!(p[1] & 63, 1);
        assert_eq!(p[5] & 63, 62);
    }

    #[test]
    fn the_layout_is_ggufs_block_q4_k() {
        assert_eq!(BLOCK_BYTES, 144);
        assert_eq!(WeightFormat::Q4_K.block_bytes(), 144);
        assert_eq!(WeightFormat::Q4_K.block_elems(), 256);
        // A block written by hand: d = 0.5, dmin = 0.25, sc[j] = 5 + 7 j and m[j] = 60 - 3 j
        // (most above 15, so the packing's high bits matter), and quant i = (7 i + j) % 16
        // (so values i and i + 32, which share a byte, differ).
        let mut blk = vec![0u8; 144];
        blk[..2].copy_from_slice(&f16::from_f32(0.5).to_le_bytes());
        blk[2..4].copy_from_slice(&f16::from_f32(0.25).to_le_bytes());
        let sc: [u8; 8] = std::array::from_fn(|j| 5 + 7 * j as u8);
        let m: [u8; 8] = std::array::from_fn(|j| 60 - 3 * j as u8);
        blk[4..16].copy_from_slice(&pack_scales(&sc, &m));
        for i in 0..256 {
            let (at, high) = quant_position(i);
            blk[at] |= (((7 * i + i / 32) % 16) as u8) << if high { 4 } else { 0 };
        }
        let mut out = vec![0f32; 256];
        dequantize_row_into(&blk, &mut out).unwrap();
        for (i, &v) in out.iter().enumerate() {
            let j = i / 32;
            let q = ((7 * i + j) % 16) as f32;
            let want = 0.5 * (5.0 + 7.0 * j as f32) * q - 0.25 * (60.0 - 3.0 * j as f32);
            assert_eq!(v, want, "value {i}");
            assert_eq!(f64::from(v), spec_value(&blk, i), "value {i}");
        }
        // Value 40 (sub-block 1) is the high nibble of byte 16 + 8; value 100 (sub-block 3)
        // the high nibble of byte 16 + 32 + 4; value 70 the low nibble of byte 16 + 32 + 6.
        assert_eq!(quant_position(40), (24, true));
        assert_eq!(quant_position(100), (52, true));
        assert_eq!(quant_position(70), (54, false));
    }

    #[test]
    fn a_ramp_quantizes_onto_its_levels() {
        // Sub-block j is the 16 levels k * 2^-j (twice each, k = 0..15) minus j / 8: the
        // grid is exactly representable, so a round trip is exact up to the scales' rounding.
        let x: Vec<f32> = (0..256)
            .map(|i| {
                let j = i / 32;
                ((i % 32) / 2) as f32 * 0.5f32.powi(j) - j as f32 / 8.0
            })
            .collect();
        let bytes = quantize_row(&x).unwrap();
        let mut back = vec![0f32; 256];
        dequantize_row_into(&bytes, &mut back).unwrap();
        let (d, dmin) = block_scales(&bytes);
        assert!(d > 0.0 && dmin > 0.0);
        // Sub-block 0 has the largest step (1) and no offset; sub-block 7 the largest offset.
        let packed: &[u8; 12] = bytes[4..16].try_into().unwrap();
        assert_eq!(scale_min(packed, 0), (63, 0));
        assert_eq!(scale_min(packed, 7).1, 63);
        for i in 0..32 {
            assert!((x[i] - back[i]).abs() <= 1.0 / 64.0 * 15.0, "{i}");
            let (at, high) = quant_position(i);
            let q = if high { bytes[at] >> 4 } else { bytes[at] & 15 };
            assert_eq!(q as usize, i / 2, "value {i}");
        }
        check_round_trip(&x);
    }

    #[test]
    fn constant_zero_and_one_sided_blocks() {
        let bytes = quantize_row(&[0.0; 512]).unwrap();
        assert_eq!(bytes, vec![0u8; 288]);
        let mut back = [1f32; 512];
        dequantize_row_into(&bytes, &mut back).unwrap();
        assert_eq!(back, [0f32; 512]);
        // -0.0 is a zero too.
        assert!(quantize_row(&[-0.0; 256]).unwrap().iter().all(|&b| b == 0));
        // A negative constant is the grid's first level: -dmin * m.
        for c in [-1.0f32, -3.5e-3, -700.0] {
            check_round_trip(&[c; 256]);
        }
        // A positive constant is the top of a grid starting at zero.
        for c in [1.0f32, 0.123, 2.5e4] {
            let x = [c; 256];
            check_round_trip(&x);
            let bytes = quantize_row(&x).unwrap();
            let (d, dmin) = block_scales(&bytes);
            assert_eq!(dmin, 0.0, "{c}");
            let y = block_value(&bytes, 7);
            assert!((y - c).abs() <= c * 2e-3, "{c} -> {y}, d = {d}");
        }
        // All negative and all positive ramps.
        let neg: Vec<f32> = (0..256).map(|i| -1.0 - i as f32 / 64.0).collect();
        let pos: Vec<f32> = neg.iter().map(|v| -v).collect();
        check_round_trip(&neg);
        check_round_trip(&pos);
    }

    /// Seeded sweeps over value distributions and magnitudes: every value within the
    /// worst-case bound and on its nearest level (see `check_round_trip`), and the RMS error
    /// of normal values within 0.3 of a uniform quantizer's step over the block's spread
    /// (step / sqrt(12) = 0.289 of a step for a grid spanning each sub-block's range).
    #[test]
    fn seeded_sweeps_stay_within_the_bounds() {
        let mut rng = Rng(0x5EED);
        let mut blocks = 0;
        for case in 0..600 {
            let nblocks = 1 + case % 3;
            let scale = [1e-6f32, 1e-3, 0.05, 1.0, 30.0, 1e4][case % 6];
            let x: Vec<f32> = (0..256 * nblocks)
                .map(|i| {
                    let v = match case % 7 {
                        0 => rng.uniform(),
                        1 => rng.normal(),
                        // Normal with rare outliers.
                        2 if rng.below(64) == 0 => rng.normal() * 20.0,
                        2 => rng.normal(),
                        // One side of zero, with a shifted mean.
                        3 => 2.0 + rng.uniform(),
                        4 => -2.0 + rng.uniform().abs(),
                        // Sub-blocks of very different magnitudes.
                        5 => rng.normal() * 10f32.powi(((i / 32) % 4) as i32 - 2),
                        // Sparse.
                        _ if rng.below(4) == 0 => rng.normal(),
                        _ => 0.0,
                    };
                    v * scale
                })
                .collect();
            check_round_trip(&x);
            blocks += nblocks;
        }
        assert!(blocks > 1000);
        // Normal values: the RMS error against the sub-blocks' steps.
        let mut sq = 0f64;
        let mut step_sq = 0f64;
        let mut n = 0usize;
        for _ in 0..200 {
            let x: Vec<f32> = (0..256).map(|_| rng.normal()).collect();
            sq += check_round_trip(&x);
            for s in x.chunks(32) {
                let hi = s.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
                let lo = s.iter().fold(0f32, |m, &v| m.min(v));
                let step = f64::from(hi - lo) / 15.0;
                step_sq += step * step * 32.0;
            }
            n += 256;
        }
        let rms = (sq / n as f64).sqrt();
        let rms_step = (step_sq / n as f64).sqrt();
        assert!(
            rms <= 0.3 * rms_step,
            "RMS error {rms} against RMS step {rms_step}"
        );
        // And against the values' own spread (unit variance): about 0.07.
        assert!(rms < 0.09, "RMS error {rms}");
    }

    #[test]
    fn values_without_finite_scales_are_typed_errors() {
        let mut x = vec![1f32; 512];
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 1e12, -1e12] {
            x[300] = bad;
            assert_eq!(
                quantize_row(&x),
                Err(FormatError::OutOfRange {
                    format: WeightFormat::Q4_K,
                    block: 1,
                }),
                "{bad}"
            );
        }
        // The largest finite f32 values, which overflow the fit's sums: an error, no panic.
        x[300] = f32::MAX;
        x[301] = f32::MIN;
        assert!(quantize_row(&x).is_err());
        // Large but storable.
        x[300] = 3e6;
        x[301] = -3e6;
        check_round_trip(&x);
    }

    #[test]
    fn lengths_that_are_not_whole_blocks_are_typed_errors() {
        assert_eq!(
            quantize_row(&[0.0; 255]),
            Err(FormatError::PartialBlock {
                format: WeightFormat::Q4_K,
                cols: 255,
                block_elems: 256,
            })
        );
        assert!(quantize_row(&[0.0; 32]).is_err());
        assert_eq!(
            quantize_row_into(&[0.0; 256], &mut [0u8; 145]),
            Err(FormatError::Length {
                what: "quantizing a row",
                format: WeightFormat::Q4_K,
                have: 145,
                want: 144,
            })
        );
        assert!(matches!(
            dequantize_row_into(&[0u8; 144], &mut [0f32; 512]),
            Err(FormatError::Length {
                have: 144,
                want: 288,
                ..
            })
        ));
        assert!(dequantize_row_into(&[0u8; 144], &mut [0f32; 255]).is_err());
        assert_eq!(quantize_row(&[]).unwrap(), Vec::<u8>::new());
    }

    /// Any 144 bytes dequantize without panicking (every packing is valid), to the layout
    /// table's values.
    #[test]
    fn arbitrary_bytes_dequantize_by_the_table() {
        let mut rng = Rng(99);
        for _ in 0..300 {
            let mut blk: Vec<u8> = (0..144).map(|_| rng.next() as u8).collect();
            // Keep d and dmin finite (an f16 NaN or infinity gives NaN or infinite values).
            blk[1] &= 0x7B;
            blk[3] &= 0x7B;
            let mut out = vec![0f32; 256];
            dequantize_row_into(&blk, &mut out).unwrap();
            for (i, &v) in out.iter().enumerate() {
                assert_eq!(v, spec_value(&blk, i) as f32, "value {i}");
            }
        }
    }
}
