//! Per-phase figures, as JSON and as text tables.

use crate::api::ApiKind;
use crate::client::RequestRecord;
use crate::error::LoadgenError;
use crate::stats::Summary;
use serde::Serialize;
use std::fmt::Write as _;
use std::time::Duration;

/// How a phase offers load.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(tag = "mode", rename_all = "snake_case")]
pub enum PhaseKind {
    /// `concurrency` clients, each sending its next request as soon as the
    /// previous one finished.
    ClosedLoop { concurrency: usize },
    /// Requests start at Poisson arrival times, `rate` per second on average.
    Poisson { rate: f64 },
}

impl PhaseKind {
    pub fn label(&self) -> String {
        match self {
            PhaseKind::ClosedLoop { concurrency } => format!("closed c={concurrency}"),
            PhaseKind::Poisson { rate } => format!("poisson {rate}/s"),
        }
    }
}

/// The figures of one phase; latencies in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct PhaseReport {
    #[serde(flatten)]
    pub kind: PhaseKind,
    pub requests_ok: usize,
    pub requests_failed: usize,
    pub duration_s: f64,
    pub output_tokens: u64,
    pub output_tokens_per_s: f64,
    pub requests_per_s: f64,
    pub ttft_ms: Summary,
    pub tpot_ms: Summary,
    pub itl_ms: Summary,
    pub e2e_ms: Summary,
    /// The first failure's message, when any request failed.
    pub first_error: Option<String>,
    /// Shard time per decode step and the router's overhead per token, from
    /// the server's `/metrics` (Tessera servers only).
    pub engine: Option<crate::server_metrics::EngineShare>,
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e3
}

impl PhaseReport {
    pub fn new(
        kind: PhaseKind,
        outcomes: &[Result<RequestRecord, LoadgenError>],
        wall: Duration,
    ) -> Self {
        let ok: Vec<&RequestRecord> = outcomes.iter().filter_map(|o| o.as_ref().ok()).collect();
        let first_error = outcomes
            .iter()
            .find_map(|o| o.as_ref().err())
            .map(ToString::to_string);
        let output_tokens: u64 = ok.iter().map(|r| r.output_tokens).sum();
        let secs = wall.as_secs_f64();
        let per_s = |n: f64| if secs > 0.0 { n / secs } else { 0.0 };
        let ttft: Vec<f64> = ok.iter().map(|r| ms(r.ttft)).collect();
        let tpot: Vec<f64> = ok.iter().filter_map(|r| r.tpot()).map(ms).collect();
        let itl: Vec<f64> = ok
            .iter()
            .flat_map(|r| r.inter_token.iter().copied().map(ms))
            .collect();
        let e2e: Vec<f64> = ok.iter().map(|r| ms(r.e2e)).collect();
        Self {
            kind,
            requests_ok: ok.len(),
            requests_failed: outcomes.len() - ok.len(),
            duration_s: secs,
            output_tokens,
            output_tokens_per_s: per_s(output_tokens as f64),
            requests_per_s: per_s(ok.len() as f64),
            ttft_ms: Summary::of(&ttft),
            tpot_ms: Summary::of(&tpot),
            itl_ms: Summary::of(&itl),
            e2e_ms: Summary::of(&e2e),
            first_error,
            engine: None,
        }
    }

    /// A block of text: a headline and one row per latency metric.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{}: {} ok, {} failed in {:.2} s | {:.1} output tok/s | {:.2} req/s | {} output tokens",
            self.kind.label(),
            self.requests_ok,
            self.requests_failed,
            self.duration_s,
            self.output_tokens_per_s,
            self.requests_per_s,
            self.output_tokens,
        );
        let _ = writeln!(
            out,
            "  {:<6} {:>10} {:>10} {:>10} {:>10}",
            "ms", "p50", "p90", "p99", "mean"
        );
        for (name, summary) in self.metrics() {
            let _ = writeln!(
                out,
                "  {:<6} {:>10} {:>10} {:>10} {:>10}",
                name,
                cell(summary.p50),
                cell(summary.p90),
                cell(summary.p99),
                cell(summary.mean),
            );
        }
        if let Some(e) = &self.engine {
            let _ = writeln!(
                out,
                "  shard: decode step {:.2} ms mean over {} steps ({:.2} ms of prefill per step besides); mean ITL minus decode step (router overhead, plus prefill waits when concurrent) {:.2} ms per token ({:.1}% of mean ITL)",
                e.decode_step_ms,
                e.decode_steps,
                e.prefill_per_step_ms,
                e.overhead_per_token_ms,
                e.overhead_share * 100.0,
            );
        }
        out
    }

    fn metrics(&self) -> [(&'static str, &Summary); 4] {
        [
            ("TTFT", &self.ttft_ms),
            ("TPOT", &self.tpot_ms),
            ("ITL", &self.itl_ms),
            ("E2E", &self.e2e_ms),
        ]
    }
}

