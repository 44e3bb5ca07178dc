//! The router's settings: every one a flag with an environment variable and a default.

use std::net::IpAddr;
use std::path::PathBuf;

use clap::Args;

/// Limits that validation enforces (see `validation.rs`).
#[derive(Debug, Clone, Args)]
pub struct Limits {
    /// Most prompt tokens a request may have (after truncation).
    #[arg(long, env = "TESSERA_MAX_INPUT_TOKENS", default_value_t = 4095)]
    pub max_input_tokens: u32,
    /// Most prompt plus generated tokens of one request.
    #[arg(long, env = "TESSERA_MAX_TOTAL_TOKENS", default_value_t = 4096)]
    pub max_total_tokens: u32,
    /// Most tokens one request may ask to generate (`max_new_tokens`, `max_tokens`).
    #[arg(long, env = "TESSERA_MAX_NEW_TOKENS", default_value_t = 4096)]
    pub max_new_tokens: u32,
    /// `max_new_tokens` of a request that does not say.
    #[arg(long, env = "TESSERA_DEFAULT_MAX_NEW_TOKENS", default_value_t = 256)]
    pub default_max_new_tokens: u32,
    /// Most stop sequences per request.
    #[arg(long, env = "TESSERA_MAX_STOP_SEQUENCES", default_value_t = 4)]
    pub max_stop_sequences: usize,
    /// Most alternatives per token (`top_n_tokens`, `top_logprobs`, `logprobs`).
    #[arg(long, env = "TESSERA_MAX_TOP_N_TOKENS", default_value_t = 5)]
    pub max_top_n_tokens: u32,
    /// Most sequences per request (`best_of`, `n`).
    #[arg(long, env = "TESSERA_MAX_BEST_OF", default_value_t = 4)]
    pub max_best_of: u32,
    /// Largest request body in bytes (larger ones get 413).
    #[arg(long, env = "TESSERA_PAYLOAD_LIMIT", default_value_t = 2_000_000)]
    pub payload_limit: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_input_tokens: 4095,
            max_total_tokens: 4096,
            max_new_tokens: 4096,
            default_max_new_tokens: 256,
            max_stop_sequences: 4,
            max_top_n_tokens: 5,
            max_best_of: 4,
            payload_limit: 2_000_000,
        }
    }
}

/// How the batching task fills batches.
#[derive(Debug, Clone, Args)]
pub struct BatchingConfig {
    /// Most prompt tokens prefilled in one forward pass.
    #[arg(long, env = "TESSERA_MAX_BATCH_PREFILL_TOKENS", default_value_t = 4096)]
    pub max_batch_prefill_tokens: u32,
    /// Most KV tokens (prompt + max_new_tokens of every running request) in use
    /// at once; 0 takes the shards' capacity from warmup.
    #[arg(long, env = "TESSERA_MAX_BATCH_TOTAL_TOKENS", default_value_t = 0)]
    pub max_batch_total_tokens: u64,
    /// Most requests in the running batch.
    #[arg(long, env = "TESSERA_MAX_BATCH_SIZE", default_value_t = 128)]
    pub max_batch_size: u32,
    /// Decode steps after which waiting requests are prefilled even when few are waiting.
    #[arg(long, env = "TESSERA_MAX_WAITING_TOKENS", default_value_t = 20)]
    pub max_waiting_tokens: u32,
    /// Waiting requests are prefilled at once when they are at least this share of the running ones.
    #[arg(long, env = "TESSERA_WAITING_SERVED_RATIO", default_value_t = 0.3)]
    pub waiting_served_ratio: f32,
}

impl Default for BatchingConfig {
    fn default() -> Self {
        Self {
            max_batch_prefill_tokens: 4096,
            max_batch_total_tokens: 0,
            max_batch_size: 128,
            max_waiting_tokens: 20,
            waiting_served_ratio: 0.3,
        }
    }
}

/// `tessera-router`'s command line.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "tessera-router", version, about = "Tessera's HTTP router")]
pub struct RouterArgs {
    /// Address to listen on.
    #[arg(long, env = "TESSERA_HOSTNAME", default_value = "0.0.0.0")]
    pub hostname: IpAddr,
    /// Port of the HTTP API.
    #[arg(long, short, env = "TESSERA_PORT", default_value_t = 3000)]
    pub port: u16,
    /// gRPC address of shard rank 0: unix:///path/to/socket or http://host:port.
    /// The other ranks are found through ServiceDiscovery.
    #[arg(
        long,
        env = "TESSERA_SHARD_URI",
        default_value = "unix:///tmp/tessera-shard-0"
    )]
    pub shard_uri: String,
    /// Tokenizer source (a .gguf file or a Hugging Face folder); defaults to the
    /// model path the shard reports.
    #[arg(long, env = "TESSERA_TOKENIZER")]
    pub tokenizer: Option<PathBuf>,
    /// Model name reported by `/info` and `/v1/models` (defaults to the shard's).
    #[arg(long, env = "TESSERA_MODEL_ID")]
    pub model_id: Option<String>,
    /// Requests in flight at once; more get 429.
    #[arg(long, env = "TESSERA_MAX_CONCURRENT_REQUESTS", default_value_t = 128)]
    pub max_concurrent_requests: usize,
    /// Require `Authorization: Bearer KEY` on every route but /health and /metrics.
    #[arg(long, env = "TESSERA_API_KEY")]
    pub api_key: Option<String>,
    /// Log as JSON lines.
    #[arg(long, env = "TESSERA_JSON_OUTPUT")]
    pub json_output: bool,
    #[command(flatten)]
    pub limits: Limits,
    #[command(flatten)]
    pub batching: BatchingConfig,
}
