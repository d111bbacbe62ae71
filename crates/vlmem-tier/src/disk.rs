//! The disk tier (L3): preallocated, unlinked swap files read and written with O_DIRECT, a
//! CRC32C per integrity unit of every tensor, optional ChaCha20-Poly1305 encryption at rest
//! with a key that lives only in this process, and read-only extents of existing files
//! (checkpoint weights) registered in place.
//!
//! Layout: the arena is `capacity_bytes` long, striped over files of `file_bytes` each
//! (arena offset `o` is byte `o % file_bytes` of file `o / file_bytes`). Every reservation is
//! 4 KiB aligned and padded, so O_DIRECT needs no read-modify-write. A tensor is checked in
//! units of `unit_bytes` (1 MiB by default): each unit written stores its CRC32C (and its
//! AEAD tag and nonce when encrypted) in memory; every read verifies the units it covers.
//! The swap files are unlinked, so nothing survives the process: no on-disk index is needed.

use crate::align::{AlignedBuf, IO_ALIGN_BYTES, is_io_aligned, round_up};
use crate::backend::{Reservation, TierBackend, check_range};
use crate::error::{Result, TierError};
use crate::fault::IoPoint;
use crate::io::{FileIo, RealFileIo};
use crate::registry::Registry;
use crate::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use crate::sync::{Condvar, Mutex, wait_guard};
use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce, Tag};
use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use vlmem_core::{ArenaUsage, Block, OffsetAllocator, Tier};

/// Smallest integrity unit [`DiskOptions::unit_bytes`] accepts (the O_DIRECT alignment).
pub const MIN_UNIT_BYTES: u64 = IO_ALIGN_BYTES as u64;

/// Largest integrity unit [`DiskOptions::unit_bytes`] accepts. A read of one byte reads and
/// verifies its whole unit, and the transfer engine's chunks are whole units, so a larger
/// unit would only make small reads and staging buffers bigger.
pub const MAX_UNIT_BYTES: u64 = 64 << 20;

/// Most swap files one disk tier opens (`capacity / file_bytes`, rounded up); a smaller
/// [`DiskOptions::file_bytes`] beside a large capacity is refused rather than exhausting the
/// process's file descriptors.
pub const MAX_SWAP_FILES: u64 = 1024;

const ALIGN: u64 = IO_ALIGN_BYTES as u64;

/// Options of the disk tier.
#[derive(Debug, Clone)]
pub struct DiskOptions {
    /// Directory for the swap files (created 0700 if missing; refused if group- or
    /// world-writable). `None`: a new private directory under the system temp dir, removed
    /// on drop.
    pub dir: Option<PathBuf>,
    /// Size of each swap file; `None`: one file of the whole capacity. A multiple of 4 KiB.
    pub file_bytes: Option<u64>,
    /// Open the files O_DIRECT (falls back to buffered I/O, with a note, where the file
    /// system refuses it, e.g. tmpfs).
    pub direct_io: bool,
    /// Preallocate the files (fallocate) so that a full disk shows at start, not mid-run.
    pub preallocate: bool,
    /// Encrypt every unit with ChaCha20-Poly1305 under a random key held in memory only.
    ///
    /// What each mode promises about the bytes read back from a swapped tensor:
    /// - `false`: each unit carries a CRC32C kept in this process's memory. It detects
    ///   accidental corruption (a flipped bit, a torn or lost write, a misdirected read): such
    ///   a read fails with [`TierError::Corrupt`]. It does not detect deliberate tampering:
    ///   someone who can write the swap file can change a unit so that its CRC32C still
    ///   matches, and those bytes are returned as data. Nor does it hide the bytes from anyone
    ///   who can read the file.
    /// - `true`: each unit is sealed with ChaCha20-Poly1305 (a fresh nonce per write, the
    ///   unit's place in the arena and its block generation as associated data). Any change to
    ///   a unit's bytes on disk, its replay from an older write, or its move to another place,
    ///   accidental or deliberate, fails the tag check with [`TierError::Corrupt`]; the bytes
    ///   are unreadable without the key, which never leaves this process. The CRC32C is checked
    ///   too, after decryption.
    ///
    /// Checkpoint extents registered in place are never checked nor encrypted: the file is
    /// the source of truth.
    pub encrypt: bool,
    /// Integrity unit in bytes: one CRC32C (or AEAD tag) each. A power of two from
    /// [`MIN_UNIT_BYTES`] (4 KiB) to [`MAX_UNIT_BYTES`] (64 MiB); anything else is refused
    /// with [`TierError::InvalidConfig`]. Writes must start on a unit and end on one (or at
    /// the tensor's end); a read verifies every unit it touches, so it reads at least one
    /// whole unit. The transfer engine's `chunk_bytes` must be a multiple of it.
    pub unit_bytes: u64,
    /// Largest single I/O of a coalesced batch of small tensors.
    pub max_batch_bytes: u64,
}

