//! The server's own view of a phase, from its Prometheus `/metrics`: how long
//! the shards spent per decode step, and in prefill steps. Set against the
//! inter-token latency the clients saw, the decode step gives the router's
//! overhead per generated token (HTTP, validation, batching task, gRPC, SSE)
//! measured in the same run. That is exact with one client; with several, the
//! difference also holds the waits for other requests' prefills between two
//! tokens (shown beside it as prefill time per decode step).

use serde::Serialize;

/// From `tessera_batch_forward_duration_seconds`: the decode series' sum and
/// count, and the prefill series' sum.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct DecodeCounters {
    pub seconds: f64,
    pub steps: f64,
    pub prefill_seconds: f64,
}

/// Reads the step histogram's `_sum`s and decode `_count` from a metrics text.
pub fn parse_decode(text: &str) -> Option<DecodeCounters> {
    let mut sum = None;
    let mut count = None;
    let mut prefill = 0.0;
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let value = line
            .rsplit(' ')
            .next()
            .and_then(|v| v.trim().parse::<f64>().ok());
        let is_sum = line.starts_with("tessera_batch_forward_duration_seconds_sum");
        // Several replicas each have their own series: they are summed.
        if line.contains("phase=\"prefill\"") {
            if is_sum {
                prefill += value.unwrap_or(0.0);
            }
        } else if line.contains("phase=\"decode\"") {
            if is_sum {
                sum = Some(sum.unwrap_or(0.0) + value.unwrap_or(0.0));
            } else if line.starts_with("tessera_batch_forward_duration_seconds_count") {
                count = Some(count.unwrap_or(0.0) + value.unwrap_or(0.0));
            }
        }
    }
    Some(DecodeCounters {
        seconds: sum?,
        steps: count?,
        prefill_seconds: prefill,
    })
}

/// Router overhead per token over one phase.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct EngineShare {
    /// Decode steps the shards ran during the phase.
    pub decode_steps: u64,
    /// Mean shard time per decode step (forward pass, sampling, detokenizing).
    pub decode_step_ms: f64,
    /// Shard time in prefill steps, spread over the decode steps they interrupted.
    pub prefill_per_step_ms: f64,
    /// Mean inter-token latency seen by the clients minus the shard's decode step.
    pub overhead_per_token_ms: f64,
    /// `overhead_per_token_ms` as a share of the inter-token latency.
    pub overhead_share: f64,
}

impl EngineShare {
    pub fn between(
        before: DecodeCounters,
        after: DecodeCounters,
        itl_mean_ms: f64,
    ) -> Option<Self> {
        let steps = after.steps - before.steps;
        if steps < 1.0 || itl_mean_ms <= 0.0 {
            return None;
        }
        let step_ms = (after.seconds - before.seconds) / steps * 1e3;
        let prefill_ms = (after.prefill_seconds - before.prefill_seconds).max(0.0) / steps * 1e3;
        let overhead = itl_mean_ms - step_ms;
        Some(Self {
            decode_steps: steps as u64,
            decode_step_ms: step_ms,
            prefill_per_step_ms: prefill_ms,
            overhead_per_token_ms: overhead,
            overhead_share: overhead / itl_mean_ms,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP tessera_batch_forward_duration_seconds Duration of one shard step
# TYPE tessera_batch_forward_duration_seconds histogram
tessera_batch_forward_duration_seconds_bucket{phase="decode",le="0.001"} 0
tessera_batch_forward_duration_seconds_sum{phase="decode"} 1.5
tessera_batch_forward_duration_seconds_count{phase="decode"} 100
tessera_batch_forward_duration_seconds_sum{phase="prefill"} 9
tessera_batch_forward_duration_seconds_count{phase="prefill"} 3
"#;

    #[test]
    fn reads_the_decode_series_only() {
        let c = parse_decode(TEXT).unwrap();
        assert_eq!(c.seconds, 1.5);
        assert_eq!(c.steps, 100.0);
        assert_eq!(c.prefill_seconds, 9.0);
        assert!(parse_decode("tessera_queue_size 0\n").is_none());
    }

    #[test]
    fn replicas_series_are_summed() {
        let text = r#"tessera_batch_forward_duration_seconds_sum{phase="decode",replica="0"} 1.5
tessera_batch_forward_duration_seconds_count{phase="decode",replica="0"} 100
tessera_batch_forward_duration_seconds_sum{phase="decode",replica="1"} 0.5
tessera_batch_forward_duration_seconds_count{phase="decode",replica="1"} 20
tessera_batch_forward_duration_seconds_sum{phase="prefill",replica="0"} 2
tessera_batch_forward_duration_seconds_sum{phase="prefill",replica="1"} 1
"#;
        let c = parse_decode(text).unwrap();
        assert_eq!(c.seconds, 2.0);
        assert_eq!(c.steps, 120.0);
        assert_eq!(c.prefill_seconds, 3.0);
    }

    #[test]
    fn overhead_is_latency_minus_step_time() {
        let before = DecodeCounters {
            seconds: 1.0,
            steps: 10.0,
            prefill_seconds: 0.5,
        };
        let after = DecodeCounters {
            seconds: 2.0,
            steps: 110.0,
            prefill_seconds: 0.6,
        };
        // 100 steps in 1 s: 10 ms per step (and 0.1 s of prefill, 1 ms per step);
        // clients saw 12 ms between tokens.
        let share = EngineShare::between(before, after, 12.0).unwrap();
        assert_eq!(share.decode_steps, 100);
        assert!((share.decode_step_ms - 10.0).abs() < 1e-9);
        assert!((share.prefill_per_step_ms - 1.0).abs() < 1e-9);
        assert!((share.overhead_per_token_ms - 2.0).abs() < 1e-9);
        assert!((share.overhead_share - 2.0 / 12.0).abs() < 1e-9);
        assert!(EngineShare::between(before, before, 12.0).is_none());
    }
}
