//! One query token's attention over the KV cache, a chunk of cached tokens at a time.

use crate::error::{Result, RunnerError};

/// Query-key products per step (heads x tokens x head_dim) from which the heads' attention
/// runs on the kernels' pool (below it a fork costs more than it saves).
pub(super) const ATTENTION_FORK_ELEMS: usize = 1 << 16;

/// `a . b` in eight lanes (so the compiler vectorizes it), then the lanes and the tail.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            lanes[i] += x[i] * y[i];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// Tokens of the KV cache the decode step's attention reads into the arena at a time: the
/// arena stays the same size whatever the context (256 tokens are 2 MiB for qwen3-vl-2b). The
/// plan sizes the activation budget with the same chunk.
pub const KV_CHUNK_TOKENS: usize = vlmem_qwen3vl::placement::DECODE_KV_CHUNK_TOKENS as usize;

/// The sizes [`attend_chunked`] works with.
#[derive(Debug, Clone, Copy)]
pub(super) struct AttentionShape {
    pub(super) head_dim: usize,
    /// Query heads per key/value head (GQA).
    pub(super) groups: usize,
    /// Values per cached token: its keys, then its values, `2 * kv_heads * head_dim`.
    pub(super) kv_row: usize,
    pub(super) scale: f32,
}

/// One head of a chunk in [`attend_chunked`]: its index, then its output, its scores over
/// the chunk and its running softmax (maximum, sum).
type HeadViews<'v> = (usize, ((&'v mut [f32], &'v mut [f32]), &'v mut [f32]));

/// The arena views [`attend_chunked`] works in (see [`StepBufs`](super::step::StepBufs)).
pub(super) struct AttentionBufs<'b> {
    pub(super) q: &'b [f32],
    pub(super) cache: &'b mut [f32],
    pub(super) scores: &'b mut [f32],
    pub(super) softmax: &'b mut [f32],
    pub(super) att: &'b mut [f32],
}

