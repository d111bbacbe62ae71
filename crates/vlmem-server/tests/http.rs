//! The server end to end on loopback with the bundled tiny checkpoint: chat (text, images,
//! streamed), completions, stop strings, every error status, the API key, the queue, a
//! panic in the engine, a client leaving mid-stream, loading, metrics, image sources.

mod common;

use common::*;
use serde_json::{Value, json};
use std::time::{Duration, Instant};
use vlmem_core::sync::Arc;
use vlmem_runner::{Message, Part, Prompt, Request, SamplingParams};
use vlmem_server::{Backend, EngineBackend};

fn chat_url(s: &TestServer) -> String {
    format!("{}/v1/chat/completions", s.url)
}

fn text_request(text: &str, max_tokens: u64) -> Value {
    json!({
        "model": "qwen3-vl-tiny",
        "messages": [{"role": "user", "content": text}],
        "max_tokens": max_tokens,
        "temperature": 0
    })
}

fn image_request(url: &str, text: &str, max_tokens: u64) -> Value {
    json!({
        "model": "qwen3-vl-tiny",
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}},
            {"type": "text", "text": text}
        ]}],
        "max_tokens": max_tokens,
        "temperature": 0
    })
}

/// What the engine itself answers, greedy.
fn engine_reply(e: &TestEngine, request: Request) -> vlmem_runner::Reply {
    e.engine
        .generate(&request.sampling(SamplingParams::greedy()), &mut |_| {})
        .unwrap()
}

