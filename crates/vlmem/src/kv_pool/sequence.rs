//! Sequences and their blocks: start (prefix sharing), append, read, finish.

use super::{BlockMeta, KvError, KvPool, KvResult, SeqId, Sequence, Tables};
use crate::manager::TensorHandle;
use vlmem_core::TensorKind;
use vlmem_core::sync::atomic::Ordering;
use vlmem_core::sync::wait_guard;

/// FNV-1a over the previous block's hash and this block's token ids.
fn chain_hash(previous: u64, tokens: &[u32]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ previous;
    for t in tokens {
        for b in t.to_le_bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01B3);
        }
    }
    h
}

/// Marks a sequence busy for the duration of one call.
pub(super) struct Claim<'a> {
    pool: &'a KvPool,
    seq: u64,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        if let Some(s) = self.pool.tables.lock().seqs.get_mut(&self.seq) {
            s.busy = false;
        }
    }
}

impl KvPool {
    /// Starts a sequence for `prompt`. Returns it and how many leading prompt tokens already
    /// have their KV in shared blocks (the caller computes and appends the rest, from that
    /// position on).
    pub fn start(&self, prompt: &[u32]) -> KvResult<(SeqId, usize)> {
        self.start_salted(0, prompt)
    }

    /// [`KvPool::start`] in a namespace: sequences share blocks only with sequences of the
    /// same `salt` (e.g. one per decoder layer, whose KV differs for the same tokens, or a
    /// fresh one per request when the token ids are not known).
    pub fn start_salted(&self, salt: u64, prompt: &[u32]) -> KvResult<(SeqId, usize)> {
        let bt = self.config.block_tokens as usize;
        let mut t = self.tables.lock();
        let id = t.next_seq;
        t.next_seq += 1;
        let mut blocks = Vec::new();
        // A block taken while it is swapped out (its owner is) or being moved down: the new
        // sequence starts swapped, so its first use brings the block back and counts it on
        // the tier.
        let mut away = false;
        let mut hash = salt;
        // Only whole blocks strictly before the last prompt token are shared, so the caller
        // always computes at least one token (it needs that token's logits).
        for chunk in prompt.chunks_exact(bt) {
            if (blocks.len() + 1) * bt >= prompt.len() {
                break;
            }
            hash = chain_hash(hash, chunk);
            let Some(&b) = t.prefix.get(&hash) else {
                break;
            };
            let parent = blocks.last().copied();
            match t.blocks.get_mut(&b) {
                Some(meta)
                    if meta.parent == parent && meta.tokens == chunk && meta.salt == salt =>
                {
                    meta.refs += 1;
                    // A block on its way down counts as away: its move may end after this.
                    away |= !meta.resident || meta.leaving;
                    blocks.push(b);
                }
                _ => break,
            }
        }
        let stored = blocks.len() * bt;
        t.seqs.insert(
            id,
            Sequence {
                salt,
                tokens: prompt[..stored].to_vec(),
                blocks,
                stored,
                busy: false,
                swapping: false,
                swapped: away,
                started: id,
            },
        );
        drop(t);
        self.prefix_hit_tokens
            .fetch_add(stored as u64, Ordering::Relaxed);
        Ok((SeqId(id), stored))
    }

