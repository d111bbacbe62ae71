//! `vlmem replay`: Qwen3-VL-shaped workloads through the memory manager, with real bytes,
//! beside Belady's OPT and LRU on the same trace and the bandwidth bound.

use crate::CliError;
use clap::Args;
use std::io::IsTerminal;
use std::path::PathBuf;
use vlmem::replay::{ReplayOptions, Workload, parse_scale, run};
use vlmem_core::profile::HardwareProfile;

#[derive(Args)]
pub struct ReplayArgs {
    /// weights-stream, kv-growth, image-cache or mixed.
    #[arg(long)]
    workload: String,
    /// A catalog model name whose shapes the workload follows.
    #[arg(long, default_value = "qwen3-vl-2b")]
    model: String,
    /// A built-in profile, `detect`, or a .toml file.
    #[arg(long, default_value = "laptop-i5-10210u-mx250")]
    profile: String,
    /// Multiply every byte size by this, e.g. 1/64 (the default) or 0.05.
    #[arg(long)]
    scale: Option<String>,
    /// Fewer steps (a smoke run).
    #[arg(long)]
    quick: bool,
    /// Write the tier occupancy over time as SVG.
    #[arg(long)]
    svg: Option<PathBuf>,
    /// Where swap files and scaled weights go (default: a private temp folder).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run_cmd(a: ReplayArgs) -> Result<(), CliError> {
    let workload = Workload::parse(&a.workload).ok_or_else(|| {
        CliError::bad_input(format!(
            "unknown workload '{}': use weights-stream, kv-growth, image-cache or mixed",
            a.workload
        ))
    })?;
    if vlmem_qwen3vl::catalog::config(&a.model).is_none() {
        return Err(vlmem_qwen3vl::Error::UnknownModel(a.model).into());
    }
    let profile = HardwareProfile::resolve(&a.profile)?;
    let mut opts = ReplayOptions::new(workload, &a.model, profile);
    if let Some(s) = &a.scale {
        opts.scale = parse_scale(s).map_err(CliError::bad_input)?;
    }
    opts.quick = a.quick;
    opts.svg = a.svg;
    opts.dir = a.dir;
    opts.progress = std::io::stderr().is_terminal() && !a.json;
    let report = run(&opts).map_err(CliError::failure)?;
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).map_err(CliError::failure)?
        );
    } else {
        print_summary(&report);
    }
    if report.checksum_failures > 0 {
        return Err(CliError::failure(format!(
            "{} tensors failed their checksum",
            report.checksum_failures
        )));
    }
    Ok(())
}

fn print_summary(r: &vlmem::replay::ReplayReport) {
    use vlmem_core::bytes::format_bytes;
    println!(
        "{} on {} with {}, sizes x {:.4}{}: {:.2} s",
        r.workload,
        r.profile,
        r.model,
        r.scale,
        if r.quick { " (quick)" } else { "" },
        r.wall_s
    );
    if let Some(w) = &r.weights {
        println!(
            "weights   hit ratio {:.3} (OPT {:.3}, planned {:.3}, LRU {:.3}); step {:.4} s vs bound {:.4} s; stall {:.4} s per step",
            w.hit_ratio,
            w.opt.hit_ratio,
            w.planned.hit_ratio,
            w.lru.hit_ratio,
            w.step_s,
            w.bound_step_s,
            w.stall_s_per_step
        );
    }
    if let Some(k) = &r.kv {
        println!(
            "kv        {} requests, {} tokens at {:.0} tokens/s; {} preemptions, {} resumes; device hit ratio {:.3}",
            k.requests,
            k.tokens_generated,
            k.tokens_per_s,
            k.preemptions,
            k.resumes,
            k.device_hit_ratio
        );
    }
    if let Some(i) = &r.images {
        println!(
            "images    hit ratio {:.3} (OPT {:.3}, LRU {:.3}) over {} lookups of {} images, budget {}",
            i.hit_ratio,
            i.opt.hit_ratio,
            i.lru.hit_ratio,
            i.lookups,
            i.distinct_images,
            format_bytes(i.budget_bytes)
        );
    }
    let m = &r.manager;
    for (t, name) in ["device", "host", "disk"].iter().enumerate() {
        println!(
            "{name:9} hits {} misses {}; in {} out {}; evictions {} ({} written back)",
            m.hits[t],
            m.misses[t],
            format_bytes(m.bytes_in[t]),
            format_bytes(m.bytes_out[t]),
            m.evictions[t],
            m.write_backs[t]
        );
    }
    println!(
        "moves     p50 {} us, p99 {} us; pin wait {:.3} s; checksums verified {}, failed {}",
        m.move_latency_p50_us,
        m.move_latency_p99_us,
        m.pin_wait_s,
        r.checksums_verified,
        r.checksum_failures
    );
    for t in &m.tiers {
        println!("tier      {t}");
    }
}
