//! Chat templates: conversations rendered to prompt text the way Hugging Face
//! `apply_chat_template` renders them, then encoded with each image's placeholder expanded
//! to the image's tokens.
//!
//! A checkpoint folder names its template in `chat_template.json`, `chat_template.jinja` or
//! `tokenizer_config.json`'s `chat_template`, looked for in that order (the order
//! transformers' processor uses). A folder with none renders with the built-in template:
//! the one the released Qwen3-VL Instruct checkpoints ship, byte for byte. It adds no default
//! system prompt and takes each message's content as a string or as a list of typed parts
//! (`text`, `image`, `video`), so an image can sit anywhere in a user turn.
//!
//! Templates run in [minijinja] configured as transformers configures Jinja2: `trim_blocks`
//! and `lstrip_blocks` on, the trailing newline dropped, loop controls, no HTML escaping, a
//! `tojson` that writes JSON as Python's `json.dumps` does (`", "` and `": "` separators,
//! non-ASCII kept, keys in their order), `raise_exception(message)`, and Python's string
//! and dict methods (`startswith`, `split`, `strip`, `items`, ...). A template that does not
//! compile, that raises, or that fails while rendering is a [`RunnerError::BadRequest`]
//! carrying the template's own message; nothing here panics on a bad template or bad JSON.

use crate::error::{Result, RunnerError};
use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{AutoEscape, Environment, Error, ErrorKind};
use std::fmt;
use std::path::{Path, PathBuf};

/// `chat_template.json`: `{"chat_template": "..."}`, as processors save it.
pub const CHAT_TEMPLATE_JSON: &str = "chat_template.json";
/// `chat_template.jinja`: the template as plain text.
pub const CHAT_TEMPLATE_JINJA: &str = "chat_template.jinja";
/// `tokenizer_config.json`, whose `chat_template` key may hold the template.
pub const TOKENIZER_CONFIG_JSON: &str = "tokenizer_config.json";

/// The chat template the released Qwen3-VL Instruct checkpoints ship (their
/// `chat_template.json`), used when a checkpoint folder has none.
pub const QWEN3_VL_CHAT_TEMPLATE: &str = include_str!("qwen3_vl_chat_template.jinja");

/// The text that stands for one image in a rendered prompt until its tokens are known.
pub const IMAGE_PLACEHOLDER: &str = "<|image_pad|>";

/// The name the template is compiled under (it shows in error locations).
const TEMPLATE_NAME: &str = "chat_template";

/// Who speaks a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Instructions ahead of the conversation.
    System,
    /// The person asking.
    User,
    /// The model's earlier replies.
    Assistant,
}

impl Role {
    /// The role's name in a chat template (`system`, `user`, `assistant`).
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One piece of a message's content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    /// Text, written as is.
    Text(String),
    /// The next image of the request (images are numbered in the order they appear across
    /// the whole conversation).
    Image,
}

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Who speaks.
    pub role: Role,
    /// What is said, in order.
    pub content: Vec<Part>,
}

impl Message {
    /// A message of `role` with `content`.
    pub fn new(role: Role, content: Vec<Part>) -> Self {
        Message { role, content }
    }

    /// A message of `role` holding only `text`.
    pub fn text(role: Role, text: impl Into<String>) -> Self {
        Message::new(role, vec![Part::Text(text.into())])
    }

    /// A system message.
    pub fn system(text: impl Into<String>) -> Self {
        Message::text(Role::System, text)
    }

    /// A user message made of `content` (text and images in any order).
    pub fn user(content: Vec<Part>) -> Self {
        Message::new(Role::User, content)
    }

    /// An assistant message (an earlier reply).
    pub fn assistant(text: impl Into<String>) -> Self {
        Message::text(Role::Assistant, text)
    }

    /// How many images the message holds.
    pub fn image_count(&self) -> usize {
        self.content
            .iter()
            .filter(|p| matches!(p, Part::Image))
            .count()
    }

    /// The message as a template sees it: `{"role": ..., "content": ...}`, the content a
    /// string when the message is one text, else a list of `{"type": "text", "text": ...}`
    /// and `{"type": "image"}` parts (the shapes transformers passes).
    fn to_value(&self) -> Value {
        let content = match self.content.as_slice() {
            [Part::Text(t)] => Value::from(t.as_str()),
            parts => parts
                .iter()
                .map(|p| match p {
                    Part::Text(t) => Value::from_pairs([
                        ("type", Value::from("text")),
                        ("text", Value::from(t.as_str())),
                    ]),
                    Part::Image => Value::from_pairs([("type", Value::from("image"))]),
                })
                .collect(),
        };
        Value::from_pairs([
            ("role", Value::from(self.role.as_str())),
            ("content", content),
        ])
    }
}

