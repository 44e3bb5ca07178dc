//! Torch-free model metadata shared by the shard and the router: GGUF and
//! safetensors readers, model configuration, tokenizer and chat template.

pub mod chat_template;
pub mod config;
pub mod detokenize;
pub mod gguf;
pub mod prompt;
pub mod safetensors_folder;
pub mod tokenizer;
