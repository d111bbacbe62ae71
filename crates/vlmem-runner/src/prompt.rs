//! The tokenizer (Hugging Face `tokenizer.json` through the `tokenizers` crate) and the
//! checkpoint's chat template ([`ChatTemplate`]) that turns conversations into prompt ids.

use crate::chat::{ChatTemplate, Message, Part, expand_image_pads, image_count};
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
/// `<|im_end|>\n<|im_start|>assistant\n`: what the released Qwen3-VL template renders for
/// a user turn of the images then the text, with each image's pads expanded.
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

/// A tokenizer checked against the model's config, with the chat template of its folder.
pub struct ChatTokenizer {
    tokenizer: Tokenizer,
    /// The id of `<|image_pad|>` (checked against the config).
    image_pad_id: u32,
    /// The folder's chat template, or why it could not be loaded: reported when a
    /// conversation is encoded, so that a checkpoint with a broken template still runs from
    /// prompt ids.
    template: std::result::Result<ChatTemplate, String>,
}

impl std::fmt::Debug for ChatTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTokenizer")
            .field("vocab_size", &self.tokenizer.get_vocab_size(true))
            .field("chat_template", &self.template)
            .finish()
    }
}

impl ChatTokenizer {
    /// Loads `tokenizer.json` and checks that its special tokens carry the ids `config`
    /// names (vision start/end and image pad). The chat template comes from the same folder
    /// ([`ChatTemplate::from_folder`]: `chat_template.json`, `chat_template.jinja`,
    /// `tokenizer_config.json`, else the built-in Qwen3-VL template); a template that cannot
    /// be loaded is reported by [`ChatTokenizer::chat_template`] and the encoders that need it.
    pub fn from_file(path: &Path, config: &Qwen3VlConfig) -> Result<Self> {
        if !path.is_file() {
            return Err(RunnerError::MissingFile {
                path: path.to_path_buf(),
                message: "no tokenizer.json: the checkpoint folder needs one to encode text".into(),
            });
        }
        let tokenizer = Tokenizer::from_file(path)
            .map_err(|e| RunnerError::Tokenizer(format!("{}: {e}", path.display())))?;
        let dir = path.parent().unwrap_or(Path::new("."));
        let template = ChatTemplate::from_folder(dir).map_err(|e| e.to_string());
        let mut t = ChatTokenizer {
            tokenizer,
            image_pad_id: config.image_token_id,
            template,
        };
        for (tok, want) in [
            (VISION_START, config.vision_start_token_id),
            (VISION_END, config.vision_end_token_id),
            (IMAGE_PAD, config.image_token_id),
        ] {
            match t.token_id(tok) {
                Some(id) if id == want => {
                    if tok == IMAGE_PAD {
                        t.image_pad_id = id;
                    }
                }
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

    /// The chat template conversations are rendered with.
    pub fn chat_template(&self) -> Result<&ChatTemplate> {
        self.template
            .as_ref()
            .map_err(|e| RunnerError::BadRequest(e.clone()))
    }

    /// Renders conversations with `template` from now on instead of the folder's.
    pub fn with_chat_template(mut self, template: ChatTemplate) -> Self {
        self.template = Ok(template);
        self
    }

    /// Encodes a conversation: renders `messages` with the chat template (adding the opening
    /// of the assistant's reply when `add_generation_prompt`), tokenizes the text, then
    /// expands the `k`-th image placeholder to `image_tokens[k]` pads. The images are counted
    /// across all messages in order; a count that differs from `image_tokens.len()`, or an
    /// image the template does not render, is a [`RunnerError::ImagePadMismatch`].
    pub fn encode_messages(
        &self,
        messages: &[Message],
        image_tokens: &[usize],
        add_generation_prompt: bool,
    ) -> Result<Vec<u32>> {
        let images = image_count(messages);
        if images != image_tokens.len() {
            return Err(RunnerError::ImagePadMismatch(format!(
                "the conversation holds {images} image(s) but {} were given",
                image_tokens.len()
            )));
        }
        let text = self
            .chat_template()?
            .render(messages, add_generation_prompt)?;
        self.encode_rendered(&text, image_tokens)
    }

    /// Encodes prompt text that holds one `<|image_pad|>` per image (as a chat template
    /// renders it) and expands the `k`-th to `image_tokens[k]` pads.
    pub fn encode_rendered(&self, text: &str, image_tokens: &[usize]) -> Result<Vec<u32>> {
        expand_image_pads(&self.encode(text)?, self.image_pad_id, image_tokens)
    }

    /// Encodes one user turn, the images first and then `user_text`, with
    /// `image_tokens[k]` pads for image `k`, and the opening of the assistant's reply.
    pub fn encode_chat(&self, user_text: &str, image_tokens: &[usize]) -> Result<Vec<u32>> {
        let mut content = vec![Part::Image; image_tokens.len()];
        content.push(Part::Text(user_text.to_string()));
        self.encode_messages(&[Message::user(content)], image_tokens, true)
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
