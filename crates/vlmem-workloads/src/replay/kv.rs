//! `kv-growth`: many concurrent requests with growing contexts, KV blocks as manager tensors,
//! and whole-sequence preemption.
//!
//! Each request has a prompt (text plus 0-2 images of Qwen3-VL visual tokens) and decodes a
//! number of tokens. Its KV cache is a list of blocks of 16 tokens (`kv_bytes_per_token` of
//! the model, scaled), each a manager tensor of kind KV cache written token by token (writes
//! land on host). A decode round appends one token to every running sequence and then, as
//! attention would, pins each of its blocks on the device in turn, from 4 worker threads.
//!
//! The scheduler (vLLM's shape) keeps the running set's KV within the device's KV budget:
//! when the next round would not fit, the youngest running sequence is preempted as a whole
//! (it stops being touched, so the manager demotes its blocks, host copies first and then to
//! disk under host pressure); preempted sequences resume first, oldest first, when room
//! frees. Finished sequences have every block checked against what was written, then freed.

use super::{ReplayOptions, pattern, progress_bar, scaled};
use serde::Serialize;
use std::collections::VecDeque;
use std::time::Instant;
use vlmem::policy::trace::SplitMix64;
use vlmem::{MemoryManager, Result, TensorHandle, TensorKind, Tier};
use vlmem_qwen3vl::config::Qwen3VlConfig;
use vlmem_qwen3vl::math::{image_cost, kv_bytes_per_token};

/// Tokens per KV block.
pub const BLOCK_TOKENS: u64 = 16;

/// What the KV workload measured.
#[derive(Debug, Clone, Serialize)]
pub struct KvReport {
    /// Requests served.
    pub requests: usize,
    /// Bytes of one block (16 tokens), scaled.
    pub block_bytes: u64,
    /// The KV device budget the scheduler keeps the running set within.
    pub device_budget_bytes: u64,
    /// Prompt tokens written (prefill).
    pub prompt_tokens: u64,
    /// Tokens decoded.
    pub tokens_generated: u64,
    /// Seconds.
    pub wall_s: f64,
    /// `tokens_generated / wall_s`.
    pub tokens_per_s: f64,
    /// Whole sequences preempted.
    pub preemptions: u64,
    /// Preempted sequences resumed.
    pub resumes: u64,
    /// Most sequences running at once.
    pub peak_running: usize,
    /// Block pins on the device that found the block there.
    pub device_hits: u64,
    /// Block pins that brought it (from host or disk).
    pub device_misses: u64,
    /// `device_hits / (device_hits + device_misses)`.
    pub device_hit_ratio: f64,
    /// Decode-round latency, median and 99th percentile.
    pub round_p50_s: f64,
    /// See `round_p50_s`.
    pub round_p99_s: f64,
    /// Blocks checked at completion.
    pub checksums_verified: u64,
    /// Of those, mismatches (must be 0).
    pub checksum_failures: u64,
}

struct Seq {
    id: u64,
    prompt: u64,
    decode: u64,
    tokens: u64,
    blocks: Vec<TensorHandle>,
}

impl Seq {
    /// Blocks after the next round.
    fn next_blocks(&self) -> u64 {
        (self.tokens + 1).div_ceil(BLOCK_TOKENS)
    }
    fn done(&self) -> bool {
        self.tokens >= self.prompt + self.decode
    }
}

fn token_seed(seq: u64, token: u64) -> u64 {
    (seq << 32) ^ token ^ 0x4b56_0000_0000_0000
}

fn token_bytes(seq: u64, token: u64, len: usize) -> Vec<u8> {
    pattern(token_seed(seq, token), len)
}

/// Writes tokens `from..to` of `s` (allocating blocks as needed).
fn append(m: &MemoryManager, s: &mut Seq, to: u64, block_bytes: u64) -> Result<()> {
    let tb = (block_bytes / BLOCK_TOKENS) as usize;
    while s.tokens < to {
        let b = s.tokens / BLOCK_TOKENS;
        if b as usize >= s.blocks.len() {
            s.blocks
                .push(m.allocate(block_bytes, TensorKind::KvCache, (s.id << 20) | b)?);
        }
        // Whole runs of tokens into one block at once.
        let end = to.min((b + 1) * BLOCK_TOKENS);
        let mut buf = Vec::with_capacity((end - s.tokens) as usize * tb);
        for t in s.tokens..end {
            buf.extend_from_slice(&token_bytes(s.id, t, tb));
        }
        m.write(
            s.blocks[b as usize],
            (s.tokens % BLOCK_TOKENS) * tb as u64,
            &buf,
        )?;
        s.tokens = end;
    }
    Ok(())
}

