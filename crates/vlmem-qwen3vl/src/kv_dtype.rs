//! The KV cache's element type: how each token's keys and values are held between steps.
//!
//! Attention computes in f32; what the cache holds is the f32 keys and values rounded to a
//! [`KvDtype`]. A layer's keys of one token are one *row* of `kv_heads * head_dim` values, its
//! values another; a token's entry in the cache is its key row then its value row, each
//! encoded on its own ([`KvDtype::token_bytes`]).
//!
//! - [`KvDtype::F32`]: 4 bytes a value, exact (in the machine's byte order: the cache never
//!   leaves the process).
//! - [`KvDtype::Bf16`]: 2 bytes a value, little-endian, rounded to nearest (ties to even):
//!   each value moves by at most `2^-8` of its magnitude (8 significant bits).
//! - [`KvDtype::Q8_0`]: blocks of 32 values, an f16 scale `d = max|x| / 127` and 32 signed
//!   bytes (34 bytes a block, [`crate::format::q8_0`]'s layout and rounding): each value moves
//!   by at most `d / 2`, plus `127 * d * 2^-11` from rounding the scale to f16. A row must be
//!   whole blocks (`kv_heads * head_dim` a multiple of 32: every Qwen3-VL has `head_dim`
//!   128); a block may span two heads when `head_dim` is smaller than 32.
//!
//! The planner sizes the KV budgets with [`KvDtype::token_bytes`]; the runner's KV stores
//! encode on append and widen to f32 on read, so prefill and decode attend over the same
//! rounded values.

use crate::format::{FormatError, q8_0};
use half::bf16;
use serde::{Serialize, Serializer};
use std::fmt;
use std::str::FromStr;
use thiserror::Error;

/// The element type of the KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum KvDtype {
    /// IEEE single: 4 bytes a value, exact.
    F32,
    /// bfloat16: 2 bytes a value, each within `2^-8` of its magnitude. The default: half the
    /// bytes of f32 for a rounding far below the weights' own (bf16 checkpoints).
    #[default]
    Bf16,
    /// Blocks of 32 values as an f16 scale and 32 `i8` (34 bytes), each value within half a
    /// step (`max|x| / 254`) of its block.
    Q8_0,
}

/// Sizes or values a [`KvDtype`] cannot hold.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum KvDtypeError {
    /// A row that is not a whole number of the dtype's blocks.
    #[error(
        "a KV row of {values} values is not a whole number of {dtype} blocks of {block_elems} \
         values (kv_heads x head_dim must be a multiple of {block_elems})"
    )]
    PartialBlock {
        /// The dtype asked for.
        dtype: KvDtype,
        /// Values in the row.
        values: u64,
        /// Values per block of that dtype.
        block_elems: u64,
    },
    /// A buffer whose length does not match the values it should hold.
    #[error("{what}: {have} where {dtype} needs {want}")]
    Length {
        /// What was being converted.
        what: &'static str,
        /// The dtype.
        dtype: KvDtype,
        /// The length given.
        have: usize,
        /// The length the other buffer implies.
        want: usize,
    },
    /// A block without a finite f16 scale: a value is NaN or infinite, or past `127 * 65504`.
    #[error(
        "block {block} of {dtype} KV has no finite f16 scale: a key or value is NaN or \
         infinite, or past 127 x 65504 in magnitude"
    )]
    OutOfRange {
        /// The dtype.
        dtype: KvDtype,
        /// The block's index among the values given.
        block: usize,
    },
    /// The byte count does not fit in 64 bits.
    #[error("{values} KV values in {dtype} are more bytes than 64 bits count")]
    Overflow {
        /// The dtype.
        dtype: KvDtype,
        /// Values asked for.
        values: u64,
    },
}

/// A name that is not one of [`KvDtype::ALL`]'s.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("unknown KV dtype '{name}': use one of {}", KvDtype::names().join(", "))]
pub struct ParseKvDtypeError {
    /// The name given.
    pub name: String,
}

impl KvDtype {
    /// Every dtype, in the order help texts list them.
    pub const ALL: [KvDtype; 3] = [KvDtype::F32, KvDtype::Bf16, KvDtype::Q8_0];

