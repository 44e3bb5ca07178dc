//! Prometheus metrics of the router, on `GET /metrics` (`tessera_` prefix,
//! base units in names). Series about one replica group (its queue, batch, KV
//! blocks, shard steps and health) carry a `replica` label: the group's index
//! in `--shard-uri`, "0", "1", ...

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Buckets for latencies of LLM requests: from 1 ms to 10 minutes.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0, 600.0,
];
/// Buckets for token counts per request.
const TOKEN_BUCKETS: &[f64] = &[
    1.0, 4.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0,
];

#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// Finished requests by outcome (`success` or the error type).
    pub requests: IntCounterVec,
    pub request_duration: Histogram,
    pub queue_duration: Histogram,
    pub validation_duration: Histogram,
    pub inference_duration: Histogram,
    pub time_to_first_token: Histogram,
    pub time_per_output_token: Histogram,
    pub input_tokens: Histogram,
    pub generated_tokens: Histogram,
    /// Requests waiting for prefill, by replica.
    pub queue_size: IntGaugeVec,
    /// Requests in the running batch, by replica.
    pub batch_size: IntGaugeVec,
    /// Duration of one shard step, by phase (`prefill`, `decode`) and replica.
    pub forward_duration: HistogramVec,
    /// Forward pass and sampling of one step as each shard rank timed it, by phase,
    /// replica and rank.
    pub rank_forward_duration: HistogramVec,
    /// KV blocks held by running requests, by replica.
    pub kv_blocks_used: IntGaugeVec,
    /// KV blocks free, by replica.
    pub kv_blocks_free: IntGaugeVec,
    /// 1 while the replica's shard group answers health checks.
    pub shard_healthy: IntGaugeVec,
    /// Requests (one per sequence of `n`/`best_of`) dispatched to each replica.
    pub replica_requests: IntCounterVec,
    /// Prompt tokens of admitted requests, by replica.
    pub prefix_cache_queries: IntCounterVec,
    /// Of those, tokens whose keys and values came from the prefix cache, by replica.
    pub prefix_cache_hits: IntCounterVec,
    /// Cached prefix blocks nobody holds (reusable, and free), by replica.
    pub kv_blocks_cached: IntGaugeVec,
}

/// One replica's series, resolved once (label lookups stay off the hot path).
#[derive(Clone)]
pub struct ReplicaMetrics {
    pub queue_size: IntGauge,
    pub batch_size: IntGauge,
    pub prefill_duration: Histogram,
    pub decode_duration: Histogram,
    pub kv_blocks_used: IntGauge,
    pub kv_blocks_free: IntGauge,
    pub shard_healthy: IntGauge,
    pub requests: IntCounter,
    pub prefix_cache_queries: IntCounter,
    pub prefix_cache_hits: IntCounter,
    pub kv_blocks_cached: IntGauge,
    /// Per rank: the prefill and decode series of `tessera_shard_forward_duration_seconds`.
    pub rank_prefill: Vec<Histogram>,
    pub rank_decode: Vec<Histogram>,
}

fn histogram(name: &str, help: &str, buckets: &[f64]) -> Histogram {
    Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec()))
        .unwrap_or_else(|e| panic!("metric {name}: {e}"))
}

