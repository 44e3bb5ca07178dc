//! Shared by the serving tests: start the real binaries on a free port, talk
//! HTTP to them, read server-sent events, and never leave a process behind.
//!
//! Every process a test starts runs in its own process group. A [`Proc`]
//! stops its group on drop (SIGTERM to the leader, then SIGKILL to the whole
//! group), an `atexit` hook does the same for servers kept in statics (whose
//! drop never runs), and the leader gets SIGTERM from the kernel if the test
//! process dies (`PR_SET_PDEATHSIG`, set from a thread that lives as long as
//! the process).

#![allow(dead_code)]

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Barrier, Mutex, MutexGuard, Once};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// `target/<profile>/`, where cargo put the workspace's binaries.
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent()
        .and_then(|deps| deps.parent())
        .unwrap()
        .to_path_buf()
}

pub fn bin(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.is_file(),
        "{} missing: run `cargo build --release --workspace --bins` (scripts/test.sh does)",
        path.display()
    );
    path
}

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A path prefix under /tmp that no other test or process uses.
pub fn unique_tmp(tag: &str) -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    PathBuf::from(format!(
        "/tmp/tessera-test-{}-{tag}-{n}",
        std::process::id()
    ))
}

/// Process groups still alive, stopped by the `atexit` hook.
static GROUPS: Mutex<Vec<i32>> = Mutex::new(Vec::new());

extern "C" fn stop_all_groups() {
    let groups: Vec<i32> = GROUPS.lock().map(|g| g.clone()).unwrap_or_default();
    for &pgid in &groups {
        // SAFETY: kill(2) on process groups this test process created.
        unsafe {
            libc::kill(pgid, libc::SIGTERM);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline && groups.iter().any(|&g| group_alive(g)) {
        std::thread::sleep(Duration::from_millis(50));
    }
    for &pgid in &groups {
        // SAFETY: as above.
        unsafe {
            libc::kill(-pgid, libc::SIGKILL);
        }
    }
}

fn group_alive(pgid: i32) -> bool {
    // SAFETY: signal 0 only checks that the group exists.
    unsafe { libc::kill(-pgid, 0) == 0 }
}

/// Spawns `command` in a new process group from a thread that lives as long as
/// the test process, so that the kernel's parent-death signal fires only when
/// the whole test process ends.
fn spawn_guarded(mut command: Command) -> Child {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        // SAFETY: registering a plain extern "C" function.
        unsafe {
            libc::atexit(stop_all_groups);
        }
    });
    type Job = (Command, mpsc::Sender<std::io::Result<Child>>);
    static SPAWNER: Mutex<Option<mpsc::Sender<Job>>> = Mutex::new(None);
    let jobs = {
        let mut spawner = SPAWNER.lock().unwrap_or_else(|e| e.into_inner());
        spawner
            .get_or_insert_with(|| {
                let (tx, rx) = mpsc::channel::<Job>();
                std::thread::Builder::new()
                    .name("process-spawner".into())
                    .spawn(move || {
                        for (mut command, reply) in rx {
                            let _ = reply.send(command.spawn());
                        }
                        // Never end: the parent-death signal follows this thread.
                        loop {
                            std::thread::park();
                        }
                    })
                    .unwrap();
                tx
            })
            .clone()
    };
    command.process_group(0);
    // SAFETY: prctl is async-signal-safe; it runs in the child before exec.
    unsafe {
        command.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
    let (tx, rx) = mpsc::channel();
    jobs.send((command, tx)).unwrap();
    let child = rx.recv().unwrap().expect("spawning a test process");
    GROUPS.lock().unwrap().push(child.id() as i32);
    child
}

/// A process (group) the test started, with its output in a log file.
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
    name: String,
}

impl Proc {
    /// Starts `program args` with stdout and stderr in a log file.
    pub fn start(name: &str, program: &Path, args: &[String]) -> Proc {
        let log = unique_tmp(&format!("{name}.log"));
        let file = std::fs::File::create(&log).unwrap();
        let mut command = Command::new(program);
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file);
        Proc {
            child: spawn_guarded(command),
            log,
            name: name.to_string(),
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// The last part of the log, for assertion messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let start = text.len().saturating_sub(4000);
        let start = (start..=text.len())
            .find(|&i| text.is_char_boundary(i))
            .unwrap_or(0);
        format!(
            "--- {} log ({}) ---\n{}",
            self.name,
            self.log.display(),
            &text[start..]
        )
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on a child of this process.
        unsafe {
            libc::kill(self.pid(), signal);
        }
    }

