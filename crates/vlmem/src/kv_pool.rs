//! The paged KV cache: fixed-size blocks owned per sequence, full blocks shared between
//! sequences by a hash of their content, and whole sequences swapped out under pressure.
//!
//! ## Blocks
//! A block holds the keys and values of `block_tokens` consecutive tokens
//! (`block_tokens * bytes_per_token` bytes, laid out as the caller likes, token by token).
//! Each block is one [`TensorKind::KvCache`] tensor of the [`MemoryManager`], so it lives in
//! the manager's tiers and counts against the KV budget of each tier. A sequence owns a table
//! of blocks; its last block fills as tokens are appended.
//!
//! ## Prefix sharing
//! When a block is full it is sealed under a chained hash of every token up to its end
//! (the hash of the previous block and this block's token ids), as vLLM's prefix cache does.
//! A new sequence whose prompt starts with the same tokens takes the sealed blocks by
//! reference (a count per block) instead of recomputing them: [`KvPool::start`] says how
//! many prompt tokens are already there. Sealed blocks are immutable; a block is freed when
//! its last sequence finishes. Two sequences that fill identical blocks independently keep
//! both until one finishes (the index points at the first; when that one is freed, it
//! points at an identical block that is left, so the content stays shareable).
//!
//! ## Pressure: whole sequences move
//! The pool keeps at most `budget / block bytes` blocks on the compute tier (the manager's KV
//! budget there). A new block beyond that first swaps out a whole other sequence (the most
//! recently started idle one, as vLLM preempts the latest arrival): each block no running
//! sequence holds (it owns it alone, or shares it only with idle swapped-out sequences) is
//! demoted one tier down. A swapped sequence comes back whole the next time it is used.
//! Blocks shared with a running sequence stay. When that running sequence finishes or goes
//! out later, the block is left on the compute tier to swapped-out sequences only: making
//! room first swaps such a sequence out again (latest started first), which moves the block
//! down and preempts nobody, before it swaps out a running one. With no other sequence to
//! swap out (all in use, or none), the sequence that needs the room gives its own oldest
//! counted blocks (except those a running sequence also holds): they go one tier down and
//! it is swapped; a use brings back the blocks it touches. A sequence longer than the tier
//! holds is never brought back whole: its reads and appends bring its blocks back one at a
//! time, each in the place of its oldest counted one.
//!
//! The compute tier is the host for now: blocks are written through
//! [`MemoryManager::write`], which lands on the host, and [`KvPool::new`] refuses another
//! tier.
//!
//! A block is counted on the compute tier exactly when it is there: the count changes when
//! a block is made there, when a swap-in, a read's pin or an append's write brings it there,
//! and after a swap-out by what the manager reports (a block the manager left in place
//! stays counted). Moves the pool did not make (the manager's own evictions, a direct
//! [`MemoryManager::evict`]) are followed from the manager's placement before room is made,
//! in [`KvPool::stats`] and in [`KvPool::check`]. Counted exactly, the blocks on the tier
//! never exceed `budget / block bytes`. A sequence that is not swapped holds only counted
//! blocks: one whose prompt takes blocks by reference while they are swapped out, or while
//! a swap-out moves them (they are marked leaving from when the swap-out chose them until
//! it noted where each one is), starts swapped, so its first use brings them back and
//! counts them; uses of a leaving block wait for its move; and a block that leaves while
//! another sequence holds it marks that one swapped too. [`KvPool::check`] verifies all of
//! this against the manager's placement, both ways.
//!
//! ## Locks
//! One mutex over the tables (level 2 in docs/ARCHITECTURE.md: above the manager's shard
//! locks, never held across a manager call, since those may do I/O). A sequence is used by one
//! thread at a time; a second thread gets [`KvError::SequenceBusy`]. Waits (a sequence
//! being swapped out for room, a block leaving) are on one condition variable, notified
//! when such a move ends; a move never waits on a use.

use crate::error::ManagerError;
use crate::manager::{MemoryManager, PinGuard, TensorHandle};
use std::collections::{HashMap, HashSet};
use vlmem_core::sync::atomic::{AtomicU64, Ordering};
use vlmem_core::sync::{Condvar, Mutex, wait_guard};
use vlmem_core::{TensorKind, Tier};

