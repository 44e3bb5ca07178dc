//! Sends one streaming request and times its tokens.

use crate::api::{clip, ApiKind};
use crate::error::LoadgenError;
use crate::sse::SseParser;
use futures::StreamExt;
use std::time::{Duration, Instant};

/// Where and how to send requests; cheap to share between tasks.
#[derive(Debug, Clone)]
pub struct Target {
    client: reqwest::Client,
    endpoint: String,
    metrics_url: String,
    api: ApiKind,
    api_key: Option<String>,
    model: Option<String>,
    max_tokens: u32,
}

/// The timings of one successful request.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestRecord {
    /// Output tokens: the server's own count when it reports one, else the
    /// number of token events.
    pub output_tokens: u64,
    /// Send → first token event.
    pub ttft: Duration,
    /// Send → end of stream.
    pub e2e: Duration,
    /// Gaps between consecutive token events.
    pub inter_token: Vec<Duration>,
}

impl RequestRecord {
    /// Time per output token after the first: (e2e - ttft) / (tokens - 1).
    pub fn tpot(&self) -> Option<Duration> {
        let gaps = u32::try_from(self.output_tokens.checked_sub(1)?).ok()?;
        (gaps > 0).then(|| self.e2e.saturating_sub(self.ttft) / gaps)
    }
}

impl Target {
    /// `base_url` is the server root, e.g. `http://127.0.0.1:3000`.
    pub fn new(
        base_url: &str,
        api: ApiKind,
        api_key: Option<String>,
        model: Option<String>,
        max_tokens: u32,
        timeout: Duration,
    ) -> Result<Self, LoadgenError> {
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .no_proxy()
            .build()?;
        Ok(Self {
            client,
            endpoint: format!("{}{}", base_url.trim_end_matches('/'), api.path()),
            metrics_url: format!("{}/metrics", base_url.trim_end_matches('/')),
            api,
            api_key,
            model,
            max_tokens,
        })
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The server's decode-step counters, when it exports Tessera's metrics.
    pub async fn decode_counters(&self) -> Option<crate::server_metrics::DecodeCounters> {
        let mut request = self.client.get(&self.metrics_url);
        if let Some(key) = &self.api_key {
            request = request.bearer_auth(key);
        }
        let text = request.send().await.ok()?.text().await.ok()?;
        crate::server_metrics::parse_decode(&text)
    }

    /// Sends `prompt`, reads the whole stream and returns its timings.
    pub async fn send(&self, prompt: &str) -> Result<RequestRecord, LoadgenError> {
        let body = self
            .api
            .body(prompt, self.max_tokens, self.model.as_deref());
        let mut request = self
            .client
            .post(&self.endpoint)
            .header(reqwest::header::ACCEPT, "text/event-stream")
            .json(&body);
        if let Some(key) = &self.api_key {
            request = request.bearer_auth(key);
        }
        let start = Instant::now();
        let response = request.send().await?;
        let status = response.status();
        if !status.is_success() {
            let body = response.text().await.unwrap_or_default();
            return Err(LoadgenError::Status {
                status: status.as_u16(),
                body: clip(body.trim(), 500),
            });
        }

        let mut stream = response.bytes_stream();
        let mut parser = SseParser::new();
        let mut first: Option<Instant> = None;
        let mut last: Option<Instant> = None;
        let mut inter_token = Vec::new();
        let mut token_events = 0u64;
        let mut reported: Option<u64> = None;
        'stream: while let Some(chunk) = stream.next().await {
            let chunk = chunk?;
            let now = Instant::now();
            for event in parser.feed(&chunk) {
                let item = self.api.interpret(&event)?;
                if item.token_events > 0 {
                    first.get_or_insert(now);
                    if let Some(previous) = last {
                        inter_token.push(now - previous);
                    }
                    last = Some(now);
                    token_events += item.token_events;
                }
                if item.reported_tokens.is_some() {
                    reported = item.reported_tokens;
                }
                if item.done {
                    break 'stream;
                }
            }
        }
        let end = Instant::now();
        let first = first.ok_or(LoadgenError::NoTokens)?;
        Ok(RequestRecord {
            output_tokens: reported.filter(|&n| n > 0).unwrap_or(token_events),
            ttft: first - start,
            e2e: end - start,
            inter_token,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tpot_spreads_decode_time_over_later_tokens() {
        let record = RequestRecord {
            output_tokens: 5,
            ttft: Duration::from_millis(100),
            e2e: Duration::from_millis(500),
            inter_token: Vec::new(),
        };
        assert_eq!(record.tpot(), Some(Duration::from_millis(100)));
        let single = RequestRecord {
            output_tokens: 1,
            ..record
        };
        assert_eq!(single.tpot(), None);
    }
}
