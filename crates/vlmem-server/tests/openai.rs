//! The official `openai` Python client against a real server: text chat, image chat with a
//! data URL, a streamed chat, a completion, and its error classes. Needs a Python with
//! `openai` installed, named by `VLMEM_OPENAI_PYTHON`; skipped (with the reason printed)
//! without one.

mod common;

use common::*;
use std::path::PathBuf;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_openai_client_works() {
    let Some(python) = std::env::var_os("VLMEM_OPENAI_PYTHON") else {
        eprintln!(
            "skipped: set VLMEM_OPENAI_PYTHON to a python with the openai package \
             (python3 -m venv /tmp/oaienv && /tmp/oaienv/bin/pip install openai)"
        );
        return;
    };
    let mut c = config();
    c.api_key = Some("test-key".into());
    let (server, _e) = start_engine(c).await;
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/openai_client.py");
    let url = server.url.clone();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(python)
            .arg(script)
            .arg(url)
            .arg("test-key")
            .arg(fixture().join("image0.png"))
            .output()
            .expect("run the openai client")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("6 passed, 0 failed"), "{stdout}");
    server.stop().await;
}