impl Metrics {
    /// Builds and registers every metric. Panics only on a programming error
    /// (an invalid or duplicate metric name), never on input.
    pub fn new() -> Self {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "tessera_requests_total",
                "Requests finished, by outcome (success or error type)",
            ),
            &["outcome"],
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let forward_duration = HistogramVec::new(
            HistogramOpts::new(
                "tessera_batch_forward_duration_seconds",
                "Duration of one shard step (forward pass and sampling), by phase and replica",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["phase", "replica"],
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let rank_forward_duration = HistogramVec::new(
            HistogramOpts::new(
                "tessera_shard_forward_duration_seconds",
                "Forward pass and sampling of one step as each shard rank timed it, by phase, replica and rank",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["phase", "replica", "rank"],
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let per_replica = |name: &str, help: &str| {
            IntGaugeVec::new(Opts::new(name, help), &["replica"])
                .unwrap_or_else(|e| panic!("metric {name}: {e}"))
        };
        let replica_requests = IntCounterVec::new(
            Opts::new(
                "tessera_replica_requests_total",
                "Requests dispatched to each replica (shard group), one per sequence of n or best_of",
            ),
            &["replica"],
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let per_replica_counter = |name: &str, help: &str| {
            IntCounterVec::new(Opts::new(name, help), &["replica"])
                .unwrap_or_else(|e| panic!("metric {name}: {e}"))
        };
        let prefix_cache_queries = per_replica_counter(
            "tessera_prefix_cache_queries_tokens_total",
            "Prompt tokens of admitted requests, looked up in the prefix cache, by replica",
        );
        let prefix_cache_hits = per_replica_counter(
            "tessera_prefix_cache_hits_tokens_total",
            "Prompt tokens whose keys and values came from the prefix cache, by replica",
        );
        let metrics = Metrics {
            requests,
            request_duration: histogram(
                "tessera_request_duration_seconds",
                "End-to-end duration of a request, from arrival to last token",
                LATENCY_BUCKETS,
            ),
            queue_duration: histogram(
                "tessera_request_queue_duration_seconds",
                "Time a request waited in the queue before its prefill",
                LATENCY_BUCKETS,
            ),
            validation_duration: histogram(
                "tessera_request_validation_duration_seconds",
                "Time spent validating and tokenizing a request",
                LATENCY_BUCKETS,
            ),
            inference_duration: histogram(
                "tessera_request_inference_duration_seconds",
                "Time from a request's prefill to its last token",
                LATENCY_BUCKETS,
            ),
            time_to_first_token: histogram(
                "tessera_request_time_to_first_token_seconds",
                "Time from arrival to the first generated token",
                LATENCY_BUCKETS,
            ),
            time_per_output_token: histogram(
                "tessera_request_time_per_output_token_seconds",
                "Mean time between generated tokens of a request, after the first",
                LATENCY_BUCKETS,
            ),
            input_tokens: histogram(
                "tessera_request_input_tokens",
                "Prompt tokens per request",
                TOKEN_BUCKETS,
            ),
            generated_tokens: histogram(
                "tessera_request_generated_tokens",
                "Generated tokens per request",
                TOKEN_BUCKETS,
            ),
            queue_size: per_replica(
                "tessera_queue_size",
                "Requests waiting for prefill, by replica",
            ),
            batch_size: per_replica(
                "tessera_batch_current_size",
                "Requests in the running batch, by replica",
            ),
            forward_duration,
            rank_forward_duration,
            kv_blocks_used: per_replica(
                "tessera_kv_cache_blocks_used",
                "KV cache blocks held by running requests, by replica",
            ),
            kv_blocks_free: per_replica(
                "tessera_kv_cache_blocks_free",
                "KV cache blocks free, by replica",
            ),
            shard_healthy: per_replica(
                "tessera_shard_healthy",
                "1 while the replica's shard group answers health checks, else 0",
            ),
            replica_requests,
            prefix_cache_queries,
            prefix_cache_hits,
            kv_blocks_cached: per_replica(
                "tessera_kv_cache_blocks_cached",
                "KV cache blocks holding a cached prompt prefix that no request holds (reusable; counted as free), by replica",
            ),
            registry,
        };
        metrics.register_all();
        metrics
    }

    fn register_all(&self) {
        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(self.requests.clone()),
            Box::new(self.request_duration.clone()),
            Box::new(self.queue_duration.clone()),
            Box::new(self.validation_duration.clone()),
            Box::new(self.inference_duration.clone()),
            Box::new(self.time_to_first_token.clone()),
            Box::new(self.time_per_output_token.clone()),
            Box::new(self.input_tokens.clone()),
            Box::new(self.generated_tokens.clone()),
            Box::new(self.queue_size.clone()),
            Box::new(self.batch_size.clone()),
            Box::new(self.forward_duration.clone()),
            Box::new(self.rank_forward_duration.clone()),
            Box::new(self.kv_blocks_used.clone()),
            Box::new(self.kv_blocks_free.clone()),
            Box::new(self.shard_healthy.clone()),
            Box::new(self.replica_requests.clone()),
            Box::new(self.prefix_cache_queries.clone()),
            Box::new(self.prefix_cache_hits.clone()),
            Box::new(self.kv_blocks_cached.clone()),
        ];
        for c in collectors {
            if let Err(e) = self.registry.register(c) {
                panic!("registering a metric: {e}");
            }
        }
    }

    /// The series of replica `index`; from now on they are exposed (at 0).
    pub fn replica(&self, index: usize) -> ReplicaMetrics {
        let label = index.to_string();
        let replica = [label.as_str()];
        ReplicaMetrics {
            queue_size: self.queue_size.with_label_values(&replica),
            batch_size: self.batch_size.with_label_values(&replica),
            prefill_duration: self
                .forward_duration
                .with_label_values(&["prefill", label.as_str()]),
            decode_duration: self
                .forward_duration
                .with_label_values(&["decode", label.as_str()]),
            kv_blocks_used: self.kv_blocks_used.with_label_values(&replica),
            kv_blocks_free: self.kv_blocks_free.with_label_values(&replica),
            shard_healthy: self.shard_healthy.with_label_values(&replica),
            requests: self.replica_requests.with_label_values(&replica),
            prefix_cache_queries: self.prefix_cache_queries.with_label_values(&replica),
            prefix_cache_hits: self.prefix_cache_hits.with_label_values(&replica),
            kv_blocks_cached: self.kv_blocks_cached.with_label_values(&replica),
            rank_prefill: Vec::new(),
            rank_decode: Vec::new(),
        }
    }

    /// [`replica`](Self::replica) with the per-rank series of its `ranks` ranks.
    pub fn replica_ranks(&self, index: usize, ranks: usize) -> ReplicaMetrics {
        let label = index.to_string();
        let series = |phase: &str| -> Vec<Histogram> {
            (0..ranks)
                .map(|r| {
                    self.rank_forward_duration.with_label_values(&[
                        phase,
                        label.as_str(),
                        r.to_string().as_str(),
                    ])
                })
                .collect()
        };
        ReplicaMetrics {
            rank_prefill: series("prefill"),
            rank_decode: series("decode"),
            ..self.replica(index)
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let encoder = TextEncoder::new();
        if let Err(e) = encoder.encode(&self.registry.gather(), &mut buf) {
            tracing::error!("encoding metrics: {e}");
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replica_series_carry_the_replica_label() {
        let metrics = Metrics::new();
        let r1 = metrics.replica(1);
        r1.queue_size.set(3);
        r1.requests.inc();
        let ranks = metrics.replica_ranks(1, 2);
        ranks.rank_decode[1].observe(0.02);
        let text = metrics.render();
        assert!(text.contains(
            "tessera_shard_forward_duration_seconds_count{phase=\"decode\",rank=\"1\",replica=\"1\"} 1"
        ));
        assert!(text.contains(
            "tessera_shard_forward_duration_seconds_count{phase=\"prefill\",rank=\"0\",replica=\"1\"} 0"
        ));
        r1.decode_duration.observe(0.01);
        metrics.replica(0).shard_healthy.set(1);
        let text = metrics.render();
        for line in [
            "tessera_queue_size{replica=\"1\"} 3",
            "tessera_replica_requests_total{replica=\"1\"} 1",
            "tessera_batch_forward_duration_seconds_count{phase=\"decode\",replica=\"1\"} 1",
            "tessera_shard_healthy{replica=\"0\"} 1",
            "tessera_kv_cache_blocks_free{replica=\"0\"} 0",
            "# HELP tessera_replica_requests_total Requests dispatched",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
    }
}
