//! The CUDA device tier (feature `cuda`): device memory through `cudarc` with dynamic
//! loading, so the crate builds where no CUDA is installed.
//!
//! cudarc's dynamic loader panics (rather than returning an error) when libcuda is absent,
//! so [`probe`] first looks for the library file (standard directories, `LD_LIBRARY_PATH`,
//! `ldconfig -p`) without loading it, and only then asks the driver, inside
//! `catch_unwind`. [`detect_device`] falls back to the simulated device when there is no
//! usable GPU.
//!
//! The arena is one device allocation of the allocator's capacity. Copies in and out are
//! asynchronous on a stream taken from a small pool (one per concurrent copy) and awaited
//! before the call returns, so the host buffer is never released early. Nothing here
//! assumes bf16 support on the GPU (SM 6.1 has none): the tier moves bytes only.
#![allow(unsafe_code)]

use crate::backend::{Reservation, TierBackend, check_range};
use crate::error::{Result, TierError};
use crate::fault::IoPoint;
use crate::registry::Registry;
use crate::sync::Mutex;
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr};
use std::sync::Arc;
use vlmem_core::{ArenaUsage, OffsetAllocator, Tier};

const LIB_DIRS: [&str; 8] = [
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/usr/lib64",
    "/usr/lib",
    "/usr/local/cuda/lib64",
    "/usr/local/cuda/compat",
    "/usr/local/nvidia/lib64",
    "/usr/lib/wsl/lib",
];

/// Whether a libcuda shared library is installed (looked for, not loaded).
pub fn libcuda_installed() -> bool {
    let mut dirs: Vec<std::path::PathBuf> = LIB_DIRS.iter().map(Into::into).collect();
    if let Some(p) = std::env::var_os("LD_LIBRARY_PATH") {
        dirs.extend(std::env::split_paths(&p));
    }
    let found = dirs.iter().any(|d| {
        ["libcuda.so.1", "libcuda.so"]
            .iter()
            .any(|n| d.join(n).exists())
    });
    found
        || std::process::Command::new("ldconfig")
            .arg("-p")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).contains("libcuda.so"))
            .unwrap_or(false)
}

/// The number of CUDA devices, or `None` when there is no driver or no device. Never
/// panics, even though cudarc's loader would.
pub fn probe() -> Option<usize> {
    if !libcuda_installed() {
        return None;
    }
    let n = std::panic::catch_unwind(CudaContext::device_count)
        .ok()?
        .ok()?;
    usize::try_from(n).ok().filter(|&n| n > 0)
}

/// The CUDA device on `ordinal` when there is one, else the simulated device (with
/// `bandwidth_bytes_per_s` as its link cap).
pub fn detect_device(
    alloc: Arc<dyn OffsetAllocator>,
    bandwidth_bytes_per_s: Option<u64>,
    ordinal: usize,
) -> Result<Arc<dyn TierBackend>> {
    if probe().is_some_and(|n| ordinal < n) {
        Ok(Arc::new(CudaDevice::new(alloc, ordinal)?))
    } else {
        Ok(Arc::new(crate::mem::MemoryTier::simulated_device(
            alloc,
            bandwidth_bytes_per_s,
        )?))
    }
}

fn cuda_err(
    point: IoPoint,
    offset_bytes: u64,
    len_bytes: u64,
    e: impl std::fmt::Display,
) -> TierError {
    TierError::Io {
        tier: Tier::Device,
        point,
        offset_bytes,
        len_bytes,
        source: std::io::Error::other(format!("CUDA: {e}")),
    }
}

/// The host arena registered with the driver as page-locked ("pinned") memory, in chunks, so
/// copies to and from it are true DMA. Unregisters on drop; holds the arena alive meanwhile.
pub struct PinnedHost {
    ctx: Arc<CudaContext>,
    host: Arc<crate::mem::MemoryTier>,
    chunks: Vec<(usize, usize)>,
}

impl std::fmt::Debug for PinnedHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PinnedHost")
            .field("chunks", &self.chunks.len())
            .finish()
    }
}

impl PinnedHost {
    /// Bytes registered.
    pub fn pinned_bytes(&self) -> u64 {
        self.chunks.iter().map(|c| c.1 as u64).sum()
    }
}

