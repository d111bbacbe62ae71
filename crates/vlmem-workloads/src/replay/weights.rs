//! `weights-stream`: decode steps over every decoder weight in layer order, with a device
//! budget smaller than the model.

use super::{ReplayOptions, fill, pattern, progress_bar, scaled, tempdir::TempDir};
use serde::Serialize;
use std::io::Write as _;
use std::path::Path;
use std::time::Instant;
use vlmem::policy::{Access, HitStats, PolicyKind, simulate};
use vlmem::{ManagerConfig, ManagerError, MemoryManager, Result, TensorHandle, TensorKind, Tier};
use vlmem_qwen3vl::config::Qwen3VlConfig;
use vlmem_qwen3vl::tensors::{Dtype, TensorClass, expected_tensors};

/// What the weights stream measured.
#[derive(Debug, Clone, Serialize)]
pub struct WeightsReport {
    /// Where the weights start: "host" (they fit the host budget) or "disk" (checkpoint
    /// extents read in place with O_DIRECT).
    pub source: String,
    /// Bytes of the streamed weights (decoder layers, final norm, lm_head), scaled.
    pub model_bytes: u64,
    /// Chunks the stream is cut into (each a manager tensor).
    pub chunks: usize,
    /// Bytes of a chunk (the last may be smaller).
    pub chunk_bytes: u64,
    /// Decode steps.
    pub steps: usize,
    /// Chunks prefetched ahead.
    pub lookahead: usize,
    /// Chunks of the pinned prefix (0 when the plan is left to the eviction policy alone).
    pub pinned_prefix_chunks: usize,
    /// The weights' device budget (the cache capacity of the simulations).
    pub device_budget_bytes: u64,
    /// Pins (one per chunk per step).
    pub accesses: u64,
    /// Chunks brought to the device (demand misses and prefetches; each one a load).
    pub loads: u64,
    /// `1 - loads / accesses`: comparable with OPT's hit ratio.
    pub hit_ratio: f64,
    /// Whether `loads` counts every move into the device (the manager's counters, when the
    /// workload runs alone) or only demand misses (`mixed`, where prefetched loads cannot be
    /// told apart from the other workloads' moves).
    pub loads_exact: bool,
    /// Pins that found the chunk on the device already (prefetched or kept).
    pub demand_hits: u64,
    /// `demand_hits / accesses`.
    pub demand_hit_ratio: f64,
    /// Belady's MIN on the same trace and capacity, as demand paging (every chunk must be on
    /// the device to be computed on, so none bypasses it): the reference.
    pub opt: HitStats,
    /// OPT with bypass (an unreachable bound for a device: it never loads the chunks it
    /// declines to keep).
    pub opt_bypass: HitStats,
    /// The pinned-prefix plan with the same lookahead.
    pub planned: HitStats,
    /// LRU on the same trace.
    pub lru: HitStats,
    /// Bytes brought to the device per step after the first.
    pub bytes_loaded_per_step: f64,
    /// Of those, bytes read from disk.
    pub bytes_from_disk_per_step: f64,
    /// Seconds per decode step (mean of the steps after the first).
    pub step_s: f64,
    /// The bandwidth bound of a step: max(bytes over the link / link bandwidth, bytes from
    /// disk / disk bandwidth), both bandwidths measured in this run.
    pub bound_step_s: f64,
    /// `step_s / bound_step_s`.
    pub step_over_bound: f64,
    /// Measured host-to-device bandwidth (one large move through a manager of the same
    /// configuration), GB/s.
    pub link_gbps: f64,
    /// Measured disk-to-host bandwidth of the extents (0 when the weights start on host).
    pub disk_gbps: f64,
    /// Time the decode loop waited in `pin` per step after the first (the stall a compute
    /// stream would see).
    pub stall_s_per_step: f64,
    /// Chunks whose bytes were checked at the end.
    pub checksums_verified: u64,
    /// Of those, mismatches (must be 0).
    pub checksum_failures: u64,
}

/// The streamed bytes of a decode step: every decoder-layer tensor in order, the final norm,
/// and lm_head (the embedding when tied). The input embedding is a row gather, kept on host.
pub fn stream_bytes(cfg: &Qwen3VlConfig) -> u64 {
    let ts = expected_tensors(cfg, Dtype::BF16);
    let has_head = ts.iter().any(|t| t.class == TensorClass::LmHead);
    ts.iter()
        .filter(|t| {
            (t.layer.is_some() && !t.class.is_vision())
                || (t.class == TensorClass::Norm && t.layer.is_none() && !t.class.is_vision())
                || t.class == TensorClass::LmHead
                || (!has_head && t.class == TensorClass::Embedding)
        })
        .map(|t| t.bytes())
        .sum()
}

