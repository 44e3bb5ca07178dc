//! `tessera-router`: connects to shard rank 0 (and through it to every rank),
//! warms the shards up, starts the batching task and serves the HTTP API.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use tessera_model::prompt::PromptEncoder;
use tessera_proto as pb;
use tessera_router::batcher::{health_channel, watch_health, BatchingTask};
use tessera_router::client::ShardedClient;
use tessera_router::config::RouterArgs;
use tessera_router::http::{self, AppState, ServerInfo};
use tessera_router::infer::Infer;
use tessera_router::metrics::Metrics;
use tessera_router::validation::Validation;
use tracing::{info, warn};

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// Connects to the shard group, retrying while the shards start.
async fn connect(uri: &str, patience: Duration) -> anyhow::Result<ShardedClient> {
    let deadline = Instant::now() + patience;
    loop {
        match ShardedClient::connect(uri).await {
            Ok(client) => return Ok(client),
            Err(e) if Instant::now() < deadline => {
                tracing::debug!("waiting for the shard at {uri}: {e}");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => return Err(e).context("connecting to the shards"),
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = ctrl_c => {},
                _ = term.recv() => {},
            }
        }
        Err(_) => {
            let _ = ctrl_c.await;
        }
    }
    info!("shutting down: finishing the requests in flight");
}

/// Keeps the per-request limits inside what the model and the KV cache can hold.
fn fit_limits(
    args: &mut RouterArgs,
    info: &pb::InfoResponse,
    kv_tokens: u64,
) -> anyhow::Result<()> {
    let limits = &mut args.limits;
    let mut ceiling = kv_tokens.min(u32::MAX as u64) as u32;
    if info.max_position_embeddings > 0 {
        ceiling = ceiling.min(info.max_position_embeddings);
    }
    if limits.max_total_tokens > ceiling {
        warn!(
            "--max-total-tokens {} is more than the model or the KV cache hold; using {ceiling}",
            limits.max_total_tokens
        );
        limits.max_total_tokens = ceiling;
    }
    if limits.max_input_tokens >= limits.max_total_tokens {
        limits.max_input_tokens = limits.max_total_tokens.saturating_sub(1);
    }
    if limits.max_input_tokens == 0 {
        anyhow::bail!("the KV cache is too small to hold a single request");
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = RouterArgs::parse();
    init_logging(args.json_output);

    let mut client = connect(&args.shard_uri, Duration::from_secs(120)).await?;
    let shard = client
        .info()
        .await
        .context("asking the shard for its info")?;
    info!(
        "shards: {} ({} on {}, {} rank(s), {} KV blocks of {} tokens)",
        shard.model_id,
        shard.dtype,
        shard.device,
        client.world_size(),
        shard.num_blocks,
        shard.block_size
    );
    let tokenizer_path = args
        .tokenizer
        .clone()
        .unwrap_or_else(|| shard.model_path.clone().into());
    let encoder = tokio::task::spawn_blocking(move || PromptEncoder::open(&tokenizer_path))
        .await
        .context("loading the tokenizer")??;

    let started = Instant::now();
    let warmup = client
        .warmup(pb::WarmupRequest {
            max_prefill_tokens: args.batching.max_batch_prefill_tokens,
            max_batch_size: args.batching.max_batch_size,
        })
        .await
        .context("warming up the shards")?;
    info!("warmup done in {:.1} s", started.elapsed().as_secs_f64());

    let metrics = Metrics::new();
    let (reporter, health) = health_channel();
    let task = BatchingTask::new(
        client.clone(),
        args.batching.clone(),
        warmup.num_blocks,
        warmup.block_size,
        metrics.clone(),
        reporter.clone(),
    );
    let kv_tokens = task.capacity_tokens();
    fit_limits(&mut args, &shard, kv_tokens)?;
    let (entries, queue) = tokio::sync::mpsc::unbounded_channel();
    let batching = tokio::spawn(task.run(queue));
    tokio::spawn(watch_health(
        client,
        reporter,
        metrics.clone(),
        "0".into(),
        Duration::from_secs(1),
    ));

    let model_id = args.model_id.clone().unwrap_or(shard.model_id.clone());
    let mut info = ServerInfo::new(model_id, &args.limits, args.max_concurrent_requests);
    info.model_path = shard.model_path.clone();
    info.model_dtype = shard.dtype.clone();
    info.model_device_type = shard.device.split(':').next().unwrap_or("cpu").to_string();
    info.max_batch_total_tokens = kv_tokens;
    info.max_batch_prefill_tokens = args.batching.max_batch_prefill_tokens;
    info.max_batch_size = Some(args.batching.max_batch_size);
    info.max_waiting_tokens = args.batching.max_waiting_tokens;
    info.waiting_served_ratio = args.batching.waiting_served_ratio;
    info.block_size = warmup.block_size;
    info.num_blocks = warmup.num_blocks as u64;
    info.max_total_kv_tokens = warmup.max_total_tokens;
    info.world_size = shard.world_size;

    let infer = Infer::new(entries, args.max_concurrent_requests, health);
    let state = AppState {
        infer,
        validation: Validation::new(Arc::new(encoder), args.limits.clone()),
        metrics,
        info: Arc::new(info),
        api_key: args.api_key.clone(),
    };
    let addr = SocketAddr::new(args.hostname, args.port);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    info!(
        "router ready on http://{}",
        listener.local_addr().unwrap_or(addr)
    );
    http::serve(http::app(state), listener, shutdown_signal())
        .await
        .context("serving HTTP")?;
    // The HTTP server (and with it every Infer handle) is gone: the batching
    // task drains what is left and stops.
    let _ = tokio::time::timeout(Duration::from_secs(30), batching).await;
    Ok(())
}