impl Default for DiskOptions {
    fn default() -> Self {
        DiskOptions {
            dir: None,
            file_bytes: None,
            direct_io: true,
            preallocate: true,
            encrypt: false,
            unit_bytes: 1 << 20,
            max_batch_bytes: 4 << 20,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unit {
    Empty,
    Written {
        crc32c: u32,
        sealed: Option<(u64, [u8; 16])>,
    },
}

#[derive(Debug)]
struct ExtentFile {
    file: File,
    direct: bool,
    /// The open file's device and inode: a path whose file is no longer this one (replaced
    /// by a rename) is opened anew.
    dev_ino: (u64, u64),
}

/// The flushes of a buffered disk tier: which are running, and how many failed.
#[derive(Debug, Default)]
struct SyncState {
    /// Id of the next flush to start.
    next_id: u64,
    /// Ids of the flushes running now.
    running: Vec<u64>,
    /// Flushes that failed so far (it only grows): a writer compares it before its first
    /// write and after its own flush.
    failures: u64,
    /// The OS error of the last failed sync (errno, kind).
    last_failure: Option<(Option<i32>, std::io::ErrorKind)>,
}

#[derive(Debug)]
struct ExtentMeta {
    file: Arc<ExtentFile>,
    file_offset_bytes: u64,
}

/// The disk tier. See the module documentation.
pub struct DiskTier {
    io: Arc<dyn FileIo>,
    alloc: Arc<dyn OffsetAllocator>,
    files: Vec<File>,
    file_bytes: u64,
    capacity_bytes: u64,
    direct: bool,
    dir: PathBuf,
    remove_dir_on_drop: bool,
    unit_bytes: u64,
    max_batch_bytes: u64,
    cipher: Option<ChaCha20Poly1305>,
    nonce_counter: AtomicU64,
    swap: Registry<Vec<Unit>>,
    extents: Registry<ExtentMeta>,
    /// Allocator id of this tier's extents (they live in no arena): process-unique, so an
    /// extent reservation of another tier is never taken for one of this tier's.
    extent_allocator_id: u32,
    next_extent_slot: AtomicU32,
    extent_files: Mutex<HashMap<PathBuf, Arc<ExtentFile>>>,
    unsynced: Mutex<Vec<Reservation>>,
    syncs: Mutex<SyncState>,
    sync_done: Condvar,
    buffers: Mutex<Vec<AlignedBuf>>,
    notes: Vec<String>,
}

impl std::fmt::Debug for DiskTier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskTier")
            .field("dir", &self.dir)
            .field("files", &self.files.len())
            .field("file_bytes", &self.file_bytes)
            .field("capacity_bytes", &self.capacity_bytes)
            .field("direct", &self.direct)
            .field("encrypted", &self.cipher.is_some())
            .finish()
    }
}

/// Process-wide name counter (std atomics: a `static` needs a const constructor, and no
/// model checks names).
static DIR_COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn io_err(point: IoPoint, offset_bytes: u64, len_bytes: u64, e: std::io::Error) -> TierError {
    TierError::from_io(Tier::Disk, point, offset_bytes, len_bytes, e)
}

fn make_dir(options: &DiskOptions) -> Result<(PathBuf, bool)> {
    match &options.dir {
        Some(d) => {
            if !d.exists() {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(d)
                    .map_err(|e| io_err(IoPoint::Open, 0, 0, e))?;
            }
            let meta = std::fs::metadata(d).map_err(|e| io_err(IoPoint::Open, 0, 0, e))?;
            if !meta.is_dir() {
                return Err(TierError::InvalidConfig(format!(
                    "swap path {} is not a directory",
                    d.display()
                )));
            }
            if meta.permissions().mode() & 0o022 != 0 {
                return Err(TierError::InvalidConfig(format!(
                    "swap directory {} is group- or world-writable (mode {:o}); name a private directory (0700)",
                    d.display(),
                    meta.permissions().mode() & 0o7777
                )));
            }
            Ok((d.clone(), false))
        }
        None => {
            let d = std::env::temp_dir().join(format!(
                "vlmem-swap-{}-{}",
                std::process::id(),
                DIR_COUNTER.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(&d)
                .map_err(|e| io_err(IoPoint::Open, 0, 0, e))?;
            Ok((d, true))
        }
    }
}

fn aad(block: &Block, unit_index: u64, unit_len: u64) -> [u8; 32] {
    let mut a = [0u8; 32];
    a[..8].copy_from_slice(&block.offset_bytes().to_le_bytes());
    a[8..16].copy_from_slice(&u64::from(block.generation()).to_le_bytes());
    a[16..24].copy_from_slice(&unit_index.to_le_bytes());
    a[24..].copy_from_slice(&unit_len.to_le_bytes());
    a
}

fn nonce_bytes(counter: u64) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[..8].copy_from_slice(&counter.to_le_bytes());
    n
}

impl DiskTier {
    /// A disk tier over `alloc`'s capacity, with the real system calls.
    pub fn new(alloc: Arc<dyn OffsetAllocator>, options: DiskOptions) -> Result<Self> {
        Self::with_io(alloc, options, Arc::new(RealFileIo))
    }

    /// A disk tier whose I/O goes through `io` (fault injection in tests).
    pub fn with_io(
        alloc: Arc<dyn OffsetAllocator>,
        options: DiskOptions,
        io: Arc<dyn FileIo>,
    ) -> Result<Self> {
        let capacity_bytes = alloc.capacity_bytes();
        if capacity_bytes == 0 || !capacity_bytes.is_multiple_of(ALIGN) {
            return Err(TierError::InvalidConfig(format!(
                "disk arena of {capacity_bytes} bytes: must be a non-zero multiple of 4096"
            )));
        }
        let unit_bytes = options.unit_bytes;
        if !unit_bytes.is_power_of_two() || !(MIN_UNIT_BYTES..=MAX_UNIT_BYTES).contains(&unit_bytes)
        {
            return Err(TierError::InvalidConfig(format!(
                "integrity unit of {unit_bytes} bytes: must be a power of two from {MIN_UNIT_BYTES} to {MAX_UNIT_BYTES}"
            )));
        }
        let file_bytes = options.file_bytes.unwrap_or(capacity_bytes);
        if file_bytes == 0 || !file_bytes.is_multiple_of(ALIGN) {
            return Err(TierError::InvalidConfig(format!(
                "swap file size of {file_bytes} bytes: must be a non-zero multiple of 4096"
            )));
        }
        if capacity_bytes.div_ceil(file_bytes) > MAX_SWAP_FILES {
            return Err(TierError::InvalidConfig(format!(
                "a disk arena of {capacity_bytes} bytes in swap files of {file_bytes} bytes needs more than {MAX_SWAP_FILES} files; use larger files"
            )));
        }
        let (dir, remove_dir_on_drop) = make_dir(&options)?;
        let mut notes = Vec::new();
        let mut direct = options.direct_io;
        let nfiles = capacity_bytes.div_ceil(file_bytes);
        let mut files = Vec::new();
        let cleanup = |dir: &Path| {
            if remove_dir_on_drop {
                let _ = std::fs::remove_dir(dir);
            }
        };
        for i in 0..nfiles {
            let f = match io.open_swap(&dir, direct) {
                Ok(f) => f,
                Err(e) if direct && e.raw_os_error() == Some(libc::EINVAL) => {
                    direct = false;
                    notes.push(format!(
                        "O_DIRECT refused by the file system of {} (EINVAL; tmpfs?): buffered I/O with fdatasync after writes",
                        dir.display()
                    ));
                    match io.open_swap(&dir, false) {
                        Ok(f) => f,
                        Err(e) => {
                            cleanup(&dir);
                            return Err(io_err(IoPoint::Open, 0, 0, e));
                        }
                    }
                }
                Err(e) => {
                    cleanup(&dir);
                    return Err(io_err(IoPoint::Open, 0, 0, e));
                }
            };
            if options.preallocate {
                let len = file_bytes.min(capacity_bytes - i * file_bytes);
                if let Err(e) = io.allocate(&f, len) {
                    cleanup(&dir);
                    return Err(io_err(IoPoint::Allocate, i * file_bytes, len, e));
                }
            }
            files.push(f);
        }
        let cipher = if options.encrypt {
            use rand::RngCore;
            let mut key = [0u8; 32];
            rand::rngs::OsRng.fill_bytes(&mut key);
            let c = ChaCha20Poly1305::new(Key::from_slice(&key));
            key.fill(0);
            Some(c)
        } else {
            None
        };
        Ok(DiskTier {
            io,
            alloc,
            files,
            file_bytes,
            capacity_bytes,
            direct,
            dir,
            remove_dir_on_drop,
            unit_bytes,
            max_batch_bytes: options.max_batch_bytes.max(ALIGN),
            cipher,
            nonce_counter: AtomicU64::new(0),
            swap: Registry::new(Tier::Disk),
            extents: Registry::new(Tier::Disk),
            extent_allocator_id: vlmem_core::new_allocator_id(),
            next_extent_slot: AtomicU32::new(0),
            extent_files: Mutex::new(HashMap::new()),
            unsynced: Mutex::new(Vec::new()),
            syncs: Mutex::new(SyncState::default()),
            sync_done: Condvar::new(),
            buffers: Mutex::new(Vec::new()),
            notes,
        })
    }

    /// Whether the swap files are open O_DIRECT.
    pub fn is_direct(&self) -> bool {
        self.direct
    }
    /// Whether units are encrypted at rest.
    pub fn is_encrypted(&self) -> bool {
        self.cipher.is_some()
    }
    /// The swap directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
    /// Notes for reports (fallbacks taken at start).
    pub fn notes(&self) -> &[String] {
        &self.notes
    }
    /// The integrity unit in bytes.
    pub fn unit_bytes(&self) -> u64 {
        self.unit_bytes
    }
    /// Number of swap files.
    pub fn file_count(&self) -> usize {
        self.files.len()
    }

    /// Registers `len_bytes` at `file_offset_bytes` of the existing file `path` (e.g. a
    /// weight inside a safetensors checkpoint) as a tensor resident on the disk tier, with
    /// no copy. Reads go through O_DIRECT on the 4 KiB aligned span around it and slice it
    /// out; writes are refused. No CRC is kept (the file is the source of truth).
    ///
    /// The bytes are those of the file at `path` now: a file replaced since an earlier
    /// registration (renamed over the name) is opened anew, while earlier extents keep
    /// reading the file they were registered in. Anything but a regular file (a directory, a
    /// FIFO, a device) is refused with [`TierError::InvalidConfig`], without blocking.
    pub fn register_extent(
        &self,
        path: &Path,
        file_offset_bytes: u64,
        len_bytes: u64,
        name: &str,
    ) -> Result<Reservation> {
        if len_bytes == 0 {
            return Err(TierError::InvalidConfig(format!(
                "extent `{name}` of 0 bytes"
            )));
        }
        let not_regular = || {
            TierError::InvalidConfig(format!(
                "extent `{name}`: {} is not a regular file",
                path.display()
            ))
        };
        // Stat before opening: opening a FIFO or a device could block or act.
        let at_path = std::fs::metadata(path)
            .map_err(|e| io_err(IoPoint::Open, file_offset_bytes, len_bytes, e))?;
        if !at_path.is_file() {
            return Err(not_regular());
        }
        let file = self.extent_file(path, (at_path.dev(), at_path.ino()))?;
        let meta = file
            .file
            .metadata()
            .map_err(|e| io_err(IoPoint::Open, file_offset_bytes, len_bytes, e))?;
        if !meta.is_file() {
            return Err(not_regular());
        }
        let file_len = meta.len();
        match file_offset_bytes.checked_add(len_bytes) {
            Some(end) if end <= file_len => {}
            _ => {
                return Err(TierError::InvalidConfig(format!(
                    "extent `{name}` at {file_offset_bytes}+{len_bytes} lies outside {} ({file_len} bytes)",
                    path.display()
                )));
            }
        }
        let slot = self.next_extent_slot.fetch_add(1, Ordering::Relaxed);
        let block = Block::from_parts(
            self.extent_allocator_id,
            slot,
            1,
            file_offset_bytes,
            len_bytes,
        );
        let res = Reservation::new(Tier::Disk, block, len_bytes, true);
        self.extents.insert(
            res,
            name,
            ExtentMeta {
                file,
                file_offset_bytes,
            },
        )?;
        Ok(res)
    }

    /// The open file at `path`, whose device and inode a stat of the path just gave: the
    /// cached one when it is still that file, otherwise opened anew (and cached in place of
    /// the stale one).
    fn extent_file(&self, path: &Path, dev_ino: (u64, u64)) -> Result<Arc<ExtentFile>> {
        if let Some(f) = self.extent_files.lock().get(path)
            && f.dev_ino == dev_ino
        {
            return Ok(f.clone());
        }
        // Opened outside the lock; a racing open of the same file keeps the first.
        let (file, direct) = match self.io.open_read_only(path, true) {
            Ok(f) => (f, true),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => (
                self.io
                    .open_read_only(path, false)
                    .map_err(|e| io_err(IoPoint::Open, 0, 0, e))?,
                false,
            ),
            Err(e) => return Err(io_err(IoPoint::Open, 0, 0, e)),
        };
        let meta = file
            .metadata()
            .map_err(|e| io_err(IoPoint::Open, 0, 0, e))?;
        let f = Arc::new(ExtentFile {
            file,
            direct,
            dev_ino: (meta.dev(), meta.ino()),
        });
        let mut files = self.extent_files.lock();
        match files.get(path) {
            Some(cached) if cached.dev_ino == f.dev_ino => Ok(cached.clone()),
            _ => {
                files.insert(path.to_path_buf(), f.clone());
                Ok(f)
            }
        }
    }

    fn take_buf(&self, len_bytes: usize) -> Result<AlignedBuf> {
        let pooled = {
            let mut pool = self.buffers.lock();
            pool.iter()
                .position(|b| b.capacity_bytes() >= len_bytes)
                .map(|i| pool.swap_remove(i))
        };
        let mut b = match pooled {
            Some(b) => b,
            None => AlignedBuf::new(len_bytes)?,
        };
        let _ = b.set_len(len_bytes);
        Ok(b)
    }

    fn put_buf(&self, b: AlignedBuf) {
        let mut pool = self.buffers.lock();
        if pool.len() < 8 {
            pool.push(b);
        }
    }

    /// Writes all of `buf` at arena offset `at`, across files, looping on short writes.
    fn pwrite_all(&self, at: u64, buf: &[u8]) -> Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let off = at + done as u64;
            let (file, in_file, room) = self.locate(off)?;
            let n = (buf.len() - done).min(room as usize);
            let part = buf.get(done..done + n).unwrap_or_default();
            match self.io.write_at(file, in_file, part) {
                Ok(0) => {
                    return Err(TierError::ShortWrite {
                        tier: Tier::Disk,
                        offset_bytes: at,
                        expected_bytes: buf.len() as u64,
                        got_bytes: done as u64,
                    });
                }
                Ok(k) => done += k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io_err(IoPoint::Write, off, n as u64, e)),
            }
        }
        Ok(())
    }

    /// Fills `buf` from arena offset `at`, across files, looping on short reads.
    fn pread_all(&self, at: u64, buf: &mut [u8]) -> Result<()> {
        let total = buf.len();
        let mut done = 0usize;
        while done < total {
            let off = at + done as u64;
            let (file, in_file, room) = self.locate(off)?;
            let n = (total - done).min(room as usize);
            let part = buf.get_mut(done..done + n).unwrap_or_default();
            match self.io.read_at(file, in_file, part) {
                Ok(0) => {
                    return Err(TierError::ShortRead {
                        tier: Tier::Disk,
                        offset_bytes: at,
                        expected_bytes: total as u64,
                        got_bytes: done as u64,
                    });
                }
                Ok(k) => done += k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io_err(IoPoint::Read, off, n as u64, e)),
            }
        }
        Ok(())
    }

    fn locate(&self, arena_offset: u64) -> Result<(&File, u64, u64)> {
        let idx = arena_offset / self.file_bytes;
        let in_file = arena_offset % self.file_bytes;
        let file = self.files.get(idx as usize).ok_or(TierError::OutOfRange {
            tier: Tier::Disk,
            offset_bytes: arena_offset,
            len_bytes: 0,
            limit_bytes: self.capacity_bytes,
        })?;
        Ok((file, in_file, self.file_bytes - in_file))
    }

    fn unit_range(&self, offset_bytes: u64, len_bytes: u64) -> std::ops::Range<usize> {
        let first = offset_bytes / self.unit_bytes;
        let end = (offset_bytes + len_bytes).div_ceil(self.unit_bytes);
        first as usize..end as usize
    }

    /// Seals (CRC32C, and encrypts in place when configured) the units of `data`, which
    /// holds the tensor bytes from `offset_bytes` (a unit boundary). Returns the unit states.
    fn seal(&self, block: &Block, offset_bytes: u64, data: &mut [u8]) -> Result<Vec<Unit>> {
        let mut units = Vec::new();
        let first = offset_bytes / self.unit_bytes;
        for (i, chunk) in data.chunks_mut(self.unit_bytes as usize).enumerate() {
            let crc32c = crc32c::crc32c(chunk);
            let sealed = match &self.cipher {
                Some(c) => {
                    let counter = self.nonce_counter.fetch_add(1, Ordering::Relaxed);
                    let a = aad(block, first + i as u64, chunk.len() as u64);
                    let tag = c
                        .encrypt_in_place_detached(
                            Nonce::from_slice(&nonce_bytes(counter)),
                            &a,
                            chunk,
                        )
                        .map_err(|_| TierError::InvalidConfig("encryption failed".into()))?;
                    let mut t = [0u8; 16];
                    t.copy_from_slice(tag.as_slice());
                    Some((counter, t))
                }
                None => None,
            };
            units.push(Unit::Written { crc32c, sealed });
        }
        Ok(units)
    }

    /// Checks (and decrypts in place) the units of `data`, which holds the tensor's bytes
    /// from `offset_bytes` (a unit boundary).
    fn unseal(
        &self,
        name: &str,
        block: &Block,
        offset_bytes: u64,
        data: &mut [u8],
        units: &[Unit],
    ) -> Result<()> {
        let first = offset_bytes / self.unit_bytes;
        for (i, chunk) in data.chunks_mut(self.unit_bytes as usize).enumerate() {
            let at = offset_bytes + i as u64 * self.unit_bytes;
            let Some(Unit::Written { crc32c, sealed }) = units.get(i).copied() else {
                return Err(TierError::NotWritten {
                    tier: Tier::Disk,
                    tensor: name.to_string(),
                    offset_in_tensor_bytes: at,
                });
            };
            if let (Some(c), Some((counter, tag))) = (&self.cipher, sealed) {
                let a = aad(block, first + i as u64, chunk.len() as u64);
                c.decrypt_in_place_detached(
                    Nonce::from_slice(&nonce_bytes(counter)),
                    &a,
                    chunk,
                    Tag::from_slice(&tag),
                )
                .map_err(|_| TierError::Corrupt {
                    tier: Tier::Disk,
                    tensor: name.to_string(),
                    offset_in_tensor_bytes: at,
                    detail: "ChaCha20-Poly1305 authentication tag does not match".into(),
                })?;
            }
            let actual = crc32c::crc32c(chunk);
            if actual != crc32c {
                return Err(TierError::Corrupt {
                    tier: Tier::Disk,
                    tensor: name.to_string(),
                    offset_in_tensor_bytes: at,
                    detail: format!("CRC32C {actual:#010x}, expected {crc32c:#010x}"),
                });
            }
        }
        Ok(())
    }

    fn read_only_error(&self, res: &Reservation) -> TierError {
        let name = self
            .extents
            .with_entry(res, |e| e.name.to_string())
            .unwrap_or_else(|_| "?".into());
        TierError::ReadOnly { tensor: name }
    }

    fn read_extent(&self, res: &Reservation, offset_bytes: u64, dst: &mut [u8]) -> Result<()> {
        let len = dst.len() as u64;
        check_range(Tier::Disk, res, offset_bytes, len)?;
        if len == 0 {
            return Ok(());
        }
        let access = self.extents.access(res, offset_bytes, len, false)?;
        let (file, base) = self
            .extents
            .with_entry(res, |e| (e.meta.file.clone(), e.meta.file_offset_bytes))?;
        let abs = base + offset_bytes;
        let r = self.read_file_range(&file, abs, dst);
        drop(access);
        r
    }

    /// Reads `dst.len()` bytes of `file` at `abs`. With O_DIRECT, when `dst`'s address is
    /// congruent to `abs` modulo [`ALIGN`] (a caller that wants no copy arranges that), the
    /// aligned middle is read straight into `dst` and only the unaligned head and tail (under
    /// [`ALIGN`] bytes each) go through an aligned bounce buffer; otherwise all of it does.
    fn read_file_range(&self, file: &ExtentFile, abs: u64, dst: &mut [u8]) -> Result<()> {
        if file.direct {
            let head = ((ALIGN - abs % ALIGN) % ALIGN) as usize;
            let phase_ok = (dst.as_ptr() as usize)
                .wrapping_add(head)
                .is_multiple_of(ALIGN as usize);
            let body = (dst.len().saturating_sub(head)) / ALIGN as usize * ALIGN as usize;
            if phase_ok && body > 0 {
                let (front, rest) = dst.split_at_mut(head);
                let (middle, back) = rest.split_at_mut(body);
                self.read_bounced(file, abs, front)?;
                self.read_direct(file, abs + head as u64, middle)?;
                return self.read_bounced(file, abs + (head + body) as u64, back);
            }
        }
        self.read_bounced(file, abs, dst)
    }

    /// O_DIRECT reads into `dst`, whose address, length and file offset `abs` are all
    /// multiples of [`ALIGN`].
    fn read_direct(&self, file: &ExtentFile, abs: u64, dst: &mut [u8]) -> Result<()> {
        let need = dst.len();
        let done = self.pread_loop(file, abs, dst, need)?;
        if done >= need {
            return Ok(());
        }
        if !done.is_multiple_of(ALIGN as usize) {
            // A short read left the rest unaligned: O_DIRECT cannot go on from there.
            let rest = dst.get_mut(done..).unwrap_or_default();
            return self.read_bounced(file, abs + done as u64, rest);
        }
        Err(TierError::ShortRead {
            tier: Tier::Disk,
            offset_bytes: abs,
            expected_bytes: dst.len() as u64,
            got_bytes: done as u64,
        })
    }

    /// Reads `dst.len()` bytes of `file` at `abs` through an aligned bounce buffer (the whole
    /// aligned range around them with O_DIRECT), then copies them out.
    fn read_bounced(&self, file: &ExtentFile, abs: u64, dst: &mut [u8]) -> Result<()> {
        let len = dst.len() as u64;
        if len == 0 {
            return Ok(());
        }
        let start = if file.direct { abs & !(ALIGN - 1) } else { abs };
        let end = if file.direct {
            round_up(abs + len, ALIGN).unwrap_or(u64::MAX)
        } else {
            abs + len
        };
        let mut buf = self.take_buf((end - start) as usize)?;
        let need = (abs + len - start) as usize;
        let skip = (abs - start) as usize;
        let r = self
            .pread_loop(file, start, buf.as_mut_slice(), need)
            .and_then(|done| match buf.as_slice().get(skip..skip + dst.len()) {
                Some(src) if done >= need => {
                    dst.copy_from_slice(src);
                    Ok(())
                }
                _ => Err(TierError::ShortRead {
                    tier: Tier::Disk,
                    offset_bytes: abs,
                    expected_bytes: len,
                    got_bytes: done.saturating_sub(skip) as u64,
                }),
            });
        self.put_buf(buf);
        r
    }

    /// Reads `file` at `at` into `buf` (each read asks for all of the rest of `buf`, whose
    /// length O_DIRECT needs aligned) until at least `need` bytes are in, looping on short
    /// reads and EINTR; returns the bytes read, fewer than `need` at the end of the file or,
    /// with O_DIRECT, where a short read leaves an unaligned offset (a read there would fail).
    fn pread_loop(&self, file: &ExtentFile, at: u64, buf: &mut [u8], need: usize) -> Result<usize> {
        let mut done = 0usize;
        while done < need {
            let part = buf.get_mut(done..).unwrap_or_default();
            match self.io.read_at(&file.file, at + done as u64, part) {
                Ok(0) => break,
                Ok(k) => {
                    done += k;
                    if file.direct && !done.is_multiple_of(ALIGN as usize) {
                        break;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(io_err(IoPoint::Read, at + done as u64, buf.len() as u64, e));
                }
            }
        }
        Ok(done)
    }

    fn mark_unsynced(&self, res: &Reservation) {
        if !self.direct {
            self.unsynced.lock().push(*res);
        }
    }

    fn write_units(&self, res: &Reservation, units: std::ops::Range<usize>, states: &[Unit]) {
        let _ = self.swap.with_entry(res, |e| {
            for (i, u) in units.zip(states.iter()) {
                if let Some(slot) = e.meta.get_mut(i) {
                    *slot = *u;
                }
            }
        });
    }

    fn clear_units(&self, res: &Reservation, units: std::ops::Range<usize>) {
        let _ = self.swap.with_entry(res, |e| {
            for i in units {
                if let Some(slot) = e.meta.get_mut(i) {
                    *slot = Unit::Empty;
                }
            }
        });
    }
}

