//! The endpoints: requests read and checked (every bad input is a 4xx with OpenAI's error
//! JSON), images fetched and decoded, the request prepared on a blocking thread, submitted to
//! the backend, and its events answered as one JSON object or as server-sent events.

use crate::backend::{
    Backend, BackendError, Event, EventStream, Finish, GenerationParams, PrepareInput, Prepared,
    PromptInput, Usage,
};
use crate::error::{ApiError, json_response};
use crate::media;
use crate::metrics::Metrics;
use crate::server::ServerConfig;
use crate::wire::{
    ChatChoice, ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, ChatMessageOut,
    ChunkChoice, Completion, CompletionChoice, CompletionRequest, Delta, GenerationFields,
    ModelCard, ModelList, PromptTokensDetails, UsageBody,
};
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{Method, StatusCode, Uri, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures_util::Stream;
use serde_json::{Value, json};
use std::collections::VecDeque;
use std::convert::Infallible;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use vlmem_core::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use vlmem_core::sync::{Arc, RwLock};
use vlmem_runner::{FinishReason, Message, Part, Role, SamplingParams};

/// Images one request may carry.
pub const MAX_IMAGES_PER_REQUEST: usize = 64;

/// Stop strings one request may give.
pub const MAX_STOP_STRINGS: usize = 16;

/// `max_tokens` of `/v1/completions` when the request sets none (OpenAI's default).
pub const DEFAULT_COMPLETION_MAX_TOKENS: usize = 16;

/// What every handler shares.
pub struct AppState {
    pub(crate) config: ServerConfig,
    backend: RwLock<Option<Arc<dyn Backend>>>,
    stopping: AtomicBool,
    /// The server's counters.
    pub metrics: Metrics,
    /// Requests decoding images or preparing at once (each a blocking thread).
    prepare_permits: tokio::sync::Semaphore,
    started_unix: u64,
    next_id: AtomicU64,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("model", &self.config.model_id)
            .field("ready", &self.backend.read().is_some())
            .finish_non_exhaustive()
    }
}

impl AppState {
    /// The state of a server for `config`, its model still loading.
    pub fn new(config: ServerConfig) -> Self {
        let permits = config.prepare_concurrency.max(1);
        AppState {
            config,
            backend: RwLock::new(None),
            stopping: AtomicBool::new(false),
            metrics: Metrics::default(),
            prepare_permits: tokio::sync::Semaphore::new(permits),
            started_unix: unix_now(),
            next_id: AtomicU64::new(0),
        }
    }

    /// The model is loaded: requests are served from now on.
    pub fn set_backend(&self, backend: Arc<dyn Backend>) {
        *self.backend.write() = Some(backend);
    }

    /// The server is shutting down: /health says so.
    pub fn set_stopping(&self) {
        self.stopping.store(true, Ordering::SeqCst);
    }

    fn backend(&self) -> Result<Arc<dyn Backend>, ApiError> {
        if self.stopping.load(Ordering::SeqCst) {
            return Err(ApiError::unavailable("the server is shutting down"));
        }
        self.backend.read().clone().ok_or_else(|| {
            ApiError::unavailable(format!(
                "the model {} is still loading: retry when GET /health answers 200",
                self.config.model_id
            ))
        })
    }

    fn check_model(&self, asked: Option<&str>) -> Result<(), ApiError> {
        match asked.map(str::trim) {
            None | Some("") => Ok(()),
            Some(m) if self.config.accepts_model(m) => Ok(()),
            Some(m) => Err(ApiError::model_not_found(m, &self.config.model_id)),
        }
    }

    fn body_rejection(&self, r: BytesRejection) -> ApiError {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::too_large(format!(
                "the request body is larger than this server's limit of {} bytes",
                self.config.max_body_bytes
            ))
        } else {
            ApiError::bad_request(format!("unreadable request body: {}", r.body_text()))
        }
    }

    fn new_id(&self, prefix: &str) -> String {
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        format!("{prefix}-{:x}{:06x}", self.started_unix, n)
    }

    /// Refuses at once (before images are fetched) a request that would find the queue
    /// full; the backend has the last word at submission.
    fn precheck_queue(&self, backend: &dyn Backend) -> Result<(), ApiError> {
        let load = backend.load();
        if load.running > 0 && load.queued >= load.max_queue {
            self.metrics.rejected.fetch_add(1, Ordering::Relaxed);
            return Err(ApiError::queue_full(load.queued, retry_after_s()));
        }
        Ok(())
    }

    /// Decodes the images and prepares the request on a blocking thread.
    async fn prepare(
        &self,
        backend: Arc<dyn Backend>,
        prompt: PromptInput,
        images: Vec<(String, Vec<u8>)>,
    ) -> Result<Prepared, ApiError> {
        let _permit = self
            .prepare_permits
            .acquire()
            .await
            .map_err(|_| ApiError::unavailable("the server is shutting down"))?;
        let media = self.config.media.clone();
        let work = move || -> Result<Prepared, ApiError> {
            let images = images
                .iter()
                .map(|(param, bytes)| media::decode(bytes, &media, param))
                .collect::<Result<Vec<_>, _>>()?;
            backend
                .prepare(PrepareInput { prompt, images })
                .map_err(api_error)
        };
        tokio::task::spawn_blocking(work).await.map_err(|e| {
            tracing::error!("preparing a request failed: {e}");
            ApiError::internal("preparing the request failed inside the server")
        })?
    }

    fn submit(
        &self,
        backend: &dyn Backend,
        prepared: Prepared,
        params: GenerationParams,
    ) -> Result<EventStream, ApiError> {
        let prompt_tokens = prepared.prompt_tokens as u64;
        match backend.submit(prepared, params) {
            Ok(s) => {
                self.metrics
                    .prompt_tokens
                    .fetch_add(prompt_tokens, Ordering::Relaxed);
                Ok(s)
            }
            Err(e) => {
                if matches!(e, BackendError::QueueFull { .. }) {
                    self.metrics.rejected.fetch_add(1, Ordering::Relaxed);
                }
                Err(api_error(e))
            }
        }
    }
}

