//! The machine's own bounds, measured in the same run as the decodes: the disk (`dd`, the
//! disk tier's O_DIRECT reads at several depths, over a weight file or over the streamed
//! tensors' extents), the memory read bandwidth, and the kernel's counters of what storage
//! did (`/proc/self/io`, the block device's `/sys/dev/block` counters).

use super::{MIB, push};
use crate::SuiteReport;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;
use vlmem::{ManagerConfig, MemoryManager, TensorKind};
use vlmem_qwen3vl::checkpoint::Checkpoint;
use vlmem_runner::kernels;

/// Bytes this process has read from storage (`read_bytes` of /proc/self/io: block-layer
/// reads, O_DIRECT included, page-cache hits excluded); `None` where unavailable.
pub(super) fn proc_read_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/io").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("read_bytes:"))
        .and_then(|v| v.trim().parse().ok())
}

/// The block device's own counters (`/sys/dev/block/MAJ:MIN/stat`, Linux) for the device
/// holding `file`: what the kernel saw the disk do, whoever asked.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct BlockStat {
    /// Read requests completed (after the block layer merged or split them).
    pub(super) reads: u64,
    /// Bytes read (sectors of 512 bytes).
    pub(super) read_bytes: u64,
    /// Milliseconds reads spent in flight, summed over reads (so the mean depth of the reads
    /// in flight is `read_ms / busy_ms`).
    pub(super) read_ms: u64,
    /// Milliseconds with at least one request in flight (`io_ticks`).
    pub(super) busy_ms: u64,
}

impl BlockStat {
    /// The counters of the device `file` lives on; `None` off Linux, for a file on no block
    /// device (tmpfs, overlay), or when the counters cannot be read.
    pub(super) fn of(file: &Path) -> Option<BlockStat> {
        use std::os::unix::fs::MetadataExt;
        let dev = std::fs::metadata(file).ok()?.dev();
        // glibc's gnu_dev_major / gnu_dev_minor.
        let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
        let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
        let text = std::fs::read_to_string(format!("/sys/dev/block/{major}:{minor}/stat")).ok()?;
        let f: Vec<u64> = text
            .split_whitespace()
            .map(|v| v.parse().ok())
            .collect::<Option<_>>()?;
        Some(BlockStat {
            reads: *f.first()?,
            read_bytes: f.get(2)?.saturating_mul(512),
            read_ms: *f.get(3)?,
            busy_ms: *f.get(9)?,
        })
    }

    /// The share of `secs` the device had a request in flight.
    pub(super) fn busy_share(self, secs: f64) -> f64 {
        self.busy_ms as f64 / (secs * 1e3)
    }

    /// GB/s read while the device was busy.
    pub(super) fn gbps_while_busy(self) -> f64 {
        self.read_bytes as f64 / (self.busy_ms.max(1) as f64 * 1e6)
    }

    pub(super) fn since(self, earlier: BlockStat) -> BlockStat {
        BlockStat {
            reads: self.reads.saturating_sub(earlier.reads),
            read_bytes: self.read_bytes.saturating_sub(earlier.read_bytes),
            read_ms: self.read_ms.saturating_sub(earlier.read_ms),
            busy_ms: self.busy_ms.saturating_sub(earlier.busy_ms),
        }
    }
}

/// Memory read bandwidth in GB/s: the best of several vectorized reads (with software
/// prefetch) of a buffer much larger than the caches, on all cores, on huge pages like the
/// host arena's.
pub(super) fn mem_read_gbps(len: usize) -> f64 {
    let mut mem = match vlmem_tier::HostBuffer::new(len, true) {
        Ok(m) => m,
        Err(_) => return 0.0,
    };
    for (i, b) in mem.as_mut_slice().iter_mut().enumerate() {
        *b = (i as u8) | 1;
    }
    let buf = mem.as_slice();
    let mut best = 0f64;
    let mut check = 0u64;
    for _ in 0..10 {
        let t = Instant::now();
        check = check.wrapping_add(kernels::read_bandwidth_probe(buf));
        let s = t.elapsed().as_secs_f64();
        best = best.max(len as f64 / s / 1e9);
    }
    std::hint::black_box(check);
    best
}

