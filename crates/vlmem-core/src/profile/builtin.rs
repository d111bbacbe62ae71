//! Built-in profiles of reference machines. Specifications are marked [`Source::Spec`];
//! everything the vendor does not fix (the exact part variant, free disk, what the OS keeps)
//! is marked [`Source::Assumption`] and listed in the profile's `assumptions`.

use super::{Bandwidth, CpuSpec, DiskSpec, GpuSpec, HardwareProfile, HostSpec, Source};
use crate::bytes::{GIB, KIB, MIB};

/// The project's reference target.
pub const LAPTOP_I5_10210U_MX250: &str = "laptop-i5-10210u-mx250";

/// Names of the built-in profiles.
pub const BUILTIN_NAMES: [&str; 3] = [
    LAPTOP_I5_10210U_MX250,
    "desktop-gtx1060-6gb",
    "desktop-gtx1080-8gb",
];

/// PCIe 3.0: 8 GT/s per lane with 128b/130b coding = 0.985 GB/s per lane per direction.
const PCIE3_LANE_GBPS: f64 = 8.0 * 128.0 / 130.0 / 8.0;
/// DDR4-2666: 2666 MT/s x 8 bytes = 21.3 GB/s per channel.
const DDR4_2666_CHANNEL_GBPS: f64 = 2.666 * 8.0;

/// A built-in profile by name.
pub fn builtin(name: &str) -> Option<HardwareProfile> {
    match name {
        LAPTOP_I5_10210U_MX250 => Some(laptop()),
        "desktop-gtx1060-6gb" => Some(gtx1060()),
        "desktop-gtx1080-8gb" => Some(gtx1080()),
        _ => None,
    }
}

fn pascal_gpu(model: &str, memory_bytes: u64, mem_gbps: f64, lanes: u32) -> GpuSpec {
    GpuSpec {
        model: model.into(),
        compute_capability: (6, 1),
        memory_bytes,
        reserved_bytes: 256 * MIB,
        shared_mem_per_block_bytes: 48 * KIB,
        max_threads_per_block: 1024,
        bf16_arithmetic: false,
        memory_bandwidth: Bandwidth::gbps(mem_gbps, Source::Spec),
        link: Bandwidth::gbps(PCIE3_LANE_GBPS * lanes as f64, Source::Spec),
        link_name: format!("PCIe 3.0 x{lanes}"),
    }
}

fn nvme(free_bytes: u64) -> DiskSpec {
    DiskSpec {
        name: "NVMe SSD (PCIe 3.0 x4)".into(),
        free_bytes,
        read: Bandwidth::gbps(3.0, Source::Assumption),
        write: Bandwidth::gbps(1.5, Source::Assumption),
    }
}

fn laptop() -> HardwareProfile {
    let mut gpu = pascal_gpu(
        "NVIDIA GeForce MX250 (2 GiB GDDR5, 64-bit)",
        2 * GIB,
        48.0,
        4,
    );
    gpu.memory_bandwidth.source = Source::Assumption;
    HardwareProfile {
        name: LAPTOP_I5_10210U_MX250.into(),
        description: "Laptop: Intel i5-10210U, NVIDIA MX250 2 GiB on PCIe 3.0 x4, 16 GiB DDR4-2666, NVMe SSD (the reference target)".into(),
        cpu: CpuSpec {
            model: "Intel Core i5-10210U".into(),
            cores: 4,
            threads: 8,
            l1d_bytes_per_core: 32 * KIB,
            l2_bytes_per_core: 256 * KIB,
            l3_bytes: 6 * MIB,
        },
        gpu: Some(gpu),
        host: HostSpec {
            memory_bytes: 16 * GIB,
            reserved_bytes: 4 * GIB,
            memory_name: "DDR4-2666, 2 channels".into(),
            bandwidth: Bandwidth::gbps(2.0 * DDR4_2666_CHANNEL_GBPS, Source::Assumption),
        },
        disk: nvme(200 * GIB),
        assumptions: vec![
            "MX250 memory bandwidth 48 GB/s: the 10 W variant (GDDR5 at 6 Gbps on 64 bits); the 25 W one has 56 GB/s".into(),
            "GPU link 3.94 GB/s is PCIe 3.0 x4 raw per direction; pinned copies reach about 80-90% of it".into(),
            "256 MiB of GPU memory kept by the driver and CUDA context".into(),
            "host memory bandwidth 42.7 GB/s is dual-channel DDR4-2666 peak; a single DIMM halves it".into(),
            "4 GiB of RAM kept by the OS and desktop".into(),
            "NVMe 3.0 GB/s read, 1.5 GB/s write with >= 1 MiB direct transfers; 200 GiB free".into(),
        ],
    }
}

