//! `--profile detect`: reads the machine vlmem runs on. Capacities are read (CPU, caches,
//! RAM, free disk, an NVIDIA GPU through `nvidia-smi` when one answers); bandwidths are not
//! measured here (that takes a minute: `vlmem bench io` measures them) and are marked as
//! assumptions.

use super::{Bandwidth, CpuSpec, DiskSpec, GpuSpec, HardwareProfile, HostSpec, Source, gib};
use crate::bytes::{GIB, KIB, MIB};
use std::path::Path;
use std::process::Command;

/// Reads this machine. `disk_dir` is where swap files would go (its filesystem's free space
/// is reported). Never fails: what cannot be read is left at a conservative default and said
/// so in `assumptions`.
pub fn detect(disk_dir: &Path) -> HardwareProfile {
    let mut assumptions = Vec::new();
    let cpu = detect_cpu(&mut assumptions);
    let memory_bytes = read_meminfo_total().unwrap_or_else(|| {
        assumptions.push("RAM size unreadable (/proc/meminfo): assumed 8 GiB".into());
        8 * GIB
    });
    let free_bytes = disk_free_bytes(disk_dir).unwrap_or_else(|| {
        assumptions.push(format!(
            "free disk space under {} unreadable: assumed 0",
            disk_dir.display()
        ));
        0
    });
    let gpu = detect_nvidia_gpu();
    if gpu.is_none() {
        assumptions.push("no CUDA GPU answered (nvidia-smi): the device tier is simulated".into());
    }
    let reserved_bytes = (memory_bytes / 8).max(GIB).min(memory_bytes);
    assumptions.push(format!(
        "{:.1} GiB of RAM kept for the OS and other programs",
        gib(reserved_bytes)
    ));
    assumptions.push(
        "bandwidths are not measured by detect (host 10 GB/s, disk 1 GB/s read and write): run `vlmem bench io` and write them into a profile file".into(),
    );
    HardwareProfile {
        name: "detect".into(),
        description: format!(
            "This machine: {}, {} cores / {} threads, {:.1} GiB RAM{}",
            cpu.model,
            cpu.cores,
            cpu.threads,
            gib(memory_bytes),
            gpu.as_ref()
                .map(|g| format!(", {}", g.model))
                .unwrap_or_else(|| ", no GPU".into())
        ),
        cpu,
        gpu,
        host: HostSpec {
            memory_bytes,
            reserved_bytes,
            memory_name: "unknown".into(),
            bandwidth: Bandwidth::gbps(10.0, Source::Assumption),
        },
        disk: DiskSpec {
            name: format!("filesystem of {}", disk_dir.display()),
            free_bytes,
            read: Bandwidth::gbps(1.0, Source::Assumption),
            write: Bandwidth::gbps(1.0, Source::Assumption),
        },
        assumptions,
    }
}

fn detect_cpu(assumptions: &mut Vec<String>) -> CpuSpec {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |key: &str| {
        cpuinfo.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == key).then(|| v.trim().to_string())
        })
    };
    let threads = std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1);
    let cores = field("cpu cores")
        .and_then(|v| v.parse().ok())
        .unwrap_or(threads)
        .clamp(1, threads.max(1));
    let model = field("model name").unwrap_or_else(|| "unknown CPU".into());
    let cache = |level: u32, kind: &str| cache_bytes(level, kind);
    let l1d = cache(1, "Data").unwrap_or_else(|| {
        assumptions.push("L1d size unreadable: assumed 32 KiB".into());
        32 * KIB
    });
    let l2 = cache(2, "Unified").unwrap_or_else(|| {
        assumptions.push("L2 size unreadable: assumed 256 KiB".into());
        256 * KIB
    });
    let l3 = cache(3, "Unified").unwrap_or_else(|| {
        assumptions.push("L3 size unreadable: assumed 4 MiB".into());
        4 * MIB
    });
    CpuSpec {
        model,
        cores,
        threads,
        l1d_bytes_per_core: l1d,
        l2_bytes_per_core: l2,
        l3_bytes: l3,
    }
}

/// Size of cpu0's cache of this level and type, from sysfs ("32K", "6144K", "1M").
fn cache_bytes(level: u32, kind: &str) -> Option<u64> {
    let base = Path::new("/sys/devices/system/cpu/cpu0/cache");
    for entry in std::fs::read_dir(base).ok()? {
        let dir = entry.ok()?.path();
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).ok();
        if read("level")?.trim() == level.to_string() && read("type")?.trim() == kind {
            return parse_sysfs_size(read("size")?.trim());
        }
    }
    None
}

