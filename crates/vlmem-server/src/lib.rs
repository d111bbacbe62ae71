//! `vlmem serve`: an OpenAI-compatible HTTP server over the engine.
//!
//! - [`wire`]: the OpenAI wire types (requests, responses, stream chunks);
//! - [`error`]: every failure as OpenAI's error JSON with its HTTP status;
//! - [`media`]: image URLs (data URLs, raw base64, `file://` under an allowed folder,
//!   http(s) with a size cap and a timeout), decoded with the dimensions checked before any
//!   pixel is allocated, large images scaled down;
//! - [`backend`]: the seam between HTTP and generation ([`Backend`]: prepare a request, submit
//!   it, a stream of events back, cancelled when the stream is dropped), and today's
//!   implementation, [`EngineBackend`]: the engine's requests one at a time on a worker
//!   thread behind a bounded queue;
//! - [`text`]: token ids to text deltas that never split a character, and stop strings;
//! - [`metrics`]: the server's counters and the time-to-first-token histogram, with the
//!   engine's statistics, as Prometheus text;
//! - [`routes`]: the endpoints, authentication, body limits;
//! - [`server`]: binding, the loading phase, graceful shutdown.
//!
//! Endpoints: `POST /v1/chat/completions`, `POST /v1/completions`, `GET /v1/models`,
//! `GET /v1/models/{id}`, `GET /health` (503 while the model loads), `GET /metrics`.

pub mod backend;
pub mod batching;
pub mod error;
pub mod media;
pub mod metrics;
pub mod routes;
pub mod server;
pub mod text;
pub mod wire;

pub use backend::{
    Backend, BackendError, EngineBackend, Event, EventStream, Finish, Generated, GenerationParams,
    Generator, Load, PrepareInput, Prepared, PromptInput, Usage,
};
pub use batching::SchedulerBackend;
pub use error::ApiError;
pub use server::{ServeError, Server, ServerConfig};
