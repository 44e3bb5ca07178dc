//! Everything the engine reads from a model path besides the weights' values:
//! configuration, tokenizer, end-of-sequence ids, BOS policy and chat template.

use std::path::Path;

use tessera_model::config::ModelConfig;
use tessera_model::tokenizer::{load_gguf_tokenizer, load_tokenizer_json, TokenizerInfo};
use tokenizers::Tokenizer;

use crate::error::Result;
use crate::weights::WeightSource;

pub struct ModelFiles {
    pub weights: WeightSource,
    pub config: ModelConfig,
    pub tokenizer: Tokenizer,
    pub eos_ids: Vec<u32>,
    /// The BOS id to put before every prompt, when the model wants one.
    pub add_bos: Option<u32>,
    /// Special tokens and the chat template.
    pub info: TokenizerInfo,
}

impl ModelFiles {
    pub fn open(path: &Path) -> Result<Self> {
        let (weights, config) = WeightSource::open(path)?;
        let (tokenizer, info) = match &weights {
            WeightSource::Gguf(file) => load_gguf_tokenizer(file)?,
            WeightSource::Safetensors { folder, .. } => {
                let tokenizer = load_tokenizer_json(folder)?;
                let info = TokenizerInfo::from_hf_dir(folder, &tokenizer)?;
                (tokenizer, info)
            }
        };
        Ok(Self {
            weights,
            config,
            tokenizer,
            eos_ids: info.eos_token_ids.clone(),
            add_bos: if info.add_bos_token {
                info.bos_token_id
            } else {
                None
            },
            info,
        })
    }
}
