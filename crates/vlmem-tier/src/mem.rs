//! Memory tiers: the host arena (L2) and the simulated device (L1 where there is no GPU).
//!
//! Both are one page-aligned anonymous mapping whose space an [`OffsetAllocator`] manages,
//! sized to the allocator's capacity rounded up to a page (never to a power of two). The
//! simulated device is host memory with the device's capacity and, optionally, a bandwidth
//! cap modelling the GPU link: every copy in or out reserves the link for
//! `len_bytes / bandwidth_bytes_per_s` seconds, so concurrent copies share the cap.
#![allow(unsafe_code)]

use crate::backend::{Reservation, TierBackend, check_range};
use crate::error::{Result, TierError};
use crate::registry::Registry;
use crate::sync::Mutex;
use crate::sys::Mapping;
use std::sync::Arc;
use std::time::{Duration, Instant};
use vlmem_core::{ArenaUsage, OffsetAllocator, Tier};

/// Options of the host arena.
#[derive(Debug, Clone, Copy, Default)]
pub struct HostOptions {
    /// Ask for transparent 2 MiB pages (madvise MADV_HUGEPAGE; best effort).
    pub huge_pages: bool,
}

/// A link with a bandwidth cap, shared by all copies through it.
#[derive(Debug)]
struct Link {
    bandwidth_bytes_per_s: u64,
    busy_until: Mutex<Instant>,
}

impl Link {
    /// Holds the caller until the link has carried `len_bytes` (started no earlier than
    /// `started`). The lock is held only to book the slot, never while sleeping.
    fn charge(&self, started: Instant, len_bytes: u64) {
        let need = Duration::from_secs_f64(len_bytes as f64 / self.bandwidth_bytes_per_s as f64);
        let done_at = {
            let mut busy = self.busy_until.lock();
            let begin = (*busy).max(started);
            let end = begin + need;
            *busy = end;
            end
        };
        let now = Instant::now();
        if done_at > now {
            std::thread::sleep(done_at - now);
        }
    }
}

/// A tier in (host) memory: the host arena or the simulated device.
#[derive(Debug)]
pub struct MemoryTier {
    tier: Tier,
    simulated: bool,
    alloc: Arc<dyn OffsetAllocator>,
    map: Mapping,
    reg: Registry<()>,
    link: Option<Link>,
    huge_pages: bool,
}

fn map_for(alloc: &Arc<dyn OffsetAllocator>, huge_pages: bool) -> Result<Mapping> {
    let cap = alloc.capacity_bytes();
    let mapped = crate::align::round_up(cap.max(1), 4096)
        .and_then(|v| usize::try_from(v).ok())
        .ok_or_else(|| TierError::InvalidConfig(format!("arena of {cap} bytes is too large")))?;
    Mapping::new(mapped, huge_pages)
        .map_err(|e| TierError::InvalidConfig(format!("cannot map a {mapped}-byte arena: {e}")))
}

impl MemoryTier {
    /// The host arena (L2) over `alloc`'s capacity.
    pub fn host(alloc: Arc<dyn OffsetAllocator>, options: HostOptions) -> Result<Self> {
        let map = map_for(&alloc, options.huge_pages)?;
        Ok(MemoryTier {
            tier: Tier::Host,
            simulated: false,
            alloc,
            map,
            reg: Registry::new(Tier::Host),
            link: None,
            huge_pages: options.huge_pages,
        })
    }

    /// A simulated device (L1) in host memory with `alloc`'s capacity (the device's), and an
    /// optional cap on copies in and out, in bytes per second (e.g. 3.0e9 for an MX250 on
    /// PCIe 3.0 x4). Reports say "simulated".
    pub fn simulated_device(
        alloc: Arc<dyn OffsetAllocator>,
        bandwidth_bytes_per_s: Option<u64>,
    ) -> Result<Self> {
        if bandwidth_bytes_per_s == Some(0) {
            return Err(TierError::InvalidConfig(
                "a bandwidth cap of 0 bytes/s would never finish a copy; use None for no cap"
                    .into(),
            ));
        }
        let map = map_for(&alloc, false)?;
        Ok(MemoryTier {
            tier: Tier::Device,
            simulated: true,
            alloc,
            map,
            reg: Registry::new(Tier::Device),
            link: bandwidth_bytes_per_s.map(|b| Link {
                bandwidth_bytes_per_s: b,
                busy_until: Mutex::new(Instant::now()),
            }),
            huge_pages: false,
        })
    }