/// How many images `messages` hold together.
pub fn image_count(messages: &[Message]) -> usize {
    messages.iter().map(Message::image_count).sum()
}

/// Where a chat template came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TemplateOrigin {
    /// A `chat_template.json` or `chat_template.jinja` file.
    File(PathBuf),
    /// The `chat_template` key of a `tokenizer_config.json`.
    TokenizerConfig(PathBuf),
    /// The built-in released Qwen3-VL Instruct template.
    BuiltIn,
    /// Text given by the caller.
    Inline,
}

impl fmt::Display for TemplateOrigin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TemplateOrigin::File(p) => write!(f, "{}", p.display()),
            TemplateOrigin::TokenizerConfig(p) => write!(f, "{} (chat_template)", p.display()),
            TemplateOrigin::BuiltIn => f.write_str("the built-in Qwen3-VL chat template"),
            TemplateOrigin::Inline => f.write_str("the given chat template"),
        }
    }
}

/// A compiled chat template.
#[derive(Clone)]
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    origin: TemplateOrigin,
    /// Special-token strings the template may refer to (`bos_token`, `eos_token`, ...),
    /// from `tokenizer_config.json` when the folder has one.
    special_tokens: Vec<(String, String)>,
}

impl fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("origin", &self.origin)
            .field("source_bytes", &self.source.len())
            .finish()
    }
}

impl ChatTemplate {
    /// The built-in template: the released Qwen3-VL Instruct one.
    pub fn builtin() -> Self {
        // The embedded text is checked by the tests; failing to compile it would be a build
        // defect, reported like any other template error rather than a panic.
        Self::compile(QWEN3_VL_CHAT_TEMPLATE.to_string(), TemplateOrigin::BuiltIn).unwrap_or_else(
            |_| Self {
                env: Environment::new(),
                source: String::new(),
                origin: TemplateOrigin::BuiltIn,
                special_tokens: Vec::new(),
            },
        )
    }

    /// Compiles `source` (Jinja text); a syntax error is a [`RunnerError::BadRequest`].
    pub fn from_source(source: impl Into<String>) -> Result<Self> {
        Self::compile(source.into(), TemplateOrigin::Inline)
    }

    /// The template of the checkpoint folder `dir`: `chat_template.json`, else
    /// `chat_template.jinja`, else `tokenizer_config.json`'s `chat_template`, else the
    /// built-in Qwen3-VL template. A file that is there but unreadable, not JSON, without the
    /// key, or with a template that does not compile is an error, not a silent fallback.
    pub fn from_folder(dir: &Path) -> Result<Self> {
        let config_path = dir.join(TOKENIZER_CONFIG_JSON);
        let config = if config_path.is_file() {
            Some(read_json(&config_path)?)
        } else {
            None
        };
        let special_tokens = config.as_ref().map(special_tokens).unwrap_or_default();

        let json_path = dir.join(CHAT_TEMPLATE_JSON);
        let jinja_path = dir.join(CHAT_TEMPLATE_JINJA);
        let mut template = if json_path.is_file() {
            let json = read_json(&json_path)?;
            let source =
                template_text(json.get("chat_template"), &json_path)?.ok_or_else(|| {
                    RunnerError::BadRequest(format!(
                        "{}: no \"chat_template\" key holding a template",
                        json_path.display()
                    ))
                })?;
            Self::compile(source, TemplateOrigin::File(json_path))?
        } else if jinja_path.is_file() {
            let source = std::fs::read_to_string(&jinja_path)
                .map_err(|e| RunnerError::io(&jinja_path, e))?;
            Self::compile(source, TemplateOrigin::File(jinja_path))?
        } else if let Some(source) = config
            .as_ref()
            .map(|c| template_text(c.get("chat_template"), &config_path))
            .transpose()?
            .flatten()
        {
            Self::compile(source, TemplateOrigin::TokenizerConfig(config_path))?
        } else {
            Self::builtin()
        };
        template.special_tokens = special_tokens;
        Ok(template)
    }

    /// Where the template came from.
    pub fn origin(&self) -> &TemplateOrigin {
        &self.origin
    }