impl Drop for DiskTier {
    fn drop(&mut self) {
        if self.remove_dir_on_drop {
            let _ = std::fs::remove_dir(&self.dir);
        }
    }
}

impl TierBackend for DiskTier {
    fn tier(&self) -> Tier {
        Tier::Disk
    }
    fn describe(&self) -> String {
        format!(
            "disk swap in {}: {} file(s), {:.2} GiB, {}{}",
            self.dir.display(),
            self.files.len(),
            self.capacity_bytes as f64 / (1u64 << 30) as f64,
            if self.direct { "O_DIRECT" } else { "buffered" },
            if self.cipher.is_some() {
                ", ChaCha20-Poly1305"
            } else {
                ""
            }
        )
    }
    fn capacity_bytes(&self) -> u64 {
        self.capacity_bytes
    }
    fn usage(&self) -> ArenaUsage {
        self.alloc.usage()
    }
    fn reserve(&self, len_bytes: u64, name: &str) -> Result<Reservation> {
        if len_bytes == 0 {
            return Err(TierError::Alloc {
                tier: Tier::Disk,
                source: vlmem_core::AllocError::ZeroSize,
            });
        }
        let padded = round_up(len_bytes, ALIGN).ok_or(TierError::Alloc {
            tier: Tier::Disk,
            source: vlmem_core::AllocError::TooLarge {
                requested_bytes: len_bytes,
                capacity_bytes: self.capacity_bytes,
            },
        })?;
        let block = self
            .alloc
            .allocate(padded)
            .map_err(|source| TierError::Alloc {
                tier: Tier::Disk,
                source,
            })?;
        if block.offset_bytes() % ALIGN != 0
            || block.len_bytes() < padded
            || block.end_bytes() > self.capacity_bytes
        {
            let _ = self.alloc.free(block);
            return Err(TierError::InvalidConfig(format!(
                "the disk allocator returned block {}+{} for {padded} bytes: blocks must be 4096-aligned and inside the {}-byte arena",
                block.offset_bytes(),
                block.len_bytes(),
                self.capacity_bytes
            )));
        }
        let res = Reservation::new(Tier::Disk, block, len_bytes, false);
        let units = vec![Unit::Empty; len_bytes.div_ceil(self.unit_bytes) as usize];
        if let Err(e) = self.swap.insert(res, name, units) {
            let _ = self.alloc.free(block);
            return Err(e);
        }
        Ok(res)
    }
    fn release(&self, res: Reservation) -> Result<()> {
        if res.is_in_place() {
            self.extents.remove(&res)?;
            return Ok(());
        }
        self.swap.remove(&res)?;
        self.alloc
            .free(res.block())
            .map_err(|source| TierError::Alloc {
                tier: Tier::Disk,
                source,
            })
    }
    fn write(&self, res: &Reservation, offset_bytes: u64, src: &[u8]) -> Result<()> {
        if res.is_in_place() {
            return Err(self.read_only_error(res));
        }
        let len = src.len() as u64;
        check_range(Tier::Disk, res, offset_bytes, len)?;
        if len == 0 {
            return Ok(());
        }
        if !offset_bytes.is_multiple_of(self.unit_bytes)
            || (!len.is_multiple_of(self.unit_bytes) && offset_bytes + len != res.len_bytes())
        {
            return Err(TierError::Misaligned {
                offset_bytes,
                len_bytes: len,
                unit_bytes: self.unit_bytes,
            });
        }
        let access = self.swap.access(res, offset_bytes, len, true)?;
        let units = self.unit_range(offset_bytes, len);
        // The units are invalid until this write is known good.
        self.clear_units(res, units.clone());
        let at = res.offset_bytes() + offset_bytes;
        let result = if self.cipher.is_none() && is_io_aligned(src) {
            let mut states = Vec::with_capacity(units.len());
            for chunk in src.chunks(self.unit_bytes as usize) {
                states.push(Unit::Written {
                    crc32c: crc32c::crc32c(chunk),
                    sealed: None,
                });
            }
            self.pwrite_all(at, src).map(|()| states)
        } else {
            let padded = round_up(len, ALIGN).unwrap_or(len) as usize;
            let mut buf = self.take_buf(padded)?;
            let r = (|| {
                let b = buf.as_mut_slice();
                let (data, pad) = b.split_at_mut(src.len());
                data.copy_from_slice(src);
                pad.fill(0);
                let states = self.seal(&res.block(), offset_bytes, data)?;
                self.pwrite_all(at, buf.as_slice())?;
                Ok(states)
            })();
            self.put_buf(buf);
            r
        };
        let states = result?;
        self.write_units(res, units, &states);
        self.mark_unsynced(res);
        drop(access);
        Ok(())
    }
    fn read(&self, res: &Reservation, offset_bytes: u64, dst: &mut [u8]) -> Result<()> {
        if res.is_in_place() {
            return self.read_extent(res, offset_bytes, dst);
        }
        let len = dst.len() as u64;
        check_range(Tier::Disk, res, offset_bytes, len)?;
        if len == 0 {
            return Ok(());
        }
        let span_start = offset_bytes - offset_bytes % self.unit_bytes;
        let span_end = round_up(offset_bytes + len, self.unit_bytes)
            .unwrap_or(u64::MAX)
            .min(res.len_bytes());
        debug_assert!(span_start <= offset_bytes && offset_bytes + len <= span_end);
        let access = self
            .swap
            .access(res, span_start, span_end - span_start, false)?;
        let units = self.unit_range(span_start, span_end - span_start);
        let (name, states) = self.swap.with_entry(res, |e| {
            (
                e.name.clone(),
                e.meta
                    .get(units.clone())
                    .map(<[Unit]>::to_vec)
                    .unwrap_or_default(),
            )
        })?;
        if let Some(i) = states.iter().position(|u| *u == Unit::Empty) {
            return Err(TierError::NotWritten {
                tier: Tier::Disk,
                tensor: name.to_string(),
                offset_in_tensor_bytes: span_start + i as u64 * self.unit_bytes,
            });
        }
        let at = res.offset_bytes() + span_start;
        let direct_into_dst =
            span_start == offset_bytes && span_end == offset_bytes + len && is_io_aligned(dst);
        let r = if direct_into_dst {
            self.pread_all(at, dst)
                .and_then(|()| self.unseal(&name, &res.block(), span_start, dst, &states))
        } else {
            let span = (span_end - span_start) as usize;
            let padded = round_up(span as u64, ALIGN).unwrap_or(span as u64) as usize;
            let mut buf = self.take_buf(padded)?;
            let r = (|| {
                self.pread_all(at, buf.as_mut_slice())?;
                let data = buf.as_mut_slice().get_mut(..span).unwrap_or_default();
                self.unseal(&name, &res.block(), span_start, data, &states)?;
                let skip = (offset_bytes - span_start) as usize;
                if let Some(s) = data.get(skip..skip + dst.len()) {
                    dst.copy_from_slice(s);
                }
                Ok(())
            })();
            self.put_buf(buf);
            r
        };
        drop(access);
        r
    }
    fn write_batch(&self, items: &[(Reservation, &[u8])]) -> Result<()> {
        crate::backend::refuse_repeats(Tier::Disk, items.iter().map(|(r, _)| r))?;
        for (res, src) in items {
            if res.is_in_place() {
                return Err(self.read_only_error(res));
            }
            if src.len() as u64 != res.len_bytes() {
                return Err(TierError::LengthMismatch {
                    src_bytes: src.len() as u64,
                    dst_bytes: res.len_bytes(),
                });
            }
        }
        let mut order: Vec<usize> = (0..items.len()).collect();
        order.sort_by_key(|&i| items.get(i).map(|(r, _)| r.offset_bytes()).unwrap_or(0));
        for group in self.groups(&order, |i| items.get(i).map(|(r, _)| *r)) {
            let (first, last) = match (group.first(), group.last()) {
                (Some(&f), Some(&l)) => (f, l),
                _ => continue,
            };
            let (Some((r0, _)), Some((rl, _))) = (items.get(first), items.get(last)) else {
                continue;
            };
            let start = r0.offset_bytes();
            let span = (rl.block().end_bytes() - start) as usize;
            let mut accesses = Vec::with_capacity(group.len());
            for &i in &group {
                if let Some((res, _)) = items.get(i) {
                    accesses.push(self.swap.access(res, 0, res.len_bytes(), true)?);
                    self.clear_units(res, self.unit_range(0, res.len_bytes()));
                }
            }
            let mut buf = self.take_buf(span)?;
            let r = (|| {
                let mut sealed = Vec::with_capacity(group.len());
                let b = buf.as_mut_slice();
                b.fill(0);
                for &i in &group {
                    let Some((res, src)) = items.get(i) else {
                        continue;
                    };
                    let rel = (res.offset_bytes() - start) as usize;
                    let dst = b.get_mut(rel..rel + src.len()).unwrap_or_default();
                    dst.copy_from_slice(src);
                    sealed.push((*res, self.seal(&res.block(), 0, dst)?));
                }
                self.pwrite_all(start, buf.as_slice())?;
                Ok(sealed)
            })();
            self.put_buf(buf);
            for (res, states) in r? {
                self.write_units(&res, self.unit_range(0, res.len_bytes()), &states);
                self.mark_unsynced(&res);
            }
            drop(accesses);
        }
        Ok(())
    }
    fn read_batch(&self, items: &mut [(Reservation, &mut [u8])]) -> Result<()> {
        for (res, dst) in items.iter() {
            if dst.len() as u64 != res.len_bytes() {
                return Err(TierError::LengthMismatch {
                    src_bytes: res.len_bytes(),
                    dst_bytes: dst.len() as u64,
                });
            }
        }
        if items.iter().any(|(r, _)| r.is_in_place()) {
            for (res, dst) in items.iter_mut() {
                self.read(res, 0, dst)?;
            }
            return Ok(());
        }
        let mut order: Vec<usize> = (0..items.len()).collect();
        order.sort_by_key(|&i| items.get(i).map(|(r, _)| r.offset_bytes()).unwrap_or(0));
        let reservations: Vec<Reservation> = items.iter().map(|(r, _)| *r).collect();
        for group in self.groups(&order, |i| reservations.get(i).copied()) {
            let (Some(&first), Some(&last)) = (group.first(), group.last()) else {
                continue;
            };
            let (Some(r0), Some(rl)) = (reservations.get(first), reservations.get(last)) else {
                continue;
            };
            let start = r0.offset_bytes();
            let span = (rl.block().end_bytes() - start) as usize;
            let mut accesses = Vec::with_capacity(group.len());
            let mut metas = Vec::with_capacity(group.len());
            for &i in &group {
                if let Some(res) = reservations.get(i) {
                    accesses.push(self.swap.access(res, 0, res.len_bytes(), false)?);
                    metas.push(
                        self.swap
                            .with_entry(res, |e| (e.name.clone(), e.meta.clone()))?,
                    );
                }
            }
            let mut buf = self.take_buf(span)?;
            let r = (|| {
                self.pread_all(start, buf.as_mut_slice())?;
                for (&i, (name, states)) in group.iter().zip(metas.iter()) {
                    let Some((res, dst)) = items.get_mut(i) else {
                        continue;
                    };
                    let rel = (res.offset_bytes() - start) as usize;
                    let len = dst.len();
                    let data = buf
                        .as_mut_slice()
                        .get_mut(rel..rel + len)
                        .unwrap_or_default();
                    self.unseal(name, &res.block(), 0, data, states)?;
                    dst.copy_from_slice(data);
                }
                Ok(())
            })();
            self.put_buf(buf);
            drop(accesses);
            r?;
        }
        Ok(())
    }
    fn flush(&self) -> Result<()> {
        if self.direct {
            return Ok(());
        }
        // Counted as running before the writes it covers are taken: a writer checking after
        // its own flush waits for this one (see `flush_since`).
        let id = {
            let mut syncs = self.syncs.lock();
            let id = syncs.next_id;
            syncs.next_id += 1;
            syncs.running.push(id);
            id
        };
        let suspect: Vec<Reservation> = std::mem::take(&mut *self.unsynced.lock());
        let mut failure = None;
        for f in &self.files {
            if let Err(e) = self.io.sync_data(f) {
                // fsyncgate: the kernel may have dropped the dirty pages; a retried sync
                // could "succeed". Everything written since the last good sync is suspect.
                for res in &suspect {
                    self.clear_units(res, self.unit_range(0, res.len_bytes()));
                }
                failure = Some(e);
                break;
            }
        }
        {
            let mut syncs = self.syncs.lock();
            syncs.running.retain(|&r| r != id);
            if let Some(e) = &failure {
                syncs.failures += 1;
                syncs.last_failure = Some((e.raw_os_error(), e.kind()));
            }
        }
        self.sync_done.notify_all();
        match failure {
            Some(e) => Err(io_err(IoPoint::Sync, 0, self.capacity_bytes, e)),
            None => Ok(()),
        }
    }
    fn flush_epoch(&self) -> u64 {
        self.syncs.lock().failures
    }
    fn flush_since(&self, epoch: u64) -> Result<()> {
        self.flush()?;
        if self.direct {
            return Ok(());
        }
        // A flush that started before this point may hold (and, failing, invalidate) this
        // writer's earlier writes: wait for those; later ones started after they were synced.
        let mut syncs = self.syncs.lock();
        let started_before = syncs.next_id;
        while syncs.running.iter().any(|&r| r < started_before) {
            syncs = wait_guard(&self.sync_done, syncs);
        }
        if syncs.failures == epoch {
            return Ok(());
        }
        let (errno, kind) = syncs
            .last_failure
            .unwrap_or((None, std::io::ErrorKind::Other));
        drop(syncs);
        let source = match errno {
            Some(n) => std::io::Error::from_raw_os_error(n),
            None => std::io::Error::new(kind, "a sync covering these writes failed"),
        };
        Err(io_err(IoPoint::Sync, 0, self.capacity_bytes, source))
    }
    fn needs_flush(&self) -> bool {
        !self.direct
    }
    fn io_unit_bytes(&self) -> u64 {
        self.unit_bytes
    }
}