    /// The arena's first byte and mapped length (for registering it with a GPU driver).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn raw_region(&self) -> (*mut u8, usize) {
        (self.map.ptr(), self.map.len_bytes())
    }

    /// The bandwidth cap of the simulated link, if any.
    pub fn bandwidth_bytes_per_s(&self) -> Option<u64> {
        self.link.as_ref().map(|l| l.bandwidth_bytes_per_s)
    }

    fn charge(&self, started: Instant, len_bytes: u64) {
        if let Some(link) = &self.link {
            link.charge(started, len_bytes);
        }
    }

    /// Address of byte `offset_bytes` of the reservation; the range was checked against
    /// the reservation, whose block was checked against the mapping at reserve time.
    fn addr(&self, res: &Reservation, offset_bytes: u64) -> *mut u8 {
        let at = (res.offset_bytes() + offset_bytes) as usize;
        self.map.ptr().wrapping_add(at)
    }

    fn lend_read(
        &self,
        res: &Reservation,
        offset_bytes: u64,
        len_bytes: u64,
        f: &mut dyn FnMut(&[u8]) -> Result<()>,
    ) -> Result<()> {
        check_range(self.tier, res, offset_bytes, len_bytes)?;
        let started = Instant::now();
        let access = self.reg.access(res, offset_bytes, len_bytes, false)?;
        // SAFETY: the range lies inside the reservation (checked above), whose block lies
        // inside the mapping (checked in `reserve`) and overlaps no other live block
        // (registry). The registry granted a shared access to this range: no write access to
        // an overlapping range exists until `access` drops, after the slice's last use.
        let s =
            unsafe { std::slice::from_raw_parts(self.addr(res, offset_bytes), len_bytes as usize) };
        let r = f(s);
        drop(access);
        self.charge(started, len_bytes);
        r
    }

    fn lend_write(
        &self,
        res: &Reservation,
        offset_bytes: u64,
        len_bytes: u64,
        f: &mut dyn FnMut(&mut [u8]) -> Result<()>,
    ) -> Result<()> {
        if res.tier() != self.tier {
            return Err(TierError::InvalidReservation {
                tier: self.tier,
                offset_bytes: res.offset_bytes(),
            });
        }
        check_range(self.tier, res, offset_bytes, len_bytes)?;
        let started = Instant::now();
        let access = self.reg.access(res, offset_bytes, len_bytes, true)?;
        // SAFETY: as in `lend_read`, and the access is exclusive: no other access to an
        // overlapping range exists until `access` drops, after the slice's last use.
        let s = unsafe {
            std::slice::from_raw_parts_mut(self.addr(res, offset_bytes), len_bytes as usize)
        };
        let r = f(s);
        drop(access);
        self.charge(started, len_bytes);
        r
    }
}

impl MemoryTier {
    /// Lends disjoint ranges of one reservation for writing: one exclusive access per range
    /// (an overlap between them is refused by the registry).
    fn lend_ranges(
        &self,
        res: &Reservation,
        ranges: &[(u64, u64)],
        f: &mut dyn FnMut(&mut [&mut [u8]]) -> Result<()>,
    ) -> Result<()> {
        if res.tier() != self.tier {
            return Err(TierError::InvalidReservation {
                tier: self.tier,
                offset_bytes: res.offset_bytes(),
            });
        }
        let started = Instant::now();
        let mut accesses = Vec::with_capacity(ranges.len());
        let mut views: Vec<&mut [u8]> = Vec::with_capacity(ranges.len());
        for &(offset_bytes, len_bytes) in ranges {
            check_range(self.tier, res, offset_bytes, len_bytes)?;
            if len_bytes == 0 {
                views.push(&mut []);
                continue;
            }
            accesses.push(self.reg.access(res, offset_bytes, len_bytes, true)?);
            // SAFETY: as in `lend_write`: the range lies inside the reservation and the
            // mapping, and the registry granted an exclusive access to it, held in
            // `accesses` until after the views' last use below. The ranges are pairwise
            // disjoint (each exclusive access excludes an overlapping one), so the views
            // never alias.
            views.push(unsafe {
                std::slice::from_raw_parts_mut(self.addr(res, offset_bytes), len_bytes as usize)
            });
        }
        let r = f(&mut views);
        drop(views);
        drop(accesses);
        self.charge(started, ranges.iter().map(|r| r.1).sum());
        r
    }
}

