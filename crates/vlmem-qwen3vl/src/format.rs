//! Weight formats: how a weight matrix's values are laid out in bytes, row by row.
//!
//! A format stores each row as whole blocks: `block_elems` consecutive values of the row in
//! `block_bytes` bytes. The plain types are blocks of one value (bf16: 1 value in 2 bytes);
//! a block-quantized type packs many values with their scale (e.g. 32 values and an f16
//! scale in 34 bytes). So a row of `cols` values takes `cols / block_elems` blocks, and a
//! row whose length is not a whole number of blocks cannot be stored in that format.
//!
//! Everything that sizes weights (the memory math, the weight store, the kernels' length
//! checks) asks the format for [`WeightFormat::row_bytes`] or [`WeightFormat::tensor_bytes`]
//! instead of multiplying elements by an element size, so a new format is one more variant
//! here (its block sizes and name) plus the kernels that read it.
//!
//! Two block formats, each laid out byte for byte as GGUF's block of the same name:
//!
//! - [`WeightFormat::Q8_0`]: 32 values as an f16 scale `d` and 32 signed bytes `q` (34
//!   bytes, value = `d * q`); [`q8_0`] quantizes and dequantizes rows of it;
//! - [`WeightFormat::Q4_K`]: super-blocks of 256 values in 144 bytes, 8 sub-blocks of 32
//!   with six-bit scales and mins under two f16 scales, and 4-bit quants (value =
//!   `d * sc * q - dmin * m`, 4.5 bits a value); [`q4_k`] quantizes and dequantizes rows.
//!
//! They store matrices only: a tensor a block format cannot hold (a 1-D norm or bias, rows
//! that are not whole blocks) stays in its stored type (see `math::WeightTensor::held_bytes`).

pub mod fp8;
pub mod q4_k;
pub mod q8_0;

use crate::tensors::Dtype;
use serde::{Serialize, Serializer};
use std::fmt;
use std::str::FromStr;
use thiserror::Error;

/// How a weight's values are stored. The kernels read every format in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum WeightFormat {
    /// bfloat16, little-endian: 1 value in 2 bytes.
    Bf16,
    /// IEEE half, little-endian: 1 value in 2 bytes.
    F16,
    /// IEEE single, little-endian: 1 value in 4 bytes.
    F32,
    /// Blocks of 32 values: an f16 scale `d` (little-endian) then 32 `i8` `q`, 34 bytes;
    /// value `i` of a block is `d * q[i]` (GGUF's `block_q8_0`).
    Q8_0,
    /// Super-blocks of 256 values in 144 bytes: f16 `d` and `dmin`, 12 bytes of six-bit
    /// scales `sc` and mins `m` for 8 sub-blocks of 32, then 128 bytes of 4-bit quants `q`;
    /// value `i` is `d * sc[i / 32] * q[i] - dmin * m[i / 32]` (GGUF's `block_q4_K`).
    #[allow(non_camel_case_types)]
    Q4_K,
}

/// A size that a format cannot express.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FormatError {
    /// Rows of this length are not a whole number of the format's blocks.
    #[error(
        "rows of {cols} values are not a whole number of {format} blocks of {block_elems} values"
    )]
    PartialBlock {
        /// The format asked for.
        format: WeightFormat,
        /// Values per row.
        cols: u64,
        /// Values per block of that format.
        block_elems: u64,
    },
    /// A buffer's length does not match the values it should hold.
    #[error("{what}: {have} bytes/values where {format} needs {want}")]
    Length {
        /// What was being converted.
        what: &'static str,
        /// The format asked for.
        format: WeightFormat,
        /// The length given.
        have: usize,
        /// The length the other buffer implies.
        want: usize,
    },
    /// A block's scale is not a finite f16: a value is NaN or infinite, or the block's
    /// values are too large for the format's f16 scales (for q8_0, a magnitude past
    /// `127 * 65504`; for q4_k, a sub-block range past about `15 * 63 * 65504`).
    #[error(
        "block {block} of a {format} row has no finite f16 scale: a value is NaN or infinite, \
         or too large for the format's f16 scales"
    )]
    OutOfRange {
        /// The format asked for.
        format: WeightFormat,
        /// The block's index in the row.
        block: usize,
    },
    /// The byte count does not fit in 64 bits.
    #[error("a {shape:?} tensor in {format} is more bytes than 64 bits count")]
    Overflow {
        /// The format asked for.
        format: WeightFormat,
        /// The shape asked for (`[cols]` for one row).
        shape: Vec<u64>,
    },
}