/// Seconds a client is told to wait when the queue is full.
fn retry_after_s() -> u64 {
    1
}

/// A backend's refusal as the client sees it.
fn api_error(e: BackendError) -> ApiError {
    match e {
        BackendError::BadRequest(m) => ApiError::bad_request(m),
        BackendError::ContextTooLong(m) => ApiError::context_too_long(m),
        BackendError::QueueFull { queued } => ApiError::queue_full(queued, retry_after_s()),
        BackendError::Unavailable(m) => ApiError::unavailable(m),
        BackendError::Internal(m) => ApiError::internal(m),
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Every route, the API key check on `/v1`, the body limit, response counting and logs.
pub fn router(state: Arc<AppState>) -> Router {
    let v1 = Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/v1/models/{*id}", get(model))
        .route_layer(middleware::from_fn_with_state(state.clone(), authenticate));
    Router::new()
        .merge(v1)
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(no_route)
        .method_not_allowed_fallback(wrong_method)
        .layer(DefaultBodyLimit::max(state.config.max_body_bytes))
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .with_state(state)
}

/// Counts every response by status and logs it.
async fn observe(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    let response = next.run(req).await;
    let status = response.status();
    st.metrics.count_status(status.as_u16());
    let ms = started.elapsed().as_secs_f64() * 1e3;
    // Probes and scrapes come every few seconds: logged only when asked for.
    if matches!(path.as_str(), "/health" | "/metrics") {
        tracing::debug!("{method} {path} {} {ms:.1} ms", status.as_u16());
    } else {
        tracing::info!("{method} {path} {} {ms:.1} ms", status.as_u16());
    }
    response
}

/// `Authorization: Bearer KEY` when the server has a key.
async fn authenticate(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if let Some(key) = &st.config.api_key {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer ").or(v.strip_prefix("bearer ")))
            .map(str::trim);
        match given {
            None => {
                return ApiError::unauthorized(
                    "this server needs an API key: send 'Authorization: Bearer KEY'",
                )
                .into_response();
            }
            Some(k) if !same_secret(k.as_bytes(), key.as_bytes()) => {
                return ApiError::unauthorized("the API key is not this server's").into_response();
            }
            Some(_) => {}
        }
    }
    next.run(req).await
}

/// Compares secrets in a time that does not depend on where they differ.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    let mut diff = (a.len() != b.len()) as u8;
    for i in 0..a.len().max(b.len()) {
        diff |= a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0);
    }
    diff == 0
}

async fn no_route(method: Method, uri: Uri) -> Response {
    ApiError::no_route(method.as_str(), uri.path()).into_response()
}

async fn wrong_method(method: Method, uri: Uri) -> Response {
    ApiError::method_not_allowed(method.as_str(), uri.path()).into_response()
}

async fn health(State(st): State<Arc<AppState>>) -> Response {
    let model = &st.config.model_id;
    if st.stopping.load(Ordering::SeqCst) {
        return json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({"status": "stopping", "model": model}),
        );
    }
    match st.backend.read().as_ref() {
        Some(b) => {
            let load = b.load();
            json_response(
                StatusCode::OK,
                &json!({"status": "ok", "model": model, "running": load.running, "queued": load.queued}),
            )
        }
        None => json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({"status": "loading", "model": model}),
        ),
    }
}

async fn metrics(State(st): State<Arc<AppState>>) -> Response {
    let backend = st.backend.read().clone();
    let text = st.metrics.render(backend.as_deref());
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

fn model_card(st: &AppState) -> ModelCard {
    ModelCard {
        id: st.config.model_id.clone(),
        object: "model",
        created: st.started_unix,
        owned_by: "vlmem",
        max_model_len: st.backend.read().as_ref().map(|b| b.max_context_tokens()),
    }
}

async fn models(State(st): State<Arc<AppState>>) -> Response {
    json_response(
        StatusCode::OK,
        &ModelList {
            object: "list",
            data: vec![model_card(&st)],
        },
    )
}

async fn model(State(st): State<Arc<AppState>>, Path(id): Path<String>) -> Response {
    if st.config.accepts_model(&id) {
        json_response(StatusCode::OK, &model_card(&st))
    } else {
        ApiError::model_not_found(&id, &st.config.model_id).into_response()
    }
}

fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        let what = if e.is_syntax() || e.is_eof() {
            "malformed JSON"
        } else {
            "invalid request"
        };
        ApiError::bad_request(format!("{what}: {e}"))
    })
}

