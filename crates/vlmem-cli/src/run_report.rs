//! `vlmem run`'s report on a finished reply: one JSON object (`--json`), or the lines printed
//! after the reply's text.

use serde_json::json;
use vlmem::{ManagerStats, TensorKind, Tier};
use vlmem_core::bytes::format_bytes;
use vlmem_runner::engine::KV_BLOCK_TOKENS;
use vlmem_runner::{Activations, Engine, FinishReason, Reply};

/// An f32 setting as the shortest decimal that reads back as it (0.7, not 0.699999988).
fn f32_json(x: f32) -> f64 {
    x.to_string().parse().unwrap_or(f64::from(x))
}

/// Where the checkpoint's weights are after the run, by tier.
struct WeightTiers {
    total_bytes: u64,
    device_bytes: u64,
    host_bytes: u64,
    /// Weights with no faster copy are read in place from the checkpoint (the disk tier).
    disk_only_bytes: u64,
}

impl WeightTiers {
    fn of(engine: &Engine, stats: &ManagerStats) -> Self {
        let total_bytes = engine.checkpoint().total_bytes();
        let device_bytes = stats.resident.get(Tier::Device, TensorKind::Weight);
        let host_bytes = stats.resident.get(Tier::Host, TensorKind::Weight);
        WeightTiers {
            total_bytes,
            device_bytes,
            host_bytes,
            disk_only_bytes: total_bytes.saturating_sub(device_bytes + host_bytes),
        }
    }
}

/// What both reports read after the run: the manager's statistics, the tokens generated (at
/// least 1), where the weights are, and the GPU's report.
fn facts(
    engine: &Engine,
    reply: &Reply,
) -> (
    ManagerStats,
    f64,
    WeightTiers,
    Option<vlmem_runner::gpu::GpuReport>,
) {
    let stats = engine.manager().stats();
    let tokens = reply.ids.len().max(1) as f64;
    let w = WeightTiers::of(engine, &stats);
    (stats, tokens, w, engine.gpu_report())
}

