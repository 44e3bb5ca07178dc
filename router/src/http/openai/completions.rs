//! `POST /v1/completions`: one choice per prompt and per `n`.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use tessera_model::prompt::PromptEncoder;

use super::common::{
    extend_completion_logprobs, generate_parameters, prompt_completion_logprobs, visible_tokens,
    ResponseMeta, TokenWithTop,
};
use super::schema::{
    cached_prompt_tokens, Completion, CompletionChoice, CompletionLogprobs, CompletionRequest,
    Prompt, Usage,
};
use super::stream::{spawn_stream, ChoiceStream, ChunkWriter, StreamPlan};
use crate::http::error::{ApiError, ErrorBody};
use crate::http::extract::JsonBody;
use crate::http::generation::{combined_stats, first_token, generate_all, with_seeds};
use crate::http::request_metrics::RequestMetrics;
use crate::http::sse::data_event;
use crate::http::stop::trim_stop_sequence;
use crate::http::AppState;
use crate::infer::{FinishReason, PromptLogprobs, ValidGenerateRequest};
use crate::validation::ValidationError;

#[utoipa::path(
    post,
    path = "/v1/completions",
    tag = "OpenAI",
    request_body = CompletionRequest,
    responses(
        (status = 200, description = "The completion; with `stream: true`, chunks then `data: [DONE]`", content(
            (Completion = "application/json"),
            (Completion = "text/event-stream"),
        )),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 422, description = "Invalid request", body = ErrorBody),
        (status = 424, description = "Generation error", body = ErrorBody),
        (status = 429, description = "Too many requests", body = ErrorBody),
        (status = 503, description = "Model not ready", body = ErrorBody),
    )
)]
#[tracing::instrument(skip_all)]
pub async fn completions(
    State(state): State<AppState>,
    body: Result<JsonBody<CompletionRequest>, ApiError>,
) -> Response {
    let mut metrics = RequestMetrics::start(&state.metrics);
    let result = match body {
        Ok(JsonBody(body)) => complete(&state, body, &mut metrics).await,
        Err(error) => Err(error),
    };
    metrics.respond(result)
}

