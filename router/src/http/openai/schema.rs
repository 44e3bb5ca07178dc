//! OpenAI's chat and text completion bodies (plus vLLM's and llama.cpp's
//! sampling extensions). Unknown fields are ignored; `model` is accepted
//! whatever it says.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// `stop`: one string or several.
#[derive(Debug, Clone, PartialEq, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum StopSpec {
    One(String),
    Many(Vec<String>),
}

impl StopSpec {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            StopSpec::One(s) => vec![s],
            StopSpec::Many(v) => v,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, ToSchema)]
pub struct StreamOptions {
    /// Send a last chunk with `usage` (and no choices) before `[DONE]`.
    #[serde(default)]
    pub include_usage: Option<bool>,
}

/// Sampling fields common to both routes.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
pub struct SamplingFields {
    /// 0 means greedy decoding. Default 1 (sampling).
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    /// Choices to generate, with seeds `seed`, `seed + 1`, ...
    pub n: Option<u32>,
    pub stop: Option<StopSpec>,
    pub seed: Option<u64>,
    pub frequency_penalty: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    /// vLLM extension: do not stop at EOS.
    pub ignore_eos: Option<bool>,
    /// vLLM extension: EOS and stop sequences are ignored before this many tokens.
    pub min_tokens: Option<u32>,
    pub top_k: Option<i64>,
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    /// Token id (as a string) -> bias in [-100, 100], added to the logit.
    pub logit_bias: Option<BTreeMap<String, f32>>,
}

/// `content` of a message: a string or an array of parts.
#[derive(Debug, Clone, PartialEq, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

/// A content part; only `{"type": "text", "text": ...}` is supported.
#[derive(Debug, Clone, PartialEq, Deserialize, ToSchema)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, ToSchema)]
pub struct ChatRequestMessage {
    #[schema(example = "user")]
    pub role: String,
    /// May be null (assistant messages with tool calls).
    #[serde(default)]
    pub content: Option<MessageContent>,
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct ChatCompletionRequest {
    /// Ignored: the server has one model.
    #[serde(default)]
    pub model: Option<String>,
    pub messages: Vec<ChatRequestMessage>,
    #[serde(default)]
    pub max_tokens: Option<u32>,
    /// Preferred over `max_tokens`.
    #[serde(default)]
    pub max_completion_tokens: Option<u32>,
    /// Return the log probability of each token.
    #[serde(default)]
    pub logprobs: Option<bool>,
    /// Alternatives per token (with `logprobs`).
    #[serde(default)]
    pub top_logprobs: Option<u32>,
    /// `{"type": "text"}` (the default) or `{"type": "json_object"}` (JSON mode: the
    /// answer is one JSON object); `json_schema` is not supported.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub response_format: Option<serde_json::Value>,
    /// Function calling is not supported: `tools` must be absent or empty
    /// (or `tool_choice` `"none"`).
    #[serde(default)]
    #[schema(value_type = Option<Vec<Object>>)]
    pub tools: Option<Vec<serde_json::Value>>,
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub tool_choice: Option<serde_json::Value>,
    #[serde(flatten)]
    pub sampling: SamplingFields,
}

impl ChatCompletionRequest {
    /// Whether the answer must be one JSON object (`response_format` `json_object`).
    pub fn json_mode(&self) -> bool {
        self.response_format
            .as_ref()
            .and_then(|f| f.get("type"))
            .and_then(|t| t.as_str())
            == Some("json_object")
    }

    /// Refuses the fields that ask for what this server does not do (JSON
    /// schemas, function calling), rather than ignoring them silently.
    pub fn check_supported(&self) -> Result<(), crate::validation::ValidationError> {
        use crate::validation::ValidationError::Unsupported;
        if let Some(format) = &self.response_format {
            let kind = format.get("type").and_then(|t| t.as_str());
            if !(format.is_null() || matches!(kind, Some("text" | "json_object"))) {
                let kind = kind.unwrap_or("(none)");
                return Err(Unsupported(format!(
                    "`response_format` of type `{kind}` (`text` and `json_object` are)"
                )));
            }
        }
        let tool_choice_none = self
            .tool_choice
            .as_ref()
            .is_some_and(|c| c.as_str() == Some("none"));
        if self.tools.as_ref().is_some_and(|t| !t.is_empty()) && !tool_choice_none {
            return Err(Unsupported(
                "`tools` (function calling; send `tool_choice: \"none\"` to ignore them)".into(),
            ));
        }
        if let Some(choice) = &self.tool_choice {
            if !(choice.is_null() || matches!(choice.as_str(), Some("none" | "auto"))) {
                return Err(Unsupported(format!(
                    "`tool_choice` {choice} (function calling)"
                )));
            }
        }
        Ok(())
    }
}

/// `prompt`: one string or several (each its own choice).
#[derive(Debug, Clone, PartialEq, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum PromptSpec {
    One(String),
    Many(Vec<String>),
    /// Token ids, as OpenAI's API also accepts.
    Tokens(Vec<u32>),
    ManyTokens(Vec<Vec<u32>>),
}

