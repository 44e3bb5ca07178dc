//! W3C trace context (`traceparent`, `tracestate`) in and out of HTTP headers,
//! gRPC metadata and plain strings, and the span helpers that attach a remote
//! parent or read a span's context.
//!
//! Every function here is safe to call whether or not traces are exported:
//! without the OpenTelemetry layer a span has no valid context, and nothing is
//! injected or recorded.

use std::collections::HashMap;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{SpanContext, TraceContextExt};
use opentelemetry::Context;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The header and metadata key of the W3C parent.
pub const TRACEPARENT: &str = "traceparent";

/// Whether `value` has the W3C `traceparent` shape: 2, 32, 16 and 2 lowercase
/// hex digits (the SDK's parser also takes shorter ids, which the spec says to
/// ignore).
fn well_formed(value: &str) -> bool {
    let hex = |s: &str, len: usize| {
        s.len() == len
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let mut parts = value.trim().split('-');
    matches!(
        (parts.next(), parts.next(), parts.next(), parts.next()),
        (Some(v), Some(t), Some(s), Some(f)) if hex(v, 2) && hex(t, 32) && hex(s, 16) && hex(f, 2)
    )
}

/// A carrier's value for `key`, with a malformed `traceparent` left out.
fn checked<'a>(key: &str, value: Option<&'a str>) -> Option<&'a str> {
    value.filter(|v| !key.eq_ignore_ascii_case(TRACEPARENT) || well_formed(v))
}

struct HeaderCarrier<'a>(&'a http::HeaderMap);

impl Extractor for HeaderCarrier<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        checked(key, self.0.get(key).and_then(|v| v.to_str().ok()))
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

struct MetadataReader<'a>(&'a tonic::metadata::MetadataMap);

impl Extractor for MetadataReader<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        checked(key, self.0.get(key).and_then(|v| v.to_str().ok()))
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|k| match k {
                tonic::metadata::KeyRef::Ascii(k) => Some(k.as_str()),
                tonic::metadata::KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

struct MetadataWriter<'a>(&'a mut tonic::metadata::MetadataMap);

impl Injector for MetadataWriter<'_> {
    fn set(&mut self, key: &str, value: String) {
        // The propagator writes only its own lowercase keys; a value that is
        // not valid metadata is left out rather than sent broken.
        if let (Ok(key), Ok(value)) = (
            tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
            tonic::metadata::MetadataValue::try_from(value.as_str()),
        ) {
            self.0.insert(key, value);
        }
    }
}

/// The remote parent an HTTP request names in its `traceparent` (and
/// `tracestate`) headers; an empty context when there is none or it is malformed.
pub fn extract_http(headers: &http::HeaderMap) -> Context {
    TraceContextPropagator::new().extract(&HeaderCarrier(headers))
}

/// The parent a gRPC call carries in its metadata.
pub fn extract_grpc(metadata: &tonic::metadata::MetadataMap) -> Context {
    TraceContextPropagator::new().extract(&MetadataReader(metadata))
}

/// Writes `cx`'s span as the parent of a gRPC call (nothing when `cx` has no
/// valid span, e.g. traces are not exported).
pub fn inject_grpc(cx: &Context, metadata: &mut tonic::metadata::MetadataMap) {
    TraceContextPropagator::new().inject_context(cx, &mut MetadataWriter(metadata));
}

/// `cx`'s span as a `traceparent` value, for carrying it in a message body;
/// `None` when `cx` has no valid span.
pub fn traceparent(cx: &Context) -> Option<String> {
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(cx, &mut carrier);
    carrier.remove(TRACEPARENT)
}

/// The context a `traceparent` value names; empty when it is malformed.
pub fn from_traceparent(value: &str) -> Context {
    if !well_formed(value) {
        return Context::new();
    }
    let carrier = HashMap::from([(TRACEPARENT.to_string(), value.to_string())]);
    TraceContextPropagator::new().extract(&carrier)
}

/// The span `cx` carries, when it is valid.
pub fn span_context(cx: &Context) -> Option<SpanContext> {
    let span = cx.span();
    let sc = span.span_context();
    sc.is_valid().then(|| sc.clone())
}

/// The trace id of `cx`'s span, in lowercase hex, when it is valid.
pub fn trace_id(cx: &Context) -> Option<String> {
    span_context(cx).map(|sc| sc.trace_id().to_string())
}