async fn stream_text(url: &str, body: &Value) -> (u16, Vec<String>) {
    let r = client().post(url).json_body(body).send().await.unwrap();
    let status = r.status().as_u16();
    let ct = r
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string());
    let text = r.text().await.unwrap();
    if status == 200 {
        assert_eq!(ct.as_deref(), Some("text/event-stream"));
    }
    (status, sse_data(&text))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_chat_matches_the_engine() {
    let (server, e) = start_engine(config()).await;
    let (status, body) = post(
        &chat_url(&server),
        &text_request("Describe this image.", 12),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let expected = engine_reply(&e, Request::text("Describe this image.").max_new_tokens(12));
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], "qwen3-vl-tiny");
    assert!(body["id"].as_str().unwrap().starts_with("chatcmpl-"));
    let choice = &body["choices"][0];
    assert_eq!(choice["message"]["role"], "assistant");
    assert_eq!(
        choice["message"]["content"].as_str().unwrap(),
        expected.text.as_deref().unwrap()
    );
    assert_eq!(choice["finish_reason"], expected.finish_reason.as_str());
    let usage = &body["usage"];
    assert_eq!(usage["prompt_tokens"], expected.prompt_ids.len());
    assert_eq!(usage["completion_tokens"], expected.ids.len());
    assert_eq!(
        usage["total_tokens"],
        expected.prompt_ids.len() + expected.ids.len()
    );
    assert_eq!(usage["prompt_tokens_details"]["cached_tokens"], 0);

    // A conversation with a system message and an earlier answer, as the engine renders it.
    let conversation = json!({
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": [{"type": "text", "text": "And now?"}]}
        ],
        "max_completion_tokens": 6,
        "temperature": 0
    });
    let (status, body) = post(&chat_url(&server), &conversation).await;
    assert_eq!(status, 200, "{body}");
    let expected = engine_reply(
        &e,
        Request::new(Prompt::Messages(vec![
            Message::system("Be brief."),
            Message::user(vec![Part::Text("Hi".into())]),
            Message::assistant("Hello"),
            Message::user(vec![Part::Text("And now?".into())]),
        ]))
        .max_new_tokens(6),
    );
    assert_eq!(
        body["choices"][0]["message"]["content"].as_str().unwrap(),
        expected.text.as_deref().unwrap()
    );
    assert_eq!(body["usage"]["completion_tokens"], expected.ids.len());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_chat_with_a_data_url_matches_the_engine() {
    let (server, e) = start_engine(config()).await;
    let (status, body) = post(
        &chat_url(&server),
        &image_request(&image_data_url(), "Describe this image.", 10),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let expected = engine_reply(
        &e,
        Request::text("Describe this image.")
            .image(fixture().join("image0.png"))
            .max_new_tokens(10),
    );
    assert_eq!(
        body["choices"][0]["message"]["content"].as_str().unwrap(),
        expected.text.as_deref().unwrap()
    );
    assert_eq!(body["usage"]["prompt_tokens"], expected.prompt_ids.len());
    assert_eq!(body["usage"]["completion_tokens"], expected.ids.len());
    // The image's tokens are in the prompt.
    assert!(expected.prompt_ids.len() > 50);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_chat_adds_up_to_the_whole_reply() {
    let (server, _e) = start_engine(config()).await;
    for request in [
        text_request("Describe this image.", 24),
        image_request(&image_data_url(), "What is it?", 16),
    ] {
        let (status, whole) = post(&chat_url(&server), &request).await;
        assert_eq!(status, 200, "{whole}");
        let mut streamed = request.clone();
        streamed["stream"] = json!(true);
        streamed["stream_options"] = json!({"include_usage": true});
        let (status, data) = stream_text(&chat_url(&server), &streamed).await;
        assert_eq!(status, 200);
        assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
        let chunks: Vec<Value> = data[..data.len() - 1]
            .iter()
            .map(|d| serde_json::from_str(d).unwrap())
            .collect();
        let id = chunks[0]["id"].as_str().unwrap();
        assert!(chunks.iter().all(|c| c["id"] == id));
        assert!(
            chunks
                .iter()
                .all(|c| c["object"] == "chat.completion.chunk")
        );
        assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
        let text: String = chunks
            .iter()
            .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
            .collect();
        assert_eq!(
            text,
            whole["choices"][0]["message"]["content"].as_str().unwrap()
        );
        // Text arrived in more than one chunk, and no chunk's text is empty but the
        // opening one's.
        let texts: Vec<&str> = chunks[1..]
            .iter()
            .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
            .collect();
        assert!(texts.iter().all(|t| !t.is_empty()));
        let n = chunks.len();
        // The finishing chunk, then the usage chunk with no choices; usage null before.
        assert_eq!(
            chunks[n - 2]["choices"][0]["finish_reason"],
            whole["choices"][0]["finish_reason"]
        );
        assert!(chunks[n - 1]["choices"].as_array().unwrap().is_empty());
        // The same usage, but for the prompt tokens the streamed request, coming after the
        // whole one, took from its KV blocks.
        let (mut usage, mut want) = (chunks[n - 1]["usage"].clone(), whole["usage"].clone());
        let cached = |u: &Value| {
            u["prompt_tokens_details"]["cached_tokens"]
                .as_u64()
                .unwrap()
        };
        let whole_blocks = usage["prompt_tokens"].as_u64().unwrap() > 16;
        assert!(
            cached(&usage) > cached(&want) || (!whole_blocks && cached(&usage) == 0),
            "{usage} after {want}"
        );
        usage["prompt_tokens_details"] = Value::Null;
        want["prompt_tokens_details"] = Value::Null;
        assert_eq!(usage, want);
        assert!(chunks[..n - 1].iter().all(|c| c["usage"].is_null()));
    }
    // Without include_usage, no chunk carries a usage field.
    let mut streamed = text_request("Hi", 4);
    streamed["stream"] = json!(true);
    let (_, data) = stream_text(&chat_url(&server), &streamed).await;
    for d in &data[..data.len() - 1] {
        let c: Value = serde_json::from_str(d).unwrap();
        assert!(c.get("usage").is_none(), "{c}");
        assert_eq!(c["choices"].as_array().unwrap().len(), 1);
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_strings_cut_the_reply() {
    let (server, _e) = start_engine(config()).await;
    let prompt = "Once upon a time";
    let (_, whole) = post(&chat_url(&server), &text_request(prompt, 32)).await;
    let text = whole["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    // A stop string where the reply first changes character: the reply ends before it,
    // and generation ends there too (fewer tokens than the whole reply).
    let chars: Vec<char> = text.chars().collect();
    let at = chars.iter().position(|&c| c != chars[0]).unwrap_or(0);
    assert!(
        at > 0 && at + 3 < chars.len(),
        "the fixture's reply has no place for a stop string: {text:?}"
    );
    let stop: String = chars[at..at + 3].iter().collect();
    let cut = &text[..text.find(&stop).unwrap()];
    let mut request = text_request(prompt, 32);
    request["stop"] = json!(["@@never@@", stop]);
    let (status, body) = post(&chat_url(&server), &request).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["choices"][0]["message"]["content"], cut);
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    assert!(
        body["usage"]["completion_tokens"].as_u64().unwrap()
            < whole["usage"]["completion_tokens"].as_u64().unwrap(),
        "{body} {whole}"
    );
    request["stream"] = json!(true);
    let (_, data) = stream_text(&chat_url(&server), &request).await;
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(streamed, cut);
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        "stop"
    );
    // A single string works as well.
    request["stream"] = json!(false);
    request["stop"] = json!(stop);
    let (_, body) = post(&chat_url(&server), &request).await;
    assert_eq!(body["choices"][0]["message"]["content"], cut);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_take_raw_text() {
    let (server, e) = start_engine(config()).await;
    let url = format!("{}/v1/completions", server.url);
    let (status, body) = post(
        &url,
        &json!({"model": "qwen3-vl-tiny", "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let ids = e
        .engine
        .tokenizer()
        .unwrap()
        .encode("Once upon a time")
        .unwrap();
    let expected = engine_reply(&e, Request::ids(ids.clone()).max_new_tokens(8));
    assert_eq!(body["object"], "text_completion");
    assert_eq!(
        body["choices"][0]["text"].as_str().unwrap(),
        expected.text.as_deref().unwrap()
    );
    assert_eq!(body["usage"]["prompt_tokens"], ids.len());
    // The same prompt as ids; echo; the default of 16 tokens; streamed.
    let (_, by_ids) = post(
        &url,
        &json!({"prompt": ids, "max_tokens": 8, "temperature": 0}),
    )
    .await;
    assert_eq!(by_ids["choices"][0]["text"], body["choices"][0]["text"]);
    let (_, echoed) = post(
        &url,
        &json!({"prompt": "Once upon a time", "max_tokens": 8, "temperature": 0, "echo": true}),
    )
    .await;
    assert_eq!(
        echoed["choices"][0]["text"].as_str().unwrap(),
        format!("Once upon a time{}", expected.text.as_deref().unwrap())
    );
    let (_, default_len) = post(
        &url,
        &json!({"prompt": "Once upon a time", "temperature": 0}),
    )
    .await;
    assert!(default_len["usage"]["completion_tokens"].as_u64().unwrap() <= 16);
    let (status, data) = stream_text(
        &url,
        &json!({"prompt": "Once upon a time", "max_tokens": 8, "temperature": 0, "stream": true}),
    )
    .await;
    assert_eq!(status, 200);
    let text: String = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str::<Value>(d).unwrap())
        .filter_map(|c| c["choices"][0]["text"].as_str().map(str::to_string))
        .collect();
    assert_eq!(text, expected.text.unwrap());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_and_health() {
    let (server, _e) = start_engine(config()).await;
    let r = client()
        .get(format!("{}/v1/models", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
    assert_eq!(body["object"], "list");
    assert_eq!(body["data"][0]["id"], "qwen3-vl-tiny");
    assert_eq!(body["data"][0]["object"], "model");
    assert_eq!(body["data"][0]["max_model_len"], 4096);
    let r = client()
        .get(format!("{}/v1/models/qwen3-vl-tiny", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = client()
        .get(format!("{}/v1/models/gpt-4o", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = client()
        .get(format!("{}/health", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
    assert_eq!(body["status"], "ok");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_its_status_and_openais_error_object() {
    let mut c = config();
    c.max_body_bytes = 1 << 20;
    let (server, _e) = start_engine(c).await;
    let url = chat_url(&server);
    let png_header_b64 = {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD
            .encode(vlmem_server::media::png_claiming(50_000, 50_000))
    };
    let not_an_image = "data:image/png;base64,aGVsbG8gd29ybGQ=";
    let user = |content: Value| json!({"messages": [{"role": "user", "content": content}]});
    let image = |url: &str| {
        user(
            json!([{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "x"}]),
        )
    };
    let cases: Vec<(&str, String, u16, Option<&str>)> = vec![
        ("malformed JSON", "{\"messages\": [".into(), 400, None),
        ("not an object", "[1, 2]".into(), 400, None),
        ("messages missing", "{}".into(), 400, None),
        ("messages empty", json!({"messages": []}).to_string(), 400, None),
        ("content of a wrong type", user(json!(7)).to_string(), 400, None),
        ("an unknown part", user(json!([{"type": "video"}])).to_string(), 400, None),
        ("max_tokens 0", json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}).to_string(), 400, None),
        ("max_tokens negative", json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": -1}).to_string(), 400, None),
        ("max_tokens a string", json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": "5"}).to_string(), 400, None),
        ("max_completion_tokens 0", json!({"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0}).to_string(), 400, None),
        ("n = 2", json!({"messages": [{"role": "user", "content": "x"}], "n": 2}).to_string(), 400, Some("unsupported_parameter")),
        ("temperature -1", json!({"messages": [{"role": "user", "content": "x"}], "temperature": -1}).to_string(), 400, None),
        ("top_p 0", json!({"messages": [{"role": "user", "content": "x"}], "top_p": 0}).to_string(), 400, None),
        ("presence_penalty 5", json!({"messages": [{"role": "user", "content": "x"}], "presence_penalty": 5}).to_string(), 400, None),
        ("stop of a wrong type", json!({"messages": [{"role": "user", "content": "x"}], "stop": 5}).to_string(), 400, None),
        ("tools", json!({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}).to_string(), 400, Some("unsupported_parameter")),
        ("an unknown model", json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]}).to_string(), 404, Some("model_not_found")),
        ("a data URL of bad base64", image("data:image/png;base64,@@@@").to_string(), 400, None),
        ("raw bytes that are no base64", image("%%%not base64%%%").to_string(), 400, None),
        ("base64 of bytes that are no image", image(not_an_image).to_string(), 400, None),
        ("a 50,000 x 50,000 header", image(&format!("data:image/png;base64,{png_header_b64}")).to_string(), 413, Some("request_too_large")),
        ("a file URL without --allowed-media-path", image("file:///etc/hostname").to_string(), 400, None),
        ("an unsupported scheme", image("ftp://127.0.0.1/x.png").to_string(), 400, None),
        ("more context than the engine holds", json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 100000}).to_string(), 400, Some("context_length_exceeded")),
        ("a body over the limit", format!("{{\"messages\": [{{\"role\": \"user\", \"content\": \"{}\"}}]}}", "x".repeat(2 << 20)), 413, Some("request_too_large")),
    ];
    for (what, body, status, code) in cases {
        let r = client()
            .post(&url)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), status, "{what}");
        let body: Value = serde_json::from_str(&r.text().await.unwrap())
            .unwrap_or_else(|e| panic!("{what}: the body is not JSON: {e}"));
        assert_error_shape(&body);
        if let Some(code) = code {
            assert_eq!(body["error"]["code"], code, "{what}: {body}");
        }
    }
    // Completions: the same checks where they apply.
    let url = format!("{}/v1/completions", server.url);
    for (body, status) in [
        (json!({"prompt": "x", "max_tokens": 0}), 400),
        (json!({"prompt": ["a", "b"]}), 400),
        (json!({"prompt": 5}), 400),
        (json!({"prompt": "x", "n": 3}), 400),
        (json!({"prompt": "x", "suffix": "y"}), 400),
        (json!({"prompt": "x", "logprobs": 2}), 400),
        (json!({"prompt": "x", "model": "nope"}), 404),
    ] {
        let (s, b) = post(&url, &body).await;
        assert_eq!(s, status, "{body}: {b}");
        assert_error_shape(&b);
    }
    // Routes and methods.
    let r = client()
        .get(format!("{}/v1/nothing", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_error_shape(&serde_json::from_str(&r.text().await.unwrap()).unwrap());
    let r = client()
        .get(format!("{}/v1/chat/completions", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    assert_error_shape(&serde_json::from_str(&r.text().await.unwrap()).unwrap());
    // After all that, the server still answers.
    let (status, _) = post(&chat_url(&server), &text_request("Hi", 2)).await;
    assert_eq!(status, 200);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_key_is_required_when_set() {
    let mut c = config();
    c.api_key = Some("sekret".into());
    let (server, _e) = start_engine(c).await;
    let body = text_request("Hi", 2);
    for auth in [
        None,
        Some("Bearer wrong"),
        Some("sekret"),
        Some("Bearer sekret2"),
    ] {
        let mut r = client().post(chat_url(&server)).json_body(&body);
        if let Some(a) = auth {
            r = r.header("authorization", a);
        }
        let r = r.send().await.unwrap();
        assert_eq!(r.status(), 401, "{auth:?}");
        let b: Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
        assert_error_shape(&b);
        assert_eq!(b["error"]["code"], "invalid_api_key");
    }
    let r = client()
        .post(chat_url(&server))
        .json_body(&body)
        .header("authorization", "Bearer sekret")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = client()
        .get(format!("{}/v1/models", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // Health and metrics are open (for probes and scrapers).
    for path in ["/health", "/metrics"] {
        let r = client()
            .get(format!("{}{path}", server.url))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{path}");
    }
    server.stop().await;
}

async fn metrics_text(server: &TestServer) -> String {
    client()
        .get(format!("{}/metrics", server.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

async fn wait_for(server: &TestServer, name: &str, value: f64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = metrics_text(server).await;
        if metric(&text, name) == Some(value) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name} did not reach {value}:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A request for [`Rigged`] (its reply, "\n" after "\n" on the fixture, streams a chunk
/// per token).
fn rigged(seed: u64, max_tokens: u64, stream: bool) -> Value {
    let mut r = text_request("Hi", max_tokens);
    r["seed"] = json!(seed);
    r["stream"] = json!(stream);
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_is_429_with_retry_after() {
    let e = engine();
    let generator = Arc::new(Rigged::new(e.engine.clone()));
    let backend = Arc::new(EngineBackend::new(generator.clone(), 1).unwrap());
    let server = start(config(), backend.clone()).await;
    let url = chat_url(&server);
    // One request runs (held), one waits; the third finds the queue full.
    let held = tokio::spawn({
        let url = url.clone();
        async move { post(&url, &rigged(SEED_HOLD, 3, false)).await }
    });
    wait_for(&server, "vlmem_server_requests_running", 1.0).await;
    let queued = tokio::spawn({
        let url = url.clone();
        async move { post(&url, &text_request("Hi", 3)).await }
    });
    wait_for(&server, "vlmem_server_requests_queued", 1.0).await;
    let r = client()
        .post(&url)
        .json_body(&text_request("Hi", 3))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers().get("retry-after").unwrap(), "1");
    let b: Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
    assert_error_shape(&b);
    assert_eq!(b["error"]["code"], "rate_limit_exceeded");
    let text = metrics_text(&server).await;
    assert_eq!(
        metric(&text, "vlmem_server_requests_rejected_total"),
        Some(1.0)
    );
    generator.release();
    assert_eq!(held.await.unwrap().0, 200);
    assert_eq!(queued.await.unwrap().0, 200);
    wait_for(&server, "vlmem_server_requests_running", 0.0).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_the_engine_is_a_500_and_the_server_goes_on() {
    let e = engine();
    let generator = Arc::new(Rigged::new(e.engine.clone()));
    let server = start(
        config(),
        Arc::new(EngineBackend::new(generator, 4).unwrap()),
    )
    .await;
    let (status, body) = post(&chat_url(&server), &rigged(SEED_PANIC, 4, false)).await;
    assert_eq!(status, 500, "{body}");
    assert_error_shape(&body);
    assert_eq!(body["error"]["type"], "server_error");
    // Streamed: the error comes as an event, then [DONE].
    let (status, data) = stream_text(&chat_url(&server), &rigged(SEED_PANIC, 4, true)).await;
    assert_eq!(status, 200);
    assert_eq!(data.last().unwrap(), "[DONE]");
    let error: Value = serde_json::from_str(&data[data.len() - 2]).unwrap();
    assert_error_shape(&error);
    // The next request runs.
    let (status, body) = post(&chat_url(&server), &text_request("Hi", 4)).await;
    assert_eq!(status, 200, "{body}");
    let text = metrics_text(&server).await;
    assert_eq!(metric(&text, "vlmem_server_engine_panics_total"), Some(2.0));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_mid_stream_stops_its_request() {
    let e = engine();
    let generator = Arc::new(Rigged::new(e.engine.clone()));
    let server = start(
        config(),
        Arc::new(EngineBackend::new(generator, 4).unwrap()),
    )
    .await;
    // 20 ms a token for up to 2000 tokens: 40 s unless it stops when the client leaves.
    let started = Instant::now();
    let mut r = client()
        .post(chat_url(&server))
        .json_body(&rigged(SEED_SLOW, 2000, true))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut seen = String::new();
    while !seen.contains("\"content\":\"") || seen.matches("data:").count() < 3 {
        let chunk = r.chunk().await.unwrap().expect("the stream ended early");
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    drop(r);
    wait_for(&server, "vlmem_server_engine_requests_cancelled_total", 1.0).await;
    wait_for(&server, "vlmem_server_requests_running", 0.0).await;
    wait_for(&server, "vlmem_server_disconnects_total", 1.0).await;
    // The engine is free: the next request runs at once.
    let (status, _) = post(&chat_url(&server), &text_request("Hi", 4)).await;
    assert_eq!(status, 200);
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    let text = metrics_text(&server).await;
    let generated = metric(&text, "vlmem_server_generated_tokens_total").unwrap();
    assert!(generated < 1000.0, "{generated} tokens were generated");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_503_while_the_model_loads() {
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let server = start_loading(config(), move || {
        release_rx.recv().map_err(|e| e.to_string())?;
        let e = engine();
        let backend = EngineBackend::new(e.engine.clone(), 4).map_err(|e| e.to_string())?;
        // The swap folder lives as long as the test process.
        std::mem::forget(e);
        Ok(Arc::new(backend) as Arc<dyn Backend>)
    })
    .await;
    let r = client()
        .get(format!("{}/health", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    let body: Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
    assert_eq!(body["status"], "loading");
    let (status, body) = post(&chat_url(&server), &text_request("Hi", 2)).await;
    assert_eq!(status, 503, "{body}");
    assert_error_shape(&body);
    let text = metrics_text(&server).await;
    assert_eq!(metric(&text, "vlmem_server_ready"), Some(0.0));
    release_tx.send(()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = client()
            .get(format!("{}/health", server.url))
            .send()
            .await
            .unwrap();
        if r.status() == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "never ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, _) = post(&chat_url(&server), &text_request("Hi", 2)).await;
    assert_eq!(status, 200);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_requests_tokens_and_the_engines_memory() {
    let (server, e) = start_engine(config()).await;
    let (_, a) = post(
        &chat_url(&server),
        &image_request(&image_data_url(), "What is it?", 5),
    )
    .await;
    let (_, b) = post(
        &chat_url(&server),
        &image_request(&image_data_url(), "And now?", 5),
    )
    .await;
    let prompt = a["usage"]["prompt_tokens"].as_u64().unwrap()
        + b["usage"]["prompt_tokens"].as_u64().unwrap();
    let generated = a["usage"]["completion_tokens"].as_u64().unwrap()
        + b["usage"]["completion_tokens"].as_u64().unwrap();
    let r = client()
        .get(format!("{}/metrics", server.url))
        .send()
        .await
        .unwrap();
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    let text = r.text().await.unwrap();
    assert_eq!(metric(&text, "vlmem_server_ready"), Some(1.0));
    assert_eq!(
        metric(&text, "vlmem_server_prompt_tokens_total"),
        Some(prompt as f64)
    );
    assert_eq!(
        metric(&text, "vlmem_server_generated_tokens_total"),
        Some(generated as f64)
    );
    assert_eq!(
        metric(&text, "vlmem_server_time_to_first_token_seconds_count"),
        Some(2.0)
    );
    // The readiness probe's 200 and the two chats.
    assert_eq!(
        metric(&text, "vlmem_server_responses_total{status=\"2xx\"}"),
        Some(3.0)
    );
    assert_eq!(metric(&text, "vlmem_server_requests_running"), Some(0.0));
    assert_eq!(metric(&text, "vlmem_server_requests_queued"), Some(0.0));
    // The engine's: the manager's bytes per tier and kind, the KV pool, and the vision
    // cache where the engine has one (the second request's image is then a hit).
    assert!(
        metric(&text, "vlmem_resident_bytes{tier=\"host\",kind=\"weight\"}").unwrap() > 0.0,
        "{text}"
    );
    assert!(metric(&text, "vlmem_kv_pool_blocks").is_some(), "{text}");
    if e.engine.vision_cache().is_some() {
        assert_eq!(metric(&text, "vlmem_vision_cache_misses_total"), Some(1.0));
        assert_eq!(metric(&text, "vlmem_vision_cache_hits_total"), Some(1.0));
    } else {
        assert!(metric(&text, "vlmem_vision_cache_misses_total").is_none());
    }
    assert!(
        metric(&text, "vlmem_bytes_in_total{tier=\"host\"}").is_some(),
        "{text}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_from_http_and_allowed_files() {
    // The image served over loopback by a second little server.
    let png = std::fs::read(fixture().join("image0.png")).unwrap();
    let app = axum::Router::new()
        .route(
            "/image0.png",
            axum::routing::get(move || {
                let png = png.clone();
                async move { ([("content-type", "image/png")], png) }
            }),
        )
        .route(
            "/slow.png",
            axum::routing::get(|| async {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                ""
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let images = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });

    let folder = tempfile::tempdir().unwrap();
    std::fs::copy(fixture().join("image0.png"), folder.path().join("a.png")).unwrap();
    let mut c = config();
    c.media.allowed_media_path = Some(folder.path().canonicalize().unwrap());
    let (server, _e) = start_engine(c).await;
    let (status, by_data) = post(
        &chat_url(&server),
        &image_request(&image_data_url(), "What is it?", 6),
    )
    .await;
    assert_eq!(status, 200);
    let (status, by_http) = post(
        &chat_url(&server),
        &image_request(&format!("{images}/image0.png"), "What is it?", 6),
    )
    .await;
    assert_eq!(status, 200, "{by_http}");
    assert_eq!(by_http["choices"], by_data["choices"]);
    let file_url = format!("file://{}/a.png", folder.path().display());
    let (status, by_file) = post(
        &chat_url(&server),
        &image_request(&file_url, "What is it?", 6),
    )
    .await;
    assert_eq!(status, 200, "{by_file}");
    assert_eq!(by_file["choices"], by_data["choices"]);
    // A missing image, and a file outside the folder.
    let (status, body) = post(
        &chat_url(&server),
        &image_request(&format!("{images}/missing.png"), "x", 2),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    let outside = format!("file://{}", fixture().join("image0.png").display());
    let (status, _) = post(&chat_url(&server), &image_request(&outside, "x", 2)).await;
    assert_eq!(status, 400);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_images_are_scaled_down_not_refused() {
    let mut c = config();
    c.media.max_image_pixels = 128 * 128;
    let (small, _e) = start_engine(c).await;
    let (full, _e2) = start_engine(config()).await;
    let request = image_request(&image_data_url(), "What is it?", 2);
    let (status, scaled) = post(&chat_url(&small), &request).await;
    assert_eq!(status, 200, "{scaled}");
    let (_, whole) = post(&chat_url(&full), &request).await;
    assert!(
        scaled["usage"]["prompt_tokens"].as_u64().unwrap()
            < whole["usage"]["prompt_tokens"].as_u64().unwrap()
    );
    small.stop().await;
    full.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_requests_finish_then_stops_them_after_the_grace() {
    let e = engine();
    let generator = Arc::new(Rigged::new(e.engine.clone()));
    let backend = Arc::new(EngineBackend::new(generator, 4).unwrap());
    let mut c = config();
    c.shutdown_grace = Duration::from_millis(300);
    let server = start(c, backend.clone()).await;
    // 20 ms a token for 2000 tokens: longer than the grace.
    let mut r = client()
        .post(chat_url(&server))
        .json_body(&rigged(SEED_SLOW, 2000, true))
        .send()
        .await
        .unwrap();
    let mut seen = String::new();
    while seen.matches("data:").count() < 3 {
        let chunk = r.chunk().await.unwrap().expect("the stream ended early");
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    let url = server.url.clone();
    let stopped = Instant::now();
    let stopping = tokio::spawn(server.stop());
    // The stream goes on through the grace, then ends with an error event and [DONE].
    while let Some(chunk) = r.chunk().await.unwrap() {
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    let data = sse_data(&seen);
    assert_eq!(data.last().unwrap(), "[DONE]", "{seen}");
    let error: Value = serde_json::from_str(&data[data.len() - 2]).unwrap();
    assert_error_shape(&error);
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("shutting down"),
        "{error}"
    );
    stopping.await.unwrap();
    let took = stopped.elapsed();
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(10),
        "{took:?}"
    );
    // Nothing listens any more, and the engine's worker has ended.
    assert!(client().get(format!("{url}/health")).send().await.is_err());
    assert!(backend.join(Duration::from_secs(1)));
    assert_eq!(backend.load().running, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_before_a_whole_reply_stops_its_request() {
    let e = engine();
    let generator = Arc::new(Rigged::new(e.engine.clone()));
    let server = start(
        config(),
        Arc::new(EngineBackend::new(generator, 4).unwrap()),
    )
    .await;
    // Not streamed: the client gives up after 500 ms of a 40 s reply.
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    let r = impatient
        .post(chat_url(&server))
        .json_body(&rigged(SEED_SLOW, 2000, false))
        .send()
        .await;
    assert!(r.is_err());
    wait_for(&server, "vlmem_server_engine_requests_cancelled_total", 1.0).await;
    wait_for(&server, "vlmem_server_disconnects_total", 1.0).await;
    let (status, _) = post(&chat_url(&server), &text_request("Hi", 4)).await;
    assert_eq!(status, 200);
    server.stop().await;
}

/// Eight chats at once (text and image, of several lengths) through the batching backend
/// each get the reply they get alone, and the scheduler decoded them in batches.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_chats_are_batched_and_each_equals_its_reply_alone() {
    let (server, _e) = start_engine(config()).await;
    let url = chat_url(&server);
    let image = image_data_url();
    let bodies: Vec<Value> = (0..8u64)
        .map(|i| {
            let text = format!("Request number {i}: say something.");
            if i % 3 == 0 {
                image_request(&image, &text, 6 + i)
            } else {
                text_request(&text, 6 + i)
            }
        })
        .collect();
    let mut alone = Vec::new();
    for b in &bodies {
        let (status, v) = post(&url, b).await;
        assert_eq!(status, 200, "{v}");
        alone.push(v["choices"][0]["message"]["content"].clone());
    }
    let together = futures_util::future::join_all(bodies.iter().map(|b| post(&url, b))).await;
    for (i, ((status, v), a)) in together.iter().zip(&alone).enumerate() {
        assert_eq!(*status, 200, "{v}");
        assert_eq!(&v["choices"][0]["message"]["content"], a, "request {i}");
    }
    let text = metrics_text(&server).await;
    let max_batch = metric(&text, "vlmem_scheduler_max_batch").unwrap_or(0.0);
    assert!(max_batch > 1.0, "never batched:\n{text}");
    server.stop().await;
}

/// A long system prompt and an image repeated across requests: the later requests take the
/// earlier ones' KV blocks (`cached_tokens` says how many prompt tokens) and still answer
/// exactly as the engine does alone; the metrics count the reused tokens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_system_prompt_and_image_are_reused() {
    let (server, e) = start_engine(config()).await;
    let system = "You are a careful assistant who answers in short plain sentences. ".repeat(4);
    let ask = |question: &str, image: bool| {
        let mut content = vec![json!({"type": "text", "text": question})];
        if image {
            content.insert(
                0,
                json!({"type": "image_url", "image_url": {"url": image_data_url()}}),
            );
        }
        json!({
            "model": "qwen3-vl-tiny",
            "messages": [
                {"role": "system", "content": system},
                {"role": "user", "content": content}
            ],
            "max_tokens": 6,
            "temperature": 0
        })
    };
    let mut cached = Vec::new();
    for (question, image) in [
        ("What is this?", true),
        ("What is this?", true),
        ("Name the colours.", true),
        ("Say hello.", false),
    ] {
        let (status, body) = post(&chat_url(&server), &ask(question, image)).await;
        assert_eq!(status, 200, "{body}");
        let usage = &body["usage"];
        let c = usage["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap();
        assert!(c < usage["prompt_tokens"].as_u64().unwrap(), "{usage}");
        cached.push(c);
        let mut parts = vec![Part::Text(question.into())];
        let mut request = Request::new(Prompt::Messages(vec![]));
        if image {
            parts.insert(0, Part::Image);
            request = request.image(vlmem_runner::RequestImage::Path(
                common::fixture().join("image0.png"),
            ));
        }
        request.prompt =
            Prompt::Messages(vec![Message::system(system.clone()), Message::user(parts)]);
        let expected = engine_reply(&e, request.max_new_tokens(6));
        assert_eq!(
            body["choices"][0]["message"]["content"].as_str().unwrap(),
            expected.text.as_deref().unwrap(),
            "{question}"
        );
    }
    // The first computes everything; the second takes all but the last partial block; the
    // third and fourth share the system prompt (and the third the image).
    eprintln!("cached {cached:?}");
    assert_eq!(cached[0], 0);
    assert!(cached[1] >= 32, "{cached:?}");
    assert!(cached[2] >= 32 && cached[2] <= cached[1], "{cached:?}");
    assert!(cached[3] >= 16, "{cached:?}");
    let text = metrics_text(&server).await;
    let total = metric(&text, "vlmem_scheduler_prompt_tokens_cached_total").unwrap();
    assert_eq!(total as u64, cached.iter().sum::<u64>(), "{text}");
    server.stop().await;
}
