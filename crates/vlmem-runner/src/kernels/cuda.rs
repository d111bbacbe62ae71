//! GPU decode kernels (feature `cuda`): `Y = X W^T` for a weight pinned on the CUDA device
//! tier, read in place in its stored type (bf16, f16, f32, Q8_0, Q4_K) and accumulated in
//! f32, for one input row (decode) or a few (a short prefill). SM 6.1 (the MX250) has no bf16
//! arithmetic: the kernels widen each element in registers.
//!
//! Q8_0 and Q4_K weights are multiplied in 8-bit integers with `dp4a`: the host quantizes the
//! input rows with the CPU kernels' own quantizer ([`Q8Input`] in blocks of 32 for Q8_0,
//! [`Q8KInput`] in blocks of 256 with sums of each 32 for Q4_K) and copies the quants, scales
//! and sums in, so the GPU and the CPU multiply the same integers and differ only in the order
//! of the f32 operations that scale and sum them (the decode path then gives the same numbers
//! whichever tier a layer's weights are on, up to that rounding). Quantizing on the host
//! rather than in a kernel costs a few microseconds of CPU per input row of a few thousand
//! values, saves a second launch (and a block-wide max reduction) per call, and copies about
//! 1.1 bytes per input value instead of 4.
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
use super::q4_k::Q8KInput;
use super::q8_0::Q8Input;
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
    /// The quantized input of the Q8_0 and Q4_K kernels ([`QuantizedInput`]).
    xq: CudaSlice<u8>,
    y: CudaSlice<f32>,
}

/// The input rows of a Q8_0 or Q4_K matmul as the kernels read them, packed into one buffer:
/// the int8 quants (`n * cols` bytes, from offset 0: 16-byte aligned in the device buffer),
/// then one f32 scale per input block (from `d_at`, a multiple of 32), then for Q4_K one i16
/// sum per 32 quants (from `s_at`). `cols` is whole weight blocks, so the blocks of the whole
/// `n * cols` input are those of each row.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizedInput {
    /// The packed bytes.
    pub bytes: Vec<u8>,
    /// Where the scales start.
    pub d_at: usize,
    /// Where the sums start (the end of the buffer for Q8_0, which has none).
    pub s_at: usize,
}

impl QuantizedInput {
    /// Quantizes `x` for a `ty` weight with the CPU kernels' quantizer; `None` for the formats
    /// the kernels read in f32.
    pub fn new(ty: WeightFormat, x: &[f32]) -> Option<Self> {
        let (q, d, sums) = match ty {
            WeightFormat::Q8_0 => {
                let xq = Q8Input::new(x);
                (xq.q, xq.d, Vec::new())
            }
            WeightFormat::Q4_K => {
                let xq = Q8KInput::new(x);
                (xq.q, xq.d, xq.sums)
            }
            WeightFormat::Bf16 | WeightFormat::F16 | WeightFormat::F32 => return None,
        };
        let d_at = q.len();
        let s_at = d_at + 4 * d.len();
        let mut bytes = vec![0u8; s_at + 2 * sums.len()];
        let (qb, rest) = bytes.split_at_mut(d_at);
        let (db, sb) = rest.split_at_mut(s_at - d_at);
        for (o, &v) in qb.iter_mut().zip(&q) {
            *o = v as u8;
        }
        for (o, v) in db.chunks_exact_mut(4).zip(&d) {
            o.copy_from_slice(&v.to_le_bytes());
        }
        for (o, v) in sb.chunks_exact_mut(2).zip(&sums) {
            o.copy_from_slice(&v.to_le_bytes());
        }
        Some(QuantizedInput { bytes, d_at, s_at })
    }
}

