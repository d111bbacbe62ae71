//! [`WeightFormat::Q8_0`] rows: quantizing f32 values to blocks and back.
//!
//! A block is 32 consecutive values of a row stored in 34 bytes: the scale `d` as a
//! little-endian f16, then 32 signed bytes `q`; value `i` is `d * q[i]`. Quantizing follows
//! GGUF's reference (`quantize_row_q8_0_ref`): `d = max|x| / 127`, `q = round(x / d)` rounding
//! halves away from zero (computed as `x * (1 / d)`, `q = 0` where `d = 0`), and `d` is then
//! stored rounded to f16. So every `q` is in `-127..=127` and, before the scale's rounding,
//! each value is off by at most `d / 2`; rounding `d` to f16 (11 significant bits) adds at most
//! `|q| * |d - f16(d)| <= 127 * d * 2^-11`.

use super::{FormatError, WeightFormat};
use half::f16;

/// Values per block.
pub const BLOCK_ELEMS: usize = 32;
/// Bytes per block: the f16 scale and the 32 quants.
pub const BLOCK_BYTES: usize = 2 + BLOCK_ELEMS;

/// The largest magnitude of `x`, NaN when any value is NaN.
#[inline]
fn max_abs(x: &[f32]) -> f32 {
    x.iter().fold(0f32, |m, v| {
        let a = v.abs();
        if a > m || a.is_nan() { a } else { m }
    })
}

/// Quantizes one block of values into `q` and returns its scale `d = max|x| / 127` in f32,
/// before any rounding to f16 (the kernels keep activation scales in f32). Values that are
/// NaN or infinite give a non-finite scale (and `q = 0` where `x * (1 / d)` is NaN); it
/// never panics.
#[inline]
pub fn quantize_block(x: &[f32; BLOCK_ELEMS], q: &mut [i8; BLOCK_ELEMS]) -> f32 {
    let d = max_abs(x) / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    for (qi, &xi) in q.iter_mut().zip(x) {
        // `as` saturates (and maps NaN to 0); |x * id| <= 127 up to one rounding, so
        // finite values never reach the saturation.
        *qi = (xi * id).round() as i8;
    }
    d
}

/// Bytes a row of `values` values takes; an error when it is not whole blocks.
fn row_bytes_of(values: usize) -> Result<usize, FormatError> {
    if !values.is_multiple_of(BLOCK_ELEMS) {
        return Err(FormatError::PartialBlock {
            format: WeightFormat::Q8_0,
            cols: values as u64,
            block_elems: BLOCK_ELEMS as u64,
        });
    }
    Ok(values / BLOCK_ELEMS * BLOCK_BYTES)
}

/// Quantizes `x` (whole blocks of 32 values) into `out` (34 bytes per block). Errors: `x` is
/// not whole blocks, `out` is not exactly its bytes, or a block has no finite f16 scale (a
/// value is NaN or infinite, or past `127 * 65504` in magnitude); `out` is then unspecified.
pub fn quantize_row_into(x: &[f32], out: &mut [u8]) -> Result<(), FormatError> {
    let want = row_bytes_of(x.len())?;
    if out.len() != want {
        return Err(FormatError::Length {
            what: "quantizing a row",
            format: WeightFormat::Q8_0,
            have: out.len(),
            want,
        });
    }
    let blocks = x
        .chunks_exact(BLOCK_ELEMS)
        .zip(out.chunks_exact_mut(BLOCK_BYTES));
    for (block, (xb, ob)) in blocks.enumerate() {
        let xb: &[f32; BLOCK_ELEMS] = xb.try_into().expect("chunks_exact gives whole blocks");
        let mut q = [0i8; BLOCK_ELEMS];
        let d = f16::from_f32(quantize_block(xb, &mut q));
        if !d.is_finite() {
            return Err(FormatError::OutOfRange {
                format: WeightFormat::Q8_0,
                block,
            });
        }
        ob[..2].copy_from_slice(&d.to_le_bytes());
        for (o, &qi) in ob[2..].iter_mut().zip(&q) {
            *o = qi as u8;
        }
    }
    Ok(())
}