/// A Pascal desktop: a 6-core Intel CPU, dual-channel DDR4-2666, an NVMe SSD, the GPU on
/// PCIe 3.0 x16. The CPU and RAM are a typical pairing, not part of the GPU (an assumption).
struct Desktop {
    name: &'static str,
    cpu: &'static str,
    threads: u32,
    l3_bytes: u64,
    gpu: &'static str,
    gpu_bytes: u64,
    gpu_gbps: f64,
    ram_bytes: u64,
    free_disk_bytes: u64,
}

fn desktop(d: Desktop) -> HardwareProfile {
    let ram_gib = d.ram_bytes / GIB;
    let disk_gib = d.free_disk_bytes / GIB;
    HardwareProfile {
        name: d.name.into(),
        description: format!(
            "Desktop: {}, {} on PCIe 3.0 x16, {ram_gib} GiB DDR4-2666, NVMe SSD",
            d.cpu, d.gpu
        ),
        cpu: CpuSpec {
            model: d.cpu.into(),
            cores: 6,
            threads: d.threads,
            l1d_bytes_per_core: 32 * KIB,
            l2_bytes_per_core: 256 * KIB,
            l3_bytes: d.l3_bytes,
        },
        gpu: Some(pascal_gpu(d.gpu, d.gpu_bytes, d.gpu_gbps, 16)),
        host: HostSpec {
            memory_bytes: d.ram_bytes,
            reserved_bytes: 4 * GIB,
            memory_name: "DDR4-2666, 2 channels".into(),
            bandwidth: Bandwidth::gbps(2.0 * DDR4_2666_CHANNEL_GBPS, Source::Assumption),
        },
        disk: nvme(d.free_disk_bytes),
        assumptions: vec![
            format!(
                "CPU {} and {ram_gib} GiB dual-channel DDR4-2666 are a typical pairing, not part of the GPU",
                d.cpu
            ),
            "256 MiB of GPU memory kept by the driver and CUDA context".into(),
            "4 GiB of RAM kept by the OS and desktop".into(),
            format!("NVMe 3.0 GB/s read, 1.5 GB/s write; {disk_gib} GiB free"),
        ],
    }
}

fn gtx1060() -> HardwareProfile {
    desktop(Desktop {
        name: "desktop-gtx1060-6gb",
        cpu: "Intel Core i5-8400",
        threads: 6,
        l3_bytes: 9 * MIB,
        gpu: "NVIDIA GeForce GTX 1060 6GB",
        gpu_bytes: 6 * GIB,
        gpu_gbps: 192.0,
        ram_bytes: 16 * GIB,
        free_disk_bytes: 200 * GIB,
    })
}

fn gtx1080() -> HardwareProfile {
    desktop(Desktop {
        name: "desktop-gtx1080-8gb",
        cpu: "Intel Core i7-8700",
        threads: 12,
        l3_bytes: 12 * MIB,
        gpu: "NVIDIA GeForce GTX 1080 8GB",
        gpu_bytes: 8 * GIB,
        gpu_gbps: 320.0,
        ram_bytes: 32 * GIB,
        free_disk_bytes: 400 * GIB,
    })
}
