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
    /// e2e and serve: measure llama.cpp in the same run, on the same shapes and threads (a
    /// Python environment with llama-cpp-python, built once under the cache folder: minutes).
    #[arg(long)]
    peers: bool,
    /// serve only: many concurrent clients against a real server on loopback instead.
    #[arg(long)]
    stress: bool,
    /// The streamed engine's child process of `bench serve` (internal).
    #[arg(long = "serve-child", hide = true, value_name = "SPEC")]
    serve_child: Option<std::path::PathBuf>,
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
    /// Continuous batching on the same model: 1, 4 and 16 requests at once through the
    /// scheduler, resident and streamed, beside the same requests one after another.
    Serve,
}

pub fn run(a: BenchArgs) -> Result<(), CliError> {
    let opts = BenchOptions { quick: a.quick };
    if let Some(spec) = &a.serve_child {
        return vlmem_bench::serve::serve_child(spec).map_err(CliError::failure);
    }
    if a.peers && !matches!(a.suite, Suite::E2e | Suite::Serve) {
        return Err(CliError::bad_input(
            "--peers applies to the e2e and serve suites only",
        ));
    }
    if a.stress && !matches!(a.suite, Suite::Serve) {
        return Err(CliError::bad_input(
            "--stress applies to the serve suite only",
        ));
    }
    if a.stress && a.peers {
        return Err(CliError::bad_input(
            "--stress and --peers do not go together",
        ));
    }
    let report: SuiteReport = match a.suite {
        Suite::Alloc => vlmem_bench::alloc::run(opts),
        Suite::Io => vlmem_bench::io::run(opts),
        Suite::Replay => vlmem_bench::replay::run(opts),
        Suite::E2e if a.peers => {
            vlmem_bench::e2e::run_with_peers(opts).map_err(CliError::failure)?
        }
        Suite::E2e => vlmem_bench::e2e::run(opts),
        Suite::Serve if a.stress => {
            vlmem_bench::serve::stress::run(opts).map_err(CliError::failure)?
        }
        Suite::Serve if a.peers => {
            vlmem_bench::serve::run_with_peers(opts).map_err(CliError::failure)?
        }
        Suite::Serve => vlmem_bench::serve::run(opts),
    };
    // The stress run's contracts: every broken one is a violation, and the run fails.
    let violations = report.value("stress_violations").unwrap_or(0.0);
    let outcome = if violations > 0.0 {
        Err(CliError::failure(format!(
            "the stress run broke {violations} of the server's contracts (see the notes)"
        )))
    } else {
        Ok(())
    };
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).map_err(CliError::failure)?
        );
        return outcome;
    }
    println!("suite {}", report.suite);
    for r in &report.results {
        println!("  {:48} {:>14.3} {}", r.name, r.value, r.unit);
    }
    let peers = match a.suite {
        Suite::Serve => vlmem_bench::serve::peer_table(&report),
        _ => vlmem_bench::e2e::peer_table(&report),
    };
    if !peers.is_empty() {
        println!("llama.cpp beside vlmem (same run, same threads):");
        for line in peers {
            println!("{line}");
        }
    }
    for n in &report.notes {
        println!("note: {n}");
    }
    outcome
}
