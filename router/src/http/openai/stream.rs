//! The streaming side of both OpenAI routes: merges the choices' token
//! streams, holds back possible stop sequences, and writes chunks through a
//! [`ChunkWriter`] (chat or text completion), then the usage chunk and `[DONE]`.

use std::collections::HashMap;
use std::time::Instant;

use axum::body::Bytes;
use axum::response::Response;
use futures::StreamExt;
use tracing::Instrument;

use super::common::TokenWithTop;
use super::schema::{cached_prompt_tokens, Usage};
use crate::http::error::ApiError;
use crate::http::request_metrics::{GenerationStats, RequestMetrics};
use crate::http::sse::{done_event, error_event, sse_channel, SseSender};
use crate::http::stop::StopTrimmer;
use crate::infer::{FinishReason, InferError, InferStream, InferStreamResponse, PromptLogprobs};

/// Formats the chunks of one route.
pub trait ChunkWriter: Send + 'static {
    /// Sent for every choice before its tokens (chat: the assistant role;
    /// completions: the echoed prompt).
    fn opening(&mut self, index: u32) -> Option<Bytes>;
    /// Text of choice `index`; `finish_reason` only in its last chunk.
    fn delta(
        &mut self,
        index: u32,
        text: String,
        tokens: Vec<TokenWithTop>,
        finish_reason: Option<FinishReason>,
    ) -> Bytes;
    fn usage(&mut self, usage: Usage) -> Bytes;
    /// The prompt's log-probabilities of choice `index`, which come before its first
    /// token when the request asked for them (completions: the echoed prompt).
    fn prompt(&mut self, _index: u32, _logprobs: PromptLogprobs) -> Option<Bytes> {
        None
    }
}

/// One choice's token stream.
pub struct ChoiceStream {
    pub index: u32,
    pub stream: InferStream,
}

pub struct StreamPlan {
    pub choices: Vec<ChoiceStream>,
    pub stop_sequences: Vec<String>,
    /// Report logprobs (keep the tokens for the chunks).
    pub logprobs: bool,
    pub include_usage: bool,
    /// Prompt tokens of the whole request (each prompt counted once).
    pub prompt_tokens: u32,
    /// Consecutive choices per prompt (`n`).
    pub copies: usize,
}

/// Starts the stream task and returns the SSE response.
pub fn spawn_stream<W: ChunkWriter>(
    plan: StreamPlan,
    writer: W,
    metrics: RequestMetrics,
) -> Response {
    let (tx, response) = sse_channel();
    let task = StreamTask {
        tx,
        writer,
        metrics,
        logprobs: plan.logprobs,
        include_usage: plan.include_usage,
        prompt_tokens: plan.prompt_tokens,
        copies: plan.copies,
    };
    tokio::spawn(
        task.run(plan.choices, plan.stop_sequences)
            .instrument(tracing::Span::current()),
    );
    response
}

struct ChoiceState {
    trimmer: StopTrimmer,
    tokens: Vec<TokenWithTop>,
}

struct StreamTask<W> {
    tx: SseSender,
    writer: W,
    metrics: RequestMetrics,
    logprobs: bool,
    include_usage: bool,
    prompt_tokens: u32,
    copies: usize,
}

impl<W: ChunkWriter> StreamTask<W> {
    async fn run(mut self, choices: Vec<ChoiceStream>, stops: Vec<String>) {
        let mut states: HashMap<u32, ChoiceState> = HashMap::new();
        let indices: Vec<u32> = choices.iter().map(|c| c.index).collect();
        for index in indices {
            states.insert(
                index,
                ChoiceState {
                    trimmer: StopTrimmer::new(&stops),
                    tokens: Vec::new(),
                },
            );
            if let Some(frame) = self.writer.opening(index) {
                if !self.tx.send(frame).await {
                    return;
                }
            }
        }
        let mut remaining = choices.len();
        let mut merged = futures::stream::select_all(
            choices
                .into_iter()
                .map(|c| c.stream.map(move |event| (c.index, event))),
        );
        let mut completion_tokens = 0u32;
        let mut cached = vec![0u32; remaining];
        let mut times: Option<(Instant, Instant)> = None;
        while remaining > 0 {
            let next = tokio::select! {
                next = merged.next() => next,
                // The client left: dropping the streams cancels the requests.
                _ = self.tx.closed() => return,
            };
            let (index, event) = match next {
                Some((index, Ok(event))) => (index, event),
                Some((_, Err(error))) => return self.fail(error).await,
                None => return self.fail(InferError::IncompleteGeneration).await,
            };
            let Some(state) = states.get_mut(&index) else {
                continue;
            };
            if let InferStreamResponse::Prompt(logprobs) = event {
                if let Some(frame) = self.writer.prompt(index, logprobs) {
                    if !self.tx.send(frame).await {
                        return;
                    }
                }
                continue;
            }
            self.metrics.token();
            let frame = match event {
                InferStreamResponse::Prompt(_) => continue,
                InferStreamResponse::Intermediate { token, top_tokens } => {
                    if token.special {
                        continue;
                    }
                    let text = state.trimmer.push(&token.text);
                    if self.logprobs {
                        state.tokens.push((token, top_tokens));
                    }
                    if text.is_empty() {
                        continue;
                    }
                    self.writer
                        .delta(index, text, std::mem::take(&mut state.tokens), None)
                }
                InferStreamResponse::End {
                    token,
                    top_tokens,
                    generated_text,
                    queued,
                    start,
                } => {
                    let last_text = if token.special {
                        ""
                    } else {
                        token.text.as_str()
                    };
                    let text = state
                        .trimmer
                        .finish(last_text, generated_text.finish_reason);
                    if self.logprobs && !token.special {
                        state.tokens.push((token.clone(), top_tokens));
                    }
                    completion_tokens += generated_text.generated_tokens;
                    if let Some(c) = cached.get_mut(index as usize) {
                        *c = generated_text.cached_tokens;
                    }
                    times = Some(match times {
                        Some((q, s)) => (q.min(queued), s.min(start)),
                        None => (queued, start),
                    });
                    remaining -= 1;
                    self.writer.delta(
                        index,
                        text,
                        std::mem::take(&mut state.tokens),
                        Some(generated_text.finish_reason),
                    )
                }
            };
            if !self.tx.send(frame).await {
                return;
            }
        }
        if self.include_usage {
            let usage = Usage::new(self.prompt_tokens, completion_tokens)
                .with_cached(cached_prompt_tokens(&cached, self.copies));
            let frame = self.writer.usage(usage);
            if !self.tx.send(frame).await {
                return;
            }
        }
        if let Some((queued, start)) = times {
            self.metrics.success(GenerationStats {
                input_tokens: self.prompt_tokens,
                generated_tokens: completion_tokens,
                queued,
                start,
            });
        }
        self.tx.send(done_event()).await;
    }

    async fn fail(mut self, error: InferError) {
        tracing::warn!("generation failed mid-stream: {error}");
        self.metrics.failure(error.error_type());
        let api = ApiError::from(error);
        if self.tx.send(error_event(&api.body())).await {
            self.tx.send(done_event()).await;
        }
    }
}