/// The decode kernels loaded on one GPU; see the module documentation.
pub struct GpuKernels {
    ctx: Arc<CudaContext>,
    bf16: CudaFunction,
    bf16_v8: CudaFunction,
    f16: CudaFunction,
    f32: CudaFunction,
    q8_0: CudaFunction,
    q4_k: CudaFunction,
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
            q8_0: load("matmul_q8_0")?,
            q4_k: load("matmul_q4_k")?,
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
        // Each kernel loads its format's values one at a time; Q8_0 in 2-byte halves (its
        // blocks are 34 bytes), Q4_K in 4-byte words (144-byte blocks).
        let align: u64 = match ty {
            WeightFormat::Bf16 | WeightFormat::F16 | WeightFormat::Q8_0 => 2,
            WeightFormat::F32 | WeightFormat::Q4_K => 4,
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
            WeightFormat::Q8_0 => &self.q8_0,
            WeightFormat::Q4_K => &self.q4_k,
        };
        let quantized = QuantizedInput::new(ty, x);
        let (x_len, xq_len) = match &quantized {
            Some(q) => (1, q.bytes.len().max(1)),
            None => (x.len().max(1), 1),
        };
        let mut lane = self.take_lane(x_len, xq_len, out_len)?;
        let result = (|| {
            let stream = lane.stream.clone();
            match &quantized {
                Some(q) if !q.bytes.is_empty() => {
                    let mut xv = lane.xq.slice_mut(0..q.bytes.len());
                    stream
                        .memcpy_htod(&q.bytes, &mut xv)
                        .map_err(|e| gpu_err("copying the input in", e))?;
                }
                None if !x.is_empty() => {
                    let mut xv = lane.x.slice_mut(0..x.len());
                    stream
                        .memcpy_htod(x, &mut xv)
                        .map_err(|e| gpu_err("copying the input in", e))?;
                }
                _ => {}
            }
            let cfg = LaunchConfig {
                grid_dim: ((rows.div_ceil(ROWS_PER_BLOCK)) as u32, n as u32, 1),
                block_dim: ((ROWS_PER_BLOCK * 32) as u32, 1, 1),
                shared_mem_bytes: 0,
            };
            // The quantized input's parts: quants, scales, sums.
            let parts = quantized.as_ref().map(|q| {
                [
                    lane.xq.slice(0..q.d_at),
                    lane.xq.slice(q.d_at..q.s_at),
                    lane.xq.slice(q.s_at..q.bytes.len()),
                ]
            });
            let mut launch = stream.launch_builder(func);
            launch.arg(&addr);
            match &parts {
                Some([qs, ds, ss]) => launch.arg(qs).arg(ds).arg(ss),
                None => launch.arg(&lane.x),
            };
            launch.arg(&mut lane.y).arg(&rows32).arg(&cols32);
            // SAFETY: the arguments match the kernels' signatures in decode.cu (weight
            // pointer, x (or for Q8_0 and Q4_K the quants, scales and sums), y, rows, cols as
            // u32). `addr .. addr + matrix_bytes` is the pinned weight's copy in GPU memory
            // (checked: its length is exactly that, on the device tier, aligned for its
            // kernel's loads and, for the v8 kernel, to 16 bytes with cols a multiple of 8), in
            // the primary context these kernels were loaded in; the pin keeps it from being
            // moved, evicted or freed until this call returns, which is after the stream is
            // synchronised below. x holds at least n*cols values, or the quantized buffer
            // n*cols quants from its (allocation-aligned) start, n*cols/32 or /256 f32 scales
            // from d_at (a multiple of 32) and, for Q4_K, n*cols/32 sums from s_at (a multiple
            // of 4), as `QuantizedInput` packs them; y holds at least n*rows values (the lane
            // was sized for them); grid.y = n <= 65,535.
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

    fn take_lane(&self, x_len: usize, xq_len: usize, y_len: usize) -> Result<Lane> {
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
                let xq = stream
                    .alloc_zeros::<u8>(1)
                    .map_err(|e| gpu_err("alloc", e))?;
                let y = stream
                    .alloc_zeros::<f32>(1)
                    .map_err(|e| gpu_err("alloc", e))?;
                Lane { stream, x, xq, y }
            }
        };
        if lane.x.len() < x_len {
            lane.x = lane
                .stream
                .alloc_zeros::<f32>(x_len.next_power_of_two())
                .map_err(|e| gpu_err("allocating the input buffer", e))?;
        }
        if lane.xq.len() < xq_len {
            lane.xq = lane
                .stream
                .alloc_zeros::<u8>(xq_len.next_power_of_two())
                .map_err(|e| gpu_err("allocating the quantized input buffer", e))?;
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
