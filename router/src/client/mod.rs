//! gRPC clients of the shard ranks. [`ShardedClient`] sends every call to all
//! ranks of a group and returns rank 0's answer (all ranks sample the same tokens).

mod connect;

use futures::future::try_join_all;
use tessera_proto as pb;
use tessera_proto::text_generation_service_client::TextGenerationServiceClient;
use tessera_telemetry::propagation;
use tonic::transport::Channel;
use tracing::{info_span, instrument, Instrument};

pub use connect::connect;

#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to shard {uri}: {message}")]
    Connect { uri: String, message: String },
    #[error("shard rank {rank} failed: {message}")]
    Shard { rank: usize, message: String },
    #[error("shard rank {rank} sent an empty {what}")]
    Empty { rank: usize, what: &'static str },
}

/// One rank.
#[derive(Clone)]
pub struct ShardClient {
    rank: usize,
    inner: TextGenerationServiceClient<Channel>,
}

fn status(rank: usize) -> impl Fn(tonic::Status) -> ClientError {
    move |s| ClientError::Shard {
        rank,
        message: if s.message().is_empty() {
            format!("{:?}", s.code())
        } else {
            s.message().to_string()
        },
    }
}

/// `message` as a call whose `traceparent` metadata names `span`, the
/// caller's span of this call (nothing is added when traces are not exported).
fn traced<T>(message: T, span: &tracing::Span) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    propagation::inject_grpc(&propagation::context_of(span), request.metadata_mut());
    request
}

/// The router's span of one call to one rank (`shard_rpc`); the rank's
/// handler span is its child through the `traceparent` metadata.
fn rpc_span(method: &'static str, rank: usize) -> tracing::Span {
    info_span!("shard_rpc", otel.kind = "client", rpc.method = method, rank)
}

impl ShardClient {
    pub async fn connect(uri: &str, rank: usize) -> Result<Self, ClientError> {
        let channel = connect(uri).await?;
        Ok(Self {
            rank,
            inner: TextGenerationServiceClient::new(channel)
                .max_decoding_message_size(64 << 20)
                .max_encoding_message_size(64 << 20),
        })
    }

    pub async fn info(&mut self) -> Result<pb::InfoResponse, ClientError> {
        Ok(self
            .inner
            .info(pb::InfoRequest {})
            .await
            .map_err(status(self.rank))?
            .into_inner())
    }

    pub async fn health(&mut self) -> Result<(), ClientError> {
        self.inner
            .health(pb::HealthRequest {})
            .await
            .map_err(status(self.rank))?;
        Ok(())
    }

    pub async fn service_discovery(&mut self) -> Result<Vec<String>, ClientError> {
        Ok(self
            .inner
            .service_discovery(pb::ServiceDiscoveryRequest {})
            .await
            .map_err(status(self.rank))?
            .into_inner()
            .urls)
    }

    pub async fn warmup(
        &mut self,
        request: pb::WarmupRequest,
    ) -> Result<pb::WarmupResponse, ClientError> {
        let span = rpc_span("Warmup", self.rank);
        Ok(self
            .inner
            .warmup(traced(request, &span))
            .instrument(span)
            .await
            .map_err(status(self.rank))?
            .into_inner())
    }

    pub async fn prefill(
        &mut self,
        request: pb::PrefillRequest,
    ) -> Result<pb::PrefillResponse, ClientError> {
        let span = rpc_span("Prefill", self.rank);
        Ok(self
            .inner
            .prefill(traced(request, &span))
            .instrument(span)
            .await
            .map_err(status(self.rank))?
            .into_inner())
    }

    pub async fn decode(
        &mut self,
        request: pb::DecodeRequest,
    ) -> Result<pb::DecodeResponse, ClientError> {
        let span = rpc_span("Decode", self.rank);
        Ok(self
            .inner
            .decode(traced(request, &span))
            .instrument(span)
            .await
            .map_err(status(self.rank))?
            .into_inner())
    }

    pub async fn filter_batch(
        &mut self,
        batch_id: u64,
        request_ids: Vec<u64>,
    ) -> Result<Option<pb::CachedBatch>, ClientError> {
        Ok(self
            .inner
            .filter_batch(pb::FilterBatchRequest {
                batch_id,
                request_ids,
            })
            .await
            .map_err(status(self.rank))?
            .into_inner()
            .batch)
    }

