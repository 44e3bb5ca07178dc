//! The Grafana dashboard and the Prometheus rules against a live `tessera serve`:
//!
//! - every metric that a dashboard query or a rule names is one the server exports
//!   (histogram series `_bucket`, `_sum` and `_count` belong to their family);
//! - `/metrics` passes `promtool check metrics`, and its counters and histograms move as
//!   they should after real requests, an error among them;
//! - a real Prometheus (Debian's, unpacked by scripts/setup_tools.sh) scrapes the server
//!   and evaluates every dashboard query (Grafana's variables set to the server's
//!   instance and replica, `$__rate_interval` to 1m) and every rule: each query parses
//!   and returns data, each recording rule produces series.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{free_port, metric_value, poll, repo_root, unique_tmp, Proc, Server};
use serde_json::{json, Value};

/// Metric families the issue asks the dashboard to show.
const SHOWN: [&str; 16] = [
    "tessera_requests_total",
    "tessera_request_duration_seconds",
    "tessera_request_queue_duration_seconds",
    "tessera_request_validation_duration_seconds",
    "tessera_request_inference_duration_seconds",
    "tessera_request_time_to_first_token_seconds",
    "tessera_request_time_per_output_token_seconds",
    "tessera_request_input_tokens",
    "tessera_request_generated_tokens",
    "tessera_queue_size",
    "tessera_batch_current_size",
    "tessera_kv_cache_blocks_used",
    "tessera_kv_cache_blocks_free",
    "tessera_shard_healthy",
    "tessera_batch_forward_duration_seconds",
    "tessera_replica_requests_total",
];

/// PromQL words that are not metric names: aggregations, keywords, and the modifiers
/// whose parenthesised label lists follow them.
const KEYWORDS: [&str; 27] = [
    "sum",
    "avg",
    "min",
    "max",
    "count",
    "stddev",
    "stdvar",
    "topk",
    "bottomk",
    "quantile",
    "count_values",
    "group",
    "limitk",
    "limit_ratio",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "inf",
    "nan",
];
const LABEL_LISTS: [&str; 6] = [
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

/// Skips from an opening bracket at `i` to just past its closing one.
fn skip_group(chars: &[char], mut i: usize, open: char, close: char) -> usize {
    let mut depth = 0;
    while i < chars.len() {
        if chars[i] == open {
            depth += 1;
        } else if chars[i] == close {
            depth -= 1;
            if depth == 0 {
                return i + 1;
            }
        } else if chars[i] == '"' {
            i = skip_string(chars, i) - 1;
        }
        i += 1;
    }
    panic!(
        "unbalanced {open}{close} in {}",
        chars.iter().collect::<String>()
    );
}

fn skip_string(chars: &[char], i: usize) -> usize {
    let quote = chars[i];
    let mut j = i + 1;
    while j < chars.len() && chars[j] != quote {
        if chars[j] == '\\' {
            j += 1;
        }
        j += 1;
    }
    j + 1
}

/// The metric names a PromQL expression selects: identifiers outside label matchers,
/// ranges and strings that are neither functions (followed by `(`) nor keywords.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let chars: Vec<char> = expr.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '"' || c == '\'' || c == '`' {
            i = skip_string(&chars, i);
        } else if c == '{' {
            i = skip_group(&chars, i, '{', '}');
        } else if c == '[' {
            i = skip_group(&chars, i, '[', ']');
        } else if c.is_ascii_digit()
            || (c == '.' && chars.get(i + 1).is_some_and(|d| d.is_ascii_digit()))
        {
            // Numbers and durations (0.99, 1e3, 5m).
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len()
                && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
            {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let mut next = i;
            while next < chars.len() && chars[next].is_whitespace() {
                next += 1;
            }
            let followed_by_paren = chars.get(next) == Some(&'(');
            if LABEL_LISTS.contains(&word.as_str()) && followed_by_paren {
                i = skip_group(&chars, next, '(', ')');
            } else if !followed_by_paren && !KEYWORDS.contains(&word.to_lowercase().as_str()) {
                names.insert(word);
            }
        } else {
            i += 1;
        }
    }
    names
}

