//! The gRPC service: each handler turns its message into a command for the
//! engine thread and awaits the reply.

use tessera_proto as pb;
use tessera_proto::text_generation_service_server::TextGenerationService;
use tokio::sync::{mpsc, oneshot};
use tonic::{Request, Response, Status};
use tracing::instrument;

use crate::error::EngineError;

use super::convert;
use super::worker::{Command, StepOutput};

pub struct ShardService {
    pub commands: mpsc::Sender<Command>,
    pub info: pb::InfoResponse,
    /// This group's rank addresses, in rank order.
    pub urls: Vec<String>,
}

fn engine_status(e: EngineError) -> Status {
    match e {
        EngineError::Request { .. } | EngineError::Batch(_) => {
            Status::invalid_argument(e.to_string())
        }
        EngineError::KvCache(_) => Status::resource_exhausted(e.to_string()),
        _ => Status::internal(e.to_string()),
    }
}

impl ShardService {
    async fn call<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> Result<T, Status> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(make(tx))
            .await
            .map_err(|_| Status::unavailable("the engine thread has stopped"))?;
        rx.await.map_err(|_| {
            Status::internal("the engine thread dropped the request (it panicked or stopped)")
        })
    }

    fn step_response(
        out: StepOutput,
    ) -> (Vec<pb::Generation>, Option<pb::CachedBatch>, pb::Timings) {
        (
            out.generations
                .into_iter()
                .map(convert::generation)
                .collect(),
            out.batch.map(convert::cached_batch),
            pb::Timings {
                forward_ns: out.forward_ns,
                total_ns: out.total_ns,
            },
        )
    }
}

#[tonic::async_trait]
impl TextGenerationService for ShardService {
    async fn info(
        &self,
        _: Request<pb::InfoRequest>,
    ) -> Result<Response<pb::InfoResponse>, Status> {
        Ok(Response::new(self.info.clone()))
    }

    async fn health(
        &self,
        _: Request<pb::HealthRequest>,
    ) -> Result<Response<pb::HealthResponse>, Status> {
        self.call(|reply| Command::Health { reply })
            .await?
            .map_err(engine_status)?;
        Ok(Response::new(pb::HealthResponse {}))
    }

    async fn service_discovery(
        &self,
        _: Request<pb::ServiceDiscoveryRequest>,
    ) -> Result<Response<pb::ServiceDiscoveryResponse>, Status> {
        Ok(Response::new(pb::ServiceDiscoveryResponse {
            urls: self.urls.clone(),
        }))
    }

    #[instrument(skip_all)]
    async fn warmup(
        &self,
        request: Request<pb::WarmupRequest>,
    ) -> Result<Response<pb::WarmupResponse>, Status> {
        let r = request.into_inner();
        let capacity = self
            .call(|reply| Command::Warmup {
                max_prefill_tokens: r.max_prefill_tokens,
                max_batch_size: r.max_batch_size,
                reply,
            })
            .await?
            .map_err(engine_status)?;
        Ok(Response::new(pb::WarmupResponse {
            num_blocks: capacity.num_blocks,
            block_size: capacity.block_size,
            max_total_tokens: capacity.num_blocks as u64 * capacity.block_size as u64,
        }))
    }

    #[instrument(skip_all)]
    async fn prefill(
        &self,
        request: Request<pb::PrefillRequest>,
    ) -> Result<Response<pb::PrefillResponse>, Status> {
        let batch = request
            .into_inner()
            .batch
            .ok_or_else(|| Status::invalid_argument("prefill without a batch"))?;
        let eos = &self.info.eos_token_ids;
        let requests = batch
            .requests
            .into_iter()
            .map(|r| convert::request(r, eos))
            .collect();
        let out = self
            .call(|reply| Command::Prefill {
                batch_id: batch.id,
                requests,
                reply,
            })
            .await?
            .map_err(engine_status)?;
        let (generations, batch, timings) = Self::step_response(out);
        Ok(Response::new(pb::PrefillResponse {
            generations,
            batch,
            timings: Some(timings),
        }))
    }

    #[instrument(skip_all)]
    async fn decode(
        &self,
        request: Request<pb::DecodeRequest>,
    ) -> Result<Response<pb::DecodeResponse>, Status> {
        let batch_ids = request.into_inner().batch_ids;
        let out = self
            .call(|reply| Command::Decode { batch_ids, reply })
            .await?
            .map_err(engine_status)?;
        let (generations, batch, timings) = Self::step_response(out);
        Ok(Response::new(pb::DecodeResponse {
            generations,
            batch,
            timings: Some(timings),
        }))
    }

    async fn filter_batch(
        &self,
        request: Request<pb::FilterBatchRequest>,
    ) -> Result<Response<pb::FilterBatchResponse>, Status> {
        let r = request.into_inner();
        let batch = self
            .call(|reply| Command::Filter {
                batch_id: r.batch_id,
                keep: r.request_ids,
                reply,
            })
            .await?
            .map_err(engine_status)?;
        Ok(Response::new(pb::FilterBatchResponse {
            batch: batch.map(convert::cached_batch),
        }))
    }

    async fn clear_cache(
        &self,
        request: Request<pb::ClearCacheRequest>,
    ) -> Result<Response<pb::ClearCacheResponse>, Status> {
        let batch_id = request.into_inner().batch_id;
        self.call(|reply| Command::Clear { batch_id, reply })
            .await?;
        Ok(Response::new(pb::ClearCacheResponse {}))
    }
}
