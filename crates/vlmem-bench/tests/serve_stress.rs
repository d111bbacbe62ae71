//! The server under load and faults, on loopback over the bundled tiny checkpoint with
//! continuous batching (see `vlmem_bench::serve::stress`):
//! - 64 clients at once for 25 s (8 sequences, a queue of 48): text and image chats and
//!   completions, streamed and whole, 10% of streams dropped mid-way, 5% malformed
//!   requests. Every answer is held to the request's reply alone; nothing may hang; memory
//!   stays bounded; after shutdown the scheduler's counters add up and the engine holds
//!   nothing of any request;
//! - streams whose clients leave while queued leave the queue at once;
//! - a shutdown under load ends every request within the grace, and leaves nothing.

use serde_json::json;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use vlmem_bench::serve::stress::{self, Kind, Loopback, Outcome, StressConfig};
use vlmem_core::sync::{Arc, Mutex};
use vlmem_runner::SchedulerConfig;
use vlmem_server::{Backend, SchedulerBackend};

/// One server at a time: the stress measures this process's memory and wants the CPUs.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

#[test]
fn sixty_four_clients_get_their_replies_alone_and_leave_nothing_behind() {
    let _one = ONE_AT_A_TIME.lock();
    let model = stress::default_model().unwrap();
    let config = StressConfig {
        clients: 64,
        duration: Duration::from_secs(25),
        warmup: Duration::from_secs(8),
        ..StressConfig::default()
    };
    let started = Instant::now();
    let r = stress::stress(&model, &config).unwrap();
    let took = started.elapsed();
    let summary = r.summary();
    eprintln!("{summary}");

    // Every rule of the stress held.
    assert!(r.violations.is_empty(), "{summary}");
    assert_eq!(r.mismatches, 0, "{summary}");
    assert_eq!(r.wrong_answers, 0, "{summary}");
    assert_eq!(r.hung, 0, "{summary}");
    assert_eq!(r.transport_errors, 0, "{summary}");

    // The load was what it claims: each kind of request asked and answered.
    for kind in [Kind::Text, Kind::Image, Kind::Completion] {
        assert!(
            r.count(kind, Outcome::Ok) > 0,
            "no {kind:?} answered\n{summary}"
        );
    }
    assert!(
        r.count_outcome(Outcome::Cancelled) > 0,
        "no stream was dropped\n{summary}"
    );
    for kind in Kind::MALFORMED {
        assert!(
            r.count(kind, Outcome::Refused) > 0,
            "no {kind:?} refused\n{summary}"
        );
    }
    assert!(r.requests >= 200, "{summary}");
    assert!(r.rejected * 2 <= r.requests, "{summary}");

    // The scheduler batched and ended clean; the engine holds nothing.
    assert!(r.scheduler.max_batch >= 2, "{summary}");
    assert_eq!((r.scheduler.running, r.scheduler.queued), (0, 0));
    assert_eq!(r.scheduler.completed, r.accepted, "{summary}");
    assert_eq!(r.server.failed, 0, "{summary}");
    assert_eq!(r.kv_left, (0, 0), "{summary}");
    assert_eq!(r.kv_bytes_left, 0, "{summary}");
    assert_eq!(r.audit.overlaps, 0);
    assert_eq!(r.audit.pins, 0);
    assert_eq!(r.audit.busy_entries, 0);
    assert!(r.audit.charged_matches_resident);

    // Bounded memory, and a bounded run.
    assert!(
        (r.rss_growth_bytes as f64) < config.rss_growth_bound_mib * 1024.0 * 1024.0,
        "{summary}"
    );
    assert!(
        took < config.duration + config.request_timeout + Duration::from_secs(120),
        "{took:?}"
    );
}