async fn complete(
    state: &AppState,
    body: CompletionRequest,
    metrics: &mut RequestMetrics,
) -> Result<Response, ApiError> {
    if body.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ValidationError::Unsupported("`suffix` (insertion)".into()).into());
    }
    let n = state.validation.check_count("n", body.sampling.n)?;
    let prompts = body.prompt.into_vec();
    if prompts.is_empty() {
        return Err(ApiError::validation("`prompt` cannot be empty"));
    }
    let logprobs = body.logprobs.is_some();
    let echo = body.echo.unwrap_or(false);
    let streaming = body.sampling.stream.unwrap_or(false);
    // `echo` with `max_tokens: 0`: score the prompt only. One token is generated and
    // left out of the answer.
    let prompt_only = echo && !streaming && body.max_tokens == Some(0);
    let max_tokens = if prompt_only {
        Some(1)
    } else {
        body.max_tokens
    };
    let parameters = generate_parameters(&body.sampling, max_tokens, body.logprobs);
    let stops = parameters.stop.clone();
    // The prompt's own log-probabilities go with the echoed prompt.
    let prompt_logprobs = echo && logprobs;
    // Validated once per prompt; `n` copies of each with consecutive seeds.
    let mut requests: Vec<ValidGenerateRequest> = Vec::new();
    let mut prompt_tokens = 0u32;
    let mut echoes: HashMap<u32, String> = HashMap::new();
    // Prompt token ids by choice, for the echoed prompt's logprobs.
    let mut prompt_ids: HashMap<u32, Vec<u32>> = HashMap::new();
    for prompt in prompts {
        let request = match prompt {
            Prompt::Text(text) => state.validation.validate(text, parameters.clone()).await?,
            Prompt::Tokens(ids) => {
                state
                    .validation
                    .validate_ids(ids, parameters.clone())
                    .await?
            }
        };
        prompt_tokens += request.input_ids.len() as u32;
        let mut request = request;
        request.prompt_logprobs = prompt_logprobs;
        for copy in with_seeds(request, n) {
            if echo {
                echoes.insert(requests.len() as u32, copy.inputs.clone());
            }
            if prompt_logprobs {
                prompt_ids.insert(requests.len() as u32, copy.input_ids.clone());
            }
            requests.push(copy);
        }
    }
    metrics.validated();
    let meta = ResponseMeta::new("cmpl", &state.info);

    if streaming {
        let mut choices = Vec::with_capacity(requests.len());
        for (index, request) in (0u32..).zip(requests) {
            choices.push(ChoiceStream {
                index,
                stream: state.infer.generate_stream(request)?,
            });
        }
        let plan = StreamPlan {
            choices,
            stop_sequences: stops,
            logprobs,
            include_usage: body
                .sampling
                .stream_options
                .and_then(|o| o.include_usage)
                .unwrap_or(false),
            prompt_tokens,
            copies: n as usize,
        };
        let writer = CompletionChunkWriter {
            meta,
            logprobs,
            echoes,
            prompt_ids,
            encoder: state.validation.encoder().clone(),
            offsets: HashMap::new(),
        };
        return Ok(spawn_stream(plan, writer, metrics.hand_over()));
    }

    let collected = generate_all(&state.infer, requests).await?;
    if let Some(at) = first_token(&collected) {
        metrics.token_at(at);
    }
    let encoder = state.validation.encoder();
    let choices: Vec<CompletionChoice> = (0u32..)
        .zip(&collected)
        .map(|(index, c)| {
            let r = &c.response;
            let reason = r.generated_text.finish_reason;
            let generated = if prompt_only {
                String::new()
            } else {
                trim_stop_sequence(&r.generated_text.text, &stops, reason)
            };
            let prefix = echoes.get(&index).cloned().unwrap_or_default();
            let logprobs = logprobs.then(|| {
                let mut lp = match (&r.prompt_logprobs, prompt_ids.get(&index)) {
                    (Some(prompt), Some(ids)) => prompt_completion_logprobs(encoder, ids, prompt),
                    _ => CompletionLogprobs::default(),
                };
                let mut offset = prefix.len();
                let tokens = visible_tokens(&r.tokens, &r.top_tokens, generated.len());
                extend_completion_logprobs(&mut lp, &tokens, &mut offset);
                lp
            });
            CompletionChoice {
                index,
                text: prefix + &generated,
                logprobs,
                // Nothing generated was asked for: the prompt ends at the length limit.
                finish_reason: Some(
                    if prompt_only {
                        "length"
                    } else {
                        reason.as_openai()
                    }
                    .to_string(),
                ),
            }
        })
        .collect();
    let completion_tokens = if prompt_only {
        0
    } else {
        collected
            .iter()
            .map(|c| c.response.generated_text.generated_tokens)
            .sum()
    };
    if let Some(stats) = combined_stats(prompt_tokens, &collected) {
        metrics.success(stats);
    }
    Ok(Json(Completion {
        id: meta.id,
        object: "text_completion".into(),
        created: meta.created,
        model: meta.model,
        system_fingerprint: meta.system_fingerprint,
        choices,
        usage: Some(
            Usage::new(prompt_tokens, completion_tokens).with_cached(cached_prompt_tokens(
                &collected
                    .iter()
                    .map(|c| c.response.generated_text.cached_tokens)
                    .collect::<Vec<_>>(),
                n as usize,
            )),
        ),
    })
    .into_response())
}

/// Chunks of `text_completion`.
pub struct CompletionChunkWriter {
    pub meta: ResponseMeta,
    pub logprobs: bool,
    /// Prompt to send first, by choice (`echo`).
    pub echoes: HashMap<u32, String>,
    /// Prompt token ids by choice when the echoed prompt comes with its logprobs
    /// (`echo` and `logprobs`): then it is sent when they arrive, not at the opening.
    pub prompt_ids: HashMap<u32, Vec<u32>>,
    pub encoder: Arc<PromptEncoder>,
    /// Bytes of text sent so far, by choice (for `text_offset`).
    pub offsets: HashMap<u32, usize>,
}

impl CompletionChunkWriter {
    fn chunk(&self, choices: Vec<CompletionChoice>, usage: Option<Usage>) -> Completion {
        Completion {
            id: self.meta.id.clone(),
            object: "text_completion".into(),
            created: self.meta.created,
            model: self.meta.model.clone(),
            system_fingerprint: self.meta.system_fingerprint.clone(),
            choices,
            usage,
        }
    }
}

impl ChunkWriter for CompletionChunkWriter {
    fn opening(&mut self, index: u32) -> Option<Bytes> {
        if self.prompt_ids.contains_key(&index) {
            return None;
        }
        let prompt = self.echoes.get(&index)?.clone();
        self.offsets.insert(index, prompt.len());
        let choice = CompletionChoice {
            index,
            text: prompt,
            logprobs: None,
            finish_reason: None,
        };
        Some(data_event(&self.chunk(vec![choice], None)))
    }