/// A format name that is not one of [`WeightFormat::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("unknown weight format '{name}': use one of {}", WeightFormat::names().join(", "))]
pub struct ParseFormatError {
    /// The name given.
    pub name: String,
}

impl WeightFormat {
    /// Every format, in the order help texts list them.
    pub const ALL: [WeightFormat; 5] = [
        WeightFormat::Bf16,
        WeightFormat::F16,
        WeightFormat::F32,
        WeightFormat::Q8_0,
        WeightFormat::Q4_K,
    ];

    /// Values per block.
    #[inline]
    pub const fn block_elems(self) -> u64 {
        match self {
            WeightFormat::Bf16 | WeightFormat::F16 | WeightFormat::F32 => 1,
            WeightFormat::Q8_0 => q8_0::BLOCK_ELEMS as u64,
            WeightFormat::Q4_K => q4_k::BLOCK_ELEMS as u64,
        }
    }

    /// Bytes per block.
    #[inline]
    pub const fn block_bytes(self) -> u64 {
        match self {
            WeightFormat::Bf16 | WeightFormat::F16 => 2,
            WeightFormat::F32 => 4,
            WeightFormat::Q8_0 => q8_0::BLOCK_BYTES as u64,
            WeightFormat::Q4_K => q4_k::BLOCK_BYTES as u64,
        }
    }

    /// Whether each block holds one value (the format stores any tensor); `false` for a
    /// block-quantized format, which stores only rows of whole blocks.
    #[inline]
    pub const fn is_plain(self) -> bool {
        self.block_elems() == 1
    }

    /// Bytes of one row of `cols` values; an error when `cols` is not a whole number of
    /// blocks or the bytes overflow.
    #[inline]
    pub fn row_bytes(self, cols: u64) -> Result<u64, FormatError> {
        self.row_blocks(cols)?
            .checked_mul(self.block_bytes())
            .ok_or_else(|| FormatError::Overflow {
                format: self,
                shape: vec![cols],
            })
    }

    /// Bytes of a tensor of `shape`, stored as rows of its last dimension (a scalar, `[]`,
    /// is one row of one value). A tensor with a zero dimension takes 0 bytes, though its
    /// rows must still be whole blocks.
    pub fn tensor_bytes(self, shape: &[u64]) -> Result<u64, FormatError> {
        let (cols, outer) = match shape.split_last() {
            Some((&cols, outer)) => (cols, outer),
            None => (1, &[][..]),
        };
        let blocks = self.row_blocks(cols)?;
        if shape.contains(&0) {
            return Ok(0);
        }
        // Every factor is at least 1, so a partial product that overflows means the whole
        // does: the check is exact.
        outer
            .iter()
            .try_fold(blocks, |acc, &d| acc.checked_mul(d))
            .and_then(|blocks| blocks.checked_mul(self.block_bytes()))
            .ok_or_else(|| FormatError::Overflow {
                format: self,
                shape: shape.to_vec(),
            })
    }

    /// Blocks in one row of `cols` values; an error when `cols` is not a whole number of
    /// blocks.
    fn row_blocks(self, cols: u64) -> Result<u64, FormatError> {
        let block_elems = self.block_elems();
        if !cols.is_multiple_of(block_elems) {
            return Err(FormatError::PartialBlock {
                format: self,
                cols,
                block_elems,
            });
        }
        Ok(cols / block_elems)
    }

    /// The format of a checkpoint's element type; `None` for types that are not weights the
    /// kernels read (integers, f64).
    pub const fn from_dtype(dtype: Dtype) -> Option<Self> {
        match dtype {
            Dtype::BF16 => Some(WeightFormat::Bf16),
            Dtype::F16 => Some(WeightFormat::F16),
            Dtype::F32 => Some(WeightFormat::F32),
            Dtype::I64
            | Dtype::I32
            | Dtype::U8
            | Dtype::I8
            | Dtype::BOOL
            | Dtype::F64
            | Dtype::F8E4M3 => None,
        }
    }

    /// The checkpoint element type that stores this format value by value; `None` for a
    /// block format, which no safetensors type stores.
    pub const fn plain_dtype(self) -> Option<Dtype> {
        match self {
            WeightFormat::Bf16 => Some(Dtype::BF16),
            WeightFormat::F16 => Some(Dtype::F16),
            WeightFormat::F32 => Some(Dtype::F32),
            WeightFormat::Q8_0 | WeightFormat::Q4_K => None,
        }
    }

