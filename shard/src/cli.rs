//! Command-line options shared by the engine's subcommands.

use std::path::PathBuf;

use clap::Args;

use crate::device::{parse_device, resolve_precision};
use crate::engine::EngineConfig;
use crate::error::Result;

/// Where the model is and how to run it.
#[derive(Args, Clone, Debug)]
pub struct ModelArgs {
    /// A .gguf file or a Hugging Face folder (config.json + *.safetensors). Defaults to the embedded SmolLM2-135M-Instruct.
    #[arg(long, env = "TESSERA_MODEL")]
    pub model: Option<PathBuf>,
    /// float32, bfloat16, float16, or auto: bfloat16 on a GPU and on a CPU with AVX-512 or
    /// AMX, float32 on other CPUs.
    #[arg(long, env = "TESSERA_DTYPE", default_value = "float32")]
    pub dtype: String,
    /// cpu, cuda or cuda:N.
    #[arg(long, env = "TESSERA_DEVICE", default_value = "cpu")]
    pub device: String,
    /// Intra-op CPU threads for libtorch (0: libtorch's default).
    #[arg(long, env = "TESSERA_THREADS", default_value_t = 0)]
    pub threads: i32,
    /// Tokens per KV cache block.
    #[arg(long, env = "TESSERA_BLOCK_SIZE", default_value_t = 16)]
    pub block_size: usize,
    /// KV cache capacity in tokens (all sequences together).
    #[arg(long, env = "TESSERA_KV_TOKENS", default_value_t = 16_384)]
    pub kv_tokens: usize,
}

pub fn engine_config(args: &ModelArgs) -> Result<EngineConfig> {
    if args.threads > 0 {
        tch::set_num_threads(args.threads);
    }
    let device = parse_device(&args.device)?;
    let precision = resolve_precision(&args.dtype, device)?;
    Ok(EngineConfig {
        kind: precision.kind,
        device,
        block_size: args.block_size,
        num_blocks: 0,
        max_kv_tokens: args.kv_tokens,
        group: None,
        grouped_decode_attention: false,
        small_batch_copies: precision.small_batch_copies,
    })
}

/// The model to load: `--model`, or the default model installed by scripts/setup.sh.
pub fn model_path(args: &ModelArgs) -> PathBuf {
    args.model
        .clone()
        .unwrap_or_else(|| PathBuf::from(env!("TESSERA_BUILTIN_MODEL")))
}
