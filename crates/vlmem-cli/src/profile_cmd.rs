//! `vlmem profile`: list and show hardware profiles.

use crate::CliError;
use clap::Args;
use vlmem_core::bytes::format_bytes;
use vlmem_core::profile::{BUILTIN_NAMES, HardwareProfile, Source, builtin};

#[derive(Args)]
pub struct ProfileArgs {
    /// A built-in name, `detect`, or a .toml file; without it, list the built-ins.
    profile: Option<String>,
    /// Print the profile as TOML (a starting point for your own file).
    #[arg(long, conflicts_with = "json")]
    toml: bool,
    /// Print the profile as JSON.
    #[arg(long)]
    json: bool,
}

fn source(s: Source) -> &'static str {
    match s {
        Source::Spec => "spec",
        Source::Assumption => "assumption",
        Source::Detected => "detected",
    }
}

pub fn run(a: ProfileArgs) -> Result<(), CliError> {
    let Some(name) = a.profile else {
        for n in BUILTIN_NAMES {
            if let Some(p) = builtin(n) {
                println!("{n:28} {}", p.description);
            }
        }
        println!("{:28} read this machine", "detect");
        return Ok(());
    };
    let p = HardwareProfile::resolve(&name)?;
    if a.toml {
        print!("{}", p.to_toml());
        return Ok(());
    }
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&p).map_err(CliError::failure)?
        );
        return Ok(());
    }
    println!("{}: {}", p.name, p.description);
    let c = &p.cpu;
    println!(
        "  cpu   {} ({} cores / {} threads; L1d {} and L2 {} per core, L3 {})",
        c.model,
        c.cores,
        c.threads,
        format_bytes(c.l1d_bytes_per_core),
        format_bytes(c.l2_bytes_per_core),
        format_bytes(c.l3_bytes)
    );
    match &p.gpu {
        Some(g) => println!(
            "  gpu   {} (compute {}.{}, {} of which {} usable, {} GB/s [{}]; {} per block shared, {} threads per block; bf16 arithmetic: {}) on {} at {:.2} GB/s [{}]",
            g.model,
            g.compute_capability.0,
            g.compute_capability.1,
            format_bytes(g.memory_bytes),
            format_bytes(g.usable_bytes()),
            g.memory_bandwidth.bytes_per_s / 1e9,
            source(g.memory_bandwidth.source),
            format_bytes(g.shared_mem_per_block_bytes),
            g.max_threads_per_block,
            if g.bf16_arithmetic {
                "yes"
            } else {
                "no, computed in f32"
            },
            g.link_name,
            g.link.bytes_per_s / 1e9,
            source(g.link.source),
        ),
        None => println!("  gpu   none (the device tier is simulated)"),
    }
    println!(
        "  host  {} {} ({} usable) at {:.1} GB/s [{}]",
        format_bytes(p.host.memory_bytes),
        p.host.memory_name,
        format_bytes(p.host.usable_bytes()),
        p.host.bandwidth.bytes_per_s / 1e9,
        source(p.host.bandwidth.source)
    );
    println!(
        "  disk  {}, {} free; read {:.1} GB/s [{}], write {:.1} GB/s [{}]",
        p.disk.name,
        format_bytes(p.disk.free_bytes),
        p.disk.read.bytes_per_s / 1e9,
        source(p.disk.read.source),
        p.disk.write.bytes_per_s / 1e9,
        source(p.disk.write.source)
    );
    for a in &p.assumptions {
        println!("  assumption: {a}");
    }
    Ok(())
}
