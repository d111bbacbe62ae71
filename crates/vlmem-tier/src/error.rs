//! The one error type of the tier crate. Every variant carries the numbers and names a
//! caller needs to act on it; none of them means "the source copy is gone": a failed move
//! leaves its source untouched.

use crate::fault::IoPoint;
use vlmem_core::{AllocError, Tier};

/// Why a tier operation or a transfer failed.
#[derive(Debug, thiserror::Error)]
pub enum TierError {
    /// The tier's arena could not reserve the space.
    #[error("{tier:?} tier: {source}")]
    Alloc {
        /// The tier that refused.
        tier: Tier,
        /// The allocator's reason.
        #[source]
        source: AllocError,
    },
    /// The disk (or a file system under it) is full: ENOSPC. Free space or name another
    /// swap directory; the data being written is still in its source tier.
    #[error("{tier:?} tier full (ENOSPC) at {point:?}, offset {offset_bytes}, {len_bytes} bytes")]
    NoSpace {
        /// The tier written to.
        tier: Tier,
        /// Where the error came from.
        point: IoPoint,
        /// Arena offset of the failed operation.
        offset_bytes: u64,
        /// Bytes of the failed operation.
        len_bytes: u64,
    },
    /// An I/O error other than ENOSPC (EIO, EINVAL, ...).
    #[error(
        "{tier:?} tier I/O error at {point:?}, offset {offset_bytes}, {len_bytes} bytes: {source}"
    )]
    Io {
        /// The tier.
        tier: Tier,
        /// Where the error came from.
        point: IoPoint,
        /// Arena offset of the failed operation.
        offset_bytes: u64,
        /// Bytes of the failed operation.
        len_bytes: u64,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// A read returned fewer bytes than asked for (and retrying made no progress).
    #[error(
        "{tier:?} tier short read at offset {offset_bytes}: {got_bytes} of {expected_bytes} bytes"
    )]
    ShortRead {
        /// The tier.
        tier: Tier,
        /// Arena offset of the read.
        offset_bytes: u64,
        /// Bytes asked for.
        expected_bytes: u64,
        /// Bytes obtained.
        got_bytes: u64,
    },
    /// A write stored fewer bytes than asked for (and retrying made no progress).
    #[error(
        "{tier:?} tier short write at offset {offset_bytes}: {got_bytes} of {expected_bytes} bytes"
    )]
    ShortWrite {
        /// The tier.
        tier: Tier,
        /// Arena offset of the write.
        offset_bytes: u64,
        /// Bytes asked for.
        expected_bytes: u64,
        /// Bytes stored.
        got_bytes: u64,
    },
    /// The bytes read back are not the bytes written: a CRC32C mismatch or a failed AEAD
    /// tag. The data is refused; the tensor must be fetched from another copy.
    #[error(
        "tensor `{tensor}` is corrupt on the {tier:?} tier at byte {offset_in_tensor_bytes}: {detail}"
    )]
    Corrupt {
        /// The tier.
        tier: Tier,
        /// The tensor's name (as given when it was reserved).
        tensor: String,
        /// Offset of the failed integrity unit inside the tensor.
        offset_in_tensor_bytes: u64,
        /// What did not match (CRC32C values, or "authentication tag").
        detail: String,
    },
    /// A read of bytes that were never written, or whose write failed.
    #[error(
        "tensor `{tensor}` on the {tier:?} tier has no valid data at byte {offset_in_tensor_bytes} (never written, or its write failed)"
    )]
    NotWritten {
        /// The tier.
        tier: Tier,
        /// The tensor's name.
        tensor: String,
        /// Offset inside the tensor.
        offset_in_tensor_bytes: u64,
    },
    /// The reservation is not live on this tier (released, stale, or from another tier).
    #[error(
        "{tier:?} tier: no live reservation at offset {offset_bytes} (released, stale or foreign)"
    )]
    InvalidReservation {
        /// The tier asked.
        tier: Tier,
        /// The reservation's offset.
        offset_bytes: u64,
    },
    /// A range outside the reservation.
    #[error(
        "{tier:?} tier: range {offset_bytes}+{len_bytes} exceeds the reservation's {limit_bytes} bytes"
    )]
    OutOfRange {
        /// The tier.
        tier: Tier,
        /// Offset inside the reservation.
        offset_bytes: u64,
        /// Length asked for.
        len_bytes: u64,
        /// The reservation's length.
        limit_bytes: u64,
    },
    /// A disk write that does not start on an integrity unit or does not end on one (or at
    /// the tensor's end).
    #[error(
        "disk write at {offset_bytes}+{len_bytes} is not aligned to the {unit_bytes}-byte integrity unit"
    )]
    Misaligned {
        /// Offset inside the tensor.
        offset_bytes: u64,
        /// Length of the write.
        len_bytes: u64,
        /// The unit it must align to.
        unit_bytes: u64,
    },
    /// Another thread is writing these bytes (or reading them while this is a write).
    #[error(
        "{tier:?} tier: reservation at offset {offset_bytes} is busy with a conflicting access"
    )]
    Busy {
        /// The tier.
        tier: Tier,
        /// The reservation's offset.
        offset_bytes: u64,
    },
    /// A write to a read-only extent (a tensor registered in place in a checkpoint).
    #[error("tensor `{tensor}` is a read-only extent of a checkpoint file")]
    ReadOnly {
        /// The tensor's name.
        tensor: String,
    },
    /// Source and destination of a move differ in length.
    #[error("move of {src_bytes} bytes into a reservation of {dst_bytes} bytes")]
    LengthMismatch {
        /// Source length.
        src_bytes: u64,
        /// Destination length.
        dst_bytes: u64,
    },
    /// The tier named is not configured in the engine.
    #[error("the {0:?} tier is not configured")]
    NoSuchTier(Tier),
    /// The transfer was cancelled before it finished. Its destination holds no valid copy.
    #[error("transfer cancelled")]
    Cancelled,
    /// The engine's bounded queue is full (from `try_submit`): retry later.
    #[error("transfer queue full: {queued_jobs} jobs queued, limit {max_queued_jobs}")]
    QueueFull {
        /// Jobs waiting.
        queued_jobs: usize,
        /// The limit.
        max_queued_jobs: usize,
    },
    /// The engine has shut down.
    #[error("the transfer engine has shut down")]
    ShutDown,
    /// A configuration that cannot work; the message says which value to change.
    #[error("invalid tier configuration: {0}")]
    InvalidConfig(String),
    /// A tier call panicked (a bug in a backend): the operation that ran it failed, its
    /// destination holds no valid copy, and the engine went on serving other jobs.
    #[error("a tier call panicked: {detail}")]
    Panicked {
        /// The panic's message.
        detail: String,
    },
    /// The feature or device is not available here.
    #[error("unsupported: {0}")]
    Unsupported(String),
}

impl TierError {
    /// Maps an OS error from an I/O point into the typed error (ENOSPC becomes
    /// [`TierError::NoSpace`]).
    pub fn from_io(
        tier: Tier,
        point: IoPoint,
        offset_bytes: u64,
        len_bytes: u64,
        source: std::io::Error,
    ) -> Self {
        if source.raw_os_error() == Some(libc::ENOSPC)
            || source.kind() == std::io::ErrorKind::StorageFull
        {
            TierError::NoSpace {
                tier,
                point,
                offset_bytes,
                len_bytes,
            }
        } else {
            TierError::Io {
                tier,
                point,
                offset_bytes,
                len_bytes,
                source,
            }
        }
    }
}

/// Results of this crate.
pub type Result<T, E = TierError> = std::result::Result<T, E>;