    fn prompt(&mut self, index: u32, logprobs: PromptLogprobs) -> Option<Bytes> {
        let ids = self.prompt_ids.get(&index)?;
        let prompt = self.echoes.get(&index)?.clone();
        let logprobs = prompt_completion_logprobs(&self.encoder, ids, &logprobs);
        self.offsets.insert(index, prompt.len());
        let choice = CompletionChoice {
            index,
            text: prompt,
            logprobs: Some(logprobs),
            finish_reason: None,
        };
        Some(data_event(&self.chunk(vec![choice], None)))
    }

    fn delta(
        &mut self,
        index: u32,
        text: String,
        tokens: Vec<TokenWithTop>,
        finish_reason: Option<FinishReason>,
    ) -> Bytes {
        let offset = self.offsets.entry(index).or_insert(0);
        let logprobs = self.logprobs.then(|| {
            let mut lp = CompletionLogprobs::default();
            let mut token_offset = *offset;
            extend_completion_logprobs(&mut lp, &tokens, &mut token_offset);
            lp
        });
        *offset += text.len();
        let choice = CompletionChoice {
            index,
            text,
            logprobs,
            finish_reason: finish_reason.map(|r| r.as_openai().to_string()),
        };
        data_event(&self.chunk(vec![choice], None))
    }

    fn usage(&mut self, usage: Usage) -> Bytes {
        data_event(&self.chunk(vec![], Some(usage)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(frame: Bytes) -> serde_json::Value {
        let text = std::str::from_utf8(&frame).unwrap();
        serde_json::from_str(text.strip_prefix("data: ").unwrap().trim_end()).unwrap()
    }

    fn test_meta() -> ResponseMeta {
        ResponseMeta {
            id: "cmpl-x".into(),
            created: 1,
            model: "m".into(),
            system_fingerprint: "fp".into(),
        }
    }

    #[test]
    fn chunk_frames_with_echo() {
        let mut w = CompletionChunkWriter {
            meta: test_meta(),
            logprobs: false,
            echoes: HashMap::from([(0, "Say".to_string())]),
            prompt_ids: HashMap::new(),
            encoder: crate::validation::tests::tiny_encoder(),
            offsets: HashMap::new(),
        };
        assert!(w.opening(1).is_none());
        let open = parse(w.opening(0).unwrap());
        assert_eq!(open["object"], "text_completion");
        assert_eq!(open["choices"][0]["text"], "Say");
        assert!(open.get("usage").is_none());
        let end = parse(w.delta(0, " hi".into(), vec![], Some(FinishReason::Length)));
        assert_eq!(end["choices"][0]["text"], " hi");
        assert_eq!(end["choices"][0]["finish_reason"], "length");
        assert_eq!(w.offsets[&0], 6);
    }

    /// With `echo` and `logprobs`, the echoed prompt waits for its logprobs and
    /// carries them: null for the first token, offsets from the start of the text.
    #[test]
    fn echoed_prompt_carries_its_logprobs() {
        let encoder = crate::validation::tests::tiny_encoder();
        let ids = encoder.encode("hello world").unwrap();
        assert_eq!(ids.len(), 3);
        let text = encoder.decode(&ids, false).unwrap();
        let mut w = CompletionChunkWriter {
            meta: test_meta(),
            logprobs: true,
            echoes: HashMap::from([(0, text.clone())]),
            prompt_ids: HashMap::from([(0, ids.clone())]),
            encoder: encoder.clone(),
            offsets: HashMap::new(),
        };
        assert!(w.opening(0).is_none(), "the prompt waits for its logprobs");
        let top = |id: u32, logprob: f32| crate::infer::Token {
            id,
            text: encoder.token_text(id),
            logprob,
            special: false,
        };
        let scored = PromptLogprobs {
            logprobs: vec![-3.0, -0.5],
            top: vec![vec![top(ids[1], -3.0)], vec![top(ids[2], -0.5)]],
        };
        let chunk = parse(w.prompt(0, scored).unwrap());
        let choice = &chunk["choices"][0];
        assert_eq!(choice["text"], text.as_str());
        let lp = &choice["logprobs"];
        assert_eq!(lp["token_logprobs"], serde_json::json!([null, -3.0, -0.5]));
        assert!(lp["top_logprobs"][0].is_null());
        assert_eq!(lp["top_logprobs"][2][encoder.token_text(ids[2])], -0.5);
        assert_eq!(lp["text_offset"][0], 0);
        let joined: String = lp["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap())
            .collect();
        assert_eq!(w.offsets[&0], text.len());
        assert_eq!(
            joined.len(),
            lp["text_offset"][2].as_u64().unwrap() as usize + encoder.token_text(ids[2]).len()
        );
    }
}
