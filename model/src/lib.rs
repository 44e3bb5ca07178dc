//! Torch-free model metadata shared by the shard and the router: GGUF and
//! safetensors readers, model configuration, tokenizer and chat template.

pub mod gguf;