/// One prompt of a completion request: text, or token ids used as they are.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    Text(String),
    Tokens(Vec<u32>),
}

impl PromptSpec {
    pub fn into_vec(self) -> Vec<Prompt> {
        match self {
            PromptSpec::One(s) => vec![Prompt::Text(s)],
            PromptSpec::Many(v) => v.into_iter().map(Prompt::Text).collect(),
            PromptSpec::Tokens(ids) => vec![Prompt::Tokens(ids)],
            PromptSpec::ManyTokens(v) => v.into_iter().map(Prompt::Tokens).collect(),
        }
    }
}

/// `POST /v1/completions`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct CompletionRequest {
    #[serde(default)]
    pub model: Option<String>,
    pub prompt: PromptSpec,
    #[serde(default)]
    pub max_tokens: Option<u32>,
    /// Alternatives per token to return (0 returns only the chosen tokens' logprobs).
    #[serde(default)]
    pub logprobs: Option<u32>,
    /// Prepend the prompt to the text; with `logprobs`, the prompt's tokens come
    /// first in `logprobs` too, with the model's log-probabilities. With
    /// `max_tokens: 0` (not streamed) only the prompt comes back, as evaluation
    /// harnesses ask for to score a text.
    #[serde(default)]
    pub echo: Option<bool>,
    /// Not supported (insertion): must be absent, null or empty.
    #[serde(default)]
    pub suffix: Option<String>,
    #[serde(flatten)]
    pub sampling: SamplingFields,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub total_tokens: u32,
    /// As OpenAI reports it: how many prompt tokens came from the prefix cache.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_tokens_details: Option<PromptTokensDetails>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PromptTokensDetails {
    pub cached_tokens: u32,
}

impl Usage {
    pub fn new(prompt_tokens: u32, completion_tokens: u32) -> Self {
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
            prompt_tokens_details: None,
        }
    }

    /// With `prompt_tokens_details.cached_tokens`.
    pub fn with_cached(mut self, cached_tokens: u32) -> Self {
        self.prompt_tokens_details = Some(PromptTokensDetails { cached_tokens });
        self
    }
}