    /// Marks the sequence in use by this call; waits while another call swaps it out for
    /// room (that never waits on this one), refuses a second user.
    pub(super) fn claim(&self, seq: SeqId) -> KvResult<Claim<'_>> {
        let mut t = self.tables.lock();
        loop {
            let s = t
                .seqs
                .get_mut(&seq.0)
                .ok_or(KvError::UnknownSequence(seq.0))?;
            if s.swapping {
                t = wait_guard(&self.swapped_for_room, t);
                continue;
            }
            if s.busy {
                return Err(KvError::SequenceBusy(seq.0));
            }
            s.busy = true;
            return Ok(Claim {
                pool: self,
                seq: seq.0,
            });
        }
    }

    /// Appends tokens and their KV (`kv.len() == tokens.len() * bytes_per_token`), taking new
    /// blocks as needed (which may swap out another sequence). Sealed full blocks become
    /// shareable.
    pub fn append(&self, seq: SeqId, tokens: &[u32], kv: &[u8]) -> KvResult<()> {
        let bpt = self.config.bytes_per_token;
        if (tokens.len() as u64).checked_mul(bpt) != Some(kv.len() as u64) {
            return Err(KvError::BadLength {
                bytes: kv.len(),
                tokens: tokens.len(),
                bytes_per_token: bpt,
            });
        }
        let _claim = self.claim(seq)?;
        self.ensure_resident(seq)?;
        let bt = self.config.block_tokens as usize;
        for (i, &token) in tokens.iter().enumerate() {
            let (position, block) = {
                let t = self.tables.lock();
                let s = t.seqs.get(&seq.0).ok_or(KvError::UnknownSequence(seq.0))?;
                let position = s.stored;
                (position, s.blocks.get(position / bt).copied())
            };
            let block = match block {
                Some(b) => {
                    // The write brings the block to the host: room for it first.
                    self.count_in(seq.0, b)?;
                    b
                }
                None => self.new_block(seq)?,
            };
            let handle = self.handle_of(block)?;
            let src = &kv[i * bpt as usize..(i + 1) * bpt as usize];
            self.manager
                .write(handle, (position % bt) as u64 * bpt, src)?;
            let mut t = self.tables.lock();
            // The write landed on the host, the compute tier: counted there.
            Self::set_counted(&mut t, block, true, Some(seq.0));
            let s = t
                .seqs
                .get_mut(&seq.0)
                .ok_or(KvError::UnknownSequence(seq.0))?;
            s.tokens.push(token);
            s.stored += 1;
            if s.stored % bt == 0 {
                // Sealed: index it under the chained hash of its content.
                let n = s.stored / bt;
                let mut hash = s.salt;
                for chunk in s.tokens[..n * bt].chunks_exact(bt) {
                    hash = chain_hash(hash, chunk);
                }
                let parent = n.checked_sub(2).map(|i| s.blocks[i]);
                let content = s.tokens[(n - 1) * bt..n * bt].to_vec();
                let salt = s.salt;
                if let Some(meta) = t.blocks.get_mut(&block) {
                    meta.sealed = Some(hash);
                    meta.parent = parent;
                    meta.tokens = content;
                    meta.salt = salt;
                }
                match t.prefix.get(&hash) {
                    None => {
                        t.prefix.insert(hash, block);
                    }
                    // An identical block filled independently holds the entry: this one
                    // takes it over if that one is freed first.
                    Some(&other) if other != block => {
                        t.dupes.entry(hash).or_default().push(block);
                    }
                    Some(_) => {}
                }
            }
        }
        Ok(())
    }

    /// Reads the KV of the token at `position` into `dst` (`bytes_per_token` bytes), from the
    /// compute tier (swapping the sequence in if it was out).
    pub fn read_token(&self, seq: SeqId, position: usize, dst: &mut [u8]) -> KvResult<()> {
        let bpt = self.config.bytes_per_token;
        if dst.len() as u64 != bpt {
            return Err(KvError::BadLength {
                bytes: dst.len(),
                tokens: 1,
                bytes_per_token: bpt,
            });
        }
        let _claim = self.claim(seq)?;
        self.ensure_resident(seq)?;
        let bt = self.config.block_tokens as usize;
        let block = {
            let t = self.tables.lock();
            let s = t.seqs.get(&seq.0).ok_or(KvError::UnknownSequence(seq.0))?;
            if position >= s.stored {
                return Err(KvError::OutOfRange {
                    seq: seq.0,
                    position,
                    len: s.stored,
                });
            }
            s.blocks[position / bt]
        };
        let guard = self.pin_counted(seq.0, block)?;
        guard.read((position % bt) as u64 * bpt, dst)?;
        Ok(())
    }

    /// Reads the KV of tokens `start..start + n` into `dst` (`n * bytes_per_token` bytes),
    /// one pin per block, from the compute tier (swapping the sequence in if it was out).
    pub fn read_range(&self, seq: SeqId, start: usize, dst: &mut [u8]) -> KvResult<()> {
        let bpt = self.config.bytes_per_token as usize;
        if !dst.len().is_multiple_of(bpt) {
            return Err(KvError::BadLength {
                bytes: dst.len(),
                tokens: dst.len() / bpt,
                bytes_per_token: bpt as u64,
            });
        }
        let n = dst.len() / bpt;
        let _claim = self.claim(seq)?;
        self.ensure_resident(seq)?;
        let bt = self.config.block_tokens as usize;
        let blocks = {
            let t = self.tables.lock();
            let s = t.seqs.get(&seq.0).ok_or(KvError::UnknownSequence(seq.0))?;
            match start.checked_add(n) {
                Some(end) if end <= s.stored => {}
                _ => {
                    return Err(KvError::OutOfRange {
                        seq: seq.0,
                        position: start.saturating_add(n),
                        len: s.stored,
                    });
                }
            }
            s.blocks.clone()
        };
        let mut pos = start;
        let mut out = 0usize;
        while pos < start + n {
            let block = blocks[pos / bt];
            let in_block = pos % bt;
            let take = (bt - in_block).min(start + n - pos);
            let guard = self.pin_counted(seq.0, block)?;
            guard.read(
                (in_block * bpt) as u64,
                &mut dst[out * bpt..(out + take) * bpt],
            )?;
            pos += take;
            out += take;
        }
        Ok(())
    }

    /// Tokens stored for the sequence.
    pub fn len(&self, seq: SeqId) -> KvResult<usize> {
        let t = self.tables.lock();
        t.seqs
            .get(&seq.0)
            .map(|s| s.stored)
            .ok_or(KvError::UnknownSequence(seq.0))
    }

    /// Whether the sequence is swapped out now (some of its blocks may be away from the
    /// compute tier; its next use brings them back).
    pub fn is_swapped(&self, seq: SeqId) -> KvResult<bool> {
        let t = self.tables.lock();
        t.seqs
            .get(&seq.0)
            .map(|s| s.swapped)
            .ok_or(KvError::UnknownSequence(seq.0))
    }

    /// Ends a sequence: its references go, and blocks nobody else holds are freed.
    pub fn finish(&self, seq: SeqId) -> KvResult<()> {
        let mut freed = Vec::new();
        {
            let mut t = self.tables.lock();
            loop {
                let s = t.seqs.get(&seq.0).ok_or(KvError::UnknownSequence(seq.0))?;
                if s.busy {
                    return Err(KvError::SequenceBusy(seq.0));
                }
                if !s.swapping {
                    break;
                }
                t = wait_guard(&self.swapped_for_room, t);
            }
            let s = t
                .seqs
                .remove(&seq.0)
                .ok_or(KvError::UnknownSequence(seq.0))?;
            for b in s.blocks {
                let Some(meta) = t.blocks.get_mut(&b) else {
                    continue;
                };
                meta.refs -= 1;
                if meta.refs == 0 {
                    let meta = t.blocks.remove(&b).expect("present");
                    if let Some(h) = meta.sealed {
                        Self::unindex(&mut t, h, b);
                    }
                    if meta.resident {
                        t.resident_blocks -= 1;
                    }
                    freed.push(meta.handle);
                }
            }
        }
        for h in freed {
            self.manager.deallocate(h)?;
        }
        Ok(())
    }

    /// A new empty block at the end of the sequence.
    pub(super) fn new_block(&self, seq: SeqId) -> KvResult<u64> {
        // Without room (every other block in use), the allocation lets the manager evict,
        // and the count follows it at the next reconciliation.
        self.make_room(seq.0, &[])?;
        let id = {
            let mut t = self.tables.lock();
            t.next_block += 1;
            t.next_block
        };
        let handle = self.manager.allocate_on(
            self.config.block_bytes(),
            TensorKind::KvCache,
            id,
            self.config.compute_tier,
        )?;
        let mut t = self.tables.lock();
        t.blocks.insert(
            id,
            BlockMeta {
                handle,
                refs: 1,
                sealed: None,
                parent: None,
                tokens: Vec::new(),
                salt: 0,
                resident: true,
                leaving: false,
                epoch: 0,
            },
        );
        t.resident_blocks += 1;
        match t.seqs.get_mut(&seq.0) {
            Some(s) => {
                s.blocks.push(id);
                Ok(id)
            }
            None => {
                drop(t);
                self.manager.deallocate(handle)?;
                Err(KvError::UnknownSequence(seq.0))
            }
        }
    }

    /// Drops the index entry of a freed sealed block (`hash`), handing it to an identical
    /// live block when there is one (preferring one whose chain the index holds too), or
    /// forgets the block among those identical ones.
    fn unindex(t: &mut Tables, hash: u64, block: u64) {
        if t.prefix.get(&hash) != Some(&block) {
            if let Some(v) = t.dupes.get_mut(&hash) {
                v.retain(|b| *b != block);
                if v.is_empty() {
                    t.dupes.remove(&hash);
                }
            }
            return;
        }
        let Some(mut candidates) = t.dupes.remove(&hash) else {
            t.prefix.remove(&hash);
            return;
        };
        let chained = |b: &u64| {
            t.blocks.get(b).and_then(|m| m.parent).is_none_or(|p| {
                t.blocks
                    .get(&p)
                    .and_then(|pm| pm.sealed)
                    .is_some_and(|ph| t.prefix.get(&ph) == Some(&p))
            })
        };
        // The first in seal order among those whose chain is indexed (else the first).
        let pick = candidates.iter().position(chained).unwrap_or(0);
        let next = candidates.remove(pick);
        t.prefix.insert(hash, next);
        if !candidates.is_empty() {
            t.dupes.insert(hash, candidates);
        }
    }

    pub(super) fn handle_of(&self, block: u64) -> KvResult<TensorHandle> {
        self.tables
            .lock()
            .blocks
            .get(&block)
            .map(|m| m.handle)
            .ok_or_else(|| KvError::InvalidConfig(format!("block {block} vanished")))
    }
}
