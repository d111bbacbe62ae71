//! `vlmem serve`: an OpenAI-compatible HTTP server over the engine (chat and text
//! completions, whole or streamed, with images; models, health, metrics).
//!
//! The address is bound first, so that `GET /health` answers 503 while the model loads and
//! 200 once it is ready (`listening on http://ADDR` is printed then, on stderr). SIGINT or
//! SIGTERM stops accepting, lets running requests finish for 30 s, stops the rest at their
//! next token and exits 0; a second Ctrl-C exits at once (130).

use crate::CliError;
use crate::run_cmd::BudgetArgs;
use clap::Args;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;
use vlmem_core::sync::Arc;
use vlmem_server::media::DEFAULT_MAX_IMAGE_PIXELS;
use vlmem_server::{Backend, SchedulerBackend, ServeError, Server, ServerConfig};

#[derive(Args)]
pub struct ServeArgs {
    /// A Hugging Face checkpoint folder (config.json, safetensors, tokenizer.json); its name
    /// is the served model's id.
    #[arg(long)]
    model: PathBuf,
    /// The address to listen on (loopback by default; 0.0.0.0 for every interface).
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// The port (0 picks a free one, printed when ready).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// The hardware and the budgets.
    #[command(flatten)]
    budget: BudgetArgs,
    /// Sequences decoded together (continuous batching: one pass over the weights per step
    /// serves them all); more requests wait in the queue.
    #[arg(long, default_value_t = 8)]
    max_seqs: usize,
    /// Requests that may wait for the engine; more are refused with 429 and Retry-After.
    #[arg(long, default_value_t = 64)]
    max_queue: usize,
    /// Prompt tokens one scheduler step computes at most: a long prompt delays the running
    /// sequences by one such piece per step (an image is never split).
    #[arg(long, default_value_t = vlmem_runner::DEFAULT_PREFILL_CHUNK_TOKENS)]
    prefill_chunk: usize,
    /// Finished requests whose prompt blocks stay in the KV pool for later requests with
    /// the same prefix (a system prompt, an image) to reuse; 0 keeps none.
    #[arg(long, default_value_t = 16)]
    kept_prompts: usize,
    /// Requests to /v1 must send `Authorization: Bearer KEY` (default: the VLMEM_API_KEY
    /// environment variable; none: no key needed).
    #[arg(long, value_name = "KEY")]
    api_key: Option<String>,
    /// `file://` image URLs are read from under this folder only (default: refused).
    #[arg(long, value_name = "DIR")]
    allowed_media_path: Option<PathBuf>,
    /// Images with more pixels are scaled down to this many, their aspect kept (the
    /// default is the preprocessor's own limit).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_IMAGE_PIXELS)]
    max_image_pixels: u64,
    /// The longest context (prompt, images and reply, tokens) of a request: sizes the KV
    /// budgets and the swap file; longer requests are refused with 400.
    #[arg(long, default_value_t = vlmem_runner::engine::DEFAULT_CONTEXT_TOKENS)]
    max_context_tokens: u64,
    /// Images of 1024 x 1024 whose embeddings the vision cache has room for (an image seen
    /// again is not encoded again); 0: no vision cache.
    #[arg(long, default_value_t = 4)]
    vision_cache_images: u64,
    /// Layers whose weights are prefetched while one computes (0 turns prefetch off).
    #[arg(long, default_value_t = vlmem_runner::managed::DEFAULT_PREFETCH_LAYERS)]
    prefetch_layers: usize,
}

/// A load failure carried through the server to the exit code.
#[derive(Debug)]
struct LoadError(CliError);

impl std::fmt::Display for LoadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.message)
    }
}

fn address(host: &str, port: u16) -> Result<SocketAddr, CliError> {
    (host, port)
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| {
            CliError::bad_input(format!("--host {host}: not an address of this machine"))
        })
}