/// One query token's attention over `tokens` cached tokens, read [`KV_CHUNK_TOKENS`] at a
/// time into `cache` by `read(start, rows)`: for each query head (its key/value head is
/// `head / groups`), a softmax of the scaled products with the keys, kept as a running
/// maximum and sum across the chunks (the sum and the weighted values rescaled when the
/// maximum grows), then the weighted values divided by the sum, into `att`. With `parallel`
/// the heads of a chunk run on the kernels' pool; each head's arithmetic is the same either
/// way.
pub(super) fn attend_chunked(
    s: AttentionShape,
    tokens: usize,
    mut read: impl FnMut(usize, &mut [f32]) -> Result<()>,
    b: AttentionBufs<'_>,
    parallel: bool,
) -> Result<()> {
    let hd = s.head_dim;
    let half_row = s.kv_row / 2;
    let chunk_max = b.cache.len() / s.kv_row.max(1);
    let heads = b.att.len() / hd.max(1);
    if chunk_max == 0 || b.scores.len() < heads * chunk_max.min(tokens) {
        return Err(RunnerError::BadRequest(format!(
            "attention over {tokens} tokens with room for {chunk_max} at a time"
        )));
    }
    b.att.fill(0.0);
    for ms in b.softmax.chunks_exact_mut(2) {
        ms[0] = f32::NEG_INFINITY;
        ms[1] = 0.0;
    }
    let q = b.q;
    let mut start = 0;
    while start < tokens {
        let n = chunk_max.min(tokens - start);
        let rows = &mut b.cache[..n * s.kv_row];
        read(start, rows)?;
        let cache = &*rows;
        let one = |(head, ((out, scores), ms)): HeadViews<'_>| {
            let g = head / s.groups;
            let qh = &q[head * hd..(head + 1) * hd];
            let mut max = ms[0];
            for (t, sc) in scores.iter_mut().enumerate() {
                *sc = dot(qh, &cache[t * s.kv_row + g * hd..][..hd]) * s.scale;
                max = max.max(*sc);
            }
            // Rescale what the earlier chunks summed to the new maximum (0 on the first).
            let carry = (ms[0] - max).exp();
            let mut sum = ms[1] * carry;
            out.iter_mut().for_each(|o| *o *= carry);
            for (t, sc) in scores.iter().enumerate() {
                let e = (sc - max).exp();
                sum += e;
                let vt = &cache[t * s.kv_row + half_row + g * hd..][..hd];
                for (o, &vv) in out.iter_mut().zip(vt) {
                    *o += e * vv;
                }
            }
            ms[0] = max;
            ms[1] = sum;
        };
        let per_head = b
            .att
            .chunks_mut(hd)
            .zip(b.scores.chunks_mut(n))
            .zip(b.softmax.chunks_exact_mut(2))
            .enumerate();
        if parallel {
            crate::kernels::pool::global().for_each(per_head, one);
        } else {
            per_head.for_each(one);
        }
        start += n;
    }
    for (out, ms) in b.att.chunks_mut(hd).zip(b.softmax.chunks_exact(2)) {
        out.iter_mut().for_each(|o| *o /= ms[1]);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) % 2001) as f32 / 1000.0
                    - 1.0
            })
            .collect()
    }

    #[test]
    fn dot_equals_the_plain_sum() {
        for n in 0..40 {
            let (a, b) = (values(n, 1), values(n, 2));
            let want: f64 = a
                .iter()
                .zip(&b)
                .map(|(x, y)| f64::from(*x) * f64::from(*y))
                .sum();
            assert!((f64::from(dot(&a, &b)) - want).abs() < 1e-5, "n = {n}");
        }
    }

    /// The heads in parallel give the sequential result bit for bit, whatever the chunking
    /// of the cache, and every way matches a plain f64 computation of GQA attention (query
    /// head h reads key/value head h / groups).
    #[test]
    fn attention_matches_a_plain_reference_in_chunks_and_in_parallel() {
        let (nh, nkv, hd, tokens) = (8usize, 2usize, 16usize, 300usize);
        let kv_row = 2 * nkv * hd;
        let shape = AttentionShape {
            head_dim: hd,
            groups: nh / nkv,
            kv_row,
            scale: (hd as f32).powf(-0.5),
        };
        let q = values(nh * hd, 3);
        let all = values(tokens * kv_row, 4);
        let mut runs = Vec::new();
        for (chunk, parallel) in [
            (300, false),
            (300, true),
            (64, false),
            (64, true),
            (1, false),
        ] {
            let mut cache = vec![f32::NAN; chunk * kv_row];
            let mut scores = vec![f32::NAN; nh * chunk];
            let mut softmax = vec![f32::NAN; 2 * nh];
            let mut att = vec![f32::NAN; nh * hd];
            let mut reads = Vec::new();
            attend_chunked(
                shape,
                tokens,
                |start, rows: &mut [f32]| {
                    reads.push((start, rows.len() / kv_row));
                    rows.copy_from_slice(&all[start * kv_row..start * kv_row + rows.len()]);
                    Ok(())
                },
                AttentionBufs {
                    q: &q,
                    cache: &mut cache,
                    scores: &mut scores,
                    softmax: &mut softmax,
                    att: &mut att,
                },
                parallel,
            )
            .unwrap();
            // Every token read once, in order, at most `chunk` at a time.
            assert_eq!(reads.first(), Some(&(0, chunk.min(tokens))));
            assert_eq!(reads.iter().map(|r| r.1).sum::<usize>(), tokens);
            assert!(reads.windows(2).all(|w| w[0].0 + w[0].1 == w[1].0));
            runs.push((chunk, parallel, att));
        }
        for pair in runs.chunks(2).filter(|p| p.len() == 2) {
            assert_eq!(
                pair[0].2, pair[1].2,
                "chunks of {}: parallel differs",
                pair[0].0
            );
        }
        for h in 0..nh {
            let g = h / (nh / nkv);
            let k = |t: usize, d: usize| f64::from(all[t * kv_row + g * hd + d]);
            let v = |t: usize, d: usize| f64::from(all[t * kv_row + nkv * hd + g * hd + d]);
            let s: Vec<f64> = (0..tokens)
                .map(|t| {
                    (0..hd)
                        .map(|d| f64::from(q[h * hd + d]) * k(t, d))
                        .sum::<f64>()
                        / (hd as f64).sqrt()
                })
                .collect();
            let max = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = s.iter().map(|x| (x - max).exp()).collect();
            let z: f64 = e.iter().sum();
            for d in 0..hd {
                let want: f64 = (0..tokens).map(|t| e[t] / z * v(t, d)).sum();
                for (chunk, parallel, att) in &runs {
                    let got = f64::from(att[h * hd + d]);
                    assert!(
                        (got - want).abs() < 1e-5,
                        "chunks of {chunk} (parallel {parallel}), head {h} dim {d}: {got} vs {want}"
                    );
                }
            }
        }
    }
}
