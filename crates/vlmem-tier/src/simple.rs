//! A small first-fit [`OffsetAllocator`], for tests, benchmarks and tools that need a tier
//! without the real allocators of vlmem-alloc. Sizes are rounded up to a fixed granule;
//! free runs are coalesced. O(free runs) per call: not for hot paths.

use crate::sync::Mutex;
use std::collections::{BTreeMap, HashMap};
use vlmem_core::{AllocError, ArenaUsage, Block, OffsetAllocator};

#[derive(Debug, Default)]
struct State {
    /// Free runs: offset -> length.
    free: BTreeMap<u64, u64>,
    /// Live blocks: slot -> (generation, offset, length).
    live: HashMap<u32, (u32, u64, u64)>,
    generations: HashMap<u32, u32>,
    free_slots: Vec<u32>,
    next_slot: u32,
    in_use_bytes: u64,
}

/// First-fit over one arena. See the module documentation.
#[derive(Debug)]
pub struct FirstFitAllocator {
    id: u32,
    capacity_bytes: u64,
    granule_bytes: u64,
    state: Mutex<State>,
}

impl FirstFitAllocator {
    /// An allocator over `capacity_bytes`, rounding every request up to `granule_bytes` (a
    /// power of two; 4096 for arenas that do O_DIRECT I/O).
    pub fn new(capacity_bytes: u64, granule_bytes: u64) -> Result<Self, AllocError> {
        if !granule_bytes.is_power_of_two() || !capacity_bytes.is_multiple_of(granule_bytes) {
            return Err(AllocError::InvalidConfig(format!(
                "capacity {capacity_bytes} must be a multiple of the granule {granule_bytes}, a power of two"
            )));
        }
        let mut state = State::default();
        if capacity_bytes > 0 {
            state.free.insert(0, capacity_bytes);
        }
        Ok(FirstFitAllocator {
            id: vlmem_core::new_allocator_id(),
            capacity_bytes,
            granule_bytes,
            state: Mutex::new(state),
        })
    }
}

impl OffsetAllocator for FirstFitAllocator {
    fn allocate(&self, bytes: u64) -> Result<Block, AllocError> {
        if bytes == 0 {
            return Err(AllocError::ZeroSize);
        }
        if bytes > self.capacity_bytes {
            return Err(AllocError::TooLarge {
                requested_bytes: bytes,
                capacity_bytes: self.capacity_bytes,
            });
        }
        let len = bytes.div_ceil(self.granule_bytes) * self.granule_bytes;
        let mut s = self.state.lock();
        let found = s
            .free
            .iter()
            .find(|(_, l)| **l >= len)
            .map(|(o, l)| (*o, *l));
        let Some((off, run)) = found else {
            let free_bytes = self.capacity_bytes - s.in_use_bytes;
            let largest_free_bytes = s.free.values().copied().max().unwrap_or(0);
            return Err(AllocError::OutOfMemory {
                kind: None,
                requested_bytes: bytes,
                free_bytes,
                largest_free_bytes,
            });
        };
        s.free.remove(&off);
        if run > len {
            s.free.insert(off + len, run - len);
        }
        let slot = match s.free_slots.pop() {
            Some(x) => x,
            None => {
                s.next_slot += 1;
                s.next_slot - 1
            }
        };
        let generation = {
            let g = s.generations.entry(slot).or_insert(0);
            *g = g.wrapping_add(1);
            *g
        };
        s.live.insert(slot, (generation, off, len));
        s.in_use_bytes += len;
        Ok(Block::from_parts(self.id, slot, generation, off, len))
    }

    fn free(&self, block: Block) -> Result<(), AllocError> {
        if block.allocator_id() != self.id {
            return Err(AllocError::Foreign {
                allocator_id: block.allocator_id(),
                offset_bytes: block.offset_bytes(),
            });
        }
        let mut s = self.state.lock();
        match s.live.get(&block.slot()).copied() {
            Some((g, off, len))
                if g == block.generation()
                    && off == block.offset_bytes()
                    && len == block.len_bytes() =>
            {
                s.live.remove(&block.slot());
                s.free_slots.push(block.slot());
                s.in_use_bytes -= len;
                let (mut start, mut end) = (off, off + len);
                if let Some((&po, &pl)) = s.free.range(..start).next_back()
                    && po + pl == start
                {
                    s.free.remove(&po);
                    start = po;
                }
                if let Some(&nl) = s.free.get(&end) {
                    s.free.remove(&end);
                    end += nl;
                }
                s.free.insert(start, end - start);
                Ok(())
            }
            Some(_) => Err(AllocError::Stale {
                offset_bytes: block.offset_bytes(),
            }),
            None if s.generations.get(&block.slot()) == Some(&block.generation()) => {
                Err(AllocError::DoubleFree {
                    offset_bytes: block.offset_bytes(),
                })
            }
            None => Err(AllocError::Foreign {
                allocator_id: block.allocator_id(),
                offset_bytes: block.offset_bytes(),
            }),
        }
    }

    fn capacity_bytes(&self) -> u64 {
        self.capacity_bytes
    }

    fn usage(&self) -> ArenaUsage {
        let s = self.state.lock();
        ArenaUsage {
            capacity_bytes: self.capacity_bytes,
            in_use_bytes: s.in_use_bytes,
            free_bytes: self.capacity_bytes - s.in_use_bytes,
            largest_free_bytes: s.free.values().copied().max().unwrap_or(0),
        }
    }
}
