//! The router's HTTP API: TGI's routes (`/generate`, `/generate_stream`, `/`,
//! `/tokenize`), OpenAI's (`/v1/chat/completions`, `/v1/completions`,
//! `/v1/models`), probes (`/health`, `/metrics`, `/info`) and the OpenAPI
//! document (`/api-doc/openapi.json`, `/docs`).

mod auth;
pub mod docs;
pub mod error;
mod extract;
mod generation;
pub mod info;
pub mod openai;
mod request_metrics;
pub mod sse;
pub mod stop;
pub mod tgi;
mod trace;

use std::future::Future;
use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::Router;

use crate::infer::Infer;
use crate::metrics::Metrics;
use crate::validation::Validation;

pub use error::{ApiError, ErrorBody};
pub use info::ServerInfo;

/// Everything the handlers share; cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub infer: Infer,
    pub validation: Validation,
    pub metrics: Metrics,
    pub info: Arc<ServerInfo>,
    /// When set, every route but `/health` and `/metrics` needs
    /// `Authorization: Bearer <key>`.
    pub api_key: Option<String>,
}

/// The application: every route, the body size limit (413 as JSON) and the
/// API key check.
pub fn app(state: AppState) -> Router {
    let payload_limit = state.validation.limits().payload_limit;
    Router::new()
        .route("/", post(tgi::compat_generate))
        .route("/generate", post(tgi::generate))
        .route("/generate_stream", post(tgi::generate_stream))
        .route("/tokenize", post(tgi::tokenize))
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/completions", post(openai::completions))
        .route("/v1/models", get(openai::models))
        // `{*model}`: ids such as `org/name` span two segments.
        .route("/v1/models/{*model}", get(openai::model))
        .route("/info", get(info::info))
        .route("/health", get(info::health))
        .route("/metrics", get(info::metrics))
        .route("/docs", get(docs::docs_page))
        .route("/api-doc/openapi.json", get(docs::openapi_json))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(payload_limit))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::require_api_key,
        ))
        // Outermost: refused requests are traced too.
        .layer(axum::middleware::from_fn(trace::trace_request))
        .with_state(state)
}

async fn not_found(uri: axum::http::Uri) -> impl IntoResponse {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no route {}: see /docs", uri.path()),
    )
}

/// Serves `app` on `listener` until `shutdown` resolves, then lets the
/// requests in flight finish.
pub async fn serve(
    app: Router,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!("listening on http://{addr}");
    }
    // Tokens are small writes: without TCP_NODELAY, Nagle's algorithm holds
    // every other one back until the client acknowledges the previous.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}