/// `dd if=FILE of=/dev/null bs=4M iflag=direct` over `bytes` of the largest weight file:
/// the disk's sequential O_DIRECT read speed in GB/s.
pub(super) fn dd_read_gbps(c: &Checkpoint, bytes: u64) -> Result<f64, String> {
    let (file, len) = c
        .files
        .iter()
        .filter_map(|f| std::fs::metadata(f).ok().map(|m| (f, m.len())))
        .max_by_key(|(_, l)| *l)
        .ok_or("no weight file")?;
    let block = 4 * MIB;
    let count = (bytes.min(len) / block).max(1);
    let t = Instant::now();
    let out = Command::new("dd")
        .arg(format!("if={}", file.display()))
        .arg("of=/dev/null")
        .arg("bs=4M")
        .arg(format!("count={count}"))
        .arg("iflag=direct")
        .output()
        .map_err(|e| format!("dd: {e}"))?;
    let s = t.elapsed().as_secs_f64();
    if !out.status.success() {
        return Err(format!(
            "dd: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok((count * block) as f64 / s / 1e9)
}

/// Queue depths of the O_DIRECT disk probe.
pub(super) const PROBE_DEPTHS: [usize; 4] = [1, 2, 4, 8];

/// Queue depths of the probe over the streamed tensors' own extents: one reader, and the
/// read-ahead's four.
pub(super) const EXTENT_PROBE_DEPTHS: [usize; 2] = [1, 4];

/// Bytes per read of the O_DIRECT disk probe: the read-ahead's piece size.
const PROBE_READ_BYTES: u64 = 4 * MIB;

/// The disk's O_DIRECT sequential read speed in GB/s at queue depth `depth`, measured with
/// the disk tier's own reads (the read-ahead's path): the first `bytes` of the largest weight
/// file registered as one extent, read in [`PROBE_READ_BYTES`] pieces (in file order, each
/// to the next free thread) by `depth` threads into page-aligned buffers.
pub(super) fn direct_read_gbps(c: &Checkpoint, depth: usize, bytes: u64) -> Result<f64, String> {
    let (file, len) = c
        .files
        .iter()
        .filter_map(|f| std::fs::metadata(f).ok().map(|m| (f, m.len())))
        .max_by_key(|(_, l)| *l)
        .ok_or("no weight file")?;
    let span = bytes.min(len) / PROBE_READ_BYTES * PROBE_READ_BYTES;
    if span == 0 {
        return Err(format!("{} is too small", file.display()));
    }
    extents_read_gbps(&[(file.clone(), 0, span)], depth)
}

/// [`direct_read_gbps`] over the given extents (file, offset, bytes) in their order, each cut
/// into [`PROBE_READ_BYTES`] pieces: the disk's speed on exactly the bytes a streamed decode
/// step reads, in the order the read-ahead reads them.
pub(super) fn extents_read_gbps(
    extents: &[(PathBuf, u64, u64)],
    depth: usize,
) -> Result<f64, String> {
    let manager = MemoryManager::new(ManagerConfig::with_capacities(0, 64 * MIB, 64 * MIB))
        .map_err(|e| e.to_string())?;
    let mut pieces = Vec::new();
    for (file, offset, len) in extents {
        let h = manager
            .register_extent(file, *offset, *len, TensorKind::Weight, 0)
            .map_err(|e| e.to_string())?;
        let mut at = 0;
        while at < *len {
            let n = PROBE_READ_BYTES.min(len - at);
            pieces.push((h, at, n as usize, offset + at));
            at += n;
        }
    }
    let total: u64 = extents.iter().map(|e| e.2).sum();
    if total == 0 {
        return Err("nothing to read".into());
    }
    let next = AtomicUsize::new(0);
    let t = Instant::now();
    let ok = std::thread::scope(|scope| {
        let readers: Vec<_> = (0..depth)
            .map(|_| {
                scope.spawn(|| -> Result<(), String> {
                    // Like the read-ahead's buffers: on huge pages, and each read placed at
                    // its file offset's phase, so the disk tier reads straight into it.
                    let align = vlmem_tier::IO_ALIGN_BYTES;
                    let mut buf = vlmem_tier::AlignedBuf::new(PROBE_READ_BYTES as usize + align)
                        .map_err(|e| e.to_string())?;
                    loop {
                        let Some(&(h, at, n, file_at)) =
                            pieces.get(next.fetch_add(1, Ordering::Relaxed))
                        else {
                            return Ok(());
                        };
                        let phase = (file_at % align as u64) as usize;
                        manager
                            .read(h, at, &mut buf.as_mut_slice()[phase..phase + n])
                            .map_err(|e| e.to_string())?;
                    }
                })
            })
            .collect();
        readers
            .into_iter()
            .map(|r| r.join().unwrap_or_else(|_| Err("reader panicked".into())))
            .collect::<Result<Vec<()>, String>>()
    });
    let s = t.elapsed().as_secs_f64();
    ok?;
    Ok(total as f64 / s / 1e9)
}

/// The threads the kernels run on.
pub(super) fn threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The O_DIRECT probe at every depth of [`PROBE_DEPTHS`] (`when`: before or after the
/// decodes): (depth, GB/s) of those that read; a failed depth is a note in `r`.
pub(super) fn direct_probe(
    r: &mut SuiteReport,
    ckpt: &Checkpoint,
    bytes: u64,
    when: &str,
) -> Vec<(usize, f64)> {
    let mut got = Vec::new();
    for depth in PROBE_DEPTHS {
        match direct_read_gbps(ckpt, depth, bytes) {
            Ok(v) => got.push((depth, v)),
            Err(e) => r
                .notes
                .push(format!("O_DIRECT probe {when}, depth {depth}: {e}")),
        }
    }
    got
}

/// The disk read over `extents` (the streamed tensors', in use order) at every depth of
/// [`EXTENT_PROBE_DEPTHS`] (`when`: after which decode), each a figure in `r`; the GB/s of
/// those that read (none when there are no extents).
pub(super) fn extent_probe(
    r: &mut SuiteReport,
    extents: &[(PathBuf, u64, u64)],
    when: &str,
) -> Vec<f64> {
    let mut got = Vec::new();
    if extents.is_empty() {
        return got;
    }
    for depth in EXTENT_PROBE_DEPTHS {
        match extents_read_gbps(extents, depth) {
            Ok(v) => {
                push(
                    r,
                    &format!("disk_read_gbps@streamed_extents_depth{depth}_{when}"),
                    v,
                    "GB/s",
                );
                got.push(v);
            }
            Err(e) => r
                .notes
                .push(format!("streamed-extents probe {when}, depth {depth}: {e}")),
        }
    }
    got
}

/// The disk's speed over the whole run, from `dd` and the O_DIRECT probe before and after
/// the decodes (NaN where nothing was measured).
pub(super) struct DiskBest {
    /// The best of dd and every depth of the O_DIRECT probe, before and after (GB/s).
    pub(super) gbps: f64,
    /// The depth the best was read at (1 for dd).
    pub(super) depth: usize,
    /// The best of dd alone (GB/s).
    pub(super) dd_gbps: f64,
    /// At each depth the mean of before and after, the best depth's (GB/s).
    pub(super) depth_mean_gbps: f64,
}

/// The disk figures of `dd` and the O_DIRECT probe before and after the decodes, into `report`
/// (with a note on the best), and the bounds' disk speeds.
pub(super) fn disk_best(
    report: &mut SuiteReport,
    dd_before: Result<f64, String>,
    dd_after: Result<f64, String>,
    direct_before: &[(usize, f64)],
    direct_after: &[(usize, f64)],
) -> DiskBest {
    let mut dd = Vec::new();
    for (when, r) in [("before", &dd_before), ("after", &dd_after)] {
        match r {
            Ok(v) => {
                push(report, &format!("disk_read_gbps@dd_{when}"), *v, "GB/s");
                dd.push(*v);
            }
            Err(e) => report.notes.push(format!("dd {when}: {e}")),
        }
    }
    let dd_gbps = dd.iter().copied().fold(f64::NAN, f64::max);
    // The disk's best: every depth of the O_DIRECT probe, before and after, and dd.
    let mut best = (dd_gbps, 1usize);
    for (when, got) in [("before", direct_before), ("after", direct_after)] {
        for &(depth, v) in got {
            push(
                report,
                &format!("disk_read_gbps@direct_depth{depth}_{when}"),
                v,
                "GB/s",
            );
            // (A NaN best, when dd failed, loses to any figure.)
            if best.0.is_nan() || v > best.0 {
                best = (v, depth);
            }
        }
    }
    let disk_gbps = best.0;
    // Beside it, a figure less swayed by this disk's second-to-second swings: at each depth
    // the mean of before and after, the best depth's.
    let depth_mean = PROBE_DEPTHS
        .iter()
        .filter_map(|d| {
            let v: Vec<f64> = [direct_before, direct_after]
                .iter()
                .filter_map(|got| got.iter().find(|(dd, _)| dd == d).map(|(_, v)| *v))
                .collect();
            (v.len() == 2).then(|| v.iter().sum::<f64>() / 2.0)
        })
        .fold(f64::NAN, f64::max);
    if disk_gbps.is_finite() {
        push(report, "disk_read_gbps.best", disk_gbps, "GB/s");
        push(report, "disk_read_gbps.best_depth", best.1 as f64, "count");
        report.notes.push(format!(
            "disk: best {disk_gbps:.2} GB/s at depth {} (O_DIRECT 4 MiB reads, before/after: {}; dd before/after: {})",
            best.1,
            PROBE_DEPTHS
                .iter()
                .map(|d| {
                    let at = |got: &[(usize, f64)]| {
                        got.iter()
                            .find(|(dd, _)| dd == d)
                            .map_or("-".to_string(), |(_, v)| format!("{v:.2}"))
                    };
                    format!("d{d} {}/{}", at(direct_before), at(direct_after))
                })
                .collect::<Vec<_>>()
                .join(", "),
            dd.iter()
                .map(|v| format!("{v:.2}"))
                .collect::<Vec<_>>()
                .join("/"),
        ));
    }
    DiskBest {
        gbps: disk_gbps,
        depth: best.1,
        dd_gbps,
        depth_mean_gbps: depth_mean,
    }
}