fn chunk_seed(seed: u64, i: usize) -> u64 {
    seed ^ 0x5745_4947_4854_0000 ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// The calibration figures: host-to-device and disk-to-host bandwidth, with one large move
/// each through a manager of the same configuration.
fn calibrate(
    c: &ManagerConfig,
    weights_file: Option<&Path>,
    quick: bool,
    dir: &Path,
) -> Result<(f64, f64)> {
    let mut cc = c.clone();
    for t in Tier::ALL {
        for k in TensorKind::ALL {
            cc.budgets.bytes[t.index()][k.index()] =
                [c.device_bytes, c.host_bytes, c.disk_bytes][t.index()];
        }
    }
    let sub = TempDir::new(Some(dir))?;
    cc.disk.dir = Some(sub.path().join("swap"));
    let m = MemoryManager::new(cc)?;
    let size = (c.device_bytes / 2).min(if quick { 8 << 20 } else { 16 << 20 });
    // The best of several rounds: on a shared machine the least disturbed one is the link.
    let rounds = if quick { 3 } else { 8 };
    let h = m.allocate(size, TensorKind::Scratch, 1)?;
    m.write(h, 0, &pattern(1, size as usize))?;
    let mut link = 0.0f64;
    for _ in 0..rounds {
        let t0 = Instant::now();
        let g = m.pin(h, Tier::Device)?;
        let s = t0.elapsed().as_secs_f64();
        drop(g);
        link = link.max(size as f64 / s / 1e9);
        m.evict(Tier::Device, u64::MAX)?;
    }
    m.deallocate(h)?;
    let mut disk = 0.0f64;
    if let Some(path) = weights_file {
        let len = std::fs::metadata(path).map(|md| md.len()).unwrap_or(0);
        let size = len.min(size).min(c.host_bytes / 2);
        if size > 0 {
            let e = m.register_extent(path, 0, size, TensorKind::Weight, 2)?;
            for _ in 0..rounds {
                let t0 = Instant::now();
                let g = m.pin(e, Tier::Host)?;
                let s = t0.elapsed().as_secs_f64();
                drop(g);
                disk = disk.max(size as f64 / s / 1e9);
                m.evict(Tier::Host, u64::MAX)?;
            }
            m.deallocate(e)?;
        }
    }
    drop(m);
    drop(sub);
    Ok((link, disk))
}

/// Pins on the device, retrying while the only evictable chunks are still being moved (the
/// manager answers OutOfMemory at once when every other chunk is pinned or busy; busy ones
/// free up when their move lands).
fn pin_retrying(m: &MemoryManager, h: TensorHandle) -> Result<vlmem::PinGuard> {
    let mut tries = 0;
    loop {
        match m.pin(h, Tier::Device) {
            Err(ManagerError::OutOfMemory { .. }) if tries < 1000 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_micros(50));
            }
            r => return r,
        }
    }
}

