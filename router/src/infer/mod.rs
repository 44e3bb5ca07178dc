//! The front of inference: takes validated requests, enforces the concurrency
//! limit, hands each to the batching task of one replica (shard group) and
//! returns their token streams.

mod types;

pub use types::*;

use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use futures::{Stream, StreamExt};
use tessera_telemetry::propagation;
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tracing::info_span;

use crate::batcher::{Entry, HealthState, Load, Replica, Replicas};

#[derive(Debug, Clone, thiserror::Error)]
pub enum InferError {
    #[error("Model is overloaded: more than {0} concurrent requests")]
    Overloaded(usize),
    #[error("The model is not ready to serve: {0}")]
    Unavailable(String),
    #[error("Request failed during generation: {0}")]
    Generation(String),
    #[error("Request needs {needed} KV cache tokens but the server has {capacity} in all")]
    TooLarge { needed: u64, capacity: u64 },
    #[error("Generation ended without a final token")]
    IncompleteGeneration,
}

impl InferError {
    /// The `error_type` field of error bodies.
    pub fn error_type(&self) -> &'static str {
        match self {
            InferError::Overloaded(_) => "overloaded",
            InferError::Unavailable(_) => "unavailable",
            InferError::Generation(_) => "generation",
            InferError::TooLarge { .. } => "validation",
            InferError::IncompleteGeneration => "incomplete_generation",
        }
    }
}

pub type InferStream =
    Pin<Box<dyn Stream<Item = Result<InferStreamResponse, InferError>> + Send + Sync>>;

/// Cheap to clone; every clone talks to the same batching tasks.
#[derive(Clone)]
pub struct Infer {
    replicas: Arc<Replicas>,
    limit: Arc<Semaphore>,
    max_concurrent_requests: usize,
}

impl Infer {
    /// One batching task behind `entries` (a server with one replica, and
    /// tests with a scripted stand-in for the task).
    pub fn new(
        entries: mpsc::UnboundedSender<Entry>,
        max_concurrent_requests: usize,
        health: HealthState,
    ) -> Self {
        // Nothing publishes a load: with one replica there is nothing to choose.
        let (_, load) = watch::channel(Load::default());
        let replica = Replica::new(0, entries, health, load, 1);
        Self::with_replicas(Replicas::new(vec![replica]), max_concurrent_requests)
    }

    /// Several replicas: each request goes to one of them (see [`Replicas::dispatch`]).
    pub fn with_replicas(replicas: Replicas, max_concurrent_requests: usize) -> Self {
        Self {
            replicas: Arc::new(replicas),
            limit: Arc::new(Semaphore::new(max_concurrent_requests)),
            max_concurrent_requests,
        }
    }

    /// The replicas, their health and load.
    pub fn replicas(&self) -> &Replicas {
        &self.replicas
    }

    /// Queues `request` and returns its token stream. Dropping the stream
    /// cancels the request: its KV blocks are freed within one decode step.
    pub fn generate_stream(
        &self,
        request: ValidGenerateRequest,
    ) -> Result<InferStream, InferError> {
        let permit: OwnedSemaphorePermit = self
            .limit
            .clone()
            .try_acquire_owned()
            .map_err(|_| InferError::Overloaded(self.max_concurrent_requests))?;
        let (tx, rx) = mpsc::unbounded_channel();
        // The request's life in the batcher, from the queue to its last token;
        // `replica` and `request_id` are filled in once known.
        let span = info_span!(
            "infer",
            replica = tracing::field::Empty,
            request_id = tracing::field::Empty,
            input_tokens = request.input_ids.len(),
            max_new_tokens = request.stopping.max_new_tokens,
            generated_tokens = tracing::field::Empty,
            finish_reason = tracing::field::Empty,
            error = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
        );
        let queue_span = info_span!(parent: &span, "queue");
        let traceparent = propagation::traceparent(&propagation::context_of(&span));
        let entry = Entry {
            request,
            response: tx,
            queued: Instant::now(),
            span: span.clone(),
            queue_span,
            traceparent,
        };
        let replica = self.replicas.dispatch(entry)?;
        span.record("replica", replica);
        let stream = tokio_stream::wrappers::UnboundedReceiverStream::new(rx).map(move |event| {
            // The permit lives as long as the stream.
            let _held = &permit;
            event
        });
        Ok(Box::pin(stream))
    }
}
