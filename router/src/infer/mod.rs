//! The front of inference: takes validated requests, enforces the concurrency
//! limit, hands them to the batching task and returns their token streams.

mod types;

pub use types::*;

use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use futures::{Stream, StreamExt};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tracing::Span;

use crate::batcher::{Entry, HealthState};

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

/// Cheap to clone; every clone talks to the same batching task.
#[derive(Clone)]
pub struct Infer {
    entries: mpsc::UnboundedSender<Entry>,
    limit: Arc<Semaphore>,
    max_concurrent_requests: usize,
    health: HealthState,
}

impl Infer {
    pub fn new(
        entries: mpsc::UnboundedSender<Entry>,
        max_concurrent_requests: usize,
        health: HealthState,
    ) -> Self {
        Self {
            entries,
            limit: Arc::new(Semaphore::new(max_concurrent_requests)),
            max_concurrent_requests,
            health,
        }
    }

    /// Whether every shard answered its last health check and the batching task runs.
    pub fn health(&self) -> &HealthState {
        &self.health
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
        if !self.health.is_ready() {
            return Err(InferError::Unavailable(self.health.reason()));
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let entry = Entry {
            request,
            response: tx,
            queued: Instant::now(),
            span: Span::current(),
        };
        self.entries
            .send(entry)
            .map_err(|_| InferError::Unavailable("the batching task has stopped".into()))?;
        let stream = tokio_stream::wrappers::UnboundedReceiverStream::new(rx).map(move |event| {
            // The permit lives as long as the stream.
            let _held = &permit;
            event
        });
        Ok(Box::pin(stream))
    }
}
