//! Per-request Prometheus bookkeeping: one [`RequestMetrics`] per HTTP
//! request records its outcome exactly once (`cancelled` when dropped early).

use std::time::Instant;

use crate::metrics::Metrics;

/// What a finished generation reports to the metrics.
#[derive(Debug, Clone, Copy)]
pub struct GenerationStats {
    pub input_tokens: u32,
    pub generated_tokens: u32,
    /// When the (first) sequence entered the queue and started prefill.
    pub queued: Instant,
    pub start: Instant,
}

pub struct RequestMetrics {
    metrics: Metrics,
    arrival: Instant,
    first_token: Option<Instant>,
    finished: bool,
}

impl RequestMetrics {
    pub fn start(metrics: &Metrics) -> Self {
        Self {
            metrics: metrics.clone(),
            arrival: Instant::now(),
            first_token: None,
            finished: false,
        }
    }

    /// Moves the tracking into a new value (for a task that finishes the
    /// request later); `self` then records nothing.
    pub fn hand_over(&mut self) -> RequestMetrics {
        let live = RequestMetrics {
            metrics: self.metrics.clone(),
            arrival: self.arrival,
            first_token: self.first_token,
            finished: self.finished,
        };
        self.finished = true;
        live
    }

    pub fn arrival(&self) -> Instant {
        self.arrival
    }

    /// Validation (and tokenization) is done.
    pub fn validated(&self) {
        self.metrics
            .validation_duration
            .observe(self.arrival.elapsed().as_secs_f64());
    }

    /// A token arrived now; the first one sets the time to first token.
    pub fn token(&mut self) {
        self.token_at(Instant::now());
    }

    /// A token arrived at `at`; only the first call counts.
    pub fn token_at(&mut self, at: Instant) {
        if self.first_token.is_none() {
            self.first_token = Some(at);
            self.metrics
                .time_to_first_token
                .observe(at.saturating_duration_since(self.arrival).as_secs_f64());
        }
    }

    pub fn success(&mut self, stats: GenerationStats) {
        if self.finished {
            return;
        }
        self.finished = true;
        let now = Instant::now();
        let m = &self.metrics;
        m.requests.with_label_values(&["success"]).inc();
        m.request_duration
            .observe(now.duration_since(self.arrival).as_secs_f64());
        m.queue_duration.observe(
            stats
                .start
                .saturating_duration_since(stats.queued)
                .as_secs_f64(),
        );
        m.inference_duration
            .observe(now.saturating_duration_since(stats.start).as_secs_f64());
        m.input_tokens.observe(f64::from(stats.input_tokens));
        m.generated_tokens
            .observe(f64::from(stats.generated_tokens));
        if let Some(first) = self.first_token {
            if stats.generated_tokens > 1 {
                let per_token =
                    now.duration_since(first).as_secs_f64() / f64::from(stats.generated_tokens - 1);
                m.time_per_output_token.observe(per_token);
            }
        }
    }

    /// The HTTP answer of a handler's work: a failure is recorded under its
    /// error type and answered with its status and error body.
    pub fn respond(
        &mut self,
        result: Result<axum::response::Response, crate::http::error::ApiError>,
    ) -> axum::response::Response {
        match result {
            Ok(response) => response,
            Err(error) => {
                self.failure(error.error_type);
                axum::response::IntoResponse::into_response(error)
            }
        }
    }

    pub fn failure(&mut self, error_type: &str) {
        if self.finished {
            return;
        }
        self.finished = true;
        self.metrics.requests.with_label_values(&[error_type]).inc();
    }
}

impl Drop for RequestMetrics {
    fn drop(&mut self) {
        if !self.finished {
            self.metrics
                .requests
                .with_label_values(&["cancelled"])
                .inc();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_one_outcome() {
        let metrics = Metrics::new();
        {
            let mut r = RequestMetrics::start(&metrics);
            r.validated();
            r.token();
            r.token();
            let now = Instant::now();
            r.success(GenerationStats {
                input_tokens: 3,
                generated_tokens: 2,
                queued: now,
                start: now,
            });
            r.failure("validation");
        }
        {
            let mut r = RequestMetrics::start(&metrics);
            r.failure("validation");
        }
        drop(RequestMetrics::start(&metrics));
        let count = |o: &str| metrics.requests.with_label_values(&[o]).get();
        assert_eq!(
            (count("success"), count("validation"), count("cancelled")),
            (1, 1, 1)
        );
        assert_eq!(metrics.time_to_first_token.get_sample_count(), 1);
        assert_eq!(metrics.time_per_output_token.get_sample_count(), 1);
        assert_eq!(metrics.generated_tokens.get_sample_sum(), 2.0);
    }
}
