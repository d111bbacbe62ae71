//! Byte sizes as users write them ("0", "512MiB", "2GiB", "1.5GB", "4096") and as we print them.

use thiserror::Error;

/// 1 KiB in bytes.
pub const KIB: u64 = 1 << 10;
/// 1 MiB in bytes.
pub const MIB: u64 = 1 << 20;
/// 1 GiB in bytes.
pub const GIB: u64 = 1 << 30;

/// A size string that could not be read.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ParseBytesError {
    /// Nothing was given.
    #[error("empty size: give a number of bytes, e.g. 0, 4096, 512MiB or 2GiB")]
    Empty,
    /// The number part is not a non-negative number.
    #[error("'{0}' is not a size: give a number of bytes, e.g. 0, 4096, 512MiB or 2GiB")]
    BadNumber(String),
    /// The unit is not one we know.
    #[error("unknown unit '{unit}' in '{input}': use B, KB, MB, GB, TB, KiB, MiB, GiB or TiB")]
    BadUnit {
        /// The whole input.
        input: String,
        /// The unit as written.
        unit: String,
    },
    /// The size does not fit in 64 bits.
    #[error("size '{0}' is larger than 2^64 bytes")]
    Overflow(String),
}

/// Parses a byte size. Units are case-insensitive; decimal (KB = 1000) and binary
/// (KiB = 1024) units are both accepted; a bare number is bytes. Fractions are allowed with a
/// unit ("1.5GiB") and rounded down to whole bytes.
pub fn parse_bytes(input: &str) -> Result<u64, ParseBytesError> {
    let s = input.trim();
    if s.is_empty() {
        return Err(ParseBytesError::Empty);
    }
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '_'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let num = num.replace('_', "");
    let unit = unit.trim();
    if num.is_empty() || num.chars().filter(|&c| c == '.').count() > 1 || num == "." {
        return Err(ParseBytesError::BadNumber(input.to_string()));
    }
    let multiplier: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "m" | "mb" => 1_000_000,
        "g" | "gb" => 1_000_000_000,
        "t" | "tb" => 1_000_000_000_000,
        "kib" => KIB,
        "mib" => MIB,
        "gib" => GIB,
        "tib" => 1 << 40,
        _ => {
            return Err(ParseBytesError::BadUnit {
                input: input.to_string(),
                unit: unit.to_string(),
            });
        }
    };
    if let Some((int_part, frac_part)) = num.split_once('.') {
        let int: u64 = if int_part.is_empty() {
            0
        } else {
            int_part
                .parse()
                .map_err(|_| ParseBytesError::Overflow(input.to_string()))?
        };
        let whole = int
            .checked_mul(multiplier)
            .ok_or_else(|| ParseBytesError::Overflow(input.to_string()))?;
        // The fraction: at most 18 digits matter for a u64 multiplier; compute in u128.
        let digits: String = frac_part.chars().take(18).collect();
        if digits.is_empty() {
            return Ok(whole);
        }
        let frac: u128 = digits
            .parse()
            .map_err(|_| ParseBytesError::BadNumber(input.to_string()))?;
        let scale = 10u128.pow(digits.len() as u32);
        let frac_bytes = (frac * multiplier as u128 / scale) as u64;
        whole
            .checked_add(frac_bytes)
            .ok_or_else(|| ParseBytesError::Overflow(input.to_string()))
    } else {
        let n: u64 = num
            .parse()
            .map_err(|_| ParseBytesError::Overflow(input.to_string()))?;
        n.checked_mul(multiplier)
            .ok_or_else(|| ParseBytesError::Overflow(input.to_string()))
    }
}

/// Formats bytes with a binary unit and two decimals ("1.50 GiB", "512 B").
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < KIB {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / KIB as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.2} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_common_sizes() {
        assert_eq!(parse_bytes("0"), Ok(0));
        assert_eq!(parse_bytes("4096"), Ok(4096));
        assert_eq!(parse_bytes("512MiB"), Ok(512 * MIB));
        assert_eq!(parse_bytes("2GiB"), Ok(2 * GIB));
        assert_eq!(parse_bytes("2 gib"), Ok(2 * GIB));
        assert_eq!(parse_bytes("1.5GiB"), Ok(GIB + GIB / 2));
        assert_eq!(parse_bytes("3GB"), Ok(3_000_000_000));
        assert_eq!(parse_bytes("1_000"), Ok(1000));
        assert_eq!(parse_bytes("16TiB"), Ok(16 << 40));
    }

    #[test]
    fn rejects_bad_sizes() {
        assert_eq!(parse_bytes(""), Err(ParseBytesError::Empty));
        assert!(matches!(
            parse_bytes("-1"),
            Err(ParseBytesError::BadNumber(_))
        ));
        assert!(matches!(
            parse_bytes("abc"),
            Err(ParseBytesError::BadNumber(_))
        ));
        assert!(matches!(
            parse_bytes("1.2.3GiB"),
            Err(ParseBytesError::BadNumber(_))
        ));
        assert!(matches!(
            parse_bytes("5 parsecs"),
            Err(ParseBytesError::BadUnit { .. })
        ));
        assert!(matches!(
            parse_bytes("99999999999TiB"),
            Err(ParseBytesError::Overflow(_))
        ));
        assert!(matches!(
            parse_bytes("99999999999999999999999"),
            Err(ParseBytesError::Overflow(_))
        ));
    }

    #[test]
    fn formats() {
        assert_eq!(format_bytes(512), "512 B");
        assert_eq!(format_bytes(1536), "1.50 KiB");
        assert_eq!(format_bytes(2 * GIB), "2.00 GiB");
    }

    proptest! {
        #[test]
        fn never_panics(s in ".{0,24}") {
            let _ = parse_bytes(&s);
        }

        #[test]
        fn plain_numbers_round_trip(n in any::<u64>()) {
            prop_assert_eq!(parse_bytes(&n.to_string()), Ok(n));
        }
    }
}
