//! Startup: connects to every replica (a shard group named by its rank 0's
//! `--shard-uri`), checks that they all serve the same model, warms each up,
//! fits the request limits to the smallest one, then starts one batching task
//! and one health watcher per replica and assembles the HTTP state.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::{join_all, try_join_all};
use tessera_model::prompt::{PromptEncoder, PromptError};
use tessera_proto as pb;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{info, info_span, warn, Instrument};

use crate::batcher::{health_channel, watch_health, BatchingTask, Replica, Replicas};
use crate::client::{ClientError, ShardedClient};
use crate::config::{DuplicateShardUri, RouterArgs};
use crate::http::{AppState, ServerInfo};
use crate::infer::Infer;
use crate::metrics::Metrics;
use crate::validation::Validation;

/// How long startup waits, and how often the shards are checked afterwards.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// How long to keep retrying to reach a shard group that is still starting.
    pub connect_patience: Duration,
    /// Time between two health checks of a replica.
    pub health_period: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            connect_patience: Duration::from_secs(120),
            health_period: Duration::from_secs(1),
        }
    }
}

/// Why the router could not start; each names the replica and its address.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error(transparent)]
    DuplicateShardUri(#[from] DuplicateShardUri),
    #[error("no --shard-uri given")]
    NoShardUri,
    #[error("connecting to replica {replica} ({uri}): {source}")]
    Connect {
        replica: usize,
        uri: String,
        #[source]
        source: ClientError,
    },
    #[error("asking replica {replica} ({uri}) for its info: {source}")]
    Info {
        replica: usize,
        uri: String,
        #[source]
        source: ClientError,
    },
    #[error(
        "replica {replica} ({uri}) serves {found}, but replica 0 ({first_uri}) serves {expected}: \
         every --shard-uri must be a shard group of the same model"
    )]
    ModelMismatch {
        replica: usize,
        uri: String,
        found: String,
        first_uri: String,
        expected: String,
    },
    #[error("loading the tokenizer from {path}: {source}")]
    Tokenizer {
        path: PathBuf,
        #[source]
        source: PromptError,
    },
    #[error("loading the tokenizer: the loading task failed: {0}")]
    TokenizerTask(String),
    #[error("warming up replica {replica} ({uri}): {source}")]
    Warmup {
        replica: usize,
        uri: String,
        #[source]
        source: ClientError,
    },
    #[error("the KV cache is too small to hold a single request")]
    KvCacheTooSmall,
}

/// A started router: the HTTP state to serve, and the tasks behind it.
pub struct Started {
    pub state: AppState,
    /// One batching task per replica; each ends once every [`Infer`] handle
    /// (the HTTP server) is gone and its requests are done.
    pub batching: Vec<JoinHandle<()>>,
    /// One health watcher per replica; they run until aborted.
    pub watchers: Vec<JoinHandle<()>>,
}

impl Started {
    /// After the HTTP server (and with it `state`) is gone: lets every batching
    /// task finish its requests, for at most `timeout`, and stops the watchers.
    pub async fn drain(self, timeout: Duration) {
        let Started {
            state,
            batching,
            watchers,
        } = self;
        drop(state);
        let _ = tokio::time::timeout(timeout, join_all(batching)).await;
        for watcher in watchers {
            watcher.abort();
        }
    }
}

