//! The one chokepoint for disk I/O: the [`FileIo`] trait.
//!
//! The disk tier never calls the operating system directly; it calls a `FileIo`. The real
//! one ([`RealFileIo`]) does the system calls; [`FaultyFileIo`] wraps any `FileIo` and injects
//! ENOSPC, EIO, short transfers, bit flips and delays from a [`FaultPlan`].

use crate::fault::{FaultKind, FaultPlan, IoPoint, flip_bit, short_len};
use std::fs::File;
use std::io;
use std::path::Path;
use std::sync::Arc;

/// The system calls of the disk tier. Implementations are thread-safe: workers call them
/// concurrently on the same files (positioned I/O, no shared cursor).
pub trait FileIo: Send + Sync + std::fmt::Debug {
    /// Creates an anonymous swap file in `dir`: mode 0600, never linked into the file system
    /// (O_TMPFILE), or created and unlinked at once where O_TMPFILE is not supported, so that
    /// nothing is left behind after a crash. With `direct`, the file is opened O_DIRECT.
    fn open_swap(&self, dir: &Path, direct: bool) -> io::Result<File>;
    /// Opens an existing file read-only (a checkpoint holding read-only extents).
    fn open_read_only(&self, path: &Path, direct: bool) -> io::Result<File>;
    /// Preallocates `len_bytes` bytes of `file` (fallocate; a sparse `set_len` where the
    /// file system cannot preallocate).
    fn allocate(&self, file: &File, len_bytes: u64) -> io::Result<()>;
    /// Positioned write; returns the bytes written (may be short).
    fn write_at(&self, file: &File, offset_bytes: u64, buf: &[u8]) -> io::Result<usize>;
    /// Positioned read; returns the bytes read (may be short; 0 at end of file).
    fn read_at(&self, file: &File, offset_bytes: u64, buf: &mut [u8]) -> io::Result<usize>;
    /// fdatasync.
    fn sync_data(&self, file: &File) -> io::Result<()>;
}

/// The real system calls.
#[derive(Debug, Default, Clone, Copy)]
pub struct RealFileIo;

impl FileIo for RealFileIo {
    fn open_swap(&self, dir: &Path, direct: bool) -> io::Result<File> {
        crate::sys::open_swap(dir, direct)
    }
    fn open_read_only(&self, path: &Path, direct: bool) -> io::Result<File> {
        crate::sys::open_read_only(path, direct)
    }
    fn allocate(&self, file: &File, len_bytes: u64) -> io::Result<()> {
        crate::sys::allocate(file, len_bytes)
    }
    fn write_at(&self, file: &File, offset_bytes: u64, buf: &[u8]) -> io::Result<usize> {
        std::os::unix::fs::FileExt::write_at(file, buf, offset_bytes)
    }
    fn read_at(&self, file: &File, offset_bytes: u64, buf: &mut [u8]) -> io::Result<usize> {
        std::os::unix::fs::FileExt::read_at(file, buf, offset_bytes)
    }
    fn sync_data(&self, file: &File) -> io::Result<()> {
        file.sync_data()
    }
}

/// Wraps a [`FileIo`] and applies the faults of a [`FaultPlan`] at each call.
#[derive(Debug, Clone)]
pub struct FaultyFileIo {
    inner: Arc<dyn FileIo>,
    plan: Arc<FaultPlan>,
}

impl FaultyFileIo {
    /// Wraps `inner`; faults come from `plan`.
    pub fn new(inner: Arc<dyn FileIo>, plan: Arc<FaultPlan>) -> Self {
        FaultyFileIo { inner, plan }
    }
    /// The plan, to add rules while running.
    pub fn plan(&self) -> &Arc<FaultPlan> {
        &self.plan
    }
}

fn os_error(kind: FaultKind) -> Option<io::Error> {
    match kind {
        FaultKind::NoSpace => Some(io::Error::from_raw_os_error(libc::ENOSPC)),
        FaultKind::Eio => Some(io::Error::from_raw_os_error(libc::EIO)),
        _ => None,
    }
}

