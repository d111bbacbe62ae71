//! The OpenAI wire types: what `/v1/chat/completions` and `/v1/completions` accept, and the
//! objects and stream chunks they answer with.
//!
//! Requests are read leniently where OpenAI's clients differ (a missing `model` is the served
//! one, `content` may be a string or typed parts, `stop` a string or a list); messages are
//! kept as JSON here and read by [`crate::routes`], so that a malformed part is reported
//! with its place (`messages[1].content[0]`).

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// `POST /v1/chat/completions`.
#[derive(Debug, Deserialize)]
pub struct ChatCompletionRequest {
    /// The model asked for (`None`: the served one).
    #[serde(default)]
    pub model: Option<String>,
    /// The conversation, each message as sent.
    pub messages: Vec<Value>,
    /// `max_completion_tokens`, the newer name of `max_tokens`.
    #[serde(default)]
    pub max_completion_tokens: Option<i64>,
    /// Tools (refused: not supported).
    #[serde(default)]
    pub tools: Option<Value>,
    /// Log probabilities (refused when true: not supported).
    #[serde(default)]
    pub logprobs: Option<bool>,
    /// The generation settings shared with `/v1/completions`.
    #[serde(flatten)]
    pub fields: GenerationFields,
}

/// `POST /v1/completions`.
#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    /// The model asked for (`None`: the served one).
    #[serde(default)]
    pub model: Option<String>,
    /// The prompt: a string, a list of one string, or token ids.
    pub prompt: Value,
    /// Echo the prompt ahead of the completion.
    #[serde(default)]
    pub echo: Option<bool>,
    /// Text after the completion (refused: not supported).
    #[serde(default)]
    pub suffix: Option<String>,
    /// Log probabilities of the top N tokens (refused: not supported).
    #[serde(default)]
    pub logprobs: Option<Value>,
    /// The generation settings shared with `/v1/chat/completions`.
    #[serde(flatten)]
    pub fields: GenerationFields,
}

/// The generation settings both endpoints take.
#[derive(Debug, Default, Deserialize)]
pub struct GenerationFields {
    /// Answer as server-sent events.
    #[serde(default)]
    pub stream: Option<bool>,
    /// `include_usage`: a last chunk with the usage.
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    /// Tokens to generate at most (> 0).
    #[serde(default)]
    pub max_tokens: Option<i64>,
    /// Sampling temperature (0: greedy).
    #[serde(default)]
    pub temperature: Option<f64>,
    /// Nucleus sampling mass, in (0, 1].
    #[serde(default)]
    pub top_p: Option<f64>,
    /// The most likely tokens kept (0 or -1: all).
    #[serde(default)]
    pub top_k: Option<i64>,
    /// Tokens less likely than `min_p` times the most likely one are dropped.
    #[serde(default)]
    pub min_p: Option<f64>,
    /// The sampler's seed (the same seed and settings give the same reply).
    #[serde(default)]
    pub seed: Option<serde_json::Number>,
    /// Strings that end the reply (cut from it).
    #[serde(default)]
    pub stop: Option<Stop>,
    /// Token ids that end the reply (vLLM's extension).
    #[serde(default)]
    pub stop_token_ids: Option<Vec<u32>>,
    /// In [-2, 2].
    #[serde(default)]
    pub presence_penalty: Option<f64>,
    /// In [-2, 2].
    #[serde(default)]
    pub frequency_penalty: Option<f64>,
    /// transformers' repetition penalty (vLLM's extension), > 0.
    #[serde(default)]
    pub repetition_penalty: Option<f64>,
    /// Choices to generate (only 1).
    #[serde(default)]
    pub n: Option<i64>,
}

/// `stream_options`.
#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    /// A last chunk, with no choices, carries the usage.
    #[serde(default)]
    pub include_usage: Option<bool>,
}

/// `stop`: one string or a list.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    /// One string.
    One(String),
    /// Several.
    Many(Vec<String>),
}

impl Stop {
    /// The strings, as a list.
    pub fn into_vec(self) -> Vec<String> {
        match self {
            Stop::One(s) => vec![s],
            Stop::Many(v) => v,
        }
    }
}

/// Token counts of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageBody {
    /// The prompt's tokens (image tokens included).
    pub prompt_tokens: usize,
    /// Generated tokens (a stop id included).
    pub completion_tokens: usize,
    /// Both.
    pub total_tokens: usize,
    /// `cached_tokens`: prompt tokens served from a cache.
    pub prompt_tokens_details: PromptTokensDetails,
}

/// `usage.prompt_tokens_details`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromptTokensDetails {
    /// Prompt tokens whose keys and values came from a cache (0: every request is
    /// prefilled whole today).
    pub cached_tokens: usize,
}

/// The assistant's message of a whole chat completion.
#[derive(Debug, Serialize)]
pub struct ChatMessageOut {
    /// `assistant`.
    pub role: &'static str,
    /// The reply's text.
    pub content: String,
}

