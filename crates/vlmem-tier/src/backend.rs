//! The one backend trait of the three tiers, and the reservations it hands out.

use crate::error::{Result, TierError};
use vlmem_core::{ArenaUsage, Block, Tier};

/// Space reserved on one tier for one tensor: the arena block, and the tensor's own length
/// (the block may be larger, rounded up to the allocator's granule or the I/O alignment).
/// Made only by a [`TierBackend`]; given back with [`TierBackend::release`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Reservation {
    tier: Tier,
    block: Block,
    len_bytes: u64,
    in_place: bool,
}

impl Reservation {
    pub(crate) fn new(tier: Tier, block: Block, len_bytes: u64, in_place: bool) -> Self {
        Reservation {
            tier,
            block,
            len_bytes,
            in_place,
        }
    }
    /// The tier holding it.
    pub fn tier(&self) -> Tier {
        self.tier
    }
    /// The arena block (for a read-only extent: the extent's file offset and aligned span).
    pub fn block(&self) -> Block {
        self.block
    }
    /// The tensor's length in bytes.
    pub fn len_bytes(&self) -> u64 {
        self.len_bytes
    }
    /// Offset of the block in the tier's arena.
    pub fn offset_bytes(&self) -> u64 {
        self.block.offset_bytes()
    }
    /// Whether this is a read-only extent registered in place in an existing file.
    pub fn is_in_place(&self) -> bool {
        self.in_place
    }
    /// The key of this reservation in its tier's table.
    pub(crate) fn key(&self) -> u64 {
        if self.in_place {
            u64::from(self.block.slot())
        } else {
            self.block.offset_bytes()
        }
    }
}