/// Image URLs in prompt order, each with the place it was given at
/// (`messages[1].content[0].image_url`).
type ImageUrls = Vec<(String, String)>;

/// A request's messages as the engine takes them, and its image URLs.
fn read_messages(values: &[Value]) -> Result<(Vec<Message>, ImageUrls), ApiError> {
    if values.is_empty() {
        return Err(ApiError::invalid_param(
            "messages",
            "messages must hold at least one message",
        ));
    }
    let mut messages = Vec::with_capacity(values.len());
    let mut images = Vec::new();
    for (i, m) in values.iter().enumerate() {
        let at = format!("messages[{i}]");
        let obj = m
            .as_object()
            .ok_or_else(|| ApiError::invalid_param(&at, format!("{at} is not an object")))?;
        let role = match obj.get("role").and_then(Value::as_str) {
            Some("system" | "developer") => Role::System,
            Some("user") => Role::User,
            Some("assistant") => Role::Assistant,
            Some(r @ ("tool" | "function")) => {
                return Err(ApiError::unsupported(
                    format!("{at}.role"),
                    format!("{at}: '{r}' messages are not supported (no tool calling)"),
                ));
            }
            Some(r) => {
                return Err(ApiError::invalid_param(
                    format!("{at}.role"),
                    format!("{at}.role '{r}' is not one of system, developer, user, assistant"),
                ));
            }
            None => {
                return Err(ApiError::invalid_param(
                    format!("{at}.role"),
                    format!("{at} has no role"),
                ));
            }
        };
        let content = match obj.get("content") {
            None | Some(Value::Null) if role == Role::Assistant => Vec::new(),
            None | Some(Value::Null) => {
                return Err(ApiError::invalid_param(
                    format!("{at}.content"),
                    format!("{at} has no content"),
                ));
            }
            Some(Value::String(s)) => vec![Part::Text(s.clone())],
            Some(Value::Array(parts)) => {
                let mut out = Vec::with_capacity(parts.len());
                for (j, p) in parts.iter().enumerate() {
                    out.push(read_part(p, &format!("{at}.content[{j}]"), &mut images)?);
                }
                out
            }
            Some(_) => {
                return Err(ApiError::invalid_param(
                    format!("{at}.content"),
                    format!("{at}.content must be a string or a list of parts"),
                ));
            }
        };
        messages.push(Message::new(role, content));
    }
    if images.len() > MAX_IMAGES_PER_REQUEST {
        return Err(ApiError::invalid_param(
            "messages",
            format!(
                "{} images in one request; this server takes at most {MAX_IMAGES_PER_REQUEST}",
                images.len()
            ),
        ));
    }
    Ok((messages, images))
}

/// One typed part of a message's content.
fn read_part(p: &Value, at: &str, images: &mut ImageUrls) -> Result<Part, ApiError> {
    let kind = p.get("type").and_then(Value::as_str).ok_or_else(|| {
        ApiError::invalid_param(format!("{at}.type"), format!("{at} has no type"))
    })?;
    match kind {
        "text" | "input_text" => {
            let text = p.get("text").and_then(Value::as_str).ok_or_else(|| {
                ApiError::invalid_param(format!("{at}.text"), format!("{at} has no text"))
            })?;
            Ok(Part::Text(text.to_string()))
        }
        "image_url" => {
            let url = match p.get("image_url") {
                Some(Value::String(u)) => Some(u.as_str()),
                Some(Value::Object(o)) => o.get("url").and_then(Value::as_str),
                _ => None,
            }
            .ok_or_else(|| {
                ApiError::invalid_param(
                    format!("{at}.image_url"),
                    format!("{at} has no image_url.url"),
                )
            })?;
            images.push((format!("{at}.image_url"), url.to_string()));
            Ok(Part::Image)
        }
        other => Err(ApiError::invalid_param(
            format!("{at}.type"),
            format!("{at}: parts of type '{other}' are not supported (text, image_url)"),
        )),
    }
}

/// `max_tokens` (or its other name) checked: at least 1.
fn read_max_tokens(value: Option<i64>, param: &str) -> Result<Option<usize>, ApiError> {
    match value {
        None => Ok(None),
        Some(n) if n >= 1 => Ok(Some(usize::try_from(n).unwrap_or(usize::MAX))),
        Some(n) => Err(ApiError::invalid_param(
            param,
            format!("{param} must be at least 1, not {n}"),
        )),
    }
}