    /// The name the command line and reports use ("f32", "bf16", "q8_0").
    pub const fn name(self) -> &'static str {
        match self {
            KvDtype::F32 => "f32",
            KvDtype::Bf16 => "bf16",
            KvDtype::Q8_0 => "q8_0",
        }
    }

    /// Every dtype's [`name`](Self::name).
    pub fn names() -> Vec<&'static str> {
        Self::ALL.iter().map(|d| d.name()).collect()
    }

    /// Values per block.
    pub const fn block_elems(self) -> u64 {
        match self {
            KvDtype::F32 | KvDtype::Bf16 => 1,
            KvDtype::Q8_0 => q8_0::BLOCK_ELEMS as u64,
        }
    }

    /// Bytes per block.
    pub const fn block_bytes(self) -> u64 {
        match self {
            KvDtype::F32 => 4,
            KvDtype::Bf16 => 2,
            KvDtype::Q8_0 => q8_0::BLOCK_BYTES as u64,
        }
    }

    /// Bytes of `values` values: a whole number of blocks, else an error.
    pub fn row_bytes(self, values: u64) -> Result<u64, KvDtypeError> {
        let block_elems = self.block_elems();
        if !values.is_multiple_of(block_elems) {
            return Err(KvDtypeError::PartialBlock {
                dtype: self,
                values,
                block_elems,
            });
        }
        (values / block_elems)
            .checked_mul(self.block_bytes())
            .ok_or(KvDtypeError::Overflow {
                dtype: self,
                values,
            })
    }

    /// Bytes of one token's keys and values in one layer: two rows of `kv_heads * head_dim`
    /// values, each whole blocks.
    pub fn token_bytes(self, kv_heads: u64, head_dim: u64) -> Result<u64, KvDtypeError> {
        let values = kv_heads
            .checked_mul(head_dim)
            .ok_or(KvDtypeError::Overflow {
                dtype: self,
                values: u64::MAX,
            })?;
        self.row_bytes(values)?
            .checked_mul(2)
            .ok_or(KvDtypeError::Overflow {
                dtype: self,
                values,
            })
    }

    /// Bytes of `values` values as a `usize`.
    fn bytes_of(self, values: usize) -> Result<usize, KvDtypeError> {
        usize::try_from(self.row_bytes(values as u64)?).map_err(|_| KvDtypeError::Overflow {
            dtype: self,
            values: values as u64,
        })
    }

    /// Checks that `have` bytes are exactly `values` values'.
    fn check_lengths(
        self,
        what: &'static str,
        values: usize,
        have: usize,
    ) -> Result<(), KvDtypeError> {
        let want = self.bytes_of(values)?;
        if have != want {
            return Err(KvDtypeError::Length {
                what,
                dtype: self,
                have,
                want,
            });
        }
        Ok(())
    }

    /// Encodes `values` (whole blocks) into `out`, exactly their bytes. Rows of whole blocks
    /// laid end to end are encoded row by row this way (no block straddles two rows).
    pub fn encode_into(self, values: &[f32], out: &mut [u8]) -> Result<(), KvDtypeError> {
        self.check_lengths("encoding KV", values.len(), out.len())?;
        match self {
            KvDtype::F32 => {
                for (o, v) in out.chunks_exact_mut(4).zip(values) {
                    o.copy_from_slice(&v.to_ne_bytes());
                }
            }
            KvDtype::Bf16 => {
                for (o, &v) in out.chunks_exact_mut(2).zip(values) {
                    o.copy_from_slice(&bf16::from_f32(v).to_le_bytes());
                }
            }
            KvDtype::Q8_0 => q8_0::quantize_row_into(values, out).map_err(|e| self.format(e))?,
        }
        Ok(())
    }

    /// `values` encoded (see [`KvDtype::encode_into`]) into new bytes.
    pub fn encode(self, values: &[f32]) -> Result<Vec<u8>, KvDtypeError> {
        let mut out = vec![0u8; self.bytes_of(values.len())?];
        self.encode_into(values, &mut out)?;
        Ok(out)
    }

    /// Widens `bytes` (as [`KvDtype::encode_into`] wrote them) into `out`, exactly the values
    /// they hold.
    pub fn decode_into(self, bytes: &[u8], out: &mut [f32]) -> Result<(), KvDtypeError> {
        self.check_lengths("decoding KV", out.len(), bytes.len())?;
        match self {
            KvDtype::F32 => {
                for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                    *o = f32::from_ne_bytes([b[0], b[1], b[2], b[3]]);
                }
            }
            KvDtype::Bf16 => {
                for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = bf16_bits_to_f32([b[0], b[1]]);
                }
            }
            KvDtype::Q8_0 => q8_0::dequantize_row_into(bytes, out).map_err(|e| self.format(e))?,
        }
        Ok(())
    }

    /// Widens in place: on entry the first [`row_bytes`](Self::row_bytes)`(buf.len())` bytes
    /// of `buf`'s memory hold `buf.len()` values as [`KvDtype::encode_into`] wrote them (as a
    /// paged cache's bytes are read into the front of an f32 buffer); on return `buf` holds
    /// the values. Every encoding takes at most 4 bytes a value, so the values are widened a
    /// chunk at a time from the last chunk back: a chunk's bytes are copied out first, and
    /// its values land only over bytes of chunks already widened.
    pub fn decode_in_place(self, buf: &mut [f32]) -> Result<(), KvDtypeError> {
        /// Values widened at a time: whole blocks of every dtype.
        const CHUNK_VALUES: usize = 256;
        let n = buf.len();
        self.row_bytes(n as u64)?;
        if self == KvDtype::F32 {
            return Ok(());
        }
        let (block_elems, block_bytes) = (self.block_elems() as usize, self.block_bytes() as usize);
        let per_chunk = CHUNK_VALUES / block_elems * block_elems;
        // A chunk's bytes and the parts of the f32 elements either side of them.
        let mut raw = [0u8; 4 * CHUNK_VALUES + 8];
        for chunk in (0..n.div_ceil(per_chunk)).rev() {
            let first = chunk * per_chunk;
            let values = per_chunk.min(n - first);
            let (start, len) = (
                first / block_elems * block_bytes,
                values / block_elems * block_bytes,
            );
            let elems = &buf[start / 4..(start + len).div_ceil(4)];
            for (dst, v) in raw.chunks_exact_mut(4).zip(elems) {
                dst.copy_from_slice(&v.to_ne_bytes());
            }
            let off = start % 4;
            self.decode_into(&raw[off..off + len], &mut buf[first..first + values])?;
        }
        Ok(())
    }

    /// `values` rounded as the cache would hold them (encoded, then widened).
    pub fn round_trip(self, values: &[f32]) -> Result<Vec<f32>, KvDtypeError> {
        let bytes = self.encode(values)?;
        let mut out = vec![0f32; values.len()];
        self.decode_into(&bytes, &mut out)?;
        Ok(out)
    }

    /// A [`FormatError`] of the q8_0 rows as this dtype's error.
    fn format(self, e: FormatError) -> KvDtypeError {
        match e {
            FormatError::PartialBlock {
                cols, block_elems, ..
            } => KvDtypeError::PartialBlock {
                dtype: self,
                values: cols,
                block_elems,
            },
            FormatError::Length {
                what, have, want, ..
            } => KvDtypeError::Length {
                what,
                dtype: self,
                have,
                want,
            },
            FormatError::OutOfRange { block, .. } => {
                KvDtypeError::OutOfRange { dtype: self, block }
            }
            FormatError::Overflow { shape, .. } => KvDtypeError::Overflow {
                dtype: self,
                values: shape.first().copied().unwrap_or(u64::MAX),
            },
        }
    }
}