    /// The name the command line and reports use ("bf16", "f16", "f32", "q8_0", "q4_k").
    pub const fn name(self) -> &'static str {
        match self {
            WeightFormat::Bf16 => "bf16",
            WeightFormat::F16 => "f16",
            WeightFormat::F32 => "f32",
            WeightFormat::Q8_0 => "q8_0",
            WeightFormat::Q4_K => "q4_k",
        }
    }

    /// Every format's [`name`](Self::name).
    pub fn names() -> Vec<&'static str> {
        Self::ALL.iter().map(|f| f.name()).collect()
    }

    /// Decodes `bytes`, whole blocks of this format (a row, or any run of rows), into
    /// `out.len()` f32 values: a plain format's little-endian values widened exactly, a block
    /// format's blocks dequantized ([`q8_0::dequantize_row_into`],
    /// [`q4_k::dequantize_row_into`]). An error when `bytes` is not exactly the blocks of
    /// `out.len()` values.
    pub fn decode_row_into(self, bytes: &[u8], out: &mut [f32]) -> Result<(), FormatError> {
        match self {
            WeightFormat::Bf16 => decode_plain(self, bytes, out, |b: [u8; 2]| {
                half::bf16::from_le_bytes(b).to_f32()
            }),
            WeightFormat::F16 => decode_plain(self, bytes, out, |b: [u8; 2]| {
                half::f16::from_le_bytes(b).to_f32()
            }),
            WeightFormat::F32 => decode_plain(self, bytes, out, f32::from_le_bytes),
            WeightFormat::Q8_0 => q8_0::dequantize_row_into(bytes, out),
            WeightFormat::Q4_K => q4_k::dequantize_row_into(bytes, out),
        }
    }

    /// Encodes `values` (whole blocks of this format) into `out`, which must be exactly their
    /// bytes: a plain format's values rounded to nearest (ties to even) and stored
    /// little-endian, a block format's blocks quantized ([`q8_0::quantize_row_into`],
    /// [`q4_k::quantize_row_into`], whose errors it returns).
    pub fn encode_row_into(self, values: &[f32], out: &mut [u8]) -> Result<(), FormatError> {
        match self {
            WeightFormat::Bf16 => {
                encode_plain(self, values, out, |v| half::bf16::from_f32(v).to_le_bytes())
            }
            WeightFormat::F16 => {
                encode_plain(self, values, out, |v| half::f16::from_f32(v).to_le_bytes())
            }
            WeightFormat::F32 => encode_plain(self, values, out, f32::to_le_bytes),
            WeightFormat::Q8_0 => q8_0::quantize_row_into(values, out),
            WeightFormat::Q4_K => q4_k::quantize_row_into(values, out),
        }
    }
}

/// A plain format's `N`-byte little-endian values in `bytes` into `out`, one each.
#[inline]
fn decode_plain<const N: usize>(
    format: WeightFormat,
    bytes: &[u8],
    out: &mut [f32],
    widen: impl Fn([u8; N]) -> f32,
) -> Result<(), FormatError> {
    if bytes.len() != out.len() * N {
        return Err(FormatError::Length {
            what: "decoding a row",
            format,
            have: bytes.len(),
            want: out.len() * N,
        });
    }
    for (o, b) in out.iter_mut().zip(bytes.chunks_exact(N)) {
        *o = widen(b.try_into().expect("chunks_exact gives N bytes"));
    }
    Ok(())
}

/// `values` into a plain format's `N`-byte little-endian values in `out`, one each.
#[inline]
fn encode_plain<const N: usize>(
    format: WeightFormat,
    values: &[f32],
    out: &mut [u8],
    narrow: impl Fn(f32) -> [u8; N],
) -> Result<(), FormatError> {
    if out.len() != values.len() * N {
        return Err(FormatError::Length {
            what: "encoding a row",
            format,
            have: out.len(),
            want: values.len() * N,
        });
    }
    for (o, &v) in out.chunks_exact_mut(N).zip(values) {
        o.copy_from_slice(&narrow(v));
    }
    Ok(())
}

impl fmt::Display for WeightFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for WeightFormat {
    type Err = ParseFormatError;

    /// Parses a [`name`](WeightFormat::name), ignoring ASCII case ("BF16" as safetensors
    /// writes it is accepted too).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|f| f.name().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| ParseFormatError {
                name: s.to_string(),
            })
    }
}

