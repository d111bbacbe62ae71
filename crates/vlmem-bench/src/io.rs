//! `vlmem bench io`: the disk tier against `dd` with O_DIRECT, host-to-device copies
//! against memcpy, and 64 KiB tensors batched against one by one. Every baseline runs in the
//! same process, on the same file system, with the same sizes.
//!
//! Figures (GB/s = 1e9 bytes per second):
//! - `disk_write_gbps`, `disk_read_gbps`: the engine's default configuration (4 workers,
//!   4 MiB chunks); `disk_write_gbps_{1,4,16}mib` / `disk_read_gbps_{..}`: one figure per
//!   transfer size; baselines `disk_write_gbps@dd`, `disk_read_gbps@dd`
//!   (`dd bs=1M oflag=direct` / `iflag=direct` of the same size).
//! - `disk_write_gbps_encrypted`, `disk_read_gbps_encrypted`: ChaCha20-Poly1305 at rest.
//! - `small_64kib_{write,read}_gbps` (batched 64 per job) and `...@one_by_one`.
//! - `host_copy_gbps` (host arena to the simulated device through the engine) and
//!   `host_copy_gbps@memcpy` (one `copy_from_slice` of the same size);
//!   `host_copy_gbps_1worker`; `device_to_host_gbps`; `host_copy_gbps_capped` (simulated link
//!   capped at 3.0 GB/s, an MX250 on PCIe 3.0 x4).
//! - `*_ratio` figures: ours divided by the baseline.

use crate::{BenchOptions, BenchResult, SuiteReport};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;
use vlmem_tier::{
    DiskOptions, DiskTier, EngineConfig, FirstFitAllocator, HostOptions, MemoryTier, Move,
    Priority, Reservation, TierBackend, TierError, TransferEngine,
};

const MIB: u64 = 1 << 20;

/// Runs the suite in the directory named by `VLMEM_BENCH_DIR`, or the system temp dir.
pub fn run(opts: BenchOptions) -> SuiteReport {
    let dir = std::env::var_os("VLMEM_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    run_in(&dir, opts)
}

/// Runs the suite with its files (swap files, the dd file) in a private subdirectory of
/// `dir`, which picks the file system measured.
pub fn run_in(dir: &Path, opts: BenchOptions) -> SuiteReport {
    let mut report = SuiteReport {
        suite: "io".into(),
        results: Vec::new(),
        notes: Vec::new(),
    };
    let work = dir.join(format!("vlmem-bench-io-{}", std::process::id()));
    if let Err(e) = std::fs::create_dir_all(&work) {
        report
            .notes
            .push(format!("cannot create {}: {e}", work.display()));
        return report;
    }
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&work, std::fs::Permissions::from_mode(0o700));
    }
    report.notes.push(format!(
        "directory {} ({}); {}",
        work.display(),
        fs_type(&work),
        if opts.quick {
            "quick run: small sizes, rough figures"
        } else {
            "full run"
        }
    ));
    if let Err(e) = disk_suite(&work, opts, &mut report) {
        report.notes.push(format!("disk suite failed: {e}"));
    }
    if let Err(e) = copy_suite(opts, &mut report) {
        report.notes.push(format!("copy suite failed: {e}"));
    }
    let _ = std::fs::remove_dir_all(&work);
    report
}

fn gbps(bytes: u64, secs: f64) -> f64 {
    if secs <= 0.0 {
        0.0
    } else {
        bytes as f64 / secs / 1e9
    }
}

fn push(report: &mut SuiteReport, name: &str, value: f64, unit: &str) {
    report.results.push(BenchResult::new(name, value, unit));
}

fn ratio(report: &mut SuiteReport, name: &str, ours: &str, base: &str) {
    if let (Some(a), Some(b)) = (report.value(ours), report.value(base))
        && b > 0.0
    {
        push(report, name, a / b, "ratio");
    }
}

fn fs_type(path: &Path) -> String {
    Command::new("stat")
        .args(["-f", "-c", "%T"])
        .arg(path)
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| format!("file system {}", s.trim()))
        .unwrap_or_else(|| "file system unknown".into())
}

