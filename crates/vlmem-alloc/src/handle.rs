//! Allocator ids and block-handle generations, shared by every allocator in this crate.
//!
//! Each allocator gets a process-unique id and a random per-allocator `salt`. A slot's
//! generation is bumped each time the slot becomes live; the generation written into a
//! [`Block`](vlmem_core::Block) is `generation + salt` (wrapping), so a block made up by hand
//! with a small generation is refused as foreign rather than mistaken for a live one.
//! Generations are 32-bit and wrap after 2^32 allocations of one slot; the classification
//! below treats a generation up to 2^31 behind the current one as stale.

use std::hash::{BuildHasher, Hasher};
use vlmem_core::AllocError;

/// A fresh allocator id (never 0) and its salt.
pub(crate) fn new_identity() -> (u32, u32) {
    let id = vlmem_core::new_allocator_id();
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(id);
    let salt = (h.finish() >> 16) as u32;
    (id, salt)
}

/// The generation as written into a block.
pub(crate) const fn encode_generation(generation: u32, salt: u32) -> u32 {
    generation.wrapping_add(salt)
}

/// The slot generation a block claims.
pub(crate) const fn decode_generation(block_generation: u32, salt: u32) -> u32 {
    block_generation.wrapping_sub(salt)
}

/// Why a free of a block that does not match a live slot was refused.
///
/// `claimed` is the decoded generation from the block, `current` the slot's generation now,
/// `live` whether the slot currently holds a live block.
pub(crate) fn classify_bad_free(
    allocator_id: u32,
    offset_bytes: u64,
    claimed: u32,
    current: u32,
    live: bool,
) -> AllocError {
    let behind = current.wrapping_sub(claimed);
    if behind == 0 && !live {
        AllocError::DoubleFree { offset_bytes }
    } else if behind != 0 && behind < (1 << 31) {
        AllocError::Stale { offset_bytes }
    } else {
        AllocError::Foreign {
            allocator_id,
            offset_bytes,
        }
    }
}

/// `bytes` rounded up to whole units of `unit_bytes` (a power of two, `unit_shift` its log2).
pub(crate) fn units_for(bytes: u64, unit_shift: u32) -> u64 {
    let mask = (1u64 << unit_shift) - 1;
    (bytes >> unit_shift) + u64::from(bytes & mask != 0)
}

/// Validates a unit size: a power of two of at least one byte. Returns its log2.
pub(crate) fn unit_shift(name: &str, unit_bytes: u64) -> Result<u32, AllocError> {
    if unit_bytes == 0 || !unit_bytes.is_power_of_two() {
        return Err(AllocError::InvalidConfig(format!(
            "{name} must be a power of two of at least 1 byte, got {unit_bytes}"
        )));
    }
    Ok(unit_bytes.trailing_zeros())
}

#[cfg(all(test, not(vlmem_loom)))]
mod tests {
    use super::*;

    #[test]
    fn generations_round_trip_and_classify() {
        let (id, salt) = new_identity();
        let (id2, _) = new_identity();
        assert_ne!(id, id2);
        assert_ne!(id, 0);
        assert_eq!(decode_generation(encode_generation(7, salt), salt), 7);
        assert_eq!(
            classify_bad_free(id, 0, 5, 5, false),
            AllocError::DoubleFree { offset_bytes: 0 }
        );
        assert_eq!(
            classify_bad_free(id, 8, 5, 6, true),
            AllocError::Stale { offset_bytes: 8 }
        );
        assert!(matches!(
            classify_bad_free(id, 8, 9, 6, true),
            AllocError::Foreign { .. }
        ));
        assert_eq!(units_for(0, 12), 0);
        assert_eq!(units_for(1, 12), 1);
        assert_eq!(units_for(4096, 12), 1);
        assert_eq!(units_for(4097, 12), 2);
        assert_eq!(units_for(u64::MAX, 0), u64::MAX);
        assert_eq!(units_for(u64::MAX, 12), 1 << 52);
        assert!(unit_shift("x", 3).is_err());
        assert!(unit_shift("x", 0).is_err());
        assert_eq!(unit_shift("x", 4096).ok(), Some(12));
    }
}