/// Accesses held for a batch, and the address and length of each reservation.
type Lent<'a> = (Vec<crate::registry::Access<'a, ()>>, Vec<(*mut u8, usize)>);

impl MemoryTier {
    fn lend_many(&self, items: &[Reservation], write: bool) -> Result<Lent<'_>> {
        if write {
            crate::backend::refuse_repeats(self.tier, items.iter())?;
        }
        let mut accesses = Vec::with_capacity(items.len());
        let mut spans = Vec::with_capacity(items.len());
        for res in items {
            accesses.push(self.reg.access(res, 0, res.len_bytes(), write)?);
            spans.push((self.addr(res, 0), res.len_bytes() as usize));
        }
        Ok((accesses, spans))
    }
}

impl TierBackend for MemoryTier {
    fn tier(&self) -> Tier {
        self.tier
    }
    fn describe(&self) -> String {
        let gib = self.capacity_bytes() as f64 / (1u64 << 30) as f64;
        if self.simulated {
            match self.bandwidth_bytes_per_s() {
                Some(b) => format!(
                    "simulated device (host memory), {gib:.2} GiB, link capped at {:.2} GB/s",
                    b as f64 / 1e9
                ),
                None => format!("simulated device (host memory), {gib:.2} GiB, no link cap"),
            }
        } else {
            format!(
                "host arena, {gib:.2} GiB, page-aligned{}",
                if self.huge_pages {
                    ", 2 MiB pages advised"
                } else {
                    ""
                }
            )
        }
    }
    fn is_simulated(&self) -> bool {
        self.simulated
    }
    fn capacity_bytes(&self) -> u64 {
        self.alloc.capacity_bytes()
    }
    fn usage(&self) -> ArenaUsage {
        self.alloc.usage()
    }
    fn reserve(&self, len_bytes: u64, name: &str) -> Result<Reservation> {
        let block = self
            .alloc
            .allocate(len_bytes)
            .map_err(|source| TierError::Alloc {
                tier: self.tier,
                source,
            })?;
        if block.end_bytes() > self.map.len_bytes() as u64 || block.len_bytes() < len_bytes {
            let _ = self.alloc.free(block);
            return Err(TierError::InvalidConfig(format!(
                "the {:?} allocator returned block {}+{} for {len_bytes} bytes, outside its {}-byte arena",
                self.tier,
                block.offset_bytes(),
                block.len_bytes(),
                self.map.len_bytes()
            )));
        }
        let res = Reservation::new(self.tier, block, len_bytes, false);
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
                tier: self.tier,
                source,
            })
    }
    fn write(&self, res: &Reservation, offset_bytes: u64, src: &[u8]) -> Result<()> {
        self.lend_write(res, offset_bytes, src.len() as u64, &mut |d| {
            d.copy_from_slice(src);
            Ok(())
        })
    }
    fn read(&self, res: &Reservation, offset_bytes: u64, dst: &mut [u8]) -> Result<()> {
        let len = dst.len() as u64;
        self.lend_read(res, offset_bytes, len, &mut |s| {
            dst.copy_from_slice(s);
            Ok(())
        })
    }
    fn copy_range(
        &self,
        src: &Reservation,
        src_offset_bytes: u64,
        dst: &Reservation,
        dst_offset_bytes: u64,
        len_bytes: u64,
    ) -> Result<()> {
        check_range(self.tier, src, src_offset_bytes, len_bytes)?;
        check_range(self.tier, dst, dst_offset_bytes, len_bytes)?;
        if len_bytes == 0 {
            // No bytes move: no access is taken, so nothing is Busy.
            self.reg.with_entry(src, |_| ())?;
            self.reg.with_entry(dst, |_| ())?;
            return Ok(());
        }
        if src == dst {
            let lo = src_offset_bytes.min(dst_offset_bytes);
            let hi = src_offset_bytes.max(dst_offset_bytes) + len_bytes;
            let access = self.reg.access(dst, lo, hi - lo, true)?;
            // SAFETY: both ranges lie inside the same live block (checked above), to which
            // the registry granted exclusive access; `ptr::copy` allows overlap.
            unsafe {
                std::ptr::copy(
                    self.addr(src, src_offset_bytes),
                    self.addr(dst, dst_offset_bytes),
                    len_bytes as usize,
                );
            }
            drop(access);
            return Ok(());
        }
        let read = self.reg.access(src, src_offset_bytes, len_bytes, false)?;
        let write = self.reg.access(dst, dst_offset_bytes, len_bytes, true)?;
        // SAFETY: the two ranges lie in two distinct live blocks, which never overlap
        // (registry), so they do not overlap; shared access to the source range and
        // exclusive access to the destination range are held until after the copy.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.addr(src, src_offset_bytes),
                self.addr(dst, dst_offset_bytes),
                len_bytes as usize,
            );
        }
        drop(write);
        drop(read);
        Ok(())
    }
    fn read_with(
        &self,
        res: &Reservation,
        offset_bytes: u64,
        len_bytes: u64,
        f: &mut dyn FnMut(&[u8]) -> Result<()>,
    ) -> Option<Result<()>> {
        Some(self.lend_read(res, offset_bytes, len_bytes, f))
    }
    fn write_with(
        &self,
        res: &Reservation,
        offset_bytes: u64,
        len_bytes: u64,
        f: &mut dyn FnMut(&mut [u8]) -> Result<()>,
    ) -> Option<Result<()>> {
        Some(self.lend_write(res, offset_bytes, len_bytes, f))
    }
    fn write_ranges_with(
        &self,
        res: &Reservation,
        ranges: &[(u64, u64)],
        f: &mut dyn FnMut(&mut [&mut [u8]]) -> Result<()>,
    ) -> Option<Result<()>> {
        Some(self.lend_ranges(res, ranges, f))
    }
    fn read_many_with(
        &self,
        items: &[Reservation],
        f: &mut dyn FnMut(&[&[u8]]) -> Result<()>,
    ) -> Option<Result<()>> {
        let started = Instant::now();
        let (accesses, spans) = match self.lend_many(items, false) {
            Ok(x) => x,
            Err(e) => return Some(Err(e)),
        };
        let slices: Vec<&[u8]> = spans
            .iter()
            .map(|&(p, n)| {
                // SAFETY: each span is a whole live reservation inside the mapping (checked
                // at reserve time); the registry granted shared access to each, held in
                // `accesses` until after the slices' last use below.
                unsafe { std::slice::from_raw_parts(p.cast_const(), n) }
            })
            .collect();
        let r = f(&slices);
        drop(slices);
        drop(accesses);
        self.charge(started, items.iter().map(Reservation::len_bytes).sum());
        Some(r)
    }
    fn write_many_with(
        &self,
        items: &[Reservation],
        f: &mut dyn FnMut(&mut [&mut [u8]]) -> Result<()>,
    ) -> Option<Result<()>> {
        let started = Instant::now();
        let (accesses, spans) = match self.lend_many(items, true) {
            Ok(x) => x,
            Err(e) => return Some(Err(e)),
        };
        let mut slices: Vec<&mut [u8]> = spans
            .iter()
            .map(|&(p, n)| {
                // SAFETY: each span is a whole live reservation inside the mapping; distinct
                // live reservations never overlap (registry), and a reservation listed twice
                // was refused in `lend_many` (Busy), so these mutable
                // slices are disjoint; the exclusive accesses are held until after their
                // last use below.
                unsafe { std::slice::from_raw_parts_mut(p, n) }
            })
            .collect();
        let r = f(&mut slices);
        drop(slices);
        drop(accesses);
        self.charge(started, items.iter().map(Reservation::len_bytes).sum());
        Some(r)
    }
}