fn cell(value: Option<f64>) -> String {
    value.map_or_else(|| "-".to_owned(), |v| format!("{v:.2}"))
}

/// The run's settings, echoed into the JSON so that figures stay readable.
#[derive(Debug, Clone, Serialize)]
pub struct RunSettings {
    pub endpoint: String,
    pub api: ApiKind,
    pub max_tokens: u32,
    pub prompt_lens: Vec<usize>,
    pub shared_prefix: usize,
    pub seed: u64,
    pub warmup: usize,
}

/// Everything a run measured.
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    pub settings: RunSettings,
    pub warmup_failed: usize,
    pub phases: Vec<PhaseReport>,
}

impl RunReport {
    /// One line per phase, for comparing phases at a glance.
    pub fn summary_table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{:<18} {:>6} {:>6} {:>11} {:>8} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
            "phase",
            "ok",
            "failed",
            "out tok/s",
            "req/s",
            "TTFT p50",
            "TTFT p99",
            "TPOT p50",
            "ITL p99",
            "E2E p50",
            "E2E p99"
        );
        for phase in &self.phases {
            let _ = writeln!(
                out,
                "{:<18} {:>6} {:>6} {:>11.1} {:>8.2} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
                phase.kind.label(),
                phase.requests_ok,
                phase.requests_failed,
                phase.output_tokens_per_s,
                phase.requests_per_s,
                cell(phase.ttft_ms.p50),
                cell(phase.ttft_ms.p99),
                cell(phase.tpot_ms.p50),
                cell(phase.itl_ms.p99),
                cell(phase.e2e_ms.p50),
                cell(phase.e2e_ms.p99),
            );
        }
        out
    }

    pub fn to_json(&self) -> Result<String, LoadgenError> {
        Ok(serde_json::to_string_pretty(self)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(tokens: u64, ttft_ms: u64, e2e_ms: u64) -> RequestRecord {
        RequestRecord {
            output_tokens: tokens,
            ttft: Duration::from_millis(ttft_ms),
            e2e: Duration::from_millis(e2e_ms),
            inter_token: vec![Duration::from_millis(10); tokens.saturating_sub(1) as usize],
        }
    }

    #[test]
    fn aggregates_ok_requests_only() {
        let outcomes = vec![
            Ok(record(11, 50, 150)),
            Ok(record(11, 150, 250)),
            Err(LoadgenError::NoTokens),
        ];
        let report = PhaseReport::new(
            PhaseKind::ClosedLoop { concurrency: 2 },
            &outcomes,
            Duration::from_secs(2),
        );
        assert_eq!((report.requests_ok, report.requests_failed), (2, 1));
        assert_eq!(report.output_tokens, 22);
        assert!((report.output_tokens_per_s - 11.0).abs() < 1e-9);
        assert!((report.requests_per_s - 1.0).abs() < 1e-9);
        assert_eq!(report.ttft_ms.p50, Some(100.0));
        assert_eq!(report.tpot_ms.p50, Some(10.0));
        assert_eq!(report.itl_ms.count, 20);
        assert_eq!(
            report.first_error.as_deref(),
            Some("the stream ended without any token")
        );
        let text = report.to_text();
        assert!(text.contains("closed c=2: 2 ok, 1 failed"), "{text}");
        let json: serde_json::Value = serde_json::to_value(&report).unwrap_or_default();
        assert_eq!(json["mode"], "closed_loop");
        assert_eq!(json["concurrency"], 2);
        assert_eq!(json["ttft_ms"]["p50"], 100.0);
    }
}
