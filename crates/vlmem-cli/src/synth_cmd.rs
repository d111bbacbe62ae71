//! `vlmem synth`: a real-sized checkpoint with random weights.

use crate::CliError;
use clap::Args;
use std::io::IsTerminal;
use std::path::PathBuf;
use vlmem_core::bytes::format_bytes;
use vlmem_qwen3vl::synth::{SynthOptions, synth};

#[derive(Args)]
pub struct SynthArgs {
    /// A catalog name (qwen3-vl-2b, ...).
    #[arg(long)]
    model: String,
    /// Output folder (created if missing).
    #[arg(long)]
    out: PathBuf,
    /// Keep only the first N decoder layers.
    #[arg(long)]
    layers: Option<u64>,
    /// RNG seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Largest shard, e.g. 5GB (the default, as transformers writes them).
    #[arg(long)]
    shard_size: Option<String>,
}

pub fn run(a: SynthArgs) -> Result<(), CliError> {
    let mut opts = SynthOptions {
        layers: a.layers,
        seed: a.seed,
        progress: std::io::stderr().is_terminal(),
        ..Default::default()
    };
    if let Some(s) = &a.shard_size {
        opts.shard_max_bytes = vlmem_core::bytes::parse_bytes(s)
            .map_err(|e| CliError::bad_input(format!("--shard-size: {e}")))?;
    }
    let r = synth(&a.model, &a.out, &opts)?;
    println!(
        "wrote {} tensors, {} of bf16 data, in {} file(s) to {}",
        r.tensors,
        format_bytes(r.data_bytes),
        r.files.len(),
        r.dir.display()
    );
    Ok(())
}