impl Drop for PinnedHost {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        let (base, _) = self.host.raw_region();
        for &(off, _) in &self.chunks {
            // SAFETY: each chunk was registered by `CudaDevice::pin_host` at this address and
            // is unregistered once, here, while `self.host` keeps the mapping alive.
            unsafe {
                let _ = cudarc::driver::sys::cuMemHostUnregister(base.wrapping_add(off).cast());
            }
        }
    }
}

/// Device memory of one GPU, as a tier.
pub struct CudaDevice {
    ctx: Arc<CudaContext>,
    _mem: CudaSlice<u8>,
    base: u64,
    streams: Mutex<Vec<Arc<CudaStream>>>,
    alloc: Arc<dyn OffsetAllocator>,
    reg: Registry<()>,
    name: String,
    compute_capability: (i32, i32),
}

impl std::fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaDevice")
            .field("name", &self.name)
            .field("compute_capability", &self.compute_capability)
            .field("capacity_bytes", &self.alloc.capacity_bytes())
            .finish()
    }
}

impl CudaDevice {
    /// Allocates the arena (`alloc`'s capacity) on GPU `ordinal`. Call [`probe`] first:
    /// without a driver this returns an error (it never reaches cudarc's panicking loader).
    pub fn new(alloc: Arc<dyn OffsetAllocator>, ordinal: usize) -> Result<Self> {
        if probe().is_none_or(|n| ordinal >= n) {
            return Err(TierError::Unsupported(format!(
                "no CUDA device {ordinal} (libcuda missing or no GPU)"
            )));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| cuda_err(IoPoint::Open, 0, 0, e))?;
        let stream = ctx.default_stream();
        let cap = usize::try_from(alloc.capacity_bytes())
            .map_err(|_| TierError::InvalidConfig("device arena too large".into()))?;
        let mem = stream
            .alloc_zeros::<u8>(cap.max(1))
            .map_err(|e| cuda_err(IoPoint::Allocate, 0, cap as u64, e))?;
        let base = {
            let (ptr, _sync) = mem.device_ptr(&stream);
            ptr
        };
        stream
            .synchronize()
            .map_err(|e| cuda_err(IoPoint::Sync, 0, 0, e))?;
        let name = ctx.name().unwrap_or_else(|_| "CUDA device".into());
        let compute_capability = ctx.compute_capability().unwrap_or((0, 0));
        Ok(CudaDevice {
            ctx,
            _mem: mem,
            base,
            streams: Mutex::new(Vec::new()),
            alloc,
            reg: Registry::new(Tier::Device),
            name,
            compute_capability,
        })
    }

    /// The CUDA context the arena lives in: kernels that read pinned copies in place
    /// ([`TierBackend::device_address`]) run in it.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The GPU's name, as the driver reports it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The GPU's compute capability (e.g. (6, 1) for an MX250).
    pub fn compute_capability(&self) -> (i32, i32) {
        self.compute_capability
    }

    /// Registers the host arena as pinned memory in chunks of `chunk_bytes` (the driver limits
    /// one registration's size, and a chunk that fails leaves the others in place). The
    /// arena is never rounded up: the last chunk is shorter.
    pub fn pin_host(
        &self,
        host: Arc<crate::mem::MemoryTier>,
        chunk_bytes: usize,
    ) -> Result<PinnedHost> {
        if chunk_bytes == 0 || !chunk_bytes.is_multiple_of(4096) {
            return Err(TierError::InvalidConfig(format!(
                "pinning chunk of {chunk_bytes} bytes: a non-zero multiple of 4096"
            )));
        }
        self.ctx
            .bind_to_thread()
            .map_err(|e| cuda_err(IoPoint::Open, 0, 0, e))?;
        let (base, len) = host.raw_region();
        let mut pinned = PinnedHost {
            ctx: self.ctx.clone(),
            host: host.clone(),
            chunks: Vec::new(),
        };
        let mut off = 0usize;
        while off < len {
            let n = chunk_bytes.min(len - off);
            // SAFETY: `base+off .. +n` lies inside the arena's live mapping, which `pinned`
            // keeps alive (it holds the tier) until it unregisters the chunk on drop.
            let r = unsafe {
                cudarc::driver::sys::cuMemHostRegister_v2(
                    base.wrapping_add(off).cast(),
                    n,
                    cudarc::driver::sys::CU_MEMHOSTREGISTER_PORTABLE,
                )
            }
            .result();
            r.map_err(|e| cuda_err(IoPoint::Open, off as u64, n as u64, e))?;
            pinned.chunks.push((off, n));
            off += n;
        }
        Ok(pinned)
    }

