//! The two streaming HTTP APIs: request bodies and what each event means.

use crate::error::LoadgenError;
use crate::sse::SseEvent;
use serde::Serialize;
use serde_json::{json, Value};

/// Which streaming endpoint to drive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ApiKind {
    /// OpenAI `POST /v1/completions` with `stream: true`.
    Openai,
    /// TGI `POST /generate_stream`.
    Tgi,
}

/// What one event contributes to the request's record.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StreamItem {
    /// Token events in this event (0 or 1).
    pub token_events: u64,
    /// The server's own count of generated tokens, when the event carries it.
    pub reported_tokens: Option<u64>,
    /// The stream is over (`data: [DONE]`).
    pub done: bool,
}

impl ApiKind {
    /// The endpoint path below the base URL.
    pub fn path(self) -> &'static str {
        match self {
            ApiKind::Openai => "/v1/completions",
            ApiKind::Tgi => "/generate_stream",
        }
    }

    /// The JSON body asking for exactly `max_tokens` tokens (EOS ignored).
    pub fn body(self, prompt: &str, max_tokens: u32, model: Option<&str>) -> Value {
        match self {
            ApiKind::Openai => {
                let mut body = json!({
                    "prompt": prompt,
                    "stream": true,
                    "max_tokens": max_tokens,
                    "min_tokens": max_tokens,
                    "ignore_eos": true,
                    "temperature": 0,
                    "stream_options": { "include_usage": true },
                });
                if let (Some(model), Some(object)) = (model, body.as_object_mut()) {
                    object.insert("model".into(), Value::String(model.into()));
                }
                body
            }
            ApiKind::Tgi => json!({
                "inputs": prompt,
                "parameters": {
                    "max_new_tokens": max_tokens,
                    "details": true,
                    "ignore_eos": true,
                },
            }),
        }
    }

    /// Interprets one event; error events and unparsable data are errors.
    pub fn interpret(self, event: &SseEvent) -> Result<StreamItem, LoadgenError> {
        let data = event.data.trim();
        if event.event.as_deref() == Some("error") {
            return Err(LoadgenError::StreamError(error_text(data)));
        }
        if data == "[DONE]" {
            return Ok(StreamItem {
                done: true,
                ..StreamItem::default()
            });
        }
        let value: Value = serde_json::from_str(data)
            .map_err(|e| LoadgenError::MalformedEvent(format!("{e}: {}", clip(data, 200))))?;
        if let Some(error) = value.get("error").filter(|e| !e.is_null()) {
            return Err(LoadgenError::StreamError(error_message(error)));
        }
        Ok(match self {
            ApiKind::Openai => openai_item(&value),
            ApiKind::Tgi => tgi_item(&value),
        })
    }
}

/// A completions chunk is a token event when one of its choices carries text;
/// the final chunk of `include_usage` carries `usage.completion_tokens`.
fn openai_item(value: &Value) -> StreamItem {
    let carries_text = value
        .get("choices")
        .and_then(Value::as_array)
        .is_some_and(|choices| {
            choices.iter().any(|choice| {
                choice
                    .get("text")
                    .and_then(Value::as_str)
                    .is_some_and(|text| !text.is_empty())
            })
        });
    StreamItem {
        token_events: u64::from(carries_text),
        reported_tokens: value
            .get("usage")
            .and_then(|usage| usage.get("completion_tokens"))
            .and_then(Value::as_u64),
        done: false,
    }
}

/// Every TGI stream event carries exactly one token; the last one carries
/// `details.generated_tokens`.
fn tgi_item(value: &Value) -> StreamItem {
    StreamItem {
        token_events: u64::from(value.get("token").is_some_and(|t| !t.is_null())),
        reported_tokens: value
            .get("details")
            .and_then(|details| details.get("generated_tokens"))
            .and_then(Value::as_u64),
        done: false,
    }
}

fn error_message(error: &Value) -> String {
    match error {
        Value::String(text) => text.clone(),
        Value::Object(object) => match object.get("message").and_then(Value::as_str) {
            Some(message) => message.to_owned(),
            None => error.to_string(),
        },
        other => other.to_string(),
    }
}

