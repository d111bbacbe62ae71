//! `vlmem replay`: Qwen3-VL-shaped workloads through the memory manager, with real bytes,
//! beside Belady's OPT and LRU on the same trace and the bandwidth bound.

use crate::CliError;
use clap::Args;
use std::io::IsTerminal;
use std::path::PathBuf;
use vlmem_core::profile::HardwareProfile;
use vlmem_workloads::replay::{ReplayOptions, Workload, parse_scale, run};

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

/// The replay options both commands share, checked: exit 2 on an unknown workload, model or
/// profile, or a bad scale.
fn options(
    workload: &str,
    model: &str,
    profile: &str,
    scale: Option<&str>,
) -> Result<ReplayOptions, CliError> {
    let workload = Workload::parse(workload).ok_or_else(|| {
        CliError::bad_input(format!(
            "unknown workload '{workload}': use weights-stream, kv-growth, image-cache or mixed"
        ))
    })?;
    if vlmem_qwen3vl::catalog::config(model).is_none() {
        return Err(vlmem_qwen3vl::Error::UnknownModel(model.to_string()).into());
    }
    let profile = HardwareProfile::resolve(profile)?;
    let mut opts = ReplayOptions::new(workload, model, profile);
    if let Some(s) = scale {
        opts.scale = parse_scale(s).map_err(CliError::bad_input)?;
    }
    Ok(opts)
}

pub fn run_cmd(a: ReplayArgs) -> Result<(), CliError> {
    let mut opts = options(&a.workload, &a.model, &a.profile, a.scale.as_deref())?;
    opts.quick = a.quick;
    opts.svg = a.svg;
    opts.dir = a.dir;
    opts.progress = std::io::stderr().is_terminal() && !a.json;
    let report = run(&opts).map_err(CliError::failure)?;
    if a.json {
        println!("{}", report.to_json());
    } else {
        print!("{}", report.to_text());
    }
    if report.checksum_failures > 0 {
        return Err(CliError::failure(format!(
            "{} tensors failed their checksum",
            report.checksum_failures
        )));
    }
    Ok(())
}

#[derive(Args)]
pub struct InspectArgs {
    /// The workload that fills the manager: weights-stream, kv-growth, image-cache or mixed.
    #[arg(long, default_value = "mixed")]
    workload: String,
    /// A catalog model name whose shapes the workload follows.
    #[arg(long, default_value = "qwen3-vl-2b")]
    model: String,
    /// A built-in profile, `detect`, or a .toml file.
    #[arg(long, default_value = "laptop-i5-10210u-mx250")]
    profile: String,
    /// Multiply every byte size by this (default 1/64).
    #[arg(long)]
    scale: Option<String>,
    /// Fewer steps.
    #[arg(long)]
    quick: bool,
    /// Print the Prometheus text exposition instead of the table.
    #[arg(long)]
    prometheus: bool,
    /// Print the statistics and compaction figures as JSON.
    #[arg(long)]
    json: bool,
}

/// `vlmem inspect`: the manager's statistics after a workload (resident bytes per tier and
/// kind against budgets, hits and misses, bytes moved each way, evictions, time waiting in
/// pins, swap latency percentiles), and one compaction pass per tier with its fragmentation
/// before and after.
pub fn inspect_cmd(a: InspectArgs) -> Result<(), CliError> {
    let mut opts = options(&a.workload, &a.model, &a.profile, a.scale.as_deref())?;
    let workload = opts.workload;
    opts.quick = a.quick;
    opts.inspect = true;
    opts.progress = std::io::stderr().is_terminal() && !a.json && !a.prometheus;
    let report = run(&opts).map_err(CliError::failure)?;
    let inspection = report
        .inspection
        .as_ref()
        .ok_or_else(|| CliError::failure("the run kept no statistics"))?;
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(inspection).map_err(CliError::failure)?
        );
    } else if a.prometheus {
        print!("{}", inspection.prometheus);
    } else {
        println!(
            "vlmem inspect: {} on {} ({}), scale {:.5}, {:.2} s\n",
            workload, a.model, report.profile, report.scale, report.wall_s
        );
        print!("{}", inspection.table);
        println!(
            "\n(the table is the moment the most bytes were resident)\n\ncompaction under load, every {} ms while the workload ran:",
            if a.quick { 10 } else { 50 }
        );
        for c in &inspection.compaction {
            println!(
                "  {:8} {} passes, mean fragmentation {:.3} -> {:.3}, {} copies moved ({} bytes) in {:.3} s",
                c.tier,
                c.passes,
                c.fragmentation_before,
                c.fragmentation_after,
                c.moved,
                c.bytes_moved,
                c.seconds
            );
        }
    }
    if report.checksum_failures > 0 {
        return Err(CliError::failure(format!(
            "{} tensors failed their checksum",
            report.checksum_failures
        )));
    }
    Ok(())
}
