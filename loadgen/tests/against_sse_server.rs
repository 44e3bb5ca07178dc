//! Runs the load generator, unmocked, against a tiny in-process HTTP server
//! that streams like `/v1/completions` and `/generate_stream`.

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::serve::ListenerExt;
use axum::{Json, Router};
use serde_json::{json, Value};
use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tessera_loadgen::{run, ApiKind, PhaseReport, RunConfig};

#[derive(Clone, Default)]
struct Seen {
    bodies: Arc<Mutex<Vec<Value>>>,
    count: Arc<AtomicUsize>,
}

impl Seen {
    fn record(&self, body: &Value) -> usize {
        if let Ok(mut bodies) = self.bodies.lock() {
            bodies.push(body.clone());
        }
        self.count.fetch_add(1, Ordering::SeqCst)
    }

    fn bodies(&self) -> Vec<Value> {
        self.bodies.lock().map(|b| b.clone()).unwrap_or_default()
    }
}

/// Streams `events`, each split in two chunks, a couple of milliseconds apart.
fn sse(events: Vec<String>) -> Response {
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
    tokio::spawn(async move {
        for event in events {
            tokio::time::sleep(Duration::from_millis(2)).await;
            let (head, tail) = event.split_at(event.len() / 2);
            for part in [head, tail] {
                if tx.send(Bytes::from(part.to_owned())).await.is_err() {
                    return;
                }
            }
        }
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|bytes| (Ok::<_, Infallible>(bytes), rx))
    });
    (
        [(header::CONTENT_TYPE, "text/event-stream")],
        Body::from_stream(stream),
    )
        .into_response()
}

fn openai_events(tokens: u64) -> Vec<String> {
    let mut events: Vec<String> = (0..tokens)
        .map(|i| {
            let chunk = json!({"id": "c", "object": "text_completion",
                "choices": [{"index": 0, "text": format!(" w{i}"), "finish_reason": null}], "usage": null});
            format!("data: {chunk}\n\n")
        })
        .collect();
    let usage = json!({"id": "c", "choices": [], "usage": {"prompt_tokens": 8, "completion_tokens": tokens, "total_tokens": tokens + 8}});
    events.push(format!(": keep-alive\n\ndata: {usage}\n\n"));
    events.push("data: [DONE]\n\n".into());
    events
}

async fn completions(State(seen): State<Seen>, Json(body): Json<Value>) -> Response {
    seen.record(&body);
    sse(openai_events(body["max_tokens"].as_u64().unwrap_or(1)))
}

async fn generate_stream(State(seen): State<Seen>, Json(body): Json<Value>) -> Response {
    seen.record(&body);
    let tokens = body["parameters"]["max_new_tokens"].as_u64().unwrap_or(1);
    let events = (0..tokens)
        .map(|i| {
            let last = i + 1 == tokens;
            let event = json!({"index": i, "token": {"id": i, "text": "x", "logprob": -0.5, "special": false},
                "generated_text": if last { json!("xx") } else { Value::Null },
                "details": if last { json!({"finish_reason": "length", "generated_tokens": tokens}) } else { Value::Null }});
            format!("data:{event}\r\n\r\n")
        })
        .collect();
    sse(events)
}

/// Request 0, 3, … succeed; 1, 4, … get a 503; 2, 5, … fail mid-stream.
async fn flaky(State(seen): State<Seen>, Json(body): Json<Value>) -> Response {
    match seen.record(&body) % 3 {
        0 => sse(openai_events(3)),
        1 => (StatusCode::SERVICE_UNAVAILABLE, "overloaded").into_response(),
        _ => {
            let mut events = openai_events(1);
            events.truncate(1);
            events.push("data: {\"error\":\"boom\",\"error_type\":\"generation\"}\n\n".into());
            sse(events)
        }
    }
}

async fn serve(router: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await;
    let listener = match listener {
        Ok(listener) => listener,
        Err(e) => panic!("bind: {e}"),
    };
    let addr = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    // Without TCP_NODELAY, Nagle's algorithm and delayed ACKs deliver tokens
    // in pairs, and half the inter-token gaps read as zero.
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    tokio::spawn(async move { axum::serve(listener, router).await });
    format!("http://{addr}")
}

async fn server(seen: &Seen) -> String {
    serve(
        Router::new()
            .route("/v1/completions", post(completions))
            .route("/generate_stream", post(generate_stream))
            .with_state(seen.clone()),
    )
    .await
}

fn config(url: String, api: ApiKind) -> RunConfig {
    RunConfig {
        url,
        api,
        api_key: None,
        model: None,
        concurrency: vec![1, 4],
        rates: Vec::new(),
        requests: Some(6),
        duration: None,
        warmup: 2,
        prompt_lens: vec![8, 16],
        shared_prefix: 0,
        max_tokens: 5,
        seed: 1,
        timeout: Duration::from_secs(10),
    }
}

