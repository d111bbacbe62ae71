//! [`FaultyTier`]: any tier with faults injected at its read and write points (a device
//! whose copies fail, a link that stalls). Disk faults are injected one level lower, at the
//! system calls ([`crate::io::FaultyFileIo`]), so that the disk tier's own checks run.

use crate::backend::{Reservation, TierBackend};
use crate::error::{Result, TierError};
use crate::fault::{FaultKind, FaultPlan, IoPoint, flip_bit, short_len};
use std::sync::Arc;
use vlmem_core::{ArenaUsage, Tier};

/// A tier wrapper that consults a [`FaultPlan`] at every read and write.
///
/// `NoSpace` and `Eio` fail the call; `Short` copies part of the bytes and fails with
/// [`TierError::ShortRead`] / [`TierError::ShortWrite`]; `Slow` delays it; `BitFlip`
/// corrupts the bytes read (memory tiers have no checksum of their own: that case models
/// what ECC is for, and is detected only where a CRC is kept, on disk).
#[derive(Debug)]
pub struct FaultyTier {
    inner: Arc<dyn TierBackend>,
    plan: Arc<FaultPlan>,
}

impl FaultyTier {
    /// Wraps `inner`; faults come from `plan`.
    pub fn new(inner: Arc<dyn TierBackend>, plan: Arc<FaultPlan>) -> Self {
        FaultyTier { inner, plan }
    }

    fn fail(&self, point: IoPoint, kind: FaultKind, res: &Reservation, len: u64) -> TierError {
        let tier = self.inner.tier();
        let errno = if kind == FaultKind::NoSpace {
            libc::ENOSPC
        } else {
            libc::EIO
        };
        TierError::from_io(
            tier,
            point,
            res.offset_bytes(),
            len,
            std::io::Error::from_raw_os_error(errno),
        )
    }
}

impl TierBackend for FaultyTier {
    fn tier(&self) -> Tier {
        self.inner.tier()
    }
    fn describe(&self) -> String {
        format!("{} (with injected faults)", self.inner.describe())
    }
    fn is_simulated(&self) -> bool {
        self.inner.is_simulated()
    }
    fn capacity_bytes(&self) -> u64 {
        self.inner.capacity_bytes()
    }
    fn usage(&self) -> ArenaUsage {
        self.inner.usage()
    }
    fn device_address(&self, res: &Reservation) -> Option<u64> {
        self.inner.device_address(res)
    }
    fn reserve(&self, len_bytes: u64, name: &str) -> Result<Reservation> {
        self.inner.reserve(len_bytes, name)
    }
    fn release(&self, res: Reservation) -> Result<()> {
        self.inner.release(res)
    }
    fn write(&self, res: &Reservation, offset_bytes: u64, src: &[u8]) -> Result<()> {
        match self.plan.check(IoPoint::Write) {
            None => self.inner.write(res, offset_bytes, src),
            Some(FaultKind::Slow(d)) => {
                std::thread::sleep(d);
                self.inner.write(res, offset_bytes, src)
            }
            Some(FaultKind::Short) => {
                let n = short_len(src.len());
                if let Some(part) = src.get(..n) {
                    self.inner.write(res, offset_bytes, part)?;
                }
                Err(TierError::ShortWrite {
                    tier: self.tier(),
                    offset_bytes: res.offset_bytes() + offset_bytes,
                    expected_bytes: src.len() as u64,
                    got_bytes: n as u64,
                })
            }
            Some(FaultKind::BitFlip) => {
                let mut copy = src.to_vec();
                flip_bit(&mut copy);
                self.inner.write(res, offset_bytes, &copy)
            }
            Some(kind) => Err(self.fail(IoPoint::Write, kind, res, src.len() as u64)),
        }
    }
    fn read(&self, res: &Reservation, offset_bytes: u64, dst: &mut [u8]) -> Result<()> {
        match self.plan.check(IoPoint::Read) {
            None => self.inner.read(res, offset_bytes, dst),
            Some(FaultKind::Slow(d)) => {
                std::thread::sleep(d);
                self.inner.read(res, offset_bytes, dst)
            }
            Some(FaultKind::Short) => {
                let n = short_len(dst.len());
                if let Some(part) = dst.get_mut(..n) {
                    self.inner.read(res, offset_bytes, part)?;
                }
                Err(TierError::ShortRead {
                    tier: self.tier(),
                    offset_bytes: res.offset_bytes() + offset_bytes,
                    expected_bytes: dst.len() as u64,
                    got_bytes: n as u64,
                })
            }
            Some(FaultKind::BitFlip) => {
                self.inner.read(res, offset_bytes, dst)?;
                flip_bit(dst);
                Ok(())
            }
            Some(kind) => Err(self.fail(IoPoint::Read, kind, res, dst.len() as u64)),
        }
    }
    // read_with / write_with stay `None`: every copy goes through `read` / `write` above.
    fn flush(&self) -> Result<()> {
        self.inner.flush()
    }
    fn flush_epoch(&self) -> u64 {
        self.inner.flush_epoch()
    }
    fn flush_since(&self, epoch: u64) -> Result<()> {
        self.inner.flush_since(epoch)
    }
    fn needs_flush(&self) -> bool {
        self.inner.needs_flush()
    }
    fn io_unit_bytes(&self) -> u64 {
        self.inner.io_unit_bytes()
    }
}
