//! A real server on loopback over the bundled tiny checkpoint, and what the tests need to
//! talk to it.

#![allow(dead_code)]

use base64::Engine as _;
use serde_json::Value;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use vlmem_core::profile::HardwareProfile;
use vlmem_core::sync::Arc;
use vlmem_runner::{Engine, EngineError, Request, SamplingParams, SchedulerConfig};
use vlmem_server::{Backend, Generated, Generator, SchedulerBackend, Server, ServerConfig};

pub fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/qwen3-vl-tiny")
}

pub fn image_data_url() -> String {
    let bytes = std::fs::read(fixture().join("image0.png")).unwrap();
    format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}

/// The tiny checkpoint's engine, its swap in a temporary folder that lives as long.
pub struct TestEngine {
    pub engine: Arc<Engine>,
    _swap: tempfile::TempDir,
}

pub fn engine() -> TestEngine {
    let swap = tempfile::tempdir().unwrap();
    let engine = Engine::builder(fixture())
        .profile(HardwareProfile::resolve("laptop-i5-10210u-mx250").unwrap())
        .disk_path(swap.path())
        .build()
        .unwrap();
    TestEngine {
        engine: Arc::new(engine),
        _swap: swap,
    }
}

/// Seeds that make [`Rigged`] misbehave (greedy requests ignore the seed otherwise).
pub const SEED_PANIC: u64 = 666;
pub const SEED_SLOW: u64 = 777;
pub const SEED_HOLD: u64 = 888;

/// The engine, with failures a test can ask for by a request's seed: a panic, 20 ms per
/// token, or a wait until [`Rigged::release`] before generating.
pub struct Rigged {
    pub engine: Arc<Engine>,
    released: AtomicBool,
}

impl Rigged {
    pub fn new(engine: Arc<Engine>) -> Self {
        Rigged {
            engine,
            released: AtomicBool::new(false),
        }
    }

    pub fn release(&self) {
        self.released.store(true, Ordering::SeqCst);
    }
}

impl Generator for Rigged {
    fn prepare(&self, request: &Request) -> Result<Request, EngineError> {
        Generator::prepare(&*self.engine, request)
    }
    fn encode(&self, text: &str) -> Result<Vec<u32>, EngineError> {
        self.engine.encode(text)
    }
    fn generate(
        &self,
        request: &Request,
        on_token: &mut dyn FnMut(u32) -> bool,
    ) -> Result<Generated, EngineError> {
        match request.sampling.as_ref().and_then(|s| s.seed) {
            Some(SEED_PANIC) => panic!("a rigged failure"),
            Some(SEED_SLOW) => Generator::generate(&*self.engine, request, &mut |id| {
                std::thread::sleep(Duration::from_millis(20));
                on_token(id)
            }),
            Some(SEED_HOLD) => {
                while !self.released.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Generator::generate(&*self.engine, request, on_token)
            }
            _ => Generator::generate(&*self.engine, request, on_token),
        }
    }
    fn decode(&self, ids: &[u32]) -> Result<String, EngineError> {
        Generator::decode(&*self.engine, ids)
    }
    fn default_sampling(&self) -> SamplingParams {
        self.engine.default_sampling()
    }
    fn max_context_tokens(&self) -> u64 {
        Generator::max_context_tokens(&*self.engine)
    }
    fn write_metrics(&self, out: &mut String) {
        self.engine.write_metrics(out)
    }
}

/// A server running on loopback until dropped.
pub struct TestServer {
    pub url: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl TestServer {
    /// Stops it and waits for it to end.
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(20), t).await;
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

pub fn config() -> ServerConfig {
    let mut c = ServerConfig::for_model(&fixture());
    c.shutdown_grace = Duration::from_secs(5);
    c
}

/// Starts a server with `config` whose model `load` gives; returns once it is bound (the
/// model may still be loading).
pub async fn start_loading<L>(config: ServerConfig, load: L) -> TestServer
where
    L: FnOnce() -> Result<Arc<dyn Backend>, String> + Send + 'static,
{
    let server = Server::bind("127.0.0.1:0".parse().unwrap(), config)
        .await
        .unwrap();
    let url = format!("http://{}", server.local_addr());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let shutdown = async move {
            let _ = rx.await;
        };
        server.run(load, |_| {}, shutdown).await.unwrap();
    });
    TestServer {
        url,
        stop: Some(tx),
        task: Some(task),
    }
}

/// Starts a server over `backend` and waits until it is ready.
pub async fn start(config: ServerConfig, backend: Arc<dyn Backend>) -> TestServer {
    let server = start_loading(config, move || Ok(backend)).await;
    for _ in 0..500 {
        if let Ok(r) = client().get(format!("{}/health", server.url)).send().await
            && r.status() == 200
        {
            return server;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the server did not become ready");
}

/// A server over the tiny checkpoint's engine, with continuous batching (what `vlmem serve`
/// runs): up to 8 sequences together, 8 waiting.
pub async fn start_engine(config: ServerConfig) -> (TestServer, TestEngine) {
    let e = engine();
    let backend = SchedulerBackend::new(
        e.engine.clone(),
        SchedulerConfig {
            max_seqs: 8,
            max_queue: 8,
            ..SchedulerConfig::default()
        },
    );
    (start(config, Arc::new(backend)).await, e)
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap()
}

/// POSTs `body` as JSON; the status and the answer (JSON, or the raw text as a string).
pub async fn post(url: &str, body: &Value) -> (u16, Value) {
    let r = client().post(url).json_body(body).send().await.unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// `RequestBuilder::json` needs reqwest's `json` feature; the body by hand instead.
pub trait JsonBody {
    fn json_body(self, body: &Value) -> Self;
}

impl JsonBody for reqwest::RequestBuilder {
    fn json_body(self, body: &Value) -> Self {
        self.header("content-type", "application/json")
            .body(body.to_string())
    }
}

/// The `data:` payloads of a server-sent event stream, in order.
pub fn sse_data(text: &str) -> Vec<String> {
    text.split("\n\n")
        .flat_map(|event| event.lines())
        .filter_map(|l| l.strip_prefix("data: ").or(l.strip_prefix("data:")))
        .map(|d| d.to_string())
        .collect()
}

/// One metric's value in Prometheus text (the first sample whose name and labels match).
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (key, value) = l.rsplit_once(' ')?;
        (key == name).then(|| value.parse().ok())?
    })
}

/// Checks that `body` is OpenAI's error object.
pub fn assert_error_shape(body: &Value) {
    let e = &body["error"];
    assert!(e["message"].is_string(), "{body}");
    assert!(e["type"].is_string(), "{body}");
    assert!(e.get("param").is_some(), "{body}");
    assert!(e.get("code").is_some(), "{body}");
}