    fn take_stream(&self) -> Result<Arc<CudaStream>> {
        if let Some(s) = self.streams.lock().pop() {
            return Ok(s);
        }
        self.ctx
            .new_stream()
            .map_err(|e| cuda_err(IoPoint::Open, 0, 0, e))
    }

    fn put_stream(&self, s: Arc<CudaStream>) {
        self.streams.lock().push(s);
    }
}

impl TierBackend for CudaDevice {
    fn tier(&self) -> Tier {
        Tier::Device
    }
    fn describe(&self) -> String {
        format!(
            "CUDA {} (SM {}.{}), {:.2} GiB arena",
            self.name,
            self.compute_capability.0,
            self.compute_capability.1,
            self.alloc.capacity_bytes() as f64 / (1u64 << 30) as f64
        )
    }
    fn capacity_bytes(&self) -> u64 {
        self.alloc.capacity_bytes()
    }
    fn usage(&self) -> ArenaUsage {
        self.alloc.usage()
    }
    fn device_address(&self, res: &Reservation) -> Option<u64> {
        (res.tier() == Tier::Device && res.block().end_bytes() <= self.alloc.capacity_bytes())
            .then(|| self.base + res.offset_bytes())
    }
    fn reserve(&self, len_bytes: u64, name: &str) -> Result<Reservation> {
        let block = self
            .alloc
            .allocate(len_bytes)
            .map_err(|source| TierError::Alloc {
                tier: Tier::Device,
                source,
            })?;
        if block.end_bytes() > self.alloc.capacity_bytes() || block.len_bytes() < len_bytes {
            let _ = self.alloc.free(block);
            return Err(TierError::InvalidConfig(
                "the device allocator returned a block outside its arena".into(),
            ));
        }
        let res = Reservation::new(Tier::Device, block, len_bytes, false);
        if let Err(e) = self.reg.insert(res, name, ()) {
            let _ = self.alloc.free(block);
            return Err(e);
        }
        Ok(res)
    }
    fn release(&self, res: Reservation) -> Result<()> {
        self.reg.remove(&res)?;
        self.alloc
            .free(res.block())
            .map_err(|source| TierError::Alloc {
                tier: Tier::Device,
                source,
            })
    }
    fn write(&self, res: &Reservation, offset_bytes: u64, src: &[u8]) -> Result<()> {
        let len = src.len() as u64;
        check_range(Tier::Device, res, offset_bytes, len)?;
        let access = self.reg.access(res, offset_bytes, len, true)?;
        let at = res.offset_bytes() + offset_bytes;
        let stream = self.take_stream()?;
        self.ctx
            .bind_to_thread()
            .map_err(|e| cuda_err(IoPoint::Write, at, len, e))?;
        // SAFETY: `base + at .. + len` lies inside the arena allocation (the range was checked
        // against the reservation, the block against the arena), which `self` keeps alive;
        // the registry gave this call exclusive access to the range; `src` stays borrowed
        // until the stream is synchronised below, before returning.
        let r = unsafe {
            cudarc::driver::result::memcpy_htod_async(self.base + at, src, stream.cu_stream())
        }
        .and_then(|()| stream.synchronize());
        self.put_stream(stream);
        drop(access);
        r.map_err(|e| cuda_err(IoPoint::Write, at, len, e))
    }
    fn read(&self, res: &Reservation, offset_bytes: u64, dst: &mut [u8]) -> Result<()> {
        let len = dst.len() as u64;
        check_range(Tier::Device, res, offset_bytes, len)?;
        let access = self.reg.access(res, offset_bytes, len, false)?;
        let at = res.offset_bytes() + offset_bytes;
        let stream = self.take_stream()?;
        self.ctx
            .bind_to_thread()
            .map_err(|e| cuda_err(IoPoint::Read, at, len, e))?;
        // SAFETY: as in `write`; the registry gave shared access to the device range, and
        // `dst` stays exclusively borrowed until the stream is synchronised below.
        let r = unsafe {
            cudarc::driver::result::memcpy_dtoh_async(dst, self.base + at, stream.cu_stream())
        }
        .and_then(|()| stream.synchronize());
        self.put_stream(stream);
        drop(access);
        r.map_err(|e| cuda_err(IoPoint::Read, at, len, e))
    }
}
