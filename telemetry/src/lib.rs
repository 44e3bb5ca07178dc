//! Logs and traces for the Tessera router and shard processes.
//!
//! [`init`] installs one `tracing` subscriber: log lines on stderr (text, or
//! JSON with `--json-output`) filtered by `RUST_LOG`, and, when an OTLP
//! endpoint is configured, an OpenTelemetry layer that exports Tessera's spans
//! over OTLP/gRPC through a batch span processor running on the tokio runtime.
//! [`Telemetry::shutdown`] flushes what is still buffered. [`propagation`]
//! carries W3C trace context across HTTP and gRPC.

pub mod propagation;

use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry::{Key, KeyValue, Value};
use opentelemetry_otlp::{SpanExporter, WithExportConfig};
use opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing::level_filters::LevelFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

/// Targets whose spans are exported: every Tessera crate (`tessera_router`,
/// `tessera_shard`, ...) at INFO, and nothing from the libraries below them
/// (which would also trace the exporter's own gRPC calls).
const EXPORTED_TARGETS: &str = "tessera";

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("a global tracing subscriber is already installed")]
    AlreadyInstalled,
    #[error("exporting traces needs a tokio runtime: call init from inside one")]
    NoRuntime,
    #[error("cannot build the OTLP span exporter: {0}")]
    Exporter(String),
}

/// What [`init`] sets up.
#[derive(Debug, Clone)]
pub struct TelemetryConfig {
    /// `service.name` unless `OTEL_SERVICE_NAME` or `OTEL_RESOURCE_ATTRIBUTES` give one.
    pub service_name: &'static str,
    /// JSON log lines instead of text.
    pub json: bool,
    /// Log filter when `RUST_LOG` is not set (e.g. `info`).
    pub default_log_filter: &'static str,
    /// `--otlp-endpoint`: the OTLP/gRPC collector, e.g. `http://localhost:4317`.
    /// Without it, traces are exported when `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`
    /// or `OTEL_EXPORTER_OTLP_ENDPOINT` is set.
    pub otlp_endpoint: Option<String>,
    /// More resource attributes (a shard's rank).
    pub resource: Vec<(&'static str, i64)>,
}

impl TelemetryConfig {
    pub fn new(service_name: &'static str) -> Self {
        Self {
            service_name,
            json: false,
            default_log_filter: "info",
            otlp_endpoint: None,
            resource: Vec::new(),
        }
    }
}

/// Whether and where spans are exported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Export {
    /// Not exported.
    Off,
    /// To this endpoint (`--otlp-endpoint`).
    Endpoint(String),
    /// To the endpoint the `OTEL_EXPORTER_OTLP_*` variables name.
    FromEnvironment,
}

fn non_empty(value: Option<String>) -> Option<String> {
    value
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

/// Decides whether and where to export, from the flag and the variables the
/// OpenTelemetry SDKs agree on (`get` reads one variable).
pub fn export_target(flag: Option<&str>, get: impl Fn(&str) -> Option<String>) -> Export {
    let disabled = non_empty(get("OTEL_SDK_DISABLED"))
        .is_some_and(|v| v.eq_ignore_ascii_case("true"))
        || non_empty(get("OTEL_TRACES_EXPORTER")).is_some_and(|v| v.eq_ignore_ascii_case("none"));
    if disabled {
        return Export::Off;
    }
    if let Some(endpoint) = non_empty(flag.map(str::to_string)) {
        return Export::Endpoint(endpoint);
    }
    if non_empty(get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")).is_some()
        || non_empty(get("OTEL_EXPORTER_OTLP_ENDPOINT")).is_some()
    {
        return Export::FromEnvironment;
    }
    Export::Off
}

/// The installed subscriber's exporter; flush it with [`Telemetry::shutdown`].
#[derive(Debug)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Whether spans are exported.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Exports every span still buffered and stops the exporter (at most
    /// `timeout`). Runs the blocking flush on tokio's blocking pool, so it may
    /// be awaited from any task of the runtime the exporter was built in.
    pub async fn shutdown(self, timeout: Duration) {
        let Some(provider) = self.provider else {
            return;
        };
        let flush = tokio::task::spawn_blocking(move || provider.shutdown_with_timeout(timeout));
        match tokio::time::timeout(timeout + Duration::from_secs(1), flush).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::warn!("flushing traces failed: {e}"),
            Ok(Err(e)) => tracing::warn!("flushing traces failed: {e}"),
            Err(_) => tracing::warn!("flushing traces took longer than {timeout:?}"),
        }
    }
}

/// The resource of this process: the SDK's (which reads `OTEL_SERVICE_NAME`
/// and `OTEL_RESOURCE_ATTRIBUTES`), our service name when those name none,
/// and `extra`.
fn resource(config: &TelemetryConfig) -> Resource {
    let detected = Resource::builder().build();
    let named = detected
        .get(&Key::from_static_str("service.name"))
        .is_some_and(|v| !v.as_str().starts_with("unknown_service"));
    let mut builder = Resource::builder();
    if !named {
        builder = builder.with_service_name(config.service_name);
    }
    builder
        .with_attributes(
            config
                .resource
                .iter()
                .map(|&(k, v)| KeyValue::new(k, Value::I64(v))),
        )
        .build()
}