fn allocator(capacity_bytes: u64) -> Result<Arc<FirstFitAllocator>, TierError> {
    FirstFitAllocator::new(capacity_bytes, 4096)
        .map(Arc::new)
        .map_err(|e| TierError::InvalidConfig(e.to_string()))
}

/// Fills a host reservation with pseudo-random bytes, in place.
fn fill(host: &MemoryTier, res: &Reservation, seed: u64) -> Result<(), TierError> {
    let mut x = seed | 1;
    let len = res.len_bytes();
    let step = 16 * MIB;
    let mut off = 0;
    while off < len {
        let n = step.min(len - off);
        host.write_with(res, off, n, &mut |d| {
            for c in d.chunks_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let b = x.to_le_bytes();
                c.copy_from_slice(b.get(..c.len()).unwrap_or_default());
            }
            Ok(())
        })
        .unwrap_or_else(|| {
            Err(TierError::Unsupported(
                "the host tier lends its bytes".into(),
            ))
        })?;
        off += n;
    }
    Ok(())
}

fn wait_all(tickets: Vec<vlmem_tier::Ticket>) -> Result<(), TierError> {
    let mut first_err = None;
    for t in tickets {
        if let Err(e) = t.wait()
            && first_err.is_none()
        {
            first_err = Some(e);
        }
    }
    first_err.map_or(Ok(()), Err)
}

/// Writes `srcs` to fresh disk reservations and reads them back, with `chunk_bytes` per
/// I/O; returns (write GB/s, read GB/s).
fn disk_round(
    host: &Arc<MemoryTier>,
    disk: &Arc<DiskTier>,
    srcs: &[Reservation],
    chunk_bytes: u64,
) -> Result<(f64, f64), TierError> {
    let tiers: [Arc<dyn TierBackend>; 2] = [host.clone(), disk.clone()];
    let engine = TransferEngine::new(
        &tiers,
        EngineConfig {
            chunk_bytes,
            ..EngineConfig::default()
        },
    )?;
    let total: u64 = srcs.iter().map(Reservation::len_bytes).sum();
    let mut dsts = Vec::with_capacity(srcs.len());
    for (i, s) in srcs.iter().enumerate() {
        dsts.push(disk.reserve(s.len_bytes(), &format!("bench.{i}"))?);
    }
    let t0 = Instant::now();
    let mut tickets = Vec::with_capacity(srcs.len());
    for (s, d) in srcs.iter().zip(&dsts) {
        tickets.push(engine.submit(Move { src: *s, dst: *d }, Priority::WriteBack)?);
    }
    wait_all(tickets)?;
    let write = gbps(total, t0.elapsed().as_secs_f64());
    let t0 = Instant::now();
    let mut tickets = Vec::with_capacity(srcs.len());
    for (s, d) in srcs.iter().zip(&dsts) {
        tickets.push(engine.submit(Move { src: *d, dst: *s }, Priority::Demand)?);
    }
    wait_all(tickets)?;
    let read = gbps(total, t0.elapsed().as_secs_f64());
    for d in dsts {
        disk.release(d)?;
    }
    Ok((write, read))
}

