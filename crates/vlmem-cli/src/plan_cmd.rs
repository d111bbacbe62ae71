//! `vlmem plan`: the placement plan of a model on a machine.

use crate::CliError;
use clap::Args;
use vlmem_core::Tier;
use vlmem_core::bytes::format_bytes;
use vlmem_core::profile::{HardwareProfile, Overrides};
use vlmem_qwen3vl::format::WeightFormat;
use vlmem_qwen3vl::kv_dtype::KvDtype;
use vlmem_qwen3vl::plan::{ModelSource, Plan, PlanRequest, plan};

#[derive(Args)]
pub struct PlanArgs {
    /// A catalog name (qwen3-vl-2b, -4b, -8b, -32b, -30b-a3b, -235b-a22b) or a checkpoint folder.
    #[arg(long)]
    model: String,
    /// A built-in profile, `detect`, or a .toml file.
    #[arg(long, default_value = "laptop-i5-10210u-mx250")]
    profile: String,
    /// Context length in tokens (prompt, image tokens and generated tokens).
    #[arg(long, default_value_t = 4096)]
    context: u64,
    /// Sequences decoded together.
    #[arg(long, default_value_t = 1)]
    batch: u64,
    /// An image of WIDTHxHEIGHT pixels in the prompt (repeatable), e.g. 1024x1024.
    #[arg(long = "image", value_parser = parse_image)]
    images: Vec<(u64, u64)>,
    /// How weights are held in the tiers: bf16, f16, f32, q8_0 or q4_k (default: as stored,
    /// bf16 for the catalog). A block format holds matrices whose rows are whole blocks (32
    /// values for q8_0, 256 for q4_k); other tensors (norms, biases, rows of other lengths)
    /// stay as stored; q4_k holds the decoder layers' projections, and the embedding, router
    /// and vision tower take q8_0 (as `vlmem quantize` and `--quant` write them).
    #[arg(long, value_parser = parse_format)]
    dtype: Option<WeightFormat>,
    /// How the KV cache holds keys and values: f32, bf16 (the default) or q8_0.
    #[arg(long, value_parser = parse_kv_dtype)]
    kv_dtype: Option<KvDtype>,
    /// Usable GPU memory, e.g. 0, 512MiB, 2GiB (replaces the profile's).
    #[arg(long)]
    gpu_mem: Option<String>,
    /// Usable host memory.
    #[arg(long)]
    host_mem: Option<String>,
    /// Usable disk space for swap.
    #[arg(long)]
    disk_mem: Option<String>,
    /// Print one JSON object (docs/CLI.md) instead of a table.
    #[arg(long)]
    json: bool,
}

fn parse_format(s: &str) -> Result<WeightFormat, String> {
    s.parse()
        .map_err(|e: vlmem_qwen3vl::format::ParseFormatError| e.to_string())
}

fn parse_kv_dtype(s: &str) -> Result<KvDtype, String> {
    s.parse()
        .map_err(|e: vlmem_qwen3vl::kv_dtype::ParseKvDtypeError| e.to_string())
}

fn parse_image(s: &str) -> Result<(u64, u64), String> {
    let (w, h) = s
        .split_once(['x', 'X'])
        .ok_or_else(|| format!("'{s}' is not WIDTHxHEIGHT, e.g. 1024x768"))?;
    let num = |v: &str| {
        v.trim()
            .parse::<u64>()
            .map_err(|_| format!("'{s}' is not WIDTHxHEIGHT with whole pixel counts"))
    };
    Ok((num(w)?, num(h)?))
}

pub fn run(a: PlanArgs) -> Result<(), CliError> {
    let overrides = Overrides::parse(
        a.gpu_mem.as_deref(),
        a.host_mem.as_deref(),
        a.disk_mem.as_deref(),
    )?;
    let profile = HardwareProfile::resolve(&a.profile)?.with_overrides(overrides);
    let model = ModelSource::resolve(&a.model)?;
    let req = PlanRequest {
        context_tokens: a.context,
        batch: a.batch,
        images: a.images,
        dtype: a.dtype,
        kv_dtype: a.kv_dtype.unwrap_or_default(),
    };
    let p = plan(&model, &profile, &req)?;
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&p).map_err(CliError::failure)?
        );
    } else {
        print_table(&p);
    }
    Ok(())
}

/// "layers 0-3, 7" from layer numbers.
fn ranges(mut n: Vec<u64>) -> String {
    n.sort_unstable();
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < n.len() {
        let start = n[i];
        let mut end = start;
        while i + 1 < n.len() && n[i + 1] == end + 1 {
            i += 1;
            end = n[i];
        }
        out.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
        i += 1;
    }
    out.join(", ")
}

