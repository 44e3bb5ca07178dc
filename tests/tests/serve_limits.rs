//! End to end through `tessera serve` with small limits and an API key (one
//! server for the file, used by one test at a time): validation errors are 422
//! with the error JSON, an oversized body 413, requests past the concurrency
//! limit 429, and a missing or wrong key 401.

mod common;

use std::time::{Duration, Instant};

use common::{assert_error_body, Http, Shared};
use serde_json::{json, Value};

const KEY: &str = "test-key-6a1f";

static SERVER: Shared = Shared::new(&[
    "--api-key",
    KEY,
    "--max-concurrent-requests",
    "2",
    "--",
    "--max-input-tokens",
    "64",
    "--max-total-tokens",
    "128",
    "--max-new-tokens",
    "100",
    "--payload-limit",
    "1000",
]);

fn authed(server: &common::Server) -> Http {
    server.http.clone().with_key(KEY)
}

#[test]
fn the_limits_are_the_ones_given() {
    let server = SERVER.lock();
    let info = authed(&server).get("/info").json::<Value>().unwrap();
    assert_eq!(info["max_concurrent_requests"], 2, "{info}");
    assert_eq!(info["max_input_tokens"], 64, "{info}");
    assert_eq!(info["max_total_tokens"], 128, "{info}");
    assert_eq!(info["max_new_tokens"], 100, "{info}");
    assert_eq!(info["payload_limit"], 1000, "{info}");
}

#[test]
fn invalid_requests_get_422_with_the_error_json() {
    let server = SERVER.lock();
    let http = authed(&server);
    let long_input = "word ".repeat(100); // > 64 tokens, < 1000 bytes
    let chat = |extra: Value| {
        let mut body = json!({"messages": [{"role": "user", "content": "Hi"}]});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        body
    };
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "/generate",
            json!({"inputs": "Hi", "parameters": {"temperature": -1.0}}),
            "temperature",
        ),
        (
            "/generate",
            json!({"inputs": "Hi", "parameters": {"top_p": 2.0}}),
            "top_p",
        ),
        (
            "/generate",
            json!({"inputs": "Hi", "parameters": {"max_new_tokens": 101}}),
            "max_new_tokens",
        ),
        // Within max_new_tokens, but prompt + new tokens > max_total_tokens.
        (
            "/generate",
            json!({"inputs": "word ".repeat(40), "parameters": {"max_new_tokens": 100}}),
            "128",
        ),
        (
            "/generate",
            json!({"inputs": "Hi", "parameters": {"stop": ["a", "b", "c", "d", "e"]}}),
            "stop",
        ),
        (
            "/generate",
            json!({"inputs": long_input, "parameters": {"max_new_tokens": 1}}),
            "inputs",
        ),
        ("/generate", json!({"inputs": ""}), "inputs"),
        (
            "/generate",
            json!({"inputs": "Hi", "parameters": {"temperature": "hot"}}),
            "temperature",
        ),
        ("/generate", json!({"parameters": {}}), "inputs"),
        (
            "/generate_stream",
            json!({"inputs": "Hi", "parameters": {"top_p": 2.0}}),
            "top_p",
        ),
        (
            "/v1/chat/completions",
            chat(json!({"temperature": -1.0})),
            "temperature",
        ),
        (
            "/v1/chat/completions",
            chat(json!({"max_tokens": 101})),
            "max_new_tokens",
        ),
        (
            "/v1/chat/completions",
            chat(json!({"stop": ["a", "b", "c", "d", "e"], "stream": true})),
            "stop",
        ),
        ("/v1/chat/completions", json!({"messages": []}), "messages"),
        (
            "/v1/completions",
            json!({"prompt": long_input, "max_tokens": 1}),
            "inputs",
        ),
        (
            "/v1/completions",
            json!({"prompt": "Hi", "top_p": 2.0}),
            "top_p",
        ),
        (
            "/v1/completions",
            json!({"prompt": "Hi", "logit_bias": {"50": 101}}),
            "logit_bias",
        ),
        (
            "/v1/completions",
            json!({"prompt": "Hi", "logit_bias": {"nine": 1}}),
            "logit_bias",
        ),
        (
            "/v1/chat/completions",
            chat(json!({"logit_bias": {"4000000": -5}})),
            "vocabulary",
        ),
        (
            "/v1/completions",
            json!({"prompt": "Hi", "suffix": "end"}),
            "suffix",
        ),
        (
            "/v1/chat/completions",
            chat(json!({"response_format": {"type": "json_object"}, "ignore_eos": true})),
            "ignore_eos",
        ),
        // Asked-for behaviour the server does not have is refused, not ignored.
        (
            "/v1/chat/completions",
            chat(json!({"response_format": {"type": "json_schema", "json_schema": {}}})),
            "response_format",
        ),
        (
            "/v1/chat/completions",
            chat(json!({"tools": [{"type": "function", "function": {"name": "f"}}]})),
            "tools",
        ),
        (
            "/generate",
            json!({"inputs": "Hi", "parameters": {"grammar": {"type": "json", "value": {}}}}),
            "grammar",
        ),
    ];
    for (path, body, mentions) in cases {
        let context = format!("POST {path} {body}");
        let (status, answer) = http.post_json(path, &body);
        assert_eq!(status, 422, "{context}: {answer}");
        assert_error_body(&answer, "validation", &context);
        let message = answer["error"].as_str().unwrap();
        assert!(
            message.contains(mentions),
            "{context}: the message should name {mentions:?}: {message}"
        );
    }
}