    /// The template's Jinja text.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders `messages` to prompt text: each image as the template writes it (for the
    /// Qwen3-VL template `<|vision_start|><|image_pad|><|vision_end|>`), and, when
    /// `add_generation_prompt`, the opening of the assistant's reply.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let messages: Vec<Value> = messages.iter().map(Message::to_value).collect();
        let mut ctx: Vec<(String, Value)> = vec![
            ("messages".into(), Value::from(messages)),
            (
                "add_generation_prompt".into(),
                Value::from(add_generation_prompt),
            ),
        ];
        for (k, v) in &self.special_tokens {
            ctx.push((k.clone(), Value::from(v.as_str())));
        }
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| self.error("does not compile", &e))?;
        template
            .render(Value::from_pairs(ctx))
            .map_err(|e| self.error("failed", &e))
    }

    fn compile(source: String, origin: TemplateOrigin) -> Result<Self> {
        let mut env = Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .keep_trailing_newline(false)
            .build()
            .map_err(|e| RunnerError::BadRequest(format!("chat template syntax: {e}")))?;
        env.set_syntax(syntax);
        env.set_auto_escape_callback(|_| AutoEscape::None);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_filter("tojson", tojson);
        env.add_function("raise_exception", raise_exception);
        let mut t = ChatTemplate {
            env,
            source: source.clone(),
            origin,
            special_tokens: Vec::new(),
        };
        if let Err(e) = t.env.add_template_owned(TEMPLATE_NAME, source) {
            return Err(t.error("does not compile", &e));
        }
        Ok(t)
    }

    fn error(&self, what: &str, e: &Error) -> RunnerError {
        let mut msg = format!("chat template ({}) {what}: {e}", self.origin);
        // minijinja keeps the cause of a failed call (a raised exception) as the source.
        let mut src = std::error::Error::source(e);
        while let Some(s) = src {
            msg.push_str(&format!(": {s}"));
            src = s.source();
        }
        RunnerError::BadRequest(msg)
    }
}

/// Reads and parses a JSON file.
fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).map_err(|e| RunnerError::io(path, e))?;
    serde_json::from_str(&text)
        .map_err(|e| RunnerError::BadRequest(format!("{}: not valid JSON: {e}", path.display())))
}

/// The template text of a `chat_template` value: a string, or a list of
/// `{"name", "template"}` entries of which the one named `default` is taken; `None` when the
/// key is absent or null.
fn template_text(value: Option<&serde_json::Value>, path: &Path) -> Result<Option<String>> {
    match value {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
        Some(serde_json::Value::Array(entries)) => {
            let mut names = Vec::new();
            for entry in entries {
                let name = entry.get("name").and_then(|n| n.as_str());
                let text = entry.get("template").and_then(|t| t.as_str());
                match (name, text) {
                    (Some("default"), Some(text)) => return Ok(Some(text.to_string())),
                    (Some(name), Some(_)) => names.push(name.to_string()),
                    _ => {
                        return Err(RunnerError::BadRequest(format!(
                            "{}: a chat_template entry is not {{\"name\": ..., \"template\": ...}}",
                            path.display()
                        )));
                    }
                }
            }
            Err(RunnerError::BadRequest(format!(
                "{}: no chat template named \"default\" (there are: {})",
                path.display(),
                names.join(", ")
            )))
        }
        Some(other) => Err(RunnerError::BadRequest(format!(
            "{}: chat_template is a {}, not a string",
            path.display(),
            json_kind(other)
        ))),
    }
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "boolean",
        serde_json::Value::Number(_) => "number",
        serde_json::Value::String(_) => "string",
        serde_json::Value::Array(_) => "list",
        serde_json::Value::Object(_) => "object",
    }
}

/// `bos_token`, `eos_token`, `pad_token` and `unk_token` of a `tokenizer_config.json` (a
/// string or `{"content": ...}`), as transformers hands them to templates.
fn special_tokens(config: &serde_json::Value) -> Vec<(String, String)> {
    ["bos_token", "eos_token", "pad_token", "unk_token"]
        .iter()
        .filter_map(|&k| {
            let v = config.get(k)?;
            let s = v
                .as_str()
                .or_else(|| v.get("content").and_then(|c| c.as_str()))?;
            Some((k.to_string(), s.to_string()))
        })
        .collect()
}

/// `raise_exception(message)`: stops rendering with the template's message.
fn raise_exception(message: String) -> std::result::Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

/// `tojson` as transformers defines it: `json.dumps(x, ensure_ascii=False, indent=indent,
/// separators=separators, sort_keys=sort_keys)`.
fn tojson(value: &Value, kwargs: Kwargs) -> std::result::Result<Value, Error> {
    let indent: Option<Value> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    kwargs.assert_all_used()?;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) => match v.kind() {
            ValueKind::Number => Some(" ".repeat(usize::try_from(v).map_err(|_| {
                Error::new(ErrorKind::InvalidOperation, "tojson: indent must be >= 0")
            })?)),
            ValueKind::String => Some(v.as_str().unwrap_or_default().to_string()),
            _ => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    "tojson: indent must be a number or a string",
                ));
            }
        },
    };
    let (item_sep, key_sep) = match separators.as_deref() {
        Some([item, key]) => (item.clone(), key.clone()),
        Some(_) => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                "tojson: separators must be two strings",
            ));
        }
        None if indent.is_some() => (",".to_string(), ": ".to_string()),
        None => (", ".to_string(), ": ".to_string()),
    };
    let w = JsonWriter {
        indent,
        item_sep,
        key_sep,
        sort_keys: sort_keys.unwrap_or(false),
        ensure_ascii: ensure_ascii.unwrap_or(false),
    };
    let mut out = String::new();
    w.write(value, 0, &mut out)?;
    Ok(Value::from(out))
}

