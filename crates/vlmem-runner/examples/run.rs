//! Runs a Qwen3-VL checkpoint folder on a prompt and images, greedy, on the CPU, through the
//! engine `vlmem run` uses (the memory manager with the detected host's budgets, the managed
//! weights, the paged KV pool, the vision cache, the step arena).
//!
//! ```text
//! cargo run --release -p vlmem-runner --example run -- fixtures/qwen3-vl-tiny \
//!     [--prompt TEXT | --prompt-ids 1,2,3] [--image FILE]... [--max-new-tokens N]
//! ```
//! Default: the fixture's own image0.png and "Describe this image in one sentence.".
//! Exit code 2 on bad input (missing files, bad image, ids out of vocabulary, ...).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;
use vlmem_runner::{
    Engine, EngineError, Prompt, Request, RequestImage, RunnerError, SamplingParams,
};

struct Args {
    dir: PathBuf,
    prompt: Option<String>,
    prompt_ids: Option<Vec<u32>>,
    images: Vec<PathBuf>,
    max_new_tokens: usize,
}

fn parse() -> Result<Args, String> {
    let mut it = std::env::args().skip(1);
    let mut dir = None;
    let mut args = Args {
        dir: PathBuf::new(),
        prompt: None,
        prompt_ids: None,
        images: Vec::new(),
        max_new_tokens: 16,
    };
    while let Some(a) = it.next() {
        let mut value = |flag: &str| it.next().ok_or(format!("{flag} needs a value"));
        match a.as_str() {
            "--prompt" => args.prompt = Some(value("--prompt")?),
            "--prompt-ids" => {
                let ids = value("--prompt-ids")?
                    .split(',')
                    .map(|s| {
                        s.trim()
                            .parse::<u32>()
                            .map_err(|e| format!("--prompt-ids: {e}"))
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                args.prompt_ids = Some(ids);
            }
            "--image" => args.images.push(PathBuf::from(value("--image")?)),
            "--max-new-tokens" => {
                args.max_new_tokens = value("--max-new-tokens")?
                    .parse()
                    .map_err(|e| format!("--max-new-tokens: {e}"))?;
            }
            other if other.starts_with("--") => return Err(format!("unknown flag {other}")),
            other => dir = Some(PathBuf::from(other)),
        }
    }
    args.dir = dir.ok_or(
        "usage: run DIR [--prompt TEXT | --prompt-ids IDS] [--image FILE]... [--max-new-tokens N]",
    )?;
    if args.prompt.is_none() && args.prompt_ids.is_none() && args.images.is_empty() {
        args.images.push(args.dir.join("image0.png"));
    }
    Ok(args)
}

fn run(args: Args) -> Result<(), EngineError> {
    let t0 = Instant::now();
    let prompt = match (args.prompt_ids, args.prompt) {
        (Some(ids), _) => Prompt::Ids(ids),
        (None, text) => {
            Prompt::Text(text.unwrap_or_else(|| "Describe this image in one sentence.".into()))
        }
    };
    let mut request = Request::new(prompt)
        .max_new_tokens(args.max_new_tokens)
        .sampling(SamplingParams::greedy());
    request.images = args.images.into_iter().map(RequestImage::Path).collect();
    // The tiers sized for this request's context, on the CPU; the request comes back
    // tokenized, its images preprocessed.
    let (engine, request) = Engine::builder(&args.dir).gpu_mem(0).build_for(&request)?;
    engine.check_request(&request)?;
    let open_ms = t0.elapsed().as_secs_f64() * 1e3;
    let prompt_len = match &request.prompt {
        Prompt::Ids(ids) => ids.len(),
        _ => 0,
    };
    println!(
        "prompt: {prompt_len} ids, {} image(s)",
        request.images.len()
    );
    let reply = engine.generate(&request, &mut |_| {})?;
    println!("generated ids: {:?}", reply.ids);
    println!("text: {:?}", reply.text.as_deref().unwrap_or_default());
    println!(
        "open {open_ms:.1} ms, time to first token {:.1} ms, decode {:.1} tokens/s",
        reply.timings.time_to_first_token.as_secs_f64() * 1e3,
        reply.decode_tokens_per_s()
    );
    Ok(())
}

fn main() -> ExitCode {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e @ (EngineError::Model(RunnerError::Candle(_)) | EngineError::Manager(_))) => {
            eprintln!("internal error: {e}");
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}
