//! What the HTTP layer hands to inference (a validated request) and what it
//! gets back (a stream of tokens ending with the generated text).

use std::time::Instant;

/// Sampling parameters after validation (every value in range, seed chosen).
#[derive(Debug, Clone, PartialEq)]
pub struct ValidParameters {
    pub temperature: f32,
    pub do_sample: bool,
    pub top_k: u32,
    pub top_p: f32,
    pub typical_p: f32,
    pub min_p: f32,
    pub repetition_penalty: f32,
    pub frequency_penalty: f32,
    pub presence_penalty: f32,
    /// Always set: the router picks one when the client did not.
    pub seed: u64,
    /// Alternatives to report beside each chosen token (0: none).
    pub top_n_tokens: u32,
    /// OpenAI `logit_bias`: `(token id, bias)`, ids in the vocabulary.
    pub logit_bias: Vec<(u32, f32)>,
    /// JSON mode (`response_format: {"type": "json_object"}`).
    pub json_object: bool,
}

impl Default for ValidParameters {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            do_sample: false,
            top_k: 0,
            top_p: 1.0,
            typical_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            seed: 0,
            top_n_tokens: 0,
            logit_bias: Vec::new(),
            json_object: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct ValidStopping {
    /// At least 1.
    pub max_new_tokens: u32,
    pub stop_sequences: Vec<String>,
    pub ignore_eos: bool,
    pub min_new_tokens: u32,
}

/// A request that passed validation: its prompt is tokenized (and truncated
/// when asked) and `input_ids.len() + max_new_tokens` fits the limits.
#[derive(Debug, Clone)]
pub struct ValidGenerateRequest {
    /// The prompt text as sent to the tokenizer (after any chat template).
    pub inputs: String,
    pub input_ids: Vec<u32>,
    pub parameters: ValidParameters,
    pub stopping: ValidStopping,
    /// Also compute the model's log-probability of each prompt token (TGI's
    /// `decoder_input_details`, OpenAI's `echo` with `logprobs`); such a prompt
    /// is computed whole, without the prefix cache.
    pub prompt_logprobs: bool,
}

/// The model's log-probabilities of prompt tokens 1.. (each given the tokens
/// before it), and the most likely tokens at each of those positions.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PromptLogprobs {
    pub logprobs: Vec<f32>,
    /// Empty, or one list per entry of `logprobs`.
    pub top: Vec<Vec<Token>>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Token {
    pub id: u32,
    pub text: String,
    pub logprob: f32,
    pub special: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// `max_new_tokens` reached.
    Length,
    EosToken,
    StopSequence,
}

impl FinishReason {
    /// TGI's spelling.
    pub fn as_tgi(&self) -> &'static str {
        match self {
            FinishReason::Length => "length",
            FinishReason::EosToken => "eos_token",
            FinishReason::StopSequence => "stop_sequence",
        }
    }

    /// OpenAI's spelling.
    pub fn as_openai(&self) -> &'static str {
        match self {
            FinishReason::Length => "length",
            FinishReason::EosToken | FinishReason::StopSequence => "stop",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct GeneratedText {
    /// Concatenated token texts (stop sequences included, as TGI does).
    pub text: String,
    pub generated_tokens: u32,
    pub finish_reason: FinishReason,
    pub seed: Option<u64>,
    /// Prompt tokens whose keys and values came from the prefix cache.
    pub cached_tokens: u32,
}

/// One event of a request's stream.
#[derive(Debug, Clone)]
pub enum InferStreamResponse {
    /// The prompt's log-probabilities, before the first token, when the request
    /// asked for them.
    Prompt(PromptLogprobs),
    /// A token that is not the last.
    Intermediate {
        token: Token,
        top_tokens: Vec<Token>,
    },
    /// The last token, with the whole generation.
    End {
        token: Token,
        top_tokens: Vec<Token>,
        generated_text: GeneratedText,
        /// When the request entered the queue and when its prefill started.
        queued: Instant,
        start: Instant,
    },
}

/// A whole generation, for the non-streaming routes.
#[derive(Debug, Clone)]
pub struct InferResponse {
    pub input_length: u32,
    pub tokens: Vec<Token>,
    /// `top_n_tokens` alternatives of each generated token.
    pub top_tokens: Vec<Vec<Token>>,
    pub generated_text: GeneratedText,
    /// When the request asked for them.
    pub prompt_logprobs: Option<PromptLogprobs>,
    pub queued: Instant,
    pub start: Instant,
}
