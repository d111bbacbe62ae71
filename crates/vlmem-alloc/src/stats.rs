//! Allocation statistics and fragmentation metrics.
//!
//! Every allocator keeps its counters inside the same lock as the state they describe (the
//! slab keeps them in its per-thread caches and its shared stack, and sums them while holding
//! all of those locks), so a snapshot is exact: `in_use_bytes` equals the sum of the live
//! blocks' lengths at the instant of the snapshot, even under concurrent churn.

/// Counters of one allocator (or one typed pool), read as one consistent snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AllocStats {
    /// Size of the arena.
    pub capacity_bytes: u64,
    /// Successful allocations since creation.
    pub allocations: u64,
    /// Successful frees since creation (for shared slab blocks: the releases that returned
    /// the block, i.e. the last reference).
    pub frees: u64,
    /// Allocations refused (out of memory or over budget; not bad arguments).
    pub failures: u64,
    /// Bytes inside live blocks (as reserved, after rounding).
    pub in_use_bytes: u64,
    /// The highest `in_use_bytes` seen.
    pub peak_in_use_bytes: u64,
    /// Number of live blocks.
    pub live_blocks: u64,
    /// Free bytes, available to allocations.
    pub free_bytes: u64,
    /// Bytes held by an in-flight compaction plan (reserved destinations and blocks freed
    /// while being moved); `in_use + free + compaction_reserved == capacity`.
    pub compaction_reserved_bytes: u64,
    /// The byte budget allocations must stay under (the capacity when none was set).
    pub limit_bytes: u64,
}

impl AllocStats {
    /// Adds `other` into `self` (for totals over several pools). Peaks are summed, so the
    /// total's peak is an upper bound on the true simultaneous peak.
    pub fn accumulate(&mut self, other: &AllocStats) {
        self.capacity_bytes += other.capacity_bytes;
        self.allocations += other.allocations;
        self.frees += other.frees;
        self.failures += other.failures;
        self.in_use_bytes += other.in_use_bytes;
        self.peak_in_use_bytes += other.peak_in_use_bytes;
        self.live_blocks += other.live_blocks;
        self.free_bytes += other.free_bytes;
        self.compaction_reserved_bytes += other.compaction_reserved_bytes;
        self.limit_bytes = self.limit_bytes.saturating_add(other.limit_bytes);
    }

    /// True when the snapshot's own numbers agree:
    /// `in_use + free + compaction_reserved == capacity` and `in_use <= peak`.
    pub fn is_consistent(&self) -> bool {
        self.in_use_bytes
            .checked_add(self.free_bytes)
            .and_then(|s| s.checked_add(self.compaction_reserved_bytes))
            == Some(self.capacity_bytes)
            && self.in_use_bytes <= self.peak_in_use_bytes
    }
}

/// The counters an allocator updates inside its lock.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Counters {
    pub allocations: u64,
    pub frees: u64,
    pub failures: u64,
    pub in_use_bytes: u64,
    pub peak_in_use_bytes: u64,
    pub live_blocks: u64,
}

impl Counters {
    pub(crate) fn on_alloc(&mut self, len_bytes: u64) {
        self.allocations += 1;
        self.live_blocks += 1;
        self.in_use_bytes += len_bytes;
        self.peak_in_use_bytes = self.peak_in_use_bytes.max(self.in_use_bytes);
    }
    pub(crate) fn on_free(&mut self, len_bytes: u64) {
        self.frees += 1;
        self.live_blocks -= 1;
        self.in_use_bytes -= len_bytes;
    }
}

/// Usable-ness of free space for one request size.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UnusableIndex {
    /// The request size (a power-of-two multiple of the allocator's unit).
    pub request_bytes: u64,
    /// Fraction of the free bytes that sit in free extents too small for a request of
    /// `request_bytes` (0 = all free space could serve it, 1 = none could). The Linux
    /// "unusable free space index" for this order.
    pub unusable_fraction: f64,
}

/// How fragmented an allocator's free space is, at one instant.
#[derive(Debug, Clone, PartialEq)]
pub struct FragmentationReport {
    /// Size of the arena.
    pub capacity_bytes: u64,
    /// All free bytes.
    pub free_bytes: u64,
    /// The largest free extent.
    pub largest_free_bytes: u64,
    /// Number of free extents.
    pub free_extents: u64,
    /// `1 - largest_free / free` (0 when nothing is free or all free space is one extent).
    pub external_fragmentation: f64,
    /// Per power-of-two request size, from one unit up to the arena.
    pub unusable_free_index: Vec<UnusableIndex>,
}

