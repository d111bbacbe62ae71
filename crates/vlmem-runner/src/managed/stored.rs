//! Reads of a weight's stored bytes: pinned on the compute tier, or read from its fastest
//! copy into a buffer of its own.

use super::{ManagedWeights, manager_error, usize_of, weight_type};
use crate::error::{Result, RunnerError};
use crate::kernels::{self, WeightFormat};
use crate::weights::check_expert;
use std::time::Instant;
use vlmem::readahead::phase_range;
use vlmem::{ManagerError, TensorHandle};
use vlmem_core::sync::atomic::Ordering;
use vlmem_tier::{AlignedBuf, IO_ALIGN_BYTES};

/// How long the weight store keeps asking for a weight that other threads keep busy. Each
/// manager call waits at most its own budget (`ManagerConfig::max_call_wait`, 2 s by
/// default) and then says [`ManagerError::Busy`], "nothing changed, retry"; the read-ahead's
/// move of a large weight (a 622 MB embedding) from a slow or shared disk can take longer
/// than one budget. Weights are read-only, so asking again is always safe.
pub const WEIGHT_BUSY_MAX: std::time::Duration = std::time::Duration::from_secs(120);

/// `call` again while it says [`ManagerError::Busy`], up to [`WEIGHT_BUSY_MAX`] in all (each
/// call waits its own budget first, so this never spins).
fn wait_out_moves<R>(
    mut call: impl FnMut() -> std::result::Result<R, ManagerError>,
) -> std::result::Result<R, ManagerError> {
    let started = Instant::now();
    loop {
        match call() {
            Err(ManagerError::Busy { .. }) if started.elapsed() < WEIGHT_BUSY_MAX => {}
            done => return done,
        }
    }
}

/// A buffer for a tensor read on demand: page-aligned, and on huge pages when large (reads
/// into it reach the disk in few segments; see [`vlmem_tier::AlignedBuf`]).
pub(super) fn staging_buf(name: &str, len: usize) -> Result<AlignedBuf> {
    AlignedBuf::new(len).map_err(|source| RunnerError::WeightBuffer {
        name: name.to_string(),
        source,
    })
}

impl ManagedWeights {
    /// Lends the stored bytes of every weight in `names` to `f` at once (each pinned, or
    /// staged), by nesting [`ManagedWeights::with_stored`]; the borrows end with the call.
    pub(super) fn lend_all<R>(
        &self,
        names: &[&str],
        held: &[&[u8]],
        f: &mut dyn FnMut(&[&[u8]]) -> Result<R>,
    ) -> Result<R> {
        match names.split_first() {
            None => f(held),
            Some((name, rest)) => self.with_stored(name, |bytes| {
                let mut inner = held.to_vec();
                inner.push(bytes);
                self.lend_all(rest, &inner, f)
            }),
        }
    }

    /// Lends the tensor's stored bytes to `f`: pinned on the compute tier when it fits
    /// there (no copy), else read from its fastest copy into a staging buffer the size of
    /// the tensor, which is dropped afterwards (a streamed tensor's pieces are gathered into
    /// it from the read-ahead, [`ManagedWeights::take_pieces`], and the rest read in place).
    pub(super) fn with_stored<R>(
        &self,
        name: &str,
        f: impl FnOnce(&[u8]) -> Result<R>,
    ) -> Result<R> {
        let (h, info) = self.entry(name)?;
        if let Some(s) = self.readahead.streamed(*h) {
            // One buffer for the whole tensor, phase-aligned with its file offset: pieces read
            // ahead are copied in, and from the first that was not, the rest is read straight
            // into place (O_DIRECT, no second copy).
            let len = usize_of(name, info.bytes)?;
            let mut whole = staging_buf(name, len + IO_ALIGN_BYTES)?;
            let range = phase_range(whole.as_slice(), s.file_offset_bytes(), len);
            let bytes = &mut whole.as_mut_slice()[range];
            let rest = self.take_pieces(*h, |start, piece| {
                bytes[start..start + piece.len()].copy_from_slice(piece);
                Ok(())
            })?;
            if let Some(start) = rest {
                self.read_rest(name, *h, start, &mut bytes[start..])?;
            }
            return f(bytes);
        }
        if self.on_demand.contains(h) {
            return self.with_read(name, *h, info.bytes, f);
        }
        match wait_out_moves(|| self.manager.pin(*h, self.compute_tier)) {
            Ok(guard) => guard.with_bytes(f).map_err(|e| manager_error(name, e))?,
            Err(ManagerError::TooLarge { .. } | ManagerError::OutOfMemory { .. }) => {
                self.with_read(name, *h, info.bytes, f)
            }
            Err(e) => Err(manager_error(name, e)),
        }
    }

    /// Reads the tensor from its fastest copy into a buffer of its own and lends it to `f`;
    /// nothing enters the compute tier.
    fn with_read<R>(
        &self,
        name: &str,
        h: TensorHandle,
        len_bytes: u64,
        f: impl FnOnce(&[u8]) -> Result<R>,
    ) -> Result<R> {
        let mut staging = staging_buf(name, usize_of(name, len_bytes)?)?;
        wait_out_moves(|| self.manager.read(h, 0, staging.as_mut_slice()))
            .map_err(|e| manager_error(name, e))?;
        self.staged_bytes.fetch_add(len_bytes, Ordering::Relaxed);
        f(staging.as_slice())
    }

    /// Reads `len` bytes at `offset` of `name`: from its copy on the compute tier when it has
    /// one, else from its fastest copy into the buffer (counted as staged). Nothing moves.
    pub(super) fn read_range(&self, name: &str, offset: u64, len: usize) -> Result<Vec<u8>> {
        let (h, _) = self.entry(name)?;
        let mut buf = vec![0u8; len];
        let on_compute_tier = self
            .manager
            .residency(*h)
            .is_ok_and(|(tiers, _)| tiers.contains(&self.compute_tier));
        if on_compute_tier
            && let Ok(guard) = wait_out_moves(|| self.manager.pin(*h, self.compute_tier))
        {
            guard
                .read(offset, &mut buf)
                .map_err(|e| manager_error(name, e))?;
            return Ok(buf);
        }
        wait_out_moves(|| self.manager.read(*h, offset, &mut buf))
            .map_err(|e| manager_error(name, e))?;
        self.staged_bytes.fetch_add(len as u64, Ordering::Relaxed);
        Ok(buf)
    }

    /// The stored bytes of matrix `expert` of the stack `name`, and its two dimensions.
    pub(super) fn expert_slice(
        &self,
        name: &str,
        expert: usize,
    ) -> Result<(Vec<u8>, WeightFormat, usize, usize)> {
        let (_, info) = self.entry(name)?;
        let shape: Vec<usize> = info
            .shape
            .iter()
            .map(|&d| usize_of(name, d))
            .collect::<Result<_>>()?;
        check_expert(name, &shape, expert)?;
        let ty = weight_type(name, info)?;
        let (a, b) = (shape[1], shape[2]);
        let slice = kernels::matrix_bytes(ty, a, b)?;
        let bytes = self.read_range(name, (expert * slice) as u64, slice)?;
        self.expert_bytes.fetch_add(slice as u64, Ordering::Relaxed);
        Ok((bytes, ty, a, b))
    }
}