/// Cached prompt tokens of a request whose sequences are `copies` consecutive copies of
/// each prompt (`n`): each prompt counts once, as in `prompt_tokens`, with its first
/// copy's figure.
pub fn cached_prompt_tokens(per_sequence: &[u32], copies: usize) -> u32 {
    per_sequence.iter().step_by(copies.max(1)).sum()
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ChatMessageOut {
    pub role: String,
    pub content: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TopLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ChatTokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
    pub top_logprobs: Vec<TopLogprob>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ChatLogprobs {
    pub content: Vec<ChatTokenLogprob>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ChatChoice {
    pub index: u32,
    pub message: ChatMessageOut,
    pub logprobs: Option<ChatLogprobs>,
    /// `stop` or `length`.
    pub finish_reason: String,
}

/// `POST /v1/chat/completions` answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ChatCompletion {
    pub id: String,
    /// `chat.completion`.
    pub object: String,
    pub created: u64,
    pub model: String,
    pub system_fingerprint: String,
    pub choices: Vec<ChatChoice>,
    pub usage: Usage,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ChatDelta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ChatChunkChoice {
    pub index: u32,
    pub delta: ChatDelta,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<String>,
}

/// One SSE event of a streamed chat completion.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ChatCompletionChunk {
    pub id: String,
    /// `chat.completion.chunk`.
    pub object: String,
    pub created: u64,
    pub model: String,
    pub system_fingerprint: String,
    pub choices: Vec<ChatChunkChoice>,
    /// Only in the last chunk, with `stream_options.include_usage`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

/// Logprobs of `/v1/completions` (the legacy shape).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CompletionLogprobs {
    pub tokens: Vec<String>,
    /// Null only for the first token of an echoed prompt, which nothing predicts.
    pub token_logprobs: Vec<Option<f32>>,
    pub top_logprobs: Vec<Option<BTreeMap<String, f32>>>,
    /// Byte offset of each token in the choice's text.
    pub text_offset: Vec<usize>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CompletionChoice {
    pub index: u32,
    pub text: String,
    pub logprobs: Option<CompletionLogprobs>,
    /// `stop` or `length`; null in streamed chunks but the last of the choice.
    pub finish_reason: Option<String>,
}

/// `POST /v1/completions` answer, and each of its SSE chunks (`usage` only
/// in the answer and in the usage chunk).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Completion {
    pub id: String,
    /// `text_completion`.
    pub object: String,
    pub created: u64,
    pub model: String,
    pub system_fingerprint: String,
    pub choices: Vec<CompletionChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ModelCard {
    pub id: String,
    /// `model`.
    pub object: String,
    pub created: u64,
    pub owned_by: String,
}

/// `GET /v1/models`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ModelList {
    /// `list`.
    pub object: String,
    pub data: Vec<ModelCard>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn json_schemas_and_function_calling_are_refused_not_ignored() {
        let check = |extra: serde_json::Value| {
            let mut body = json!({"messages": [{"role": "user", "content": "hi"}]});
            for (k, v) in extra.as_object().unwrap() {
                body[k] = v.clone();
            }
            serde_json::from_value::<ChatCompletionRequest>(body)
                .unwrap()
                .check_supported()
                .map_err(|e| e.to_string())
        };
        // What clients send by default is accepted.
        for fine in [
            json!({}),
            json!({"response_format": {"type": "text"}}),
            json!({"response_format": {"type": "json_object"}}),
            json!({"response_format": null, "tools": null, "tool_choice": null}),
            json!({"tools": []}),
            json!({"tool_choice": "auto"}),
            json!({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "none"}),
        ] {
            assert_eq!(check(fine.clone()), Ok(()), "{fine}");
        }
        for (refused, names) in [
            (
                json!({"response_format": {"type": "json_schema", "json_schema": {}}}),
                "`json_schema`",
            ),
            (json!({"response_format": {}}), "`response_format`"),
            (
                json!({"tools": [{"type": "function", "function": {"name": "f"}}]}),
                "`tools`",
            ),
            (
                json!({"tools": [{"type": "function"}], "tool_choice": "auto"}),
                "`tools`",
            ),
            (json!({"tool_choice": "required"}), "`tool_choice`"),
        ] {
            let message = check(refused.clone()).unwrap_err();
            assert!(message.contains(names), "{refused}: {message}");
            assert!(message.contains("not supported"), "{refused}: {message}");
        }
    }

    #[test]
    fn completion_prompts_as_text_or_token_ids() {
        let prompt = |v: serde_json::Value| -> Vec<Prompt> {
            serde_json::from_value::<CompletionRequest>(json!({"prompt": v}))
                .unwrap()
                .prompt
                .into_vec()
        };
        assert_eq!(prompt(json!("hi")), vec![Prompt::Text("hi".into())]);
        assert_eq!(
            prompt(json!(["a", "b"])),
            vec![Prompt::Text("a".into()), Prompt::Text("b".into())]
        );
        assert_eq!(
            prompt(json!([1, 2, 3])),
            vec![Prompt::Tokens(vec![1, 2, 3])]
        );
        assert_eq!(
            prompt(json!([[1, 2], [3]])),
            vec![Prompt::Tokens(vec![1, 2]), Prompt::Tokens(vec![3])]
        );
        assert!(serde_json::from_value::<CompletionRequest>(json!({"prompt": [-1]})).is_err());
    }

    #[test]
    fn chat_request_variants() {
        let r: ChatCompletionRequest = serde_json::from_value(json!({
            "model": "gpt-4o",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "!"}]},
                {"role": "assistant", "content": null, "tool_calls": []}
            ],
            "max_completion_tokens": 5, "temperature": 0, "n": 2, "stop": "\n",
            "logprobs": true, "top_logprobs": 2, "stream": true,
            "stream_options": {"include_usage": true}, "top_k": 5, "min_p": 0.1,
            "ignore_eos": true, "min_tokens": 2, "repetition_penalty": 1.1,
            "response_format": {"type": "text"}, "user": "me"
        }))
        .unwrap();
        assert_eq!(r.messages.len(), 3);
        assert_eq!(
            r.messages[0].content,
            Some(MessageContent::Text("Be brief.".into()))
        );
        assert!(
            matches!(&r.messages[1].content, Some(MessageContent::Parts(p)) if p.len() == 2 && p[0].kind == "text")
        );
        assert_eq!(r.messages[2].content, None);
        assert_eq!(r.max_completion_tokens, Some(5));
        assert_eq!(r.sampling.temperature, Some(0.0));
        assert_eq!(r.sampling.n, Some(2));
        assert_eq!(
            r.sampling.stop.clone().map(StopSpec::into_vec),
            Some(vec!["\n".to_string()])
        );
        assert_eq!(r.sampling.stream, Some(true));
        assert_eq!(
            r.sampling
                .stream_options
                .clone()
                .and_then(|o| o.include_usage),
            Some(true)
        );
        assert_eq!(
            (
                r.sampling.top_k,
                r.sampling.min_tokens,
                r.sampling.ignore_eos
            ),
            (Some(5), Some(2), Some(true))
        );
    }

    #[test]
    fn chat_request_nulls_and_minimum() {
        let r: ChatCompletionRequest = serde_json::from_value(json!({
            "messages": [{"role": "user", "content": "x"}],
            "stop": null, "n": null, "stream": null, "logprobs": null, "max_tokens": 7
        }))
        .unwrap();
        assert_eq!(r.model, None);
        assert_eq!(r.max_tokens, Some(7));
        assert!(r.sampling.stop.is_none() && r.sampling.stream.is_none());
        assert!(serde_json::from_value::<ChatCompletionRequest>(json!({"model": "x"})).is_err());
    }

    #[test]
    fn completion_request_variants() {
        let r: CompletionRequest = serde_json::from_value(
            json!({"model": "m", "prompt": "Say", "logprobs": 2, "echo": true, "stop": ["a", "b"]}),
        )
        .unwrap();
        assert_eq!(
            r.prompt.clone().into_vec(),
            vec![Prompt::Text("Say".into())]
        );
        assert_eq!((r.logprobs, r.echo), (Some(2), Some(true)));
        assert_eq!(
            r.sampling.stop.map(StopSpec::into_vec).map(|v| v.len()),
            Some(2)
        );
        let r: CompletionRequest = serde_json::from_value(json!({"prompt": ["a", "b"]})).unwrap();
        assert_eq!(r.prompt.into_vec().len(), 2);
        assert!(serde_json::from_value::<CompletionRequest>(json!({"prompt": 5})).is_err());
    }

    #[test]
    fn usage_reports_cached_prompt_tokens_once_per_prompt() {
        // Two prompts, n = 2: each prompt's first copy counts.
        assert_eq!(cached_prompt_tokens(&[16, 16, 32, 48], 2), 48);
        assert_eq!(cached_prompt_tokens(&[16, 0], 1), 16);
        let usage = Usage::new(40, 2).with_cached(32);
        assert_eq!(
            serde_json::to_value(usage).unwrap(),
            json!({"prompt_tokens": 40, "completion_tokens": 2, "total_tokens": 42,
                "prompt_tokens_details": {"cached_tokens": 32}})
        );
    }

    #[test]
    fn chunk_serialization() {
        let chunk = ChatCompletionChunk {
            id: "chatcmpl-1".into(),
            object: "chat.completion.chunk".into(),
            created: 1,
            model: "m".into(),
            system_fingerprint: "fp".into(),
            choices: vec![ChatChunkChoice {
                index: 0,
                delta: ChatDelta {
                    role: Some("assistant".into()),
                    content: Some(String::new()),
                },
                logprobs: None,
                finish_reason: None,
            }],
            usage: None,
        };
        assert_eq!(
            serde_json::to_value(&chunk).unwrap(),
            json!({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
                "system_fingerprint": "fp", "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                "logprobs": null, "finish_reason": null}]})
        );
        assert_eq!(
            serde_json::to_value(Usage::new(3, 4)).unwrap(),
            json!({"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7})
        );
    }
}
