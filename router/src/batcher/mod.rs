//! Continuous batching: one task owns the queue, the running batch and the KV
//! block allocator, and drives the shards step by step.

mod health;

pub use health::{health_channel, Health, HealthReporter, HealthState};

use std::time::Instant;

use tokio::sync::mpsc;
use tracing::Span;

use crate::infer::{InferError, InferStreamResponse, ValidGenerateRequest};

/// A request waiting for, or in, the running batch.
#[derive(Debug)]
pub struct Entry {
    pub request: ValidGenerateRequest,
    /// Where its tokens go; closed when the client went away.
    pub response: mpsc::UnboundedSender<Result<InferStreamResponse, InferError>>,
    pub queued: Instant,
    /// The request's span, parent of the batch spans it takes part in.
    pub span: Span,
}

mod blocks;
mod policy;
mod task;

pub use blocks::BlockAllocator;
pub use task::BatchingTask;

use std::time::Duration;

use crate::client::ShardedClient;
use crate::metrics::Metrics;

/// Checks the shard group every `period`: `/health` answers 503 while a rank
/// does not answer (a busy rank answers after its current step).
pub async fn watch_health(
    mut client: ShardedClient,
    reporter: HealthReporter,
    metrics: Metrics,
    group: String,
    period: Duration,
) {
    let gauge = metrics.shard_healthy.with_label_values(&[group.as_str()]);
    loop {
        let outcome = tokio::time::timeout(Duration::from_secs(60), client.health()).await;
        match outcome {
            Ok(Ok(())) => {
                gauge.set(1);
                reporter.set(Health::Ready);
            }
            Ok(Err(e)) => {
                gauge.set(0);
                reporter.set(Health::Down(e.to_string()));
            }
            Err(_) => {
                gauge.set(0);
                reporter.set(Health::Down(
                    "a shard rank did not answer its health check within 60 s".into(),
                ));
            }
        }
        tokio::time::sleep(period).await;
    }
}