#[test]
fn oversized_body_gets_413() {
    let server = SERVER.lock();
    let http = authed(&server);
    let body = json!({"inputs": "x".repeat(2000), "parameters": {"max_new_tokens": 1}});
    for path in ["/generate", "/v1/completions"] {
        let (status, answer) = http.post_json(path, &body);
        assert_eq!(status, 413, "{path}: {answer}");
        assert_error_body(&answer, "payload_too_large", path);
    }
    // Just under the limit is fine.
    let body = json!({"inputs": "Hi ".repeat(10), "parameters": {"max_new_tokens": 1}});
    assert!(serde_json::to_vec(&body).unwrap().len() < 1000);
    http.ok_json("/generate", &body);
}

#[test]
fn requests_past_the_concurrency_limit_get_429() {
    let server = SERVER.lock();
    let http = authed(&server);
    let long = json!({"inputs": "Once upon a time", "parameters": {
        "max_new_tokens": 100, "ignore_eos": true}});
    // Two streams in flight (each has sent its first token).
    let mut streams: Vec<_> = (0..2)
        .map(|_| http.stream("/generate_stream", &long))
        .collect();
    for stream in &mut streams {
        let first = stream.next_event().unwrap().expect("a first event");
        let first: Value = serde_json::from_str(&first).unwrap();
        assert!(first["details"].is_null(), "still running: {first}");
    }
    let short = json!({"inputs": "Hi", "parameters": {"max_new_tokens": 1}});
    for (path, body) in [
        ("/generate", short.clone()),
        ("/generate_stream", short.clone()),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}),
        ),
    ] {
        let (status, answer) = http.post_json(path, &body);
        assert_eq!(status, 429, "{path} with 2 requests in flight: {answer}");
        assert_error_body(&answer, "overloaded", path);
    }
    // Probes are not requests.
    assert_eq!(http.status("/health"), 200);
    // The clients leave; their slots come back.
    drop(streams);
    let started = Instant::now();
    loop {
        let (status, answer) = http.post_json("/generate", &short);
        if status == 200 {
            break;
        }
        assert_eq!(status, 429, "{answer}");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "still 429 10 s after the clients left: {answer}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn requests_without_the_api_key_get_401() {
    let server = SERVER.lock();
    let anonymous = server.http.clone();
    let wrong = server.http.clone().with_key("not-the-key");
    let body = json!({"inputs": "Hi", "parameters": {"max_new_tokens": 1}});
    for http in [&anonymous, &wrong] {
        for path in ["/generate", "/generate_stream", "/v1/completions"] {
            let (status, answer) = http.post_json(path, &body);
            assert_eq!(status, 401, "{path} key {:?}: {answer}", http.key);
            assert_error_body(&answer, "authentication", path);
        }
        let response = http.get("/info");
        assert_eq!(response.status().as_u16(), 401);
        let answer: Value = response.json().unwrap();
        assert_error_body(&answer, "authentication", "/info");
        assert_eq!(http.status("/v1/models"), 401);
    }
    // The probes need no key.
    assert_eq!(anonymous.status("/health"), 200);
    assert_eq!(anonymous.status("/metrics"), 200);
    // The right key works.
    let http = authed(&server);
    assert_eq!(http.status("/info"), 200);
    assert_eq!(http.status("/v1/models"), 200);
    http.ok_json("/generate", &body);
}
