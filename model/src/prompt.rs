//! Everything needed to turn a request into prompt token ids, without the
//! weights: the tokenizer, its special tokens and the chat template of a GGUF
//! file or a Hugging Face folder. The router validates with it; the shard
//! encodes its command-line prompts with it.

use std::path::{Path, PathBuf};

use tokenizers::Tokenizer;

use crate::chat_template::{ChatMessage, ChatTemplate, ChatTemplateError};
use crate::gguf::{GgufError, GgufFile};
use crate::tokenizer::{load_gguf_tokenizer, load_tokenizer_json, TokenizerError, TokenizerInfo};

#[derive(Debug, thiserror::Error)]
pub enum PromptError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error(transparent)]
    ChatTemplate(#[from] ChatTemplateError),
    #[error("{path}: neither a .gguf file nor a folder with tokenizer.json")]
    NotAModel { path: PathBuf },
    #[error("the model has no chat template")]
    NoChatTemplate,
    #[error("cannot tokenize the input: {0}")]
    Encode(String),
}

/// The tokenizer of a model with its BOS policy and chat template.
#[derive(Clone)]
pub struct PromptEncoder {
    tokenizer: Tokenizer,
    info: TokenizerInfo,
    chat_template: Option<ChatTemplate>,
}

impl PromptEncoder {
    /// Reads the tokenizer of a `.gguf` file or of a Hugging Face folder.
    pub fn open(path: &Path) -> Result<Self, PromptError> {
        let (tokenizer, info) = if path.is_dir() {
            if !path.join("tokenizer.json").is_file() {
                return Err(PromptError::NotAModel { path: path.into() });
            }
            let tokenizer = load_tokenizer_json(path)?;
            let info = TokenizerInfo::from_hf_dir(path, &tokenizer)?;
            (tokenizer, info)
        } else {
            let file = GgufFile::open(path)?;
            load_gguf_tokenizer(&file)?
        };
        Self::new(tokenizer, info)
    }

    pub fn new(tokenizer: Tokenizer, info: TokenizerInfo) -> Result<Self, PromptError> {
        let chat_template = match &info.chat_template {
            Some(source) => Some(ChatTemplate::new(
                source,
                info.bos_token.clone().unwrap_or_default(),
                info.eos_token.clone().unwrap_or_default(),
            )?),
            None => None,
        };
        Ok(Self {
            tokenizer,
            info,
            chat_template,
        })
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    pub fn info(&self) -> &TokenizerInfo {
        &self.info
    }

    pub fn has_chat_template(&self) -> bool {
        self.chat_template.is_some()
    }

    /// Renders a conversation with the model's chat template.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, PromptError> {
        let template = self
            .chat_template
            .as_ref()
            .ok_or(PromptError::NoChatTemplate)?;
        Ok(template.render(messages, add_generation_prompt)?)
    }

    /// Token ids of `text` as the model expects a prompt: BOS first where the
    /// model adds one (as Transformers' tokenizers do with special tokens on).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, PromptError> {
        let enc = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| PromptError::Encode(e.to_string()))?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if self.info.add_bos_token {
            if let Some(bos) = self.info.bos_token_id {
                ids.push(bos);
            }
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// Encodes `text` and also returns each token's text (for `/tokenize`).
    pub fn encode_with_pieces(&self, text: &str) -> Result<Vec<(u32, String)>, PromptError> {
        let ids = self.encode(text)?;
        Ok(ids.iter().map(|&id| (id, self.token_text(id))).collect())
    }

    /// The text of one token as it appears in decoded output.
    pub fn token_text(&self, id: u32) -> String {
        self.tokenizer.decode(&[id], false).unwrap_or_default()
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, PromptError> {
        self.tokenizer
            .decode(ids, skip_special_tokens)
            .map_err(|e| PromptError::Encode(e.to_string()))
    }
}