/// Errors of the KV pool.
#[derive(Debug, thiserror::Error)]
pub enum KvError {
    /// No such sequence (never started, or finished).
    #[error("unknown KV sequence {0}")]
    UnknownSequence(u64),
    /// Another thread is using the sequence.
    #[error("KV sequence {0} is in use by another thread")]
    SequenceBusy(u64),
    /// KV bytes that do not match the tokens given.
    #[error("{bytes} bytes of KV for {tokens} tokens; expected {bytes_per_token} per token")]
    BadLength {
        /// Bytes given.
        bytes: usize,
        /// Tokens given.
        tokens: usize,
        /// Bytes one token's KV takes.
        bytes_per_token: u64,
    },
    /// A position past the sequence's end.
    #[error("token {position} is past the end of sequence {seq} ({len} tokens)")]
    OutOfRange {
        /// The sequence.
        seq: u64,
        /// The position asked for.
        position: usize,
        /// Tokens in the sequence.
        len: usize,
    },
    /// A bad pool configuration.
    #[error("invalid KV pool configuration: {0}")]
    InvalidConfig(String),
    /// The manager refused (no room even after swapping, I/O error, ...).
    #[error(transparent)]
    Manager(#[from] ManagerError),
}

/// Result of the KV pool.
pub type KvResult<T> = std::result::Result<T, KvError>;

/// How the pool is laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvPoolConfig {
    /// Tokens per block (vLLM's default is 16).
    pub block_tokens: u32,
    /// KV bytes of one token (all layers, keys and values).
    pub bytes_per_token: u64,
    /// Where attention reads the cache. Only [`Tier::Host`] for now: blocks are written
    /// through [`MemoryManager::write`], which lands on the host, so [`KvPool::new`] refuses
    /// another tier.
    pub compute_tier: Tier,
}

impl KvPoolConfig {
    /// Bytes of one block (saturating at `u64::MAX`; [`KvPool::new`] refuses a block whose
    /// bytes do not fit).
    pub fn block_bytes(&self) -> u64 {
        u64::from(self.block_tokens).saturating_mul(self.bytes_per_token)
    }
}

/// A sequence of the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SeqId(u64);

impl SeqId {
    /// The number (for display).
    pub fn get(&self) -> u64 {
        self.0
    }
}

/// Counters of the pool at one instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KvPoolStats {
    /// Live sequences.
    pub sequences: u64,
    /// Live blocks.
    pub blocks: u64,
    /// Blocks referenced by more than one sequence.
    pub shared_blocks: u64,
    /// Block references held by sequences (>= blocks; the difference is what sharing saves).
    pub block_refs: u64,
    /// Blocks counted on the compute tier.
    pub resident_blocks: u64,
    /// Prompt tokens served from shared blocks instead of being computed.
    pub prefix_hit_tokens: u64,
    /// Whole-sequence swap-outs.
    pub swap_outs: u64,
    /// Whole-sequence swap-ins.
    pub swap_ins: u64,
}

#[derive(Debug)]
struct BlockMeta {
    handle: TensorHandle,
    refs: u32,
    /// Chained content hash once the block is full.
    sealed: Option<u64>,
    /// Once sealed: the block before it in its sequence and its own token ids, so a hash
    /// match is checked against the real content (a collision never shares wrong KV).
    parent: Option<u64>,
    tokens: Vec<u32>,
    salt: u64,
    /// Counted on the compute tier.
    resident: bool,
    /// Chosen for a move down by a call in flight (until it has noted where the block is):
    /// a new sequence taking it counts it as away, and uses of it wait.
    leaving: bool,
    /// Bumped whenever the pool notes where the block is, so a count correction from the
    /// manager's placement, read without the lock, never overrides a newer note.
    epoch: u64,
}

#[derive(Debug)]
struct Sequence {
    /// The namespace of its prefix hashes.
    salt: u64,
    tokens: Vec<u32>,
    blocks: Vec<u64>,
    /// Tokens whose KV is stored (the prompt's shared prefix counts from the start).
    stored: usize,
    /// A caller's call is using it.
    busy: bool,
    /// Another caller's call is swapping it out to make room (its owner waits).
    swapping: bool,
    swapped: bool,
    started: u64,
}

