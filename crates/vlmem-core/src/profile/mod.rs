//! Hardware profiles: what a machine can hold (GPU memory, RAM, disk) and how fast it moves
//! bytes between them.
//!
//! Built-in profiles describe reference machines (the project's target is
//! [`LAPTOP_I5_10210U_MX250`]); `detect` reads the machine it runs on; a TOML file describes
//! any other. Every bandwidth carries its [`Source`], so a plan can say which of its numbers
//! are specifications, which are assumptions and which were measured.

mod builtin;
mod detect;

pub use builtin::{BUILTIN_NAMES, LAPTOP_I5_10210U_MX250, builtin};
pub use detect::{detect, process_peak_rss_bytes};

use crate::bytes::{GIB, MIB, parse_bytes};
use serde::{Deserialize, Serialize};
use std::path::Path;
use thiserror::Error;

/// Where a number comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// A vendor specification or a standard (e.g. PCIe 3.0 x4 = 3.94 GB/s raw).
    Spec,
    /// Our assumption for a typical part; measure your own machine to replace it.
    Assumption,
    /// Read or measured on this machine.
    Detected,
}

/// A transfer rate and where the number comes from.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bandwidth {
    /// Bytes per second (1 GB/s = 1e9).
    pub bytes_per_s: f64,
    /// Where the number comes from.
    pub source: Source,
}

impl Bandwidth {
    /// `gb_per_s` * 1e9 bytes per second.
    pub const fn gbps(gb_per_s: f64, source: Source) -> Self {
        Bandwidth {
            bytes_per_s: gb_per_s * 1e9,
            source,
        }
    }
}

/// The CPU.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpuSpec {
    /// Model name.
    pub model: String,
    /// Physical cores.
    pub cores: u32,
    /// Hardware threads.
    pub threads: u32,
    /// L1 data cache per core.
    pub l1d_bytes_per_core: u64,
    /// L2 cache per core.
    pub l2_bytes_per_core: u64,
    /// Shared last-level cache.
    pub l3_bytes: u64,
}

/// A GPU.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GpuSpec {
    /// Model name.
    pub model: String,
    /// CUDA compute capability, major and minor (6.1 for Pascal consumer parts).
    pub compute_capability: (u32, u32),
    /// Memory on the card.
    pub memory_bytes: u64,
    /// Memory the driver, CUDA context and display take before vlmem gets any.
    pub reserved_bytes: u64,
    /// Shared memory per block.
    pub shared_mem_per_block_bytes: u64,
    /// Threads per block.
    pub max_threads_per_block: u32,
    /// Whether the GPU has bf16 arithmetic (compute capability >= 8.0). Without it weights
    /// are stored bf16 and computed in f32.
    pub bf16_arithmetic: bool,
    /// Device memory bandwidth.
    pub memory_bandwidth: Bandwidth,
    /// The host-to-device link (PCIe), one direction.
    pub link: Bandwidth,
    /// The link as a human reads it ("PCIe 3.0 x4").
    pub link_name: String,
}

impl GpuSpec {
    /// Bytes vlmem may use on the card.
    pub fn usable_bytes(&self) -> u64 {
        self.memory_bytes.saturating_sub(self.reserved_bytes)
    }
}

/// Host memory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostSpec {
    /// Installed RAM.
    pub memory_bytes: u64,
    /// RAM the OS and other programs keep; vlmem plans with the rest.
    pub reserved_bytes: u64,
    /// Memory type as a human reads it ("DDR4-2666, 2 channels").
    pub memory_name: String,
    /// Sustained read bandwidth of all cores together.
    pub bandwidth: Bandwidth,
}

impl HostSpec {
    /// Bytes vlmem may use in RAM.
    pub fn usable_bytes(&self) -> u64 {
        self.memory_bytes.saturating_sub(self.reserved_bytes)
    }
}

/// The disk that holds swap files and checkpoints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskSpec {
    /// Disk type as a human reads it ("NVMe SSD, PCIe 3.0 x4").
    pub name: String,
    /// Free bytes vlmem may use for swap (checkpoints already on disk do not count).
    pub free_bytes: u64,
    /// Sequential read with large (>= 1 MiB) direct transfers.
    pub read: Bandwidth,
    /// Sequential write with large direct transfers.
    pub write: Bandwidth,
}

/// A machine: what it can hold and how fast it moves bytes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HardwareProfile {
    /// Profile name.
    pub name: String,
    /// One line about the machine.
    pub description: String,
    /// The CPU.
    pub cpu: CpuSpec,
    /// The GPU, if any.
    #[serde(default)]
    pub gpu: Option<GpuSpec>,
    /// Host RAM.
    pub host: HostSpec,
    /// The swap disk.
    pub disk: DiskSpec,
    /// Numbers in this profile that are assumptions, in words.
    #[serde(default)]
    pub assumptions: Vec<String>,
}

