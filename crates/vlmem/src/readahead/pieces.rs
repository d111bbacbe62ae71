//! The read-ahead's sizes: how large its buffers are for an area, how a streamed tensor is
//! cut into pieces (one buffer each), and where in a buffer a piece is read so that the
//! disk tier reads it with O_DIRECT, straight into place.

use std::ops::Range;
use vlmem_tier::IO_ALIGN_BYTES;

/// One read-ahead buffer: a piece of a streamed tensor ([`piece_ranges`]) at its file phase
/// ([`phase_range`]). A multiple of the huge page, so each buffer is two whole huge pages.
pub const STAGE_BUF_BYTES: usize = 4 << 20;

/// Reader threads of the read-ahead pool: reads in flight while pieces are queued (fio on
/// the development VM: 4 MiB reads at depth 1 1.09 GB/s, depth 2 1.66, depth 4 1.79; on the
/// same VM, `stream_sweep` example, 3 alternating rounds: the streamed decode read 1.16 GB/s
/// with 1 reader, 1.23 with 2, 1.32 with 4, on a disk that swung 0.87-1.5 GB/s).
pub const STREAM_READERS: usize = 4;

/// Buffers in the staging area: two per reader (one being read into, one read and waiting),
/// and the one the kernel is reading. Reads landing in a few buffers reused round after round
/// run at about the disk's probe speed on the test VM, and reads spread over a 64 MiB area
/// about 25% slower; 9 buffers kept the disk busier than 6 (0.96-0.97 of the decode time
/// against 0.92-0.95) and did better than 12 (docs/BENCHMARKS.md, "Streamed tensors piece by piece").
pub const STAGING_BUFFERS: usize = 2 * STREAM_READERS + 1;

/// The `len` bytes of `buf` (which has [`IO_ALIGN_BYTES`] to spare) whose address is
/// congruent to `file_offset` modulo [`IO_ALIGN_BYTES`]: the disk tier then reads the
/// tensor's aligned middle straight into them with O_DIRECT, with no copy.
pub fn phase_range(buf: &[u8], file_offset: u64, len: usize) -> Range<usize> {
    let align = IO_ALIGN_BYTES;
    let want = (file_offset % align as u64) as usize;
    let have = buf.as_ptr() as usize % align;
    let start = (want + align - have) % align;
    start..start + len
}

/// The read-ahead's buffer size for a staging area of `area_bytes`: [`STAGE_BUF_BYTES`] (4
/// MiB: about the request size this kind of disk serves fastest, ../shared/research/peers.md:
/// `dd iflag=direct` at 4 MiB beat 1, 16 and 64 MiB; fio on the development VM: 4 MiB at depth 4 beat
/// 1 MiB at depth 8 and 16 MiB at depth 1), or in an area too small for [`STAGING_BUFFERS`]
/// of them (a budget of a few MiB) an even share of it, else of half of it; at least three
/// alignment units, so a piece of at least one fits at any file phase. 0 when the area has
/// no room for two such buffers: nothing is read ahead.
pub fn stage_buf_bytes(area_bytes: u64) -> usize {
    let align = IO_ALIGN_BYTES as u64;
    let fit = |n: u64| (area_bytes / n / align * align).min(STAGE_BUF_BYTES as u64);
    let share = match fit(STAGING_BUFFERS as u64) {
        b if b >= 3 * align => b,
        _ => fit(2),
    };
    if share >= 3 * align {
        share as usize
    } else {
        0
    }
}

/// Bytes per piece of a streamed tensor, at most, with read-ahead buffers of `buf_bytes`: a
/// piece at its file phase fits one buffer ([`piece_ranges`] cuts pieces up to one
/// alignment unit longer than this, at a phase of up to one unit). With no buffers (0), the
/// largest size the buffers ever have: pieces are then only the points where a read on
/// demand may start.
pub fn piece_bytes(buf_bytes: usize) -> usize {
    if buf_bytes == 0 {
        STAGE_BUF_BYTES - 2 * IO_ALIGN_BYTES
    } else {
        buf_bytes
            .saturating_sub(2 * IO_ALIGN_BYTES)
            .max(IO_ALIGN_BYTES)
    }
}