/// The request's settings over the checkpoint's sampling, checked.
fn read_sampling(g: &GenerationFields, base: SamplingParams) -> Result<SamplingParams, ApiError> {
    let mut p = base;
    if let Some(t) = g.temperature {
        p.temperature = t as f32;
    }
    if let Some(x) = g.top_p {
        p.top_p = x as f32;
    }
    if let Some(x) = g.min_p {
        p.min_p = x as f32;
    }
    if let Some(x) = g.presence_penalty {
        p.presence_penalty = x as f32;
    }
    if let Some(x) = g.frequency_penalty {
        p.frequency_penalty = x as f32;
    }
    if let Some(x) = g.repetition_penalty {
        p.repetition_penalty = x as f32;
    }
    match g.top_k {
        None => {}
        // -1 (vLLM) and 0 keep every token.
        Some(-1 | 0) => p.top_k = 0,
        Some(k) if k > 0 => p.top_k = usize::try_from(k).unwrap_or(usize::MAX),
        Some(k) => {
            return Err(ApiError::invalid_param(
                "top_k",
                format!("top_k must be -1, 0 or positive, not {k}"),
            ));
        }
    }
    if let Some(seed) = &g.seed {
        p.seed = Some(
            seed.as_u64()
                // A negative seed is as good a seed as any: its two's complement.
                .or_else(|| seed.as_i64().map(|s| s as u64))
                .ok_or_else(|| {
                    ApiError::invalid_param("seed", format!("seed must be an integer, not {seed}"))
                })?,
        );
    }
    p.validate()
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    Ok(p)
}

/// Everything about generation but the length, which needs the prompt's.
struct Settings {
    max_tokens: Option<usize>,
    sampling: SamplingParams,
    stop: Vec<String>,
    stop_ids: Vec<u32>,
    stream: bool,
    include_usage: bool,
}

fn read_settings(
    g: &GenerationFields,
    max_tokens: Option<usize>,
    base: SamplingParams,
) -> Result<Settings, ApiError> {
    if let Some(n) = g.n
        && n != 1
    {
        return Err(ApiError::unsupported(
            "n",
            format!("n = {n}: this server generates one choice per request (n = 1)"),
        ));
    }
    let stop: Vec<String> = g.stop.clone().map(|s| s.into_vec()).unwrap_or_default();
    if stop.len() > MAX_STOP_STRINGS {
        return Err(ApiError::invalid_param(
            "stop",
            format!("{} stop strings; at most {MAX_STOP_STRINGS}", stop.len()),
        ));
    }
    let stream = g.stream.unwrap_or(false);
    Ok(Settings {
        max_tokens,
        sampling: read_sampling(g, base)?,
        stop,
        stop_ids: g.stop_token_ids.clone().unwrap_or_default(),
        stream,
        include_usage: stream
            && g.stream_options
                .as_ref()
                .and_then(|o| o.include_usage)
                .unwrap_or(false),
    })
}

/// The generation parameters once the prompt's length is known: `max_tokens` (or the rest
/// of the context) checked against the context.
fn params_for(
    s: &Settings,
    prompt_tokens: usize,
    context: u64,
    default_max: Option<usize>,
) -> Result<GenerationParams, ApiError> {
    let context = usize::try_from(context).unwrap_or(usize::MAX);
    if prompt_tokens >= context {
        return Err(ApiError::context_too_long(format!(
            "the prompt is {prompt_tokens} tokens; this server's context holds {context} tokens in all (--max-context-tokens)"
        )));
    }
    let room = context - prompt_tokens;
    let max_new_tokens = s
        .max_tokens
        .or(default_max.map(|d| d.min(room)))
        .unwrap_or(room);
    if max_new_tokens > room {
        return Err(ApiError::context_too_long(format!(
            "the prompt is {prompt_tokens} tokens and max_tokens {max_new_tokens}: more than this server's context of {context} tokens (--max-context-tokens); ask for at most {room}"
        )));
    }
    Ok(GenerationParams {
        max_new_tokens,
        sampling: s.sampling.clone(),
        stop: s.stop.clone(),
        stop_ids: s.stop_ids.clone(),
    })
}

/// Fetches every image's bytes (decoded later, on a blocking thread).
async fn fetch_images(st: &AppState, urls: ImageUrls) -> Result<Vec<(String, Vec<u8>)>, ApiError> {
    let mut out = Vec::with_capacity(urls.len());
    for (param, url) in urls {
        let bytes = media::fetch(&url, &st.config.media, &param).await?;
        out.push((param, bytes));
    }
    Ok(out)
}

fn usage_body(u: Usage) -> UsageBody {
    UsageBody {
        prompt_tokens: u.prompt_tokens,
        completion_tokens: u.completion_tokens,
        total_tokens: u.prompt_tokens + u.completion_tokens,
        prompt_tokens_details: PromptTokensDetails {
            cached_tokens: u.cached_tokens,
        },
    }
}

fn reason_str(r: FinishReason) -> &'static str {
    r.as_str()
}

/// Counts a request that ends before its last event (the client went away).
struct Disconnect<'a> {
    metrics: &'a Metrics,
    done: bool,
}

