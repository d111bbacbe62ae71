//! Page-aligned heap buffers for O_DIRECT I/O (which needs the buffer address, the file
//! offset and the length aligned to the logical block size; 4096 covers every device here).
#![allow(unsafe_code)]

use crate::error::TierError;
use crate::sys::{HUGE_PAGE_BYTES, Mapping};
use std::alloc::Layout;
use std::ptr::NonNull;

/// Alignment of every I/O buffer and of every disk offset and length, in bytes.
pub const IO_ALIGN_BYTES: usize = 4096;

/// Rounds `n` up to a multiple of `align` (any non-zero value, not only a power of two);
/// `None` on overflow or when `align` is 0.
pub const fn round_up(n: u64, align: u64) -> Option<u64> {
    n.checked_next_multiple_of(align)
}

/// A zero-initialised buffer whose address is aligned to [`IO_ALIGN_BYTES`]: on the heap
/// when small, and from [`HUGE_PAGE_BYTES`] up its own mapping on transparent huge pages,
/// where an O_DIRECT read into it reaches the disk as a few large segments instead of one per
/// 4 KiB page (twice the read rate on our test VM's virtio disk: docs/BENCHMARKS.md,
/// "Disk reads on huge pages").
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len_bytes: usize,
    /// Bytes usable (the length rounded up to the alignment).
    capacity_bytes: usize,
    storage: Storage,
}

enum Storage {
    /// Allocated with this layout; freed in `drop`.
    Heap(Layout),
    /// Unmapped when dropped.
    Mapped(#[allow(dead_code)] Mapping),
}

// SAFETY: the buffer owns its allocation exclusively, like a `Vec<u8>`.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared references only allow reads, like `&[u8]`.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A buffer of `len_bytes` bytes (its allocation is rounded up to the alignment).
    pub fn new(len_bytes: usize) -> Result<Self, TierError> {
        let alloc_bytes = round_up(len_bytes.max(1) as u64, IO_ALIGN_BYTES as u64)
            .and_then(|v| usize::try_from(v).ok())
            .ok_or_else(|| TierError::InvalidConfig(format!("buffer of {len_bytes} bytes")))?;
        let no_room =
            || TierError::InvalidConfig(format!("cannot allocate a {alloc_bytes}-byte I/O buffer"));
        if alloc_bytes >= HUGE_PAGE_BYTES {
            // The kernel zero-fills the mapping's pages on first touch.
            let map_bytes = alloc_bytes
                .checked_next_multiple_of(HUGE_PAGE_BYTES)
                .ok_or_else(no_room)?;
            let map = Mapping::new(map_bytes, true).map_err(|_| no_room())?;
            let ptr = NonNull::new(map.ptr()).ok_or_else(no_room)?;
            return Ok(AlignedBuf {
                ptr,
                len_bytes,
                capacity_bytes: alloc_bytes,
                storage: Storage::Mapped(map),
            });
        }
        let layout = Layout::from_size_align(alloc_bytes, IO_ALIGN_BYTES)
            .map_err(|e| TierError::InvalidConfig(format!("buffer layout: {e}")))?;
        // SAFETY: the layout has a non-zero size (at least one alignment unit).
        let raw = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).ok_or_else(no_room)?;
        Ok(AlignedBuf {
            ptr,
            len_bytes,
            capacity_bytes: alloc_bytes,
            storage: Storage::Heap(layout),
        })
    }
    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len_bytes
    }
    /// Whether the buffer is empty.
    pub fn is_empty(&self) -> bool {
        self.len_bytes == 0
    }
    /// Bytes allocated (the length rounded up to the alignment); all of them may be used.
    pub fn capacity_bytes(&self) -> usize {
        self.capacity_bytes
    }
    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` points to `capacity_bytes >= len_bytes` initialised (zeroed) bytes
        // owned by `self`; the borrow ties the slice to `&self`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len_bytes) }
    }
    /// The bytes, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and `&mut self` makes the borrow exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len_bytes) }
    }
    /// The whole allocation (length rounded up to the alignment), mutably.
    pub fn full_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: the allocation holds `capacity_bytes` initialised bytes; exclusive borrow.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.capacity_bytes) }
    }
    /// Changes the length, up to the allocation's capacity (returns false when too long).
    pub fn set_len(&mut self, len_bytes: usize) -> bool {
        if len_bytes <= self.capacity_bytes {
            self.len_bytes = len_bytes;
            true
        } else {
            false
        }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if let Storage::Heap(layout) = self.storage {
            // SAFETY: allocated in `new` with exactly this layout, freed once here.
            unsafe { std::alloc::dealloc(self.ptr.as_ptr(), layout) }
        }
        // A mapping unmaps itself when `storage` drops.
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len_bytes", &self.len_bytes)
            .finish()
    }
}

/// Whether `buf` may be handed to O_DIRECT as is (address and length aligned).
pub fn is_io_aligned(buf: &[u8]) -> bool {
    (buf.as_ptr() as usize).is_multiple_of(IO_ALIGN_BYTES)
        && buf.len().is_multiple_of(IO_ALIGN_BYTES)
}

/// Copies `len_bytes` between two reservations of `tier` through one aligned staging buffer,
/// in pieces of about 4 MiB that are whole multiples of the tier's
/// [I/O unit](crate::TierBackend::io_unit_bytes) (one unit when the unit is larger), so each
/// piece is a write the tier accepts (the disk tier refuses writes that are not whole
/// integrity units). Within one reservation it is a `memmove`: when the destination lies
/// after an overlapping source, the pieces go from the last one down, so no piece reads
/// bytes an earlier piece already overwrote (each piece is written at the same place as
/// going forward, so the tier accepts the same writes).
pub(crate) fn copy_in_pieces<T: crate::TierBackend + ?Sized>(
    tier: &T,
    src: &crate::Reservation,
    src_offset_bytes: u64,
    dst: &crate::Reservation,
    dst_offset_bytes: u64,
    len_bytes: u64,
) -> Result<(), TierError> {
    const PIECE_BYTES: u64 = 4 << 20;
    crate::backend::check_range(tier.tier(), src, src_offset_bytes, len_bytes)?;
    crate::backend::check_range(tier.tier(), dst, dst_offset_bytes, len_bytes)?;
    if len_bytes == 0 {
        return Ok(());
    }
    let unit = tier.io_unit_bytes().max(1);
    let piece = (PIECE_BYTES / unit).max(1).saturating_mul(unit);
    let first = usize::try_from(len_bytes.min(piece))
        .map_err(|_| TierError::InvalidConfig(format!("a copy piece of {piece} bytes")))?;
    let mut buf = AlignedBuf::new(first)?;
    let pieces = len_bytes.div_ceil(piece);
    // A later piece of the destination overlaps an earlier piece of the source only when the
    // destination starts inside the source's range of the same reservation.
    let backwards = src == dst
        && dst_offset_bytes > src_offset_bytes
        && dst_offset_bytes < src_offset_bytes + len_bytes;
    for k in 0..pieces {
        let at = if backwards { pieces - 1 - k } else { k } * piece;
        let n = (len_bytes - at).min(piece);
        let _ = buf.set_len(n as usize);
        tier.read(src, src_offset_bytes + at, buf.as_mut_slice())?;
        tier.write(dst, dst_offset_bytes + at, buf.as_slice())?;
    }
    Ok(())
}