/// Metric families of a text exposition: name -> type.
fn families(exposition: &str) -> BTreeMap<String, String> {
    exposition
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .map(|(name, kind)| (name.to_string(), kind.trim().to_string()))
        .collect()
}

/// The family a series name belongs to, if the server exports it.
fn family_of(name: &str, families: &BTreeMap<String, String>) -> Option<String> {
    if families.contains_key(name) {
        return Some(name.to_string());
    }
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix) {
            let kind = families.get(base).map(String::as_str);
            if kind == Some("histogram") || (suffix != "_bucket" && kind == Some("summary")) {
                return Some(base.to_string());
            }
        }
    }
    None
}

/// Every query of the dashboard: (panel title, expr).
fn dashboard_queries() -> Vec<(String, String)> {
    let path = repo_root().join("deploy/grafana/dashboards/tessera.json");
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        let nested = panel["panels"].as_array().cloned().unwrap_or_default();
        for p in std::iter::once(panel).chain(nested.iter()) {
            for target in p["targets"].as_array().into_iter().flatten() {
                let expr = target["expr"]
                    .as_str()
                    .unwrap_or_else(|| panic!("{target}"));
                queries.push((p["title"].as_str().unwrap().to_string(), expr.to_string()));
            }
        }
    }
    assert!(queries.len() >= 30, "{} queries", queries.len());
    queries
}

/// The `expr:` and `record:` lines of the rules file (one line each, as it says).
fn rules() -> (Vec<String>, Vec<String>) {
    let text =
        std::fs::read_to_string(repo_root().join("deploy/prometheus/tessera-rules.yml")).unwrap();
    let field = |key: &str| -> Vec<String> {
        text.lines()
            .filter_map(|l| l.trim().strip_prefix(key))
            .map(|v| v.trim().to_string())
            .collect()
    };
    let (exprs, records) = (field("expr:"), field("- record:"));
    assert!(
        exprs.len() >= 5 && records.len() >= 3,
        "{exprs:?} {records:?}"
    );
    (exprs, records)
}

/// Grafana's variables as a user picks them: the server's instance and its replica
/// (not "all", which `=~".*"` would also match on a series without the label), and a
/// 1-minute rate window.
fn as_promql(expr: &str, instance: &str) -> String {
    expr.replace("$__rate_interval", "1m")
        .replace("$instance", instance)
        .replace("$replica", "0")
}