/// The `--json` report: the reply, its sampling settings, the speeds and the memory.
/// `open_s` is the time to open the engine; the report sets the decode speed against the
/// bound of the engine's plan (its bandwidths, these budgets).
pub(crate) fn json(engine: &Engine, reply: &Reply, open_s: f64) -> serde_json::Value {
    let (manager, weights) = (engine.manager(), engine.weights());
    let (stats, tokens, w, gpu) = facts(engine, reply);
    let (host, rs) = (Tier::Host.index(), &reply.stats);
    let st = weights.staging();
    let streaming = json!({
        "staging_area_bytes": st.capacity_bytes,
        "kept_bytes": st.kept_bytes,
        "streamed_bytes": st.streamed_bytes,
        "streamed_tensors": st.streamed_tensors,
        "streamed_pieces": st.streamed_pieces,
        "buffer_bytes": st.buffer_bytes,
        "read_ahead": st.stats.filled,
        "read_ahead_bytes": st.stats.filled_bytes,
        "taken": st.stats.hits,
        "waited": st.stats.waits,
        "read_on_demand": st.stats.misses,
        "dropped_unused": st.stats.dropped,
    });
    let p = &reply.sampling;
    json!({
        "prompt_ids": reply.prompt_ids,
        "generated_ids": reply.ids,
        "text": reply.text,
        "finish_reason": reply.finish_reason.as_str(),
        "stop_ids": reply.stop_ids,
        "sampling": {
            "mode": if p.is_greedy() { "greedy" } else { "sample" },
            "temperature": f32_json(p.temperature),
            "top_k": p.top_k,
            "top_p": f32_json(p.top_p),
            "min_p": f32_json(p.min_p),
            "repetition_penalty": f32_json(p.repetition_penalty),
            "presence_penalty": f32_json(p.presence_penalty),
            "frequency_penalty": f32_json(p.frequency_penalty),
            "seed": reply.seed,
            "from_generation_config": engine.generation_config().do_sample,
        },
        "tokens_per_s": reply.decode_tokens_per_s(),
        "plan_bound_tokens_per_s": engine.plan().decode_tokens_per_s_bound,
        "placement": engine.plan().placement,
        "time_to_first_token_s": reply.timings.time_to_first_token.as_secs_f64(),
        "open_s": open_s,
        "memory": {
            "host_weight_bytes": w.host_bytes,
            "device_weight_bytes": w.device_bytes,
            "bytes_into_host_per_token": stats.counters.bytes_in[host] as f64 / tokens,
            "host_hit_ratio": stats.counters.hit_ratio(Tier::Host),
            "tiers": manager.describe_tiers(),
            "tier_bytes": {
                "device": stats.resident.tier_total(Tier::Device),
                "host": stats.resident.tier_total(Tier::Host),
                "disk": stats.resident.tier_total(Tier::Disk),
            },
            "weight_bytes": {
                "total": w.total_bytes,
                "device": w.device_bytes,
                "host": w.host_bytes,
                "disk_only": w.disk_only_bytes,
            },
            "bytes_streamed_per_decode_token": rs.streamed_bytes_per_decode_token,
            "staged_bytes": weights.staged_bytes(),
            "prefetch_layers": weights.prefetch_layers(),
            "streaming": streaming,
            "prefetch_hints": weights.prefetch_hints(),
            "peak_rss_bytes": vlmem_core::profile::process_peak_rss_bytes(),
        },
        "gpu": gpu.as_ref().map(|r| {
            json!({
                "device": r.device,
                "layers": r.layers,
                "weight_bytes": r.weight_bytes,
                "kernel_read_bytes": r.kernel_bytes,
                "kernel_s": r.kernel_s,
                "kernel_read_gb_per_s": if r.kernel_s > 0.0 {
                    r.kernel_bytes as f64 / r.kernel_s / 1e9
                } else {
                    0.0
                },
                "cpu_fallbacks": r.fallbacks,
            })
        }),
        "kernel": vlmem_runner::kernels::isa(),
        "kernel_read_gb_per_s": rs.kernel_read_gb_per_s,
        "kernel_share_of_decode": rs.kernel_share_of_decode,
        "kv_cache": match &rs.kv_pool {
            Some(k) => json!({
                "paged": true,
                "block_tokens": KV_BLOCK_TOKENS,
                "blocks": k.blocks,
                "resident_blocks": k.resident_blocks,
                "swap_outs": k.swap_outs,
                "swap_ins": k.swap_ins,
            }),
            None => json!({ "paged": false }),
        },
        "activations": match &rs.activations {
            Activations::Arena {
                tier,
                capacity_bytes,
                peak_bytes,
                steps,
            } => json!({
                "in_arena": true,
                "tier": tier.to_string(),
                "arena_bytes": capacity_bytes,
                "peak_bytes": peak_bytes,
                "steps": steps,
            }),
            Activations::InProcess { reason } => json!({
                "in_arena": false,
                "reason": reason,
            }),
        },
        "vision_cache": engine.vision_cache().map(|c| {
            let v = c.stats();
            json!({ "hits": v.hits, "misses": v.misses, "resident_bytes": v.resident_bytes })
        }),
    })
}