/// Python `json.dumps` output over template values.
struct JsonWriter {
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
    ensure_ascii: bool,
}

impl JsonWriter {
    /// Nesting deeper than this is refused (values from templates are shallow; this keeps
    /// a self-referencing value from exhausting the stack).
    const MAX_DEPTH: usize = 256;

    fn write(&self, v: &Value, depth: usize, out: &mut String) -> std::result::Result<(), Error> {
        if depth > Self::MAX_DEPTH {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                "tojson: value nested too deeply",
            ));
        }
        match v.kind() {
            ValueKind::Undefined | ValueKind::None => out.push_str("null"),
            ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
            ValueKind::Number => self.number(v, out),
            ValueKind::String => self.string(v.as_str().unwrap_or_default(), out),
            ValueKind::Map => {
                let mut keys: Vec<Value> = v.try_iter()?.collect();
                if self.sort_keys {
                    keys.sort();
                }
                if keys.is_empty() {
                    out.push_str("{}");
                    return Ok(());
                }
                out.push('{');
                for (i, k) in keys.iter().enumerate() {
                    self.separator(i, depth + 1, out);
                    match k.as_str() {
                        Some(s) => self.string(s, out),
                        None => self.string(&k.to_string(), out),
                    }
                    out.push_str(&self.key_sep);
                    self.write(&v.get_item(k)?, depth + 1, out)?;
                }
                self.close(depth, out);
                out.push('}');
            }
            ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<Value> = v.try_iter()?.collect();
                if items.is_empty() {
                    out.push_str("[]");
                    return Ok(());
                }
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    self.separator(i, depth + 1, out);
                    self.write(item, depth + 1, out)?;
                }
                self.close(depth, out);
                out.push(']');
            }
            _ => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    format!("tojson: a {} is not JSON serializable", v.kind()),
                ));
            }
        }
        Ok(())
    }

    fn separator(&self, i: usize, depth: usize, out: &mut String) {
        if i > 0 {
            out.push_str(&self.item_sep);
        }
        if let Some(ind) = &self.indent {
            out.push('\n');
            for _ in 0..depth {
                out.push_str(ind);
            }
        }
    }

    fn close(&self, depth: usize, out: &mut String) {
        if let Some(ind) = &self.indent {
            out.push('\n');
            for _ in 0..depth {
                out.push_str(ind);
            }
        }
    }

    fn number(&self, v: &Value, out: &mut String) {
        if v.is_integer() {
            out.push_str(&v.to_string());
            return;
        }
        match f64::try_from(v.clone()) {
            Ok(f) if f.is_nan() => out.push_str("NaN"),
            Ok(f) if f.is_infinite() => {
                out.push_str(if f > 0.0 { "Infinity" } else { "-Infinity" })
            }
            Ok(f) => out.push_str(&format!("{f:?}")),
            Err(_) => out.push_str(&v.to_string()),
        }
    }

    fn string(&self, s: &str, out: &mut String) {
        out.push('"');
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\u{08}' => out.push_str("\\b"),
                '\u{0c}' => out.push_str("\\f"),
                c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
                c if self.ensure_ascii && !c.is_ascii() => {
                    let mut buf = [0u16; 2];
                    for unit in c.encode_utf16(&mut buf) {
                        out.push_str(&format!("\\u{unit:04x}"));
                    }
                }
                c => out.push(c),
            }
        }
        out.push('"');
    }
}

/// Replaces the `k`-th `image_pad_id` of `ids` with `image_tokens[k]` copies of it: the
/// rendered prompt holds one placeholder per image, the model wants one pad per image token.
/// A count that differs from the images given is a [`RunnerError::ImagePadMismatch`].
pub fn expand_image_pads(
    ids: &[u32],
    image_pad_id: u32,
    image_tokens: &[usize],
) -> Result<Vec<u32>> {
    let placeholders = ids.iter().filter(|&&id| id == image_pad_id).count();
    if placeholders != image_tokens.len() {
        return Err(RunnerError::ImagePadMismatch(format!(
            "the chat template rendered {placeholders} image placeholder(s) for {} image(s)",
            image_tokens.len()
        )));
    }
    let extra: usize = image_tokens.iter().sum::<usize>();
    let mut out = Vec::with_capacity(ids.len() + extra);
    let mut next = image_tokens.iter();
    for &id in ids {
        if id == image_pad_id {
            let n = next.next().copied().unwrap_or(0);
            out.extend(std::iter::repeat_n(image_pad_id, n));
        } else {
            out.push(id);
        }
    }
    Ok(out)
}
