//! `vlmem chat`: a conversation with a Qwen3-VL checkpoint through the memory manager, one
//! line of standard input per user message, the answer printed as it is generated. Each
//! turn reuses the KV cache of the earlier ones (only its new tokens are prefilled).
//!
//! Lines: `/image PATH` attaches an image to the next message, `/clear` forgets the
//! conversation, `/exit` (or the end of input) ends it; any other line is a message. Ctrl-C
//! during an answer stops that answer; a second Ctrl-C before it has stopped, or two at the
//! prompt, end the chat. On a pipe the output is the answers' plain text, one per line.

use crate::CliError;
use crate::run_cmd::{SamplingArgs, sampling_params};
use clap::Args;
use serde_json::json;
use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use vlmem_core::sync::Arc;
use vlmem_core::sync::atomic::{AtomicBool, Ordering};
use vlmem_runner::engine::{Conversation, Turn};
use vlmem_runner::{Engine, Part, Reply, RequestImage, SamplingParams};

#[derive(Args)]
pub struct ChatArgs {
    /// A Hugging Face checkpoint folder (config.json, safetensors, tokenizer.json).
    #[arg(long)]
    model: PathBuf,
    /// A system message ahead of the conversation.
    #[arg(long)]
    system: Option<String>,
    /// Tokens to generate at most per answer.
    #[arg(long, default_value_t = 512)]
    max_new_tokens: usize,
    /// The hardware and the budgets.
    #[command(flatten)]
    budget: crate::run_cmd::BudgetArgs,
    /// The longest conversation (every turn and answer, in tokens) the KV budgets and the
    /// swap file are sized to hold; a longer one is refused turn by turn.
    #[arg(long, default_value_t = vlmem_runner::engine::DEFAULT_CONTEXT_TOKENS)]
    max_context_tokens: u64,
    /// Layers whose weights are prefetched while one computes (0 turns prefetch off).
    #[arg(long, default_value_t = vlmem_runner::managed::DEFAULT_PREFETCH_LAYERS)]
    prefetch_layers: usize,
    /// After each answer, one JSON line on stderr: tokens prefilled and reused from the
    /// KV cache, finish reason, speed.
    #[arg(long)]
    stats: bool,
    /// How each token is chosen.
    #[command(flatten)]
    sampling: Box<SamplingArgs>,
}

/// What one line of input asks for.
#[derive(Debug, PartialEq, Eq)]
enum Line {
    /// A user message.
    Message(String),
    /// Attach an image to the next message.
    Image(PathBuf),
    /// Forget the conversation.
    Clear,
    /// End the chat.
    Exit,
    /// Nothing (an empty line).
    Empty,
    /// A command it does not know, or one without its argument.
    Unknown(String),
}

fn parse_line(line: &str) -> Line {
    let t = line.trim();
    if t.is_empty() {
        return Line::Empty;
    }
    let Some(command) = t.strip_prefix('/') else {
        return Line::Message(t.to_string());
    };
    let (name, arg) = match command.split_once(char::is_whitespace) {
        Some((n, a)) => (n, a.trim()),
        None => (command, ""),
    };
    match (name, arg) {
        ("exit" | "quit", "") => Line::Exit,
        ("clear", "") => Line::Clear,
        ("image", "") => Line::Unknown("/image needs a PATH".into()),
        ("image", path) => Line::Image(PathBuf::from(path)),
        _ => Line::Unknown(format!(
            "unknown command /{name} (commands: /image PATH, /clear, /exit)"
        )),
    }
}

/// Writes to stdout; false once stdout is gone (the reader closed the pipe).
fn out(text: &str) -> bool {
    let mut o = std::io::stdout().lock();
    o.write_all(text.as_bytes())
        .and_then(|()| o.flush())
        .is_ok()
}

