//! What a [`ManagedWeights`] reports: its streaming plan and staging area, the read-ahead's
//! readers, and the bytes its kernels read.

use super::ManagedWeights;
use crate::error::Result;
use std::collections::HashMap;
use std::time::Instant;
use vlmem::readahead::ReaderActivity;
use vlmem::{StagingStats, TensorHandle};
use vlmem_core::sync::atomic::Ordering;
use vlmem_qwen3vl::checkpoint::TensorInfo;

/// The streaming plan of a [`ManagedWeights`] and its staging area's counters.
#[derive(Debug, Clone, Copy)]
pub struct StagingReport {
    /// The staging area's capacity (0 when every decoder weight fits the budget).
    pub capacity_bytes: u64,
    /// Decoder weight bytes the plan keeps on the compute tier.
    pub kept_bytes: u64,
    /// Decoder weight bytes the plan streams (read ahead into the area, or on demand).
    pub streamed_bytes: u64,
    /// How many tensors the plan streams.
    pub streamed_tensors: usize,
    /// How many pieces they are read in (each one read-ahead buffer).
    pub streamed_pieces: usize,
    /// The size of each read-ahead buffer (0: the area is too small, and streamed tensors
    /// are read on demand).
    pub buffer_bytes: usize,
    /// Bytes the area holds now (pieces read ahead and not taken yet, reads in flight,
    /// pieces the kernel is using).
    pub held_bytes: u64,
    /// The area's counters.
    pub stats: StagingStats,
}

impl ManagedWeights {
    /// Weight bytes read by the decode kernels and the seconds they took, since registration.
    pub fn kernel_read(&self) -> (u64, f64) {
        (
            self.kernel_bytes.load(Ordering::Relaxed),
            self.kernel_ns.load(Ordering::Relaxed) as f64 * 1e-9,
        )
    }

    /// Runs a kernel over `len_bytes` of weights, counting them and its time.
    pub(super) fn timed<R>(&self, len_bytes: usize, f: impl FnOnce() -> Result<R>) -> Result<R> {
        let t = Instant::now();
        let r = f();
        let ns = u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.kernel_ns.fetch_add(ns, Ordering::Relaxed);
        self.kernel_bytes
            .fetch_add(len_bytes as u64, Ordering::Relaxed);
        r
    }

    /// Bytes read from a weight's fastest copy into a staging buffer without being kept on
    /// the compute tier (tensors that do not fit it, embedding rows, expert slices). With
    /// the manager's `bytes_in` of the compute tier, this is what was streamed.
    pub fn staged_bytes(&self) -> u64 {
        self.staged_bytes.load(Ordering::Relaxed) + self.readahead.area_read_bytes()
    }

    /// The streaming plan and the staging area's counters.
    pub fn staging(&self) -> StagingReport {
        let ra = &self.readahead;
        let (mut kept_bytes, mut streamed_bytes) = (0, 0);
        for need in ra.units().iter().flatten() {
            if need.streamed {
                streamed_bytes += need.len_bytes;
            } else {
                kept_bytes += need.len_bytes;
            }
        }
        let stats = ra.stats();
        StagingReport {
            capacity_bytes: ra.capacity_bytes(),
            kept_bytes,
            streamed_bytes,
            streamed_tensors: ra.streamed_tensors(),
            streamed_pieces: ra.streamed_pieces(),
            buffer_bytes: ra.buffer_bytes(),
            held_bytes: stats.held_bytes,
            stats: stats.area,
        }
    }

    /// How busy the read-ahead's readers have been so far (zero before the first streamed
    /// layer, and when nothing streams).
    pub fn reader_activity(&self) -> ReaderActivity {
        self.readahead.reader_activity()
    }

    /// The weights the plan streams, in use order (layer by layer, each layer's tensors in
    /// the order the forward pass takes them): what a decode step reads from the disk.
    pub fn streamed_tensors(&self) -> Vec<&TensorInfo> {
        let by_handle: HashMap<TensorHandle, &TensorInfo> =
            self.index.values().map(|(h, info)| (*h, info)).collect();
        self.readahead
            .units()
            .iter()
            .flatten()
            .filter(|need| need.streamed)
            .filter_map(|need| by_handle.get(&need.handle).copied())
            .collect()
    }

    /// Bytes of fused expert tensors read (routed experts' slices only).
    pub fn expert_bytes(&self) -> u64 {
        self.expert_bytes.load(Ordering::Relaxed)
    }

    /// Prefetch hints given to the manager.
    pub fn prefetch_hints(&self) -> u64 {
        self.readahead.hints()
    }
}
