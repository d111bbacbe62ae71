//! GPU decode kernels (feature `cuda`): `Y = X W^T` for a weight pinned on the CUDA device
//! tier, read in place in its stored type (bf16, f16, f32) and accumulated in f32, for one
//! input row (decode) or a few (a short prefill). SM 6.1 (the MX250) has no bf16 arithmetic:
//! the kernels widen each element in registers.
//!
//! The kernels are CUDA C (`kernels/cuda/decode.cu`) compiled ahead to PTX for compute_61
//! (`kernels/cuda/decode.ptx`, by `gen_ptx.py` with NVRTC) and JIT-compiled by the driver when
//! [`GpuKernels::new`] loads them, so building needs no CUDA toolkit and one PTX serves SM 6.1
//! and every newer GPU. cudarc loads libcuda at run time.
//!
//! Each call takes a "lane" (a stream with input and output buffers) from a small pool, copies
//! the inputs in, launches, copies the outputs back and waits for the stream, then returns
//! the lane: calls from several threads run side by side and no lock is held across GPU
//! work. The weight stays pinned (its [`PinGuard`]) for the whole call.
#![allow(unsafe_code)]

use super::WeightFormat;
use crate::error::{Result, RunnerError};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, LaunchConfig, PushKernelArg,
};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use vlmem::{PinGuard, Tier};

/// The kernels' PTX (see the module documentation).
pub const DECODE_PTX: &str = include_str!("cuda/decode.ptx");

/// Weight rows one block of 256 threads covers (one warp per row; `ROWS_PER_BLOCK` in
/// decode.cu).
const ROWS_PER_BLOCK: usize = 8;
/// Input rows one launch takes (grid.y).
const MAX_INPUT_ROWS: usize = 65_535;

struct Lane {
    stream: Arc<CudaStream>,
    x: CudaSlice<f32>,
    y: CudaSlice<f32>,
}

/// The decode kernels loaded on one GPU; see the module documentation.
pub struct GpuKernels {
    ctx: Arc<CudaContext>,
    bf16: CudaFunction,
    bf16_v8: CudaFunction,
    f16: CudaFunction,
    f32: CudaFunction,
    lanes: Mutex<Vec<Lane>>,
    name: String,
    compute_capability: (i32, i32),
    /// Weight bytes read by the kernels and the nanoseconds their calls took (copies of the
    /// inputs and outputs included).
    bytes: AtomicU64,
    ns: AtomicU64,
}

impl std::fmt::Debug for GpuKernels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuKernels")
            .field("name", &self.name)
            .field("compute_capability", &self.compute_capability)
            .finish_non_exhaustive()
    }
}

fn gpu_err(what: &str, e: impl std::fmt::Display) -> RunnerError {
    RunnerError::Gpu(format!("{what}: {e}"))
}

impl GpuKernels {
    /// Loads the kernels on GPU `ordinal` (its primary context, the one the CUDA device tier
    /// of the memory manager allocates in). An error, never a panic, when there is no driver
    /// or no such GPU.
    pub fn new(ordinal: usize) -> Result<Self> {
        if vlmem_tier::cuda::probe().is_none_or(|n| ordinal >= n) {
            return Err(RunnerError::Gpu(format!(
                "no CUDA device {ordinal} (libcuda missing or no GPU)"
            )));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| gpu_err("opening the device", e))?;
        let module = ctx
            .load_module(cudarc::nvrtc::Ptx::from_src(DECODE_PTX))
            .map_err(|e| gpu_err("loading the decode kernels (PTX for compute_61)", e))?;
        let load = |name: &str| {
            module
                .load_function(name)
                .map_err(|e| gpu_err(&format!("kernel {name}"), e))
        };
        Ok(GpuKernels {
            bf16: load("matmul_bf16")?,
            bf16_v8: load("matmul_bf16_v8")?,
            f16: load("matmul_f16")?,
            f32: load("matmul_f32")?,
            name: ctx.name().unwrap_or_else(|_| "CUDA device".into()),
            compute_capability: ctx.compute_capability().unwrap_or((0, 0)),
            ctx,
            lanes: Mutex::new(Vec::new()),
            bytes: AtomicU64::new(0),
            ns: AtomicU64::new(0),
        })
    }

    /// The GPU's name and compute capability.
    pub fn describe(&self) -> String {
        format!(
            "{} (SM {}.{})",
            self.name, self.compute_capability.0, self.compute_capability.1
        )
    }

    /// Weight bytes the kernels read so far and the seconds their calls took.
    pub fn read_so_far(&self) -> (u64, f64) {
        (
            self.bytes.load(Ordering::Relaxed),
            self.ns.load(Ordering::Relaxed) as f64 * 1e-9,
        )
    }