/// The text report printed after the reply: counts and speeds, how tokens were chosen, the
/// plan's bound, where the weights, the KV cache and the activations live, and the tiers.
/// `images` is the number of images in the request.
pub(crate) fn print_text(engine: &Engine, reply: &Reply, images: usize, open_s: f64) {
    let (manager, weights) = (engine.manager(), engine.weights());
    let (stats, tokens, w, gpu) = facts(engine, reply);
    let (host, rs) = (Tier::Host.index(), &reply.stats);
    println!();
    println!("---");
    println!(
        "{} prompt ids, {} image(s), {} generated; open {:.2} s, time to first token {:.2} s, decode {:.2} tokens/s",
        reply.prompt_ids.len(),
        images,
        reply.ids.len(),
        open_s,
        reply.timings.time_to_first_token.as_secs_f64(),
        reply.decode_tokens_per_s()
    );
    let p = &reply.sampling;
    let choice = match reply.seed {
        Some(seed) => format!(
            "sampled (temperature {}, top_k {}, top_p {}, min_p {}, seed {seed})",
            p.temperature, p.top_k, p.top_p, p.min_p
        ),
        None => "greedy".to_string(),
    };
    let penalties = if p.has_penalties() {
        format!(
            ", penalties: repetition {}, presence {}, frequency {}",
            p.repetition_penalty, p.presence_penalty, p.frequency_penalty
        )
    } else {
        String::new()
    };
    println!(
        "tokens: {choice}{penalties}; finished: {}",
        match reply.finish_reason {
            FinishReason::Stop => "stop id",
            FinishReason::Length => "--max-new-tokens reached",
        }
    );
    if let Some(b) = Some(engine.plan().decode_tokens_per_s_bound).filter(|&b| b > 0.0) {
        println!(
            "decode against the plan's bound: {:.2} of {:.2} tokens/s ({:.0}%; the bound uses profile {}'s bandwidths, see vlmem plan)",
            reply.decode_tokens_per_s(),
            b,
            reply.decode_tokens_per_s() / b * 100.0,
            engine.profile().name
        );
    }
    println!(
        "memory: weights resident in RAM {}, on the device {}; {} into RAM per generated token (first loads included); RAM hit ratio {:.3}",
        format_bytes(w.host_bytes),
        format_bytes(w.device_bytes),
        format_bytes((stats.counters.bytes_in[host] as f64 / tokens) as u64),
        stats.counters.hit_ratio(Tier::Host)
    );
    println!(
        "weights by tier: device {}, host {}, read in place from disk {} (of {}); streamed per decode token {}; prefetch {} layer(s) ahead, {} hint(s); decode kernel {} reading {:.1} GB/s, {:.0}% of decode time",
        format_bytes(w.device_bytes),
        format_bytes(w.host_bytes),
        format_bytes(w.disk_only_bytes),
        format_bytes(w.total_bytes),
        format_bytes(rs.streamed_bytes_per_decode_token as u64),
        weights.prefetch_layers(),
        weights.prefetch_hints(),
        vlmem_runner::kernels::isa(),
        rs.kernel_read_gb_per_s,
        rs.kernel_share_of_decode * 100.0,
    );
    if let Some(r) = &gpu {
        println!(
            "GPU: {}, decoder layers 0..{} ({}) compute there, kernels read {} in {:.3} s; {} CPU fallback(s)",
            r.device,
            r.layers,
            format_bytes(r.weight_bytes),
            format_bytes(r.kernel_bytes),
            r.kernel_s,
            r.fallbacks
        );
    }
    match &rs.kv_pool {
        Some(k) => {
            println!(
                "KV cache: paged in the manager, {} blocks of {} tokens ({} on the host), {} whole-layer swap-outs, {} swap-ins",
                k.blocks, KV_BLOCK_TOKENS, k.resident_blocks, k.swap_outs, k.swap_ins
            );
        }
        None => println!("KV cache: in process (the host has no KV budget for one block)"),
    }
    match &rs.activations {
        Activations::Arena {
            tier,
            capacity_bytes,
            peak_bytes,
            steps,
        } => println!(
            "activations: in a step arena of the manager on the {tier} tier, {} (peak {}), {steps} decode step(s)",
            format_bytes(*capacity_bytes),
            format_bytes(*peak_bytes)
        ),
        Activations::InProcess { reason } => println!("activations: in process ({reason})"),
    }
    if let Some(c) = engine.vision_cache() {
        let v = c.stats();
        println!(
            "vision cache: {} hit(s), {} miss(es), {} held",
            v.hits,
            v.misses,
            format_bytes(v.resident_bytes)
        );
    }
    if let Some(rss) = vlmem_core::profile::process_peak_rss_bytes() {
        println!(
            "process: peak resident memory {} (the tiers' pages in use, candle's buffers for the prompt and the vision tower, and the rest)",
            format_bytes(rss)
        );
    }
    for t in manager.describe_tiers() {
        println!("tier: {t}");
    }
}