    /// SIGTERM, up to `grace` to exit, then SIGKILL to the whole group.
    pub fn stop(&mut self, grace: Duration) {
        let pgid = self.pid();
        if self.running() {
            self.signal(libc::SIGTERM);
            let deadline = Instant::now() + grace;
            while Instant::now() < deadline && self.running() {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline && group_alive(pgid) {
            std::thread::sleep(Duration::from_millis(20));
        }
        // SAFETY: the group this process created; no-op if it is gone.
        unsafe {
            libc::kill(-pgid, libc::SIGKILL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Ok(mut groups) = GROUPS.lock() {
            groups.retain(|&g| g != pgid);
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(10));
    }
}

/// HTTP helpers bound to one base URL.
#[derive(Clone)]
pub struct Http {
    pub base: String,
    pub client: reqwest::blocking::Client,
    pub key: Option<String>,
}

impl Http {
    pub fn new(port: u16) -> Http {
        Http {
            base: format!("http://127.0.0.1:{port}"),
            client: client(Duration::from_secs(300)),
            key: None,
        }
    }

    pub fn with_key(mut self, key: &str) -> Http {
        self.key = Some(key.to_string());
        self
    }

    pub fn with_timeout(mut self, timeout: Duration) -> Http {
        self.client = client(timeout);
        self
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn auth(
        &self,
        request: reqwest::blocking::RequestBuilder,
    ) -> reqwest::blocking::RequestBuilder {
        match &self.key {
            Some(key) => request.bearer_auth(key),
            None => request,
        }
    }

    pub fn get(&self, path: &str) -> reqwest::blocking::Response {
        self.auth(self.client.get(self.url(path)))
            .send()
            .unwrap_or_else(|e| panic!("GET {path}: {e}"))
    }

    /// POSTs `body` as JSON; any status.
    pub fn post(&self, path: &str, body: &Value) -> reqwest::blocking::Response {
        self.auth(self.client.post(self.url(path)).json(body))
            .send()
            .unwrap_or_else(|e| panic!("POST {path}: {e}"))
    }

    /// POSTs `body` and returns the status and the JSON answer.
    pub fn post_json(&self, path: &str, body: &Value) -> (u16, Value) {
        let response = self.post(path, body);
        let status = response.status().as_u16();
        let text = response.text().unwrap();
        let json = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("POST {path} ({status}): not JSON ({e}): {text:?}"));
        (status, json)
    }

    /// POSTs `body`, asserts 200 and returns the JSON answer.
    pub fn ok_json(&self, path: &str, body: &Value) -> Value {
        let (status, json) = self.post_json(path, body);
        assert_eq!(status, 200, "POST {path} {body}: {json}");
        json
    }

    /// POSTs `body`, asserts 200 and a `text/event-stream` answer.
    pub fn stream(&self, path: &str, body: &Value) -> SseReader {
        let response = self.post(path, body);
        let status = response.status().as_u16();
        if status != 200 {
            panic!("POST {path} {body}: {status} {}", response.text().unwrap());
        }
        let kind = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        assert!(kind.starts_with("text/event-stream"), "{path}: {kind}");
        SseReader::new(response)
    }

    pub fn status(&self, path: &str) -> u16 {
        self.get(path).status().as_u16()
    }

    /// The value of an unlabelled metric on /metrics.
    pub fn metric(&self, name: &str) -> f64 {
        let text = self.get("/metrics").text().unwrap();
        metric_value(&text, name).unwrap_or_else(|| panic!("{name} missing from /metrics"))
    }
}

pub fn client(timeout: Duration) -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(timeout)
        .connect_timeout(Duration::from_secs(5))
        .build()
        .unwrap()
}

/// The value of metric `name` in a Prometheus text exposition, summed over all of
/// its label sets (`name value` and `name{...} value` lines); `name{labels}` picks
/// the series whose labels start with `labels`.
pub fn metric_value(text: &str, name: &str) -> Option<f64> {
    let values: Vec<f64> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let rest = if let Some(prefix) = name.strip_suffix('}') {
                l.strip_prefix(prefix)?.split_once("} ")?.1
            } else {
                let rest = l.strip_prefix(name)?;
                match rest.strip_prefix('{') {
                    Some(labelled) => labelled.split_once("} ")?.1,
                    None => rest.strip_prefix(' ')?,
                }
            };
            rest.trim().parse().ok()
        })
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

/// Server-sent events of a response: each item is the `data:` payload of one
/// event (several `data:` lines joined with newlines).
pub struct SseReader {
    lines: BufReader<Box<dyn Read + Send>>,
}

impl SseReader {
    pub fn new(response: reqwest::blocking::Response) -> SseReader {
        SseReader {
            lines: BufReader::new(Box::new(response)),
        }
    }

    /// The next event's data; `Ok(None)` at the end of the stream.
    pub fn next_event(&mut self) -> std::io::Result<Option<String>> {
        let mut data: Option<String> = None;
        loop {
            let mut line = String::new();
            if self.lines.read_line(&mut line)? == 0 {
                assert!(data.is_none(), "stream ended inside an event: {data:?}");
                return Ok(None);
            }
            let line = line.strip_suffix('\n').unwrap_or(&line);
            let line = line.strip_suffix('\r').unwrap_or(line);
            if line.is_empty() {
                if data.is_some() {
                    return Ok(data);
                }
                continue;
            }
            if line.starts_with(':') {
                continue; // comment / keep-alive
            }
            let (field, value) = line.split_once(':').unwrap_or((line, ""));
            let value = value.strip_prefix(' ').unwrap_or(value);
            match field {
                "data" => match &mut data {
                    Some(d) => {
                        d.push('\n');
                        d.push_str(value);
                    }
                    None => data = Some(value.to_string()),
                },
                "event" | "id" | "retry" => {}
                other => panic!("malformed SSE line (field {other:?}): {line:?}"),
            }
        }
    }

    /// Every remaining event.
    pub fn collect(mut self) -> Vec<String> {
        let mut events = Vec::new();
        while let Some(event) = self.next_event().expect("reading the stream") {
            events.push(event);
        }
        events
    }
}

/// `tessera serve` on a free port with a unique shard socket.
pub struct Server {
    pub proc: Proc,
    pub port: u16,
    pub http: Http,
    /// The shards' unix socket prefix (`--shard-uds-path`).
    pub uds: PathBuf,
}

impl Server {
    /// Starts `tessera serve ARGS` and waits (up to 120 s) until /health is 200.
    /// `args` may end with `--` and router flags.
    pub fn start(args: &[&str]) -> Server {
        let port = free_port();
        let uds = unique_tmp("shard");
        let mut all: Vec<String> = vec![
            "serve".into(),
            "--hostname".into(),
            "127.0.0.1".into(),
            "--port".into(),
            port.to_string(),
            "--shard-uds-path".into(),
            uds.display().to_string(),
        ];
        all.extend(args.iter().map(|s| s.to_string()));
        let proc = Proc::start("tessera-serve", &bin("tessera"), &all);
        let mut server = Server {
            proc,
            port,
            http: Http::new(port),
            uds,
        };
        server.wait_healthy(Duration::from_secs(120));
        server
    }

    fn wait_healthy(&mut self, timeout: Duration) {
        let probe = Http::new(self.port).with_timeout(Duration::from_secs(5));
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(r) = probe.client.get(probe.url("/health")).send() {
                if r.status().as_u16() == 200 {
                    return;
                }
            }
            if !self.proc.running() {
                panic!(
                    "tessera serve exited before it was healthy\n{}",
                    self.proc.log_tail()
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "tessera serve not healthy after {timeout:?}\n{}",
                    self.proc.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// A server shared by the tests of one file, used by one test at a time (the
/// tests look at global state such as KV blocks and concurrency limits).
pub struct Shared {
    server: std::sync::OnceLock<Result<Mutex<Server>, String>>,
    args: &'static [&'static str],
}

impl Shared {
    pub const fn new(args: &'static [&'static str]) -> Shared {
        Shared {
            server: std::sync::OnceLock::new(),
            args,
        }
    }

    /// The server, started by the first caller. If it could not start, every
    /// caller fails at once with the reason (rather than each trying again).
    pub fn lock(&self) -> MutexGuard<'_, Server> {
        let server = self.server.get_or_init(|| {
            std::panic::catch_unwind(|| Server::start(self.args))
                .map(Mutex::new)
                .map_err(|e| {
                    e.downcast_ref::<String>()
                        .cloned()
                        .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default()
                })
        });
        let server = match server {
            Ok(server) => server,
            Err(why) => panic!("the shared server did not start: {why}"),
        };
        // A test that panicked while holding the lock leaves the server usable.
        let mut guard = server.lock().unwrap_or_else(|e| e.into_inner());
        assert!(
            guard.proc.running(),
            "the shared server is gone\n{}",
            guard.proc.log_tail()
        );
        guard
    }
}

/// Polls `check` every 50 ms until it returns `Some`, or panics after `timeout`.
pub fn poll<T>(timeout: Duration, what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?}: {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Asserts the error JSON shape: exactly `error` (non-empty) and `error_type`.
pub fn assert_error_body(body: &Value, error_type: &str, context: &str) {
    let object = body
        .as_object()
        .unwrap_or_else(|| panic!("{context}: error body is not an object: {body}"));
    let keys: HashSet<&str> = object.keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        HashSet::from(["error", "error_type"]),
        "{context}: {body}"
    );
    assert!(
        body["error"].as_str().is_some_and(|s| !s.is_empty()),
        "{context}: {body}"
    );
    assert_eq!(body["error_type"], error_type, "{context}: {body}");
}

/// The Transformers reference of the default model.
pub fn reference() -> Value {
    let path = repo_root().join("fixtures/reference/smollm2_gguf.json");
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

pub fn ids(value: &Value) -> Vec<u64> {
    value
        .as_array()
        .unwrap_or_else(|| panic!("not an array: {value}"))
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect()
}

/// One reference prompt: name, prompt text, prompt ids, 32 greedy ids, text.
pub struct Case {
    pub name: String,
    pub prompt: String,
    pub prompt_ids: Vec<u64>,
    pub generated_ids: Vec<u64>,
    pub generated_text: String,
}

pub fn cases() -> Vec<Case> {
    let reference = reference();
    assert_eq!(reference["dtype"], "float32");
    assert_eq!(reference["new_tokens"], 32);
    reference["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            assert_eq!(p["bos_added"], false, "the fixture's prompts are raw text");
            Case {
                name: p["name"].as_str().unwrap().to_string(),
                prompt: p["prompt"].as_str().unwrap().to_string(),
                prompt_ids: ids(&p["prompt_ids"]),
                generated_ids: ids(&p["generated_ids"]),
                generated_text: p["generated_text"].as_str().unwrap().to_string(),
            }
        })
        .collect()
}

/// The ids of a TGI answer's generated tokens (`details.tokens`).
pub fn token_ids(details: &Value) -> Vec<u64> {
    details["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_u64().unwrap())
        .collect()
}

/// 32 greedy TGI requests of mixed prompt lengths (the reference prompts, then
/// prefixes of its long one) and lengths (6 to 22 new tokens).
pub fn mixed_requests() -> Vec<Value> {
    let cases = cases();
    let long = cases.iter().find(|c| c.name == "long").unwrap();
    let words: Vec<&str> = long.prompt.split(' ').collect();
    (0..32)
        .map(|i| {
            let prompt = if i < cases.len() {
                cases[i].prompt.clone()
            } else {
                // Prefixes of the long prompt: 1 to 160 words.
                let n = 1 + (i * 37) % words.len().min(160);
                words[..n].join(" ")
            };
            json!({"inputs": prompt, "parameters": {
                "max_new_tokens": 6 + (i % 5) * 4, "details": true, "ignore_eos": true}})
        })
        .collect()
}

/// Sends [`mixed_requests`] one after another, then all at once, and asserts that
/// each answer in the batch equals its solo answer; returns both durations.
pub fn concurrent_requests_equal_solo_ones(http: &Http) -> (Duration, Duration) {
    let requests = mixed_requests();
    // Warm up the paths once.
    http.ok_json("/generate", &requests[0]);

    let started = Instant::now();
    let solo: Vec<Vec<u64>> = requests
        .iter()
        .map(|r| token_ids(&http.ok_json("/generate", r)["details"]))
        .collect();
    let sequential = started.elapsed();

    let barrier = Arc::new(Barrier::new(requests.len() + 1));
    let handles: Vec<_> = requests
        .iter()
        .cloned()
        .map(|request| {
            let http = http.clone();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                http.ok_json("/generate", &request)
            })
        })
        .collect();
    barrier.wait();
    let started = Instant::now();
    let together: Vec<Value> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let concurrent = started.elapsed();
    eprintln!("32 greedy requests: one after another {sequential:?}, all at once {concurrent:?}");

    for (i, (answer, alone)) in together.iter().zip(&solo).enumerate() {
        let expected = requests[i]["parameters"]["max_new_tokens"]
            .as_u64()
            .unwrap();
        assert_eq!(alone.len() as u64, expected, "request {i} alone");
        assert_eq!(
            &token_ids(&answer["details"]),
            alone,
            "request {i} ({:?}) in a batch of 32 differs from alone",
            requests[i]["inputs"]
        );
    }
    (sequential, concurrent)
}
