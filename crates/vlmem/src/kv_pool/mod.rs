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

mod placement;
mod sequence;
mod swap;

use crate::error::ManagerError;
use crate::manager::{MemoryManager, TensorHandle};
use std::collections::HashMap;
use vlmem_core::sync::atomic::{AtomicU64, Ordering};
use vlmem_core::sync::{Condvar, Mutex};
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