    /// `Y = X W^T`: `w` is a weight `[rows, cols]` of type `ty` pinned on the CUDA device
    /// tier, `x` holds `n` input rows of `cols` values (row-major); returns `n x rows`
    /// values. Errors (never panics) when the pin is not in GPU memory, the sizes disagree,
    /// or the GPU fails.
    pub fn matmul(
        &self,
        w: &PinGuard,
        ty: WeightFormat,
        rows: usize,
        cols: usize,
        x: &[f32],
        n: usize,
    ) -> Result<Vec<f32>> {
        let started = Instant::now();
        let want_bytes = super::matrix_bytes(ty, rows, cols)?;
        if w.tier() != Tier::Device || w.len_bytes() != want_bytes as u64 {
            return Err(RunnerError::BadRequest(format!(
                "GPU matmul: a {} byte weight pinned on {:?}, expected {want_bytes} bytes on \
                 the device",
                w.len_bytes(),
                w.tier()
            )));
        }
        if n.checked_mul(cols) != Some(x.len()) || n > MAX_INPUT_ROWS {
            return Err(RunnerError::BadRequest(format!(
                "GPU matmul: {} input values for {n} rows of {cols} (at most \
                 {MAX_INPUT_ROWS} rows)",
                x.len()
            )));
        }
        let (Ok(rows32), Ok(cols32)) = (u32::try_from(rows), u32::try_from(cols)) else {
            return Err(RunnerError::BadRequest(format!(
                "GPU matmul: {rows} x {cols} exceeds the kernels' 32-bit sizes"
            )));
        };
        let out_len = n * rows;
        if out_len == 0 {
            return Ok(Vec::new());
        }
        let addr = w
            .device_address()
            .map_err(|e| RunnerError::Gpu(format!("the weight's device address: {e}")))?
            .ok_or_else(|| RunnerError::Gpu("the weight is not in GPU memory".into()))?;
        // Each kernel loads its format's values one at a time.
        let align: u64 = match ty {
            WeightFormat::Bf16 | WeightFormat::F16 => 2,
            WeightFormat::F32 => 4,
            WeightFormat::Q8_0 | WeightFormat::Q4_K => {
                return Err(RunnerError::Gpu(format!(
                    "the GPU kernels do not read {ty} weights yet"
                )));
            }
        };
        if !addr.is_multiple_of(align) {
            return Err(RunnerError::Gpu(format!(
                "weight at {addr:#x} is not aligned to {align} bytes"
            )));
        }
        let func = match ty {
            WeightFormat::Bf16 if cols.is_multiple_of(8) && addr.is_multiple_of(16) => {
                &self.bf16_v8
            }
            WeightFormat::Bf16 => &self.bf16,
            WeightFormat::F16 => &self.f16,
            WeightFormat::F32 => &self.f32,
            WeightFormat::Q8_0 | WeightFormat::Q4_K => {
                return Err(RunnerError::Gpu(format!(
                    "the GPU kernels do not read {ty} weights yet"
                )));
            }
        };
        let mut lane = self.take_lane(x.len().max(1), out_len)?;
        let result = (|| {
            let stream = lane.stream.clone();
            if !x.is_empty() {
                let mut xv = lane.x.slice_mut(0..x.len());
                stream
                    .memcpy_htod(x, &mut xv)
                    .map_err(|e| gpu_err("copying the input in", e))?;
            }
            let cfg = LaunchConfig {
                grid_dim: ((rows.div_ceil(ROWS_PER_BLOCK)) as u32, n as u32, 1),
                block_dim: ((ROWS_PER_BLOCK * 32) as u32, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut launch = stream.launch_builder(func);
            launch
                .arg(&addr)
                .arg(&lane.x)
                .arg(&mut lane.y)
                .arg(&rows32)
                .arg(&cols32);
            // SAFETY: the arguments match the kernels' signatures in decode.cu (weight
            // pointer, x, y, rows, cols as u32). `addr .. addr + rows*cols*size` is the
            // pinned weight's copy in GPU memory (checked: its length is exactly that, on the
            // device tier, aligned for its type and, for the v8 kernel, to 16 bytes with cols
            // a multiple of 8), in the primary context these kernels were loaded in; the pin
            // keeps it from being moved, evicted or freed until this call returns, which is
            // after the stream is synchronised below. x holds at least n*cols values and y at
            // least n*rows (the lane was sized for them); grid.y = n <= 65,535.
            unsafe { launch.launch(cfg) }.map_err(|e| gpu_err("launching the kernel", e))?;
            let mut y = vec![0f32; out_len];
            stream
                .memcpy_dtoh(&lane.y.slice(0..out_len), &mut y)
                .map_err(|e| gpu_err("copying the output back", e))?;
            stream
                .synchronize()
                .map_err(|e| gpu_err("waiting for the kernel", e))?;
            Ok(y)
        })();
        match &result {
            Ok(_) => self.give_lane(lane),
            // A failed lane may hold a broken stream: drop it (after waiting for it).
            Err(_) => {
                let _ = lane.stream.synchronize();
                drop(lane);
            }
        }
        if result.is_ok() {
            self.bytes.fetch_add(want_bytes as u64, Ordering::Relaxed);
            self.ns
                .fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
        }
        result
    }

    fn take_lane(&self, x_len: usize, y_len: usize) -> Result<Lane> {
        let pooled = self.lanes.lock().map(|mut l| l.pop()).unwrap_or(None);
        let mut lane = match pooled {
            Some(l) => l,
            None => {
                let stream = self
                    .ctx
                    .new_stream()
                    .map_err(|e| gpu_err("creating a stream", e))?;
                let x = stream
                    .alloc_zeros::<f32>(1)
                    .map_err(|e| gpu_err("alloc", e))?;
                let y = stream
                    .alloc_zeros::<f32>(1)
                    .map_err(|e| gpu_err("alloc", e))?;
                Lane { stream, x, y }
            }
        };
        if lane.x.len() < x_len {
            lane.x = lane
                .stream
                .alloc_zeros::<f32>(x_len.next_power_of_two())
                .map_err(|e| gpu_err("allocating the input buffer", e))?;
        }
        if lane.y.len() < y_len {
            lane.y = lane
                .stream
                .alloc_zeros::<f32>(y_len.next_power_of_two())
                .map_err(|e| gpu_err("allocating the output buffer", e))?;
        }
        Ok(lane)
    }

    fn give_lane(&self, lane: Lane) {
        if let Ok(mut l) = self.lanes.lock() {
            l.push(lane);
        }
    }
}
