//! `POST /generate_stream`: one SSE event per token, the last one with the
//! whole text and details; errors after the start are error events.

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use tracing::Instrument;

use super::schema::{GenerateRequest, StreamDetails, StreamResponse, TokenInfo};
use super::{full_text, prepare};
use crate::http::error::{ApiError, ErrorBody};
use crate::http::extract::JsonBody;
use crate::http::request_metrics::{GenerationStats, RequestMetrics};
use crate::http::sse::{data_event, error_event, sse_channel, SseSender};
use crate::http::AppState;
use crate::infer::{InferError, InferStream, InferStreamResponse};

#[utoipa::path(
    post,
    path = "/generate_stream",
    tag = "TGI",
    request_body = GenerateRequest,
    responses(
        (status = 200, description = "Server-sent events, one per token", body = StreamResponse, content_type = "text/event-stream"),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 422, description = "Invalid request", body = ErrorBody),
        (status = 429, description = "Too many requests", body = ErrorBody),
        (status = 503, description = "Model not ready", body = ErrorBody),
    )
)]
#[tracing::instrument(skip_all)]
pub async fn generate_stream(
    State(state): State<AppState>,
    body: Result<JsonBody<GenerateRequest>, ApiError>,
) -> Response {
    let mut metrics = RequestMetrics::start(&state.metrics);
    let started = async {
        let JsonBody(body) = body?;
        let prepared = prepare(&state, body, true).await?;
        metrics.validated();
        let input_length = prepared.request.input_ids.len() as u32;
        let stream = state.infer.generate_stream(prepared.request)?;
        Ok::<_, ApiError>((stream, input_length, prepared.prefix))
    }
    .await;
    match started {
        Ok((stream, input_length, prefix)) => {
            let (tx, response) = sse_channel();
            let task = StreamTask {
                tx,
                metrics,
                input_length,
                prefix,
            };
            tokio::spawn(task.run(stream).instrument(tracing::Span::current()));
            response
        }
        Err(error) => {
            metrics.failure(error.error_type);
            error.into_response()
        }
    }
}

struct StreamTask {
    tx: SseSender,
    metrics: RequestMetrics,
    input_length: u32,
    prefix: Option<String>,
}

impl StreamTask {
    async fn run(mut self, mut stream: InferStream) {
        let mut index = 0u32;
        loop {
            let event = tokio::select! {
                event = stream.next() => event,
                // The client left: dropping the stream cancels the request.
                _ = self.tx.closed() => return,
            };
            let event = match event {
                Some(Ok(event)) => event,
                Some(Err(error)) => return self.fail(error).await,
                None => return self.fail(InferError::IncompleteGeneration).await,
            };
            if let InferStreamResponse::Prompt(_) = event {
                // Not asked for: TGI refuses `decoder_input_details` when streaming.
                continue;
            }
            index += 1;
            self.metrics.token();
            let (frame, end) = match event {
                InferStreamResponse::Prompt(_) => continue,
                InferStreamResponse::Intermediate { token, top_tokens } => (
                    StreamResponse {
                        index,
                        token: TokenInfo::from(&token),
                        top_tokens: top_tokens.iter().map(TokenInfo::from).collect(),
                        generated_text: None,
                        details: None,
                    },
                    None,
                ),
                InferStreamResponse::End {
                    token,
                    top_tokens,
                    generated_text,
                    queued,
                    start,
                } => (
                    StreamResponse {
                        index,
                        token: TokenInfo::from(&token),
                        top_tokens: top_tokens.iter().map(TokenInfo::from).collect(),
                        generated_text: Some(full_text(
                            self.prefix.as_deref(),
                            &generated_text.text,
                        )),
                        details: Some(StreamDetails {
                            finish_reason: generated_text.finish_reason.as_tgi().to_string(),
                            generated_tokens: generated_text.generated_tokens,
                            seed: generated_text.seed,
                            input_length: self.input_length,
                        }),
                    },
                    Some(GenerationStats {
                        input_tokens: self.input_length,
                        generated_tokens: generated_text.generated_tokens,
                        queued,
                        start,
                    }),
                ),
            };
            if !self.tx.send(data_event(&frame)).await {
                return;
            }
            if let Some(stats) = end {
                self.metrics.success(stats);
                return;
            }
        }
    }

    async fn fail(mut self, error: InferError) {
        tracing::warn!("generation failed mid-stream: {error}");
        self.metrics.failure(error.error_type());
        let api = ApiError::from(error);
        self.tx.send(error_event(&api.body())).await;
    }
}
