//! The tokenizer (Hugging Face `tokenizer.json` through the `tokenizers` crate) and Qwen's
//! chat template for one user turn with images.

use crate::error::{Result, RunnerError};
use std::path::Path;
use tokenizers::Tokenizer;
use vlmem_qwen3vl::Qwen3VlConfig;

/// `<|im_start|>`.
pub const IM_START: &str = "<|im_start|>";
/// `<|im_end|>`.
pub const IM_END: &str = "<|im_end|>";
/// `<|vision_start|>`.
pub const VISION_START: &str = "<|vision_start|>";
/// `<|vision_end|>`.
pub const VISION_END: &str = "<|vision_end|>";
/// `<|image_pad|>`.
pub const IMAGE_PAD: &str = "<|image_pad|>";
/// `<|endoftext|>`.
pub const END_OF_TEXT: &str = "<|endoftext|>";

/// The chat-template text of one user turn: `<|im_start|>user\n`, per image
/// `<|vision_start|>` + `n` x `<|image_pad|>` + `<|vision_end|>`, the text, then
/// `<|im_end|>\n<|im_start|>assistant\n`.
pub fn chat_template(user_text: &str, image_tokens: &[usize]) -> String {
    let mut s = format!("{IM_START}user\n");
    for &n in image_tokens {
        s.push_str(VISION_START);
        for _ in 0..n {
            s.push_str(IMAGE_PAD);
        }
        s.push_str(VISION_END);
    }
    s.push_str(user_text);
    s.push_str(&format!("{IM_END}\n{IM_START}assistant\n"));
    s
}

/// A tokenizer checked against the model's config.
pub struct ChatTokenizer {
    tokenizer: Tokenizer,
}

impl std::fmt::Debug for ChatTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTokenizer")
            .field("vocab_size", &self.tokenizer.get_vocab_size(true))
            .finish()
    }
}

impl ChatTokenizer {
    /// Loads `tokenizer.json` and checks that its special tokens carry the ids `config`
    /// names (vision start/end and image pad).
    pub fn from_file(path: &Path, config: &Qwen3VlConfig) -> Result<Self> {
        if !path.is_file() {
            return Err(RunnerError::MissingFile {
                path: path.to_path_buf(),
                message: "no tokenizer.json: the checkpoint folder needs one to encode text".into(),
            });
        }
        let tokenizer = Tokenizer::from_file(path)
            .map_err(|e| RunnerError::Tokenizer(format!("{}: {e}", path.display())))?;
        let t = ChatTokenizer { tokenizer };
        for (tok, want) in [
            (VISION_START, config.vision_start_token_id),
            (VISION_END, config.vision_end_token_id),
            (IMAGE_PAD, config.image_token_id),
        ] {
            match t.token_id(tok) {
                Some(id) if id == want => {}
                found => {
                    return Err(RunnerError::Tokenizer(format!(
                        "{}: {tok} is {found:?} but config.json says {want}",
                        path.display()
                    )));
                }
            }
        }
        Ok(t)
    }

    /// The id of a token string (special or not).
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }

    /// Encodes `text` as is (special tokens written in it are recognised; none are added).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| RunnerError::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Encodes one user turn with `image_tokens[k]` pads for image `k`.
    pub fn encode_chat(&self, user_text: &str, image_tokens: &[usize]) -> Result<Vec<u32>> {
        self.encode(&chat_template(user_text, image_tokens))
    }

    /// Decodes ids to text, special tokens included unless `skip_special`.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.tokenizer
            .decode(ids, skip_special)
            .map_err(|e| RunnerError::Tokenizer(e.to_string()))
    }

    /// Ids that end a reply: `<|im_end|>` and `<|endoftext|>` where the vocabulary has them.
    pub fn stop_ids(&self) -> Vec<u32> {
        [IM_END, END_OF_TEXT]
            .iter()
            .filter_map(|t| self.token_id(t))
            .collect()
    }
}