#[derive(Debug, Default)]
struct Tables {
    seqs: HashMap<u64, Sequence>,
    blocks: HashMap<u64, BlockMeta>,
    prefix: HashMap<u64, u64>,
    /// Live sealed blocks whose hash the index holds for another block (identical content
    /// filled independently): one of them takes the entry when the indexed block is freed.
    dupes: HashMap<u64, Vec<u64>>,
    resident_blocks: u64,
    next_block: u64,
    next_seq: u64,
}

/// The paged KV cache over a [`MemoryManager`]. Cheap to share by reference; every method
/// takes `&self`.
#[derive(Debug)]
pub struct KvPool {
    manager: MemoryManager,
    config: KvPoolConfig,
    max_resident_blocks: u64,
    tables: Mutex<Tables>,
    /// Signalled when a swap made for room ends (its sequence's owner waits for it).
    swapped_for_room: Condvar,
    prefix_hit_tokens: AtomicU64,
    swap_outs: AtomicU64,
    swap_ins: AtomicU64,
}

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

/// The blocks that a sequence other than `except` holds while it is in use: not swapped
/// out, or used (`busy`) or moved (`swapping`) by a call now. Those stay on the compute tier.
fn held_by_others_in_use(seqs: &HashMap<u64, Sequence>, except: u64) -> HashSet<u64> {
    seqs.iter()
        .filter(|(id, s)| **id != except && (!s.swapped || s.busy || s.swapping))
        .flat_map(|(_, s)| s.blocks.iter().copied())
        .collect()
}

/// Blocks a call is moving down (marked `leaving`); those whose placement it has not noted
/// when it returns or unwinds get their mark cleared, and the waiting uses are woken.
struct LeavingMarks<'a> {
    pool: &'a KvPool,
    blocks: Vec<u64>,
    /// Blocks from here on are still marked by this call.
    next: usize,
}

impl Drop for LeavingMarks<'_> {
    fn drop(&mut self) {
        let rest = self.blocks.get(self.next..).unwrap_or(&[]);
        if rest.is_empty() {
            return;
        }
        let mut t = self.pool.tables.lock();
        for b in rest {
            if let Some(m) = t.blocks.get_mut(b) {
                m.leaving = false;
            }
        }
        drop(t);
        self.pool.swapped_for_room.notify_all();
    }
}

/// What `make_room` does next.
enum Room {
    /// Swap out this other sequence (marked `swapping`).
    Sequence(u64),
    /// Move down this block of the calling sequence (marked `leaving`).
    Own(u64, TensorHandle),
}

