//! `vlmem`: plan, synthesize and (later) run Qwen3-VL on machines whose GPU cannot hold it.
//!
//! Exit codes: 0 success (a plan that says a model cannot run is still an answer), 1 a
//! failure while working (I/O), 2 bad input (unknown model or profile, malformed files,
//! impossible sizes). Errors are one line on stderr.

mod bench_cmd;
mod chat_cmd;
mod plan_cmd;
mod profile_cmd;
mod quantize_cmd;
mod replay_cmd;
mod run_cmd;
mod run_report;
mod serve_cmd;
mod stress_cmd;
mod synth_cmd;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "vlmem",
    version,
    about = "Run Qwen3-VL on hardware whose GPU cannot hold it: plan, synthesize, benchmark."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a Qwen3-VL checkpoint through the memory manager (greedy or sampled, CPU).
    Run(run_cmd::RunArgs),
    /// Chat with a Qwen3-VL checkpoint in the terminal (or on a pipe); images with /image.
    Chat(chat_cmd::ChatArgs),
    /// Serve a Qwen3-VL checkpoint over HTTP with OpenAI's API (chat, completions, images).
    Serve(serve_cmd::ServeArgs),
    /// Where each part of a model goes on a machine, and how fast decode can be.
    Plan(plan_cmd::PlanArgs),
    /// Write a checkpoint folder with its weights quantized (q8_0, q4_k), loaded directly.
    Quantize(quantize_cmd::QuantizeArgs),
    /// Write a checkpoint folder with a catalog model's real tensor names and shapes (random bf16).
    Synth(synth_cmd::SynthArgs),
    /// Show hardware profiles.
    Profile(profile_cmd::ProfileArgs),
    /// Measure a suite (alloc, io, replay) beside its baselines, in the same run.
    Bench(bench_cmd::BenchArgs),
    /// Hammer one manager from many threads; every tensor checksummed, a ledger check at the end.
    Stress(stress_cmd::StressArgs),
    /// Replay a Qwen3-VL-shaped workload through the memory manager (real bytes, scaled).
    Replay(replay_cmd::ReplayArgs),
    /// Run a workload through the manager, compact it, and show every statistic it keeps.
    Inspect(replay_cmd::InspectArgs),
}

/// An error and the exit code it maps to.
#[derive(Debug)]
pub struct CliError {
    code: u8,
    message: String,
}

impl CliError {
    /// Bad input: exit 2.
    pub fn bad_input(message: impl ToString) -> Self {
        CliError {
            code: 2,
            message: message.to_string(),
        }
    }
    /// A failure while working: exit 1.
    pub fn failure(message: impl ToString) -> Self {
        CliError {
            code: 1,
            message: message.to_string(),
        }
    }
}

impl From<vlmem_qwen3vl::Error> for CliError {
    fn from(e: vlmem_qwen3vl::Error) -> Self {
        use vlmem_qwen3vl::Error as E;
        match &e {
            E::Io { source, .. } if source.kind() != std::io::ErrorKind::NotFound => {
                CliError::failure(e)
            }
            _ => CliError::bad_input(e),
        }
    }
}

impl From<vlmem_core::profile::ProfileError> for CliError {
    fn from(e: vlmem_core::profile::ProfileError) -> Self {
        CliError::bad_input(e)
    }
}

/// A reader that closed the output early (`vlmem plan | head`) ends the program quietly with
/// the status a shell gives a command stopped by SIGPIPE (128 + 13), as other command-line
/// tools end, instead of a panic from `println!`.
fn quiet_on_closed_stdout() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let message = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or("");
        if message.starts_with("failed printing to stdout") && message.contains("Broken pipe") {
            std::process::exit(141);
        }
        default(info);
    }));
}

fn main() -> ExitCode {
    quiet_on_closed_stdout();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(a) => run_cmd::run(a),
        Command::Chat(a) => chat_cmd::run(a),
        Command::Serve(a) => serve_cmd::run(a),
        Command::Plan(a) => plan_cmd::run(a),
        Command::Quantize(a) => quantize_cmd::run(a),
        Command::Synth(a) => synth_cmd::run(a),
        Command::Profile(a) => profile_cmd::run(a),
        Command::Bench(a) => bench_cmd::run(a),
        Command::Replay(a) => replay_cmd::run_cmd(a),
        Command::Inspect(a) => replay_cmd::inspect_cmd(a),
        Command::Stress(a) => stress_cmd::run_cmd(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", e.message.replace('\n', " "));
            ExitCode::from(e.code)
        }
    }
}
