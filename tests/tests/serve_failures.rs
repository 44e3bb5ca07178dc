//! End to end, when things break: a shard killed mid-generation (router and
//! shard started directly, not by the launcher) and a model that does not
//! exist.

mod common;

use std::time::{Duration, Instant};

use common::{assert_error_body, bin, free_port, unique_tmp, Http, Proc, SseReader};
use serde_json::{json, Value};

/// Waits until `check` holds, or panics with `what` and the logs.
fn wait(timeout: Duration, what: &str, procs: &mut [&mut Proc], mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        for proc in procs.iter_mut() {
            assert!(
                proc.running(),
                "{what}: process exited\n{}",
                proc.log_tail()
            );
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not after {timeout:?}\n{}",
            procs
                .iter()
                .map(|p| p.log_tail())
                .collect::<Vec<_>>()
                .join("\n")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Starts `tessera-shard serve` on the default model with `shard_args`, and a router
/// on it; returns both once /health is 200, and the router's port.
fn start_shard_and_router(shard_args: &[&str]) -> (Proc, Proc, u16) {
    let uds = unique_tmp("shard");
    let socket = format!("{}-0", uds.display());
    let mut args = vec![
        "serve".to_string(),
        "--uds-path".into(),
        uds.display().to_string(),
    ];
    args.extend(shard_args.iter().map(|a| a.to_string()));
    let mut shard = Proc::start("tessera-shard", &bin("tessera-shard"), &args);
    wait(
        Duration::from_secs(120),
        "the shard socket",
        &mut [&mut shard],
        || std::path::Path::new(&socket).exists(),
    );
    let port = free_port();
    let mut router = Proc::start(
        "tessera-router",
        &bin("tessera-router"),
        &[
            "--shard-uri".into(),
            format!("unix://{socket}"),
            "--hostname".into(),
            "127.0.0.1".into(),
            "--port".into(),
            port.to_string(),
        ],
    );
    let probe = Http::new(port).with_timeout(Duration::from_secs(5));
    wait(
        Duration::from_secs(120),
        "router healthy",
        &mut [&mut shard, &mut router],
        || {
            probe
                .client
                .get(probe.url("/health"))
                .send()
                .is_ok_and(|r| r.status().as_u16() == 200)
        },
    );
    (shard, router, port)
}

/// The shard runs every libtorch operator on its engine thread, loading the model
/// included. libgomp keeps one OpenMP pool per thread that starts parallel work, and
/// once its pools hold more threads than there are cores, idle workers sleep between
/// operators instead of spinning: the pool that loading on the main thread left behind
/// made one stream's decode steps 2.5x slower on a 2-core machine. OpenMP workers take
/// the name of the thread that created them, so the only thread named like the process
/// must be its main thread, and the engine's workers must be named after the engine.
/// (`--threads` is left at its default, one per core: setting it also starts libtorch's
/// pthreadpool, whose idle worker would bear the process's name.)
#[cfg(target_os = "linux")]
#[test]
fn the_shard_keeps_one_openmp_pool_on_its_engine_thread() {
    let (shard, _router, port) = start_shard_and_router(&["--dtype", "auto"]);
    let http = Http::new(port).with_timeout(Duration::from_secs(60));
    let (status, answer) = http.post_json(
        "/generate",
        &json!({"inputs": "The capital of France is", "parameters": {"max_new_tokens": 4}}),
    );
    assert_eq!(status, 200, "{answer}");
    let tasks = std::fs::read_dir(format!("/proc/{}/task", shard.pid())).unwrap();
    let names: Vec<String> = tasks
        .map(|task| {
            let comm = task.unwrap().path().join("comm");
            std::fs::read_to_string(comm).unwrap().trim().to_string()
        })
        .collect();
    let count = |name: &str| names.iter().filter(|n| *n == name).count();
    assert_eq!(count("tessera-shard"), 1, "threads: {names:?}");
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cores > 1 {
        assert!(
            count("engine") >= 2,
            "the engine and its OpenMP workers: {names:?}"
        );
    }
}

#[test]
fn killed_shard_ends_streams_with_an_error_and_the_router_stays_up() {
    let (shard, mut router, port) = start_shard_and_router(&["--dtype", "bfloat16"]);
    let http = Http::new(port).with_timeout(Duration::from_secs(30));
    let probe = Http::new(port).with_timeout(Duration::from_secs(5));

    let long = json!({"inputs": "Once upon a time", "parameters": {
        "max_new_tokens": 3000, "ignore_eos": true}});
    // A non-streaming request in flight too: it must get an error JSON.
    let whole = {
        let http = http.clone();
        let body = long.clone();
        std::thread::spawn(move || {
            let started = Instant::now();
            let response = http.post("/generate", &body);
            let status = response.status().as_u16();
            let text = response.text().unwrap();
            (status, text, Instant::now().duration_since(started))
        })
    };
    let mut stream: SseReader = http.stream("/generate_stream", &long);
    for _ in 0..3 {
        let event: Value = serde_json::from_str(&stream.next_event().unwrap().unwrap()).unwrap();
        assert!(event["details"].is_null(), "{event}");
    }
    shard.signal(libc::SIGKILL);
    let killed = Instant::now();

    // The stream ends quickly, its last event an error.
    let mut last = None;
    loop {
        match stream.next_event() {
            Ok(Some(event)) => last = Some(event),
            Ok(None) => break,
            Err(e) => panic!(
                "the stream broke instead of ending with an error event: {e}\n{}",
                router.log_tail()
            ),
        }
    }
    let ended = killed.elapsed();
    assert!(
        ended < Duration::from_secs(10),
        "the stream took {ended:?} to end"
    );
    let last: Value = serde_json::from_str(&last.expect("no event after the kill")).unwrap();
    assert!(
        last.get("error").is_some(),
        "the last event must be an error: {last}"
    );
    assert!(
        last["error"].as_str().is_some_and(|s| !s.is_empty()),
        "{last}"
    );
    assert!(last["error_type"].is_string(), "{last}");

    eprintln!("stream ended {ended:?} after the kill with {last}");
    let (status, text, took) = whole.join().unwrap();
    eprintln!("non-streaming request: {status} {text} after {took:?}");
    let answer: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("non-streaming answer ({status}) not JSON ({e}): {text:?}"));
    assert!(
        status == 424 || status >= 500,
        "non-streaming request in flight: {status} {answer}"
    );
    assert!(
        answer["error"].is_string() && answer["error_type"].is_string(),
        "{answer}"
    );
    assert!(took < Duration::from_secs(30), "{took:?}");

    // Unhealthy, but up and answering.
    let started = Instant::now();
    loop {
        let response = probe.get("/health");
        if response.status().as_u16() == 503 {
            let body: Value = response.json().unwrap();
            assert_error_body(&body, "unavailable", "/health");
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "/health still {} 10 s after the shard died",
            response.status()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(router.running(), "the router exited\n{}", router.log_tail());
    assert_eq!(probe.status("/info"), 200);
    for path in ["/generate", "/v1/completions"] {
        let started = Instant::now();
        let (status, answer) = probe.post_json(
            path,
            &json!({"inputs": "Hi", "prompt": "Hi", "parameters": {"max_new_tokens": 2}, "max_tokens": 2}),
        );
        assert!(
            status == 503 || status == 424,
            "{path} after the shard died: {status} {answer}"
        );
        assert!(answer["error"].is_string(), "{answer}");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{path} took {:?}",
            started.elapsed()
        );
    }
    let (status, _) = probe.post_json(
        "/generate_stream",
        &json!({"inputs": "Hi", "parameters": {"max_new_tokens": 2}}),
    );
    assert!(status == 503 || status == 424 || status == 200, "{status}");
    assert!(router.running(), "the router exited\n{}", router.log_tail());
}

#[test]
fn serve_with_a_missing_model_exits_non_zero_with_a_clear_message() {
    let missing = "/nonexistent/tessera-test/model.gguf";
    let port = free_port();
    let uds = unique_tmp("shard");
    let mut proc = Proc::start(
        "tessera-serve",
        &bin("tessera"),
        &[
            "serve".into(),
            "--model".into(),
            missing.into(),
            "--port".into(),
            port.to_string(),
            "--shard-uds-path".into(),
            uds.display().to_string(),
        ],
    );
    let started = Instant::now();
    let status = loop {
        if let Some(status) = proc.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "tessera serve still running after 30 s with a missing model\n{}",
            proc.log_tail()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let log = proc.log_tail();
    assert!(!status.success(), "exit status {status}\n{log}");
    assert!(
        log.contains(missing),
        "the message must name the path:\n{log}"
    );
    eprintln!("exited {status} after {:?}", started.elapsed());
}
