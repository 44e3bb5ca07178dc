//! The root span of every HTTP request (`http_request`), continuing the
//! client's W3C `traceparent` when it sends one.

use axum::extract::Request;
use axum::middleware::Next;
use axum::response::Response;
use tessera_telemetry::propagation;
use tracing::field::Empty;
use tracing::{info_span, Instrument};

/// Probes that load balancers and Prometheus call every few seconds: not traced.
fn is_probe(path: &str) -> bool {
    matches!(path, "/health" | "/metrics")
}

/// Runs the rest of the stack (API key check, handler) inside `http_request`.
/// The span's parent is the remote span of the request's `traceparent` header;
/// its `trace_id` field (which JSON log lines show among their spans) is the
/// exported trace's id, or the client's when traces are not exported.
pub async fn trace_request(request: Request, next: Next) -> Response {
    if is_probe(request.uri().path()) {
        return next.run(request).await;
    }
    let parent = propagation::extract_http(request.headers());
    let span = info_span!(
        "http_request",
        otel.kind = "server",
        http.request.method = %request.method(),
        url.path = %request.uri().path(),
        http.response.status_code = Empty,
        otel.status_code = Empty,
        trace_id = Empty,
    );
    let remote_trace = propagation::trace_id(&parent);
    propagation::set_remote_parent(&span, parent);
    if let Some(id) = propagation::trace_id(&propagation::context_of(&span)).or(remote_trace) {
        span.record("trace_id", id);
    }
    let response = next.run(request).instrument(span.clone()).await;
    let status = response.status();
    span.record("http.response.status_code", status.as_u16());
    if status.is_server_error() {
        span.record("otel.status_code", "ERROR");
    }
    // Inside the span: with RUST_LOG=tessera_router::http=debug, one line per
    // request that carries its trace id.
    span.in_scope(|| tracing::debug!(status = status.as_u16(), "request answered"));
    response
}
