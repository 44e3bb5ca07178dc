//! Tensor parallelism end to end: `tessera serve --num-shard N` starts N ranks that
//! split the model over c10d/Gloo, and its greedy answers over HTTP are those of one
//! rank (the Transformers reference for the default model).

mod common;

use std::time::{Duration, Instant};

use common::{bin, free_port, ids, reference, unique_tmp, Proc, Server};
use serde_json::{json, Value};

fn generated_ids(answer: &Value) -> Vec<u64> {
    answer["details"]["tokens"]
        .as_array()
        .unwrap_or_else(|| panic!("no details: {answer}"))
        .iter()
        .map(|t| t["id"].as_u64().unwrap_or(u64::MAX))
        .collect()
}

fn greedy(server: &Server, prompt: &str, tokens: u32) -> Value {
    server.http.ok_json(
        "/generate",
        &json!({"inputs": prompt, "parameters": {
            "max_new_tokens": tokens, "details": true, "ignore_eos": true, "do_sample": false}}),
    )
}

#[test]
fn three_ranks_serve_the_reference_continuations() {
    let server = Server::start(&["--dtype", "float32", "--num-shard", "3"]);
    let info = server.http.get("/info").json::<Value>().unwrap();
    assert_eq!(info["model_dtype"], "float32", "{info}");
    let reference = reference();
    for case in reference["prompts"].as_array().unwrap() {
        let prompt = case["prompt"].as_str().unwrap();
        let answer = greedy(&server, prompt, 32);
        assert_eq!(
            generated_ids(&answer),
            ids(&case["generated_ids"]),
            "{}: 3 ranks against the reference",
            case["name"]
        );
    }
}

#[test]
fn tiny_model_over_two_and_four_ranks_answers_like_one() {
    let model = common::repo_root().join("fixtures/reference/tiny-llama");
    let model = model.display().to_string();
    let prompts = ["hello world", "a b c d e f g h i j k l"];
    let answers = |ranks: &str| -> Vec<Vec<u64>> {
        let server = Server::start(&[
            "--model",
            &model,
            "--dtype",
            "float32",
            "--num-shard",
            ranks,
        ]);
        prompts
            .iter()
            .map(|p| generated_ids(&greedy(&server, p, 24)))
            .collect()
    };
    let one = answers("1");
    assert!(one.iter().all(|a| a.len() == 24));
    assert_eq!(answers("2"), one, "2 ranks");
    assert_eq!(answers("4"), one, "4 ranks");
}

#[test]
fn a_shard_count_that_cannot_split_the_model_is_refused() {
    // The default model has 9 attention heads: 2 ranks cannot share them.
    let mut proc = Proc::start(
        "tessera-serve",
        &bin("tessera"),
        &[
            "serve".into(),
            "--port".into(),
            free_port().to_string(),
            "--shard-uds-path".into(),
            unique_tmp("shard").display().to_string(),
            "--num-shard".into(),
            "2".into(),
        ],
    );
    let deadline = Instant::now() + Duration::from_secs(120);
    while proc.running() {
        assert!(
            Instant::now() < deadline,
            "still running\n{}",
            proc.log_tail()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = proc.log_tail();
    assert!(
        log.contains("cannot be split over 2 shards") && log.contains("9 attention heads"),
        "{log}"
    );
    assert!(log.contains("before it was ready"), "{log}");
}