/// One decode round for `s`: a token, then every block pinned on the device in turn.
fn decode_one(m: &MemoryManager, s: &mut Seq, block_bytes: u64) -> Result<(u64, u64)> {
    append(m, s, s.tokens + 1, block_bytes)?;
    let (mut hits, mut misses) = (0, 0);
    for &h in &s.blocks {
        if m.residency(h)?.0.first() == Some(&Tier::Device) {
            hits += 1;
        } else {
            misses += 1;
        }
        let g = m.pin(h, Tier::Device)?;
        // Attention runs on the device: read back one byte only (device reads cost link time).
        let mut b = [0u8; 1];
        g.read(0, &mut b)?;
        std::hint::black_box(b);
    }
    Ok((hits, misses))
}

/// Checks every block of a finished sequence; returns (checked, failed).
fn verify(m: &MemoryManager, s: &Seq, block_bytes: u64) -> Result<(u64, u64)> {
    let tb = (block_bytes / BLOCK_TOKENS) as usize;
    let mut buf = vec![0u8; block_bytes as usize];
    let mut bad = 0;
    for (b, &h) in s.blocks.iter().enumerate() {
        m.read(h, 0, &mut buf)?;
        let first = b as u64 * BLOCK_TOKENS;
        let last = s.tokens.min(first + BLOCK_TOKENS);
        let ok = (first..last).all(|t| {
            let o = ((t - first) as usize) * tb;
            buf[o..o + tb] == token_bytes(s.id, t, tb)[..]
        });
        if !ok {
            bad += 1;
        }
    }
    Ok((s.blocks.len() as u64, bad))
}