impl Drop for Disconnect<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.metrics.disconnects.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Waits for a whole reply: its text and how it ended.
async fn collect(
    st: &AppState,
    mut events: EventStream,
    arrived: Instant,
) -> Result<(String, Finish), ApiError> {
    let mut watch = Disconnect {
        metrics: &st.metrics,
        done: false,
    };
    let mut text = String::new();
    let mut first = true;
    loop {
        match events.next().await {
            Some(Event::Token { text: t, .. }) => {
                if first {
                    st.metrics.ttft.observe(arrived.elapsed());
                    first = false;
                }
                st.metrics.generated_tokens.fetch_add(1, Ordering::Relaxed);
                text.push_str(&t);
            }
            Some(Event::Finish { text: t, finish }) => {
                watch.done = true;
                text.push_str(&t);
                return Ok((text, finish));
            }
            Some(Event::Error(e)) => {
                watch.done = true;
                return Err(api_error(e));
            }
            None => {
                watch.done = true;
                return Err(ApiError::internal(
                    "the engine ended the request without an answer",
                ));
            }
        }
    }
}

async fn chat(State(st): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Response {
    let arrived = Instant::now();
    match chat_inner(st, body, arrived).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn chat_inner(
    st: Arc<AppState>,
    body: Result<Bytes, BytesRejection>,
    arrived: Instant,
) -> Result<Response, ApiError> {
    let body = body.map_err(|r| st.body_rejection(r))?;
    let req: ChatCompletionRequest = parse_json(&body)?;
    st.check_model(req.model.as_deref())?;
    let backend = st.backend()?;
    if req
        .tools
        .as_ref()
        .is_some_and(|t| !t.is_null() && t.as_array().is_none_or(|a| !a.is_empty()))
    {
        return Err(ApiError::unsupported(
            "tools",
            "tool calling is not supported by this server",
        ));
    }
    if req.logprobs == Some(true) {
        return Err(ApiError::unsupported(
            "logprobs",
            "logprobs are not supported by this server",
        ));
    }
    let max_tokens = match read_max_tokens(req.max_completion_tokens, "max_completion_tokens")? {
        Some(n) => Some(n),
        None => read_max_tokens(req.fields.max_tokens, "max_tokens")?,
    };
    let settings = read_settings(&req.fields, max_tokens, backend.default_sampling())?;
    let (messages, urls) = read_messages(&req.messages)?;
    st.precheck_queue(&*backend)?;
    let images = fetch_images(&st, urls).await?;
    let prepared = st
        .prepare(backend.clone(), PromptInput::Chat(messages), images)
        .await?;
    let params = params_for(
        &settings,
        prepared.prompt_tokens,
        backend.max_context_tokens(),
        None,
    )?;
    let events = st.submit(&*backend, prepared, params)?;
    let id = st.new_id("chatcmpl");
    let created = unix_now();
    let model = st.config.model_id.clone();
    if settings.stream {
        let format = ChatFormat {
            id,
            created,
            model,
            include_usage: settings.include_usage,
        };
        return Ok(sse(st.clone(), events, Box::new(format), arrived, None));
    }
    let (text, finish) = collect(&st, events, arrived).await?;
    Ok(json_response(
        StatusCode::OK,
        &ChatCompletion {
            id,
            object: "chat.completion",
            created,
            model,
            choices: vec![ChatChoice {
                index: 0,
                message: ChatMessageOut {
                    role: "assistant",
                    content: text,
                },
                logprobs: None,
                finish_reason: reason_str(finish.reason),
            }],
            usage: usage_body(finish.usage),
        },
    ))
}

async fn completions(
    State(st): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let arrived = Instant::now();
    match completions_inner(st, body, arrived).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

/// `/v1/completions`' prompt: a string, a list of one string, ids, or a list of one list
/// of ids.
fn read_prompt(v: &Value) -> Result<PromptInput, ApiError> {
    let ids = |a: &[Value]| -> Option<Vec<u32>> {
        a.iter()
            .map(|x| x.as_u64().and_then(|n| u32::try_from(n).ok()))
            .collect()
    };
    let bad = || {
        ApiError::invalid_param(
            "prompt",
            "prompt must be a string, a list of one string, or token ids",
        )
    };
    match v {
        Value::String(s) => Ok(PromptInput::Raw(s.clone())),
        Value::Array(a) if a.len() == 1 && a[0].is_string() => Ok(PromptInput::Raw(
            a[0].as_str().unwrap_or_default().to_string(),
        )),
        Value::Array(a) if a.len() == 1 && a[0].is_array() => a[0]
            .as_array()
            .and_then(|inner| ids(inner))
            .map(PromptInput::Ids)
            .ok_or_else(bad),
        Value::Array(a) if a.len() > 1 && (a[0].is_string() || a[0].is_array()) => {
            Err(ApiError::unsupported(
                "prompt",
                format!(
                    "{} prompts in one request: this server takes one prompt per request",
                    a.len()
                ),
            ))
        }
        Value::Array(a) if !a.is_empty() => ids(a).map(PromptInput::Ids).ok_or_else(bad),
        _ => Err(bad()),
    }
}

async fn completions_inner(
    st: Arc<AppState>,
    body: Result<Bytes, BytesRejection>,
    arrived: Instant,
) -> Result<Response, ApiError> {
    let body = body.map_err(|r| st.body_rejection(r))?;
    let req: CompletionRequest = parse_json(&body)?;
    st.check_model(req.model.as_deref())?;
    let backend = st.backend()?;
    if req.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::unsupported(
            "suffix",
            "suffix is not supported by this server",
        ));
    }
    if req
        .logprobs
        .as_ref()
        .is_some_and(|l| !l.is_null() && l != &json!(false))
    {
        return Err(ApiError::unsupported(
            "logprobs",
            "logprobs are not supported by this server",
        ));
    }
    let max_tokens = read_max_tokens(req.fields.max_tokens, "max_tokens")?;
    let settings = read_settings(&req.fields, max_tokens, backend.default_sampling())?;
    let prompt = read_prompt(&req.prompt)?;
    let echo = match (&prompt, req.echo.unwrap_or(false)) {
        (_, false) => None,
        (PromptInput::Raw(s), true) => Some(s.clone()),
        (_, true) => {
            return Err(ApiError::unsupported(
                "echo",
                "echo is supported for text prompts only",
            ));
        }
    };
    st.precheck_queue(&*backend)?;
    let prepared = st.prepare(backend.clone(), prompt, Vec::new()).await?;
    let params = params_for(
        &settings,
        prepared.prompt_tokens,
        backend.max_context_tokens(),
        Some(DEFAULT_COMPLETION_MAX_TOKENS),
    )?;
    let events = st.submit(&*backend, prepared, params)?;
    let id = st.new_id("cmpl");
    let created = unix_now();
    let model = st.config.model_id.clone();
    if settings.stream {
        let format = CompletionFormat {
            id,
            created,
            model,
            include_usage: settings.include_usage,
        };
        return Ok(sse(st.clone(), events, Box::new(format), arrived, echo));
    }
    let (text, finish) = collect(&st, events, arrived).await?;
    Ok(json_response(
        StatusCode::OK,
        &Completion {
            id,
            object: "text_completion",
            created,
            model,
            choices: vec![CompletionChoice {
                index: 0,
                text: echo.unwrap_or_default() + &text,
                logprobs: None,
                finish_reason: Some(reason_str(finish.reason)),
            }],
            usage: Some(Some(usage_body(finish.usage))),
        },
    ))
}

/// The JSON of each kind of stream chunk, per endpoint.
trait ChunkFormat: Send + Sync + 'static {
    /// The chunk before any text (chat: the role), if any.
    fn opening(&self) -> Option<String>;
    /// A chunk of new text.
    fn text(&self, text: String) -> String;
    /// The chunk that ends the choice.
    fn finish(&self, reason: &'static str) -> String;
    /// The usage chunk (no choices).
    fn usage(&self, usage: UsageBody) -> String;
    /// Whether the client asked for the usage chunk.
    fn include_usage(&self) -> bool;
}

struct ChatFormat {
    id: String,
    created: u64,
    model: String,
    include_usage: bool,
}

impl ChatFormat {
    fn chunk(&self, choices: Vec<ChunkChoice>, usage: Option<UsageBody>) -> String {
        serde_json::to_string(&ChatCompletionChunk {
            id: self.id.clone(),
            object: "chat.completion.chunk",
            created: self.created,
            model: self.model.clone(),
            choices,
            usage: self.include_usage.then_some(usage),
        })
        .unwrap_or_default()
    }

    fn choice(delta: Delta, finish_reason: Option<&'static str>) -> Vec<ChunkChoice> {
        vec![ChunkChoice {
            index: 0,
            delta,
            logprobs: None,
            finish_reason,
        }]
    }
}

impl ChunkFormat for ChatFormat {
    fn opening(&self) -> Option<String> {
        let delta = Delta {
            role: Some("assistant"),
            content: Some(String::new()),
        };
        Some(self.chunk(Self::choice(delta, None), None))
    }

    fn text(&self, text: String) -> String {
        let delta = Delta {
            role: None,
            content: Some(text),
        };
        self.chunk(Self::choice(delta, None), None)
    }

    fn finish(&self, reason: &'static str) -> String {
        self.chunk(Self::choice(Delta::default(), Some(reason)), None)
    }

    fn usage(&self, usage: UsageBody) -> String {
        self.chunk(Vec::new(), Some(usage))
    }

    fn include_usage(&self) -> bool {
        self.include_usage
    }
}

struct CompletionFormat {
    id: String,
    created: u64,
    model: String,
    include_usage: bool,
}

impl CompletionFormat {
    fn chunk(&self, choices: Vec<CompletionChoice>, usage: Option<UsageBody>) -> String {
        serde_json::to_string(&Completion {
            id: self.id.clone(),
            object: "text_completion",
            created: self.created,
            model: self.model.clone(),
            choices,
            usage: self.include_usage.then_some(usage),
        })
        .unwrap_or_default()
    }

    fn choice(text: String, finish_reason: Option<&'static str>) -> Vec<CompletionChoice> {
        vec![CompletionChoice {
            index: 0,
            text,
            logprobs: None,
            finish_reason,
        }]
    }
}

impl ChunkFormat for CompletionFormat {
    fn opening(&self) -> Option<String> {
        None
    }

    fn text(&self, text: String) -> String {
        self.chunk(Self::choice(text, None), None)
    }

    fn finish(&self, reason: &'static str) -> String {
        self.chunk(Self::choice(String::new(), Some(reason)), None)
    }

    fn usage(&self, usage: UsageBody) -> String {
        self.chunk(Vec::new(), Some(usage))
    }

    fn include_usage(&self) -> bool {
        self.include_usage
    }
}

/// A stream's state between chunks.
struct SseState {
    st: Arc<AppState>,
    events: EventStream,
    format: Box<dyn ChunkFormat>,
    arrived: Instant,
    first_token: bool,
    /// Chunks ready to go, in order.
    out: VecDeque<String>,
    finished: bool,
    /// Cleared when the stream ends as it should; a stream dropped before counts a
    /// disconnect.
    open: bool,
}

impl Drop for SseState {
    fn drop(&mut self) {
        if self.open {
            self.st.metrics.disconnects.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl SseState {
    /// Turns `event` and every event already waiting behind it into chunks: the text of
    /// consecutive tokens in one chunk.
    fn absorb(&mut self, event: Event) {
        let mut pending = String::new();
        let mut next = Some(event);
        while let Some(event) = next.take() {
            match event {
                Event::Token { text, .. } => {
                    if self.first_token {
                        self.first_token = false;
                        self.st.metrics.ttft.observe(self.arrived.elapsed());
                    }
                    self.st
                        .metrics
                        .generated_tokens
                        .fetch_add(1, Ordering::Relaxed);
                    pending.push_str(&text);
                    next = self.events.try_next();
                }
                Event::Finish { text, finish } => {
                    pending.push_str(&text);
                    if !pending.is_empty() {
                        self.out
                            .push_back(self.format.text(std::mem::take(&mut pending)));
                    }
                    self.out
                        .push_back(self.format.finish(reason_str(finish.reason)));
                    if let Some(u) = self.usage_chunk(finish.usage) {
                        self.out.push_back(u);
                    }
                    self.end();
                }
                Event::Error(e) => {
                    if !pending.is_empty() {
                        self.out
                            .push_back(self.format.text(std::mem::take(&mut pending)));
                    }
                    self.out.push_back(api_error(e).body().to_string());
                    self.end();
                }
            }
        }
        if !pending.is_empty() {
            self.out.push_back(self.format.text(pending));
        }
    }

    fn usage_chunk(&self, usage: Usage) -> Option<String> {
        self.format
            .include_usage()
            .then(|| self.format.usage(usage_body(usage)))
    }

    fn end(&mut self) {
        self.out.push_back("[DONE]".into());
        self.finished = true;
    }
}

/// A stream of server-sent events: the opening chunk, text chunks as tokens come (several
/// tokens in one chunk when they arrive together), the finishing chunk, the usage chunk when
/// asked for, `[DONE]`. A keep-alive comment every 10 s while the prompt is computed keeps
/// proxies from closing the connection and tells the server early that a client is gone.
fn sse(
    st: Arc<AppState>,
    events: EventStream,
    format: Box<dyn ChunkFormat>,
    arrived: Instant,
    echo: Option<String>,
) -> Response {
    let mut out = VecDeque::new();
    if let Some(o) = format.opening() {
        out.push_back(o);
    }
    if let Some(e) = echo.filter(|e| !e.is_empty()) {
        out.push_back(format.text(e));
    }
    let state = SseState {
        st,
        events,
        format,
        arrived,
        first_token: true,
        out,
        finished: false,
        open: true,
    };
    let stream = futures_util::stream::unfold(state, |mut s| async move {
        loop {
            if let Some(data) = s.out.pop_front() {
                if s.finished && s.out.is_empty() {
                    s.open = false;
                }
                return Some((Ok::<_, Infallible>(SseEvent::default().data(data)), s));
            }
            if s.finished {
                return None;
            }
            match s.events.next().await {
                Some(event) => s.absorb(event),
                None => s.absorb(Event::Error(BackendError::Internal(
                    "the engine ended the request without an answer".into(),
                ))),
            }
        }
    });
    sse_response(stream)
}

fn sse_response<S>(stream: S) -> Response
where
    S: Stream<Item = Result<SseEvent, Infallible>> + Send + 'static,
{
    Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(10)))
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_with_text_and_images() {
        let values: Vec<Value> = serde_json::from_str(
            r#"[{"role":"system","content":"be brief"},
                {"role":"user","content":[{"type":"image_url","image_url":{"url":"data:x"}},
                                          {"type":"text","text":"what is it?"},
                                          {"type":"image_url","image_url":"b64"}]},
                {"role":"assistant","content":null},
                {"role":"developer","content":"d"}]"#,
        )
        .unwrap();
        let (messages, images) = read_messages(&values).unwrap();
        assert_eq!(messages.len(), 4);
        assert_eq!(messages[0].role, Role::System);
        assert_eq!(messages[3].role, Role::System);
        assert_eq!(
            messages[1].content,
            vec![Part::Image, Part::Text("what is it?".into()), Part::Image]
        );
        assert_eq!(images[0].0, "messages[1].content[0].image_url");
        assert_eq!(images[1].1, "b64");
    }

    #[test]
    fn malformed_messages_name_their_place() {
        for (json, param) in [
            (r#"[]"#, "messages"),
            (r#"[1]"#, "messages[0]"),
            (r#"[{"content":"x"}]"#, "messages[0].role"),
            (r#"[{"role":"robot","content":"x"}]"#, "messages[0].role"),
            (r#"[{"role":"tool","content":"x"}]"#, "messages[0].role"),
            (r#"[{"role":"user"}]"#, "messages[0].content"),
            (r#"[{"role":"user","content":5}]"#, "messages[0].content"),
            (
                r#"[{"role":"user","content":[{"type":"audio"}]}]"#,
                "messages[0].content[0].type",
            ),
            (
                r#"[{"role":"user","content":[{"type":"image_url"}]}]"#,
                "messages[0].content[0].image_url",
            ),
            (
                r#"[{"role":"user","content":[{"text":"x"}]}]"#,
                "messages[0].content[0].type",
            ),
        ] {
            let values: Vec<Value> = serde_json::from_str(json).unwrap();
            let e = read_messages(&values).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{json}");
            assert_eq!(e.param.as_deref(), Some(param), "{json}");
        }
    }

    #[test]
    fn sampling_fields_map_onto_the_engines() {
        let g: GenerationFields = serde_json::from_str(
            r#"{"temperature":0.5,"top_p":0.9,"top_k":-1,"min_p":0.1,"seed":7,
                "presence_penalty":0.5,"frequency_penalty":-0.5}"#,
        )
        .unwrap();
        let p = read_sampling(&g, SamplingParams::greedy()).unwrap();
        assert_eq!(p.temperature, 0.5);
        assert_eq!(p.top_p, 0.9);
        assert_eq!(p.top_k, 0);
        assert_eq!(p.min_p, 0.1);
        assert_eq!(p.seed, Some(7));
        assert_eq!(p.presence_penalty, 0.5);
        assert_eq!(p.frequency_penalty, -0.5);
        for bad in [
            r#"{"temperature":-1}"#,
            r#"{"top_p":0}"#,
            r#"{"top_k":-2}"#,
            r#"{"presence_penalty":3}"#,
            r#"{"seed":1.5}"#,
        ] {
            let g: GenerationFields = serde_json::from_str(bad).unwrap();
            let e = read_sampling(&g, SamplingParams::greedy()).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{bad}");
        }
    }

    #[test]
    fn lengths_against_the_context() {
        let s = Settings {
            max_tokens: None,
            sampling: SamplingParams::greedy(),
            stop: vec![],
            stop_ids: vec![],
            stream: false,
            include_usage: false,
        };
        assert_eq!(params_for(&s, 10, 100, None).unwrap().max_new_tokens, 90);
        assert_eq!(
            params_for(&s, 10, 100, Some(16)).unwrap().max_new_tokens,
            16
        );
        assert_eq!(params_for(&s, 95, 100, Some(16)).unwrap().max_new_tokens, 5);
        assert!(params_for(&s, 100, 100, None).is_err());
        let s = Settings {
            max_tokens: Some(91),
            ..s
        };
        let e = params_for(&s, 10, 100, None).unwrap_err();
        assert_eq!(e.code, Some("context_length_exceeded"));
        assert!(read_max_tokens(Some(0), "max_tokens").is_err());
        assert!(read_max_tokens(Some(-5), "max_tokens").is_err());
        assert_eq!(read_max_tokens(Some(3), "max_tokens").unwrap(), Some(3));
    }

    #[test]
    fn completion_prompts() {
        assert_eq!(
            read_prompt(&json!("hi")).unwrap(),
            PromptInput::Raw("hi".into())
        );
        assert_eq!(
            read_prompt(&json!(["hi"])).unwrap(),
            PromptInput::Raw("hi".into())
        );
        assert_eq!(
            read_prompt(&json!([1, 2])).unwrap(),
            PromptInput::Ids(vec![1, 2])
        );
        assert_eq!(
            read_prompt(&json!([[1, 2]])).unwrap(),
            PromptInput::Ids(vec![1, 2])
        );
        assert!(read_prompt(&json!(["a", "b"])).is_err());
        assert!(read_prompt(&json!([-1])).is_err());
        assert!(read_prompt(&json!(5)).is_err());
        assert!(read_prompt(&json!([])).is_err());
    }

    #[test]
    fn secrets_compare_whole() {
        assert!(same_secret(b"abc", b"abc"));
        assert!(!same_secret(b"abc", b"abd"));
        assert!(!same_secret(b"abc", b"abcd"));
        assert!(!same_secret(b"", b"a"));
    }
}