/// Connects to the shard group at `uri`, retrying while the shards start.
async fn connect(uri: &str, patience: Duration) -> Result<ShardedClient, ClientError> {
    let deadline = Instant::now() + patience;
    loop {
        match ShardedClient::connect(uri).await {
            Ok(client) => return Ok(client),
            Err(e) if Instant::now() < deadline => {
                tracing::debug!("waiting for the shard at {uri}: {e}");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// What must be equal for two shard groups to be replicas of one model.
fn model_signature(info: &pb::InfoResponse) -> String {
    format!(
        "model `{}` ({}, vocabulary of {}, EOS {:?})",
        info.model_id, info.architecture, info.vocab_size, info.eos_token_ids
    )
}

/// Keeps the per-request limits inside what the model and the KV cache of
/// every replica can hold (`kv_tokens`: the smallest replica's capacity).
pub fn fit_limits(
    args: &mut RouterArgs,
    info: &pb::InfoResponse,
    kv_tokens: u64,
) -> Result<(), StartupError> {
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
        return Err(StartupError::KvCacheTooSmall);
    }
    Ok(())
}

/// One replica's shard group, connected and described.
struct Group {
    uri: String,
    client: ShardedClient,
    info: pb::InfoResponse,
}

/// Connects to every replica, warms them up and starts serving them.
pub async fn start(mut args: RouterArgs, timing: Timing) -> Result<Started, StartupError> {
    let uris = args.replica_uris()?;
    let groups = try_join_all(uris.into_iter().enumerate().map(|(replica, uri)| {
        async move {
            let mut client = connect(&uri, timing.connect_patience)
                .await
                .map_err(|source| StartupError::Connect {
                    replica,
                    uri: uri.clone(),
                    source,
                })?;
            let info = client.info().await.map_err(|source| StartupError::Info {
                replica,
                uri: uri.clone(),
                source,
            })?;
            info!(
                "replica {replica} ({uri}): {} ({} on {}, {} rank(s), {} KV blocks of {} tokens)",
                info.model_id,
                info.dtype,
                info.device,
                client.world_size(),
                info.num_blocks,
                info.block_size
            );
            Ok::<_, StartupError>(Group { uri, client, info })
        }
        .instrument(info_span!("connect", replica))
    }))
    .await?;
    let Some(first) = groups.first() else {
        return Err(StartupError::NoShardUri);
    };
    let expected = model_signature(&first.info);
    for (replica, group) in groups.iter().enumerate().skip(1) {
        let found = model_signature(&group.info);
        if found != expected {
            return Err(StartupError::ModelMismatch {
                replica,
                uri: group.uri.clone(),
                found,
                first_uri: first.uri.clone(),
                expected,
            });
        }
    }
    let shard = first.info.clone();

    let tokenizer_path = args
        .tokenizer
        .clone()
        .unwrap_or_else(|| shard.model_path.clone().into());
    let path = tokenizer_path.clone();
    let encoder = tokio::task::spawn_blocking(move || PromptEncoder::open(&path))
        .await
        .map_err(|e| StartupError::TokenizerTask(e.to_string()))?
        .map_err(|source| StartupError::Tokenizer {
            path: tokenizer_path,
            source,
        })?;

    let started = Instant::now();
    let request = pb::WarmupRequest {
        max_prefill_tokens: args.batching.max_batch_prefill_tokens,
        max_batch_size: args.batching.max_batch_size,
    };
    let warmups = try_join_all(groups.iter().enumerate().map(|(replica, group)| {
        let mut client = group.client.clone();
        async move {
            client
                .warmup(request)
                .await
                .map_err(|source| StartupError::Warmup {
                    replica,
                    uri: group.uri.clone(),
                    source,
                })
        }
        .instrument(info_span!("warmup", replica))
    }))
    .await?;
    info!(
        "warmup of {} replica(s) done in {:.1} s",
        groups.len(),
        started.elapsed().as_secs_f64()
    );

    let metrics = Metrics::new();
    let mut tasks = Vec::with_capacity(groups.len());
    for (replica, (group, warmup)) in groups.iter().zip(&warmups).enumerate() {
        let (reporter, health) = health_channel();
        let task = BatchingTask::new(
            replica,
            group.client.clone(),
            args.batching.clone(),
            warmup.num_blocks,
            warmup.block_size,
            &metrics,
            reporter.clone(),
        );
        tasks.push((task, reporter, health));
    }
    // The smallest replica bounds what one request may ask for.
    let smallest = tasks
        .iter()
        .enumerate()
        .min_by_key(|(_, (task, _, _))| task.capacity_tokens())
        .map_or(0, |(replica, _)| replica);
    let kv_tokens = tasks
        .get(smallest)
        .map_or(0, |(task, _, _)| task.capacity_tokens());
    fit_limits(&mut args, &shard, kv_tokens)?;

    let mut replicas = Vec::with_capacity(tasks.len());
    let mut batching = Vec::with_capacity(tasks.len());
    let mut watchers = Vec::with_capacity(tasks.len());
    for (replica, ((task, reporter, health), group)) in tasks.into_iter().zip(groups).enumerate() {
        let (entries, queue) = mpsc::unbounded_channel();
        replicas.push(
            Replica::new(replica, entries, health, task.load(), task.block_size())
                .with_counter(metrics.replica(replica).requests),
        );
        batching
            .push(tokio::spawn(task.run(queue).instrument(
                info_span!("batching", replica, uri = %group.uri),
            )));
        watchers.push(tokio::spawn(watch_health(
            group.client,
            reporter,
            metrics.clone(),
            replica,
            timing.health_period,
        )));
    }

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
    if let Some(warmup) = warmups.get(smallest) {
        info.block_size = warmup.block_size;
        info.num_blocks = u64::from(warmup.num_blocks);
        info.max_total_kv_tokens = warmup.max_total_tokens;
    }
    info.world_size = shard.world_size;
    info.replicas = replicas.len();

    let state = AppState {
        infer: Infer::with_replicas(Replicas::new(replicas), args.max_concurrent_requests),
        validation: Validation::new(Arc::new(encoder), args.limits.clone()),
        metrics,
        info: Arc::new(info),
        api_key: args.api_key.clone(),
    };
    Ok(Started {
        state,
        batching,
        watchers,
    })
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    fn info(model_id: &str, vocab_size: u32) -> pb::InfoResponse {
        pb::InfoResponse {
            model_id: model_id.into(),
            architecture: "llama".into(),
            vocab_size,
            max_position_embeddings: 2048,
            eos_token_ids: vec![2],
            ..Default::default()
        }
    }

    #[test]
    fn replicas_of_one_model_have_one_signature() {
        let a = info("smol", 49152);
        let mut b = a.clone();
        // Where and how a replica runs may differ.
        b.device = "cuda:1".into();
        b.num_blocks = 7;
        b.dtype = "float16".into();
        assert_eq!(model_signature(&a), model_signature(&b));
        assert_ne!(model_signature(&a), model_signature(&info("other", 49152)));
        assert_ne!(model_signature(&a), model_signature(&info("smol", 32000)));
    }

    #[test]
    fn limits_fit_the_smallest_kv_cache_and_the_context() {
        let mut args = RouterArgs::try_parse_from(["tessera-router"]).unwrap();
        fit_limits(&mut args, &info("smol", 10), 1000).unwrap();
        assert_eq!(args.limits.max_total_tokens, 1000);
        assert_eq!(args.limits.max_input_tokens, 999);
        fit_limits(&mut args, &info("smol", 10), 100_000).unwrap();
        assert_eq!(args.limits.max_total_tokens, 1000, "never raised");
        let mut args = RouterArgs::try_parse_from(["tessera-router"]).unwrap();
        fit_limits(&mut args, &info("smol", 10), 100_000).unwrap();
        assert_eq!(args.limits.max_total_tokens, 2048, "the model's context");
        assert!(matches!(
            fit_limits(&mut args, &info("smol", 10), 1),
            Err(StartupError::KvCacheTooSmall)
        ));
    }
}