/// Runs dd; returns GB/s from the wall-clock time of the process, or why it failed.
fn dd(args: &[String], bytes: u64) -> Result<f64, String> {
    let t0 = Instant::now();
    let out = Command::new("dd")
        .args(args)
        .output()
        .map_err(|e| format!("dd: {e}"))?;
    let secs = t0.elapsed().as_secs_f64();
    if !out.status.success() {
        return Err(format!(
            "dd {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(gbps(bytes, secs))
}

fn disk_suite(work: &Path, opts: BenchOptions, report: &mut SuiteReport) -> Result<(), TierError> {
    let total = if opts.quick { 64 * MIB } else { 1 << 30 };
    let count_mib = total / MIB;

    // Baseline first: dd with O_DIRECT, same size, same directory.
    let dd_file = work.join("dd.bin");
    let of = format!("of={}", dd_file.display());
    let inf = format!("if={}", dd_file.display());
    let count = format!("count={count_mib}");
    let w = dd(
        &[
            "if=/dev/zero".into(),
            of.clone(),
            "bs=1M".into(),
            count.clone(),
            "oflag=direct".into(),
        ],
        total,
    );
    let (dd_w, dd_r, dd_note) = match w {
        Ok(w) => {
            let r = dd(
                &[
                    inf,
                    "of=/dev/null".into(),
                    "bs=1M".into(),
                    "iflag=direct".into(),
                ],
                total,
            );
            (Some(w), r.as_ref().ok().copied(), r.err())
        }
        Err(e) => (None, None, Some(e)),
    };
    let _ = std::fs::remove_file(&dd_file);
    if let Some(n) = dd_note {
        report
            .notes
            .push(format!("dd baseline with O_DIRECT failed: {n}"));
    }
    if let Some(w) = dd_w {
        push(report, "disk_write_gbps@dd", w, "GB/s");
    }
    if let Some(r) = dd_r {
        push(report, "disk_read_gbps@dd", r, "GB/s");
    }

    let host = Arc::new(MemoryTier::host(allocator(total)?, HostOptions::default())?);
    let swap_dir = work.join("swap");
    let disk = Arc::new(DiskTier::new(
        allocator(total)?,
        DiskOptions {
            dir: Some(swap_dir.clone()),
            ..DiskOptions::default()
        },
    )?);
    report.notes.push(disk.describe());
    report.notes.extend(disk.notes().iter().cloned());

    for (size_mib, name) in [(16u64, "16mib"), (4, "4mib"), (1, "1mib")] {
        let t = size_mib * MIB;
        let mut srcs = Vec::new();
        for i in 0..total / t {
            let r = host.reserve(t, "src")?;
            fill(&host, &r, i + 1)?;
            srcs.push(r);
        }
        let (w, r) = disk_round(&host, &disk, &srcs, t)?;
        push(report, &format!("disk_write_gbps_{name}"), w, "GB/s");
        push(report, &format!("disk_read_gbps_{name}"), r, "GB/s");
        if size_mib == 4 {
            // The engine's default chunk size is 4 MiB: the headline figures.
            push(report, "disk_write_gbps", w, "GB/s");
            push(report, "disk_read_gbps", r, "GB/s");
        }
        for s in srcs {
            host.release(s)?;
        }
    }
    ratio(
        report,
        "disk_write_ratio_vs_dd",
        "disk_write_gbps",
        "disk_write_gbps@dd",
    );
    ratio(
        report,
        "disk_read_ratio_vs_dd",
        "disk_read_gbps",
        "disk_read_gbps@dd",
    );

    // Encryption at rest (a quarter of the size: its cost per byte is what matters).
    drop(disk);
    let enc_total = (total / 4).max(16 * MIB);
    let enc_disk = Arc::new(DiskTier::new(
        allocator(enc_total)?,
        DiskOptions {
            dir: Some(swap_dir.clone()),
            encrypt: true,
            ..DiskOptions::default()
        },
    )?);
    let mut srcs = Vec::new();
    for i in 0..enc_total / (4 * MIB) {
        let r = host.reserve(4 * MIB, "src")?;
        fill(&host, &r, i + 7)?;
        srcs.push(r);
    }
    let (w, r) = disk_round(&host, &enc_disk, &srcs, 4 * MIB)?;
    push(report, "disk_write_gbps_encrypted", w, "GB/s");
    push(report, "disk_read_gbps_encrypted", r, "GB/s");
    for s in srcs {
        host.release(s)?;
    }
    drop(enc_disk);

    // 64 KiB tensors: batched (64 per job, one 4 MiB I/O each) against one job each.
    let small = 64 * 1024u64;
    let n = if opts.quick { 256 } else { 2048 };
    let disk = Arc::new(DiskTier::new(
        allocator(n * small)?,
        DiskOptions {
            dir: Some(swap_dir),
            ..DiskOptions::default()
        },
    )?);
    let tiers: [Arc<dyn TierBackend>; 2] = [host.clone(), disk.clone()];
    let engine = TransferEngine::new(&tiers, EngineConfig::default())?;
    let mut moves = Vec::new();
    for i in 0..n {
        let s = host.reserve(small, "small")?;
        fill(&host, &s, i + 11)?;
        moves.push(Move {
            src: s,
            dst: disk.reserve(small, &format!("small.{i}"))?,
        });
    }
    let bytes = n * small;
    // One by one.
    let t0 = Instant::now();
    let mut tickets = Vec::new();
    for m in &moves {
        tickets.push(engine.submit(*m, Priority::WriteBack)?);
    }
    wait_all(tickets)?;
    push(
        report,
        "small_64kib_write_gbps@one_by_one",
        gbps(bytes, t0.elapsed().as_secs_f64()),
        "GB/s",
    );
    let t0 = Instant::now();
    let mut tickets = Vec::new();
    for m in &moves {
        tickets.push(engine.submit(
            Move {
                src: m.dst,
                dst: m.src,
            },
            Priority::Demand,
        )?);
    }
    wait_all(tickets)?;
    push(
        report,
        "small_64kib_read_gbps@one_by_one",
        gbps(bytes, t0.elapsed().as_secs_f64()),
        "GB/s",
    );
    // Batched.
    let t0 = Instant::now();
    let mut tickets = Vec::new();
    for group in moves.chunks(64) {
        tickets.push(engine.submit_batch(group.to_vec(), Priority::WriteBack)?);
    }
    wait_all(tickets)?;
    push(
        report,
        "small_64kib_write_gbps",
        gbps(bytes, t0.elapsed().as_secs_f64()),
        "GB/s",
    );
    let t0 = Instant::now();
    let mut tickets = Vec::new();
    for group in moves.chunks(64) {
        let back: Vec<Move> = group
            .iter()
            .map(|m| Move {
                src: m.dst,
                dst: m.src,
            })
            .collect();
        tickets.push(engine.submit_batch(back, Priority::Demand)?);
    }
    wait_all(tickets)?;
    push(
        report,
        "small_64kib_read_gbps",
        gbps(bytes, t0.elapsed().as_secs_f64()),
        "GB/s",
    );
    ratio(
        report,
        "small_64kib_write_ratio_vs_one_by_one",
        "small_64kib_write_gbps",
        "small_64kib_write_gbps@one_by_one",
    );
    ratio(
        report,
        "small_64kib_read_ratio_vs_one_by_one",
        "small_64kib_read_gbps",
        "small_64kib_read_gbps@one_by_one",
    );
    Ok(())
}

fn copy_round(
    host: &Arc<MemoryTier>,
    dev: &Arc<MemoryTier>,
    src: Reservation,
    dst: Reservation,
    workers: usize,
    to_device: bool,
) -> Result<f64, TierError> {
    let tiers: [Arc<dyn TierBackend>; 2] = [host.clone(), dev.clone()];
    let engine = TransferEngine::new(
        &tiers,
        EngineConfig {
            workers,
            ..EngineConfig::default()
        },
    )?;
    let mv = if to_device {
        Move { src, dst }
    } else {
        Move { src: dst, dst: src }
    };
    let t0 = Instant::now();
    engine.submit(mv, Priority::Demand)?.wait()?;
    Ok(gbps(src.len_bytes(), t0.elapsed().as_secs_f64()))
}

fn copy_suite(opts: BenchOptions, report: &mut SuiteReport) -> Result<(), TierError> {
    let total = if opts.quick { 64 * MIB } else { 512 * MIB };
    let host = Arc::new(MemoryTier::host(allocator(total)?, HostOptions::default())?);
    let dev = Arc::new(MemoryTier::simulated_device(allocator(total)?, None)?);
    report.notes.push(format!(
        "{}; the copy figures are host-memory copies, not a GPU",
        dev.describe()
    ));
    let src = host.reserve(total, "src")?;
    fill(&host, &src, 3)?;
    let dst = dev.reserve(total, "dst")?;
    // Touch the destination once so page faults are not measured.
    let _ = copy_round(&host, &dev, src, dst, 4, true)?;
    let best = |f: &mut dyn FnMut() -> Result<f64, TierError>| -> Result<f64, TierError> {
        let mut b = 0.0f64;
        for _ in 0..3 {
            b = b.max(f()?);
        }
        Ok(b)
    };
    let ours = best(&mut || copy_round(&host, &dev, src, dst, 4, true))?;
    push(report, "host_copy_gbps", ours, "GB/s");
    let one = best(&mut || copy_round(&host, &dev, src, dst, 1, true))?;
    push(report, "host_copy_gbps_1worker", one, "GB/s");
    let back = best(&mut || copy_round(&host, &dev, src, dst, 4, false))?;
    push(report, "device_to_host_gbps", back, "GB/s");
    // memcpy baseline: one copy_from_slice of the same size between pre-touched buffers.
    let a = vec![7u8; total as usize];
    let mut b = vec![0u8; total as usize];
    b.copy_from_slice(&a);
    let mut m = 0.0f64;
    for _ in 0..3 {
        let t0 = Instant::now();
        b.copy_from_slice(std::hint::black_box(&a));
        std::hint::black_box(&b);
        m = m.max(gbps(total, t0.elapsed().as_secs_f64()));
    }
    // The same memcpy in the engine's 4 MiB chunks: below glibc's non-temporal threshold,
    // so it shows what chunking alone costs.
    let mut mc = 0.0f64;
    for _ in 0..3 {
        let t0 = Instant::now();
        for (d, s) in b
            .chunks_mut((4 * MIB) as usize)
            .zip(a.chunks((4 * MIB) as usize))
        {
            d.copy_from_slice(std::hint::black_box(s));
        }
        std::hint::black_box(&b);
        mc = mc.max(gbps(total, t0.elapsed().as_secs_f64()));
    }
    drop((a, b));
    push(report, "host_copy_gbps@memcpy", m, "GB/s");
    push(report, "host_copy_gbps@memcpy_4mib_chunks", mc, "GB/s");
    ratio(
        report,
        "host_copy_ratio_vs_memcpy",
        "host_copy_gbps",
        "host_copy_gbps@memcpy",
    );
    ratio(
        report,
        "host_copy_1worker_ratio_vs_memcpy",
        "host_copy_gbps_1worker",
        "host_copy_gbps@memcpy",
    );
    host.release(src)?;
    dev.release(dst)?;
    drop(dev);

    // The laptop's link: a simulated device capped at 3.0 GB/s.
    let cap = 3_000_000_000u64;
    let capped_total = total.min(256 * MIB);
    let dev = Arc::new(MemoryTier::simulated_device(
        allocator(capped_total)?,
        Some(cap),
    )?);
    let src = host.reserve(capped_total, "src")?;
    let dst = dev.reserve(capped_total, "dst")?;
    let _ = copy_round(&host, &dev, src, dst, 4, true)?; // first touch of the pages
    let g = best(&mut || copy_round(&host, &dev, src, dst, 4, true))?;
    push(report, "host_copy_gbps_capped", g, "GB/s");
    push(report, "host_copy_cap_gbps", cap as f64 / 1e9, "GB/s");
    report
        .notes
        .push(format!("{} (the capped figure)", dev.describe()));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The quick suite runs and reports every figure the issue names (the dd baselines when
    /// dd is installed), with sane values, and leaves no file behind.
    #[test]
    fn quick_suite_reports_every_named_figure() {
        let dir = std::env::temp_dir().join(format!("vlmem-io-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let report = run_in(&dir, BenchOptions { quick: true });
        assert_eq!(report.suite, "io");
        for name in [
            "disk_write_gbps",
            "disk_read_gbps",
            "host_copy_gbps",
            "host_copy_gbps@memcpy",
            "small_64kib_write_gbps",
            "small_64kib_write_gbps@one_by_one",
        ] {
            let v = report.value(name);
            assert!(
                v.is_some_and(|v| v > 0.0),
                "{name}: {v:?}; notes {:?}",
                report.notes
            );
        }
        let dd = Command::new("dd").arg("--version").output().is_ok();
        if dd && !report.notes.iter().any(|n| n.contains("dd baseline")) {
            assert!(report.value("disk_write_gbps@dd").is_some());
            assert!(report.value("disk_read_gbps@dd").is_some());
        }
        assert!(report.notes.iter().any(|n| n.contains("simulated")));
        let capped = report.value("host_copy_gbps_capped").unwrap_or(0.0);
        assert!(
            capped > 0.0 && capped <= 3.0 * 1.05,
            "capped copy at {capped} GB/s"
        );
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
        let _ = std::fs::remove_dir(&dir);
    }
}
