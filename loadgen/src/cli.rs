//! The command line; every flag can also come from a `TESSERA_LOADGEN_*` variable.

use crate::api::ApiKind;
use crate::runner::RunConfig;
use clap::Parser;
use std::path::PathBuf;
use std::time::Duration;

/// Benchmarks a running server over its streaming HTTP API and prints time to
/// first token, time per output token, inter-token latency, end-to-end latency
/// (p50/p90/p99) and output tokens/s per phase.
#[derive(Debug, Clone, Parser)]
#[command(name = "tessera-loadgen", version)]
pub struct Args {
    /// Server root URL.
    #[arg(
        long,
        env = "TESSERA_LOADGEN_URL",
        default_value = "http://127.0.0.1:3000"
    )]
    pub url: String,

    /// API to drive: `openai` (POST /v1/completions) or `tgi` (POST /generate_stream).
    #[arg(
        long,
        env = "TESSERA_LOADGEN_API",
        value_enum,
        default_value = "openai"
    )]
    pub api: ApiKind,

    /// Closed-loop phases: one per value, with that many clients sending back to back.
    #[arg(
        long,
        env = "TESSERA_LOADGEN_CONCURRENCY",
        value_delimiter = ',',
        default_value = "1,8,32,64"
    )]
    pub concurrency: Vec<usize>,

    /// Poisson phases instead of closed loops: one per value, in requests/s.
    #[arg(long, env = "TESSERA_LOADGEN_RATE", value_delimiter = ',')]
    pub rate: Vec<f64>,

    /// Measured requests per phase [default: 4 × concurrency, or 10 s of
    /// arrivals at --rate; at least 8; unlimited with --duration].
    #[arg(long, env = "TESSERA_LOADGEN_REQUESTS")]
    pub requests: Option<usize>,

    /// Stop starting requests this many seconds into each phase.
    #[arg(long, env = "TESSERA_LOADGEN_DURATION")]
    pub duration: Option<f64>,

    /// Requests sent once before the first phase and not counted.
    #[arg(long, env = "TESSERA_LOADGEN_WARMUP", default_value_t = 0)]
    pub warmup: usize,

    /// Prompt lengths in approximate tokens; requests cycle through them.
    #[arg(
        long,
        env = "TESSERA_LOADGEN_PROMPT_LENS",
        value_delimiter = ',',
        default_value = "32,128,512"
    )]
    pub prompt_lens: Vec<usize>,

    /// Words (about tokens) of one prefix that every prompt starts with, before its
    /// own `--prompt-lens` words, as requests that share a system prompt do; 0: none
    /// (no prompt shares anything a prefix cache could reuse).
    #[arg(long, env = "TESSERA_LOADGEN_SHARED_PREFIX", default_value_t = 0)]
    pub shared_prefix: usize,

    /// Output tokens per request (EOS is ignored so every request makes exactly this many).
    #[arg(long, env = "TESSERA_LOADGEN_MAX_TOKENS", default_value_t = 64)]
    pub max_tokens: u32,

    /// Seed of the prompts and of the Poisson arrivals.
    #[arg(long, env = "TESSERA_LOADGEN_SEED", default_value_t = 0)]
    pub seed: u64,

    /// Sent as `Authorization: Bearer <key>`.
    #[arg(long, env = "TESSERA_LOADGEN_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,

    /// `model` field of OpenAI requests (omitted when not given).
    #[arg(long, env = "TESSERA_LOADGEN_MODEL")]
    pub model: Option<String>,

    /// Also write every figure to this JSON file.
    #[arg(long, env = "TESSERA_LOADGEN_JSON")]
    pub json: Option<PathBuf>,

    /// Per-request timeout in seconds, connection to last byte.
    #[arg(long, env = "TESSERA_LOADGEN_TIMEOUT", default_value_t = 300.0)]
    pub timeout: f64,
}

impl Args {
    /// The run these flags describe (validated later by the runner).
    pub fn run_config(&self) -> RunConfig {
        RunConfig {
            url: self.url.clone(),
            api: self.api,
            api_key: self.api_key.clone(),
            model: self.model.clone(),
            concurrency: self.concurrency.clone(),
            rates: self.rate.clone(),
            requests: self.requests,
            duration: self.duration.map(seconds),
            warmup: self.warmup,
            prompt_lens: self.prompt_lens.clone(),
            shared_prefix: self.shared_prefix,
            max_tokens: self.max_tokens,
            seed: self.seed,
            timeout: seconds(self.timeout),
        }
    }
}

/// Non-finite or negative seconds become zero, which validation rejects.
fn seconds(secs: f64) -> Duration {
    Duration::try_from_secs_f64(secs).unwrap_or(Duration::ZERO)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_lists_and_defaults() {
        let args = Args::try_parse_from([
            "tessera-loadgen",
            "--api",
            "tgi",
            "--concurrency",
            "2,4",
            "--prompt-lens",
            "16,64",
            "--duration",
            "1.5",
        ]);
        let args = args.map_err(|e| e.to_string());
        let Ok(args) = args else {
            panic!("{args:?}");
        };
        let config = args.run_config();
        assert_eq!(config.api, ApiKind::Tgi);
        assert_eq!(config.concurrency, [2, 4]);
        assert_eq!(config.prompt_lens, [16, 64]);
        assert_eq!(config.duration, Some(Duration::from_millis(1500)));
        assert_eq!(config.max_tokens, 64);
        assert!(config.rates.is_empty());
    }
}