/// Why a profile could not be had.
#[derive(Debug, Error)]
pub enum ProfileError {
    /// Not a built-in name, not `detect`, and not a .toml file.
    #[error("unknown profile '{0}': use one of {names}, 'detect', or a path to a .toml file", names = BUILTIN_NAMES.join(", "))]
    Unknown(String),
    /// The TOML file could not be read.
    #[error("cannot read profile file {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// The TOML file is not a valid profile.
    #[error("profile file {path} is not a valid profile: {message}")]
    Parse {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// A size override could not be read.
    #[error("bad size for {flag}: {source}")]
    BadSize {
        /// The flag ("--gpu-mem").
        flag: &'static str,
        /// The error.
        source: crate::bytes::ParseBytesError,
    },
}

/// Overrides of a profile's capacities, as the CLI's `--gpu-mem`, `--host-mem`, `--disk-mem`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Overrides {
    /// Usable GPU bytes (replaces memory minus reserve). With no GPU in the profile, a
    /// non-zero value adds a simulated device of that size.
    pub gpu_bytes: Option<u64>,
    /// Usable host bytes.
    pub host_bytes: Option<u64>,
    /// Usable disk bytes.
    pub disk_bytes: Option<u64>,
}

impl Overrides {
    /// Parses the three CLI strings (each optional).
    pub fn parse(
        gpu: Option<&str>,
        host: Option<&str>,
        disk: Option<&str>,
    ) -> Result<Self, ProfileError> {
        let p = |flag: &'static str, s: Option<&str>| {
            s.map(parse_bytes)
                .transpose()
                .map_err(|source| ProfileError::BadSize { flag, source })
        };
        Ok(Overrides {
            gpu_bytes: p("--gpu-mem", gpu)?,
            host_bytes: p("--host-mem", host)?,
            disk_bytes: p("--disk-mem", disk)?,
        })
    }
}

impl HardwareProfile {
    /// Resolves a profile argument: a built-in name, `detect`, or a path to a TOML file.
    pub fn resolve(arg: &str) -> Result<Self, ProfileError> {
        if arg == "detect" {
            return Ok(detect(Path::new(".")));
        }
        if let Some(p) = builtin(arg) {
            return Ok(p);
        }
        if arg.ends_with(".toml") || Path::new(arg).is_file() {
            return Self::from_toml_file(Path::new(arg));
        }
        Err(ProfileError::Unknown(arg.to_string()))
    }

    /// Reads a profile from a TOML file (the same fields as `vlmem profile show --toml`).
    pub fn from_toml_file(path: &Path) -> Result<Self, ProfileError> {
        let text = std::fs::read_to_string(path).map_err(|source| ProfileError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_toml_str(&text).map_err(|message| ProfileError::Parse {
            path: path.display().to_string(),
            message,
        })
    }

    /// Parses a profile from TOML text.
    pub fn from_toml_str(text: &str) -> Result<Self, String> {
        let p: HardwareProfile = toml::from_str(text).map_err(|e| e.to_string())?;
        p.validate()?;
        Ok(p)
    }

    /// The profile as TOML.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_default()
    }

    /// Checks that the numbers make sense (positive bandwidths, reserves within capacity).
    pub fn validate(&self) -> Result<(), String> {
        let mut bws = vec![
            ("host.bandwidth", self.host.bandwidth),
            ("disk.read", self.disk.read),
            ("disk.write", self.disk.write),
        ];
        if let Some(g) = &self.gpu {
            bws.push(("gpu.memory_bandwidth", g.memory_bandwidth));
            bws.push(("gpu.link", g.link));
            if g.reserved_bytes > g.memory_bytes {
                return Err("gpu.reserved_bytes exceeds gpu.memory_bytes".into());
            }
        }
        for (name, bw) in bws {
            if !(bw.bytes_per_s.is_finite() && bw.bytes_per_s > 0.0) {
                return Err(format!("{name}.bytes_per_s must be a positive number"));
            }
        }
        if self.host.reserved_bytes > self.host.memory_bytes {
            return Err("host.reserved_bytes exceeds host.memory_bytes".into());
        }
        if self.cpu.cores == 0 || self.cpu.threads == 0 {
            return Err("cpu.cores and cpu.threads must be at least 1".into());
        }
        Ok(())
    }

    /// Applies `--gpu-mem`, `--host-mem`, `--disk-mem`: each replaces the usable capacity of
    /// its tier (the reserve is folded in).
    pub fn with_overrides(mut self, o: Overrides) -> Self {
        if let Some(b) = o.gpu_bytes {
            match &mut self.gpu {
                Some(g) => {
                    g.memory_bytes = b;
                    g.reserved_bytes = 0;
                }
                None if b > 0 => {
                    let mut g = simulated_gpu(b);
                    g.model = format!("simulated device ({} MiB)", b / MIB);
                    self.gpu = Some(g);
                }
                None => {}
            }
        }
        if let Some(b) = o.host_bytes {
            self.host.memory_bytes = b;
            self.host.reserved_bytes = 0;
        }
        if let Some(b) = o.disk_bytes {
            self.disk.free_bytes = b;
        }
        self
    }