impl Serialize for WeightFormat {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn plain_formats_store_one_value_per_block() {
        let sizes: Vec<(u64, u64)> = WeightFormat::ALL
            .iter()
            .map(|f| (f.block_elems(), f.block_bytes()))
            .collect();
        assert_eq!(sizes, [(1, 2), (1, 2), (1, 4), (32, 34), (256, 144)]);
        let plain: Vec<bool> = WeightFormat::ALL.iter().map(|f| f.is_plain()).collect();
        assert_eq!(plain, [true, true, true, false, false]);
        assert_eq!(WeightFormat::Bf16.row_bytes(2048), Ok(4096));
        assert_eq!(WeightFormat::F32.row_bytes(7), Ok(28));
        assert_eq!(WeightFormat::F16.row_bytes(0), Ok(0));
    }

    #[test]
    fn tensor_bytes_count_rows_of_the_last_dimension() {
        let bf16 = WeightFormat::Bf16;
        assert_eq!(bf16.tensor_bytes(&[151_936, 2048]), Ok(151_936 * 2048 * 2));
        assert_eq!(
            bf16.tensor_bytes(&[128, 2048, 1536]),
            Ok(128 * 2048 * 1536 * 2)
        );
        assert_eq!(WeightFormat::F32.tensor_bytes(&[2048]), Ok(8192));
        assert_eq!(WeightFormat::F32.tensor_bytes(&[]), Ok(4));
        assert_eq!(bf16.tensor_bytes(&[0, 2048]), Ok(0));
        // A zero dimension ends the count even where the others would overflow.
        assert_eq!(bf16.tensor_bytes(&[u64::MAX, u64::MAX, 0, 8]), Ok(0));
    }

    #[test]
    fn sizes_past_64_bits_are_typed_errors() {
        let f32 = WeightFormat::F32;
        assert_eq!(
            f32.row_bytes(u64::MAX),
            Err(FormatError::Overflow {
                format: f32,
                shape: vec![u64::MAX],
            })
        );
        assert_eq!(
            f32.tensor_bytes(&[1 << 40, 1 << 30]),
            Err(FormatError::Overflow {
                format: f32,
                shape: vec![1 << 40, 1 << 30],
            })
        );
        assert_eq!(
            f32.tensor_bytes(&[2, u64::MAX / 4]),
            Err(FormatError::Overflow {
                format: f32,
                shape: vec![2, u64::MAX / 4],
            })
        );
    }

    #[test]
    fn a_row_that_is_not_whole_blocks_is_a_typed_error_naming_the_block() {
        let q8 = WeightFormat::Q8_0;
        let e = q8.row_bytes(33).unwrap_err();
        assert_eq!(
            e,
            FormatError::PartialBlock {
                format: q8,
                cols: 33,
                block_elems: 32,
            }
        );
        assert_eq!(
            e.to_string(),
            "rows of 33 values are not a whole number of q8_0 blocks of 32 values"
        );
        assert!(q8.tensor_bytes(&[2048]).is_ok());
        assert!(q8.tensor_bytes(&[4, 16]).is_err());
        for f in WeightFormat::ALL.into_iter().filter(|f| f.is_plain()) {
            assert!(f.row_bytes(33).is_ok(), "{f}");
        }
    }

    #[test]
    fn q8_0_sizes_are_34_bytes_per_32_values() {
        let q8 = WeightFormat::Q8_0;
        assert_eq!(q8.row_bytes(0), Ok(0));
        assert_eq!(q8.row_bytes(32), Ok(34));
        assert_eq!(q8.row_bytes(2048), Ok(64 * 34));
        // The 2B's MLP up projection and the 8B's vocabulary table.
        assert_eq!(q8.tensor_bytes(&[6144, 2048]), Ok(6144 * 64 * 34));
        assert_eq!(q8.tensor_bytes(&[151_936, 4096]), Ok(151_936 * 128 * 34));
        assert_eq!(q8.tensor_bytes(&[0, 64]), Ok(0));
        assert_eq!(q8.plain_dtype(), None);
    }

