//! `vlmem stress`: a mixed multi-threaded workload over every kind and tier, with every
//! tensor checksummed and a ledger check at the end.

use crate::CliError;
use clap::Args;
use vlmem_workloads::stress::{StressOptions, run};

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
    /// Disk tier size (e.g. 16MiB; default 128MiB). A few MiB makes write-backs find it
    /// full.
    #[arg(long, value_name = "BYTES")]
    disk_mem: Option<String>,
    /// The disk's integrity unit (a multiple of 4KiB, e.g. 64KiB; default 1MiB).
    #[arg(long, value_name = "BYTES")]
    disk_unit: Option<String>,
    /// Keep a KV slab of blocks of this many bytes (a multiple of 256) on the device and
    /// the host; KV tensors are then one block each.
    #[arg(long, value_name = "BYTES")]
    kv_block_bytes: Option<u64>,
    /// Zero every freed block.
    #[arg(long)]
    zero_on_free: bool,
    /// Register this many checkpoint extents over a temporary file, and pin, read and swap
    /// them out.
    #[arg(long, value_name = "N", default_value_t = 0)]
    extents: usize,
    /// Explicit swap-outs of tensors and extents on every tier, and compaction of every
    /// tier, in the mix.
    #[arg(long)]
    swap_outs: bool,
    /// Pins held across operations, writes through held pins, and other threads reading
    /// those tensors through pins of their own and plain reads (each read must succeed and
    /// show a whole version).
    #[arg(long)]
    pinned_writes: bool,
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
    if a.extents > 4096 {
        return Err(CliError::bad_input("--extents must be at most 4096"));
    }
    if a.kv_block_bytes
        .is_some_and(|b| b == 0 || b % 256 != 0 || b > 1 << 30)
    {
        return Err(CliError::bad_input(
            "--kv-block-bytes must be a multiple of 256 between 256 and 1GiB",
        ));
    }
    let mut opts = StressOptions {
        threads: a.threads,
        ops: a.ops,
        seconds: a.seconds,
        seed: a.seed,
        disk_dir: a.disk_path,
        kv_block_bytes: a.kv_block_bytes,
        zero_on_free: a.zero_on_free,
        extents: a.extents,
        swap_outs: a.swap_outs,
        pinned_writes: a.pinned_writes,
        ..Default::default()
    };
    if let Some(s) = &a.disk_mem {
        let bytes = vlmem_core::bytes::parse_bytes(s)
            .map_err(|e| CliError::bad_input(format!("--disk-mem: {e}")))?;
        // Whole MiB (the manager rounds down); the shared weights need 4 MiB of swap to
        // land when the host evicts them all.
        if !(4 * vlmem_core::bytes::MIB..=1 << 40).contains(&bytes) {
            return Err(CliError::bad_input(
                "--disk-mem must be between 4MiB and 1TiB",
            ));
        }
        opts.disk_bytes = bytes;
    }
    if let Some(s) = &a.disk_unit {
        let bytes = vlmem_core::bytes::parse_bytes(s)
            .map_err(|e| CliError::bad_input(format!("--disk-unit: {e}")))?;
        if bytes == 0 || bytes % 4096 != 0 || bytes > 1 << 30 {
            return Err(CliError::bad_input(
                "--disk-unit must be a multiple of 4KiB between 4KiB and 1GiB",
            ));
        }
        opts.disk_unit_bytes = Some(bytes);
    }
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
    // A configuration the manager refuses (a KV block size it cannot serve) is the
    // caller's input.
    let r = run(&opts).map_err(|e| match e {
        vlmem::ManagerError::InvalidConfig(_) => CliError::bad_input(e.to_string()),
        e => CliError::failure(e),
    })?;
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&r).map_err(CliError::failure)?
        );
    } else {
        println!(
            "{} threads, {} ops in {:.2} s: overlaps {}, lost {}, corrupted {}, stats_mismatch {}, deadlocks {} ({}), stalls {}, swap-outs {}, leaked {} B, pinned writes {} (failed reads {}), explicit swap-outs {}",
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
            r.swap_outs,
            r.leaked_bytes,
            r.pinned_writes,
            r.pinned_write_read_failures,
            r.explicit_swap_outs
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