/// A tier: an arena of bytes (device memory, host memory, swap files) whose space is managed
/// by an [`vlmem_core::OffsetAllocator`], with reads and writes of byte ranges.
///
/// Thread-safe. No implementation holds a lock across a copy or an I/O: concurrent
/// operations on different reservations run in parallel; a write to a reservation that is
/// being read or written elsewhere is refused with [`TierError::Busy`] (the manager never
/// does that: an entry being moved is in its Moving state).
pub trait TierBackend: Send + Sync + std::fmt::Debug {
    /// Which tier this is.
    fn tier(&self) -> Tier;
    /// A one-line description for reports, e.g. "simulated device (host memory), 2.0 GiB".
    fn describe(&self) -> String;
    /// Whether this backend simulates hardware that is not there (the simulated device).
    fn is_simulated(&self) -> bool {
        false
    }
    /// Size of the arena in bytes.
    fn capacity_bytes(&self) -> u64;
    /// Usage of the arena.
    fn usage(&self) -> ArenaUsage;
    /// Reserves space for a tensor of `len_bytes` bytes named `name` (the name is used in
    /// error messages, e.g. a checksum mismatch).
    fn reserve(&self, len_bytes: u64, name: &str) -> Result<Reservation>;
    /// Gives the space back. Refused with [`TierError::Busy`] while the reservation is being
    /// read or written.
    fn release(&self, res: Reservation) -> Result<()>;
    /// Writes `src` at `offset_bytes` inside the reservation.
    fn write(&self, res: &Reservation, offset_bytes: u64, src: &[u8]) -> Result<()>;
    /// Reads `dst.len()` bytes from `offset_bytes` inside the reservation.
    fn read(&self, res: &Reservation, offset_bytes: u64, dst: &mut [u8]) -> Result<()>;
    /// Copies `len_bytes` from one reservation of this tier to another (compaction,
    /// duplication). Within one reservation the two ranges may overlap: the bytes move as
    /// with `memmove` (the destination range ends up holding the source range's bytes as
    /// they were before the call), on every tier. The default goes through a bounded staging
    /// buffer, in pieces of whole [`TierBackend::io_unit_bytes`] (at least one unit), so
    /// every piece is a write the tier accepts whatever its unit; it copies the pieces from
    /// the last one down when the destination lies after an overlapping source.
    fn copy_range(
        &self,
        src: &Reservation,
        src_offset_bytes: u64,
        dst: &Reservation,
        dst_offset_bytes: u64,
        len_bytes: u64,
    ) -> Result<()> {
        crate::align::copy_in_pieces(
            self,
            src,
            src_offset_bytes,
            dst,
            dst_offset_bytes,
            len_bytes,
        )
    }
    /// For CPU-addressable tiers: lends `len_bytes` bytes at `offset_bytes` of the
    /// reservation to `f` for reading, with no copy. `None` when the tier cannot (the engine
    /// then stages through a buffer).
    fn read_with(
        &self,
        _res: &Reservation,
        _offset_bytes: u64,
        _len_bytes: u64,
        _f: &mut dyn FnMut(&[u8]) -> Result<()>,
    ) -> Option<Result<()>> {
        None
    }
    /// For CPU-addressable tiers: lends `len_bytes` bytes at `offset_bytes` to `f` for
    /// writing, with no copy. `None` when the tier cannot.
    fn write_with(
        &self,
        _res: &Reservation,
        _offset_bytes: u64,
        _len_bytes: u64,
        _f: &mut dyn FnMut(&mut [u8]) -> Result<()>,
    ) -> Option<Result<()>> {
        None
    }
    /// For CPU-addressable tiers: lends several disjoint ranges `(offset_bytes, len_bytes)`
    /// of one reservation to `f` at once for writing, one view per range in the order
    /// given, with no copy; only those ranges are locked (the bytes between them are not).
    /// Overlapping ranges are refused ([`TierError::Busy`]). `None` when the tier cannot.
    /// The default lends one range through [`TierBackend::write_with`] and cannot lend more.
    fn write_ranges_with(
        &self,
        res: &Reservation,
        ranges: &[(u64, u64)],
        f: &mut dyn FnMut(&mut [&mut [u8]]) -> Result<()>,
    ) -> Option<Result<()>> {
        match ranges {
            [(offset_bytes, len_bytes)] => {
                self.write_with(res, *offset_bytes, *len_bytes, &mut |bytes| f(&mut [bytes]))
            }
            _ => None,
        }
    }
    /// For CPU-addressable tiers: lends the whole bytes of every reservation in `items` at
    /// once (a batch), for reading. `None` when the tier cannot.
    fn read_many_with(
        &self,
        _items: &[Reservation],
        _f: &mut dyn FnMut(&[&[u8]]) -> Result<()>,
    ) -> Option<Result<()>> {
        None
    }
    /// For CPU-addressable tiers: lends the whole bytes of every reservation in `items` at
    /// once, for writing. The same reservation twice is refused ([`TierError::Busy`]).
    fn write_many_with(
        &self,
        _items: &[Reservation],
        _f: &mut dyn FnMut(&mut [&mut [u8]]) -> Result<()>,
    ) -> Option<Result<()>> {
        None
    }
    /// Writes whole small tensors (each `src` covers its reservation from offset 0). The
    /// disk tier coalesces adjacent ones into few large I/Os; the default writes one by one.
    /// The same reservation twice is refused ([`TierError::Busy`]), before anything is
    /// written.
    fn write_batch(&self, items: &[(Reservation, &[u8])]) -> Result<()> {
        refuse_repeats(self.tier(), items.iter().map(|(r, _)| r))?;
        for (res, src) in items {
            self.write(res, 0, src)?;
        }
        Ok(())
    }
    /// Reads whole small tensors; the disk tier coalesces adjacent ones.
    fn read_batch(&self, items: &mut [(Reservation, &mut [u8])]) -> Result<()> {
        for (res, dst) in items.iter_mut() {
            self.read(res, 0, dst)?;
        }
        Ok(())
    }
    /// Makes finished writes durable and surfaces deferred write errors (fdatasync on
    /// buffered disk files). A failure invalidates everything written since the last good
    /// flush (fsyncgate: a retried sync cannot be trusted).
    fn flush(&self) -> Result<()> {
        Ok(())
    }
    /// A mark of this tier's flush history (for tiers that [need a
    /// flush](TierBackend::needs_flush), the count of flushes that failed so far), taken by a
    /// writer before its first write and handed to [`TierBackend::flush_since`] after its
    /// last. The default is 0 (a tier whose flushes never fail).
    fn flush_epoch(&self) -> u64 {
        0
    }
    /// Flushes like [`TierBackend::flush`], and succeeds only when every flush that may have
    /// covered the writes made since `epoch` (a [`TierBackend::flush_epoch`] taken before
    /// the first of them) succeeded too: another writer's failed flush invalidates these
    /// writes (fsyncgate), and this writer's own, later flush succeeding does not bring them
    /// back. Then it returns that sync's error. It may fail a writer whose bytes the failed
    /// flush did not hold; it never reports `Ok` over bytes one invalidated. The default
    /// calls [`TierBackend::flush`].
    fn flush_since(&self, epoch: u64) -> Result<()> {
        let _ = epoch;
        self.flush()
    }
    /// Whether writes need a [`TierBackend::flush`] to be known good.
    fn needs_flush(&self) -> bool {
        false
    }
    /// The unit that chunked writes and reads must align to (the disk tier's integrity unit;
    /// 1 for memory tiers).
    fn io_unit_bytes(&self) -> u64 {
        1
    }
    /// The GPU address of `res`'s first byte, for kernels that read a pinned copy in place
    /// (the CUDA device tier); `None` for tiers whose bytes are not in GPU memory. The
    /// address stays valid while `res` is reserved.
    fn device_address(&self, res: &Reservation) -> Option<u64> {
        let _ = res;
        None
    }
}

/// Refuses a list naming one reservation twice ([`TierError::Busy`]: two writes of the same
/// bytes at once).
pub(crate) fn refuse_repeats<'a>(
    tier: Tier,
    items: impl Iterator<Item = &'a Reservation>,
) -> Result<()> {
    let mut seen = std::collections::HashSet::new();
    for res in items {
        if !seen.insert(*res) {
            return Err(TierError::Busy {
                tier,
                offset_bytes: res.offset_bytes(),
            });
        }
    }
    Ok(())
}

pub(crate) fn check_range(
    tier: Tier,
    res: &Reservation,
    offset_bytes: u64,
    len_bytes: u64,
) -> Result<()> {
    match offset_bytes.checked_add(len_bytes) {
        Some(end) if end <= res.len_bytes() => Ok(()),
        _ => Err(TierError::OutOfRange {
            tier,
            offset_bytes,
            len_bytes,
            limit_bytes: res.len_bytes(),
        }),
    }
}
