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
    /// Most prompt tokens prefilled in one forward pass (with chunked prefill, the
    /// size of a prompt's chunks too).
    #[arg(long, env = "TESSERA_MAX_BATCH_PREFILL_TOKENS", default_value_t = 4096,
          value_parser = clap::value_parser!(u32).range(1..))]
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
    /// Running requests take their decode step inside the prefill that admits new
    /// ones, so one forward pass reads the weights for both (outputs are the same
    /// either way); false runs the two passes apart.
    #[arg(long, env = "TESSERA_DECODE_IN_PREFILL", default_value_t = true, action = clap::ArgAction::Set)]
    pub decode_in_prefill: bool,
    /// Prompts that begin like an earlier prompt (a shared system prompt, the history
    /// of a chat) reuse its cached keys and values for the common full KV blocks, so
    /// prefill computes only the rest; false computes every prompt whole.
    #[arg(long, env = "TESSERA_PREFIX_CACHING", default_value_t = true, action = clap::ArgAction::Set)]
    pub prefix_caching: bool,
    /// A prompt longer than the prefill-token budget is prefilled in chunks, one per
    /// step, while the running requests keep decoding (each step then stalls them by
    /// at most one budget's worth of prefill); false prefills every prompt whole, one
    /// larger than the budget in a step of its own.
    #[arg(long, env = "TESSERA_CHUNKED_PREFILL", default_value_t = true, action = clap::ArgAction::Set)]
    pub chunked_prefill: bool,
}

impl Default for BatchingConfig {
    fn default() -> Self {
        Self {
            max_batch_prefill_tokens: 4096,
            max_batch_total_tokens: 0,
            max_batch_size: 128,
            max_waiting_tokens: 20,
            waiting_served_ratio: 0.3,
            decode_in_prefill: true,
            prefix_caching: true,
            chunked_prefill: true,
        }
    }
}

/// One `--shard-uri` value: trimmed, non-empty, with a scheme the client speaks.
fn parse_shard_uri(value: &str) -> Result<String, String> {
    let uri = value.trim();
    if uri.is_empty() {
        return Err("an empty shard address (a stray comma?)".into());
    }
    if !(uri.starts_with("unix://") || uri.starts_with("http://")) {
        return Err(format!(
            "`{uri}`: expected unix:///path/to/socket or http://host:port"
        ));
    }
    Ok(uri.to_string())
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
    /// gRPC address of rank 0 of a shard group: unix:///path/to/socket or
    /// http://host:port; the group's other ranks are found through
    /// ServiceDiscovery. Several groups (data-parallel replicas of the same
    /// model) are served together: repeat the flag or separate the addresses
    /// with commas (also in the environment variable).
    #[arg(
        long,
        env = "TESSERA_SHARD_URI",
        value_delimiter = ',',
        value_parser = parse_shard_uri,
        default_value = "unix:///tmp/tessera-shard-0"
    )]
    pub shard_uri: Vec<String>,
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
    /// Export traces over OTLP/gRPC to this collector (e.g.
    /// http://localhost:4317). Without it, `OTEL_EXPORTER_OTLP_ENDPOINT` (or
    /// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) turns export on.
    #[arg(long, env = "TESSERA_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    #[command(flatten)]
    pub limits: Limits,
    #[command(flatten)]
    pub batching: BatchingConfig,
}

impl RouterArgs {
    /// The replica groups' rank-0 addresses, each once: serving one group
    /// through two batching tasks would hand out the same KV blocks and batch
    /// ids twice.
    pub fn replica_uris(&self) -> Result<Vec<String>, DuplicateShardUri> {
        let mut seen = std::collections::HashSet::new();
        for uri in &self.shard_uri {
            if !seen.insert(uri.as_str()) {
                return Err(DuplicateShardUri(uri.clone()));
            }
        }
        Ok(self.shard_uri.clone())
    }
}

/// The same shard group was named twice in `--shard-uri`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("--shard-uri names {0} more than once: each replica group must be listed once")]
pub struct DuplicateShardUri(pub String);

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    fn parse(args: &[&str]) -> Result<RouterArgs, clap::Error> {
        RouterArgs::try_parse_from(std::iter::once("tessera-router").chain(args.iter().copied()))
    }

    /// The only test that reads or writes TESSERA_SHARD_URI (the others pass
    /// the flag, which wins over the environment).
    #[test]
    fn one_shard_group_by_default_several_from_the_environment() {
        std::env::remove_var("TESSERA_SHARD_URI");
        let args = parse(&[]).unwrap();
        assert_eq!(args.shard_uri, vec!["unix:///tmp/tessera-shard-0"]);
        std::env::set_var("TESSERA_SHARD_URI", "unix:///tmp/a-0,unix:///tmp/b-0");
        let from_env = parse(&[]);
        let flag_wins = parse(&["--shard-uri", "http://10.0.0.1:50051"]);
        std::env::remove_var("TESSERA_SHARD_URI");
        assert_eq!(
            from_env.unwrap().shard_uri,
            vec!["unix:///tmp/a-0", "unix:///tmp/b-0"]
        );
        assert_eq!(flag_wins.unwrap().shard_uri, vec!["http://10.0.0.1:50051"]);
    }

    /// A budget of 0 would let no prompt be prefilled (with chunked prefill on, not
    /// even alone): the requests would wait forever.
    #[test]
    fn a_prefill_budget_of_zero_is_refused() {
        let e = parse(&["--max-batch-prefill-tokens", "0"]).unwrap_err();
        assert!(e.to_string().contains("max-batch-prefill-tokens"), "{e}");
        let args = parse(&["--max-batch-prefill-tokens", "1"]).unwrap();
        assert_eq!(args.batching.max_batch_prefill_tokens, 1);
    }

    #[test]
    fn several_groups_by_repeating_or_commas() {
        let args = parse(&[
            "--shard-uri",
            "unix:///tmp/a-0, unix:///tmp/b-0",
            "--shard-uri",
            "http://h:1",
        ])
        .unwrap();
        assert_eq!(
            args.replica_uris().unwrap(),
            vec!["unix:///tmp/a-0", "unix:///tmp/b-0", "http://h:1"]
        );
    }

    #[test]
    fn bad_and_repeated_addresses_are_refused() {
        let e = parse(&["--shard-uri", "unix:///tmp/a-0,"]).unwrap_err();
        assert!(e.to_string().contains("empty shard address"), "{e}");
        let e = parse(&["--shard-uri", "tcp://h:1"]).unwrap_err();
        assert!(e.to_string().contains("expected unix://"), "{e}");
        let args = parse(&["--shard-uri", "http://h:1,http://h:1"]).unwrap();
        assert_eq!(
            args.replica_uris(),
            Err(DuplicateShardUri("http://h:1".into()))
        );
    }
}