/// A bf16's little-endian bytes as the f32 it is exactly (its bits are the f32's top half).
#[inline]
fn bf16_bits_to_f32(le: [u8; 2]) -> f32 {
    f32::from_bits(u32::from(u16::from_le_bytes(le)) << 16)
}

impl fmt::Display for KvDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for KvDtype {
    type Err = ParseKvDtypeError;

    /// Parses a [`name`](KvDtype::name), ignoring ASCII case and surrounding blanks.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|d| d.name().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| ParseKvDtypeError {
                name: s.to_string(),
            })
    }
}

impl Serialize for KvDtype {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Values of many magnitudes and both signs, deterministic.
    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let h = (i as u32 ^ seed).wrapping_mul(2654435761).rotate_left(7);
                let unit = (h % 20_001) as f32 / 10_000.0 - 1.0;
                unit * 10f32.powi((h % 7) as i32 - 3)
            })
            .collect()
    }

    /// Whether `b` is within q8_0's bound of `a` in a block of scale `d` (`max|x| / 127`):
    /// half a step, the scale's rounding to f16 over at most 127 steps, and an ulp of `a`
    /// for the f32 product `x * (1 / d)` at a tie.
    fn within_q8_0_bound(a: f32, b: f32, d: f32) -> bool {
        let d = f64::from(d);
        let bound = d / 2.0 + 127.0 * d * 2f64.powi(-11) + f64::from(a.abs() * f32::EPSILON);
        (f64::from(a) - f64::from(b)).abs() <= bound
    }

    #[test]
    fn names_parse_and_print_both_ways() {
        for d in KvDtype::ALL {
            assert_eq!(d.to_string().parse::<KvDtype>(), Ok(d));
            assert_eq!(
                serde_json::to_string(&d).unwrap(),
                format!("\"{}\"", d.name())
            );
        }
        assert_eq!(" BF16 ".parse::<KvDtype>(), Ok(KvDtype::Bf16));
        assert_eq!("Q8_0".parse::<KvDtype>(), Ok(KvDtype::Q8_0));
        let err = "f16".parse::<KvDtype>().unwrap_err();
        assert!(err.to_string().contains("f32, bf16, q8_0"), "{err}");
        assert_eq!(KvDtype::default(), KvDtype::Bf16);
    }

    /// qwen3-vl-2b (8 KV heads x 128) per layer and token: 8 KiB in f32, 4 KiB in bf16,
    /// 2 x 32 blocks of 34 bytes in q8_0; the tiny fixtures (2 x 16) are one q8_0 block a row.
    #[test]
    fn token_bytes_by_hand() {
        assert_eq!(KvDtype::F32.token_bytes(8, 128), Ok(8192));
        assert_eq!(KvDtype::Bf16.token_bytes(8, 128), Ok(4096));
        assert_eq!(KvDtype::Q8_0.token_bytes(8, 128), Ok(2 * 32 * 34));
        assert_eq!(KvDtype::Q8_0.token_bytes(2, 16), Ok(2 * 34));
        assert_eq!(KvDtype::Bf16.token_bytes(3, 5), Ok(60));
        assert_eq!(KvDtype::F32.token_bytes(0, 128), Ok(0));
    }

    #[test]
    fn sizes_that_are_not_whole_blocks_or_overflow_are_typed_errors() {
        assert_eq!(
            KvDtype::Q8_0.token_bytes(3, 5),
            Err(KvDtypeError::PartialBlock {
                dtype: KvDtype::Q8_0,
                values: 15,
                block_elems: 32
            })
        );
        assert!(matches!(
            KvDtype::Q8_0.token_bytes(1, 48),
            Err(KvDtypeError::PartialBlock { values: 48, .. })
        ));
        assert!(matches!(
            KvDtype::F32.token_bytes(u64::MAX, 2),
            Err(KvDtypeError::Overflow { .. })
        ));
        assert!(matches!(
            KvDtype::F32.token_bytes(1 << 62, 1),
            Err(KvDtypeError::Overflow { .. })
        ));
        // Conversions: a partial block, or buffers of the wrong length.
        assert!(matches!(
            KvDtype::Q8_0.encode(&[0.0; 33]),
            Err(KvDtypeError::PartialBlock { values: 33, .. })
        ));
        assert!(matches!(
            KvDtype::Bf16.encode_into(&[0.0; 4], &mut [0u8; 7]),
            Err(KvDtypeError::Length {
                have: 7,
                want: 8,
                ..
            })
        ));
        assert!(matches!(
            KvDtype::F32.decode_into(&[0u8; 8], &mut [0f32; 3]),
            Err(KvDtypeError::Length {
                have: 8,
                want: 12,
                ..
            })
        ));
        assert!(matches!(
            KvDtype::Q8_0.decode_into(&[0u8; 34], &mut [0f32; 31]),
            Err(KvDtypeError::PartialBlock { values: 31, .. })
        ));
        assert!(matches!(
            KvDtype::Q8_0.decode_in_place(&mut [0f32; 40]),
            Err(KvDtypeError::PartialBlock { values: 40, .. })
        ));
        // A value no q8_0 block can scale.
        let mut x = vec![1f32; 64];
        x[40] = f32::NAN;
        assert_eq!(
            KvDtype::Q8_0.encode(&x),
            Err(KvDtypeError::OutOfRange {
                dtype: KvDtype::Q8_0,
                block: 1
            })
        );
    }

    #[test]
    fn f32_is_exact_and_bf16_is_the_nearest_with_ties_to_even() {
        let x = values(256, 1);
        assert_eq!(KvDtype::F32.round_trip(&x).unwrap(), x);
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: to even (1). 1 + 3 * 2^-8 is halfway
        // between 1 + 2^-7 and 1 + 2^-6: to even (1 + 2^-6). Just past a half rounds up.
        let ties = [
            1.0 + 2f32.powi(-8),
            1.0 + 3.0 * 2f32.powi(-8),
            1.0 + 2f32.powi(-8) + 2f32.powi(-20),
            -(1.0 + 2f32.powi(-8)),
        ];
        assert_eq!(
            KvDtype::Bf16.round_trip(&ties).unwrap(),
            [1.0, 1.0 + 2f32.powi(-6), 1.0 + 2f32.powi(-7), -1.0]
        );
        let y = KvDtype::Bf16.round_trip(&x).unwrap();
        for (&a, &b) in x.iter().zip(&y).filter(|(a, _)| **a != 0.0) {
            assert!((a - b).abs() <= a.abs() * 2f32.powi(-8), "{a} -> {b}");
            // The nearest: the next bf16 either way is no closer.
            let bits = b.to_bits();
            for other in [bits.wrapping_add(1 << 16), bits.wrapping_sub(1 << 16)] {
                assert!(
                    (a - b).abs() <= (a - f32::from_bits(other)).abs(),
                    "{a} -> {b}"
                );
            }
        }
        assert_eq!(
            KvDtype::Bf16.encode(&[1.0]).unwrap(),
            0x3f80u16.to_le_bytes()
        );
    }

    #[test]
    fn q8_0_is_the_weight_formats_blocks() {
        let x = values(128, 2);
        let bytes = KvDtype::Q8_0.encode(&x).unwrap();
        assert_eq!(bytes, q8_0::quantize_row(&x).unwrap());
        let y = KvDtype::Q8_0.round_trip(&x).unwrap();
        for (xb, yb) in x.chunks(32).zip(y.chunks(32)) {
            let d = xb.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
            for (&a, &b) in xb.iter().zip(yb) {
                // Half a step, and the scale's rounding to f16 over at most 127 steps.
                assert!(within_q8_0_bound(a, b, d), "{a} -> {b}, d = {d}");
            }
        }
    }

    /// Widening in place gives what widening into another buffer does, for every dtype and
    /// length, including the first block (whose bytes the widened values overwrite).
    #[test]
    fn decoding_in_place_equals_decoding_into_a_copy() {
        for d in KvDtype::ALL {
            for blocks in [0usize, 1, 2, 7, 8, 9, 64, 77] {
                let n = blocks * 32;
                let x = values(n, blocks as u32 + 3);
                let bytes = d.encode(&x).unwrap();
                let mut want = vec![0f32; n];
                d.decode_into(&bytes, &mut want).unwrap();
                // The bytes at the front of an f32 buffer, the rest garbage.
                let mut buf: Vec<f32> = vec![f32::NAN; n];
                let mut raw: Vec<u8> = buf.iter().flat_map(|v| v.to_ne_bytes()).collect();
                raw[..bytes.len()].copy_from_slice(&bytes);
                for (v, c) in buf.iter_mut().zip(raw.chunks_exact(4)) {
                    *v = f32::from_ne_bytes([c[0], c[1], c[2], c[3]]);
                }
                d.decode_in_place(&mut buf).unwrap();
                assert_eq!(
                    buf.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    "{d}, {n} values"
                );
            }
        }
        // Odd lengths for the plain dtypes, within a chunk and across chunks.
        for n in [5usize, 513] {
            let x = values(n, 9);
            let bytes = KvDtype::Bf16.encode(&x).unwrap();
            let mut raw = vec![0u8; 4 * n];
            raw[..2 * n].copy_from_slice(&bytes);
            let mut buf: Vec<f32> = raw
                .chunks_exact(4)
                .map(|c| f32::from_ne_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            KvDtype::Bf16.decode_in_place(&mut buf).unwrap();
            assert_eq!(buf, KvDtype::Bf16.round_trip(&x).unwrap(), "{n} values");
        }
    }

    proptest! {
        #[test]
        fn a_round_trip_stays_within_each_dtypes_bound(
            x in (1usize..5).prop_flat_map(|blocks| prop::collection::vec(
                prop_oneof![-1.0e4f32..1.0e4, -1.0f32..1.0, -1e-3f32..1e-3, Just(0.0)],
                blocks * 32,
            )),
        ) {
            prop_assert_eq!(KvDtype::F32.round_trip(&x).unwrap(), x.clone());
            for (&a, &b) in x.iter().zip(&KvDtype::Bf16.round_trip(&x).unwrap()) {
                prop_assert!((a - b).abs() <= a.abs() * 2f32.powi(-8));
            }
            let y = KvDtype::Q8_0.round_trip(&x).unwrap();
            for (xb, yb) in x.chunks(32).zip(y.chunks(32)) {
                let d = xb.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
                for (&a, &b) in xb.iter().zip(yb) {
                    prop_assert!(within_q8_0_bound(a, b, d));
                }
            }
        }
    }
}
