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

/// With a prefill budget of 8 tokens, so that the ranks also prefill prompts in chunks
/// together.
#[test]
fn three_ranks_serve_the_reference_continuations() {
    let server = Server::start(&[
        "--dtype",
        "float32",
        "--num-shard",
        "3",
        "--",
        "--max-batch-prefill-tokens",
        "8",
    ]);
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
        let answers = prompts
            .iter()
            .map(|p| generated_ids(&greedy(&server, p, 24)))
            .collect();
        // Every rank reports its own forward time of every step.
        let metrics = server.http.get("/metrics").text().unwrap();
        let n: usize = ranks.parse().unwrap();
        for rank in 0..n {
            for (phase, steps) in [("prefill", 2.0), ("decode", 2.0 * 23.0)] {
                let name = format!(
                    "tessera_shard_forward_duration_seconds_count{{phase=\"{phase}\",rank=\"{rank}\",replica=\"0\"}}"
                );
                assert_eq!(common::metric_value(&metrics, &name), Some(steps), "{name}");
            }
        }
        answers
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

/// The pid of the process whose command line contains every one of `parts`.
fn find_process(parts: &[&str]) -> Option<i32> {
    std::fs::read_dir("/proc").ok()?.find_map(|entry| {
        let entry = entry.ok()?;
        let pid: i32 = entry.file_name().to_str()?.parse().ok()?;
        let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
        let args: Vec<String> = cmdline
            .split(|&b| b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let joined = args.join(" ");
        parts.iter().all(|p| joined.contains(p)).then_some(pid)
    })
}

/// SIGTERM while the ranks are still loading stops the launcher and its ranks: before,
/// the launcher installed its handler only once ready, so the signal's default action
/// killed it and left the shard processes running.
#[test]
fn sigterm_during_loading_stops_every_rank() {
    let sockets = unique_tmp("loading");
    let sockets = sockets.display().to_string();
    let mut proc = Proc::start(
        "tessera-serve-loading",
        &bin("tessera"),
        &[
            "serve".into(),
            "--port".into(),
            free_port().to_string(),
            "--shard-uds-path".into(),
            sockets.clone(),
            "--num-shard".into(),
            "3".into(),
        ],
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while find_process(&["tessera-shard", &sockets]).is_none() {
        assert!(
            Instant::now() < deadline,
            "no rank started\n{}",
            proc.log_tail()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    proc.signal(libc::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(30);
    while proc.running() || find_process(&["tessera-shard", &sockets]).is_some() {
        assert!(
            Instant::now() < deadline,
            "launcher or ranks still running after SIGTERM\n{}",
            proc.log_tail()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Two replicas of the default model: concurrent requests are spread over both (as
/// the per-replica counter shows) and answered exactly as one rank answers.
#[test]
fn two_replicas_share_the_load_with_unchanged_answers() {
    let server = Server::start(&["--dtype", "float32", "--replicas", "2"]);
    let info = server.http.get("/info").json::<Value>().unwrap();
    assert_eq!(info["replicas"], 2, "{info}");
    let reference = reference();
    let cases: Vec<(String, Vec<u64>)> = reference["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["prompt"].as_str().unwrap().to_string(),
                ids(&c["generated_ids"]),
            )
        })
        .collect();
    let port = server.port;
    let handles: Vec<_> = cases
        .iter()
        .cloned()
        .map(|(prompt, want)| {
            std::thread::spawn(move || {
                let http = common::Http::new(port);
                let answer = http.ok_json(
                    "/generate",
                    &json!({"inputs": prompt, "parameters": {
                        "max_new_tokens": 32, "details": true, "ignore_eos": true}}),
                );
                (generated_ids(&answer), want)
            })
        })
        .collect();
    for h in handles {
        let (got, want) = h.join().unwrap();
        assert_eq!(got, want);
    }
    let metrics = server.http.get("/metrics").text().unwrap();
    let routed = |r: &str| {
        common::metric_value(
            &metrics,
            &format!("tessera_replica_requests_total{{replica=\"{r}\"}}"),
        )
        .unwrap_or(0.0)
    };
    assert!(routed("0") >= 1.0 && routed("1") >= 1.0, "{metrics}");
    assert_eq!(routed("0") + routed("1"), cases.len() as f64);
}

/// Two replicas of two tensor-parallel ranks each: killing one rank fails its
/// group's request in flight with an error and marks that replica unhealthy, while
/// the other replica keeps serving.
#[test]
fn a_dead_rank_takes_down_its_replica_only() {
    let model = common::repo_root().join("fixtures/reference/tiny-llama");
    let model = model.display().to_string();
    let server = Server::start(&[
        "--model",
        &model,
        "--dtype",
        "float32",
        "--num-shard",
        "2",
        "--replicas",
        "2",
    ]);
    let http = &server.http;
    // The first request of an idle server goes to replica 0 (ties: lowest index).
    let long = json!({"inputs": "a b c", "parameters": {
        "max_new_tokens": 480, "ignore_eos": true}});
    let mut stream = http.stream("/generate_stream", &long);
    for _ in 0..3 {
        let event: Value = serde_json::from_str(&stream.next_event().unwrap().unwrap()).unwrap();
        assert!(event["details"].is_null(), "finished too soon: {event}");
    }
    let uds = format!("{}-g0 ", server.uds.display());
    let victim = find_process(&["tessera-shard", "serve", &uds, "--rank 1 "])
        .unwrap_or_else(|| panic!("rank 1 of replica 0 not found\n{}", server.proc.log_tail()));
    // SAFETY: kill(2) on a shard process this test started.
    unsafe {
        libc::kill(victim, libc::SIGKILL);
    }
    let killed = Instant::now();
    let mut last = None;
    while let Ok(Some(event)) = stream.next_event() {
        last = Some(event);
    }
    let last: Value = serde_json::from_str(&last.expect("no event after the kill")).unwrap();
    assert!(
        last["error"].as_str().is_some_and(|e| !e.is_empty()),
        "the in-flight request must end with an error: {last}"
    );
    assert!(killed.elapsed() < Duration::from_secs(60));
    // Replica 0 is reported down; the server stays healthy and serves on replica 1.
    common::poll(
        Duration::from_secs(30),
        "replica 0 marked unhealthy",
        || {
            let metrics = http.get("/metrics").text().ok()?;
            (common::metric_value(&metrics, "tessera_shard_healthy{replica=\"0\"}") == Some(0.0))
                .then_some(())
        },
    );
    assert_eq!(http.status("/health"), 200);
    for _ in 0..3 {
        let answer = greedy(&server, "hello world", 8);
        assert_eq!(generated_ids(&answer).len(), 8, "{answer}");
    }
    let metrics = http.get("/metrics").text().unwrap();
    assert_eq!(
        common::metric_value(&metrics, "tessera_shard_healthy{replica=\"1\"}"),
        Some(1.0),
        "{metrics}"
    );
}