/// Streams whose clients leave while they wait in the queue leave the queue at once: they
/// never take the sequence slot nor run a prompt pass.
#[test]
fn streams_dropped_while_queued_never_run() {
    let _one = ONE_AT_A_TIME.lock();
    let model = stress::default_model().unwrap();
    let loaded = stress::load_engine(&model).unwrap();
    let backend = Arc::new(SchedulerBackend::new(
        loaded.engine.clone(),
        SchedulerConfig {
            max_seqs: 1,
            max_queue: 8,
            ..SchedulerConfig::default()
        },
    ));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let server = Loopback::start(&model, backend.clone()).await.unwrap();
        let url = format!("{}/v1/chat/completions", server.url);
        let http = stress::http_client(Duration::from_secs(120));
        let body = |text: &str, max_tokens: u64| {
            json!({
                "model": server.model_id,
                "messages": [{"role": "user", "content": text}],
                "max_tokens": max_tokens,
                "temperature": 0,
                "stream": true,
                "stream_options": {"include_usage": true}
            })
            .to_string()
        };
        let send = |b: String| {
            http.post(&url)
                .header("content-type", "application/json")
                .body(b)
                .send()
        };
        // The one sequence slot: a long stream, running once its first text came.
        let mut long = send(body("Tell me a long story.", 4000)).await.unwrap();
        assert_eq!(long.status(), 200);
        let mut seen = String::new();
        while !seen.contains("\"content\":\"") || seen.matches("data:").count() < 3 {
            let chunk = long.chunk().await.unwrap().expect("the stream ended early");
            seen.push_str(&String::from_utf8_lossy(&chunk));
        }
        // Six streams queued behind it, each dropped as soon as its headers came.
        for i in 0..6 {
            let r = send(body(&format!("Queued request {i}."), 8)).await.unwrap();
            assert_eq!(r.status(), 200);
            drop(r);
        }
        // The server sees each client leave, and the queue empties while the long one
        // still runs.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let text = server.metrics().await.unwrap();
            let gone = stress::metric(&text, "vlmem_server_disconnects_total").unwrap_or(0.0);
            let load = backend.load();
            if gone == 6.0 && load.queued == 0 {
                assert_eq!(load.running, 1, "the long stream ended too soon");
                break;
            }
            assert!(
                Instant::now() < deadline,
                "30 s after six queued streams were dropped: {gone} disconnects seen, {} still queued, {} running",
                load.queued,
                load.running
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // The long one's client leaves too; it ends at its next token.
        drop(long);
        let deadline = Instant::now() + Duration::from_secs(30);
        while backend.load().running > 0 {
            assert!(Instant::now() < deadline, "the long stream did not stop");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(server.stop().await.is_empty());
        // Seven ended, all cancelled; one prompt pass ran (the long one's: its prompt is one
        // piece), and none of the six queued ones took a slot.
        let stats = backend.scheduler().stats();
        assert_eq!(stats.completed, 7, "{stats:?}");
        assert_eq!(stats.prefill_chunks, 1, "{stats:?}");
        assert_eq!(stats.max_batch, 1, "{stats:?}");
        let mut text = String::new();
        backend.write_metrics(&mut text);
        assert_eq!(
            stress::metric(&text, "vlmem_server_engine_requests_cancelled_total"),
            Some(7.0),
            "{text}"
        );
    });
}

/// How one request of the shutdown test ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Ending {
    /// 200 with its whole reply (a stream: its finishing chunk, then `[DONE]`).
    Finished,
    /// A stream stopped by the shutdown: an error event saying so, then `[DONE]`.
    StoppedStream,
    /// 503 (shutting down, or a whole reply stopped) or 429, with OpenAI's error object.
    Refused,
    /// No connection, or one closed before an answer began: the server no longer accepts.
    NotAccepted,
}

/// One request of the shutdown test; `Err` is an illegal answer.
async fn ask(
    http: &reqwest::Client,
    url: &str,
    body: String,
    stream: bool,
    after_stop: bool,
) -> Result<Ending, String> {
    let r = match http
        .post(url)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
    {
        Ok(r) => r,
        Err(e) if after_stop && !e.is_timeout() => return Ok(Ending::NotAccepted),
        Err(e) => return Err(format!("sending: {e}")),
    };
    let status = r.status().as_u16();
    // An answer begun is finished, even during the shutdown.
    let text = r
        .text()
        .await
        .map_err(|e| format!("reading a {status}: {e}"))?;
    match status {
        200 if !stream => Ok(Ending::Finished),
        200 => {
            let data = stress::sse_data(&text);
            if data.last() != Some(&"[DONE]") {
                return Err(format!("a stream without [DONE]: {text}"));
            }
            let before = data[..data.len() - 1]
                .last()
                .ok_or_else(|| format!("an empty stream: {text}"))?;
            if stress::error_shape(before).is_ok() {
                if !before.contains("shutting down") {
                    return Err(format!("a stream ended by another error: {before}"));
                }
                return Ok(Ending::StoppedStream);
            }
            if !text.contains("\"finish_reason\":\"") {
                return Err(format!("a stream without its finishing chunk: {text}"));
            }
            Ok(Ending::Finished)
        }
        429 | 503 => {
            stress::error_shape(&text)?;
            Ok(Ending::Refused)
        }
        _ => Err(format!("{status}: {text}")),
    }
}