/// Makes the remote span in `parent` the parent of `span`. Call it right after
/// creating `span`, before it is entered or has children; it does nothing when
/// `parent` is empty or traces are not exported.
pub fn set_remote_parent(span: &Span, parent: Context) {
    if span_context(&parent).is_some() {
        // Errors only say that there is no OpenTelemetry layer or that the span
        // is disabled: then there is no trace to attach to.
        let _ = span.set_parent(parent);
    }
}

/// The OpenTelemetry context of `span` (empty when traces are not exported).
pub fn context_of(span: &Span) -> Context {
    span.context()
}

/// Adds a span link from `span` to the span in `cx`, when there is one.
pub fn link(span: &Span, cx: &Context) {
    if let Some(sc) = span_context(cx) {
        span.add_link(sc);
    }
}

#[cfg(test)]
mod tests {
    use opentelemetry::trace::{SpanId, TraceFlags, TraceId, TraceState};

    use super::*;

    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const PARENT: &str = "00f067aa0ba902b7";

    fn header(value: &str) -> http::HeaderMap {
        let mut headers = http::HeaderMap::new();
        headers.insert(TRACEPARENT, value.parse().unwrap());
        headers
    }

    fn remote(trace: &str, span: &str, sampled: bool) -> Context {
        let flags = if sampled {
            TraceFlags::SAMPLED
        } else {
            TraceFlags::default()
        };
        Context::new().with_remote_span_context(SpanContext::new(
            TraceId::from_hex(trace).unwrap(),
            SpanId::from_hex(span).unwrap(),
            flags,
            true,
            TraceState::default(),
        ))
    }

    #[test]
    fn an_http_traceparent_is_read_with_its_ids_and_flags() {
        let cx = extract_http(&header(&format!("00-{TRACE}-{PARENT}-01")));
        let sc = span_context(&cx).expect("a valid remote parent");
        assert_eq!(sc.trace_id().to_string(), TRACE);
        assert_eq!(sc.span_id().to_string(), PARENT);
        assert!(sc.is_sampled());
        assert!(sc.is_remote());
        assert_eq!(trace_id(&cx).as_deref(), Some(TRACE));

        let unsampled = extract_http(&header(&format!("00-{TRACE}-{PARENT}-00")));
        assert!(!span_context(&unsampled).unwrap().is_sampled());
    }

    #[test]
    fn missing_or_malformed_traceparents_give_no_parent() {
        assert!(span_context(&extract_http(&http::HeaderMap::new())).is_none());
        for bad in [
            "",
            "garbage",
            // All-zero ids are invalid by the W3C spec.
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            // Wrong lengths and version ff.
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            // Uppercase hex.
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
        ] {
            assert!(
                span_context(&extract_http(&header(bad))).is_none(),
                "{bad:?} was accepted"
            );
            assert!(span_context(&from_traceparent(bad)).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn grpc_metadata_carries_the_context_there_and_back() {
        let cx = remote(TRACE, PARENT, true);
        let mut metadata = tonic::metadata::MetadataMap::new();
        inject_grpc(&cx, &mut metadata);
        assert_eq!(
            metadata.get(TRACEPARENT).and_then(|v| v.to_str().ok()),
            Some(format!("00-{TRACE}-{PARENT}-01").as_str())
        );
        let back = span_context(&extract_grpc(&metadata)).unwrap();
        assert_eq!(back.trace_id().to_string(), TRACE);
        assert_eq!(back.span_id().to_string(), PARENT);
        assert!(back.is_sampled());
    }

    #[test]
    fn an_empty_context_injects_nothing() {
        let mut metadata = tonic::metadata::MetadataMap::new();
        inject_grpc(&Context::new(), &mut metadata);
        assert!(metadata.is_empty());
        assert_eq!(traceparent(&Context::new()), None);
    }

    #[test]
    fn a_traceparent_string_round_trips() {
        let value = traceparent(&remote(TRACE, PARENT, false)).unwrap();
        assert_eq!(value, format!("00-{TRACE}-{PARENT}-00"));
        let sc = span_context(&from_traceparent(&value)).unwrap();
        assert_eq!(sc.span_id().to_string(), PARENT);
        assert!(!sc.is_sampled());
    }

    #[test]
    fn span_helpers_do_nothing_without_an_exporter() {
        // No OpenTelemetry layer in this test process: spans have no context,
        // and attaching a parent or a link is a no-op rather than an error.
        let span = tracing::info_span!("test");
        set_remote_parent(&span, remote(TRACE, PARENT, true));
        link(&span, &remote(TRACE, PARENT, true));
        assert!(span_context(&context_of(&span)).is_none());
    }
}
