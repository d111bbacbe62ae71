//! FP8 E4M3 ("e4m3fn") weights with one scale per 128 x 128 tile, as Qwen's official FP8
//! checkpoints store them (`Qwen/Qwen3-VL-*-FP8`, `quant_method: fp8`, `weight_block_size:
//! [128, 128]`): a matrix `W` of `F8_E4M3` bytes `[out, in]` and beside it
//! `W_scale_inv` (`<name>_scale_inv`, f32 or bf16) of shape `[ceil(out / 128), ceil(in /
//! 128)]`; weight `(i, j)` is `e4m3(W[i][j]) * scale_inv[i / 128][j / 128]`.
//!
//! vlmem's kernels do not read these bytes: an FP8 checkpoint is transcoded once, at load
//! or by `vlmem quantize`, to a block format the kernels read (q8_0 by default), through
//! [`decode_row_into`]. E4M3: one sign bit, four exponent bits (bias 7), three mantissa
//! bits; no infinities; `0x7F` and `0xFF` are NaN; the largest magnitude is 448.

/// Rows and columns of one scale's tile.
pub const TILE: usize = 128;

/// The largest finite E4M3 magnitude.
pub const MAX: f32 = 448.0;

/// The suffix of a weight's scale tensor's name.
pub const SCALE_SUFFIX: &str = "_scale_inv";

/// Every E4M3 byte's value (NaN for `0x7F` and `0xFF`).
static VALUES: [f32; 256] = table();

const fn table() -> [f32; 256] {
    let mut t = [0f32; 256];
    let mut b = 0;
    while b < 256 {
        let sign = if b & 0x80 != 0 { -1.0 } else { 1.0 };
        let exp = ((b >> 3) & 0x0F) as i32;
        let man = (b & 0x07) as f32;
        let magnitude = if exp == 0x0F && (b & 0x07) == 0x07 {
            f32::NAN
        } else if exp == 0 {
            // Subnormal: 2^-6 * m / 8.
            man / 8.0 / 64.0
        } else {
            let mut p = 1.0f32;
            let mut e = exp - 7;
            while e > 0 {
                p *= 2.0;
                e -= 1;
            }
            while e < 0 {
                p /= 2.0;
                e += 1;
            }
            p * (1.0 + man / 8.0)
        };
        t[b] = sign * magnitude;
        b += 1;
    }
    t
}

/// The value of one E4M3 byte.
#[inline]
pub fn to_f32(byte: u8) -> f32 {
    VALUES[byte as usize]
}

/// The E4M3 byte nearest to `x` (ties to the even mantissa), saturating to +-448; NaN
/// gives `0x7F`. For writing test checkpoints; the engine only reads FP8.
pub fn from_f32(x: f32) -> u8 {
    if x.is_nan() {
        return 0x7F;
    }
    let sign = if x.is_sign_negative() { 0x80u8 } else { 0 };
    let a = x.abs().min(MAX);
    // The positive finite values are increasing in their byte, 0x00..=0x7E.
    let mut best = 0u8;
    let mut best_err = f32::INFINITY;
    for b in 0u8..=0x7E {
        let err = (VALUES[b as usize] - a).abs();
        if err < best_err || (err == best_err && b % 2 == 0) {
            best = b;
            best_err = err;
        }
    }
    sign | best
}

/// The name of `weight`'s scale tensor.
pub fn scale_name(weight: &str) -> String {
    format!("{weight}{SCALE_SUFFIX}")
}

/// The weight a scale tensor's name belongs to (`None` for other names).
pub fn weight_of_scale(name: &str) -> Option<&str> {
    name.strip_suffix(SCALE_SUFFIX)
}

/// The scale tiles of an `[rows, cols]` matrix: `[ceil(rows / 128), ceil(cols / 128)]`.
pub fn scale_shape(rows: u64, cols: u64) -> [u64; 2] {
    [rows.div_ceil(TILE as u64), cols.div_ceil(TILE as u64)]
}

/// Row `row` of an FP8 matrix of `cols` columns into f32: `bytes` the row's `cols` bytes,
/// `scales` the whole scale tensor (row-major, `ceil(cols / 128)` per row of tiles).
/// An error when the lengths disagree.
pub fn decode_row_into(
    bytes: &[u8],
    row: usize,
    scales: &[f32],
    out: &mut [f32],
) -> Result<(), String> {
    let cols = out.len();
    let tiles_per_row = cols.div_ceil(TILE);
    let tile_row = row / TILE;
    let first = tile_row * tiles_per_row;
    let row_scales = scales.get(first..first + tiles_per_row).ok_or_else(|| {
        format!(
            "row {row} needs scale tiles {first}..{} of {}",
            first + tiles_per_row,
            scales.len()
        )
    })?;
    if bytes.len() != cols {
        return Err(format!("{} bytes for a row of {cols} values", bytes.len()));
    }
    for ((o, b), j) in out.iter_mut().zip(bytes).zip(0..) {
        *o = to_f32(*b) * row_scales[j / TILE];
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_values() {
        assert_eq!(to_f32(0x00), 0.0);
        assert_eq!(to_f32(0x38), 1.0); // exponent 7, mantissa 0
        assert_eq!(to_f32(0xB8), -1.0);
        assert_eq!(to_f32(0x7E), 448.0);
        assert_eq!(to_f32(0x01), 2f32.powi(-9)); // the smallest subnormal
        assert_eq!(to_f32(0x08), 2f32.powi(-6)); // the smallest normal
        assert!(to_f32(0x7F).is_nan() && to_f32(0xFF).is_nan());
    }

    #[test]
    fn encoding_round_trips_every_finite_byte_and_rounds_to_nearest() {
        for b in 0u8..=255 {
            let v = to_f32(b);
            if v.is_nan() {
                continue;
            }
            let back = from_f32(v);
            // +0 and -0 are both zero.
            assert_eq!(to_f32(back), v, "{b:#x}");
        }
        assert_eq!(from_f32(1000.0), 0x7E);
        assert_eq!(from_f32(-1000.0), 0xFE);
        assert_eq!(from_f32(f32::NAN), 0x7F);
        // Between 1.0 (0x38) and 1.125 (0x39): nearest, ties to the even byte.
        assert_eq!(from_f32(1.06), 0x38);
        assert_eq!(from_f32(1.07), 0x39);
        assert_eq!(from_f32(1.0625), 0x38);
        // Relative error of a normal value: at most 2^-4.
        for i in 1..1000 {
            let x = i as f32 * 0.37;
            let y = to_f32(from_f32(x));
            assert!((x - y).abs() <= x.abs() / 16.0 + 1e-6, "{x} -> {y}");
        }
    }

    #[test]
    fn rows_take_their_tiles_scales() {
        // A 130 x 130 matrix: 2 x 2 tiles.
        let scales = [1.0, 2.0, 3.0, 4.0];
        let bytes = vec![0x38u8; 130]; // every value 1.0
        let mut out = vec![0f32; 130];
        decode_row_into(&bytes, 0, &scales, &mut out).unwrap();
        assert_eq!((out[0], out[127], out[128], out[129]), (1.0, 1.0, 2.0, 2.0));
        decode_row_into(&bytes, 129, &scales, &mut out).unwrap();
        assert_eq!((out[0], out[128]), (3.0, 4.0));
        assert!(decode_row_into(&bytes, 256, &scales, &mut out).is_err());
        assert!(decode_row_into(&bytes[..5], 0, &scales, &mut out).is_err());
        assert_eq!(scale_shape(130, 130), [2, 2]);
        assert_eq!(scale_shape(128, 1), [1, 1]);
    }
}
