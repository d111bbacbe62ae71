//! `vlmem stress`: a mixed multi-threaded workload over every kind and tier, with every
//! tensor checksummed and a ledger check at the end.

use crate::CliError;
use clap::Args;
use vlmem::stress::{StressOptions, run};

#[derive(Args)]
pub struct StressArgs {
    /// Worker threads.
    #[arg(long, default_value_t = 8)]
    threads: usize,
    /// Run this long (default 5 s when --ops is not given).
    #[arg(long, conflicts_with = "ops")]
    seconds: Option<f64>,
    /// Run this many operations in all.
    #[arg(long)]
    ops: Option<u64>,
    /// Seed of every random choice.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

pub fn run_cmd(a: StressArgs) -> Result<(), CliError> {
    if a.threads == 0 || a.threads > 4096 {
        return Err(CliError::bad_input("--threads must be between 1 and 4096"));
    }
    if a.seconds.is_some_and(|s| !(s.is_finite() && s > 0.0)) {
        return Err(CliError::bad_input("--seconds must be a positive number"));
    }
    let opts = StressOptions {
        threads: a.threads,
        ops: a.ops,
        seconds: a.seconds,
        seed: a.seed,
        ..Default::default()
    };
    let r = run(&opts).map_err(CliError::failure)?;
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&r).map_err(CliError::failure)?
        );
    } else {
        println!(
            "{} threads, {} ops in {:.2} s: overlaps {}, lost {}, corrupted {}, stats_mismatch {}, deadlocks {}",
            r.threads,
            r.ops,
            r.wall_ms as f64 / 1e3,
            r.overlaps,
            r.lost,
            r.corrupted,
            r.stats_mismatch,
            r.deadlocks
        );
        println!("expected refusals: {:?}", r.refusals);
        if !r.errors.is_empty() {
            println!("unexpected errors: {:?}", r.errors);
        }
    }
    if r.ok() {
        Ok(())
    } else {
        Err(CliError::failure(
            "the ledger check failed (see the report)",
        ))
    }
}
