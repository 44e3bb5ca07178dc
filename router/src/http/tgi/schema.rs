//! TGI's request and response bodies, with TGI's JSON field names.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::infer::Token;
use crate::validation::GenerateParameters;

/// `POST /generate`, `POST /generate_stream` and `POST /`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct GenerateRequest {
    #[schema(example = "What is Deep Learning?")]
    pub inputs: String,
    #[serde(default)]
    pub parameters: TgiParameters,
    /// Only for `POST /`: stream the answer as server-sent events.
    #[serde(default)]
    pub stream: bool,
}

/// TGI's generation parameters (plus `min_p`, `presence_penalty`,
/// `ignore_eos`, `min_new_tokens`). Unknown fields are ignored.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(default)]
pub struct TgiParameters {
    /// Generate this many sequences and return the most likely (needs sampling).
    pub best_of: Option<u32>,
    /// Return the prompt tokens in `details.prefill`.
    pub decoder_input_details: bool,
    /// Return `details` (tokens, logprobs, finish reason).
    pub details: bool,
    pub do_sample: bool,
    pub frequency_penalty: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub max_new_tokens: Option<u32>,
    pub min_new_tokens: Option<u32>,
    pub repetition_penalty: Option<f32>,
    /// Prepend the prompt to `generated_text`.
    pub return_full_text: Option<bool>,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    pub temperature: Option<f32>,
    pub top_k: Option<i64>,
    pub top_n_tokens: Option<u32>,
    pub top_p: Option<f32>,
    /// Keep only the last `truncate` prompt tokens.
    pub truncate: Option<usize>,
    pub typical_p: Option<f32>,
    pub min_p: Option<f32>,
    /// Not supported: must be false.
    pub watermark: bool,
    pub ignore_eos: bool,
    /// Only `{"type": "json", "value": {"type": "object"}}` (any JSON object, as
    /// OpenAI's JSON mode); other grammars and schemas are refused.
    #[schema(value_type = Option<Object>)]
    pub grammar: Option<serde_json::Value>,
}

/// Whether a TGI grammar asks for any JSON object (JSON mode): type `json` with the
/// schema `{"type": "object"}`.
pub fn is_any_json_object(grammar: &serde_json::Value) -> bool {
    grammar.get("type").and_then(|t| t.as_str()) == Some("json")
        && grammar.get("value") == Some(&serde_json::json!({"type": "object"}))
}

impl TgiParameters {
    pub fn to_generate_parameters(&self) -> GenerateParameters {
        GenerateParameters {
            do_sample: self.do_sample,
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            typical_p: self.typical_p,
            min_p: self.min_p,
            repetition_penalty: self.repetition_penalty,
            frequency_penalty: self.frequency_penalty,
            presence_penalty: self.presence_penalty,
            max_new_tokens: self.max_new_tokens,
            min_new_tokens: self.min_new_tokens,
            stop: self.stop.clone(),
            seed: self.seed,
            top_n_tokens: self.top_n_tokens,
            truncate: self.truncate,
            ignore_eos: self.ignore_eos,
            logit_bias: Vec::new(),
            json_object: self.grammar.as_ref().is_some_and(is_any_json_object),
        }
    }
}

/// A generated token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TokenInfo {
    pub id: u32,
    pub text: String,
    pub logprob: f32,
    pub special: bool,
}

impl From<&Token> for TokenInfo {
    fn from(t: &Token) -> Self {
        Self {
            id: t.id,
            text: t.text.clone(),
            logprob: t.logprob,
            special: t.special,
        }
    }
}

/// A prompt token (`decoder_input_details`) with the model's log-probability of
/// it given the tokens before it (null for the first).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PrefillToken {
    pub id: u32,
    pub text: String,
    pub logprob: Option<f32>,
}

/// `POST /generate` answer.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct GenerateResponse {
    pub generated_text: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub details: Option<Details>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Details {
    /// `length`, `eos_token` or `stop_sequence`.
    pub finish_reason: String,
    pub generated_tokens: u32,
    pub seed: Option<u64>,
    pub prefill: Vec<PrefillToken>,
    pub tokens: Vec<TokenInfo>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub top_tokens: Vec<Vec<TokenInfo>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub best_of_sequences: Option<Vec<BestOfSequence>>,
}

