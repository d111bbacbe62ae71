//! `vlmem quantize`: a checkpoint folder with its weights in a block format, loaded by
//! `run`, `chat` and `plan` directly.

use crate::CliError;
use clap::Args;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Instant;
use vlmem_core::bytes::format_bytes;
use vlmem_qwen3vl::checkpoint::Checkpoint;
use vlmem_qwen3vl::format::WeightFormat;
use vlmem_qwen3vl::quantize::{QuantizeOptions, quantize_checkpoint};

#[derive(Args)]
pub struct QuantizeArgs {
    /// The checkpoint folder to read (bf16, f16 or f32 weights).
    #[arg(long)]
    model: PathBuf,
    /// The format: q8_0, or q4_k (the decoder layers' projections in q4_k; the embedding,
    /// router and vision tower in q8_0).
    #[arg(long, value_name = "FORMAT")]
    quant: String,
    /// The folder to write (must not exist; written under a temporary name, renamed when
    /// complete).
    #[arg(long)]
    out: PathBuf,
    /// Print one JSON object (what was written) instead of a line.
    #[arg(long)]
    json: bool,
}

pub fn run(a: QuantizeArgs) -> Result<(), CliError> {
    let format: WeightFormat = a
        .quant
        .parse()
        .map_err(|e| CliError::bad_input(format!("--quant: {e}")))?;
    let started = Instant::now();
    let src = Checkpoint::open(&a.model)?;
    let opts = QuantizeOptions {
        progress: std::io::stderr().is_terminal() && !a.json,
        ..QuantizeOptions::new(format)
    };
    let report = quantize_checkpoint(&src, &a.out, &opts)?;
    if a.json {
        let text = serde_json::to_string_pretty(&report)
            .map_err(|e| CliError::failure(format!("cannot encode the report: {e}")))?;
        println!("{text}");
    } else {
        let counts: Vec<String> = report
            .tensors_by_format
            .iter()
            .map(|(f, n)| format!("{n} {f}"))
            .collect();
        println!(
            "wrote {} ({} tensors: {}) from {} in {:.1} s to {}",
            format_bytes(report.written_bytes),
            report.tensors,
            counts.join(", "),
            format_bytes(report.source_bytes),
            started.elapsed().as_secs_f64(),
            report.dir.display()
        );
    }
    Ok(())
}