/// The server stopped while 32 clients keep it busy (long streams and whole replies, a
/// full queue): it stops within its grace and a few seconds, every request ends (finished,
/// a stream stopped with an error event and `[DONE]`, 503, or no connection once it stopped
/// accepting), no client hangs, and the engine holds nothing afterwards.
#[test]
fn shutdown_under_load_ends_every_request_and_leaves_nothing() {
    let _one = ONE_AT_A_TIME.lock();
    let model = stress::default_model().unwrap();
    let loaded = stress::load_engine(&model).unwrap();
    let backend = Arc::new(SchedulerBackend::new(
        loaded.engine.clone(),
        SchedulerConfig {
            max_seqs: 8,
            max_queue: 48,
            ..SchedulerConfig::default()
        },
    ));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    let grace = Duration::from_secs(1);
    runtime.block_on(async {
        let server = Loopback::start_with_grace(&model, backend.clone(), grace)
            .await
            .unwrap();
        let url = format!("{}/v1/chat/completions", server.url);
        let stopped = Arc::new(std::sync::OnceLock::<Instant>::new());
        let mut clients = tokio::task::JoinSet::new();
        for c in 0..32u64 {
            let (url, model_id, stopped) = (url.clone(), server.model_id.clone(), stopped.clone());
            clients.spawn(async move {
                let http = stress::http_client(Duration::from_secs(60));
                let mut endings = Vec::new();
                for i in 0u64.. {
                    let stream = (c + i).is_multiple_of(2);
                    let body = json!({
                        "model": model_id,
                        "messages": [{"role": "user", "content": format!("Client {c}, request {i}: go on.")}],
                        "max_tokens": if stream { 1000 } else { 40 },
                        "temperature": 0,
                        "stream": stream
                    })
                    .to_string();
                    let after_stop = stopped.get().is_some();
                    let ending = ask(&http, &url, body, stream, after_stop).await;
                    let done = matches!(ending, Ok(Ending::NotAccepted))
                        || stopped.get().is_some_and(|t| t.elapsed() > Duration::from_secs(5));
                    endings.push(ending);
                    if done {
                        break;
                    }
                    if matches!(endings.last(), Some(Ok(Ending::Refused))) {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
                endings
            });
        }
        // Busy: the queue fills and long streams run.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let load = backend.load();
        assert!(load.running > 0 && load.queued > 0, "{load:?}");
        stopped.set(Instant::now()).unwrap();
        let problems = server.stop().await;
        let took = stopped.get().unwrap().elapsed();
        assert!(problems.is_empty(), "{problems:?}");
        assert!(took < grace + Duration::from_secs(10), "{took:?}");
        // Every client ends, every request with a legal answer.
        let mut endings = BTreeMap::new();
        let all = async {
            while let Some(done) = clients.join_next().await {
                for e in done.unwrap() {
                    *endings.entry(e).or_insert(0u64) += 1;
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(90), all)
            .await
            .expect("a client still waits 90 s after the shutdown");
        let illegal: Vec<_> = endings.keys().filter(|e| e.is_err()).collect();
        assert!(illegal.is_empty(), "{endings:?}");
        assert!(endings.contains_key(&Ok(Ending::Finished)), "{endings:?}");
        assert!(
            endings.contains_key(&Ok(Ending::StoppedStream)),
            "no stream was stopped by the shutdown: {endings:?}"
        );
        eprintln!("stopped in {took:?}: {endings:?}");
    });
    // Nothing runs, the counters add up, and nothing of any request is left.
    let s = backend.scheduler().stats();
    assert_eq!((s.running, s.queued), (0, 0), "{s:?}");
    let mut text = String::new();
    backend.write_metrics(&mut text);
    let count = |name: &str| stress::metric(&text, name).unwrap_or(0.0) as u64;
    assert_eq!(
        count("vlmem_server_engine_requests_completed_total")
            + count("vlmem_server_engine_requests_cancelled_total")
            + count("vlmem_server_engine_requests_failed_total"),
        s.completed,
        "{text}"
    );
    assert_eq!(count("vlmem_server_engine_requests_failed_total"), 0);
    assert!(count("vlmem_server_engine_requests_cancelled_total") > 0);
    let left = stress::engine_leftovers(&loaded.engine);
    assert!(left.is_empty(), "{left:?}");
}