    /// Usable GPU bytes (0 without a GPU).
    pub fn gpu_usable_bytes(&self) -> u64 {
        self.gpu.as_ref().map_or(0, GpuSpec::usable_bytes)
    }
}

/// A simulated device of `memory_bytes` on a PCIe 3.0 x4 link (the laptop's), for
/// `--gpu-mem` on a machine without a GPU. Its speeds are assumptions.
pub fn simulated_gpu(memory_bytes: u64) -> GpuSpec {
    GpuSpec {
        model: "simulated device".into(),
        compute_capability: (6, 1),
        memory_bytes,
        reserved_bytes: 0,
        shared_mem_per_block_bytes: 48 * 1024,
        max_threads_per_block: 1024,
        bf16_arithmetic: false,
        memory_bandwidth: Bandwidth::gbps(48.0, Source::Assumption),
        link: Bandwidth::gbps(3.5, Source::Assumption),
        link_name: "simulated PCIe 3.0 x4".into(),
    }
}

/// Rounds to whole GiB for display in descriptions.
pub(crate) fn gib(bytes: u64) -> f64 {
    bytes as f64 / GIB as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_builtin_resolves_validates_and_round_trips_through_toml() {
        for name in BUILTIN_NAMES {
            let p = HardwareProfile::resolve(name).unwrap();
            assert_eq!(&p.name, name);
            p.validate().unwrap();
            let back = HardwareProfile::from_toml_str(&p.to_toml()).unwrap();
            assert_eq!(back, p);
        }
    }

    #[test]
    fn laptop_matches_the_reference_target() {
        let p = builtin("laptop-i5-10210u-mx250").unwrap();
        assert_eq!((p.cpu.cores, p.cpu.threads), (4, 8));
        assert_eq!(p.cpu.l1d_bytes_per_core, 32 * 1024);
        assert_eq!(p.cpu.l2_bytes_per_core, 256 * 1024);
        assert_eq!(p.cpu.l3_bytes, 6 * MIB);
        let g = p.gpu.as_ref().unwrap();
        assert_eq!(g.compute_capability, (6, 1));
        assert_eq!(g.memory_bytes, 2 * GIB);
        assert_eq!(g.shared_mem_per_block_bytes, 48 * 1024);
        assert_eq!(g.max_threads_per_block, 1024);
        assert!(!g.bf16_arithmetic);
        assert_eq!(p.host.memory_bytes, 16 * GIB);
        // PCIe 3.0 x4: 4 lanes x 8 GT/s x 128/130 = 3.94 GB/s raw.
        assert!((g.link.bytes_per_s - 3.94e9).abs() < 0.01e9);
        assert!(!p.assumptions.is_empty());
    }

    #[test]
    fn unknown_and_malformed_profiles_are_errors() {
        assert!(matches!(
            HardwareProfile::resolve("no-such-machine"),
            Err(ProfileError::Unknown(_))
        ));
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("bad.toml");
        std::fs::write(&f, "name = 3").unwrap();
        assert!(matches!(
            HardwareProfile::resolve(f.to_str().unwrap()),
            Err(ProfileError::Parse { .. })
        ));
        let missing = dir.path().join("missing.toml");
        assert!(matches!(
            HardwareProfile::resolve(missing.to_str().unwrap()),
            Err(ProfileError::Io { .. })
        ));
        // Unknown fields in our own files are rejected.
        let mut t = builtin("desktop-gtx1060-6gb").unwrap().to_toml();
        t.push_str("\nsurprise = 1\n");
        assert!(HardwareProfile::from_toml_str(&t).is_err());
        // Negative or zero bandwidth is refused.
        let mut p = builtin("desktop-gtx1060-6gb").unwrap();
        p.disk.read.bytes_per_s = 0.0;
        assert!(HardwareProfile::from_toml_str(&p.to_toml()).is_err());
    }

    #[test]
    fn overrides_replace_usable_capacity() {
        let o = Overrides::parse(Some("512MiB"), Some("0"), Some("2GiB")).unwrap();
        let p = builtin("laptop-i5-10210u-mx250").unwrap().with_overrides(o);
        assert_eq!(p.gpu_usable_bytes(), 512 * MIB);
        assert_eq!(p.host.usable_bytes(), 0);
        assert_eq!(p.disk.free_bytes, 2 * GIB);
        assert!(Overrides::parse(Some("lots"), None, None).is_err());
        // --gpu-mem on a machine without a GPU adds a simulated device.
        let mut cpu_only = builtin("laptop-i5-10210u-mx250").unwrap();
        cpu_only.gpu = None;
        let p = cpu_only.with_overrides(Overrides {
            gpu_bytes: Some(GIB),
            ..Default::default()
        });
        assert!(p.gpu.as_ref().unwrap().model.contains("simulated"));
    }

    #[test]
    fn detect_reads_this_machine() {
        let p = detect(Path::new("."));
        assert!(p.cpu.threads >= 1);
        assert!(p.host.memory_bytes > 0);
        p.validate().unwrap();
    }
}