    #[test]
    fn q4_k_sizes_are_144_bytes_per_256_values() {
        let q4 = WeightFormat::Q4_K;
        assert_eq!(q4.row_bytes(0), Ok(0));
        assert_eq!(q4.row_bytes(256), Ok(144));
        assert_eq!(q4.row_bytes(2048), Ok(8 * 144));
        // 32 values are a whole q8_0 block but not a q4_k one.
        assert_eq!(
            q4.row_bytes(32),
            Err(FormatError::PartialBlock {
                format: q4,
                cols: 32,
                block_elems: 256,
            })
        );
        // The 2B's MLP up and down projections, and the 8B's vocabulary table.
        assert_eq!(q4.tensor_bytes(&[6144, 2048]), Ok(6144 * 8 * 144));
        assert_eq!(q4.tensor_bytes(&[2048, 6144]), Ok(2048 * 24 * 144));
        assert_eq!(q4.tensor_bytes(&[151_936, 4096]), Ok(151_936 * 16 * 144));
        // 4.5 bits a value: 0.5625 of bf16's bytes, 0.529 of q8_0's.
        assert_eq!(q4.row_bytes(4096).unwrap() * 32, 4096 * 2 * 9);
        assert_eq!(q4.plain_dtype(), None);
        assert!(!q4.is_plain());
    }

    #[test]
    fn names_parse_back_and_unknown_names_are_typed_errors() {
        for f in WeightFormat::ALL {
            assert_eq!(f.name().parse::<WeightFormat>(), Ok(f));
            assert_eq!(f.to_string(), f.name());
            if f.is_plain() {
                assert_eq!(f.plain_dtype().and_then(WeightFormat::from_dtype), Some(f));
            }
        }
        assert_eq!("BF16".parse::<WeightFormat>(), Ok(WeightFormat::Bf16));
        assert_eq!("Q8_0".parse::<WeightFormat>(), Ok(WeightFormat::Q8_0));
        // GGUF spells it Q4_K.
        assert_eq!("Q4_K".parse::<WeightFormat>(), Ok(WeightFormat::Q4_K));
        assert_eq!(WeightFormat::Q4_K.to_string(), "q4_k");
        let e = "q8".parse::<WeightFormat>().unwrap_err();
        assert_eq!(e, ParseFormatError { name: "q8".into() });
        assert_eq!(
            e.to_string(),
            "unknown weight format 'q8': use one of bf16, f16, f32, q8_0, q4_k"
        );
        assert!("".parse::<WeightFormat>().is_err());
        assert_eq!(
            serde_json::to_string(&WeightFormat::F16).unwrap(),
            "\"f16\""
        );
    }

    #[test]
    fn only_float_dtypes_are_weight_formats() {
        assert_eq!(
            WeightFormat::from_dtype(Dtype::BF16),
            Some(WeightFormat::Bf16)
        );
        assert_eq!(
            WeightFormat::from_dtype(Dtype::F16),
            Some(WeightFormat::F16)
        );
        assert_eq!(
            WeightFormat::from_dtype(Dtype::F32),
            Some(WeightFormat::F32)
        );
        for d in [
            Dtype::I64,
            Dtype::I32,
            Dtype::U8,
            Dtype::I8,
            Dtype::BOOL,
            Dtype::F64,
        ] {
            assert_eq!(WeightFormat::from_dtype(d), None, "{d}");
        }
    }

    #[test]
    fn plain_rows_decode_and_encode_little_endian_values() {
        let values = [1.5f32, -2.0, 0.0, 65504.0, 1e-3];
        for f in WeightFormat::ALL.into_iter().filter(|f| f.is_plain()) {
            let mut bytes = vec![0u8; values.len() * f.block_bytes() as usize];
            f.encode_row_into(&values, &mut bytes).unwrap();
            let mut back = [f32::NAN; 5];
            f.decode_row_into(&bytes, &mut back).unwrap();
            for (i, (&v, &b)) in values.iter().zip(&back).enumerate() {
                let (want, stored) = match f {
                    WeightFormat::Bf16 => {
                        let h = half::bf16::from_f32(v);
                        (h.to_f32(), h.to_le_bytes().to_vec())
                    }
                    WeightFormat::F16 => {
                        let h = half::f16::from_f32(v);
                        (h.to_f32(), h.to_le_bytes().to_vec())
                    }
                    _ => (v, v.to_le_bytes().to_vec()),
                };
                assert_eq!(b.to_bits(), want.to_bits(), "{f} value {i}");
                let n = stored.len();
                assert_eq!(&bytes[i * n..(i + 1) * n], &stored[..], "{f} value {i}");
            }
            // Lengths that disagree are typed errors, both ways.
            let e = f.decode_row_into(&bytes[1..], &mut back).unwrap_err();
            assert!(
                matches!(e, FormatError::Length { format, .. } if format == f),
                "{e}"
            );
            let e = f.encode_row_into(&values[1..], &mut bytes).unwrap_err();
            assert!(
                matches!(e, FormatError::Length { format, .. } if format == f),
                "{e}"
            );
        }
    }