fn error_text(data: &str) -> String {
    match serde_json::from_str::<Value>(data) {
        Ok(value) => match value.get("error") {
            Some(error) => error_message(error),
            None => clip(data, 500),
        },
        Err(_) => clip(data, 500),
    }
}

/// At most `max` characters of `text`, marked when cut.
pub fn clip(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(text: &str) -> SseEvent {
        SseEvent {
            event: None,
            data: text.into(),
        }
    }

    #[test]
    fn openai_chunks() {
        let api = ApiKind::Openai;
        let token = api
            .interpret(&data(
                r#"{"choices":[{"index":0,"text":" hi","finish_reason":null}],"usage":null}"#,
            ))
            .map_err(|e| e.to_string());
        assert_eq!(
            token,
            Ok(StreamItem {
                token_events: 1,
                reported_tokens: None,
                done: false
            })
        );
        let empty = api
            .interpret(&data(r#"{"choices":[{"index":0,"text":""}]}"#))
            .map_err(|e| e.to_string());
        assert_eq!(empty, Ok(StreamItem::default()));
        let usage = api
            .interpret(&data(
                r#"{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":64}}"#,
            ))
            .map_err(|e| e.to_string());
        assert_eq!(
            usage,
            Ok(StreamItem {
                token_events: 0,
                reported_tokens: Some(64),
                done: false
            })
        );
        let done = api.interpret(&data("[DONE]")).map_err(|e| e.to_string());
        assert_eq!(
            done,
            Ok(StreamItem {
                done: true,
                ..StreamItem::default()
            })
        );
    }

    #[test]
    fn tgi_events() {
        let api = ApiKind::Tgi;
        let token = api
            .interpret(&data(r#"{"index":1,"token":{"id":5,"text":"a","logprob":-0.1,"special":false},"generated_text":null,"details":null}"#))
            .map_err(|e| e.to_string());
        assert_eq!(
            token,
            Ok(StreamItem {
                token_events: 1,
                reported_tokens: None,
                done: false
            })
        );
        let last = api
            .interpret(&data(r#"{"token":{"id":2,"text":"","special":true},"generated_text":"a","details":{"finish_reason":"length","generated_tokens":9}}"#))
            .map_err(|e| e.to_string());
        assert_eq!(
            last,
            Ok(StreamItem {
                token_events: 1,
                reported_tokens: Some(9),
                done: false
            })
        );
    }

    #[test]
    fn errors_fail_the_request() {
        for api in [ApiKind::Openai, ApiKind::Tgi] {
            let inline = api.interpret(&data(
                r#"{"error":"out of memory","error_type":"generation"}"#,
            ));
            assert!(matches!(inline, Err(LoadgenError::StreamError(m)) if m == "out of memory"));
            let nested = api.interpret(&data(r#"{"error":{"message":"bad","type":"x"}}"#));
            assert!(matches!(nested, Err(LoadgenError::StreamError(m)) if m == "bad"));
            let named = api.interpret(&SseEvent {
                event: Some("error".into()),
                data: "boom".into(),
            });
            assert!(matches!(named, Err(LoadgenError::StreamError(m)) if m == "boom"));
            assert!(matches!(
                api.interpret(&data("{not json")),
                Err(LoadgenError::MalformedEvent(_))
            ));
        }
    }

    #[test]
    fn bodies_ask_for_exact_lengths() {
        let openai = ApiKind::Openai.body("p", 16, Some("m"));
        assert_eq!(openai["max_tokens"], 16);
        assert_eq!(openai["min_tokens"], 16);
        assert_eq!(openai["ignore_eos"], true);
        assert_eq!(openai["stream"], true);
        assert_eq!(openai["model"], "m");
        assert_eq!(openai["stream_options"]["include_usage"], true);
        assert!(ApiKind::Openai.body("p", 16, None).get("model").is_none());
        let tgi = ApiKind::Tgi.body("p", 16, None);
        assert_eq!(tgi["inputs"], "p");
        assert_eq!(tgi["parameters"]["max_new_tokens"], 16);
        assert_eq!(tgi["parameters"]["details"], true);
        assert_eq!(tgi["parameters"]["ignore_eos"], true);
    }

    #[test]
    fn clip_respects_char_boundaries() {
        assert_eq!(clip("héllo", 2), "hé…");
        assert_eq!(clip("hi", 5), "hi");
    }
}
