//! `vlmem chat` on a pipe: plain text answers, one per message; a later turn reuses the KV
//! cache of the earlier ones (its stats line says how many tokens it prefilled and reused);
//! a turn that fails is one error line and the chat goes on; the end of input ends it;
//! Ctrl-C stops the answer being generated, not the chat.

use serde_json::Value;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures")
        .join(name)
}

fn tiny() -> String {
    fixture("qwen3-vl-tiny").display().to_string()
}

/// `vlmem chat` on the tiny fixture (greedy, the laptop's tiers) with `input` on its stdin.
fn chat(input: &str, extra: &[&str]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_vlmem"))
        .args([
            "chat",
            "--model",
            &tiny(),
            "--profile",
            "laptop-i5-10210u-mx250",
        ])
        .args(["--temperature", "0"])
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run vlmem chat");
    // A chat refused at its flags exits before reading: its stdin may be closed already.
    let _ = child.stdin.take().unwrap().write_all(input.as_bytes());
    child.wait_with_output().unwrap()
}

/// The JSON stats lines of stderr.
fn stats(out: &Output) -> Vec<Value> {
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn n(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("{key} in {v}"))
}

#[test]
fn a_message_on_a_pipe_is_answered_in_plain_text() {
    let out = chat("Hi\n/exit\n", &["--max-new-tokens", "4"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.trim().is_empty(), "an answer: {text:?}");
    assert!(text.ends_with('\n'), "the answer ends its line: {text:?}");
    assert!(!text.starts_with("> "), "no prompt on a pipe: {text:?}");
    assert!(!text.contains('\u{1b}'), "no escape sequences: {text:?}");
    // Nothing but errors and stats on stderr when stdin is not a terminal.
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_second_turn_reuses_the_first_turns_tokens() {
    let image = fixture("qwen3-vl-tiny").join("image0.png");
    let input = format!(
        "/image {}\nWhat is in the picture?\nAnd what colour is it?\n",
        image.display()
    );
    let out = chat(&input, &["--max-new-tokens", "5", "--stats"]);
    assert!(
        out.status.success(),
        "the end of input ends the chat: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let turns = stats(&out);
    assert_eq!(turns.len(), 2, "{turns:?}");
    let (first, second) = (&turns[0], &turns[1]);
    assert_eq!(n(first, "reused_tokens"), 0);
    assert_eq!(n(first, "prefilled_tokens"), n(first, "prompt_tokens"));
    // The whole first prompt (its image included) comes from the KV cache; only what
    // follows it is prefilled.
    assert!(
        n(second, "reused_tokens") >= n(first, "prompt_tokens"),
        "{second}"
    );
    assert_eq!(
        n(second, "prefilled_tokens") + n(second, "reused_tokens"),
        n(second, "prompt_tokens")
    );
    assert!(n(second, "prefilled_tokens") < n(second, "prompt_tokens") / 2);
    assert_eq!(second["kv_reuse_fallback"], Value::Null);
    // Two answers, one per line at least.
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.matches('\n').count() >= 2, "{text:?}");
}

#[test]
fn a_turn_that_fails_is_one_error_line_and_the_chat_goes_on() {
    let input =
        "/image /nonexistent/picture.png\nLook at this.\n/nonsense\nHi\n/exit\nNever sent\n";
    let out = chat(input, &["--max-new-tokens", "3", "--stats"]);
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 2, "{stderr}");
    assert!(errors[0].contains("picture.png"), "{stderr}");
    assert!(errors[1].contains("/nonsense"), "{stderr}");
    let turns = stats(&out);
    assert_eq!(
        turns.len(),
        1,
        "only \"Hi\" is answered; /exit ends: {stderr}"
    );
}

#[test]
fn bad_flags_are_bad_input() {
    let out = chat("Hi\n", &["--temperature", "hot"]);
    assert_eq!(out.status.code(), Some(2));
    let out = chat("Hi\n", &["--host-mem", "lots"]);
    assert_eq!(out.status.code(), Some(2));
}

/// Ctrl-C (SIGINT) while an answer is being generated stops that answer; the next message is
/// answered (and stopped the same way) and the chat ends normally at the end of input.
#[cfg(unix)]
#[test]
fn ctrl_c_stops_the_answer_and_not_the_chat() {
    use std::io::BufRead;
    use std::sync::{Arc, Mutex, mpsc};
    use std::time::{Duration, Instant};
    let mut child = Command::new(env!("CARGO_BIN_EXE_vlmem"))
        .args([
            "chat",
            "--model",
            &tiny(),
            "--profile",
            "laptop-i5-10210u-mx250",
        ])
        .args([
            "--temperature",
            "0",
            "--stats",
            "--max-new-tokens",
            "200000",
        ])
        .args(["--max-context-tokens", "400400"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run vlmem chat");
    let pid = child.id().to_string();
    let interrupt = || {
        let kill = Command::new("kill").args(["-INT", &pid]).status().unwrap();
        assert!(kill.success());
    };
    // The answers' bytes as they come, and the stats lines.
    let printed = Arc::new(Mutex::new(0usize));
    let mut stdout = child.stdout.take().unwrap();
    let counter = printed.clone();
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 {
                break;
            }
            *counter.lock().unwrap() += n;
        }
    });
    let (tx, stats_lines) = mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let wait_for_bytes = |more_than: usize| {
        let deadline = Instant::now() + Duration::from_secs(120);
        while *printed.lock().unwrap() <= more_than {
            assert!(Instant::now() < deadline, "no answer within two minutes");
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    let next_stats = || -> Value {
        let line = stats_lines.recv_timeout(Duration::from_secs(120)).unwrap();
        serde_json::from_str(&line).unwrap_or_else(|_| panic!("not a stats line: {line}"))
    };
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"Tell me a very long story.\n").unwrap();
    wait_for_bytes(0);
    interrupt();
    let first = next_stats();
    // The first answer's end of line, then the second answer's first byte.
    let seen = *printed.lock().unwrap();
    stdin.write_all(b"Shorter.\n").unwrap();
    wait_for_bytes(seen + 1);
    interrupt();
    let second = next_stats();
    drop(stdin);
    let status = child.wait().unwrap();
    reader.join().unwrap();
    assert!(status.success(), "{status:?}");
    for turn in [&first, &second] {
        assert_eq!(turn["cancelled"], Value::Bool(true), "{turn}");
        assert!(n(turn, "generated_tokens") < 200_000, "{turn}");
    }
    assert!(n(&second, "reused_tokens") >= n(&first, "prompt_tokens"));
}
