//! `GET /info`, `GET /health` and `GET /metrics`.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::{ApiError, ErrorBody};
use super::AppState;
use crate::config::Limits;

/// What `GET /info` reports (TGI's field names where TGI has the field).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ServerInfo {
    /// The model's name (`--model-id`, else the shard's).
    pub model_id: String,
    /// Where the shards loaded it from.
    pub model_path: String,
    pub model_sha: Option<String>,
    /// `float32`, `bfloat16` or `float16`.
    pub model_dtype: String,
    /// `cpu` or `cuda`.
    pub model_device_type: String,
    pub model_pipeline_tag: Option<String>,
    pub max_concurrent_requests: usize,
    pub max_best_of: u32,
    pub max_stop_sequences: usize,
    pub max_input_tokens: u32,
    pub max_total_tokens: u32,
    pub max_new_tokens: u32,
    pub default_max_new_tokens: u32,
    pub max_top_n_tokens: u32,
    pub payload_limit: usize,
    pub max_batch_total_tokens: u64,
    pub max_batch_prefill_tokens: u32,
    pub max_batch_size: Option<u32>,
    pub max_waiting_tokens: u32,
    pub waiting_served_ratio: f32,
    /// Tokens per KV cache block.
    pub block_size: u32,
    /// KV cache blocks per shard (of the replica with the smallest KV cache).
    pub num_blocks: u64,
    pub max_total_kv_tokens: u64,
    /// Shard ranks per replica (tensor parallel degree).
    pub world_size: u32,
    /// Replicas: independent shard groups serving the same model (data parallel
    /// degree). `max_batch_*` and the KV cache figures are per replica.
    pub replicas: usize,
    pub version: String,
    pub sha: Option<String>,
    pub router: String,
}

impl ServerInfo {
    /// Info with the limits and the crate version filled in; the caller sets
    /// what the shards report (dtype, device, KV cache, batching).
    pub fn new(
        model_id: impl Into<String>,
        limits: &Limits,
        max_concurrent_requests: usize,
    ) -> Self {
        Self {
            model_id: model_id.into(),
            model_path: String::new(),
            model_sha: None,
            model_dtype: "float32".into(),
            model_device_type: "cpu".into(),
            model_pipeline_tag: Some("text-generation".into()),
            max_concurrent_requests,
            max_best_of: limits.max_best_of,
            max_stop_sequences: limits.max_stop_sequences,
            max_input_tokens: limits.max_input_tokens,
            max_total_tokens: limits.max_total_tokens,
            max_new_tokens: limits.max_new_tokens,
            default_max_new_tokens: limits.default_max_new_tokens,
            max_top_n_tokens: limits.max_top_n_tokens,
            payload_limit: limits.payload_limit,
            max_batch_total_tokens: 0,
            max_batch_prefill_tokens: 0,
            max_batch_size: None,
            max_waiting_tokens: 0,
            waiting_served_ratio: 0.0,
            block_size: 0,
            num_blocks: 0,
            max_total_kv_tokens: 0,
            world_size: 1,
            replicas: 1,
            version: env!("CARGO_PKG_VERSION").into(),
            sha: None,
            router: "tessera-router".into(),
        }
    }
}

#[utoipa::path(
    get,
    path = "/info",
    tag = "Server",
    responses((status = 200, description = "Model and server settings", body = ServerInfo))
)]
#[tracing::instrument(skip_all)]
pub async fn info(State(state): State<AppState>) -> Json<ServerInfo> {
    Json(state.info.as_ref().clone())
}

/// 200 while at least one replica is ready: requests go only to ready replicas,
/// so the server still serves (with less capacity) while others are down, and a
/// load balancer should keep sending it traffic. 503 with every replica's
/// reason when none is; with one replica this is that group's health.
/// `tessera_shard_healthy{replica}` shows each group's own health.
#[utoipa::path(
    get,
    path = "/health",
    tag = "Server",
    responses(
        (status = 200, description = "At least one replica (shard group) is ready"),
        (status = 503, description = "No replica is ready, with the reason", body = ErrorBody),
    )
)]
#[tracing::instrument(skip_all)]
pub async fn health(State(state): State<AppState>) -> Response {
    let health = state.infer.replicas();
    if health.is_ready() {
        StatusCode::OK.into_response()
    } else {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            health.reason(),
        )
        .into_response()
    }
}

#[utoipa::path(
    get,
    path = "/metrics",
    tag = "Server",
    responses((status = 200, description = "Prometheus text exposition", body = String, content_type = "text/plain; version=0.0.4"))
)]
#[tracing::instrument(skip_all)]
pub async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_uses_tgi_field_names() {
        let info = ServerInfo::new("smol", &Limits::default(), 7);
        let json = serde_json::to_value(&info).unwrap();
        for field in [
            "model_id",
            "model_dtype",
            "model_device_type",
            "max_concurrent_requests",
            "max_best_of",
            "max_stop_sequences",
            "max_input_tokens",
            "max_total_tokens",
            "max_batch_total_tokens",
            "version",
        ] {
            assert!(json.get(field).is_some(), "{field}");
        }
        assert_eq!(json["max_concurrent_requests"], 7);
        assert_eq!(json["replicas"], 1);
        assert_eq!(json["max_total_tokens"], 4096);
    }
}
