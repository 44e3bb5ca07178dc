//! Continuous batching: per replica (shard group), one task owns the queue,
//! the running batch and the KV block allocator, and drives the shards step by
//! step; [`Replicas`] sends each new request to one of them.

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
    /// The request's `infer` span: parent of its `queue` span, of the step
    /// spans where it is the step's first request (linked from the others),
    /// and of the shard ranks' per-request spans.
    pub span: Span,
    /// The `queue` span, open until the request is admitted into a prefill.
    pub queue_span: Span,
    /// `span` as a W3C `traceparent`, sent to the shard ranks with every step;
    /// `None` when traces are not exported.
    pub traceparent: Option<String>,
}

impl Entry {
    /// Ends the request with `error` (its client may be gone already) and
    /// marks its span as failed.
    pub fn fail(&self, error: InferError) {
        self.span.record("otel.status_code", "ERROR");
        self.span.record("error", tracing::field::display(&error));
        let _ = self.response.send(Err(error));
    }
}

mod blocks;
mod dispatch;
mod policy;
mod replica;
mod task;

pub use blocks::BlockAllocator;
pub use dispatch::{choose, Replicas};
pub use replica::{blocks_for, Candidate, Load, Replica, TaskStopped};
pub use task::BatchingTask;

use std::time::Duration;

use crate::client::ShardedClient;
use crate::metrics::Metrics;

/// Checks replica `replica`'s shard group every `period`: the replica takes no
/// new requests while a rank does not answer (a busy rank answers after its
/// current step), and `tessera_shard_healthy{replica}` is 0.
#[tracing::instrument(skip(client, reporter, metrics, period))]
pub async fn watch_health(
    mut client: ShardedClient,
    reporter: HealthReporter,
    metrics: Metrics,
    replica: usize,
    period: Duration,
) {
    let gauge = metrics.replica(replica).shard_healthy;
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

#[cfg(test)]
pub(crate) mod testing {
    //! Entries for unit tests.

    use std::time::Instant;

    use tokio::sync::mpsc;
    use tracing::Span;

    use super::Entry;
    use crate::infer::{ValidGenerateRequest, ValidParameters, ValidStopping};

    /// An entry with a `prompt`-token prompt; its response channel is closed.
    pub fn entry(prompt: usize, max_new_tokens: u32) -> Entry {
        let (tx, _rx) = mpsc::unbounded_channel();
        Entry {
            request: ValidGenerateRequest {
                inputs: "x".into(),
                input_ids: vec![1; prompt],
                parameters: ValidParameters::default(),
                stopping: ValidStopping {
                    max_new_tokens,
                    ..Default::default()
                },
                prompt_logprobs: false,
            },
            response: tx,
            queued: Instant::now(),
            span: Span::none(),
            queue_span: Span::none(),
            traceparent: None,
        }
    }
}