/// Quantizes `x` to a new row of bytes (see [`quantize_row_into`]).
pub fn quantize_row(x: &[f32]) -> Result<Vec<u8>, FormatError> {
    let mut out = vec![0u8; row_bytes_of(x.len())?];
    quantize_row_into(x, &mut out)?;
    Ok(out)
}

/// Value `i` of a block's bytes (`d * q[i]` in f32), for readers that need one value.
#[inline]
pub fn block_value(block: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([block[0], block[1]]).to_f32() * f32::from(block[2 + i] as i8)
}

/// Dequantizes `bytes` (whole 34-byte blocks) into `out`, 32 values per block, each exactly
/// `f32(d) * q` (a product of an 11-bit and an 8-bit integer significand, exact in f32).
/// Errors when `out` is not whole blocks or `bytes` is not exactly its blocks.
pub fn dequantize_row_into(bytes: &[u8], out: &mut [f32]) -> Result<(), FormatError> {
    let want = row_bytes_of(out.len())?;
    if bytes.len() != want {
        return Err(FormatError::Length {
            what: "dequantizing a row",
            format: WeightFormat::Q8_0,
            have: bytes.len(),
            want,
        });
    }
    for (b, o) in bytes
        .chunks_exact(BLOCK_BYTES)
        .zip(out.chunks_exact_mut(BLOCK_ELEMS))
    {
        let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
        for (oi, &qi) in o.iter_mut().zip(&b[2..]) {
            *oi = d * f32::from(qi as i8);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The most a value may move through a round trip: half a step of the exact scale, plus
    /// what rounding the scale to f16 moves `q` steps (f32 rounding of `x * (1 / d)` can
    /// only pick the other neighbour at an exact half, which the first term already allows,
    /// so one f32 ulp of the value is added for it).
    fn round_trip_bound(d: f32, d16: f32, q: i8, x: f32) -> f64 {
        f64::from(d) / 2.0
            + f64::from(q.unsigned_abs()) * (f64::from(d) - f64::from(d16)).abs()
            + f64::from(x.abs()) * f64::from(f32::EPSILON)
    }

    fn check_round_trip(x: &[f32]) {
        let bytes = quantize_row(x).unwrap();
        assert_eq!(bytes.len(), x.len() / 32 * 34);
        let mut back = vec![f32::NAN; x.len()];
        dequantize_row_into(&bytes, &mut back).unwrap();
        for (b, (xb, yb)) in x.chunks(32).zip(back.chunks(32)).enumerate() {
            let d = max_abs(xb) / 127.0;
            let blk = &bytes[b * 34..(b + 1) * 34];
            let d16 = f16::from_le_bytes([blk[0], blk[1]]).to_f32();
            for (i, (&xi, &yi)) in xb.iter().zip(yb).enumerate() {
                let q = blk[2 + i] as i8;
                assert!((-127..=127).contains(&q), "q = {q}");
                assert_eq!(yi, d16 * f32::from(q));
                assert_eq!(yi, block_value(blk, i));
                let err = (f64::from(xi) - f64::from(yi)).abs();
                assert!(
                    err <= round_trip_bound(d, d16, q, xi),
                    "block {b} value {i}: {xi} -> {yi}, d = {d}"
                );
            }
        }
    }

    #[test]
    fn a_block_is_an_f16_scale_then_32_signed_bytes() {
        let x: Vec<f32> = (0..32).map(|i| (i as f32 - 16.0) / 16.0 * 2.54).collect();
        let bytes = quantize_row(&x).unwrap();
        assert_eq!(bytes.len(), 34);
        // max |x| = 2.54 (the first value), so d = 0.02 and q = round(x / 0.02).
        let d = f16::from_f32(2.54 / 127.0);
        assert_eq!(&bytes[..2], &d.to_le_bytes());
        let q: Vec<i8> = bytes[2..].iter().map(|&b| b as i8).collect();
        assert_eq!(q[0], -127);
        assert_eq!(q[16], 0);
        assert_eq!(q[31], (15.0f32 / 16.0 * 127.0).round() as i8);
        assert_eq!(q[8], -64); // -1.27 / 0.02 = -63.5, rounded away from zero
    }

    #[test]
    fn an_all_zero_block_is_zero_bytes_and_dequantizes_to_zeros() {
        let bytes = quantize_row(&[0.0; 64]).unwrap();
        assert_eq!(bytes, vec![0u8; 68]);
        let mut back = [1f32; 64];
        dequantize_row_into(&bytes, &mut back).unwrap();
        assert_eq!(back, [0f32; 64]);
        // -0.0 is a zero too: no NaN from 0 * (1 / 0).
        let bytes = quantize_row(&[-0.0; 32]).unwrap();
        assert!(bytes[2..].iter().all(|&b| b == 0));
    }

    #[test]
    fn the_extremes_of_a_block_quantize_to_plus_and_minus_127() {
        let mut x = [0.25f32; 32];
        x[3] = -7.5;
        x[20] = 7.5;
        let bytes = quantize_row(&x).unwrap();
        assert_eq!(bytes[2 + 3] as i8, -127);
        assert_eq!(bytes[2 + 20] as i8, 127);
        assert_eq!(bytes[2] as i8, (0.25f32 / (7.5 / 127.0)).round() as i8);
        // One-sided blocks: the largest magnitude maps to the end of the range on its side.
        let neg: Vec<f32> = (1..=32).map(|i| -(i as f32)).collect();
        let bytes = quantize_row(&neg).unwrap();
        assert_eq!(bytes[33] as i8, -127);
        assert!(bytes[2..].iter().all(|&b| (b as i8) < 0));
        check_round_trip(&x);
        check_round_trip(&neg);
        // Tiny and huge scales that f16 still holds.
        check_round_trip(&[1e-3; 32]);
        check_round_trip(&[8.0e6; 32]);
    }

    #[test]
    fn values_without_a_finite_f16_scale_are_typed_errors() {
        let mut x = [1f32; 64];
        x[40] = f32::NAN;
        assert!(matches!(
            quantize_row(&x),
            Err(FormatError::OutOfRange { block: 1, .. })
        ));
        x[40] = f32::INFINITY;
        assert!(matches!(
            quantize_row(&x),
            Err(FormatError::OutOfRange { block: 1, .. })
        ));
        x[40] = 1e7; // 1e7 / 127 > 65504
        assert!(matches!(
            quantize_row(&x),
            Err(FormatError::OutOfRange { block: 1, .. })
        ));
    }

    #[test]
    fn lengths_that_are_not_whole_blocks_are_typed_errors() {
        assert!(matches!(
            quantize_row(&[0.0; 33]),
            Err(FormatError::PartialBlock { cols: 33, .. })
        ));
        assert!(matches!(
            quantize_row_into(&[0.0; 32], &mut [0u8; 33]),
            Err(FormatError::Length {
                have: 33,
                want: 34,
                ..
            })
        ));
        assert!(matches!(
            dequantize_row_into(&[0u8; 34], &mut [0f32; 64]),
            Err(FormatError::Length {
                have: 34,
                want: 68,
                ..
            })
        ));
        assert!(dequantize_row_into(&[0u8; 34], &mut [0f32; 31]).is_err());
        assert_eq!(quantize_row(&[]).unwrap(), Vec::<u8>::new());
    }

    proptest! {
        #[test]
        fn a_round_trip_stays_within_half_a_step_and_the_scale_rounding(
            x in (1usize..6).prop_flat_map(|blocks| prop::collection::vec(
                prop_oneof![-1.0e4f32..1.0e4, -1.0f32..1.0, -1e-4f32..1e-4, Just(0.0)],
                blocks * 32,
            )),
        ) {
            check_round_trip(&x);
        }
    }
}