/// The pieces a streamed tensor of `len` bytes at `file_offset` is read in: about
/// `piece_max` bytes each, at most ([`piece_bytes`]; the tensor split evenly), every boundary
/// between two pieces on a multiple of [`IO_ALIGN_BYTES`] in the file. In a phase-aligned
/// buffer ([`phase_range`]) each piece's aligned middle is then read with O_DIRECT straight
/// into place, and only the tensor's own unaligned head and tail go through the disk tier's
/// bounce buffer (not every piece's). Ranges are relative to the tensor, in order, and
/// cover `0..len`.
pub fn piece_ranges(file_offset: u64, len: usize, piece_max: usize) -> Vec<Range<usize>> {
    let align = IO_ALIGN_BYTES;
    let n = len.div_ceil(piece_max.max(1)).max(1);
    let target = len.div_ceil(n);
    // Bytes from the tensor's start to the first aligned file offset.
    let head = (align - (file_offset % align as u64) as usize) % align;
    let mut out = Vec::with_capacity(n);
    let mut start = 0;
    for k in 1..n {
        // The first aligned file offset at or after the even split point.
        let cut = head + (k * target).saturating_sub(head).div_ceil(align) * align;
        if cut > start && cut < len {
            out.push(start..cut);
            start = cut;
        }
    }
    out.push(start..len);
    out
}

#[cfg(all(test, not(any(vlmem_loom, vlmem_shuttle))))]
mod tests {
    use super::*;

    /// Pieces cover the tensor in order, just under 4 MiB each (each fits a read-ahead
    /// buffer at its file phase), and every boundary between two pieces is a 4 KiB aligned
    /// file offset.
    #[test]
    fn pieces_cover_the_tensor_on_aligned_file_offsets() {
        let mib = 1usize << 20;
        for (offset, len, pieces) in [
            (0u64, 4 * mib - 8192, 1),
            (0u64, 4 * mib, 2),
            (123, 4 * mib, 2),
            (8_000, 8 * mib, 3),
            (4096 * 7 + 5, 24 * mib, 7),
            (77, 24 * mib + 3, 7),
            (4095, 10, 1),
            (1, 0, 1),
        ] {
            let r = piece_ranges(offset, len, piece_bytes(STAGE_BUF_BYTES));
            assert_eq!(r.len(), pieces, "{offset} {len}: {r:?}");
            assert_eq!(r[0].start, 0);
            assert_eq!(r.last().unwrap().end, len);
            for w in r.windows(2) {
                assert_eq!(w[0].end, w[1].start);
                assert_eq!((offset + w[0].end as u64) % IO_ALIGN_BYTES as u64, 0);
            }
            // Each piece fits one read-ahead buffer at its file phase.
            for p in &r {
                let phase = (offset + p.start as u64) % IO_ALIGN_BYTES as u64;
                assert!(phase as usize + p.len() <= STAGE_BUF_BYTES, "{p:?}");
            }
        }
    }

    /// The read-ahead's buffers: 4 MiB each in an area with room for the full set, an even
    /// share of a smaller area (or of half of it), never less than three alignment units, and
    /// none when two of those do not fit; a piece cut for a buffer fits it at any phase.
    #[test]
    fn buffers_shrink_with_the_area_and_pieces_fit_them() {
        let (mib, kib) = (1u64 << 20, 1u64 << 10);
        let full = STAGING_BUFFERS as u64 * STAGE_BUF_BYTES as u64;
        assert_eq!(stage_buf_bytes(full), STAGE_BUF_BYTES);
        assert_eq!(stage_buf_bytes(256 * mib), STAGE_BUF_BYTES);
        assert_eq!(stage_buf_bytes(STAGING_BUFFERS as u64 * mib), mib as usize);
        // 50 KiB: a ninth is under 12 KiB, half of it is 24 KiB.
        assert_eq!(stage_buf_bytes(50 * kib), 24 * kib as usize);
        assert_eq!(stage_buf_bytes(23 * kib), 0);
        assert_eq!(stage_buf_bytes(0), 0);
        for buf in [
            12 * kib as usize,
            24 * kib as usize,
            mib as usize,
            STAGE_BUF_BYTES,
        ] {
            for offset in [0u64, 1, 4095, 4097, 123_456] {
                for len in [1, 4096, 4097, 3 * buf, 10 * buf + 17] {
                    for p in piece_ranges(offset, len, piece_bytes(buf)) {
                        let phase = (offset + p.start as u64) % IO_ALIGN_BYTES as u64;
                        assert!(
                            phase as usize + p.len() <= buf,
                            "{buf} {offset} {len} {p:?}"
                        );
                    }
                }
            }
        }
    }

    /// A piece is placed at its file's phase inside a buffer with one alignment unit to
    /// spare, whatever the buffer's own alignment.
    #[test]
    fn a_piece_lands_at_its_file_phase() {
        let buf = vec![0u8; 3 * IO_ALIGN_BYTES];
        for offset in [0u64, 1, 4095, 4096, 123_457] {
            let r = phase_range(&buf, offset, IO_ALIGN_BYTES);
            assert!(r.end <= buf.len());
            let addr = buf.as_ptr() as usize + r.start;
            assert_eq!(
                addr % IO_ALIGN_BYTES,
                (offset % IO_ALIGN_BYTES as u64) as usize
            );
        }
    }
}