impl FragmentationReport {
    /// Builds the report from the sizes of the free extents, in units of `unit_bytes`
    /// (`unit_shift` = log2 of it).
    pub(crate) fn from_free_extents(
        capacity_bytes: u64,
        unit_shift: u32,
        extents_units: impl Iterator<Item = u64>,
    ) -> Self {
        // Free units per floor(log2(extent size)).
        let mut by_log2 = [0u64; 65];
        let mut free_units = 0u64;
        let mut largest_units = 0u64;
        let mut count = 0u64;
        for units in extents_units.filter(|&u| u > 0) {
            by_log2[(63 - units.leading_zeros()) as usize] += units;
            free_units += units;
            largest_units = largest_units.max(units);
            count += 1;
        }
        let capacity_units = capacity_bytes >> unit_shift;
        let max_order = if capacity_units == 0 {
            0
        } else {
            63 - capacity_units.leading_zeros()
        };
        let mut unusable_free_index = Vec::with_capacity(max_order as usize + 1);
        let mut smaller_units = 0u64;
        for order in 0..=max_order {
            let unusable_fraction = if free_units == 0 {
                0.0
            } else {
                smaller_units as f64 / free_units as f64
            };
            unusable_free_index.push(UnusableIndex {
                request_bytes: 1u64 << (order + unit_shift).min(63),
                unusable_fraction,
            });
            smaller_units += by_log2[order as usize];
        }
        let free_bytes = free_units << unit_shift;
        let largest_free_bytes = largest_units << unit_shift;
        FragmentationReport {
            capacity_bytes,
            free_bytes,
            largest_free_bytes,
            free_extents: count,
            external_fragmentation: external_fragmentation(free_bytes, largest_free_bytes),
            unusable_free_index,
        }
    }
}

/// `1 - largest / free`, 0 when nothing is free.
pub fn external_fragmentation(free_bytes: u64, largest_free_bytes: u64) -> f64 {
    if free_bytes == 0 {
        0.0
    } else {
        1.0 - largest_free_bytes as f64 / free_bytes as f64
    }
}

#[cfg(all(test, not(vlmem_loom)))]
mod tests {
    use super::*;

    #[test]
    fn report_from_extents() {
        // Unit 4 KiB; extents of 1, 1 and 4 units in a 16-unit arena.
        let r = FragmentationReport::from_free_extents(16 << 12, 12, [1u64, 1, 4].into_iter());
        assert_eq!(r.free_bytes, 6 << 12);
        assert_eq!(r.largest_free_bytes, 4 << 12);
        assert_eq!(r.free_extents, 3);
        assert!((r.external_fragmentation - (1.0 - 4.0 / 6.0)).abs() < 1e-12);
        let idx: Vec<f64> = r
            .unusable_free_index
            .iter()
            .map(|u| u.unusable_fraction)
            .collect();
        // orders 0..=4: request 1, 2, 4, 8, 16 units
        assert_eq!(idx.len(), 5);
        assert_eq!(idx[0], 0.0);
        assert!((idx[1] - 2.0 / 6.0).abs() < 1e-12);
        assert!((idx[2] - 2.0 / 6.0).abs() < 1e-12);
        assert!((idx[3] - 1.0).abs() < 1e-12);
        assert_eq!(r.unusable_free_index[4].request_bytes, 16 << 12);
        let empty = FragmentationReport::from_free_extents(16, 0, std::iter::empty());
        assert_eq!(empty.external_fragmentation, 0.0);
    }

    #[test]
    fn stats_consistency() {
        let mut c = Counters::default();
        c.on_alloc(10);
        c.on_alloc(5);
        c.on_free(10);
        assert_eq!(
            (c.in_use_bytes, c.peak_in_use_bytes, c.live_blocks),
            (5, 15, 1)
        );
        let s = AllocStats {
            capacity_bytes: 100,
            in_use_bytes: 5,
            peak_in_use_bytes: 15,
            free_bytes: 95,
            ..Default::default()
        };
        assert!(s.is_consistent());
        let mut t = s;
        t.accumulate(&s);
        assert_eq!(t.capacity_bytes, 200);
        assert!(t.is_consistent());
        assert!(
            !AllocStats {
                capacity_bytes: 1,
                ..Default::default()
            }
            .is_consistent()
        );
    }
}