impl DiskTier {
    /// Splits sorted reservation indices into runs of adjacent blocks in one file, each at
    /// most `max_batch_bytes` long (a longer tensor is a run of its own).
    fn groups(
        &self,
        order: &[usize],
        res_of: impl Fn(usize) -> Option<Reservation>,
    ) -> Vec<Vec<usize>> {
        let mut groups: Vec<Vec<usize>> = Vec::new();
        let mut cur: Vec<usize> = Vec::new();
        let mut cur_start = 0u64;
        let mut cur_end = 0u64;
        for &i in order {
            let Some(r) = res_of(i) else { continue };
            let b = r.block();
            let same_file = b.offset_bytes() / self.file_bytes == cur_start / self.file_bytes
                && (b.end_bytes() - 1) / self.file_bytes == cur_start / self.file_bytes;
            let fits = b.end_bytes() - cur_start <= self.max_batch_bytes;
            if !cur.is_empty() && b.offset_bytes() == cur_end && same_file && fits {
                cur.push(i);
                cur_end = b.end_bytes();
            } else {
                if !cur.is_empty() {
                    groups.push(std::mem::take(&mut cur));
                }
                cur.push(i);
                cur_start = b.offset_bytes();
                cur_end = b.end_bytes();
            }
        }
        if !cur.is_empty() {
            groups.push(cur);
        }
        groups
    }

    /// Live swap reservations (for tests and stats).
    pub fn live_reservations(&self) -> usize {
        self.swap.len() + self.extents.len()
    }

    /// Forgets every unit's checksum whose reservation matches `pred` (used by tests to
    /// model a lost write).
    #[doc(hidden)]
    pub fn invalidate_all(&self) {
        self.swap.for_each_mut(|e| {
            for u in e.meta.iter_mut() {
                *u = Unit::Empty;
            }
        });
    }
}
