//! Traces end to end: `tessera serve --num-shard 2 --otlp-endpoint URL` exports
//! the spans of one request from the router and from both shard ranks to an
//! OTLP/gRPC collector run by this test, all in the trace that the client's
//! `traceparent` named, with every parent present; the spans are flushed when
//! the server stops (the exporter's timer is set past the test's end); and the
//! JSON log lines carry the trace id.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{bin, free_port, unique_tmp, Http, Proc};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use serde_json::{json, Value};

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT: &str = "00f067aa0ba902b7";

/// One exported span, flattened with its resource.
#[derive(Debug, Clone)]
struct Span {
    service: String,
    /// The `tessera.rank` resource attribute (shards only).
    rank: Option<i64>,
    world_size: Option<i64>,
    trace_id: String,
    span_id: String,
    /// Empty for a root span.
    parent: String,
    name: String,
    attributes: HashMap<String, String>,
    /// (trace id, span id) of each link.
    links: Vec<(String, String)>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn text(value: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    match value.as_ref().and_then(|v| v.value.as_ref()) {
        Some(AnyValue::StringValue(s)) => s.clone(),
        Some(AnyValue::IntValue(i)) => i.to_string(),
        Some(AnyValue::BoolValue(b)) => b.to_string(),
        Some(AnyValue::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    }
}

fn attributes(kvs: &[KeyValue]) -> HashMap<String, String> {
    kvs.iter()
        .map(|kv| (kv.key.clone(), text(&kv.value)))
        .collect()
}

/// An OTLP/gRPC trace collector that keeps every span it is sent.
#[derive(Clone, Default)]
struct Sink {
    spans: Arc<Mutex<Vec<Span>>>,
}

#[tonic::async_trait]
impl TraceService for Sink {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for resource_spans in request.into_inner().resource_spans {
            let resource = attributes(
                &resource_spans
                    .resource
                    .map(|r| r.attributes)
                    .unwrap_or_default(),
            );
            let int = |key: &str| resource.get(key).and_then(|v| v.parse().ok());
            for scope in resource_spans.scope_spans {
                for span in scope.spans {
                    spans.push(Span {
                        service: resource.get("service.name").cloned().unwrap_or_default(),
                        rank: int("tessera.rank"),
                        world_size: int("tessera.world_size"),
                        trace_id: hex(&span.trace_id),
                        span_id: hex(&span.span_id),
                        parent: hex(&span.parent_span_id),
                        name: span.name,
                        attributes: attributes(&span.attributes),
                        links: span
                            .links
                            .iter()
                            .map(|l| (hex(&l.trace_id), hex(&l.span_id)))
                            .collect(),
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// The collector on a loopback port, served by its own runtime.
struct Collector {
    sink: Sink,
    addr: SocketAddr,
    _runtime: tokio::runtime::Runtime,
}

impl Collector {
    fn start() -> Collector {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let sink = Sink::default();
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let service = TraceServiceServer::new(sink.clone());
        runtime.spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        Collector {
            sink,
            addr,
            _runtime: runtime,
        }
    }

    fn spans(&self) -> Vec<Span> {
        self.sink.spans.lock().unwrap().clone()
    }
}

/// `tessera serve` with the tiny Llama over 2 ranks, exporting to `endpoint`,
/// with JSON logs that include the router's per-request debug line. The
/// exporters' timer is 10 minutes: spans reach the collector only when the
/// processes flush them at exit.
fn start_server(endpoint: &str, port: u16) -> Proc {
    let model = common::repo_root().join("fixtures/reference/tiny-llama");
    let mut args: Vec<String> = [
        "-u",
        "OTEL_SERVICE_NAME",
        "-u",
        "OTEL_RESOURCE_ATTRIBUTES",
        "-u",
        "OTEL_SDK_DISABLED",
        "-u",
        "OTEL_TRACES_EXPORTER",
        "-u",
        "OTEL_TRACES_SAMPLER",
        "-u",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_BSP_SCHEDULE_DELAY=600000",
        "RUST_LOG=info,tessera_router::http=debug",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.push(bin("tessera").display().to_string());
    args.extend(
        [
            "serve",
            "--hostname",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--shard-uds-path",
            &unique_tmp("shard").display().to_string(),
            "--model",
            &model.display().to_string(),
            "--dtype",
            "float32",
            "--num-shard",
            "2",
            "--json-output",
            "--otlp-endpoint",
            endpoint,
        ]
        .iter()
        .map(|s| s.to_string()),
    );
    Proc::start("tessera-serve", Path::new("/usr/bin/env"), &args)
}

fn wait_healthy(proc: &mut Proc, http: &Http) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(r) = http.client.get(http.url("/health")).send() {
            if r.status().as_u16() == 200 {
                return;
            }
        }
        assert!(
            proc.running(),
            "tessera serve exited before it was healthy\n{}",
            proc.log_tail()
        );
        assert!(
            Instant::now() < deadline,
            "tessera serve not healthy after 120 s\n{}",
            proc.log_tail()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn names(spans: &[&Span]) -> BTreeSet<String> {
    spans.iter().map(|s| s.name.clone()).collect()
}

#[test]
fn one_request_is_one_trace_from_the_router_through_every_rank() {
    let collector = Collector::start();
    let endpoint = format!("http://{}", collector.addr);
    let port = free_port();
    let mut server = start_server(&endpoint, port);
    let http = Http::new(port).with_timeout(Duration::from_secs(60));
    wait_healthy(&mut server, &http);

    let response = http
        .client
        .post(http.url("/generate"))
        .header("traceparent", format!("00-{TRACE}-{PARENT}-01"))
        .json(&json!({"inputs": "hello world", "parameters": {
            "max_new_tokens": 4, "ignore_eos": true, "do_sample": false}}))
        .send()
        .unwrap();
    let status = response.status().as_u16();
    let body = response.text().unwrap();
    assert_eq!(status, 200, "{body}");

    // A graceful stop: the router drains, then every process flushes its spans.
    server.signal(libc::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(60);
    while server.running() {
        assert!(
            Instant::now() < deadline,
            "tessera serve did not stop within 60 s of SIGTERM\n{}",
            server.log_tail()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = std::fs::read_to_string(&server.log).unwrap();

    let all = collector.spans();
    let trace: Vec<&Span> = all.iter().filter(|s| s.trace_id == TRACE).collect();
    let context = || {
        let mut lines: Vec<String> = trace
            .iter()
            .map(|s| {
                format!(
                    "{} rank {:?}: {} {} <- {}",
                    s.service, s.rank, s.name, s.span_id, s.parent
                )
            })
            .collect();
        lines.sort();
        format!(
            "{} spans in all, {} in the trace:\n{}\n{}",
            all.len(),
            trace.len(),
            lines.join("\n"),
            server.log_tail()
        )
    };

    // The router's spans, rooted at the client's span.
    let router: Vec<&Span> = trace
        .iter()
        .copied()
        .filter(|s| s.service == "tessera-router")
        .collect();
    let roots: Vec<&&Span> = router.iter().filter(|s| s.name == "http_request").collect();
    assert_eq!(roots.len(), 1, "one http_request span\n{}", context());
    let root = roots[0];
    assert_eq!(root.parent, PARENT, "{}", context());
    assert_eq!(
        root.attributes.get("url.path").map(String::as_str),
        Some("/generate")
    );
    assert_eq!(
        root.attributes
            .get("http.response.status_code")
            .map(String::as_str),
        Some("200")
    );
    for name in [
        "http_request",
        "generate",
        "validation",
        "tokenize",
        "infer",
        "queue",
        "prefill",
        "decode",
        "shard_rpc",
    ] {
        assert!(
            names(&router).contains(name),
            "router span {name} missing\n{}",
            context()
        );
    }
    // No span of this request went to another trace.
    let http_spans = all.iter().filter(|s| s.name == "http_request").count();
    assert_eq!(http_spans, 1, "{}", context());
    let infer = router
        .iter()
        .find(|s| s.name == "infer")
        .expect("an infer span");

    // Every rank: the handler and engine spans of each step under the router's
    // per-rank call, and one span per request and step in the request's trace.
    let ids: HashMap<&str, &Span> = trace.iter().map(|s| (s.span_id.as_str(), *s)).collect();
    for rank in 0..2i64 {
        let shard: Vec<&Span> = trace
            .iter()
            .copied()
            .filter(|s| s.service == "tessera-shard" && s.rank == Some(rank))
            .collect();
        assert!(
            shard.iter().all(|s| s.world_size == Some(2)),
            "{}",
            context()
        );
        for name in [
            "shard_prefill",
            "worker_prefill",
            "shard_decode",
            "worker_decode",
            "request_prefill",
            "request_decode",
        ] {
            assert!(
                names(&shard).contains(name),
                "rank {rank}: span {name} missing\n{}",
                context()
            );
        }
        for handler in shard
            .iter()
            .filter(|s| s.name == "shard_prefill" || s.name == "shard_decode")
        {
            let caller = ids
                .get(handler.parent.as_str())
                .unwrap_or_else(|| panic!("{} has no parent\n{}", handler.name, context()));
            assert_eq!(caller.name, "shard_rpc", "{}", context());
            assert_eq!(caller.service, "tessera-router");
            assert_eq!(
                caller.attributes.get("rank"),
                Some(&rank.to_string()),
                "rank {rank}'s handler under another rank's call\n{}",
                context()
            );
        }
        // 4 tokens: 1 from the prefill, 3 from decode steps.
        let per_request: Vec<&&Span> = shard
            .iter()
            .filter(|s| s.name.starts_with("request_"))
            .collect();
        assert_eq!(
            per_request
                .iter()
                .filter(|s| s.name == "request_decode")
                .count(),
            3,
            "rank {rank}\n{}",
            context()
        );
        for span in per_request {
            assert_eq!(span.parent, infer.span_id, "{}", context());
            let handler = span
                .links
                .first()
                .and_then(|(_, id)| ids.get(id.as_str()))
                .unwrap_or_else(|| panic!("{} links to no handler\n{}", span.name, context()));
            assert_eq!(handler.rank, Some(rank));
            assert_eq!(
                handler.name,
                span.name.replace("request_", "shard_"),
                "{}",
                context()
            );
        }
    }

    // One tree: every span but the root has its parent among the collected spans.
    for span in &trace {
        if span.span_id != root.span_id {
            assert!(
                ids.contains_key(span.parent.as_str()),
                "{} ({}, rank {:?}) has a parent that was not exported\n{}",
                span.name,
                span.service,
                span.rank,
                context()
            );
        }
    }

    // JSON logs: the router's and the shards' lines are JSON, and the request's
    // line carries the trace id.
    let json_lines: Vec<Value> = log
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let message = |v: &Value| v["fields"]["message"].as_str().unwrap_or("").to_string();
    assert!(
        json_lines
            .iter()
            .any(|v| message(v).starts_with("shard rank 1 serving on")),
        "no JSON line from shard rank 1\n{log}"
    );
    let answered: Vec<&Value> = json_lines
        .iter()
        .filter(|v| message(v) == "request answered")
        .collect();
    assert_eq!(answered.len(), 1, "{log}");
    assert_eq!(answered[0]["span"]["trace_id"], TRACE, "{}", answered[0]);
}
