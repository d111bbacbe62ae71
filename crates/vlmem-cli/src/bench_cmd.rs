//! `vlmem bench SUITE`: each suite measures vlmem's figures and their baselines in the same
//! process and prints a table, or `{"suite": ..., "results": [{"name", "value", "unit"}]}`.

use crate::CliError;
use clap::{Args, ValueEnum};
use vlmem_bench::{BenchOptions, SuiteReport};

#[derive(Args)]
pub struct BenchArgs {
    /// Which suite.
    #[arg(value_enum)]
    suite: Suite,
    /// Smaller sizes and fewer repetitions (a smoke run; figures are rougher).
    #[arg(long)]
    quick: bool,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
    /// e2e only: measure llama.cpp in the same run, on the same shapes and threads (a Python
    /// environment with llama-cpp-python, built once under the cache folder: minutes).
    #[arg(long)]
    peers: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum Suite {
    /// Offset allocators against mimalloc, the system allocator and offset-allocator.
    Alloc,
    /// The disk tier against dd, host-to-device copies against memcpy.
    Io,
    /// Standard replays through the manager against Belady's OPT, LRU and the bandwidth bound.
    Replay,
    /// Text decode of a synthesized full-size qwen3-vl-2b: resident, streamed from disk with
    /// and without prefetch, beside the disk and memory bandwidth bounds of the same run.
    E2e,
}

pub fn run(a: BenchArgs) -> Result<(), CliError> {
    let opts = BenchOptions { quick: a.quick };
    if a.peers && !matches!(a.suite, Suite::E2e) {
        return Err(CliError::bad_input("--peers applies to the e2e suite only"));
    }
    let report: SuiteReport = match a.suite {
        Suite::Alloc => vlmem_bench::alloc::run(opts),
        Suite::Io => vlmem_bench::io::run(opts),
        Suite::Replay => vlmem_bench::replay::run(opts),
        Suite::E2e if a.peers => {
            vlmem_bench::e2e::run_with_peers(opts).map_err(CliError::failure)?
        }
        Suite::E2e => vlmem_bench::e2e::run(opts),
    };
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).map_err(CliError::failure)?
        );
        return Ok(());
    }
    println!("suite {}", report.suite);
    for r in &report.results {
        println!("  {:48} {:>14.3} {}", r.name, r.value, r.unit);
    }
    let peers = vlmem_bench::e2e::peer_table(&report);
    if !peers.is_empty() {
        println!("llama.cpp beside vlmem (same run, same threads):");
        for line in peers {
            println!("{line}");
        }
    }
    for n in &report.notes {
        println!("note: {n}");
    }
    Ok(())
}
