//! `image-cache`: Zipf-distributed repeated images through the vision cache.

use super::{ReplayOptions, pattern, progress_bar, scaled};
use serde::Serialize;
use std::collections::HashMap;
use std::time::Instant;
use vlmem::policy::trace::{SplitMix64, zipf};
use vlmem::policy::{Access, HitStats, PolicyKind, simulate};
use vlmem::vision_cache::{ImageKey, VisionCache};
use vlmem::{MemoryManager, Result, TensorKind, Tier};
use vlmem_qwen3vl::config::Qwen3VlConfig;
use vlmem_qwen3vl::math::image_cost;

/// Zipf exponent of image popularity.
pub const ZIPF_S: f64 = 1.0;

/// What the image workload measured.
#[derive(Debug, Clone, Serialize)]
pub struct ImageReport {
    /// Distinct images.
    pub distinct_images: usize,
    /// Lookups.
    pub lookups: usize,
    /// Zipf exponent.
    pub zipf_s: f64,
    /// The cache's byte budget (the simulations' capacity).
    pub budget_bytes: u64,
    /// Bytes of every distinct embedding together.
    pub working_set_bytes: u64,
    /// Lookups served from the cache (vision tower skipped).
    pub hits: u64,
    /// Lookups that ran the (fake) vision tower.
    pub misses: u64,
    /// `hits / lookups`.
    pub hit_ratio: f64,
    /// Belady's OPT on the same trace and capacity (variable sizes: farthest-next-use).
    pub opt: HitStats,
    /// LRU on the same trace.
    pub lru: HitStats,
    /// S3-FIFO simulated on the same trace (the cache's own policy, as a cross-check).
    pub s3fifo_sim: HitStats,
    /// The static oracle: the embeddings with the most uses per byte in the whole trace kept
    /// from the start (only first uses miss). Under independent Zipf draws no online policy
    /// does much better; OPT does, by knowing when each image comes back.
    pub static_oracle: HitStats,
    /// Evictions.
    pub evictions: u64,
    /// The most bytes the cache held (never above the budget).
    pub peak_resident_bytes: u64,
    /// Seconds.
    pub wall_s: f64,
    /// Cached embeddings checked at the end.
    pub checksums_verified: u64,
    /// Of those, mismatches (must be 0).
    pub checksum_failures: u64,
}

fn image_bytes(id: u64) -> Vec<u8> {
    let mut v = format!("image-{id}:").into_bytes();
    v.extend_from_slice(&pattern(id ^ 0x1a6e, 1024));
    v
}

fn embed_seed(id: u64) -> u64 {
    id.wrapping_mul(0x2545_f491_4f6c_dd1d) ^ 0x0e6b_edd1
}

/// Keeps the objects with the most uses per byte (greedy knapsack) from the start.
fn static_oracle(trace: &[Access], sizes: &[u64], budget: u64) -> HitStats {
    let mut uses = vec![0u64; sizes.len()];
    for a in trace {
        uses[a.key as usize] += 1;
    }
    let mut order: Vec<usize> = (0..sizes.len()).collect();
    order.sort_by(|&a, &b| {
        (uses[b] as f64 / sizes[b] as f64).total_cmp(&(uses[a] as f64 / sizes[a] as f64))
    });
    let mut kept = vec![false; sizes.len()];
    let mut used = 0;
    for i in order {
        if uses[i] > 0 && used + sizes[i] <= budget {
            used += sizes[i];
            kept[i] = true;
        }
    }
    let mut seen = vec![false; sizes.len()];
    let mut s = HitStats::default();
    for a in trace {
        let k = a.key as usize;
        s.record(kept[k] && seen[k], a.bytes);
        seen[k] = true;
    }
    s
}

pub(crate) fn run(
    m: &MemoryManager,
    cfg: &Qwen3VlConfig,
    opts: &ReplayOptions,
) -> Result<ImageReport> {
    let started = Instant::now();
    // The same 2,000 images in both (the budget stays ~6% of the working set); fewer lookups
    // when quick.
    let (distinct, lookups) = if opts.quick {
        (2_000, 8_000)
    } else {
        (2_000, 40_000)
    };
    // Each image's merged embedding plus its DeepStack features, bf16, scaled.
    let mut rng = SplitMix64::new(opts.seed ^ 0x1a6e);
    let shapes = [
        (448u64, 448u64),
        (640, 480),
        (896, 896),
        (1024, 1024),
        (1280, 720),
    ];
    let sizes: Vec<u64> = (0..distinct)
        .map(|_| {
            let (w, h) = shapes[rng.range(0, shapes.len() as u64 - 1) as usize];
            let c = image_cost(cfg, w, h, 2).map(|c| c.embeds_bytes + c.deepstack_bytes);
            scaled(c.unwrap_or(8 << 20), opts.scale, 4096)
        })
        .collect();
    let working_set_bytes: u64 = sizes.iter().sum();
    let budget = m
        .stats()
        .budgets
        .get(Tier::Host, TensorKind::VisionEmbedding);
    let trace: Vec<Access> = zipf(&sizes, ZIPF_S, lookups, opts.seed ^ 0x2a6e);
    let opt = simulate(PolicyKind::Belady, &trace, budget);
    let lru = simulate(PolicyKind::Lru, &trace, budget);
    let s3fifo_sim = simulate(PolicyKind::S3Fifo, &trace, budget);
    let static_oracle = static_oracle(&trace, &sizes, budget);

    let ns = format!("{}/bf16/deepstack", opts.model);
    let cache = VisionCache::new(m.clone(), &ns, budget);
    let mut ids: HashMap<ImageKey, u64> = HashMap::new();
    let bar = progress_bar(opts, lookups as u64, "image-cache");
    for (n, a) in trace.iter().enumerate() {
        let img = image_bytes(a.key);
        ids.entry(cache.key_of(&img)).or_insert(a.key);
        let (e, _) =
            cache.get_or_insert_with(&img, || pattern(embed_seed(a.key), a.bytes as usize))?;
        drop(e);
        if n % 256 == 0 {
            bar.set_position(n as u64);
        }
    }
    bar.finish_and_clear();
    let s = cache.stats();
    let mut verified = 0;
    let mut failures = 0;
    for e in cache.entries() {
        verified += 1;
        let ok = ids
            .get(&e.key())
            .map(|&id| {
                e.to_vec()
                    .map(|v| v == pattern(embed_seed(id), sizes[id as usize] as usize))
            })
            .transpose()?
            .unwrap_or(false);
        if !ok {
            failures += 1;
        }
    }
    cache.clear();
    Ok(ImageReport {
        distinct_images: distinct,
        lookups,
        zipf_s: ZIPF_S,
        budget_bytes: budget,
        working_set_bytes,
        hits: s.hits,
        misses: s.misses,
        hit_ratio: s.hits as f64 / lookups as f64,
        opt,
        lru,
        s3fifo_sim,
        static_oracle,
        evictions: s.evictions,
        peak_resident_bytes: s.peak_resident_bytes,
        wall_s: started.elapsed().as_secs_f64(),
        checksums_verified: verified,
        checksum_failures: failures,
    })
}
