//! The gRPC service: each handler turns its message into a command for the
//! engine thread and awaits the reply.

use tessera_proto as pb;
use tessera_proto::text_generation_service_server::TextGenerationService;
use tessera_telemetry::propagation;
use tokio::sync::{mpsc, oneshot};
use tonic::{Request, Response, Status};
use tracing::{info_span, Instrument, Span};

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

/// A handler's span, continuing the router's `shard_rpc` span named in the
/// call's `traceparent` metadata.
fn handler_span<T>(span: Span, request: &Request<T>) -> Span {
    propagation::set_remote_parent(&span, propagation::extract_grpc(request.metadata()));
    span
}

/// One span per traced request of a step (`request_prefill` or
/// `request_decode`, made by `make`), each in that request's own trace (its
/// parent is the router's `infer` span of the request) and linked to this
/// rank's handler span `step`. They end when dropped, after the step.
fn request_spans(
    traces: &[pb::RequestTrace],
    step: &Span,
    make: impl Fn(u64) -> Span,
) -> Vec<Span> {
    if traces.is_empty() {
        return Vec::new();
    }
    let step = propagation::context_of(step);
    traces
        .iter()
        .map(|t| {
            let span = make(t.request_id);
            propagation::set_remote_parent(&span, propagation::from_traceparent(&t.traceparent));
            propagation::link(&span, &step);
            span
        })
        .collect()
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

    async fn warmup(
        &self,
        request: Request<pb::WarmupRequest>,
    ) -> Result<Response<pb::WarmupResponse>, Status> {
        let rank = self.info.rank;
        let span = handler_span(
            info_span!("shard_warmup", otel.kind = "server", rank),
            &request,
        );
        let r = request.into_inner();
        let step = span.clone();
        let capacity = self
            .call(|reply| Command::Warmup {
                max_prefill_tokens: r.max_prefill_tokens,
                max_batch_size: r.max_batch_size,
                span: step,
                reply,
            })
            .instrument(span)
            .await?
            .map_err(engine_status)?;
        Ok(Response::new(pb::WarmupResponse {
            num_blocks: capacity.num_blocks,
            block_size: capacity.block_size,
            max_total_tokens: capacity.num_blocks as u64 * capacity.block_size as u64,
        }))
    }

    async fn prefill(
        &self,
        request: Request<pb::PrefillRequest>,
    ) -> Result<Response<pb::PrefillResponse>, Status> {
        let rank = self.info.rank;
        let span = handler_span(
            info_span!(
                "shard_prefill",
                otel.kind = "server",
                rank,
                batch_id = tracing::field::Empty,
                size = tracing::field::Empty,
                running_batches = tracing::field::Empty
            ),
            &request,
        );
        let message = request.into_inner();
        let batch = message
            .batch
            .ok_or_else(|| Status::invalid_argument("prefill without a batch"))?;
        let batch_id = batch.id;
        span.record("batch_id", batch_id)
            .record("size", batch.requests.len())
            .record("running_batches", message.decode_batch_ids.len());
        let _requests = request_spans(
            &message.traces,
            &span,
            |request_id| info_span!(parent: None, "request_prefill", rank, request_id, batch_id),
        );
        let eos = &self.info.eos_token_ids;
        let requests = batch
            .requests
            .into_iter()
            .map(|r| convert::request(r, eos))
            .collect();
        let step = span.clone();
        let out = self
            .call(|reply| Command::Prefill {
                batch_id,
                requests,
                decode_batch_ids: message.decode_batch_ids,
                prefill_follows: message.prefill_follows,
                span: step,
                reply,
            })
            .instrument(span)
            .await?
            .map_err(engine_status)?;
        let (generations, batch, timings) = Self::step_response(out);
        Ok(Response::new(pb::PrefillResponse {
            generations,
            batch,
            timings: Some(timings),
        }))
    }

    async fn decode(
        &self,
        request: Request<pb::DecodeRequest>,
    ) -> Result<Response<pb::DecodeResponse>, Status> {
        let rank = self.info.rank;
        let span = handler_span(
            info_span!(
                "shard_decode",
                otel.kind = "server",
                rank,
                batches = tracing::field::Empty
            ),
            &request,
        );
        let message = request.into_inner();
        span.record("batches", message.batch_ids.len());
        let _requests = request_spans(
            &message.traces,
            &span,
            |request_id| info_span!(parent: None, "request_decode", rank, request_id),
        );
        let step = span.clone();
        let out = self
            .call(|reply| Command::Decode {
                batch_ids: message.batch_ids,
                prefill_follows: message.prefill_follows,
                span: step,
                reply,
            })
            .instrument(span)
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
