//! The few system calls std does not wrap: O_TMPFILE swap files, fallocate, anonymous
//! mappings and madvise. The only module of the crate besides [`crate::align`] that holds
//! `unsafe`; each block says why its contract holds.
#![allow(unsafe_code)]

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

static NAME_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Creates an unnamed 0600 file in `dir` (O_TMPFILE), or a named one unlinked at once.
pub(crate) fn open_swap(dir: &Path, direct: bool) -> io::Result<File> {
    let direct_flag = if direct { libc::O_DIRECT } else { 0 };
    let tmp = OpenOptions::new()
        .read(true)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_TMPFILE | direct_flag)
        .open(dir);
    match tmp {
        Ok(f) => return Ok(f),
        Err(e) => {
            // O_TMPFILE unsupported by the kernel or the file system: fall back below.
            // Anything else (EINVAL for O_DIRECT on tmpfs, EACCES, ENOSPC) is the answer.
            let unsupported = matches!(
                e.raw_os_error(),
                Some(libc::EISDIR) | Some(libc::EOPNOTSUPP)
            );
            if !unsupported {
                return Err(e);
            }
        }
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let name = format!(
        ".vlmem-swap-{}-{}-{}",
        std::process::id(),
        nanos,
        NAME_COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    let path = dir.join(name);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | direct_flag)
        .open(&path)?;
    std::fs::remove_file(&path)?;
    Ok(f)
}

/// Opens `path` read-only, O_DIRECT when asked. The open itself never blocks: it is made
/// O_NONBLOCK (opening a FIFO with no writer would otherwise wait for one), and the flag is
/// cleared once the file is open.
pub(crate) fn open_read_only(path: &Path, direct: bool) -> io::Result<File> {
    let direct_flag = if direct { libc::O_DIRECT } else { 0 };
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(direct_flag | libc::O_NONBLOCK)
        .open(path)?;
    // SAFETY: the descriptor belongs to `file`, which outlives both calls; F_GETFL and
    // F_SETFL take no pointers.
    let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(file)
}

/// Preallocates `len_bytes` of `file`; a sparse `set_len` where fallocate is unsupported.
pub(crate) fn allocate(file: &File, len_bytes: u64) -> io::Result<()> {
    let len =
        libc::off_t::try_from(len_bytes).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
    // SAFETY: the descriptor belongs to `file`, which outlives the call; fallocate takes no
    // pointers.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len) };
    if rc == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EOPNOTSUPP) {
        return file.set_len(len_bytes);
    }
    Err(e)
}

/// An anonymous private mapping of `len_bytes` (page-aligned, zero-filled, lazily
/// committed). Optionally advised to use transparent huge pages and kept out of core dumps.
pub(crate) struct Mapping {
    ptr: std::ptr::NonNull<u8>,
    len_bytes: usize,
}