fn assert_healthy(phase: &PhaseReport, requests: usize, tokens: u64) {
    assert_eq!(phase.requests_ok, requests, "{phase:?}");
    assert_eq!(phase.requests_failed, 0);
    assert_eq!(phase.output_tokens, requests as u64 * tokens);
    assert_eq!(phase.ttft_ms.count, requests);
    assert_eq!(phase.itl_ms.count, requests * (tokens as usize - 1));
    assert_eq!(phase.tpot_ms.count, requests);
    for summary in [&phase.ttft_ms, &phase.tpot_ms, &phase.itl_ms, &phase.e2e_ms] {
        for value in [summary.p50, summary.p90, summary.p99] {
            assert!(value.is_some_and(|v| v > 0.0), "{summary:?}");
        }
    }
    // The server sleeps 2 ms before every event.
    assert!(
        phase.itl_ms.mean.is_some_and(|v| v >= 1.0),
        "{:?}",
        phase.itl_ms
    );
    assert!(phase.e2e_ms.p50 > phase.ttft_ms.p50);
    assert!(phase.output_tokens_per_s > 0.0);
    assert!(phase.requests_per_s > 0.0);
    assert!(phase.first_error.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_closed_loop_phases() {
    let seen = Seen::default();
    let config = config(server(&seen).await, ApiKind::Openai);
    let mut printed = 0;
    let report = run(&config, |_| printed += 1)
        .await
        .map_err(|e| e.to_string());
    let Ok(report) = report else {
        panic!("{report:?}")
    };
    assert_eq!(printed, 2);
    assert_eq!(report.warmup_failed, 0);
    assert_eq!(report.phases.len(), 2);
    for phase in &report.phases {
        assert_healthy(phase, 6, 5);
    }
    let bodies = seen.bodies();
    assert_eq!(bodies.len(), 2 + 6 + 6);
    for body in &bodies {
        assert_eq!(body["stream"], true);
        assert_eq!(body["max_tokens"], 5);
        assert_eq!(body["ignore_eos"], true);
    }
    let prompts: std::collections::HashSet<&str> =
        bodies.iter().filter_map(|b| b["prompt"].as_str()).collect();
    assert_eq!(
        prompts.len(),
        bodies.len(),
        "every request has its own prompt"
    );
    let words: std::collections::HashSet<usize> =
        prompts.iter().map(|p| p.split(' ').count()).collect();
    assert_eq!(words, [8, 16].into_iter().collect());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tgi_poisson_phase() {
    let seen = Seen::default();
    let mut config = config(server(&seen).await, ApiKind::Tgi);
    config.rates = vec![40.0];
    config.requests = Some(10);
    config.warmup = 0;
    let report = run(&config, |_| {}).await.map_err(|e| e.to_string());
    let Ok(report) = report else {
        panic!("{report:?}")
    };
    assert_eq!(report.phases.len(), 1);
    assert_healthy(&report.phases[0], 10, 5);
    let bodies = seen.bodies();
    assert_eq!(bodies.len(), 10);
    assert!(bodies
        .iter()
        .all(|b| b["parameters"]["max_new_tokens"] == 5 && b["inputs"].is_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_are_counted() {
    let seen = Seen::default();
    let url = serve(
        Router::new()
            .route("/v1/completions", post(flaky))
            .with_state(seen.clone()),
    )
    .await;
    let mut config = config(url, ApiKind::Openai);
    config.concurrency = vec![1];
    config.warmup = 0;
    let report = run(&config, |_| {}).await.map_err(|e| e.to_string());
    let Ok(report) = report else {
        panic!("{report:?}")
    };
    let phase = &report.phases[0];
    assert_eq!((phase.requests_ok, phase.requests_failed), (2, 4));
    assert_eq!(phase.output_tokens, 6);
    let error = phase.first_error.clone().unwrap_or_default();
    assert!(
        error.contains("503") && error.contains("overloaded"),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_prints_text_and_writes_json() {
    let seen = Seen::default();
    let url = server(&seen).await;
    let json_path =
        std::env::temp_dir().join(format!("tessera-loadgen-{}.json", std::process::id()));
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_tessera-loadgen"))
        .env_clear()
        .args([
            "--url",
            &url,
            "--api",
            "tgi",
            "--concurrency",
            "2",
            "--requests",
            "4",
            "--max-tokens",
            "3",
        ])
        .arg("--json")
        .arg(&json_path)
        .output()
        .await;
    let Ok(output) = output else {
        panic!("{output:?}")
    };
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for needle in [
        "closed c=2: 4 ok, 0 failed",
        "TTFT",
        "TPOT",
        "ITL",
        "E2E",
        "out tok/s",
    ] {
        assert!(stdout.contains(needle), "missing {needle:?} in\n{stdout}");
    }
    let text = std::fs::read_to_string(&json_path).unwrap_or_default();
    let _ = std::fs::remove_file(&json_path);
    let json: Value = serde_json::from_str(&text).unwrap_or_default();
    let phase = &json["phases"][0];
    assert_eq!(phase["mode"], "closed_loop");
    assert_eq!(phase["concurrency"], 2);
    assert_eq!(phase["requests_ok"], 4);
    assert_eq!(phase["output_tokens"], 12);
    assert!(
        phase["ttft_ms"]["p99"].as_f64().is_some_and(|v| v > 0.0),
        "{text}"
    );
    assert_eq!(json["settings"]["api"], "tgi");
}
