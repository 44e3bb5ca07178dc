//! `tessera-shard`: the engine's command line (generate, bench).

use std::io::Write;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use tessera_shard::bench::{self, BenchArgs};
use tessera_shard::cli::{engine_config, model_path, ModelArgs};
use tessera_shard::kv_cache::BlockAllocator;
use tessera_shard::sampling::SamplingParams;
use tessera_shard::server::{self, ServeArgs};
use tessera_shard::stopping::StoppingCriteria;
use tessera_shard::{Engine, GenerateRequest};

#[derive(Parser)]
#[command(name = "tessera-shard", version, about = "Tessera's model engine")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text from a prompt and stream it to stdout.
    Generate(GenerateArgs),
    /// Print load time, prefill and decode throughput and peak memory.
    Bench(BenchArgs),
    /// Serve the router–shard gRPC contract (one process per rank).
    Serve(ServeArgs),
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The prompt.
    prompt: String,
    /// Wrap the prompt as a user message in the model's chat template.
    #[arg(long)]
    chat: bool,
    #[arg(long, default_value_t = 64)]
    max_new_tokens: u32,
    /// 0 means greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 0)]
    top_k: u32,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    #[arg(long)]
    seed: Option<u64>,
    /// Stop when the output contains this text (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Keep generating past the end-of-sequence token.
    #[arg(long)]
    ignore_eos: bool,
}

fn generate(args: GenerateArgs) -> anyhow::Result<()> {
    let config = engine_config(&args.model)?;
    let path = model_path(&args.model);
    let mut engine =
        Engine::load(&path, &config).with_context(|| format!("loading {}", path.display()))?;
    let prompt = if args.chat {
        engine.apply_chat_template(&args.prompt)?
    } else {
        args.prompt.clone()
    };
    let prompt_ids = engine.encode(&prompt)?;
    let cache = engine.cache();
    let mut blocks = BlockAllocator::new(cache.num_blocks(), cache.block_size());
    let block_table = blocks.allocate(prompt_ids.len() + args.max_new_tokens as usize)?;
    let request = GenerateRequest {
        id: 0,
        prompt: prompt_ids,
        sampling: SamplingParams {
            temperature: args.temperature,
            do_sample: args.temperature > 0.0,
            top_k: args.top_k,
            top_p: args.top_p,
            repetition_penalty: args.repetition_penalty,
            seed: args.seed,
            ..SamplingParams::default()
        },
        stopping: StoppingCriteria {
            max_new_tokens: args.max_new_tokens,
            eos_token_ids: engine.eos_ids().to_vec(),
            stop_sequences: args.stop.clone(),
            ignore_eos: args.ignore_eos,
            min_new_tokens: 0,
        },
        block_table,
        cached_tokens: 0,
        prompt_logprobs: false,
        prefill_only: false,
    };
    let mut out = std::io::stdout().lock();
    let (mut batch, mut generations) = engine.prefill(vec![request])?;
    loop {
        let mut done = false;
        for g in &generations {
            // Special tokens (end of turn and the like) are control, not text.
            if !g.special {
                write!(out, "{}", g.text)?;
            }
            done |= g.finish_reason.is_some();
        }
        out.flush()?;
        if done {
            break;
        }
        generations = engine.decode(&mut batch)?;
    }
    writeln!(out)?;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // The server sets up its own logs and traces (see server::serve); the
    // one-shot commands log only warnings.
    if !matches!(cli.command, Command::Serve(_)) {
        tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
            )
            .with_writer(std::io::stderr)
            .init();
    }
    let _guard = tch::no_grad_guard();
    match cli.command {
        Command::Generate(args) => generate(args),
        Command::Bench(args) => bench::run(args),
        Command::Serve(args) => server::serve(args),
    }
}
