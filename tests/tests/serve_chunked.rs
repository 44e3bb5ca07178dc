//! Chunked prefill end to end: `tessera serve --dtype float32` with a prefill-token
//! budget of 16 per step (one server for the file, used by one test at a time), so
//! that every prompt longer than that is prefilled in chunks of 16 tokens, one per
//! step, beside the running requests' decode steps. The answers stay exactly
//! Transformers' reference and each request's solo answer; a client that leaves
//! while its prompt is in chunks frees its KV blocks.

mod common;

use std::time::Duration;

use common::{cases, concurrent_requests_equal_solo_ones, poll, token_ids, Http, Server, Shared};
use serde_json::json;

const BUDGET: usize = 16;

static SERVER: Shared = Shared::new(&[
    "--dtype",
    "float32",
    "--",
    "--max-batch-prefill-tokens",
    "16",
]);

/// Prefill steps the shard has run.
fn prefill_steps(http: &Http) -> f64 {
    let metrics = http.get("/metrics").text().unwrap();
    common::metric_value(
        &metrics,
        "tessera_shard_forward_duration_seconds_count{phase=\"prefill\",rank=\"0\",replica=\"0\"}",
    )
    .unwrap_or(0.0)
}

/// Each reference prompt, alone: it takes one prefill step per 16 tokens and still
/// answers exactly the reference. With `decoder_input_details` (the prompt's
/// log-probabilities come from one pass) the prompt is prefilled whole, in one step
/// of its own, with the same answer. (A server of its own, without prefix caching,
/// so that every prompt is computed whole; the shared one, with it, chunks what its
/// cached prefixes leave.)
#[test]
fn prompts_prefilled_in_chunks_reproduce_the_reference() {
    let server = Server::start(&[
        "--dtype",
        "float32",
        "--",
        "--max-batch-prefill-tokens",
        "16",
        "--prefix-caching",
        "false",
    ]);
    let http = &server.http;
    let mut chunked = 0;
    for case in cases() {
        let name = &case.name;
        for scored in [false, true] {
            let steps = prefill_steps(http);
            let answer = http.ok_json(
                "/generate",
                &json!({"inputs": case.prompt, "parameters": {
                    "max_new_tokens": 32, "details": true, "decoder_input_details": scored,
                    "ignore_eos": true, "do_sample": false}}),
            );
            assert_eq!(
                token_ids(&answer["details"]),
                case.generated_ids,
                "{name}, scored {scored}"
            );
            let len = case.prompt_ids.len();
            let expected = if scored { 1 } else { len.div_ceil(BUDGET) };
            assert_eq!(
                (prefill_steps(http) - steps) as usize,
                expected,
                "{name}, scored {scored}: prefill steps for {len} prompt tokens"
            );
            if !scored && expected > 1 {
                chunked += 1;
            }
        }
    }
    assert!(chunked >= 3, "only {chunked} prompts were chunked");
}

/// 32 greedy requests of 1 to 190 prompt tokens at once: prompts join in chunks
/// while others decode, and every answer equals the request's solo answer.
#[test]
fn concurrent_requests_with_chunked_prompts_equal_solo_ones() {
    let server = SERVER.lock();
    concurrent_requests_equal_solo_ones(&server.http);
}

/// A client that goes away while its long prompt is being prefilled in chunks: the
/// router stops its chunks, frees its KV blocks, and goes on serving.
#[test]
fn a_client_leaving_during_a_chunked_prefill_frees_its_blocks() {
    let server = SERVER.lock();
    let http = &server.http;
    let long = cases().into_iter().find(|c| c.name == "long").unwrap();
    // About 950 tokens, sharing no prefix with the other tests' prompts: 60 chunks.
    let prompt = format!(
        "Unrelated words first. {}",
        [long.prompt.as_str(); 5].join(" ")
    );
    let tokens = http.ok_json("/tokenize", &json!({"inputs": prompt}));
    let chunks = tokens.as_array().unwrap().len().div_ceil(BUDGET) as f64;
    let steps = prefill_steps(http);
    let response = http.post(
        "/generate_stream",
        &json!({"inputs": prompt, "parameters": {"max_new_tokens": 50, "ignore_eos": true}}),
    );
    assert_eq!(response.status().as_u16(), 200);
    // Leave once its chunks are under way.
    poll(Duration::from_secs(60), "the first chunks", || {
        (prefill_steps(http) >= steps + 2.0).then_some(())
    });
    drop(response);
    poll(Duration::from_secs(60), "its blocks freed", || {
        (http.metric("tessera_kv_cache_blocks_used") == 0.0).then_some(())
    });
    let taken = prefill_steps(http) - steps;
    eprintln!("{taken} of {chunks} chunks prefilled before the client left");
    assert!(
        taken < chunks - 10.0,
        "{taken} of the prompt's {chunks} chunks were prefilled although its client left"
    );
    // The server still answers, exactly.
    let case = &cases()[0];
    let answer = http.ok_json(
        "/generate",
        &json!({"inputs": case.prompt, "parameters": {
            "max_new_tokens": 32, "details": true, "ignore_eos": true, "do_sample": false}}),
    );
    assert_eq!(token_ids(&answer["details"]), case.generated_ids);
}

/// Prompts that each need several chunks, sent at once, so that requests wait while
/// another prompt is in chunks: every one is answered, with its solo answer. (The
/// first version of chunked prefill dropped the request at the head of the queue at
/// every step that started no chunk, and its client got "Generation ended without a
/// final token".)
#[test]
fn requests_waiting_behind_a_prompt_in_chunks_are_all_answered() {
    let server = SERVER.lock();
    let http = &server.http;
    let long = cases().into_iter().find(|c| c.name == "long").unwrap();
    let words: Vec<&str> = long.prompt.split(' ').collect();
    let requests: Vec<serde_json::Value> = (0..8)
        .map(|i| {
            // 40 to 75 words, each starting differently (no shared cached prefix).
            let prompt = format!("Request {i}: {}", words[i..40 + 5 * i].join(" "));
            json!({"inputs": prompt, "parameters": {
                "max_new_tokens": 4, "details": true, "ignore_eos": true}})
        })
        .collect();
    // At once first: solo runs before would leave their prompts in the prefix cache.
    let handles: Vec<_> = requests
        .iter()
        .cloned()
        .map(|request| {
            let http = http.clone();
            std::thread::spawn(move || http.post_json("/generate", &request))
        })
        .collect();
    let together: Vec<(u16, serde_json::Value)> =
        handles.into_iter().map(|h| h.join().unwrap()).collect();
    for (i, (request, (status, answer))) in requests.iter().zip(&together).enumerate() {
        assert_eq!(*status, 200, "request {i}: {answer}");
        let alone = token_ids(&http.ok_json("/generate", request)["details"]);
        assert_eq!(token_ids(&answer["details"]), alone, "request {i}");
    }
}