pub fn run(a: ChatArgs) -> Result<(), CliError> {
    let engine = a
        .budget
        .builder(&a.model)?
        .prefetch_layers(a.prefetch_layers)
        .max_context_tokens(a.max_context_tokens)
        .build()?;
    let sampling = sampling_params(&a.sampling, engine.generation_config())?;
    let mut conv = engine.conversation()?;
    conv.set_system(a.system.clone());

    // Ctrl-C sets the flag (the answer being generated stops at its next token); a second
    // one while the flag is still set ends the process as an unhandled Ctrl-C would.
    let stop = Arc::new(AtomicBool::new(false));
    for register in [
        signal_hook::flag::register_conditional_shutdown(
            signal_hook::consts::SIGINT,
            130,
            stop.clone(),
        ),
        signal_hook::flag::register(signal_hook::consts::SIGINT, stop.clone()),
    ] {
        register.map_err(|e| CliError::failure(format!("cannot handle Ctrl-C: {e}")))?;
    }

    let interactive = std::io::stdin().is_terminal();
    let prompt = interactive && std::io::stdout().is_terminal();
    if interactive {
        eprintln!(
            "vlmem chat with {}: /image PATH attaches an image to your next message, /clear \
             forgets the conversation, /exit or Ctrl-D ends; Ctrl-C stops an answer.",
            a.model.display()
        );
    }
    let chat = Chat {
        engine: &engine,
        max_new_tokens: a.max_new_tokens,
        sampling,
        stats: a.stats,
        interactive,
        stop: &stop,
    };
    let mut images: Vec<PathBuf> = Vec::new();
    let mut turns = 0usize;
    let mut lines = std::io::stdin().lock().lines();
    loop {
        if prompt && !out("> ") {
            break;
        }
        let line = match lines.next() {
            None => break,
            Some(Ok(l)) => l,
            Some(Err(e)) => return Err(CliError::failure(format!("standard input: {e}"))),
        };
        match parse_line(&line) {
            Line::Empty => {}
            Line::Exit => break,
            Line::Clear => {
                conv.clear();
                images.clear();
                if interactive {
                    eprintln!("(the conversation is forgotten)");
                }
            }
            Line::Unknown(msg) => eprintln!("error: {msg}"),
            Line::Image(path) => {
                if interactive {
                    eprintln!("(image {} attached to your next message)", path.display());
                }
                images.push(path);
            }
            Line::Message(text) => {
                turns += 1;
                let attached = std::mem::take(&mut images);
                if !chat.answer(&mut conv, turns, text, attached) {
                    break;
                }
            }
        }
    }
    if prompt {
        out("\n");
    }
    Ok(())
}

/// A chat's settings.
struct Chat<'a> {
    engine: &'a Engine,
    max_new_tokens: usize,
    sampling: SamplingParams,
    stats: bool,
    interactive: bool,
    stop: &'a AtomicBool,
}

impl Chat<'_> {
    /// Answers one message (its images first), printing the answer as it comes; an error is
    /// one line on stderr and the chat goes on. False when stdout is gone.
    fn answer(
        &self,
        conv: &mut Conversation<'_>,
        turn_number: usize,
        text: String,
        images: Vec<PathBuf>,
    ) -> bool {
        let mut content = vec![Part::Image; images.len()];
        content.push(Part::Text(text));
        let turn = Turn::parts(
            content,
            images.into_iter().map(RequestImage::Path).collect(),
        )
        .max_new_tokens(self.max_new_tokens)
        .sampling(self.sampling.clone());
        self.stop.store(false, Ordering::SeqCst);
        let mut streamed = Vec::new();
        let mut printed = 0usize;
        let mut open = true;
        let result = conv.send(&turn, &mut |id| {
            streamed.push(id);
            if let Ok(Some(text)) = self.engine.decode(&streamed)
                && text.len() > printed
                && text.is_char_boundary(printed)
            {
                open = out(&text[printed..]);
                printed = text.len();
            }
            open && !self.stop.load(Ordering::SeqCst)
        });
        self.stop.store(false, Ordering::SeqCst);
        if !open {
            return false;
        }
        match result {
            Ok(reply) => {
                if reply.cancelled && self.interactive {
                    out(" [stopped]");
                }
                if self.stats {
                    eprintln!("{}", stats_line(turn_number, &reply));
                }
                out("\n")
            }
            Err(e) => {
                if printed > 0 {
                    out("\n");
                }
                let e: CliError = e.into();
                eprintln!("error: {}", e.message.replace('\n', " "));
                true
            }
        }
    }
}

/// One answer's statistics as a JSON line.
fn stats_line(turn: usize, reply: &Reply) -> serde_json::Value {
    let s = &reply.stats;
    json!({
        "turn": turn,
        "prompt_tokens": reply.prompt_ids.len(),
        "prefilled_tokens": s.prefilled_tokens,
        "reused_tokens": s.reused_tokens,
        "dropped_tokens": s.dropped_tokens,
        "kv_reuse_fallback": s.kv_reuse_fallback,
        "generated_tokens": reply.ids.len(),
        "finish_reason": reply.finish_reason.as_str(),
        "cancelled": reply.cancelled,
        "time_to_first_token_ms": reply.timings.time_to_first_token.as_secs_f64() * 1e3,
        "decode_tokens_per_s": reply.decode_tokens_per_s(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_messages_unless_they_are_commands() {
        assert_eq!(parse_line("  Hi there "), Line::Message("Hi there".into()));
        assert_eq!(parse_line(""), Line::Empty);
        assert_eq!(parse_line("/exit"), Line::Exit);
        assert_eq!(parse_line("/clear"), Line::Clear);
        assert_eq!(
            parse_line("/image  a b.png "),
            Line::Image(PathBuf::from("a b.png"))
        );
        assert!(matches!(parse_line("/image"), Line::Unknown(_)));
        assert!(matches!(parse_line("/exit now"), Line::Unknown(_)));
        assert!(matches!(parse_line("/help"), Line::Unknown(_)));
    }
}
