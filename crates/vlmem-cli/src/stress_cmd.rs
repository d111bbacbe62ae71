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
    /// Host tier size (e.g. 8MiB; default 32MiB). Smaller means more swapping to disk.
    #[arg(long, value_name = "BYTES")]
    host_mem: Option<String>,
    /// Swap folder (created 0700 if missing; default a private temp folder). Swap files
    /// are unlinked (O_TMPFILE): nothing is left in it after the run, even after kill -9.
    #[arg(long, value_name = "DIR")]
    disk_path: Option<std::path::PathBuf>,
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
    let mut opts = StressOptions {
        threads: a.threads,
        ops: a.ops,
        seconds: a.seconds,
        seed: a.seed,
        disk_dir: a.disk_path,
        ..Default::default()
    };
    if let Some(s) = &a.host_mem {
        let bytes = vlmem_core::bytes::parse_bytes(s)
            .map_err(|e| CliError::bad_input(format!("--host-mem: {e}")))?;
        // The manager rounds tiers down to whole MiB; the shared weights need 4 MiB.
        if !(4 * vlmem_core::bytes::MIB..=1 << 40).contains(&bytes) {
            return Err(CliError::bad_input(
                "--host-mem must be between 4MiB and 1TiB",
            ));
        }
        opts.host_bytes = bytes;
    }
    let r = run(&opts).map_err(CliError::failure)?;
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&r).map_err(CliError::failure)?
        );
    } else {
        println!(
            "{} threads, {} ops in {:.2} s: overlaps {}, lost {}, corrupted {}, stats_mismatch {}, deadlocks {} ({}), stalls {}, swap-outs {}",
            r.threads,
            r.ops,
            r.wall_ms as f64 / 1e3,
            r.overlaps,
            r.lost,
            r.corrupted,
            r.stats_mismatch,
            r.deadlocks,
            if r.deadlock_detector {
                "parking_lot detector on"
            } else {
                "detector off: build with --features deadlock-detection"
            },
            r.stalls,
            r.swap_outs
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