/// A sequence of `best_of` that was not chosen.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct BestOfSequence {
    pub generated_text: String,
    pub finish_reason: String,
    pub generated_tokens: u32,
    pub seed: Option<u64>,
    pub prefill: Vec<PrefillToken>,
    pub tokens: Vec<TokenInfo>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub top_tokens: Vec<Vec<TokenInfo>>,
}

/// One event of `POST /generate_stream`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct StreamResponse {
    /// 1 for the first token.
    pub index: u32,
    pub token: TokenInfo,
    pub top_tokens: Vec<TokenInfo>,
    /// Only in the last event.
    pub generated_text: Option<String>,
    /// Only in the last event.
    pub details: Option<StreamDetails>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct StreamDetails {
    pub finish_reason: String,
    pub generated_tokens: u32,
    pub seed: Option<u64>,
    pub input_length: u32,
}

/// `POST /tokenize` request.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct TokenizeRequest {
    pub inputs: String,
}

/// A prompt token with its character span in `inputs`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SimpleToken {
    pub id: u32,
    pub text: String,
    pub start: usize,
    pub stop: usize,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn request_defaults_and_unknown_fields() {
        let r: GenerateRequest =
            serde_json::from_value(json!({"inputs": "hi", "parameters": {"max_new_tokens": 5, "grammar": null, "adapter_id": "x"}, "extra": 1}))
                .unwrap();
        assert_eq!(r.inputs, "hi");
        assert_eq!(r.parameters.max_new_tokens, Some(5));
        assert!(!r.stream && !r.parameters.details && !r.parameters.watermark);
        let r: GenerateRequest =
            serde_json::from_value(json!({"inputs": "hi", "stream": true})).unwrap();
        assert!(r.stream);
        assert!(r.parameters.stop.is_empty());
    }

    #[test]
    fn parameters_translate() {
        let r: GenerateRequest = serde_json::from_value(json!({"inputs": "hi", "parameters": {
            "do_sample": true, "temperature": 0.5, "top_k": 10, "top_p": 0.9, "typical_p": 0.8,
            "repetition_penalty": 1.2, "frequency_penalty": 0.1, "seed": 7, "stop": ["x"],
            "top_n_tokens": 2, "truncate": 100, "details": true
        }}))
        .unwrap();
        let p = r.parameters.to_generate_parameters();
        assert!(p.do_sample);
        assert_eq!(p.temperature, Some(0.5));
        assert_eq!(p.top_k, Some(10));
        assert_eq!(p.seed, Some(7));
        assert_eq!(p.stop, vec!["x".to_string()]);
        assert_eq!(p.truncate, Some(100));
    }

    #[test]
    fn response_field_names() {
        let token = TokenInfo {
            id: 5,
            text: "a".into(),
            logprob: -0.5,
            special: false,
        };
        let without = GenerateResponse {
            generated_text: "a".into(),
            details: None,
        };
        assert_eq!(
            serde_json::to_value(&without).unwrap(),
            json!({"generated_text": "a"})
        );
        let with = GenerateResponse {
            generated_text: "a".into(),
            details: Some(Details {
                finish_reason: "length".into(),
                generated_tokens: 1,
                seed: Some(3),
                prefill: vec![],
                tokens: vec![token.clone()],
                top_tokens: vec![],
                best_of_sequences: None,
            }),
        };
        assert_eq!(
            serde_json::to_value(&with).unwrap(),
            json!({"generated_text": "a", "details": {"finish_reason": "length", "generated_tokens": 1,
                "seed": 3, "prefill": [], "tokens": [{"id": 5, "text": "a", "logprob": -0.5, "special": false}]}})
        );
        let event = StreamResponse {
            index: 1,
            token,
            top_tokens: vec![],
            generated_text: None,
            details: None,
        };
        assert_eq!(
            serde_json::to_value(&event).unwrap(),
            json!({"index": 1, "token": {"id": 5, "text": "a", "logprob": -0.5, "special": false},
                "top_tokens": [], "generated_text": null, "details": null})
        );
    }
}
