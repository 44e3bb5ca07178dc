//! `POST /v1/chat/completions`.

use axum::body::Bytes;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use tessera_model::chat_template::ChatMessage;

use super::common::{
    chat_logprob, generate_parameters, visible_tokens, ResponseMeta, TokenWithTop,
};
use super::schema::{
    cached_prompt_tokens, ChatChoice, ChatChunkChoice, ChatCompletion, ChatCompletionChunk,
    ChatCompletionRequest, ChatDelta, ChatLogprobs, ChatMessageOut, ChatRequestMessage,
    MessageContent, Usage,
};
use super::stream::{spawn_stream, ChoiceStream, ChunkWriter, StreamPlan};
use crate::http::error::{ApiError, ErrorBody};
use crate::http::extract::JsonBody;
use crate::http::generation::{combined_stats, first_token, generate_all, with_seeds};
use crate::http::request_metrics::RequestMetrics;
use crate::http::sse::data_event;
use crate::http::stop::trim_stop_sequence;
use crate::http::AppState;
use crate::infer::FinishReason;
use crate::validation::ValidationError;

#[utoipa::path(
    post,
    path = "/v1/chat/completions",
    tag = "OpenAI",
    request_body = ChatCompletionRequest,
    responses(
        (status = 200, description = "The completion; with `stream: true`, chunks then `data: [DONE]`", content(
            (ChatCompletion = "application/json"),
            (ChatCompletionChunk = "text/event-stream"),
        )),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 422, description = "Invalid request", body = ErrorBody),
        (status = 424, description = "Generation error", body = ErrorBody),
        (status = 429, description = "Too many requests", body = ErrorBody),
        (status = 503, description = "Model not ready", body = ErrorBody),
    )
)]
#[tracing::instrument(skip_all)]
pub async fn chat_completions(
    State(state): State<AppState>,
    body: Result<JsonBody<ChatCompletionRequest>, ApiError>,
) -> Response {
    let mut metrics = RequestMetrics::start(&state.metrics);
    let result = match body {
        Ok(JsonBody(body)) => chat(&state, body, &mut metrics).await,
        Err(error) => Err(error),
    };
    metrics.respond(result)
}

/// The messages as the chat template wants them; text parts are joined by newlines.
pub fn chat_messages(
    messages: Vec<ChatRequestMessage>,
) -> Result<Vec<ChatMessage>, ValidationError> {
    messages
        .into_iter()
        .map(|m| {
            let content = match m.content {
                None => String::new(),
                Some(MessageContent::Text(text)) => text,
                Some(MessageContent::Parts(parts)) => {
                    let mut texts = Vec::with_capacity(parts.len());
                    for part in parts {
                        if part.kind != "text" {
                            return Err(ValidationError::ContentPart(part.kind));
                        }
                        texts.push(part.text.unwrap_or_default());
                    }
                    texts.join("\n")
                }
            };
            Ok(ChatMessage::new(m.role, content))
        })
        .collect()
}

async fn chat(
    state: &AppState,
    body: ChatCompletionRequest,
    metrics: &mut RequestMetrics,
) -> Result<Response, ApiError> {
    body.check_supported()?;
    let json_mode = body.json_mode();
    let n = state.validation.check_count("n", body.sampling.n)?;
    let messages = chat_messages(body.messages)?;
    let prompt = state.validation.apply_chat_template(messages).await?;
    let logprobs = body.logprobs.unwrap_or(false);
    let top_n = logprobs.then(|| body.top_logprobs.unwrap_or(0));
    let mut parameters = generate_parameters(
        &body.sampling,
        body.max_completion_tokens.or(body.max_tokens),
        top_n,
    );
    parameters.json_object = json_mode;
    let stops = parameters.stop.clone();
    let request = state.validation.validate(prompt, parameters).await?;
    metrics.validated();
    let prompt_tokens = request.input_ids.len() as u32;
    let requests = with_seeds(request, n);
    let meta = ResponseMeta::new("chatcmpl", &state.info);

    if body.sampling.stream.unwrap_or(false) {
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
        return Ok(spawn_stream(
            plan,
            ChatChunkWriter { meta, logprobs },
            metrics.hand_over(),
        ));
    }

    let collected = generate_all(&state.infer, requests).await?;
    if let Some(at) = first_token(&collected) {
        metrics.token_at(at);
    }
    let choices: Vec<ChatChoice> = (0u32..)
        .zip(&collected)
        .map(|(index, c)| {
            let r = &c.response;
            let reason = r.generated_text.finish_reason;
            let content = trim_stop_sequence(&r.generated_text.text, &stops, reason);
            let logprobs = logprobs.then(|| ChatLogprobs {
                content: visible_tokens(&r.tokens, &r.top_tokens, content.len())
                    .iter()
                    .map(chat_logprob)
                    .collect(),
            });
            ChatChoice {
                index,
                message: ChatMessageOut {
                    role: "assistant".into(),
                    content,
                },
                logprobs,
                finish_reason: reason.as_openai().to_string(),
            }
        })
        .collect();
    let completion_tokens = collected
        .iter()
        .map(|c| c.response.generated_text.generated_tokens)
        .sum();
    if let Some(stats) = combined_stats(prompt_tokens, &collected) {
        metrics.success(stats);
    }
    Ok(Json(ChatCompletion {
        id: meta.id,
        object: "chat.completion".into(),
        created: meta.created,
        model: meta.model,
        system_fingerprint: meta.system_fingerprint,
        choices,
        usage: Usage::new(prompt_tokens, completion_tokens).with_cached(cached_prompt_tokens(
            &collected
                .iter()
                .map(|c| c.response.generated_text.cached_tokens)
                .collect::<Vec<_>>(),
            n as usize,
        )),
    })
    .into_response())
}

