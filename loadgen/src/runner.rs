//! Offers load phase by phase: closed loops and Poisson arrivals.

use crate::api::ApiKind;
use crate::arrivals::PoissonArrivals;
use crate::client::{RequestRecord, Target};
use crate::error::LoadgenError;
use crate::prompt::PromptFactory;
use crate::report::{PhaseKind, PhaseReport, RunReport, RunSettings};
use crate::server_metrics::EngineShare;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

type Outcome = Result<RequestRecord, LoadgenError>;

/// Everything one run needs; built from the command line.
#[derive(Debug, Clone)]
pub struct RunConfig {
    pub url: String,
    pub api: ApiKind,
    pub api_key: Option<String>,
    pub model: Option<String>,
    /// One closed-loop phase per value (used when `rates` is empty).
    pub concurrency: Vec<usize>,
    /// One Poisson phase per value, in requests per second.
    pub rates: Vec<f64>,
    /// Requests per phase; derived from the load when neither this nor
    /// `duration` is set.
    pub requests: Option<usize>,
    /// Stop starting requests after this long in each phase.
    pub duration: Option<Duration>,
    pub warmup: usize,
    pub prompt_lens: Vec<usize>,
    /// Words every prompt starts with.
    pub shared_prefix: usize,
    pub max_tokens: u32,
    pub seed: u64,
    pub timeout: Duration,
}

impl RunConfig {
    /// Rejects settings that cannot run.
    pub fn validate(&self) -> Result<(), LoadgenError> {
        let bad = |msg: &str| Err(LoadgenError::Config(msg.to_owned()));
        if self.rates.is_empty() && self.concurrency.is_empty() {
            return bad("give at least one --concurrency or --rate value");
        }
        if self.concurrency.contains(&0) {
            return bad("--concurrency values must be at least 1");
        }
        if self.rates.iter().any(|r| !r.is_finite() || *r <= 0.0) {
            return bad("--rate values must be positive");
        }
        if self.prompt_lens.is_empty() {
            return bad("--prompt-lens needs at least one length");
        }
        if self.max_tokens == 0 {
            return bad("--max-tokens must be at least 1");
        }
        if self.requests == Some(0) {
            return bad("--requests must be at least 1");
        }
        if self.duration.is_some_and(|d| d.is_zero()) {
            return bad("--duration must be positive");
        }
        if self.timeout.is_zero() {
            return bad("--timeout must be positive");
        }
        if !self.url.starts_with("http://") {
            return bad("--url must start with http:// (built without TLS)");
        }
        Ok(())
    }

    /// The phases in order: the Poisson rates when given, else the
    /// closed-loop concurrencies.
    pub fn phases(&self) -> Vec<PhaseKind> {
        if self.rates.is_empty() {
            self.concurrency
                .iter()
                .map(|&concurrency| PhaseKind::ClosedLoop { concurrency })
                .collect()
        } else {
            self.rates
                .iter()
                .map(|&rate| PhaseKind::Poisson { rate })
                .collect()
        }
    }

    /// The request budget of a phase: `--requests`, else unlimited under
    /// `--duration`, else 4 × concurrency (closed loop) or about 10 s of
    /// arrivals (Poisson), at least 8.
    pub fn budget(&self, kind: PhaseKind) -> Option<u64> {
        if let Some(requests) = self.requests {
            return Some(requests as u64);
        }
        if self.duration.is_some() {
            return None;
        }
        let derived = match kind {
            PhaseKind::ClosedLoop { concurrency } => concurrency.saturating_mul(4) as u64,
            PhaseKind::Poisson { rate } => (rate * 10.0).ceil() as u64,
        };
        Some(derived.max(8))
    }
}

/// Prompts of the warm-up come from a separate index range.
const WARMUP_INDEX_BASE: u64 = 1 << 62;

/// Runs the warm-up and every phase; `on_phase` sees each phase as it ends.
pub async fn run(
    config: &RunConfig,
    mut on_phase: impl FnMut(&PhaseReport),
) -> Result<RunReport, LoadgenError> {
    config.validate()?;
    let target = Arc::new(Target::new(
        &config.url,
        config.api,
        config.api_key.clone(),
        config.model.clone(),
        config.max_tokens,
        config.timeout,
    )?);
    let prompts = Arc::new(
        PromptFactory::new(config.prompt_lens.clone(), config.seed)
            .with_shared_prefix(config.shared_prefix),
    );
    let phases = config.phases();

    let mut warmup_failed = 0;
    if config.warmup > 0 {
        let widest = config.concurrency.iter().copied().max().unwrap_or(8);
        let load = Load {
            target: Arc::clone(&target),
            prompts: Arc::clone(&prompts),
            first_index: WARMUP_INDEX_BASE,
            budget: Some(config.warmup as u64),
            deadline: None,
        };
        let outcomes = closed_loop(load, widest.min(config.warmup)).await;
        warmup_failed = outcomes.iter().filter(|o| o.is_err()).count();
    }

    let mut reports = Vec::with_capacity(phases.len());
    let mut next_index = 0u64;
    for (phase_number, &kind) in phases.iter().enumerate() {
        let counters_before = target.decode_counters().await;
        let start = Instant::now();
        let load = Load {
            target: Arc::clone(&target),
            prompts: Arc::clone(&prompts),
            first_index: next_index,
            budget: config.budget(kind),
            deadline: config.duration.map(|d| start + d),
        };
        let outcomes = match kind {
            PhaseKind::ClosedLoop { concurrency } => closed_loop(load, concurrency).await,
            PhaseKind::Poisson { rate } => {
                let seed = config.seed.wrapping_add(phase_number as u64);
                poisson(load, PoissonArrivals::new(rate, seed)).await
            }
        };
        next_index += outcomes.len() as u64;
        let mut report = PhaseReport::new(kind, &outcomes, start.elapsed());
        if let (Some(before), Some(after), Some(itl)) = (
            counters_before,
            target.decode_counters().await,
            report.itl_ms.mean,
        ) {
            report.engine = EngineShare::between(before, after, itl);
        }
        on_phase(&report);
        reports.push(report);
    }

    Ok(RunReport {
        settings: RunSettings {
            endpoint: target.endpoint().to_owned(),
            api: config.api,
            max_tokens: config.max_tokens,
            prompt_lens: config.prompt_lens.clone(),
            shared_prefix: config.shared_prefix,
            seed: config.seed,
            warmup: config.warmup,
        },
        warmup_failed,
        phases: reports,
    })
}

