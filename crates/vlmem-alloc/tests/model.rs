//! Shadow-model property tests: random alloc/free sequences against a per-unit occupancy
//! map. No two live blocks overlap, every block lies in the arena, accounting matches the
//! model, out-of-memory is only reported when the model agrees no fitting space exists, bad
//! frees change nothing, and all space merges back at the end.
#![cfg(not(vlmem_loom))]

use proptest::prelude::*;
use vlmem_alloc::{
    BinnedAllocator, BinnedConfig, BuddyAllocator, BuddyConfig, SlabConfig, SlabPool,
};
use vlmem_core::{AllocError, Block, OffsetAllocator};

#[derive(Debug, Clone)]
enum Op {
    Alloc(u64),
    Free(usize),
    FreeAgain(usize),
}

fn ops(max_units: u64) -> impl Strategy<Value = Vec<Op>> {
    prop::collection::vec(
        prop_oneof![
            5 => (1..=max_units).prop_map(Op::Alloc),
            4 => any::<usize>().prop_map(Op::Free),
            1 => any::<usize>().prop_map(Op::FreeAgain),
        ],
        1..300,
    )
}

/// The reference: which units are taken, and by which live block.
struct Model {
    unit_bytes: u64,
    taken: Vec<bool>,
    live: Vec<Block>,
    dead: Vec<Block>,
}

impl Model {
    fn new(units: usize, unit_bytes: u64) -> Self {
        Model {
            unit_bytes,
            taken: vec![false; units],
            live: Vec::new(),
            dead: Vec::new(),
        }
    }
    fn units(&self, b: &Block) -> std::ops::Range<usize> {
        (b.offset_bytes() / self.unit_bytes) as usize..(b.end_bytes() / self.unit_bytes) as usize
    }
    fn take(&mut self, b: Block) {
        assert_eq!(b.offset_bytes() % self.unit_bytes, 0);
        assert_eq!(b.len_bytes() % self.unit_bytes, 0);
        let r = self.units(&b);
        assert!(r.end <= self.taken.len(), "block {b:?} past the arena");
        for u in r {
            assert!(
                !self.taken[u],
                "block {b:?} overlaps a live block at unit {u}"
            );
            self.taken[u] = true;
        }
        self.live.push(b);
    }
    fn release(&mut self, i: usize) -> Block {
        let b = self.live.swap_remove(i);
        for u in self.units(&b) {
            self.taken[u] = false;
        }
        self.dead.push(b);
        b
    }
    fn free_units(&self) -> u64 {
        self.taken.iter().filter(|t| !**t).count() as u64
    }
    fn largest_run(&self) -> u64 {
        let (mut best, mut cur) = (0u64, 0u64);
        for &t in &self.taken {
            cur = if t { 0 } else { cur + 1 };
            best = best.max(cur);
        }
        best
    }
    /// Is there a fully free, aligned run of `len` units (len a power of two)?
    fn aligned_free(&self, len: usize) -> bool {
        (0..self.taken.len() / len).any(|k| self.taken[k * len..(k + 1) * len].iter().all(|t| !*t))
    }
}