/// Chunks of `chat.completion.chunk`.
pub struct ChatChunkWriter {
    pub meta: ResponseMeta,
    pub logprobs: bool,
}

impl ChatChunkWriter {
    fn chunk(&self, choices: Vec<ChatChunkChoice>, usage: Option<Usage>) -> ChatCompletionChunk {
        ChatCompletionChunk {
            id: self.meta.id.clone(),
            object: "chat.completion.chunk".into(),
            created: self.meta.created,
            model: self.meta.model.clone(),
            system_fingerprint: self.meta.system_fingerprint.clone(),
            choices,
            usage,
        }
    }
}

impl ChunkWriter for ChatChunkWriter {
    fn opening(&mut self, index: u32) -> Option<Bytes> {
        let choice = ChatChunkChoice {
            index,
            delta: ChatDelta {
                role: Some("assistant".into()),
                content: Some(String::new()),
            },
            logprobs: None,
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
        let choice = ChatChunkChoice {
            index,
            delta: ChatDelta {
                role: None,
                content: (!text.is_empty()).then_some(text),
            },
            logprobs: (self.logprobs && !tokens.is_empty()).then(|| ChatLogprobs {
                content: tokens.iter().map(chat_logprob).collect(),
            }),
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
    use crate::http::openai::schema::ContentPart;

    fn meta() -> ResponseMeta {
        ResponseMeta {
            id: "chatcmpl-x".into(),
            created: 5,
            model: "m".into(),
            system_fingerprint: "fp".into(),
        }
    }

    #[test]
    fn content_parts_join_and_refuse_images() {
        let messages = vec![ChatRequestMessage {
            role: "user".into(),
            content: Some(MessageContent::Parts(vec![
                ContentPart {
                    kind: "text".into(),
                    text: Some("a".into()),
                },
                ContentPart {
                    kind: "text".into(),
                    text: Some("b".into()),
                },
            ])),
        }];
        assert_eq!(chat_messages(messages).unwrap()[0].content, "a\nb");
        let messages = vec![ChatRequestMessage {
            role: "user".into(),
            content: Some(MessageContent::Parts(vec![ContentPart {
                kind: "image_url".into(),
                text: None,
            }])),
        }];
        assert_eq!(
            chat_messages(messages).unwrap_err().to_string(),
            "content part type `image_url` is not supported: only `text` parts are"
        );
    }

    fn parse(frame: Bytes) -> serde_json::Value {
        let text = std::str::from_utf8(&frame).unwrap();
        let json = text
            .strip_prefix("data: ")
            .unwrap()
            .strip_suffix("\n\n")
            .unwrap();
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn chunk_frames() {
        let mut w = ChatChunkWriter {
            meta: meta(),
            logprobs: false,
        };
        let open = parse(w.opening(1).unwrap());
        assert_eq!(open["object"], "chat.completion.chunk");
        assert_eq!(
            open["choices"][0]["delta"],
            serde_json::json!({"role": "assistant", "content": ""})
        );
        assert_eq!(open["choices"][0]["index"], 1);
        let mid = parse(w.delta(0, "Hi".into(), vec![], None));
        assert_eq!(
            mid["choices"][0]["delta"],
            serde_json::json!({"content": "Hi"})
        );
        assert_eq!(mid["choices"][0]["finish_reason"], serde_json::Value::Null);
        let end = parse(w.delta(0, String::new(), vec![], Some(FinishReason::StopSequence)));
        assert_eq!(end["choices"][0]["delta"], serde_json::json!({}));
        assert_eq!(end["choices"][0]["finish_reason"], "stop");
        let usage = parse(w.usage(Usage::new(2, 3)));
        assert_eq!(usage["choices"], serde_json::json!([]));
        assert_eq!(usage["usage"]["total_tokens"], 5);
    }
}