/// One choice of a whole chat completion.
#[derive(Debug, Serialize)]
pub struct ChatChoice {
    /// 0.
    pub index: u32,
    /// The reply.
    pub message: ChatMessageOut,
    /// Always null.
    pub logprobs: Option<()>,
    /// `stop` or `length`.
    pub finish_reason: &'static str,
}

/// A whole chat completion (`chat.completion`).
#[derive(Debug, Serialize)]
pub struct ChatCompletion {
    /// `chatcmpl-...`.
    pub id: String,
    /// `chat.completion`.
    pub object: &'static str,
    /// Unix seconds.
    pub created: u64,
    /// The served model's id.
    pub model: String,
    /// One choice.
    pub choices: Vec<ChatChoice>,
    /// Token counts.
    pub usage: UsageBody,
}

/// The change a stream chunk brings to the assistant's message.
#[derive(Debug, Default, Serialize)]
pub struct Delta {
    /// `assistant`, in the first chunk only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    /// New text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

/// One choice of a chat stream chunk.
#[derive(Debug, Serialize)]
pub struct ChunkChoice {
    /// 0.
    pub index: u32,
    /// What the chunk adds.
    pub delta: Delta,
    /// Always null.
    pub logprobs: Option<()>,
    /// Set in the last chunk of the choice.
    pub finish_reason: Option<&'static str>,
}

/// One chunk of a streamed chat completion (`chat.completion.chunk`).
#[derive(Debug, Serialize)]
pub struct ChatCompletionChunk {
    /// The same for every chunk of a completion.
    pub id: String,
    /// `chat.completion.chunk`.
    pub object: &'static str,
    /// Unix seconds.
    pub created: u64,
    /// The served model's id.
    pub model: String,
    /// One choice, or none in the usage chunk.
    pub choices: Vec<ChunkChoice>,
    /// With `include_usage`: null but in the last chunk; absent otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<UsageBody>>,
}

/// One choice of a text completion (whole or a stream chunk).
#[derive(Debug, Serialize)]
pub struct CompletionChoice {
    /// 0.
    pub index: u32,
    /// The text (in a stream: the new text).
    pub text: String,
    /// Always null.
    pub logprobs: Option<()>,
    /// `stop` or `length` (null in a stream until the last chunk).
    pub finish_reason: Option<&'static str>,
}

/// A text completion or one chunk of a streamed one (`text_completion`).
#[derive(Debug, Serialize)]
pub struct Completion {
    /// `cmpl-...`.
    pub id: String,
    /// `text_completion`.
    pub object: &'static str,
    /// Unix seconds.
    pub created: u64,
    /// The served model's id.
    pub model: String,
    /// One choice, or none in a stream's usage chunk.
    pub choices: Vec<CompletionChoice>,
    /// Token counts (in a stream: with `include_usage`, null but in the last chunk).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<UsageBody>>,
}

/// One entry of `GET /v1/models`.
#[derive(Debug, Serialize)]
pub struct ModelCard {
    /// The model folder's name.
    pub id: String,
    /// `model`.
    pub object: &'static str,
    /// Unix seconds when the server started.
    pub created: u64,
    /// `vlmem`.
    pub owned_by: &'static str,
    /// The longest context (prompt and reply, tokens) a request may have (absent while the
    /// model loads).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_model_len: Option<u64>,
}

/// `GET /v1/models`.
#[derive(Debug, Serialize)]
pub struct ModelList {
    /// `list`.
    pub object: &'static str,
    /// The served model.
    pub data: Vec<ModelCard>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_read_as_clients_send_them() {
        let r: ChatCompletionRequest = serde_json::from_str(
            r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"stop":"x",
                "max_tokens":5,"temperature":null,"seed":-3,"stream":true,
                "stream_options":{"include_usage":true},"unknown_field":1}"#,
        )
        .unwrap();
        assert_eq!(r.fields.max_tokens, Some(5));
        assert_eq!(r.fields.temperature, None);
        assert_eq!(r.fields.seed.unwrap().as_i64(), Some(-3));
        assert_eq!(r.fields.stop.unwrap().into_vec(), vec!["x".to_string()]);
        assert_eq!(r.fields.stream_options.unwrap().include_usage, Some(true));
        let r: CompletionRequest =
            serde_json::from_str(r#"{"prompt":"a","stop":["b","c"]}"#).unwrap();
        assert!(r.model.is_none());
        assert_eq!(r.fields.stop.unwrap().into_vec().len(), 2);
        assert!(
            serde_json::from_str::<ChatCompletionRequest>(r#"{"messages":[],"max_tokens":"5"}"#)
                .is_err()
        );
    }

    #[test]
    fn chunks_carry_usage_only_when_asked() {
        let chunk = ChatCompletionChunk {
            id: "c".into(),
            object: "chat.completion.chunk",
            created: 1,
            model: "m".into(),
            choices: vec![],
            usage: None,
        };
        let v = serde_json::to_value(&chunk).unwrap();
        assert!(v.get("usage").is_none());
        let chunk = ChatCompletionChunk {
            usage: Some(None),
            ..chunk
        };
        let v = serde_json::to_value(&chunk).unwrap();
        assert!(v["usage"].is_null() && v.get("usage").is_some());
    }
}