    pub async fn clear_cache(&mut self, batch_id: Option<u64>) -> Result<(), ClientError> {
        self.inner
            .clear_cache(pb::ClearCacheRequest { batch_id })
            .await
            .map_err(status(self.rank))?;
        Ok(())
    }
}

/// The decode step a `Prefill` or `Decode` call asks of the cached batches.
#[derive(Debug, Clone, Default)]
pub struct Step {
    /// The cached batches that advance by one token (none: a plain prefill).
    pub batch_ids: Vec<u64>,
    /// The next call is a prefill that steps the returned batch, so the shard must
    /// not step it ahead.
    pub prefill_follows: bool,
}

/// Every rank of one shard group.
#[derive(Clone)]
pub struct ShardedClient {
    ranks: Vec<ShardClient>,
}

/// The first rank's answer of a call made on every rank.
fn first<T>(mut answers: Vec<T>) -> Result<T, ClientError> {
    if answers.is_empty() {
        return Err(ClientError::Empty {
            rank: 0,
            what: "answer list",
        });
    }
    Ok(answers.swap_remove(0))
}

impl ShardedClient {
    /// Connects to rank 0 at `uri`, asks it for the group's addresses and connects to the others.
    pub async fn connect(uri: &str) -> Result<Self, ClientError> {
        let mut master = ShardClient::connect(uri, 0).await?;
        let urls = master.service_discovery().await?;
        let mut ranks = vec![master];
        for (rank, url) in urls.iter().enumerate().skip(1) {
            ranks.push(ShardClient::connect(url, rank).await?);
        }
        Ok(Self { ranks })
    }

    pub fn world_size(&self) -> usize {
        self.ranks.len()
    }

    pub async fn info(&mut self) -> Result<pb::InfoResponse, ClientError> {
        first(try_join_all(self.ranks.iter_mut().map(|c| c.info())).await?)
    }

    pub async fn health(&mut self) -> Result<(), ClientError> {
        try_join_all(self.ranks.iter_mut().map(|c| c.health())).await?;
        Ok(())
    }

    #[instrument(skip_all)]
    pub async fn warmup(
        &mut self,
        request: pb::WarmupRequest,
    ) -> Result<pb::WarmupResponse, ClientError> {
        first(try_join_all(self.ranks.iter_mut().map(|c| c.warmup(request))).await?)
    }

    /// Prefills `batch` on every rank, with one decode step of the cached
    /// batches `step.batch_ids` in the same forward pass; `traces` are the
    /// requests' trace contexts (empty when traces are not exported). Returns
    /// rank 0's answer and each rank's timings.
    pub async fn prefill(
        &mut self,
        batch: pb::Batch,
        traces: Vec<pb::RequestTrace>,
        step: Step,
    ) -> Result<(pb::PrefillResponse, Vec<Option<pb::Timings>>), ClientError> {
        let request = pb::PrefillRequest {
            batch: Some(batch),
            traces,
            decode_batch_ids: step.batch_ids,
            prefill_follows: step.prefill_follows,
        };
        let answers =
            try_join_all(self.ranks.iter_mut().map(|c| c.prefill(request.clone()))).await?;
        let timings = answers.iter().map(|a| a.timings).collect();
        Ok((first(answers)?, timings))
    }

    /// One decode step of `step.batch_ids` on every rank; `traces` as for prefill.
    pub async fn decode(
        &mut self,
        step: Step,
        traces: Vec<pb::RequestTrace>,
    ) -> Result<(pb::DecodeResponse, Vec<Option<pb::Timings>>), ClientError> {
        let request = pb::DecodeRequest {
            batch_ids: step.batch_ids,
            traces,
            prefill_follows: step.prefill_follows,
        };
        let answers =
            try_join_all(self.ranks.iter_mut().map(|c| c.decode(request.clone()))).await?;
        let timings = answers.iter().map(|a| a.timings).collect();
        Ok((first(answers)?, timings))
    }

    pub async fn filter_batch(
        &mut self,
        batch_id: u64,
        request_ids: Vec<u64>,
    ) -> Result<Option<pb::CachedBatch>, ClientError> {
        first(
            try_join_all(
                self.ranks
                    .iter_mut()
                    .map(|c| c.filter_batch(batch_id, request_ids.clone())),
            )
            .await?,
        )
    }

    pub async fn clear_cache(&mut self, batch_id: Option<u64>) -> Result<(), ClientError> {
        try_join_all(self.ranks.iter_mut().map(|c| c.clear_cache(batch_id))).await?;
        Ok(())
    }
}