fn promtool() -> PathBuf {
    let root = repo_root();
    let output = Command::new(root.join("scripts/setup_tools.sh"))
        .output()
        .expect("running scripts/setup_tools.sh");
    assert!(
        output.status.success(),
        "scripts/setup_tools.sh: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    PathBuf::from(String::from_utf8(output.stdout).unwrap().trim())
}

fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A Prometheus scraping `target` every second, with the project's rules.
struct Prometheus {
    proc: Proc,
    base: String,
    client: reqwest::blocking::Client,
}

impl Prometheus {
    fn start(prometheus: &std::path::Path, target: u16) -> Prometheus {
        let dir = unique_tmp("prometheus");
        std::fs::create_dir_all(&dir).unwrap();
        let rules = repo_root().join("deploy/prometheus/tessera-rules.yml");
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 rule_files:\n  - {}\n\
                 scrape_configs:\n  - job_name: tessera\n    static_configs:\n      \
                 - targets: [\"127.0.0.1:{target}\"]\n",
                rules.display()
            ),
        )
        .unwrap();
        let port = free_port();
        let args = [
            format!("--config.file={}", config.display()),
            format!("--storage.tsdb.path={}", dir.join("data").display()),
            format!("--web.listen-address=127.0.0.1:{port}"),
            "--log.level=warn".to_string(),
        ];
        let mut proc = Proc::start("prometheus", prometheus, &args);
        let client = common::client(Duration::from_secs(10));
        let base = format!("http://127.0.0.1:{port}");
        poll(Duration::from_secs(60), "Prometheus ready", || {
            assert!(proc.running(), "prometheus exited\n{}", proc.log_tail());
            let ready = client.get(format!("{base}/-/ready")).send().ok()?;
            ready.status().is_success().then_some(())
        });
        Prometheus { proc, base, client }
    }

    /// An instant query: Ok(result vector) or Err(Prometheus' error).
    fn query(&self, promql: &str) -> Result<Vec<Value>, String> {
        let url = format!(
            "{}/api/v1/query?query={}",
            self.base,
            percent_encode(promql)
        );
        let answer: Value = self
            .client
            .get(url)
            .send()
            .and_then(|r| r.json())
            .map_err(|e| format!("{e}\n{}", self.proc.log_tail()))?;
        if answer["status"] != "success" {
            return Err(answer.to_string());
        }
        Ok(answer["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    }

    /// Polls `promql` until it returns data.
    fn data(&self, what: &str, promql: &str) -> Vec<Value> {
        let mut last = Ok(Vec::new());
        for _ in 0..120 {
            last = self.query(promql);
            match &last {
                Ok(result) if !result.is_empty() => return result.clone(),
                Err(e) => panic!("{what}: Prometheus refused `{promql}`: {e}"),
                Ok(_) => std::thread::sleep(Duration::from_millis(250)),
            }
        }
        panic!("{what}: `{promql}` returned no data in 30 s ({last:?})");
    }
}

fn scrape(server: &Server) -> String {
    let response = server.http.get("/metrics");
    assert_eq!(response.status().as_u16(), 200);
    response.text().unwrap()
}

fn value(text: &str, name: &str) -> f64 {
    metric_value(text, name).unwrap_or(0.0)
}

#[test]
fn dashboard_and_rules_query_what_a_live_server_exports() {
    let promtool = promtool();
    let prometheus_bin = promtool.with_file_name("prometheus");
    let server = Server::start(&[]);
    let prometheus = Prometheus::start(&prometheus_bin, server.port);
    prometheus.data("the server is scraped", "up{job=\"tessera\"} == 1");

    // Real requests: two answers (4 and 6 tokens, EOS ignored so the counts are exact),
    // one streamed chat, and one that fails validation (422).
    let before = scrape(&server);
    for tokens in [4, 6] {
        server.http.ok_json(
            "/generate",
            &json!({"inputs": "The capital of France is", "parameters": {
                "max_new_tokens": tokens, "ignore_eos": true, "details": true}}),
        );
    }
    let events = server
        .http
        .stream(
            "/v1/chat/completions",
            &json!({"model": "tessera", "stream": true, "max_tokens": 5, "ignore_eos": true,
                    "messages": [{"role": "user", "content": "Hi"}]}),
        )
        .collect();
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "{events:?}"
    );
    let (status, body) = server.http.post_json(
        "/generate",
        &json!({"inputs": "Hi", "parameters": {"max_new_tokens": 0}}),
    );
    assert_eq!(status, 422, "{body}");
    let after = scrape(&server);

    // promtool accepts the exposition as it is.
    let mut check = Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    check
        .stdin
        .take()
        .unwrap()
        .write_all(after.as_bytes())
        .unwrap();
    let output = check.wait_with_output().unwrap();
    let complaints = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success() && complaints.trim().is_empty(),
        "promtool check metrics ({}):\n{complaints}",
        output.status
    );

    // The counters and histograms moved as the requests say.
    let delta = |name: &str| value(&after, name) - value(&before, name);
    assert_eq!(delta("tessera_requests_total{outcome=\"success\"}"), 3.0);
    assert_eq!(delta("tessera_requests_total{outcome=\"validation\"}"), 1.0);
    assert_eq!(delta("tessera_request_duration_seconds_count"), 3.0);
    assert!(delta("tessera_request_duration_seconds_sum") > 0.0);
    assert_eq!(delta("tessera_request_generated_tokens_count"), 3.0);
    assert_eq!(delta("tessera_request_generated_tokens_sum"), 15.0);
    assert_eq!(
        delta("tessera_request_time_to_first_token_seconds_count"),
        3.0
    );
    assert_eq!(
        delta("tessera_request_time_per_output_token_seconds_count"),
        3.0
    );
    assert_eq!(delta("tessera_request_queue_duration_seconds_count"), 3.0);
    assert!(delta("tessera_request_input_tokens_sum") >= 3.0);
    assert!(delta("tessera_request_validation_duration_seconds_count") >= 3.0);
    assert!(delta("tessera_batch_forward_duration_seconds_count{phase=\"prefill\"}") >= 1.0);
    assert!(delta("tessera_batch_forward_duration_seconds_count{phase=\"decode\"}") >= 3.0);
    assert_eq!(delta("tessera_replica_requests_total"), 3.0);
    assert_eq!(value(&after, "tessera_shard_healthy{replica=\"0\"}"), 1.0);
    assert!(value(&after, "tessera_kv_cache_blocks_free") > 0.0);

    // Every metric a dashboard query or a rule names is exported.
    let exported = families(&after);
    let (rule_exprs, records) = rules();
    let queries = dashboard_queries();
    let mut shown = BTreeSet::new();
    let mut missing = Vec::new();
    for (title, expr) in queries.iter().chain(
        rule_exprs
            .iter()
            .map(|e| ("rules".to_string(), e.clone()))
            .collect::<Vec<_>>()
            .iter(),
    ) {
        let names = metric_names(expr);
        assert!(!names.is_empty(), "{title}: no metric in `{expr}`");
        for name in names {
            if records.contains(&name) {
                continue;
            }
            match family_of(&name, &exported) {
                Some(family) => {
                    shown.insert(family);
                }
                None => missing.push(format!("{title}: {name}")),
            }
        }
    }
    assert!(
        missing.is_empty(),
        "not exported by the server: {missing:#?}"
    );
    for family in SHOWN {
        assert!(
            shown.contains(family),
            "the dashboard does not show {family}"
        );
    }

    // Prometheus evaluates every query and returns data once the requests are scraped.
    prometheus.data(
        "the error was scraped",
        "tessera_requests_total{outcome=\"validation\"} >= 1",
    );
    let instance = format!("127.0.0.1:{}", server.port);
    for (title, expr) in &queries {
        prometheus.data(title, &as_promql(expr, &instance));
    }
    // The variables' label_values() come from this series and its labels.
    let series = prometheus.data("variables", "tessera_shard_healthy{instance=~\".*\"}");
    assert!(
        series[0]["metric"]["instance"].is_string() && series[0]["metric"]["replica"] == "0",
        "{series:?}"
    );
    // Rules: every recording rule produces series; the alert expressions evaluate.
    for record in &records {
        prometheus.data(record, record);
    }
    for expr in &rule_exprs {
        if let Err(e) = prometheus.query(expr) {
            panic!("rule `{expr}`: {e}");
        }
    }
}

#[test]
fn metric_names_are_read_from_promql() {
    let names = |e: &str| metric_names(e).into_iter().collect::<Vec<_>>();
    assert_eq!(
        names("histogram_quantile(0.9, sum by (le) (rate(a_bucket{x=~\"$i\", y!=\"z\"}[$__rate_interval])))"),
        ["a_bucket"]
    );
    assert_eq!(
        names("(sum(rate(b_total{o!=\"s\"}[5m])) or vector(0)) / sum without (p) (c) offset 5m > bool 0.5"),
        ["b_total", "c"]
    );
    assert_eq!(
        names("a / on (i) group_left (r) b + count(c) by (x) - 1e3 * d:rule"),
        ["a", "b", "c", "d:rule"]
    );
}