pub fn run(a: ServeArgs) -> Result<(), CliError> {
    if a.prefill_chunk == 0 {
        return Err(CliError::bad_input("--prefill-chunk must be at least 1"));
    }
    if a.max_seqs == 0 {
        return Err(CliError::bad_input("--max-seqs must be at least 1"));
    }
    if a.max_image_pixels == 0 {
        return Err(CliError::bad_input("--max-image-pixels must be at least 1"));
    }
    let addr = address(&a.host, a.port)?;
    let builder = a
        .budget
        .builder(&a.model)?
        .prefetch_layers(a.prefetch_layers)
        .max_context_tokens(a.max_context_tokens)
        .max_seqs(a.max_seqs as u64)
        .plan_images(vec![(1024, 1024); a.vision_cache_images as usize]);
    let mut config = ServerConfig::for_model(&a.model);
    config.api_key = a
        .api_key
        .clone()
        .or_else(|| std::env::var("VLMEM_API_KEY").ok())
        .filter(|k| !k.is_empty());
    config.media.max_image_pixels = a.max_image_pixels;
    if let Some(dir) = &a.allowed_media_path {
        let real = dir.canonicalize().map_err(|e| {
            CliError::bad_input(format!("--allowed-media-path {}: {e}", dir.display()))
        })?;
        if !real.is_dir() {
            return Err(CliError::bad_input(format!(
                "--allowed-media-path {}: not a folder",
                dir.display()
            )));
        }
        config.media.allowed_media_path = Some(real);
    }
    init_logging();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("vlmem-http")
        .build()
        .map_err(|e| CliError::failure(format!("cannot start the server's runtime: {e}")))?;
    let model = a.model.clone();
    let scheduler = vlmem_runner::SchedulerConfig {
        max_seqs: a.max_seqs,
        max_queue: a.max_queue,
        prefill_chunk_tokens: a.prefill_chunk,
        kept_prompts: a.kept_prompts,
    };
    let result = runtime.block_on(async move {
        let server = Server::bind(addr, config)
            .await
            .map_err(|e| CliError::failure(format!("cannot listen on {addr}: {e}")))?;
        eprintln!(
            "vlmem serve: loading {} on http://{} (GET /health answers 503 until it is ready)",
            model.display(),
            server.local_addr()
        );
        let load = move || -> Result<Arc<dyn Backend>, LoadError> {
            let engine = builder.build().map_err(|e| LoadError(e.into()))?;
            if engine.tokenizer().is_none() {
                return Err(LoadError(CliError::bad_input(format!(
                    "{}: no tokenizer.json; vlmem serve needs one",
                    engine.model_dir().display()
                ))));
            }
            let backend = SchedulerBackend::new(Arc::new(engine), scheduler);
            Ok(Arc::new(backend))
        };
        let ready = |addr: SocketAddr| eprintln!("listening on http://{addr}");
        server
            .run(load, ready, shutdown_signal())
            .await
            .map_err(|e| match e {
                ServeError::Load(LoadError(e)) => e,
                other => CliError::failure(other),
            })
    });
    // The model may still be loading on a blocking thread (a signal during loading): do
    // not wait for it.
    runtime.shutdown_timeout(Duration::from_secs(1));
    result
}

/// SIGINT or SIGTERM; a second SIGINT afterwards exits at once.
async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
    eprintln!("vlmem serve: stopping (new requests are refused; running ones may finish)");
    tokio::spawn(async {
        if tokio::signal::ctrl_c().await.is_ok() {
            eprintln!("vlmem serve: stopped at once");
            std::process::exit(130);
        }
    });
}

/// The server's request log and warnings on stderr (`VLMEM_LOG=debug|info|warn|error|off`
/// sets the server's level; other crates log warnings and errors).
fn init_logging() {
    use std::io::IsTerminal;
    use tracing_subscriber::filter::{LevelFilter, Targets};
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let level = std::env::var("VLMEM_LOG")
        .ok()
        .and_then(|v| v.parse::<LevelFilter>().ok())
        .unwrap_or(LevelFilter::INFO);
    let filter = Targets::new()
        .with_default(LevelFilter::WARN)
        .with_target("vlmem_server", level);
    let _ = tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::stderr().is_terminal())
                .with_target(false),
        )
        .with(filter)
        .try_init();
}