fn parse_sysfs_size(s: &str) -> Option<u64> {
    let (num, mult) = match s.as_bytes().last()? {
        b'K' => (&s[..s.len() - 1], KIB),
        b'M' => (&s[..s.len() - 1], MIB),
        b'G' => (&s[..s.len() - 1], GIB),
        _ => (s, 1),
    };
    num.parse::<u64>().ok()?.checked_mul(mult)
}

/// This process's peak resident memory so far (the kernel's high-water mark, `VmHWM` in
/// /proc/self/status), bytes; `None` where it cannot be read (not Linux).
pub fn process_peak_rss_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = text.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(KIB)
}

fn read_meminfo_total() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(KIB)
}

/// Free bytes of the filesystem holding `dir`, through `df` (no unsafe statvfs here).
fn disk_free_bytes(dir: &Path) -> Option<u64> {
    let out = Command::new("df").arg("-Pk").arg(dir).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8(out.stdout).ok()?;
    let line = text.lines().nth(1)?;
    let avail_kib: u64 = line.split_whitespace().nth(3)?.parse().ok()?;
    avail_kib.checked_mul(KIB)
}

/// The first NVIDIA GPU, when `nvidia-smi` is installed and answers.
fn detect_nvidia_gpu() -> Option<GpuSpec> {
    let out = Command::new("nvidia-smi")
        .args([
            "--query-gpu=name,memory.total,compute_cap,pcie.link.gen.max,pcie.link.width.max",
            "--format=csv,noheader,nounits",
        ])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    parse_nvidia_smi_line(String::from_utf8(out.stdout).ok()?.lines().next()?)
}

/// Parses one line of the query above, e.g.
/// "NVIDIA GeForce MX250, 2048, 6.1, 3, 4".
fn parse_nvidia_smi_line(line: &str) -> Option<GpuSpec> {
    let f: Vec<&str> = line.split(',').map(str::trim).collect();
    if f.len() < 3 {
        return None;
    }
    let memory_bytes = f[1].parse::<u64>().ok()?.checked_mul(MIB)?;
    let (maj, min) = f[2].split_once('.')?;
    let cc = (maj.parse().ok()?, min.parse().ok()?);
    let pcie_gen: u32 = f.get(3).and_then(|v| v.parse().ok()).unwrap_or(3);
    let lanes: u32 = f.get(4).and_then(|v| v.parse().ok()).unwrap_or(16);
    let per_lane_gbps = match pcie_gen {
        1 => 0.25,
        2 => 0.5,
        3 => 0.985,
        4 => 1.969,
        _ => 3.938,
    };
    Some(GpuSpec {
        model: f[0].to_string(),
        compute_capability: cc,
        memory_bytes,
        reserved_bytes: 256 * MIB,
        shared_mem_per_block_bytes: 48 * KIB,
        max_threads_per_block: 1024,
        bf16_arithmetic: cc.0 >= 8,
        memory_bandwidth: Bandwidth::gbps(100.0, Source::Assumption),
        link: Bandwidth::gbps(per_lane_gbps * lanes as f64, Source::Detected),
        link_name: format!("PCIe {pcie_gen}.0 x{lanes}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(target_os = "linux")]
    fn peak_rss_covers_memory_this_test_touched() {
        let before = process_peak_rss_bytes().expect("VmHWM on Linux");
        let touched = vec![1u8; 64 << 20];
        let after = process_peak_rss_bytes().expect("VmHWM on Linux");
        // The high-water mark never falls, and it holds the 64 MiB just written.
        assert!(after >= before && after >= 64 << 20, "{before} -> {after}");
        assert_eq!(touched.iter().map(|&b| b as u64).sum::<u64>(), 64 << 20);
    }

    #[test]
    fn parses_sysfs_cache_sizes() {
        assert_eq!(parse_sysfs_size("32K"), Some(32 * KIB));
        assert_eq!(parse_sysfs_size("6144K"), Some(6 * MIB));
        assert_eq!(parse_sysfs_size("1M"), Some(MIB));
        assert_eq!(parse_sysfs_size("K"), None);
        assert_eq!(parse_sysfs_size(""), None);
    }

    #[test]
    fn parses_nvidia_smi() {
        let g = parse_nvidia_smi_line("NVIDIA GeForce MX250, 2048, 6.1, 3, 4").unwrap();
        assert_eq!(g.memory_bytes, 2 * GIB);
        assert_eq!(g.compute_capability, (6, 1));
        assert!(!g.bf16_arithmetic);
        assert_eq!(g.link_name, "PCIe 3.0 x4");
        let h = parse_nvidia_smi_line("NVIDIA H100 80GB HBM3, 81559, 9.0, 5, 16").unwrap();
        assert!(h.bf16_arithmetic);
        assert!(parse_nvidia_smi_line("garbage").is_none());
        assert!(parse_nvidia_smi_line("x, notanumber, 6.1").is_none());
    }
}