    #[test]
    fn block_rows_decode_and_encode_through_their_modules() {
        let values: Vec<f32> = (0..512)
            .map(|i| ((i * 37) % 101) as f32 / 50.0 - 0.7)
            .collect();
        let formats = [
            (WeightFormat::Q8_0, q8_0::quantize_row(&values).unwrap()),
            (WeightFormat::Q4_K, q4_k::quantize_row(&values).unwrap()),
        ];
        for (f, want_bytes) in formats {
            let mut bytes = vec![0u8; f.row_bytes(512).unwrap() as usize];
            f.encode_row_into(&values, &mut bytes).unwrap();
            assert_eq!(bytes, want_bytes, "{f}");
            let mut got = vec![f32::NAN; 512];
            f.decode_row_into(&bytes, &mut got).unwrap();
            let mut want = vec![0f32; 512];
            match f {
                WeightFormat::Q8_0 => q8_0::dequantize_row_into(&bytes, &mut want),
                _ => q4_k::dequantize_row_into(&bytes, &mut want),
            }
            .unwrap();
            assert_eq!(got, want, "{f}");
            assert!(f.decode_row_into(&bytes[1..], &mut got).is_err());
            assert!(f.encode_row_into(&values[..511], &mut bytes).is_err());
        }
    }

    /// Bytes of `shape` in `f` computed in 128 bits: `None` when it does not fit in 64.
    fn reference_bytes(f: WeightFormat, shape: &[u64]) -> Option<u64> {
        let elems = shape
            .iter()
            .try_fold(1u128, |acc, &d| acc.checked_mul(u128::from(d)));
        let bytes = match elems {
            Some(e) => {
                (e / u128::from(f.block_elems())).checked_mul(u128::from(f.block_bytes()))?
            }
            // Past 128 bits: surely past 64 unless a dimension is zero.
            None if shape.contains(&0) => 0,
            None => return None,
        };
        u64::try_from(bytes).ok()
    }

    fn any_format() -> impl Strategy<Value = WeightFormat> {
        prop::sample::select(WeightFormat::ALL.to_vec())
    }

    /// Dimensions from tiny to absurd, so both sides of the 64-bit edge are visited.
    fn any_dim() -> impl Strategy<Value = u64> {
        prop_oneof![0u64..64, 0u64..1 << 20, any::<u64>(), Just(u64::MAX)]
    }

    proptest! {
        #[test]
        fn rows_times_row_bytes_is_tensor_bytes(f in any_format(), rows in 0u64..1 << 24, cols in 0u64..1 << 24) {
            let cols = cols / f.block_elems() * f.block_elems();
            let row = f.row_bytes(cols).unwrap();
            prop_assert_eq!(f.tensor_bytes(&[rows, cols]), Ok(row * rows));
            prop_assert_eq!(f.tensor_bytes(&[cols]), Ok(row));
        }

        #[test]
        fn more_values_never_take_fewer_bytes(
            f in any_format(),
            a in 0u64..1 << 40,
            b in 0u64..1 << 40,
            rows in 0u64..1 << 20,
            more_rows in 0u64..1 << 20,
        ) {
            let whole = |n: u64| n / f.block_elems() * f.block_elems();
            let (lo, hi) = (whole(a.min(b)), whole(a.max(b)));
            prop_assert!(f.row_bytes(lo).unwrap() <= f.row_bytes(hi).unwrap());
            let cols = whole(a >> 20);
            prop_assert!(
                f.tensor_bytes(&[rows, cols]).unwrap()
                    <= f.tensor_bytes(&[rows + more_rows, cols]).unwrap()
            );
        }

        #[test]
        fn any_shape_gives_the_exact_bytes_or_a_typed_error(f in any_format(), shape in prop::collection::vec(any_dim(), 0..5)) {
            let cols = shape.last().copied().unwrap_or(1);
            match (f.tensor_bytes(&shape), reference_bytes(f, &shape)) {
                (Ok(got), Some(want)) => prop_assert_eq!(got, want),
                (Err(FormatError::Overflow { format, shape: s }), None) => {
                    prop_assert_eq!(format, f);
                    prop_assert_eq!(s, shape);
                }
                (Err(FormatError::PartialBlock { .. }), _) => {
                    prop_assert!(!cols.is_multiple_of(f.block_elems()));
                }
                (got, want) => prop_assert!(false, "{shape:?} in {f}: {got:?}, reference {want:?}"),
            }
        }
    }
}