/// Marks a sequence busy for the duration of one call.
struct Claim<'a> {
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
    /// A pool over `manager`, keeping at most the manager's KV budget on the compute tier.
    /// [`KvError::InvalidConfig`] when the compute tier is not the host (the pool computes
    /// on the host for now), a block has no tokens or no bytes, its bytes
    /// (`block_tokens * bytes_per_token`) do not fit in 64 bits or the address space, or the
    /// budget is smaller than one block.
    pub fn new(manager: MemoryManager, config: KvPoolConfig) -> KvResult<Self> {
        if config.compute_tier != Tier::Host {
            return Err(KvError::InvalidConfig(format!(
                "the KV pool computes on the host tier for now (blocks are written through \
                 MemoryManager::write, which lands on the host); compute_tier {} is not \
                 supported",
                config.compute_tier
            )));
        }
        if config.block_tokens == 0 || config.bytes_per_token == 0 {
            return Err(KvError::InvalidConfig(
                "block_tokens and bytes_per_token must be at least 1".into(),
            ));
        }
        let block_bytes = u64::from(config.block_tokens)
            .checked_mul(config.bytes_per_token)
            .filter(|&b| usize::try_from(b).is_ok())
            .ok_or_else(|| {
                KvError::InvalidConfig(format!(
                    "a block of {} tokens x {} bytes does not fit in memory's address range",
                    config.block_tokens, config.bytes_per_token
                ))
            })?;
        let budget = manager
            .stats()
            .budgets
            .get(config.compute_tier, TensorKind::KvCache);
        let max_resident_blocks = budget / block_bytes;
        if max_resident_blocks == 0 {
            return Err(KvError::InvalidConfig(format!(
                "the KV budget on {} ({budget} bytes) is smaller than one block ({} bytes)",
                config.compute_tier,
                config.block_bytes()
            )));
        }
        Ok(KvPool {
            manager,
            config,
            max_resident_blocks,
            tables: Mutex::new(Tables::default()),
            swapped_for_room: Condvar::new(),
            prefix_hit_tokens: AtomicU64::new(0),
            swap_outs: AtomicU64::new(0),
            swap_ins: AtomicU64::new(0),
        })
    }

    /// The configuration.
    pub fn config(&self) -> KvPoolConfig {
        self.config
    }

    /// Blocks the pool keeps on the compute tier at most.
    pub fn max_resident_blocks(&self) -> u64 {
        self.max_resident_blocks
    }

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
    fn claim(&self, seq: SeqId) -> KvResult<Claim<'_>> {
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

    /// Swaps the whole sequence out of the compute tier: every block on the tier that no
    /// running sequence holds moves one tier down: the blocks it holds alone, and those it
    /// shares only with sequences that are swapped out and idle (also when it is swapped
    /// already: blocks left to it, or to it and other swapped sequences, since their running
    /// holders finished or went out). Returns the bytes freed on the compute tier.
    pub fn swap_out(&self, seq: SeqId) -> KvResult<u64> {
        let _claim = self.claim(seq)?;
        self.swap_out_claimed(seq.0)
    }

    /// [`KvPool::swap_out`] of a sequence this thread has claimed or marked `swapping`. The
    /// other holders of a block it moves are marked `swapping` meanwhile, so none of them is
    /// used (or finished) while its block is on the way down; the blocks themselves are
    /// marked `leaving` when the list is made, so a sequence started on them meanwhile starts
    /// swapped and its uses wait for the move.
    fn swap_out_claimed(&self, seq: u64) -> KvResult<u64> {
        let (own, was_swapped, others): (Vec<(u64, TensorHandle)>, bool, Vec<u64>) = {
            let mut t = self.tables.lock();
            let Tables { seqs, blocks, .. } = &mut *t;
            let held = held_by_others_in_use(seqs, seq);
            let s = seqs.get_mut(&seq).ok_or(KvError::UnknownSequence(seq))?;
            let was_swapped = std::mem::replace(&mut s.swapped, true);
            let own: Vec<(u64, TensorHandle)> = s
                .blocks
                .iter()
                .filter_map(|b| {
                    let m = blocks.get_mut(b)?;
                    let go = m.resident && !m.leaving && !held.contains(b);
                    m.leaving |= go;
                    go.then_some((*b, m.handle))
                })
                .collect();
            let shared: Vec<u64> = own
                .iter()
                .filter(|(b, _)| blocks.get(b).is_some_and(|m| m.refs > 1))
                .map(|(b, _)| *b)
                .collect();
            let mut others = Vec::new();
            if !shared.is_empty() {
                for (id, o) in seqs.iter_mut() {
                    if *id != seq && o.blocks.iter().any(|b| shared.contains(b)) {
                        // Swapped and idle (`held_by_others_in_use` left its blocks out).
                        o.swapping = true;
                        others.push(*id);
                    }
                }
            }
            (own, was_swapped, others)
        };
        let freed = self.move_down(seq, own);
        if !others.is_empty() {
            let mut t = self.tables.lock();
            for id in others {
                if let Some(o) = t.seqs.get_mut(&id) {
                    o.swapping = false;
                }
            }
            drop(t);
            self.swapped_for_room.notify_all();
        }
        if !was_swapped {
            self.swap_outs.fetch_add(1, Ordering::Relaxed);
        }
        freed
    }

    /// Moves blocks of `holder` that this call marked `leaving` one tier down, noting where
    /// each one is afterwards (which clears its mark); stops at the first error (the marks
    /// of the blocks not moved are cleared). Returns the bytes freed on the compute tier.
    fn move_down(&self, holder: u64, blocks: Vec<(u64, TensorHandle)>) -> KvResult<u64> {
        let mut marks = LeavingMarks {
            pool: self,
            blocks: blocks.iter().map(|(b, _)| *b).collect(),
            next: 0,
        };
        let mut freed = 0;
        for (b, h) in blocks {
            let moved = self.manager.swap_out(h, self.config.compute_tier);
            // Where the block is now, not what was asked, decides whether it is counted on
            // the tier (the manager leaves a pinned block where it is).
            let on_tier = self.on_compute_tier(h);
            self.note_placement(b, on_tier, Some(holder));
            marks.next += 1;
            freed += moved?;
        }
        Ok(freed)
    }

    /// Whether the manager has a copy of the block on the compute tier now (`None`: it
    /// could not say; the count stays as it was).
    fn on_compute_tier(&self, handle: TensorHandle) -> Option<bool> {
        self.manager
            .residency(handle)
            .ok()
            .map(|(tiers, _)| tiers.contains(&self.config.compute_tier))
    }

    /// Records where a block is after the pool moved or pinned it: counted on the compute
    /// tier or not (`None`: unknown, the count stays). Clears its `leaving` mark and wakes
    /// the uses waiting for it.
    fn note_placement(&self, block: u64, on_tier: Option<bool>, holder: Option<u64>) {
        let mut t = self.tables.lock();
        let Some(m) = t.blocks.get_mut(&block) else {
            return;
        };
        let was_leaving = std::mem::replace(&mut m.leaving, false);
        m.epoch += 1;
        if let Some(on_tier) = on_tier {
            Self::set_counted(&mut t, block, on_tier, holder);
        }
        drop(t);
        if was_leaving {
            self.swapped_for_room.notify_all();
        }
    }

    /// Counts a block on the compute tier or not (the one place the count changes after a
    /// block is made). A block not counted there marks every sequence holding it swapped,
    /// so its next use brings the block back (`holder`: the one holder, when the caller
    /// knows it and the block has no other).
    fn set_counted(t: &mut Tables, block: u64, on_tier: bool, holder: Option<u64>) {
        let Some(m) = t.blocks.get_mut(&block) else {
            return;
        };
        m.epoch += 1;
        let was = std::mem::replace(&mut m.resident, on_tier);
        let refs = m.refs;
        match (was, on_tier) {
            (false, true) => t.resident_blocks += 1,
            (true, false) => t.resident_blocks -= 1,
            _ => {}
        }
        if on_tier {
            return;
        }
        match holder.filter(|_| refs <= 1) {
            Some(h) => {
                if let Some(s) = t.seqs.get_mut(&h) {
                    s.swapped = true;
                }
            }
            None => {
                for s in t.seqs.values_mut() {
                    if s.blocks.contains(&block) {
                        s.swapped = true;
                    }
                }
            }
        }
    }

    /// Follows moves the pool did not make (the manager's own evictions, a direct
    /// [`MemoryManager::evict`]): a block counted on the compute tier that the manager no
    /// longer has there stops being counted, and its holders are marked swapped (their
    /// next use brings it back). Only counted blocks are asked about; a block the pool
    /// noted again meanwhile keeps the newer note.
    fn reconcile(&self) {
        let counted: Vec<(u64, TensorHandle, u64)> = {
            let t = self.tables.lock();
            t.blocks
                .iter()
                .filter(|(_, m)| m.resident && !m.leaving)
                .map(|(b, m)| (*b, m.handle, m.epoch))
                .collect()
        };
        let gone: Vec<(u64, u64)> = counted
            .into_iter()
            .filter(|(_, h, _)| self.on_compute_tier(*h) == Some(false))
            .map(|(b, _, epoch)| (b, epoch))
            .collect();
        if gone.is_empty() {
            return;
        }
        let mut t = self.tables.lock();
        for (b, epoch) in gone {
            if t.blocks
                .get(&b)
                .is_some_and(|m| m.epoch == epoch && m.resident && !m.leaving)
            {
                Self::set_counted(&mut t, b, false, None);
            }
        }
    }

    /// Waits while `block` is being moved down by another call; then, when it is not
    /// counted on the compute tier, makes room for it (the caller brings it there next and
    /// counts it).
    fn count_in(&self, seq: u64, block: u64) -> KvResult<()> {
        let mut t = self.tables.lock();
        loop {
            let m = t
                .blocks
                .get(&block)
                .ok_or_else(|| KvError::InvalidConfig(format!("block {block} vanished")))?;
            if m.leaving {
                t = wait_guard(&self.swapped_for_room, t);
                continue;
            }
            if m.resident {
                return Ok(());
            }
            break;
        }
        drop(t);
        // Without room (every other block in use), the pin or write that follows lets the
        // manager evict, and the count follows it at the next reconciliation.
        self.make_room(seq, &[block])?;
        Ok(())
    }

    /// Pins a block of the claimed sequence `seq` on the compute tier, counted there (room
    /// made first when it was not).
    fn pin_counted(&self, seq: u64, block: u64) -> KvResult<PinGuard> {
        self.count_in(seq, block)?;
        let handle = self.handle_of(block)?;
        let guard = self.manager.pin(handle, self.config.compute_tier)?;
        // Counted while the pin holds it there.
        self.note_placement(block, Some(true), Some(seq));
        Ok(guard)
    }

    /// Brings a swapped sequence back whole (making room by swapping out others): every
    /// block it holds that is not counted on the compute tier is pinned there and counted.
    /// The sequence is marked back in only once none is left away (a block taken from it
    /// meanwhile is brought back in the next round). Waits while a block of it is being
    /// moved down. A sequence with more blocks than the tier holds, or for which no other
    /// sequence gives room now, stays swapped: its uses bring the blocks they touch back one
    /// by one ([`KvPool::pin_counted`]).
    fn ensure_resident(&self, seq: SeqId) -> KvResult<()> {
        loop {
            let (away, all): (Vec<(u64, TensorHandle)>, Vec<u64>) = {
                let mut t = self.tables.lock();
                loop {
                    let s = t.seqs.get(&seq.0).ok_or(KvError::UnknownSequence(seq.0))?;
                    if s.blocks
                        .iter()
                        .any(|b| t.blocks.get(b).is_some_and(|m| m.leaving))
                    {
                        t = wait_guard(&self.swapped_for_room, t);
                        continue;
                    }
                    break;
                }
                let Tables { seqs, blocks, .. } = &mut *t;
                let s = seqs
                    .get_mut(&seq.0)
                    .ok_or(KvError::UnknownSequence(seq.0))?;
                if !s.swapped {
                    return Ok(());
                }
                let away: Vec<_> = s
                    .blocks
                    .iter()
                    .filter_map(|b| {
                        let m = blocks.get(b)?;
                        (!m.resident).then_some((*b, m.handle))
                    })
                    .collect();
                if away.is_empty() {
                    s.swapped = false;
                    drop(t);
                    self.swap_ins.fetch_add(1, Ordering::Relaxed);
                    return Ok(());
                }
                if s.blocks.len() as u64 > self.max_resident_blocks {
                    return Ok(());
                }
                (away, s.blocks.clone())
            };
            for (b, h) in away {
                // Room from other sequences only: moving its own blocks down would not
                // bring it back whole.
                if !self.make_room(seq.0, &all)? {
                    return Ok(());
                }
                let guard = self.manager.pin(h, self.config.compute_tier)?;
                // Counted while the pin still holds it there.
                self.note_placement(b, Some(true), Some(seq.0));
                drop(guard);
            }
        }
    }

    /// Makes room for one more block on the compute tier; `Ok(false)` when none can be
    /// had now. At the limit, the count first follows the manager's placement (blocks it
    /// moved on its own). Then the room taken by blocks that only swapped-out idle
    /// sequences hold (left to them by a running holder that finished or went out): such a
    /// sequence is swapped out again, which moves them down and preempts nobody. Then whole
    /// idle running sequences are swapped out, latest started first. With no other
    /// sequence to swap, the calling sequence's own counted blocks (it is claimed by the
    /// caller), oldest first, except `keep` and blocks a running sequence also holds, go
    /// one tier down.
    fn make_room(&self, for_seq: u64, keep: &[u64]) -> KvResult<bool> {
        // Sequences swapped out and own blocks moved by this call (each once: a block the
        // manager left in place must not make it try for ever).
        let mut tried: Vec<u64> = Vec::new();
        let mut tried_blocks: Vec<u64> = Vec::new();
        let mut reconciled = false;
        loop {
            let step = {
                let mut t = self.tables.lock();
                if t.resident_blocks < self.max_resident_blocks {
                    return Ok(true);
                }
                if !reconciled {
                    drop(t);
                    self.reconcile();
                    reconciled = true;
                    continue;
                }
                let idle = |id: &u64, s: &Sequence| {
                    *id != for_seq && !s.busy && !s.swapping && !tried.contains(id)
                };
                let held = held_by_others_in_use(&t.seqs, u64::MAX);
                let left_behind = t
                    .seqs
                    .iter()
                    .filter(|(id, s)| {
                        idle(id, s)
                            && s.swapped
                            && s.blocks.iter().any(|b| {
                                !held.contains(b) && t.blocks.get(b).is_some_and(|m| m.resident)
                            })
                    })
                    .max_by_key(|(_, s)| s.started)
                    .map(|(id, _)| *id);
                let victim = left_behind.or_else(|| {
                    t.seqs
                        .iter()
                        .filter(|(id, s)| idle(id, s) && !s.swapped)
                        .max_by_key(|(_, s)| s.started)
                        .map(|(id, _)| *id)
                });
                match victim {
                    Some(v) => {
                        if let Some(s) = t.seqs.get_mut(&v) {
                            s.swapping = true;
                        }
                        Room::Sequence(v)
                    }
                    None => {
                        let held = held_by_others_in_use(&t.seqs, for_seq);
                        let Tables { seqs, blocks, .. } = &mut *t;
                        let own = seqs.get(&for_seq).and_then(|s| {
                            s.blocks.iter().copied().find(|b| {
                                !keep.contains(b)
                                    && !tried_blocks.contains(b)
                                    && !held.contains(b)
                                    && blocks.get(b).is_some_and(|m| m.resident && !m.leaving)
                            })
                        });
                        let Some(b) = own else {
                            return Ok(false);
                        };
                        let m = blocks.get_mut(&b).expect("found above");
                        m.leaving = true;
                        Room::Own(b, m.handle)
                    }
                }
            };
            match step {
                Room::Sequence(victim) => {
                    tried.push(victim);
                    let r = self.swap_out_claimed(victim);
                    if let Some(s) = self.tables.lock().seqs.get_mut(&victim) {
                        s.swapping = false;
                    }
                    self.swapped_for_room.notify_all();
                    r?;
                }
                Room::Own(b, h) => {
                    tried_blocks.push(b);
                    self.move_down(for_seq, vec![(b, h)])?;
                }
            }
        }
    }

    /// A new empty block at the end of the sequence.
    fn new_block(&self, seq: SeqId) -> KvResult<u64> {
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

    fn handle_of(&self, block: u64) -> KvResult<TensorHandle> {
        self.tables
            .lock()
            .blocks
            .get(&block)
            .map(|m| m.handle)
            .ok_or_else(|| KvError::InvalidConfig(format!("block {block} vanished")))
    }

    /// The manager tensors of the sequence's blocks, in token order (for checks: where each
    /// block lies is [`MemoryManager::residency`]).
    pub fn block_handles(&self, seq: SeqId) -> KvResult<Vec<TensorHandle>> {
        let t = self.tables.lock();
        let s = t.seqs.get(&seq.0).ok_or(KvError::UnknownSequence(seq.0))?;
        Ok(s.blocks
            .iter()
            .filter_map(|b| t.blocks.get(b).map(|m| m.handle))
            .collect())
    }

    /// Checks the pool's invariants; `Err` names the first broken one. The count first
    /// follows the manager's placement (moves the pool did not make), then, exact while no
    /// call is in flight (tests and models call it between operations):
    /// - `resident_blocks` is the number of blocks counted on the compute tier, at most
    ///   [`KvPool::max_resident_blocks`];
    /// - a block's reference count is the number of sequences that hold it;
    /// - a sequence that is not swapped holds only blocks counted on the compute tier;
    /// - no block is marked as being moved down;
    /// - the prefix index points at live sealed blocks under their own hash, and every
    ///   live sealed block's hash is in it (an identical block filled independently is
    ///   kept to take the entry over);
    /// - the manager's placement agrees with the count both ways: a block counted on the
    ///   compute tier has a copy there, and a block not counted there has none.
    pub fn check(&self) -> std::result::Result<(), String> {
        self.reconcile();
        let all: Vec<(u64, TensorHandle, bool)> = {
            let t = self.tables.lock();
            let counted = t.blocks.values().filter(|m| m.resident).count() as u64;
            if counted != t.resident_blocks {
                return Err(format!(
                    "resident_blocks {} != {counted} blocks counted on the compute tier",
                    t.resident_blocks
                ));
            }
            if t.resident_blocks > self.max_resident_blocks {
                return Err(format!(
                    "{} blocks counted on the compute tier, room for {}",
                    t.resident_blocks, self.max_resident_blocks
                ));
            }
            let mut holders: HashMap<u64, u32> = HashMap::new();
            for (id, s) in &t.seqs {
                for b in &s.blocks {
                    *holders.entry(*b).or_insert(0) += 1;
                    let Some(m) = t.blocks.get(b) else {
                        return Err(format!("sequence {id} holds a freed block {b}"));
                    };
                    if !s.swapped && !m.resident {
                        return Err(format!(
                            "sequence {id} is not swapped but its block {b} is not counted on \
                             the compute tier"
                        ));
                    }
                }
            }
            for (b, m) in &t.blocks {
                let n = holders.get(b).copied().unwrap_or(0);
                if n != m.refs {
                    return Err(format!("block {b}: {} references, {n} holders", m.refs));
                }
                if m.leaving {
                    return Err(format!("block {b} is still marked as leaving"));
                }
                if let Some(h) = m.sealed {
                    let indexed = t.prefix.get(&h) == Some(b)
                        || (t.prefix.contains_key(&h)
                            && t.dupes.get(&h).is_some_and(|v| v.contains(b)));
                    if !indexed {
                        return Err(format!(
                            "block {b} is sealed under {h:x} but not reachable from the index"
                        ));
                    }
                }
            }
            for (h, b) in &t.prefix {
                if t.blocks.get(b).and_then(|m| m.sealed) != Some(*h) {
                    return Err(format!(
                        "prefix entry {h:x} points at block {b}, not sealed so"
                    ));
                }
            }
            for (h, v) in &t.dupes {
                for b in v {
                    if t.blocks.get(b).and_then(|m| m.sealed) != Some(*h)
                        || t.prefix.get(h) == Some(b)
                    {
                        return Err(format!(
                            "identical block {b} kept under {h:x} is not a second live block \
                             sealed so"
                        ));
                    }
                }
            }
            t.blocks
                .iter()
                .map(|(b, m)| (*b, m.handle, m.resident))
                .collect()
        };
        let tier = self.config.compute_tier;
        for (b, h, counted) in all {
            let (tiers, _) = self.manager.residency(h).map_err(|e| e.to_string())?;
            match (counted, tiers.contains(&tier)) {
                (true, false) => {
                    return Err(format!(
                        "block {b} is counted on {tier} but not there (on {tiers:?})"
                    ));
                }
                (false, true) => {
                    return Err(format!("block {b} is on {tier} but not counted there"));
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The pool's counters now (the count of blocks on the compute tier first follows the
    /// manager's placement: blocks it moved on its own are not counted).
    pub fn stats(&self) -> KvPoolStats {
        self.reconcile();
        let t = self.tables.lock();
        KvPoolStats {
            sequences: t.seqs.len() as u64,
            blocks: t.blocks.len() as u64,
            shared_blocks: t.blocks.values().filter(|m| m.refs > 1).count() as u64,
            block_refs: t.blocks.values().map(|m| u64::from(m.refs)).sum(),
            resident_blocks: t.resident_blocks,
            prefix_hit_tokens: self.prefix_hit_tokens.load(Ordering::Relaxed),
            swap_outs: self.swap_outs.load(Ordering::Relaxed),
            swap_ins: self.swap_ins.load(Ordering::Relaxed),
        }
    }
}