/// What a phase sends and when it stops.
struct Load {
    target: Arc<Target>,
    prompts: Arc<PromptFactory>,
    first_index: u64,
    budget: Option<u64>,
    deadline: Option<Instant>,
}

impl Load {
    fn may_start(&self, issued: u64, at: Instant) -> bool {
        self.budget.is_none_or(|b| issued < b) && self.deadline.is_none_or(|d| at < d)
    }
}

/// `concurrency` clients, each sending back to back until the budget or the
/// deadline is spent; returns one outcome per request sent.
async fn closed_loop(load: Load, concurrency: usize) -> Vec<Outcome> {
    let load = Arc::new(load);
    let issued = Arc::new(AtomicU64::new(0));
    let clients: Vec<_> = (0..concurrency)
        .map(|_| {
            let load = Arc::clone(&load);
            let issued = Arc::clone(&issued);
            tokio::spawn(async move {
                let mut outcomes = Vec::new();
                loop {
                    let n = issued.fetch_add(1, Ordering::Relaxed);
                    if !load.may_start(n, Instant::now()) {
                        break;
                    }
                    let prompt = load.prompts.prompt(load.first_index + n);
                    outcomes.push(load.target.send(&prompt).await);
                }
                outcomes
            })
        })
        .collect();
    futures::future::join_all(clients)
        .await
        .into_iter()
        .filter_map(Result::ok)
        .flatten()
        .collect()
}

/// Starts each request at its Poisson arrival time, however many are in
/// flight; returns one outcome per request sent.
async fn poisson(load: Load, mut arrivals: PoissonArrivals) -> Vec<Outcome> {
    let load = Arc::new(load);
    let mut requests = Vec::new();
    let mut at = Instant::now();
    for n in 0.. {
        at += arrivals.next_gap();
        if !load.may_start(n, at) {
            break;
        }
        tokio::time::sleep_until(at).await;
        let load = Arc::clone(&load);
        requests.push(tokio::spawn(async move {
            let prompt = load.prompts.prompt(load.first_index + n);
            load.target.send(&prompt).await
        }));
    }
    futures::future::join_all(requests)
        .await
        .into_iter()
        .filter_map(Result::ok)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> RunConfig {
        RunConfig {
            url: "http://127.0.0.1:3000".into(),
            api: ApiKind::Openai,
            api_key: None,
            model: None,
            concurrency: vec![1, 8, 32],
            rates: Vec::new(),
            requests: None,
            duration: None,
            warmup: 0,
            prompt_lens: vec![32],
            shared_prefix: 0,
            max_tokens: 8,
            seed: 0,
            timeout: Duration::from_secs(10),
        }
    }

    #[test]
    fn budgets_follow_the_load() {
        let mut c = config();
        assert_eq!(c.budget(PhaseKind::ClosedLoop { concurrency: 1 }), Some(8));
        assert_eq!(
            c.budget(PhaseKind::ClosedLoop { concurrency: 32 }),
            Some(128)
        );
        assert_eq!(c.budget(PhaseKind::Poisson { rate: 5.0 }), Some(50));
        c.duration = Some(Duration::from_secs(5));
        assert_eq!(c.budget(PhaseKind::ClosedLoop { concurrency: 32 }), None);
        c.requests = Some(20);
        assert_eq!(c.budget(PhaseKind::Poisson { rate: 5.0 }), Some(20));
    }

    #[test]
    fn rates_replace_the_closed_loop() {
        let mut c = config();
        assert_eq!(c.phases().len(), 3);
        c.rates = vec![2.0];
        assert_eq!(c.phases(), vec![PhaseKind::Poisson { rate: 2.0 }]);
    }

    #[test]
    fn rejects_unrunnable_settings() {
        assert!(config().validate().is_ok());
        let mut c = config();
        c.concurrency = vec![0];
        assert!(c.validate().is_err());
        let mut c = config();
        c.rates = vec![-1.0];
        assert!(c.validate().is_err());
        let mut c = config();
        c.url = "localhost:3000".into();
        assert!(c.validate().is_err());
        c.url = "https://example.com".into();
        assert!(c.validate().is_err());
    }
}
