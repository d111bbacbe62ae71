//! Trace generators: a deterministic random source, Zipf popularity, cyclic scans.

use super::Access;
use std::collections::HashSet;

/// SplitMix64: a small, fast, deterministic random source (same seed, same stream, on every
/// platform).
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A stream from `seed`.
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in [lo, hi] (inclusive; `lo` if `hi < lo`).
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        if hi <= lo {
            return lo;
        }
        lo + self.next_u64() % (hi - lo + 1)
    }
}

/// Zipf(s) over ranks `0..n` (rank 0 most popular): P(rank r) ∝ 1 / (r + 1)^s.
#[derive(Debug, Clone)]
pub struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    /// The distribution over `n >= 1` ranks with exponent `s >= 0`.
    pub fn new(n: usize, s: f64) -> Self {
        let n = n.max(1);
        let mut cdf = Vec::with_capacity(n);
        let mut total = 0.0;
        for r in 0..n {
            total += 1.0 / ((r + 1) as f64).powf(s);
            cdf.push(total);
        }
        for c in &mut cdf {
            *c /= total;
        }
        Zipf { cdf }
    }

    /// A rank.
    pub fn sample(&self, rng: &mut SplitMix64) -> usize {
        let u = rng.next_f64();
        self.cdf
            .partition_point(|&c| c <= u)
            .min(self.cdf.len() - 1)
    }
}

/// `passes` scans of `sizes` in order: key i has `sizes[i]` bytes.
pub fn cyclic(sizes: &[u64], passes: usize) -> Vec<Access> {
    let mut t = Vec::with_capacity(sizes.len() * passes);
    for _ in 0..passes {
        t.extend(
            sizes
                .iter()
                .enumerate()
                .map(|(k, &b)| Access::new(k as u64, b)),
        );
    }
    t
}

/// `len` Zipf(s) draws over `sizes.len()` objects; ranks are shuffled onto keys by a fixed
/// permutation so popularity and key order are unrelated.
pub fn zipf(sizes: &[u64], s: f64, len: usize, seed: u64) -> Vec<Access> {
    let mut rng = SplitMix64::new(seed);
    let z = Zipf::new(sizes.len(), s);
    let mut perm: Vec<usize> = (0..sizes.len()).collect();
    for i in (1..perm.len()).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        perm.swap(i, j);
    }
    (0..len)
        .map(|_| {
            let k = perm[z.sample(&mut rng)];
            Access::new(k as u64, sizes[k])
        })
        .collect()
}

/// Each key once, in the order of its first use.
pub fn first_uses(trace: &[Access]) -> Vec<Access> {
    let mut seen = HashSet::new();
    trace
        .iter()
        .copied()
        .filter(|a| seen.insert(a.key))
        .collect()
}
