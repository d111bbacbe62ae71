//! Binding, the loading phase and shutdown.
//!
//! [`Server::bind`] takes the address first, so that `/health` answers 503 while the model
//! loads ([`Server::run`]'s `load`, on a blocking thread) and 200 once it is ready. When the
//! `shutdown` future completes (SIGINT or SIGTERM in `vlmem serve`), the server stops
//! accepting connections and taking requests, lets the running ones finish for
//! [`ServerConfig::shutdown_grace`], then stops them at their next token, and returns.

use crate::backend::Backend;
use crate::media::MediaConfig;
use crate::routes::{AppState, router};
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;
use vlmem_core::sync::Arc;

/// The largest request body by default (a data URL of a large image fits).
pub const DEFAULT_MAX_BODY_BYTES: usize = 64 << 20;

/// How long running requests may go on after a shutdown signal, by default.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// What a server serves and how.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The served model's id (the model folder's name).
    pub model_id: String,
    /// Other names a request may give for it (the folder as given on the command line).
    pub model_aliases: Vec<String>,
    /// Requests to `/v1` must send `Authorization: Bearer KEY` when set.
    pub api_key: Option<String>,
    /// How images are read.
    pub media: MediaConfig,
    /// The largest request body (413 above).
    pub max_body_bytes: usize,
    /// How long running requests may go on after a shutdown signal before they are stopped.
    pub shutdown_grace: Duration,
    /// Requests decoding images or preparing at once.
    pub prepare_concurrency: usize,
}

impl ServerConfig {
    /// Serving the checkpoint folder `model_dir` (its name is the model's id), default
    /// limits, no API key, `file://` URLs refused.
    pub fn for_model(model_dir: &Path) -> Self {
        let model_id = model_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| model_dir.display().to_string());
        ServerConfig {
            model_id,
            model_aliases: vec![model_dir.display().to_string()],
            api_key: None,
            media: MediaConfig::new(None),
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
            prepare_concurrency: std::thread::available_parallelism().map_or(2, |n| n.get()),
        }
    }

    /// Whether a request's `model` names the served model: its id, an alias, or a path (or
    /// hub name, `org/name`) whose last part is the id.
    pub fn accepts_model(&self, asked: &str) -> bool {
        asked == self.model_id
            || self.model_aliases.iter().any(|a| a == asked)
            || Path::new(asked)
                .file_name()
                .is_some_and(|n| n.to_string_lossy() == self.model_id)
    }
}

/// Why a server stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError<E: std::fmt::Display + std::fmt::Debug> {
    /// The socket failed.
    #[error("the server's socket failed: {0}")]
    Io(#[from] std::io::Error),
    /// The model did not load.
    #[error("{0}")]
    Load(E),
    /// Loading the model panicked.
    #[error("loading the model failed: {0}")]
    LoadPanicked(String),
}

/// A bound server, its model not yet loaded.
#[derive(Debug)]
pub struct Server {
    listener: tokio::net::TcpListener,
    addr: SocketAddr,
    config: ServerConfig,
}

impl Server {
    /// Binds `addr` (port 0 picks a free port: see [`Server::local_addr`]).
    pub async fn bind(addr: SocketAddr, config: ServerConfig) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        Ok(Server {
            listener,
            addr,
            config,
        })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves: `/health` answers 503 while `load` runs (on a blocking thread), then every
    /// endpoint works and `on_ready` is called; when `shutdown` completes, the server
    /// drains (see the module documentation) and returns. A failed `load` stops the server
    /// and is returned.
    pub async fn run<L, E, R, S>(
        self,
        load: L,
        on_ready: R,
        shutdown: S,
    ) -> Result<(), ServeError<E>>
    where
        L: FnOnce() -> Result<Arc<dyn Backend>, E> + Send + 'static,
        E: std::fmt::Display + std::fmt::Debug + Send + 'static,
        R: FnOnce(SocketAddr),
        S: Future<Output = ()>,
    {
        let grace = self.config.shutdown_grace;
        let state = Arc::new(AppState::new(self.config));
        let app = router(state.clone());
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let serve = axum::serve(self.listener, app).with_graceful_shutdown(async move {
            let _ = stop_rx.await;
        });
        let mut server = tokio::spawn(async move { serve.await });
        let mut loader = tokio::task::spawn_blocking(load);
        let mut shutdown = std::pin::pin!(shutdown);

        let backend = tokio::select! {
            loaded = &mut loader => match loaded {
                Ok(Ok(backend)) => backend,
                Ok(Err(e)) => {
                    stop(&state, stop_tx, server, grace).await;
                    return Err(ServeError::Load(e));
                }
                Err(e) => {
                    stop(&state, stop_tx, server, grace).await;
                    return Err(ServeError::LoadPanicked(e.to_string()));
                }
            },
            () = &mut shutdown => {
                tracing::info!("stopping while the model loads");
                stop(&state, stop_tx, server, grace).await;
                return Ok(());
            }
            ended = &mut server => {
                return Err(server_ended(ended));
            }
        };
        state.set_backend(backend.clone());
        on_ready(self.addr);

        tokio::select! {
            () = &mut shutdown => {}
            ended = &mut server => {
                backend.close();
                backend.cancel_all();
                return Err(server_ended(ended));
            }
        }
        tracing::info!(
            "shutting down: no new requests; running ones have {} s to finish",
            grace.as_secs_f64()
        );
        backend.close();
        state.set_stopping();
        let _ = stop_tx.send(());
        if tokio::time::timeout(grace, &mut server).await.is_err() {
            tracing::warn!("requests still running after {grace:?}: stopping them");
            backend.cancel_all();
            if tokio::time::timeout(Duration::from_secs(5), &mut server)
                .await
                .is_err()
            {
                server.abort();
            }
        }
        let b = backend.clone();
        let _ = tokio::task::spawn_blocking(move || b.join(Duration::from_secs(5))).await;
        Ok(())
    }
}

/// Stops accepting and waits (at most `grace`) for the open connections.
async fn stop(
    state: &AppState,
    stop_tx: tokio::sync::oneshot::Sender<()>,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
    grace: Duration,
) {
    state.set_stopping();
    let _ = stop_tx.send(());
    let _ = tokio::time::timeout(grace, server).await;
}

fn server_ended<E: std::fmt::Display + std::fmt::Debug>(
    ended: Result<std::io::Result<()>, tokio::task::JoinError>,
) -> ServeError<E> {
    match ended {
        Ok(Err(e)) => ServeError::Io(e),
        Ok(Ok(())) => ServeError::Io(std::io::Error::other("the server stopped by itself")),
        Err(e) => ServeError::Io(std::io::Error::other(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_model_answers_to_its_folders_name() {
        let c = ServerConfig::for_model(Path::new("fixtures/qwen3-vl-tiny"));
        assert_eq!(c.model_id, "qwen3-vl-tiny");
        for ok in [
            "qwen3-vl-tiny",
            "fixtures/qwen3-vl-tiny",
            "fixtures/qwen3-vl-tiny/",
            "/somewhere/qwen3-vl-tiny",
            "Qwen/qwen3-vl-tiny",
        ] {
            assert!(c.accepts_model(ok), "{ok}");
        }
        for bad in ["gpt-4o", "qwen3-vl-tiny-2", "qwen3-vl-tiny/x", ""] {
            assert!(!c.accepts_model(bad), "{bad}");
        }
    }
}
