//! `POST /generate`: the whole generation as one JSON answer.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use tessera_model::prompt::PromptEncoder;

use super::schema::{
    BestOfSequence, Details, GenerateRequest, GenerateResponse, PrefillToken, TokenInfo,
};
use super::{full_text, prepare, PreparedRequest};
use crate::http::error::{ApiError, ErrorBody};
use crate::http::extract::JsonBody;
use crate::http::generation::{combined_stats, first_token, generate_all, with_seeds};
use crate::http::request_metrics::RequestMetrics;
use crate::http::AppState;
use crate::infer::{InferResponse, PromptLogprobs};

#[utoipa::path(
    post,
    path = "/generate",
    tag = "TGI",
    request_body = GenerateRequest,
    responses(
        (status = 200, description = "Generated text", body = GenerateResponse),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 422, description = "Invalid request", body = ErrorBody),
        (status = 424, description = "Generation error", body = ErrorBody),
        (status = 429, description = "Too many requests", body = ErrorBody),
        (status = 503, description = "Model not ready", body = ErrorBody),
    )
)]
#[tracing::instrument(skip_all)]
pub async fn generate(
    State(state): State<AppState>,
    body: Result<JsonBody<GenerateRequest>, ApiError>,
) -> Response {
    let mut metrics = RequestMetrics::start(&state.metrics);
    let result = match body {
        Ok(JsonBody(body)) => generate_response(&state, body, &mut metrics).await,
        Err(error) => Err(error),
    };
    metrics.respond(result)
}

async fn generate_response(
    state: &AppState,
    body: GenerateRequest,
    metrics: &mut RequestMetrics,
) -> Result<Response, ApiError> {
    let prepared = prepare(state, body, false).await?;
    metrics.validated();
    let input_tokens = prepared.request.input_ids.len() as u32;
    let mut collected = generate_all(
        &state.infer,
        with_seeds(prepared.request.clone(), prepared.best_of),
    )
    .await?;
    if let Some(at) = first_token(&collected) {
        metrics.token_at(at);
    }
    let stats = combined_stats(input_tokens, &collected);
    // The most likely sequence first.
    collected.sort_by(|a, b| sum_logprob(&b.response).total_cmp(&sum_logprob(&a.response)));
    let mut sequences = collected.into_iter().map(|c| c.response);
    let best = sequences
        .next()
        .ok_or_else(|| ApiError::from(crate::infer::InferError::IncompleteGeneration))?;
    let others: Vec<InferResponse> = sequences.collect();
    let prefill = if prepared.decoder_input_details {
        prefill_tokens(
            state.validation.encoder().clone(),
            prepared.request.input_ids.clone(),
            best.prompt_logprobs.clone(),
        )
        .await
    } else {
        Vec::new()
    };
    let headers = timing_headers(metrics, &best);
    let response = build_response(&prepared, best, others, prefill);
    if let Some(stats) = stats {
        metrics.success(stats);
    }
    Ok((headers, Json(response)).into_response())
}

fn sum_logprob(response: &InferResponse) -> f32 {
    response
        .tokens
        .iter()
        .map(|t| t.logprob)
        .filter(|l| l.is_finite())
        .sum()
}

fn build_response(
    prepared: &PreparedRequest,
    best: InferResponse,
    others: Vec<InferResponse>,
    prefill: Vec<PrefillToken>,
) -> GenerateResponse {
    let prefix = prepared.prefix.as_deref();
    let generated_text = full_text(prefix, &best.generated_text.text);
    if !prepared.details && !prepared.decoder_input_details {
        return GenerateResponse {
            generated_text,
            details: None,
        };
    }
    let best_of_sequences = (prepared.best_of > 1).then(|| {
        others
            .iter()
            .map(|r| BestOfSequence {
                generated_text: full_text(prefix, &r.generated_text.text),
                finish_reason: r.generated_text.finish_reason.as_tgi().to_string(),
                generated_tokens: r.generated_text.generated_tokens,
                seed: r.generated_text.seed,
                prefill: prefill.clone(),
                tokens: r.tokens.iter().map(TokenInfo::from).collect(),
                top_tokens: top_tokens(r),
            })
            .collect()
    });
    GenerateResponse {
        generated_text,
        details: Some(Details {
            finish_reason: best.generated_text.finish_reason.as_tgi().to_string(),
            generated_tokens: best.generated_text.generated_tokens,
            seed: best.generated_text.seed,
            prefill,
            tokens: best.tokens.iter().map(TokenInfo::from).collect(),
            top_tokens: top_tokens(&best),
            best_of_sequences,
        }),
    }
}

fn top_tokens(response: &InferResponse) -> Vec<Vec<TokenInfo>> {
    if response.top_tokens.iter().all(Vec::is_empty) {
        return Vec::new();
    }
    response
        .top_tokens
        .iter()
        .map(|top| top.iter().map(TokenInfo::from).collect())
        .collect()
}

/// The prompt tokens with their texts and the model's log-probabilities (none for
/// the first token, which nothing predicts).
async fn prefill_tokens(
    encoder: Arc<PromptEncoder>,
    ids: Vec<u32>,
    logprobs: Option<PromptLogprobs>,
) -> Vec<PrefillToken> {
    let logprobs = logprobs.map(|p| p.logprobs).unwrap_or_default();
    tokio::task::spawn_blocking(move || {
        ids.iter()
            .enumerate()
            .map(|(i, &id)| PrefillToken {
                id,
                text: encoder.token_text(id),
                logprob: i.checked_sub(1).and_then(|j| logprobs.get(j).copied()),
            })
            .collect()
    })
    .await
    .unwrap_or_default()
}

/// TGI's timing headers (milliseconds) and token counts.
fn timing_headers(metrics: &RequestMetrics, best: &InferResponse) -> HeaderMap {
    let total = metrics.arrival().elapsed();
    let queue = best.start.saturating_duration_since(best.queued);
    let inference = best.start.elapsed();
    let generated = best.generated_text.generated_tokens.max(1);
    let values = [
        ("x-compute-type", "tessera".to_string()),
        ("x-total-time", total.as_millis().to_string()),
        ("x-queue-time", queue.as_millis().to_string()),
        ("x-inference-time", inference.as_millis().to_string()),
        (
            "x-time-per-token",
            (inference / generated).as_millis().to_string(),
        ),
        ("x-prompt-tokens", best.input_length.to_string()),
        (
            "x-generated-tokens",
            best.generated_text.generated_tokens.to_string(),
        ),
    ];
    let mut headers = HeaderMap::new();
    for (name, value) in values {
        if let Ok(value) = HeaderValue::from_str(&value) {
            headers.insert(name, value);
        }
    }
    headers
}