pub(crate) fn run(
    m: &MemoryManager,
    cfg: &Qwen3VlConfig,
    opts: &ReplayOptions,
) -> Result<KvReport> {
    let started = Instant::now();
    let block_bytes = scaled(kv_bytes_per_token(cfg, 2) * BLOCK_TOKENS, opts.scale, 4096)
        .div_ceil(BLOCK_TOKENS * 256)
        * BLOCK_TOKENS
        * 256;
    let budget = m.stats().budgets.get(Tier::Device, TensorKind::KvCache);
    let max_blocks = (budget / block_bytes).max(1);
    let (requests, prompt_max, decode_max) = if opts.quick {
        (12, 512u64, 48u64)
    } else {
        (48, 1536, 192)
    };
    // Requests: text 64..prompt_max tokens plus 0-2 images of 448x448 to 1024x1024 pixels.
    let mut rng = SplitMix64::new(opts.seed ^ 0x4b56);
    let sides = [448u64, 640, 896, 1024];
    let mut waiting: VecDeque<Seq> = (0..requests as u64)
        .map(|id| {
            let mut prompt = rng.range(64, prompt_max);
            for _ in 0..rng.range(0, 2) {
                let side = sides[rng.range(0, 3) as usize];
                prompt += image_cost(cfg, side, side, 2)
                    .map(|c| c.tokens)
                    .unwrap_or(256);
            }
            // Every sequence must fit the device budget on its own.
            let decode = rng.range(decode_max / 4, decode_max);
            let cap = max_blocks * BLOCK_TOKENS - 1;
            let prompt = prompt.min(cap.saturating_sub(decode).max(1));
            let decode = decode.min(cap - prompt);
            Seq {
                id,
                prompt,
                decode,
                tokens: 0,
                blocks: Vec::new(),
            }
        })
        .collect();
    let mut running: Vec<Seq> = Vec::new();
    let mut preempted: VecDeque<Seq> = VecDeque::new();
    let mut report = KvReport {
        requests,
        block_bytes,
        device_budget_bytes: budget,
        prompt_tokens: 0,
        tokens_generated: 0,
        wall_s: 0.0,
        tokens_per_s: 0.0,
        preemptions: 0,
        resumes: 0,
        peak_running: 0,
        device_hits: 0,
        device_misses: 0,
        device_hit_ratio: 0.0,
        round_p50_s: 0.0,
        round_p99_s: 0.0,
        checksums_verified: 0,
        checksum_failures: 0,
    };
    let total_tokens: u64 = waiting.iter().map(|s| s.decode).sum();
    let bar = progress_bar(opts, total_tokens, "kv-growth");
    let mut rounds = Vec::new();
    let workers = 4;
    while !(waiting.is_empty() && running.is_empty() && preempted.is_empty()) {
        // Admit: preempted first (oldest first), then new requests, while the next round fits.
        let mut used: u64 = running.iter().map(Seq::next_blocks).sum();
        loop {
            let from_preempted = !preempted.is_empty();
            let Some(next) = preempted.front().or(waiting.front()) else {
                break;
            };
            let need = next
                .next_blocks()
                .max((next.prompt + 1).div_ceil(BLOCK_TOKENS));
            if used + need > max_blocks {
                break;
            }
            let mut s = if from_preempted {
                report.resumes += 1;
                preempted.pop_front()
            } else {
                waiting.pop_front()
            }
            .ok_or_else(|| vlmem::ManagerError::InvalidConfig("queue emptied".into()))?;
            if s.tokens == 0 {
                let prompt = s.prompt;
                append(m, &mut s, prompt, block_bytes)?;
                report.prompt_tokens += s.prompt;
            }
            used += s.next_blocks();
            running.push(s);
        }
        // Preempt the youngest while the round would not fit.
        while used > max_blocks && running.len() > 1 {
            let youngest = running
                .iter()
                .enumerate()
                .max_by_key(|(_, s)| s.id)
                .map(|(i, _)| i)
                .unwrap_or(0);
            let s = running.swap_remove(youngest);
            used -= s.next_blocks();
            report.preemptions += 1;
            preempted.push_back(s);
            preempted.make_contiguous().sort_by_key(|s| s.id);
        }
        if running.is_empty() {
            break;
        }
        report.peak_running = report.peak_running.max(running.len());
        // One decode round from the workers.
        let t0 = Instant::now();
        let per = running.len().div_ceil(workers);
        let results: Vec<Result<(u64, u64)>> = std::thread::scope(|sc| {
            let hs: Vec<_> = running
                .chunks_mut(per)
                .map(|chunk| {
                    sc.spawn(move || {
                        let mut acc = (0, 0);
                        for s in chunk {
                            let (h, mi) = decode_one(m, s, block_bytes)?;
                            acc.0 += h;
                            acc.1 += mi;
                        }
                        Ok(acc)
                    })
                })
                .collect();
            hs.into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(vlmem::ManagerError::InvalidConfig(
                            "kv worker panicked".into(),
                        ))
                    })
                })
                .collect()
        });
        for r in results {
            let (h, mi) = r?;
            report.device_hits += h;
            report.device_misses += mi;
        }
        rounds.push(t0.elapsed().as_secs_f64());
        report.tokens_generated += running.len() as u64;
        bar.inc(running.len() as u64);
        // Finish.
        let mut i = 0;
        while i < running.len() {
            if running[i].done() {
                let s = running.swap_remove(i);
                let (v, f) = verify(m, &s, block_bytes)?;
                report.checksums_verified += v;
                report.checksum_failures += f;
                for h in s.blocks {
                    m.deallocate(h)?;
                }
            } else {
                i += 1;
            }
        }
        // Keep the round order stable (oldest first).
        running.sort_by_key(|s| s.id);
    }
    bar.finish_and_clear();
    report.wall_s = started.elapsed().as_secs_f64();
    report.tokens_per_s = report.tokens_generated as f64 / report.wall_s.max(1e-9);
    let n = report.device_hits + report.device_misses;
    report.device_hit_ratio = if n == 0 {
        0.0
    } else {
        report.device_hits as f64 / n as f64
    };
    rounds.sort_by(f64::total_cmp);
    if !rounds.is_empty() {
        let q = |p: f64| rounds[((rounds.len() - 1) as f64 * p).round() as usize];
        report.round_p50_s = q(0.5);
        report.round_p99_s = q(0.99);
    }
    Ok(report)
}