fn units_on(p: &Plan, tier: Tier) -> String {
    let mut layers = Vec::new();
    let mut experts = Vec::new();
    let mut others = Vec::new();
    for u in p.placement.units.iter().filter(|u| u.tier == tier) {
        let rest = u.name.strip_prefix("layer ");
        match rest.map(|r| r.split_once(' ')) {
            Some(Some((n, "experts"))) => experts.extend(n.parse::<u64>().ok()),
            Some(None) => layers.extend(rest.and_then(|r| r.parse::<u64>().ok())),
            _ => others.push(u.name.clone()),
        }
    }
    let mut parts = Vec::new();
    if !layers.is_empty() {
        parts.push(format!("layers {}", ranges(layers)));
    }
    if !experts.is_empty() {
        parts.push(format!("experts of layers {}", ranges(experts)));
    }
    parts.extend(others);
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join("; ")
    }
}

fn print_table(p: &Plan) {
    let w = &p.weights;
    println!(
        "{} on {} (context {} tokens, batch {}, weights held as {})",
        p.model, p.profile, p.context_tokens, p.batch, w.dtype
    );
    println!(
        "weights   {} in all ({:.3} B parameters): text {} ({} layers x {}, embedding {}, lm_head {}), vision {}",
        format_bytes(w.total_bytes),
        w.total_params as f64 / 1e9,
        format_bytes(w.text_bytes),
        w.layers,
        format_bytes(w.per_layer_bytes),
        format_bytes(w.embedding_bytes),
        if w.lm_head_bytes == 0 {
            "tied".to_string()
        } else {
            format_bytes(w.lm_head_bytes)
        },
        format_bytes(w.vision_bytes),
    );
    if w.expert_bytes_per_layer > 0 {
        println!(
            "          of each layer {} are experts",
            format_bytes(w.expert_bytes_per_layer)
        );
    }
    println!(
        "kv cache  {} per token; {} for the context, on {}",
        format_bytes(p.kv_bytes_per_token),
        format_bytes(p.placement.kv_bytes),
        p.placement.kv_tier
    );
    for i in &p.images {
        println!(
            "image     {}x{} -> {}x{}: {} patches, {} tokens; vision working set {}, embeddings + DeepStack {}",
            i.width,
            i.height,
            i.resized_width,
            i.resized_height,
            i.patches,
            i.tokens,
            format_bytes(i.vision_working_set_bytes),
            format_bytes(i.embeds_bytes + i.deepstack_bytes)
        );
    }
    let pl = &p.placement;
    println!(
        "placement (each unit is computed where it lives: {} on the GPU, the rest on the CPU)",
        match pl.gpu_layers {
            0 => "no layer".to_string(),
            1 => "layer 0".to_string(),
            n => format!("layers 0-{}", n - 1),
        }
    );
    for (tier, bytes) in [
        (Tier::Device, pl.gpu_bytes),
        (Tier::Host, pl.host_bytes),
        (Tier::Disk, pl.disk_bytes),
    ] {
        let label = match tier {
            Tier::Device => "gpu ",
            Tier::Host => "host",
            Tier::Disk => "disk",
        };
        println!(
            "  {label}  {:>11}  {}",
            format_bytes(bytes),
            units_on(p, tier)
        );
    }
    let b = &pl.budgets.host;
    println!(
        "  host budgets: weights {} (of which {} stage streamed tensors), KV {}, one step's activations {}, images {}",
        format_bytes(b.weights),
        format_bytes(pl.host_staging_bytes),
        format_bytes(b.kv),
        format_bytes(b.activations),
        format_bytes(b.vision)
    );
    if pl.budgets.gpu.total() > 0 {
        println!(
            "  gpu budgets: weights {}, kernels' vectors {}",
            format_bytes(pl.budgets.gpu.weights),
            format_bytes(pl.budgets.gpu.scratch)
        );
    }
    println!("  (a layer on two tiers keeps its norms and first matrices on the faster one)");
    if p.fits {
        println!(
            "decode    at most {:.2} tokens/s",
            p.decode_tokens_per_s_bound
        );
        for t in &p.bound_terms {
            println!(
                "  {:12} {:>11} per token at {:6.2} GB/s = {:.4} s",
                t.name,
                format_bytes(t.bytes_per_token),
                t.bytes_per_s / 1e9,
                t.seconds_per_token
            );
        }
    } else {
        println!(
            "CANNOT RUN on this profile: {}",
            p.reason.as_deref().unwrap_or("unknown reason")
        );
    }
    for n in &p.notes {
        println!("note: {n}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_images_and_ranges() {
        assert_eq!(parse_image("1024x768"), Ok((1024, 768)));
        assert_eq!(parse_image("0X0"), Ok((0, 0)));
        assert!(parse_image("1024").is_err());
        assert!(parse_image("-1x5").is_err());
        assert_eq!(ranges(vec![3, 0, 1, 2, 7, 9, 10]), "0-3, 7, 9-10");
        assert_eq!(ranges(vec![]), "");
    }
}