pub(crate) fn run(
    m: &MemoryManager,
    c: &ManagerConfig,
    cfg: &Qwen3VlConfig,
    opts: &ReplayOptions,
    dir: &Path,
    exclusive: bool,
) -> Result<WeightsReport> {
    let model_bytes = scaled(stream_bytes(cfg), opts.scale, 1 << 20);
    let chunk_bytes = scaled(opts.chunk_bytes, opts.scale, 4096);
    let n = model_bytes.div_ceil(chunk_bytes) as usize;
    let sizes: Vec<u64> = (0..n)
        .map(|i| chunk_bytes.min(model_bytes - i as u64 * chunk_bytes))
        .collect();
    let steps = opts.steps.unwrap_or(if opts.quick { 6 } else { 48 }).max(2);
    let lookahead = opts.lookahead;
    let host_budget = c.budgets.get(Tier::Host, TensorKind::Weight);
    let device_budget = c.budgets.get(Tier::Device, TensorKind::Weight);
    let seed = opts.seed;

    // Place the weights: on host if they fit its budget, else as extents of a file.
    let on_host = model_bytes <= host_budget;
    let mut handles: Vec<TensorHandle> = Vec::with_capacity(n);
    let mut weights_file = None;
    if on_host {
        let mut buf = vec![0u8; chunk_bytes as usize];
        for (i, &len) in sizes.iter().enumerate() {
            let h = m.allocate(len, TensorKind::Weight, i as u64)?;
            let b = &mut buf[..len as usize];
            fill(chunk_seed(seed, i), b);
            m.write(h, 0, b)?;
            handles.push(h);
        }
    } else {
        let path = dir.join("weights.bin");
        {
            let f = std::fs::File::create(&path).map_err(|e| {
                ManagerError::InvalidConfig(format!("cannot create {}: {e}", path.display()))
            })?;
            let mut w = std::io::BufWriter::new(f);
            let mut buf = vec![0u8; chunk_bytes as usize];
            for (i, &len) in sizes.iter().enumerate() {
                let b = &mut buf[..len as usize];
                fill(chunk_seed(seed, i), b);
                w.write_all(b)
                    .map_err(|e| ManagerError::InvalidConfig(e.to_string()))?;
            }
            w.flush()
                .map_err(|e| ManagerError::InvalidConfig(e.to_string()))?;
        }
        let mut off = 0;
        for (i, &len) in sizes.iter().enumerate() {
            handles.push(m.register_extent(&path, off, len, TensorKind::Weight, i as u64)?);
            off += len;
        }
        weights_file = Some(path);
    }
    let (link_gbps, disk_gbps) = calibrate(c, weights_file.as_deref(), opts.quick, dir)?;

    // The trace and the simulations on it.
    let trace: Vec<Access> = (0..steps)
        .flat_map(|_| {
            sizes
                .iter()
                .enumerate()
                .map(|(i, &b)| Access::new(i as u64, b))
        })
        .collect();
    let opt = simulate(PolicyKind::BeladyDemand, &trace, device_budget);
    let opt_bypass = simulate(PolicyKind::Belady, &trace, device_budget);
    let planned = simulate(
        PolicyKind::PlannedStream { lookahead },
        &trace,
        device_budget,
    );
    let lru = simulate(PolicyKind::Lru, &trace, device_budget);

    // The run: the manager has the plan; each pin is preceded by a prefetch hint
    // `lookahead` chunks ahead. (A long-lived worker that pins ahead instead would move the
    // plan's cursor, which tracks the last pin, past chunks not yet used, and the weights
    // policy would then evict exactly those.)
    m.set_access_plan(&handles);
    let bar = progress_bar(opts, steps as u64, "weights-stream");
    let mut demand_hits = 0u64;
    let mut demand_missed_bytes = 0u64;
    let mut step_times = Vec::with_capacity(steps);
    let mut stall_ns = 0u128;
    let mut stall_ns_first = 0u128;
    let c0 = m.stats().counters;
    let mut c1 = c0.clone();
    let mut missed_after_first = 0u64;
    let mut checksum_touch = 0u8;
    let total = steps * n;
    // The plan: the longest prefix that fits beside a staging ring of `2 (lookahead + 1)`
    // chunks (half of it slack for hints that land late) stays pinned from its first use to the end; the rest streams, and
    // the manager's weights policy (farthest next use) only ever evicts streamed chunks.
    let ring = 2 * (lookahead as u64 + 1);
    let prefix = if opts.pin_prefix {
        let room = device_budget.saturating_sub(ring * chunk_bytes);
        sizes
            .iter()
            .scan(0u64, |acc, &b| {
                *acc += b;
                Some(*acc)
            })
            .take_while(|&acc| acc <= room)
            .count()
    } else {
        0
    };
    let mut pinned: Vec<vlmem::PinGuard> = Vec::with_capacity(prefix);
    // `hints_in_flight` hints at a time (default one), none for chunks already on the
    // device: concurrent evictions pick the same farthest victim, and the loser then evicts
    // the next farthest (a chunk the plan keeps), which erodes the kept set.
    let mut next_hint = 1usize;
    let mut in_flight: std::collections::VecDeque<usize> = Default::default();
    let max_in_flight = opts.hints_in_flight.max(1);
    let on_device =
        |j: usize| -> Result<bool> { Ok(m.residency(handles[j % n])?.0.contains(&Tier::Device)) };
    for step in 0..steps {
        if step == 1 {
            c1 = m.stats().counters;
            missed_after_first = demand_missed_bytes;
            stall_ns_first = stall_ns;
        }
        let t0 = Instant::now();
        for i in 0..n {
            let a = step * n + i;
            while lookahead > 0 && next_hint <= a + lookahead && next_hint < total {
                // The previous hint must have landed (a hint whose thread starts after its
                // chunk was used and evicted would load it again for nothing), unless the
                // decode loop is well past it.
                while let Some(&f) = in_flight.front() {
                    if a >= f + 4 || on_device(f)? {
                        in_flight.pop_front();
                    } else {
                        break;
                    }
                }
                if in_flight.len() >= max_in_flight {
                    break;
                }
                let j = next_hint;
                next_hint += 1;
                if j <= a || on_device(j)? {
                    continue;
                }
                m.prefetch(handles[j % n], Tier::Device);
                in_flight.push_back(j);
            }
            let h = handles[i];
            if m.residency(h)?.0.contains(&Tier::Device) {
                demand_hits += 1;
            } else {
                demand_missed_bytes += sizes[i];
            }
            let tp = Instant::now();
            let g = pin_retrying(m, h)?;
            stall_ns += tp.elapsed().as_nanos();
            // "Compute" happens on the device: read back only the first and last bytes (a
            // read from the simulated device is charged to its link like a real D2H copy).
            let mut b = [0u8; 1];
            g.read(0, &mut b)?;
            checksum_touch ^= b[0];
            g.read(sizes[i] - 1, &mut b)?;
            checksum_touch ^= b[0];
            if step == 0 && i < prefix {
                pinned.push(g);
            } else {
                drop(g);
            }
        }
        step_times.push(t0.elapsed().as_secs_f64());
        bar.inc(1);
    }
    bar.finish_and_clear();
    std::hint::black_box(checksum_touch);
    // Let the last prefetch hints land before the counters are read.
    std::thread::sleep(std::time::Duration::from_millis(20));
    drop(pinned);
    let c2 = m.stats().counters;
    let d = Tier::Device.index();
    let accesses = (steps * n) as u64;
    let (loads, bytes_after_first) = if exclusive {
        (
            c2.misses[d] - c0.misses[d],
            (c2.bytes_in[d] - c1.bytes_in[d]) as f64,
        )
    } else {
        // Shared counters: prefetched loads cannot be told apart from the other workloads'
        // moves, so only demand misses count (the hit ratio is then the demand hit ratio).
        (
            accesses - demand_hits,
            (demand_missed_bytes - missed_after_first) as f64,
        )
    };
    let later = (steps - 1) as f64;
    let bytes_loaded_per_step = bytes_after_first / later;
    let bytes_from_disk_per_step = if on_host { 0.0 } else { bytes_loaded_per_step };
    let step_s = step_times[1..].iter().sum::<f64>() / later;
    let t_link = if link_gbps > 0.0 {
        bytes_loaded_per_step / (link_gbps * 1e9)
    } else {
        0.0
    };
    let t_disk = if disk_gbps > 0.0 {
        bytes_from_disk_per_step / (disk_gbps * 1e9)
    } else {
        0.0
    };
    let bound_step_s = t_link.max(t_disk);
    let stall_s_per_step = (stall_ns - stall_ns_first) as f64 / 1e9 / later;

    // Every chunk's bytes, checked.
    let mut verified = 0;
    let mut failures = 0;
    let mut buf = vec![0u8; chunk_bytes as usize];
    let mut want = vec![0u8; chunk_bytes as usize];
    for (i, (&h, &len)) in handles.iter().zip(&sizes).enumerate() {
        let b = &mut buf[..len as usize];
        let w = &mut want[..len as usize];
        m.read(h, 0, b)?;
        fill(chunk_seed(seed, i), w);
        verified += 1;
        if b != w {
            failures += 1;
        }
    }
    m.set_access_plan(&[]);
    for h in handles {
        m.deallocate(h)?;
    }
    let hit_ratio = 1.0 - loads.min(accesses) as f64 / accesses as f64;
    Ok(WeightsReport {
        source: if on_host { "host" } else { "disk" }.into(),
        model_bytes,
        chunks: n,
        chunk_bytes,
        steps,
        lookahead,
        pinned_prefix_chunks: prefix,
        device_budget_bytes: device_budget,
        accesses,
        loads,
        hit_ratio,
        loads_exact: exclusive,
        demand_hits,
        demand_hit_ratio: demand_hits as f64 / accesses as f64,
        opt,
        opt_bypass,
        planned,
        lru,
        bytes_loaded_per_step,
        bytes_from_disk_per_step,
        step_s,
        bound_step_s,
        step_over_bound: if bound_step_s > 0.0 {
            step_s / bound_step_s
        } else {
            0.0
        },
        link_gbps,
        disk_gbps,
        stall_s_per_step,
        checksums_verified: verified,
        checksum_failures: failures,
    })
}