fn provider(
    config: &TelemetryConfig,
    export: &Export,
) -> Result<SdkTracerProvider, TelemetryError> {
    let mut exporter = SpanExporter::builder().with_tonic();
    if let Export::Endpoint(endpoint) = export {
        exporter = exporter.with_endpoint(endpoint.clone());
    }
    let exporter = exporter
        .build()
        .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
    // The batch processor's task runs on the current tokio runtime; its queue
    // size, batch size and delay follow the OTEL_BSP_* variables.
    let processor =
        BatchSpanProcessor::builder(exporter, opentelemetry_sdk::runtime::Tokio).build();
    Ok(SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_resource(resource(config))
        .build())
}

/// Installs the process's subscriber. When traces are exported this must run
/// inside a tokio runtime that outlives the exporter (the batch processor and
/// the gRPC channel run on it).
pub fn init(config: &TelemetryConfig) -> Result<Telemetry, TelemetryError> {
    let export = export_target(config.otlp_endpoint.as_deref(), |k| std::env::var(k).ok());
    let provider = match export {
        Export::Off => None,
        _ => {
            if tokio::runtime::Handle::try_current().is_err() {
                return Err(TelemetryError::NoRuntime);
            }
            Some(provider(config, &export)?)
        }
    };
    let logs = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(config.default_log_filter));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt: Box<dyn Layer<Registry> + Send + Sync> = if config.json {
        fmt.json().with_filter(logs).boxed()
    } else {
        fmt.with_filter(logs).boxed()
    };
    let otel = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer(config.service_name))
            .with_filter(
                tracing_subscriber::filter::Targets::new()
                    .with_target(EXPORTED_TARGETS, LevelFilter::INFO),
            )
    });
    tracing_subscriber::registry()
        .with(fmt)
        .with(otel)
        .try_init()
        .map_err(|_| TelemetryError::AlreadyInstalled)?;
    if let Export::Endpoint(endpoint) = &export {
        tracing::info!("exporting traces over OTLP/gRPC to {endpoint}");
    } else if export == Export::FromEnvironment {
        tracing::info!("exporting traces over OTLP/gRPC (endpoint from OTEL_EXPORTER_OTLP_*)");
    }
    Ok(Telemetry { provider })
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| vars.get(k).cloned()
    }

    #[test]
    fn the_flag_or_the_standard_variables_turn_export_on() {
        assert_eq!(export_target(None, env(&[])), Export::Off);
        assert_eq!(
            export_target(Some("http://c:4317"), env(&[])),
            Export::Endpoint("http://c:4317".into())
        );
        assert_eq!(export_target(Some("  "), env(&[])), Export::Off);
        assert_eq!(
            export_target(
                None,
                env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317")])
            ),
            Export::FromEnvironment
        );
        assert_eq!(
            export_target(
                None,
                env(&[("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://c:4317")])
            ),
            Export::FromEnvironment
        );
        assert_eq!(
            export_target(
                Some("http://c:4317"),
                env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://other:4317")])
            ),
            Export::Endpoint("http://c:4317".into())
        );
    }

    #[test]
    fn the_sdk_switches_turn_export_off() {
        for vars in [
            [("OTEL_SDK_DISABLED", "true")],
            [("OTEL_TRACES_EXPORTER", "none")],
        ] {
            assert_eq!(
                export_target(Some("http://c:4317"), env(&vars)),
                Export::Off,
                "{vars:?}"
            );
        }
        assert_eq!(
            export_target(
                Some("http://c:4317"),
                env(&[("OTEL_SDK_DISABLED", "false")])
            ),
            Export::Endpoint("http://c:4317".into())
        );
    }

    /// With an OpenTelemetry layer (no exporter needed), a span given a remote
    /// parent joins that trace, and its children inject their own span ids.
    #[test]
    fn spans_continue_a_remote_parent_and_inject_their_own_ids() {
        use opentelemetry::trace::TraceContextExt;

        let provider = SdkTracerProvider::builder().build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        tracing::subscriber::with_default(subscriber, || {
            let parent = propagation::from_traceparent(
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            );
            let root = tracing::info_span!("http_request");
            propagation::set_remote_parent(&root, parent);
            let root_cx = propagation::context_of(&root);
            assert_eq!(
                propagation::trace_id(&root_cx).as_deref(),
                Some("4bf92f3577b34da6a3ce929d0e0e4736")
            );
            let root_id = root_cx.span().span_context().span_id();
            assert_ne!(root_id.to_string(), "00f067aa0ba902b7");

            let child = tracing::info_span!(parent: &root, "shard_rpc");
            let mut metadata = tonic::metadata::MetadataMap::new();
            propagation::inject_grpc(&propagation::context_of(&child), &mut metadata);
            let sent = propagation::span_context(&propagation::extract_grpc(&metadata)).unwrap();
            assert_eq!(
                sent.trace_id().to_string(),
                "4bf92f3577b34da6a3ce929d0e0e4736"
            );
            let child_id = propagation::context_of(&child)
                .span()
                .span_context()
                .span_id();
            assert_eq!(sent.span_id(), child_id);
            assert_ne!(child_id, root_id);

            // A span without a remote parent starts its own trace.
            let other = tracing::info_span!(parent: None, "other");
            let other_trace = propagation::trace_id(&propagation::context_of(&other)).unwrap();
            assert_ne!(other_trace, "4bf92f3577b34da6a3ce929d0e0e4736");
        });
    }
}
