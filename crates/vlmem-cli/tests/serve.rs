//! `vlmem serve` as a process: `--port 0` prints the address it took, the greedy reply over
//! HTTP equals `vlmem run`'s for the same prompt and image, a stream running when SIGTERM
//! comes finishes and the process exits 0, bad flags exit 2.

use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/qwen3-vl-tiny")
}

/// A `vlmem serve` process, killed if a test ends without stopping it.
struct Served {
    child: Child,
    url: String,
    /// Every stderr line after the address.
    lines: mpsc::Receiver<String>,
    /// The `--disk-path` folder.
    swap: tempfile::TempDir,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(extra: &[&str]) -> Served {
    let swap = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_vlmem"))
        .args([
            "serve",
            "--model",
            fixture().to_str().unwrap(),
            "--port",
            "0",
            "--profile",
            "laptop-i5-10210u-mx250",
            "--disk-path",
            swap.path().to_str().unwrap(),
        ])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start vlmem serve");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut seen = Vec::new();
    let url = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                if let Some(url) = line.strip_prefix("listening on ") {
                    break url.trim().to_string();
                }
                seen.push(line);
            }
            Err(_) => panic!("vlmem serve did not say where it listens: {seen:?}"),
        }
    };
    // The first line named the same address, before the model was loaded.
    assert!(
        seen.iter()
            .any(|l| l.contains("loading") && l.contains(&url)),
        "{seen:?}"
    );
    Served {
        child,
        url,
        lines: rx,
        swap,
    }
}

fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap()
}

fn post(url: &str, body: &Value) -> (u16, Value) {
    let r = client()
        .post(url)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .unwrap();
    let status = r.status().as_u16();
    (status, serde_json::from_str(&r.text().unwrap()).unwrap())
}

fn data_url(path: &Path) -> String {
    // Base64 by hand: the test needs no encoder crate for one file.
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let bytes = std::fs::read(path).unwrap();
    let mut out = String::new();
    for c in bytes.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= c.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    format!("data:image/png;base64,{out}")
}

fn terminate(child: &Child) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

fn wait_exit(child: &mut Child, within: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "vlmem serve did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn serve_answers_as_run_does_and_stops_cleanly_on_sigterm() {
    let mut served = serve(&[]);
    let health = client()
        .get(format!("{}/health", served.url))
        .send()
        .unwrap();
    assert_eq!(health.status(), 200);

    // The same prompt and image through `vlmem run`.
    let swap = tempfile::tempdir().unwrap();
    let image = fixture().join("image0.png");
    let out = Command::new(env!("CARGO_BIN_EXE_vlmem"))
        .args([
            "run",
            "--model",
            fixture().to_str().unwrap(),
            "--prompt",
            "Describe this image.",
            "--image",
            image.to_str().unwrap(),
            "--max-new-tokens",
            "12",
            "--profile",
            "laptop-i5-10210u-mx250",
            "--disk-path",
            swap.path().to_str().unwrap(),
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run: Value = serde_json::from_slice(&out.stdout).unwrap();

    let request = json!({
        "model": "qwen3-vl-tiny",
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url(&image)}},
            {"type": "text", "text": "Describe this image."}
        ]}],
        "max_tokens": 12,
        "temperature": 0
    });
    let (status, body) = post(&format!("{}/v1/chat/completions", served.url), &request);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["choices"][0]["message"]["content"], run["text"]);
    assert_eq!(body["choices"][0]["finish_reason"], run["finish_reason"]);
    assert_eq!(
        body["usage"]["completion_tokens"].as_u64().unwrap() as usize,
        run["generated_ids"].as_array().unwrap().len()
    );

    // A stream is running when SIGTERM comes: it finishes, then the process exits 0.
    let mut streamed = request.clone();
    streamed["stream"] = json!(true);
    streamed["max_tokens"] = json!(800);
    let mut response = client()
        .post(format!("{}/v1/chat/completions", served.url))
        .header("content-type", "application/json")
        .body(streamed.to_string())
        .send()
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut first = [0u8; 16];
    response.read_exact(&mut first).unwrap();
    let metrics = client()
        .get(format!("{}/metrics", served.url))
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert!(
        metrics.contains("\nvlmem_server_requests_running 1\n"),
        "the stream should still be running: {metrics}"
    );
    // The disk tier's swap files are open while the server runs, and already unlinked, so
    // that no exit (not even SIGKILL) leaves them behind.
    let swap_dir = served.swap.path().canonicalize().unwrap();
    let open_swap: Vec<String> = std::fs::read_dir(format!("/proc/{}/fd", served.child.id()))
        .unwrap()
        .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
        .map(|target| target.display().to_string())
        .filter(|target| target.starts_with(&*swap_dir.to_string_lossy()))
        .collect();
    assert!(!open_swap.is_empty(), "no swap file open while serving");
    assert!(
        open_swap.iter().all(|t| t.ends_with(" (deleted)")),
        "swap files still linked: {open_swap:?}"
    );
    let signalled = Instant::now();
    terminate(&served.child);
    let mut rest = String::new();
    response.read_to_string(&mut rest).unwrap();
    let text = String::from_utf8_lossy(&first).into_owned() + &rest;
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    assert!(text.contains("\"finish_reason\":\""), "{text}");
    assert!(!text.contains("\"error\""), "{text}");
    let status = wait_exit(&mut served.child, Duration::from_secs(60));
    assert_eq!(status.code(), Some(0));
    eprintln!(
        "the stream ended and the server exited {:?} after SIGTERM",
        signalled.elapsed()
    );
    let said: Vec<String> = served.lines.try_iter().collect();
    assert!(said.iter().any(|l| l.contains("stopping")), "{said:?}");
    // The swap files are gone with it.
    let left: Vec<_> = std::fs::read_dir(served.swap.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(left.is_empty(), "swap files left after the exit: {left:?}");
    // Nothing listens there any more.
    assert!(
        client()
            .get(format!("{}/health", served.url))
            .send()
            .is_err()
    );
}

#[test]
fn bad_flags_exit_2_with_one_line() {
    for args in [
        &["--max-seqs", "0"][..],
        &["--allowed-media-path", "/nonexistent/folder"][..],
        &["--host", "not a host"][..],
        &["--quant", "q3"][..],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_vlmem"))
            .args([
                "serve",
                "--model",
                fixture().to_str().unwrap(),
                "--port",
                "0",
            ])
            .args(args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.starts_with("error: "), "{args:?}: {stderr}");
    }
    // A model folder that does not exist: the server binds, the load fails, exit 2.
    let out = Command::new(env!("CARGO_BIN_EXE_vlmem"))
        .args(["serve", "--model", "/nonexistent/model", "--port", "0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.lines().any(|l| l.starts_with("error: ")), "{stderr}");
}