impl FileIo for FaultyFileIo {
    fn open_swap(&self, dir: &Path, direct: bool) -> io::Result<File> {
        if let Some(kind) = self.plan.check(IoPoint::Open) {
            if let Some(e) = os_error(kind) {
                return Err(e);
            }
            if let FaultKind::Slow(d) = kind {
                std::thread::sleep(d);
            }
        }
        self.inner.open_swap(dir, direct)
    }
    fn open_read_only(&self, path: &Path, direct: bool) -> io::Result<File> {
        if let Some(kind) = self.plan.check(IoPoint::Open) {
            if let Some(e) = os_error(kind) {
                return Err(e);
            }
            if let FaultKind::Slow(d) = kind {
                std::thread::sleep(d);
            }
        }
        self.inner.open_read_only(path, direct)
    }
    fn allocate(&self, file: &File, len_bytes: u64) -> io::Result<()> {
        if let Some(kind) = self.plan.check(IoPoint::Allocate) {
            if let Some(e) = os_error(kind) {
                return Err(e);
            }
            if let FaultKind::Slow(d) = kind {
                std::thread::sleep(d);
            }
        }
        self.inner.allocate(file, len_bytes)
    }
    fn write_at(&self, file: &File, offset_bytes: u64, buf: &[u8]) -> io::Result<usize> {
        match self.plan.check(IoPoint::Write) {
            None => self.inner.write_at(file, offset_bytes, buf),
            Some(FaultKind::Slow(d)) => {
                std::thread::sleep(d);
                self.inner.write_at(file, offset_bytes, buf)
            }
            Some(FaultKind::Short) => {
                let n = short_len(buf.len());
                match buf.get(..n) {
                    Some(part) if n > 0 => self.inner.write_at(file, offset_bytes, part),
                    _ => Ok(0),
                }
            }
            Some(FaultKind::BitFlip) => {
                // Corrupt a copy, never the caller's buffer: the source stays valid.
                let mut copy = crate::align::AlignedBuf::new(buf.len())
                    .map_err(|e| io::Error::other(e.to_string()))?;
                copy.as_mut_slice().copy_from_slice(buf);
                flip_bit(copy.as_mut_slice());
                self.inner.write_at(file, offset_bytes, copy.as_slice())
            }
            Some(kind) => Err(os_error(kind).unwrap_or_else(|| io::Error::other("fault"))),
        }
    }
    fn read_at(&self, file: &File, offset_bytes: u64, buf: &mut [u8]) -> io::Result<usize> {
        match self.plan.check(IoPoint::Read) {
            None => self.inner.read_at(file, offset_bytes, buf),
            Some(FaultKind::Slow(d)) => {
                std::thread::sleep(d);
                self.inner.read_at(file, offset_bytes, buf)
            }
            Some(FaultKind::Short) => {
                let n = short_len(buf.len());
                match buf.get_mut(..n) {
                    Some(part) if n > 0 => self.inner.read_at(file, offset_bytes, part),
                    _ => Ok(0),
                }
            }
            Some(FaultKind::BitFlip) => {
                let n = self.inner.read_at(file, offset_bytes, buf)?;
                if let Some(got) = buf.get_mut(..n) {
                    flip_bit(got);
                }
                Ok(n)
            }
            Some(kind) => Err(os_error(kind).unwrap_or_else(|| io::Error::other("fault"))),
        }
    }
    fn sync_data(&self, file: &File) -> io::Result<()> {
        if let Some(kind) = self.plan.check(IoPoint::Sync) {
            if let Some(e) = os_error(kind) {
                return Err(e);
            }
            if let FaultKind::Slow(d) = kind {
                std::thread::sleep(d);
            }
        }
        self.inner.sync_data(file)
    }
}
