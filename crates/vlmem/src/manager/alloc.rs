//! Tensors come and go: allocation, checkpoint extents registered in place, and frees.

use super::{Entry, MemoryManager, TensorHandle};
use crate::error::{ManagerError, Result};
use std::path::Path;
use vlmem_core::{TensorKind, Tier};

impl MemoryManager {
    /// A tensor of `bytes` bytes of `kind`, named `id` (for errors and traces), placed on the
    /// host tier (or, when the kind's host budget is full of pinned tensors, refused).
    pub fn allocate(&self, bytes: u64, kind: TensorKind, id: u64) -> Result<TensorHandle> {
        self.allocate_on(bytes, kind, id, Tier::Host)
    }

    /// Like [`MemoryManager::allocate`], on a chosen tier.
    pub fn allocate_on(
        &self,
        bytes: u64,
        kind: TensorKind,
        id: u64,
        tier: Tier,
    ) -> Result<TensorHandle> {
        if bytes == 0 {
            return Err(ManagerError::ZeroSize);
        }
        let res = self
            .inner
            .reserve_on(tier, kind, bytes, id, &self.inner.waits())?;
        let mut e = Entry::new(id, kind, bytes, tier, res);
        e.last_use = self.inner.tick();
        Ok(self.inner.insert(e))
    }

    /// Registers a tensor that already lies in a file (a checkpoint weight) as resident on the
    /// disk tier, read in place: no copy, no swap space.
    pub fn register_extent(
        &self,
        path: &Path,
        file_offset_bytes: u64,
        len_bytes: u64,
        kind: TensorKind,
        id: u64,
    ) -> Result<TensorHandle> {
        if len_bytes == 0 {
            return Err(ManagerError::ZeroSize);
        }
        let res = self.inner.disk.register_extent(
            path,
            file_offset_bytes,
            len_bytes,
            &format!("tensor {id}"),
        )?;
        let mut e = Entry::new(id, kind, len_bytes, Tier::Disk, res);
        e.written = true;
        e.read_only = true;
        e.last_use = self.inner.tick();
        Ok(self.inner.insert(e))
    }

    /// Frees a tensor and every copy of it. Refused while it is pinned; a stale or
    /// double-freed handle is an error and changes nothing.
    pub fn deallocate(&self, handle: TensorHandle) -> Result<()> {
        let inner = &self.inner;
        let waits = inner.waits();
        let shard = inner.shard_of(handle)?;
        let mut st = shard.state.lock();
        // Registered in `writers_waiting` (undone on every way out of the loop).
        let mut waiting = false;
        let entry = loop {
            let e = inner.entry(&mut st, handle)?;
            if waiting && (e.busy || e.pins() > 0) {
                e.writers_waiting -= 1;
                waiting = false;
                shard.cond.notify_all();
            }
            if e.busy {
                let id = e.id;
                st = waits.wait(&shard.cond, st).map_err(|_| waits.busy(id))?;
                continue;
            }
            let pins = e.pins();
            if pins > 0 {
                return Err(ManagerError::Pinned { id: e.id, pins });
            }
            if !e.reads.is_empty() {
                // A plain read in flight (not a pin): wait for it to end, holding off new
                // ones meanwhile.
                if !waiting {
                    e.writers_waiting += 1;
                    waiting = true;
                }
                let id = e.id;
                match waits.wait(&shard.cond, st) {
                    Ok(g) => st = g,
                    Err(mut g) => {
                        if let Ok(e) = inner.entry(&mut g, handle) {
                            e.writers_waiting -= 1;
                        }
                        drop(g);
                        shard.cond.notify_all();
                        return Err(waits.busy(id));
                    }
                }
                continue;
            }
            let local = (handle.slot as usize) / inner.shards.len();
            let slot = &mut st.slots[local];
            slot.generation = slot.generation.wrapping_add(1);
            let entry = slot.entry.take();
            st.free.push(local as u32);
            break entry;
        };
        drop(st);
        // Readers that waited for this free find the tensor gone.
        shard.cond.notify_all();
        if let Some(e) = entry {
            for t in Tier::ALL {
                if let Some(c) = e.copies[t.index()] {
                    inner.release(t, e.kind, c.res);
                }
            }
        }
        Ok(())
    }
}