fn run_common(
    a: &dyn OffsetAllocator,
    model: &mut Model,
    ops: &[Op],
    on_oom: &dyn Fn(&Model, u64, &AllocError),
) {
    for op in ops {
        match *op {
            Op::Alloc(units) => {
                let bytes = units * model.unit_bytes - model.unit_bytes / 2;
                match a.allocate(bytes) {
                    Ok(b) => {
                        assert!(b.len_bytes() >= bytes);
                        model.take(b);
                    }
                    Err(e @ AllocError::OutOfMemory { .. }) => on_oom(model, bytes, &e),
                    Err(AllocError::TooLarge { .. }) => {}
                    Err(e) => panic!("unexpected {e}"),
                }
            }
            Op::Free(i) if !model.live.is_empty() => {
                let b = model.release(i % model.live.len());
                a.free(b).unwrap();
            }
            Op::FreeAgain(i) if !model.dead.is_empty() => {
                let b = model.dead[i % model.dead.len()];
                let before = a.usage();
                let e = a.free(b).unwrap_err();
                assert!(
                    matches!(e, AllocError::DoubleFree { .. } | AllocError::Stale { .. }),
                    "{e:?}"
                );
                assert_eq!(a.usage(), before, "a refused free changed the arena");
            }
            _ => {}
        }
        let u = a.usage();
        let in_use: u64 = model.live.iter().map(|b| b.len_bytes()).sum();
        assert_eq!(u.in_use_bytes, in_use);
        assert_eq!(u.free_bytes, model.free_units() * model.unit_bytes);
    }
    while !model.live.is_empty() {
        let b = model.release(0);
        a.free(b).unwrap();
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn buddy_matches_model(ops in ops(24), units in 1usize..=96) {
        let unit = 64u64;
        let a = BuddyAllocator::new(BuddyConfig { capacity_bytes: units as u64 * unit, min_block_bytes: unit, kind: None }).unwrap();
        let mut m = Model::new(units, unit);
        run_common(&a, &mut m, &ops, &|m, bytes, e| {
            let rounded = a.rounded_bytes(bytes).unwrap();
            // Eager merging: out of memory only if no aligned free run of the block's size.
            assert!(!m.aligned_free((rounded / unit) as usize), "spurious {e}");
            if let AllocError::OutOfMemory { free_bytes, .. } = e {
                assert_eq!(*free_bytes, m.free_units() * unit);
            }
        });
        a.audit().unwrap();
        let f = a.fragmentation();
        prop_assert_eq!(f.free_bytes, units as u64 * unit);
        // Fully merged: one free block per set bit of the arena's size in units.
        prop_assert_eq!(f.free_extents, u64::from(units.count_ones()));
    }

    #[test]
    fn binned_matches_model(ops in ops(40), units in 1usize..=200) {
        let unit = 256u64;
        let a = BinnedAllocator::new(BinnedConfig { capacity_bytes: units as u64 * unit, granule_bytes: unit, kind: None }).unwrap();
        let mut m = Model::new(units, unit);
        run_common(&a, &mut m, &ops, &|m, bytes, e| {
            let rounded_units = a.rounded_bytes(bytes).unwrap() / unit;
            // Any free extent of the rounded size is found (it sits in a bin at or above).
            assert!(m.largest_run() < rounded_units, "spurious {e}");
            if let AllocError::OutOfMemory { free_bytes, largest_free_bytes, .. } = e {
                assert_eq!(*free_bytes, m.free_units() * unit);
                assert_eq!(*largest_free_bytes, m.largest_run() * unit);
            }
        });
        a.audit().unwrap();
        let f = a.fragmentation();
        prop_assert_eq!((f.free_bytes, f.free_extents, f.largest_free_bytes), (units as u64 * unit, 1, units as u64 * unit));
    }

    #[test]
    fn slab_matches_model(ops in ops(1), blocks in 1u32..=40, cache_blocks in 0u32..6, caches in 1u32..4) {
        let unit = 4096u64;
        let a = SlabPool::new(SlabConfig { block_bytes: unit, capacity_blocks: blocks, cache_blocks, caches, kind: None }).unwrap();
        let mut m = Model::new(blocks as usize, unit);
        run_common(&a, &mut m, &ops, &|m, _bytes, e| {
            // Fixed size: out of memory exactly when every block is live.
            assert_eq!(m.free_units(), 0, "spurious {e}");
        });
        let audit = a.audit().unwrap();
        prop_assert_eq!(audit.walked_live_blocks, 0);
        prop_assert_eq!(audit.stats.allocations, audit.stats.frees);
    }

    #[test]
    fn binned_compaction_matches_model(ops in ops(16), units in 8usize..=128) {
        let unit = 256u64;
        let a = BinnedAllocator::new(BinnedConfig { capacity_bytes: units as u64 * unit, granule_bytes: unit, kind: None }).unwrap();
        let mut live = Vec::new();
        for op in &ops {
            match *op {
                Op::Alloc(u) => if let Ok(b) = a.allocate(u * unit) { live.push(b) },
                Op::Free(i) if !live.is_empty() => a.free(live.swap_remove(i % live.len())).unwrap(),
                _ => {}
            }
        }
        let in_use: u64 = live.iter().map(|b| b.len_bytes()).sum();
        let plan = a.plan_compaction().unwrap();
        // Destinations never overlap live blocks that are not themselves moving.
        let moving: Vec<Block> = plan.moves().iter().map(|m| m.block).collect();
        for mv in plan.moves() {
            prop_assert!(mv.to_offset_bytes < mv.from_offset_bytes);
            for b in live.iter().filter(|b| !moving.contains(b)) {
                prop_assert!(mv.to_offset_bytes + mv.len_bytes <= b.offset_bytes() || b.end_bytes() <= mv.to_offset_bytes);
            }
        }
        let out = a.commit_compaction(plan).unwrap();
        for (old, new) in &out.moved {
            let i = live.iter().position(|b| b == old).unwrap();
            live[i] = *new;
        }
        let mut sorted = live.clone();
        sorted.sort_by_key(|b| b.offset_bytes());
        // Packed from offset 0, so the free space is one extent at the end.
        let mut cursor = 0;
        for b in &sorted {
            prop_assert_eq!(b.offset_bytes(), cursor);
            cursor = b.end_bytes();
        }
        prop_assert_eq!(cursor, in_use);
        let f = a.fragmentation();
        prop_assert!(f.free_extents <= 1);
        prop_assert_eq!(f.largest_free_bytes, f.free_bytes);
        a.audit().unwrap();
        for b in live {
            a.free(b).unwrap();
        }
        prop_assert_eq!(a.fragmentation().free_extents, 1);
    }
}