// SAFETY: the mapping is plain memory owned by this value; access to its bytes is
// synchronised by the users (see `crate::mem`), the pointer itself is immutable.
unsafe impl Send for Mapping {}
// SAFETY: as above; `&Mapping` only exposes the pointer and length.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `len_bytes` (> 0, already rounded to the page size by the caller). With
    /// `huge_pages` the mapping starts on a [`HUGE_PAGE_BYTES`] boundary (so every whole 2
    /// MiB of it can be a transparent huge page, on kernels that do not align large
    /// mappings themselves) and is advised MADV_HUGEPAGE.
    pub(crate) fn new(len_bytes: usize, huge_pages: bool) -> io::Result<Mapping> {
        if len_bytes == 0 {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let slack = if huge_pages { HUGE_PAGE_BYTES } else { 0 };
        let map_bytes = len_bytes
            .checked_add(slack)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOMEM))?;
        // SAFETY: an anonymous private mapping with a null hint touches no existing memory;
        // the result is checked against MAP_FAILED before use.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base = p as usize;
        let start = base.next_multiple_of(slack.max(1));
        let (head, tail) = (start - base, slack - (start - base));
        // Give back the slack before and after the aligned part (page multiples: `base` and
        // `start` are page-aligned, and so is `slack`).
        // SAFETY: `base..base+head` and `start+len_bytes..start+len_bytes+tail` lie inside
        // the mapping just made, outside the part kept, and nothing refers to them.
        unsafe {
            if head > 0 {
                libc::munmap(p, head);
            }
            if tail > 0 {
                libc::munmap((start + len_bytes) as *mut libc::c_void, tail);
            }
        }
        let p = start as *mut libc::c_void;
        let ptr = std::ptr::NonNull::new(p.cast::<u8>())
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOMEM))?;
        // Advice is best-effort: failures (no THP, old kernel) change nothing we rely on.
        // SAFETY: `p..p+len_bytes` is the mapping just created (its kept part).
        unsafe {
            libc::madvise(p, len_bytes, libc::MADV_DONTDUMP);
        }
        if huge_pages {
            // SAFETY: as above.
            unsafe {
                libc::madvise(p, len_bytes, libc::MADV_HUGEPAGE);
            }
        }
        Ok(Mapping { ptr, len_bytes })
    }
    /// First byte.
    pub(crate) fn ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }
    /// Length in bytes.
    pub(crate) fn len_bytes(&self) -> usize {
        self.len_bytes
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr..ptr+len_bytes` is a mapping made by `Mapping::new` and unmapped only
        // here, once; no borrow of its bytes outlives `self` (guards borrow the arena).
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len_bytes);
        }
    }
}

impl std::fmt::Debug for Mapping {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mapping")
            .field("len_bytes", &self.len_bytes)
            .finish()
    }
}

/// Transparent huge pages' size on x86-64 and aarch64 with 4 KiB base pages.
pub const HUGE_PAGE_BYTES: usize = 2 << 20;

/// Asks the kernel to back the whole 2 MiB pages inside `mem` with transparent huge pages
/// when they are first touched (`madvise(MADV_HUGEPAGE)`; best effort, a no-op off Linux or
/// without THP). Call it on memory not touched yet, e.g. a new `Vec`'s spare capacity.
///
/// Why: a read into a buffer on 4 KiB pages reaches the disk as one segment per page; on 2
/// MiB pages a 4 MiB O_DIRECT read is two segments. On the virtio disk of our test VM that
/// doubled the read rate (docs/BENCHMARKS.md, "Disk reads on huge pages").
pub fn advise_huge_pages<T>(mem: &mut [T]) {
    let start = mem.as_mut_ptr() as usize;
    let end = start + std::mem::size_of_val(mem);
    let first = start.next_multiple_of(HUGE_PAGE_BYTES);
    let last = end / HUGE_PAGE_BYTES * HUGE_PAGE_BYTES;
    if last > first {
        // SAFETY: `first..last` lies inside `mem`, which the caller lends us mutably, and
        // starts on a page boundary; MADV_HUGEPAGE only changes how future faults are served,
        // never the bytes, so no other view of them can observe it.
        unsafe {
            libc::madvise(
                first as *mut libc::c_void,
                last - first,
                libc::MADV_HUGEPAGE,
            );
        }
    }
}

/// A page-aligned, zero-filled buffer of anonymous memory, optionally on transparent huge
/// pages: for large buffers read at memory speed outside the tiers (staging areas, the
/// memory-bandwidth probe), where 4 KiB pages cost TLB misses and prefetcher restarts.
#[derive(Debug)]
pub struct HostBuffer {
    map: Mapping,
    len_bytes: usize,
}

impl HostBuffer {
    /// `len_bytes` (may be 0) of zeroed memory; `huge_pages` asks for 2 MiB pages (best
    /// effort: without transparent huge pages the buffer is still valid).
    pub fn new(len_bytes: usize, huge_pages: bool) -> io::Result<HostBuffer> {
        let page = 2 << 20;
        let map_bytes = len_bytes
            .max(1)
            .checked_next_multiple_of(page)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOMEM))?;
        Ok(HostBuffer {
            map: Mapping::new(map_bytes, huge_pages)?,
            len_bytes,
        })
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: the mapping holds at least `len_bytes` readable bytes (zero-filled on
        // first touch) for as long as `self`; writes need `&mut self`, so no `&mut` alias
        // exists while this borrow lives.
        unsafe { std::slice::from_raw_parts(self.map.ptr(), self.len_bytes) }
    }

    /// The bytes, writable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and `&mut self` makes this the only borrow.
        unsafe { std::slice::from_raw_parts_mut(self.map.ptr(), self.len_bytes) }
    }
}
