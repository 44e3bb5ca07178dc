//! Request validation: checks every generation parameter against TGI's rules
//! and the server's [`Limits`], tokenizes the prompt (on tokio's blocking
//! pool) and produces a [`ValidGenerateRequest`].
//!
//! The TGI and OpenAI routes both translate their request bodies into
//! [`GenerateParameters`] and call [`Validation::validate`].

use std::sync::Arc;

use tessera_model::chat_template::ChatMessage;
use tessera_model::prompt::PromptEncoder;

use crate::config::Limits;
use crate::infer::{ValidGenerateRequest, ValidParameters, ValidStopping};

/// Why a request was refused before reaching the model. Every message names
/// the parameter and what is allowed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ValidationError {
    #[error("`inputs` cannot be empty")]
    EmptyInput,
    #[error("token id {id} in `prompt` is outside the vocabulary (size {vocab})")]
    TokenId { id: u32, vocab: u32 },
    #[error("`temperature` must be strictly positive, got {0}")]
    Temperature(f32),
    #[error("`top_p` must be > 0.0 and <= 1.0, got {0}")]
    TopP(f32),
    #[error("`top_k` must be strictly positive, got {0}")]
    TopK(i64),
    #[error("`typical_p` must be > 0.0 and < 1.0, got {0}")]
    TypicalP(f32),
    #[error("`min_p` must be >= 0.0 and < 1.0, got {0}")]
    MinP(f32),
    #[error("`repetition_penalty` must be strictly positive, got {0}")]
    RepetitionPenalty(f32),
    #[error("`frequency_penalty` must be >= -2.0 and <= 2.0, got {0}")]
    FrequencyPenalty(f32),
    #[error("`presence_penalty` must be >= -2.0 and <= 2.0, got {0}")]
    PresencePenalty(f32),
    #[error("`max_new_tokens` must be strictly positive, got 0")]
    MaxNewTokensZero,
    #[error("`max_new_tokens` must be <= {max}, got {given}")]
    MaxNewTokens { given: u32, max: u32 },
    #[error("`min_tokens` must be <= `max_new_tokens` ({max_new_tokens}), got {given}")]
    MinTokens { given: u32, max_new_tokens: u32 },
    #[error("`truncate` must be strictly positive and <= {max}, got {given}")]
    Truncate { given: usize, max: u32 },
    #[error("`inputs` tokens must be <= {max}, got {given} (use `truncate` to keep only the last tokens)")]
    InputLength { given: usize, max: u32 },
    #[error(
        "`inputs` tokens + `max_new_tokens` must be <= {max_total}, got {input} input tokens and {max_new_tokens} `max_new_tokens`"
    )]
    TotalLength {
        input: usize,
        max_new_tokens: u32,
        max_total: u32,
    },
    #[error("`stop` must have at most {max} sequences, got {given}")]
    StopSequences { given: usize, max: usize },
    #[error("`top_n_tokens` must be <= {max}, got {given}")]
    TopNTokens { given: u32, max: u32 },
    #[error("`{name}` must be >= 1 and <= {max}, got {given}")]
    BestOf {
        name: &'static str,
        given: u32,
        max: u32,
    },
    #[error("`best_of` > 1 needs sampling: set `do_sample`, `temperature`, `top_k`, `top_p` or `typical_p`")]
    BestOfSampling,
    #[error("`best_of` > 1 cannot be combined with `seed`")]
    BestOfSeed,
    #[error("`best_of` > 1 is not supported when streaming")]
    BestOfStream,
    #[error("`watermark` is not supported")]
    Watermark,
    #[error("JSON mode (`response_format` `json_object`) ends the output when the object closes: it cannot be combined with `{0}`")]
    JsonModeWith(&'static str),
    #[error("`decoder_input_details` is not supported when streaming tokens")]
    DecoderInputDetailsStream,
    #[error("{0} is not supported by this server")]
    Unsupported(String),
    #[error("`logit_bias` keys must be token ids (non-negative integers), got {0:?}")]
    LogitBiasKey(String),
    #[error("`logit_bias` token id {id} is outside the vocabulary (size {vocab})")]
    LogitBiasToken { id: u32, vocab: u32 },
    #[error("`logit_bias` values must be >= -100 and <= 100, got {value} for token {id}")]
    LogitBiasValue { id: u32, value: f32 },
    #[error("content part type `{0}` is not supported: only `text` parts are")]
    ContentPart(String),
    #[error("`messages` cannot be empty")]
    EmptyMessages,
    #[error("the model has no chat template: use /v1/completions or /generate")]
    NoChatTemplate,
    #[error("chat template: {0}")]
    ChatTemplate(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
}

/// Generation parameters as a client gave them, shared by the TGI and
/// OpenAI routes. `None` means "not given".
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerateParameters {
    /// Sample instead of choosing the most likely token. Also switched on by
    /// any sampling setting (`temperature` != 1, `top_k`, `top_p` < 1, ...).
    pub do_sample: bool,
    pub temperature: Option<f32>,
    pub top_k: Option<i64>,
    pub top_p: Option<f32>,
    pub typical_p: Option<f32>,
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub max_new_tokens: Option<u32>,
    pub min_new_tokens: Option<u32>,
    pub stop: Vec<String>,
    pub seed: Option<u64>,
    pub top_n_tokens: Option<u32>,
    /// Keep only the last `truncate` prompt tokens.
    pub truncate: Option<usize>,
    pub ignore_eos: bool,
    /// OpenAI `logit_bias`: token id (as the JSON key string) -> bias.
    pub logit_bias: Vec<(String, f32)>,
    /// JSON mode: the output is one JSON object.
    pub json_object: bool,
}

/// Validates requests against the model's tokenizer and the server's limits.
#[derive(Clone)]
pub struct Validation {
    encoder: Arc<PromptEncoder>,
    limits: Limits,
}

impl Validation {
    pub fn new(encoder: Arc<PromptEncoder>, limits: Limits) -> Self {
        Self { encoder, limits }
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    pub fn encoder(&self) -> &Arc<PromptEncoder> {
        &self.encoder
    }

    /// Checks `parameters`, tokenizes `inputs` and checks the lengths.
    #[tracing::instrument(name = "validation", skip_all)]
    pub async fn validate(
        &self,
        inputs: String,
        parameters: GenerateParameters,
    ) -> Result<ValidGenerateRequest, ValidationError> {
        if inputs.is_empty() {
            return Err(ValidationError::EmptyInput);
        }
        self.check_parameters(&parameters)?;
        let (inputs, ids) = self.tokenize(inputs).await?;
        self.finish(inputs, ids, parameters)
    }

    /// Like [`Validation::validate`] for a prompt given as token ids (OpenAI
    /// completions accept them), used as they are: no BOS is added.
    #[tracing::instrument(name = "validation", skip_all)]
    pub async fn validate_ids(
        &self,
        ids: Vec<u32>,
        parameters: GenerateParameters,
    ) -> Result<ValidGenerateRequest, ValidationError> {
        if ids.is_empty() {
            return Err(ValidationError::EmptyInput);
        }
        let vocab = self.encoder.tokenizer().get_vocab_size(true) as u32;
        if let Some(&bad) = ids.iter().find(|&&id| id >= vocab) {
            return Err(ValidationError::TokenId { id: bad, vocab });
        }
        self.check_parameters(&parameters)?;
        let encoder = self.encoder.clone();
        let (inputs, ids) = tokio::task::spawn_blocking(move || {
            let text = encoder.decode(&ids, false).unwrap_or_default();
            (text, ids)
        })
        .await
        .map_err(|e| ValidationError::Tokenizer(format!("decoding task failed: {e}")))?;
        self.finish(inputs, ids, parameters)
    }

    /// The checks after tokenization: truncation, lengths, min tokens.
    fn finish(
        &self,
        inputs: String,
        ids: Vec<u32>,
        parameters: GenerateParameters,
    ) -> Result<ValidGenerateRequest, ValidationError> {
        let (valid_parameters, checked) = self.check_parameters(&parameters)?;
        let input_ids = self.truncate(ids, parameters.truncate);
        let max_new_tokens = self.check_lengths(input_ids.len(), parameters.max_new_tokens)?;
        let min_new_tokens = parameters.min_new_tokens.unwrap_or(0);
        if min_new_tokens > max_new_tokens {
            return Err(ValidationError::MinTokens {
                given: min_new_tokens,
                max_new_tokens,
            });
        }
        if parameters.json_object {
            if parameters.ignore_eos {
                return Err(ValidationError::JsonModeWith("ignore_eos"));
            }
            if min_new_tokens > 0 {
                return Err(ValidationError::JsonModeWith("min_tokens"));
            }
        }
        Ok(ValidGenerateRequest {
            inputs,
            input_ids,
            parameters: valid_parameters,
            stopping: ValidStopping {
                max_new_tokens,
                stop_sequences: checked.stop_sequences,
                ignore_eos: parameters.ignore_eos,
                min_new_tokens,
            },
            prompt_logprobs: false,
        })
    }

    /// Checks TGI's `best_of` (or OpenAI's `n` with `name = "n"`, which has
    /// no sampling, seed or streaming restriction) and returns it (1 if not given).
    pub fn validate_best_of(
        &self,
        best_of: Option<u32>,
        parameters: &GenerateParameters,
        stream: bool,
    ) -> Result<u32, ValidationError> {
        let best_of = self.check_count("best_of", best_of)?;
        if best_of > 1 {
            if !is_sampling(parameters) {
                return Err(ValidationError::BestOfSampling);
            }
            if parameters.seed.is_some() {
                return Err(ValidationError::BestOfSeed);
            }
            if stream {
                return Err(ValidationError::BestOfStream);
            }
        }
        Ok(best_of)
    }

    /// Checks a count of sequences (`best_of`, `n`): 1..=max_best_of.
    pub fn check_count(
        &self,
        name: &'static str,
        given: Option<u32>,
    ) -> Result<u32, ValidationError> {
        let given = given.unwrap_or(1);
        let max = self.limits.max_best_of;
        if given == 0 || given > max {
            return Err(ValidationError::BestOf { name, given, max });
        }
        Ok(given)
    }

    /// Renders a conversation with the model's chat template (on the blocking pool).
    #[tracing::instrument(name = "chat_template", skip_all)]
    pub async fn apply_chat_template(
        &self,
        messages: Vec<ChatMessage>,
    ) -> Result<String, ValidationError> {
        if messages.is_empty() {
            return Err(ValidationError::EmptyMessages);
        }
        if !self.encoder.has_chat_template() {
            return Err(ValidationError::NoChatTemplate);
        }
        let encoder = self.encoder.clone();
        let prompt =
            tokio::task::spawn_blocking(move || encoder.apply_chat_template(&messages, true))
                .await
                .map_err(|e| ValidationError::ChatTemplate(format!("rendering task failed: {e}")))?
                .map_err(|e| ValidationError::ChatTemplate(e.to_string()))?;
        Ok(self.strip_template_bos(prompt))
    }

    /// Templates that write `{{ bos_token }}` would get a second BOS from
    /// [`PromptEncoder::encode`] when the model adds one: drop the template's.
    fn strip_template_bos(&self, prompt: String) -> String {
        let info = self.encoder.info();
        match (&info.bos_token, info.add_bos_token) {
            (Some(bos), true) if !bos.is_empty() && prompt.starts_with(bos.as_str()) => {
                prompt[bos.len()..].to_string()
            }
            _ => prompt,
        }
    }

    /// Token ids of `inputs` (on the blocking pool); gives `inputs` back.
    #[tracing::instrument(name = "tokenize", skip_all)]
    pub async fn tokenize(&self, inputs: String) -> Result<(String, Vec<u32>), ValidationError> {
        let encoder = self.encoder.clone();
        tokio::task::spawn_blocking(move || {
            let ids = encoder.encode(&inputs);
            (inputs, ids)
        })
        .await
        .map_err(|e| ValidationError::Tokenizer(format!("tokenizing task failed: {e}")))
        .and_then(|(inputs, ids)| match ids {
            Ok(ids) => Ok((inputs, ids)),
            Err(e) => Err(ValidationError::Tokenizer(e.to_string())),
        })
    }

    fn truncate(&self, mut ids: Vec<u32>, truncate: Option<usize>) -> Vec<u32> {
        if let Some(keep) = truncate {
            if ids.len() > keep {
                ids.drain(..ids.len() - keep);
            }
        }
        ids
    }

    /// Checks the prompt length and returns `max_new_tokens`.
    fn check_lengths(
        &self,
        input_len: usize,
        max_new_tokens: Option<u32>,
    ) -> Result<u32, ValidationError> {
        let limits = &self.limits;
        if input_len > limits.max_input_tokens as usize {
            return Err(ValidationError::InputLength {
                given: input_len,
                max: limits.max_input_tokens,
            });
        }
        let room = (limits.max_total_tokens as usize).saturating_sub(input_len);
        let max_new_tokens = match max_new_tokens {
            Some(n) => n,
            None => {
                let room = u32::try_from(room).unwrap_or(u32::MAX);
                limits.default_max_new_tokens.min(room).max(1)
            }
        };
        if max_new_tokens as usize > room {
            return Err(ValidationError::TotalLength {
                input: input_len,
                max_new_tokens,
                max_total: limits.max_total_tokens,
            });
        }
        Ok(max_new_tokens)
    }

    /// Range checks of everything that does not need the prompt.
    fn check_parameters(
        &self,
        p: &GenerateParameters,
    ) -> Result<(ValidParameters, CheckedStopping), ValidationError> {
        let limits = &self.limits;
        let temperature = match p.temperature {
            Some(t) if t.is_nan() || t <= 0.0 => return Err(ValidationError::Temperature(t)),
            Some(t) => t,
            None => 1.0,
        };
        let top_p = match p.top_p {
            Some(v) if v.is_nan() || v <= 0.0 || v > 1.0 => return Err(ValidationError::TopP(v)),
            Some(v) => v,
            None => 1.0,
        };
        let top_k = match p.top_k {
            Some(k) if k <= 0 => return Err(ValidationError::TopK(k)),
            Some(k) => u32::try_from(k).unwrap_or(u32::MAX),
            None => 0,
        };
        let typical_p = match p.typical_p {
            Some(v) if v.is_nan() || v <= 0.0 || v >= 1.0 => {
                return Err(ValidationError::TypicalP(v))
            }
            Some(v) => v,
            None => 1.0,
        };
        let min_p = match p.min_p {
            Some(v) if v.is_nan() || !(0.0..1.0).contains(&v) => {
                return Err(ValidationError::MinP(v))
            }
            Some(v) => v,
            None => 0.0,
        };
        let repetition_penalty = match p.repetition_penalty {
            Some(v) if v.is_nan() || v <= 0.0 => return Err(ValidationError::RepetitionPenalty(v)),
            Some(v) => v,
            None => 1.0,
        };
        let frequency_penalty = match p.frequency_penalty {
            Some(v) if !(-2.0..=2.0).contains(&v) => {
                return Err(ValidationError::FrequencyPenalty(v))
            }
            Some(v) => v,
            None => 0.0,
        };
        let presence_penalty = match p.presence_penalty {
            Some(v) if !(-2.0..=2.0).contains(&v) => {
                return Err(ValidationError::PresencePenalty(v))
            }
            Some(v) => v,
            None => 0.0,
        };
        match p.max_new_tokens {
            Some(0) => return Err(ValidationError::MaxNewTokensZero),
            Some(n) if n > limits.max_new_tokens => {
                return Err(ValidationError::MaxNewTokens {
                    given: n,
                    max: limits.max_new_tokens,
                })
            }
            _ => {}
        }
        if let Some(truncate) = p.truncate {
            if truncate == 0 || truncate > limits.max_input_tokens as usize {
                return Err(ValidationError::Truncate {
                    given: truncate,
                    max: limits.max_input_tokens,
                });
            }
        }
        let stop_sequences: Vec<String> =
            p.stop.iter().filter(|s| !s.is_empty()).cloned().collect();
        if stop_sequences.len() > limits.max_stop_sequences {
            return Err(ValidationError::StopSequences {
                given: stop_sequences.len(),
                max: limits.max_stop_sequences,
            });
        }
        let top_n_tokens = p.top_n_tokens.unwrap_or(0);
        if top_n_tokens > limits.max_top_n_tokens {
            return Err(ValidationError::TopNTokens {
                given: top_n_tokens,
                max: limits.max_top_n_tokens,
            });
        }
        let logit_bias = self.check_logit_bias(&p.logit_bias)?;
        let parameters = ValidParameters {
            temperature,
            do_sample: is_sampling(p),
            top_k,
            top_p,
            typical_p,
            min_p,
            repetition_penalty,
            frequency_penalty,
            presence_penalty,
            seed: p.seed.unwrap_or_else(rand::random::<u64>),
            top_n_tokens,
            logit_bias,
            json_object: p.json_object,
        };
        Ok((parameters, CheckedStopping { stop_sequences }))
    }
}

impl Validation {
    /// Parses `logit_bias` keys as token ids of this vocabulary and checks
    /// each bias is in [-100, 100].
    fn check_logit_bias(
        &self,
        given: &[(String, f32)],
    ) -> Result<Vec<(u32, f32)>, ValidationError> {
        if given.is_empty() {
            return Ok(Vec::new());
        }
        let vocab = self.encoder.tokenizer().get_vocab_size(true) as u32;
        given
            .iter()
            .map(|(key, value)| {
                let id: u32 = key
                    .trim()
                    .parse()
                    .map_err(|_| ValidationError::LogitBiasKey(key.clone()))?;
                if id >= vocab {
                    return Err(ValidationError::LogitBiasToken { id, vocab });
                }
                if !(-100.0..=100.0).contains(value) {
                    return Err(ValidationError::LogitBiasValue { id, value: *value });
                }
                Ok((id, *value))
            })
            .collect()
    }
}

struct CheckedStopping {
    stop_sequences: Vec<String>,
}

/// Whether the parameters ask for sampling (TGI: `do_sample` or any warper).
fn is_sampling(p: &GenerateParameters) -> bool {
    p.do_sample
        || p.temperature.is_some_and(|t| t != 1.0)
        || p.top_k.is_some()
        || p.top_p.is_some_and(|v| v < 1.0)
        || p.typical_p.is_some_and(|v| v < 1.0)
        || p.min_p.is_some_and(|v| v > 0.0)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::path::Path;

    /// The tiny SentencePiece GGUF fixture of the model crate: "hello world"
    /// is `[<s>, ▁hello, ▁world]`.
    pub(crate) fn tiny_encoder() -> Arc<PromptEncoder> {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../model/tests/fixtures/tokenizer/tiny_spm.gguf");
        Arc::new(PromptEncoder::open(&path).expect("tiny_spm.gguf fixture"))
    }

    fn limits() -> Limits {
        Limits {
            max_input_tokens: 8,
            max_total_tokens: 12,
            max_new_tokens: 10,
            default_max_new_tokens: 5,
            max_stop_sequences: 2,
            max_top_n_tokens: 3,
            max_best_of: 2,
            payload_limit: 1000,
        }
    }

    fn validation() -> Validation {
        Validation::new(tiny_encoder(), limits())
    }

    async fn check(p: GenerateParameters) -> Result<ValidGenerateRequest, ValidationError> {
        validation().validate("hello world".into(), p).await
    }

    async fn err(p: GenerateParameters) -> String {
        check(p).await.expect_err("must be refused").to_string()
    }

    fn params() -> GenerateParameters {
        GenerateParameters::default()
    }

    #[tokio::test]
    async fn token_id_prompts_are_used_as_given() {
        let v = validation();
        let r = v.validate_ids(vec![274, 279], params()).await.unwrap();
        assert_eq!(r.input_ids, vec![274, 279], "no BOS added to token prompts");
        assert_eq!(r.inputs, v.encoder().decode(&[274, 279], false).unwrap());
        let vocab = v.encoder().tokenizer().get_vocab_size(true) as u32;
        assert_eq!(
            v.validate_ids(vec![1, vocab], params())
                .await
                .unwrap_err()
                .to_string(),
            format!("token id {vocab} in `prompt` is outside the vocabulary (size {vocab})")
        );
        assert_eq!(
            v.validate_ids(vec![], params()).await.unwrap_err(),
            ValidationError::EmptyInput
        );
    }

    #[tokio::test]
    async fn defaults_are_greedy_with_default_max_new_tokens() {
        let r = check(params()).await.unwrap();
        assert_eq!(r.input_ids, vec![1, 274, 279]);
        assert_eq!(r.inputs, "hello world");
        assert!(!r.parameters.do_sample);
        assert_eq!(r.parameters.temperature, 1.0);
        assert_eq!(r.stopping.max_new_tokens, 5);
        assert_eq!(r.stopping.min_new_tokens, 0);
        assert!(!r.stopping.ignore_eos);
    }

    #[tokio::test]
    async fn default_max_new_tokens_fits_total() {
        let v = Validation::new(
            tiny_encoder(),
            Limits {
                max_total_tokens: 5,
                ..limits()
            },
        );
        let r = v.validate("hello world".into(), params()).await.unwrap();
        assert_eq!(r.stopping.max_new_tokens, 2);
    }

    #[tokio::test]
    async fn do_sample_alone_samples_at_temperature_one() {
        let r = check(GenerateParameters {
            do_sample: true,
            ..params()
        })
        .await
        .unwrap();
        assert!(r.parameters.do_sample);
        assert_eq!(r.parameters.temperature, 1.0);
    }

    #[tokio::test]
    async fn warpers_switch_sampling_on() {
        for p in [
            GenerateParameters {
                temperature: Some(0.5),
                ..params()
            },
            GenerateParameters {
                top_k: Some(5),
                ..params()
            },
            GenerateParameters {
                top_p: Some(0.9),
                ..params()
            },
            GenerateParameters {
                typical_p: Some(0.9),
                ..params()
            },
            GenerateParameters {
                min_p: Some(0.1),
                ..params()
            },
        ] {
            assert!(check(p).await.unwrap().parameters.do_sample);
        }
        let r = check(GenerateParameters {
            temperature: Some(1.0),
            ..params()
        })
        .await
        .unwrap();
        assert!(!r.parameters.do_sample);
    }

    #[tokio::test]
    async fn passes_values_through() {
        let r = check(GenerateParameters {
            temperature: Some(0.7),
            top_k: Some(40),
            top_p: Some(0.9),
            typical_p: Some(0.5),
            min_p: Some(0.05),
            repetition_penalty: Some(1.1),
            frequency_penalty: Some(0.5),
            presence_penalty: Some(-0.5),
            max_new_tokens: Some(9),
            min_new_tokens: Some(3),
            stop: vec!["a".into(), "".into(), "b".into()],
            seed: Some(42),
            top_n_tokens: Some(3),
            ignore_eos: true,
            ..params()
        })
        .await
        .unwrap();
        let p = &r.parameters;
        assert_eq!(
            (p.temperature, p.top_k, p.top_p, p.typical_p, p.min_p),
            (0.7, 40, 0.9, 0.5, 0.05)
        );
        assert_eq!(
            (
                p.repetition_penalty,
                p.frequency_penalty,
                p.presence_penalty
            ),
            (1.1, 0.5, -0.5)
        );
        assert_eq!((p.seed, p.top_n_tokens), (42, 3));
        assert_eq!(r.stopping.max_new_tokens, 9);
        assert_eq!(r.stopping.min_new_tokens, 3);
        assert_eq!(
            r.stopping.stop_sequences,
            vec!["a".to_string(), "b".to_string()]
        );
        assert!(r.stopping.ignore_eos);
    }

    #[tokio::test]
    async fn random_seed_when_missing() {
        let a = check(params()).await.unwrap().parameters.seed;
        let b = check(params()).await.unwrap().parameters.seed;
        let c = check(params()).await.unwrap().parameters.seed;
        assert!(a != b || b != c);
    }

    #[tokio::test]
    async fn empty_input() {
        let e = validation()
            .validate(String::new(), params())
            .await
            .unwrap_err();
        assert_eq!(e, ValidationError::EmptyInput);
        assert_eq!(e.to_string(), "`inputs` cannot be empty");
    }

    #[tokio::test]
    async fn temperature() {
        assert_eq!(
            err(GenerateParameters {
                temperature: Some(0.0),
                ..params()
            })
            .await,
            "`temperature` must be strictly positive, got 0"
        );
        assert!(err(GenerateParameters {
            temperature: Some(-1.0),
            ..params()
        })
        .await
        .contains("`temperature`"));
        assert!(err(GenerateParameters {
            temperature: Some(f32::NAN),
            ..params()
        })
        .await
        .contains("`temperature`"));
    }

    #[tokio::test]
    async fn top_p() {
        for v in [0.0, -0.1, 1.1] {
            let e = err(GenerateParameters {
                top_p: Some(v),
                ..params()
            })
            .await;
            assert!(e.contains("`top_p` must be > 0.0 and <= 1.0"), "{e}");
        }
        assert!(check(GenerateParameters {
            top_p: Some(1.0),
            ..params()
        })
        .await
        .is_ok());
    }

    #[tokio::test]
    async fn top_k() {
        assert_eq!(
            err(GenerateParameters {
                top_k: Some(0),
                ..params()
            })
            .await,
            "`top_k` must be strictly positive, got 0"
        );
        assert!(err(GenerateParameters {
            top_k: Some(-1),
            ..params()
        })
        .await
        .contains("got -1"));
    }

    #[tokio::test]
    async fn typical_p() {
        for v in [0.0, 1.0, 1.5] {
            let e = err(GenerateParameters {
                typical_p: Some(v),
                ..params()
            })
            .await;
            assert!(e.contains("`typical_p` must be > 0.0 and < 1.0"), "{e}");
        }
    }

    #[tokio::test]
    async fn min_p() {
        for v in [-0.1, 1.0] {
            let e = err(GenerateParameters {
                min_p: Some(v),
                ..params()
            })
            .await;
            assert!(e.contains("`min_p` must be >= 0.0 and < 1.0"), "{e}");
        }
        assert!(check(GenerateParameters {
            min_p: Some(0.0),
            ..params()
        })
        .await
        .is_ok());
    }

    #[tokio::test]
    async fn repetition_penalty() {
        assert_eq!(
            err(GenerateParameters {
                repetition_penalty: Some(0.0),
                ..params()
            })
            .await,
            "`repetition_penalty` must be strictly positive, got 0"
        );
    }

    #[tokio::test]
    async fn logit_bias_keys_ids_and_values() {
        let with = |bias: &[(&str, f32)]| GenerateParameters {
            logit_bias: bias.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            ..params()
        };
        assert_eq!(
            err(with(&[("3", 1.0), ("x", 1.0)])).await,
            "`logit_bias` keys must be token ids (non-negative integers), got \"x\""
        );
        assert_eq!(
            err(with(&[("-1", 1.0)])).await,
            "`logit_bias` keys must be token ids (non-negative integers), got \"-1\""
        );
        let vocab = tiny_encoder().tokenizer().get_vocab_size(true);
        assert_eq!(
            err(with(&[(&vocab.to_string(), 1.0)])).await,
            format!("`logit_bias` token id {vocab} is outside the vocabulary (size {vocab})")
        );
        assert_eq!(
            err(with(&[("2", 100.5)])).await,
            "`logit_bias` values must be >= -100 and <= 100, got 100.5 for token 2"
        );
        assert!(err(with(&[("2", f32::NAN)])).await.contains("logit_bias"));
        let ok = check(with(&[("2", -100.0), ("3", 100.0)])).await.unwrap();
        assert_eq!(ok.parameters.logit_bias, vec![(2, -100.0), (3, 100.0)]);
        let none = check(params()).await.unwrap();
        assert!(none.parameters.logit_bias.is_empty());
    }

    #[tokio::test]
    async fn json_mode_needs_the_end_of_sequence() {
        let json = |p: GenerateParameters| GenerateParameters {
            json_object: true,
            ..p
        };
        assert!(err(json(GenerateParameters {
            ignore_eos: true,
            ..params()
        }))
        .await
        .contains("`ignore_eos`"));
        assert!(err(json(GenerateParameters {
            min_new_tokens: Some(2),
            ..params()
        }))
        .await
        .contains("`min_tokens`"));
        let ok = check(json(params())).await.unwrap();
        assert!(ok.parameters.json_object);
    }

    #[tokio::test]
    async fn frequency_and_presence_penalty() {
        assert_eq!(
            err(GenerateParameters {
                frequency_penalty: Some(2.5),
                ..params()
            })
            .await,
            "`frequency_penalty` must be >= -2.0 and <= 2.0, got 2.5"
        );
        assert_eq!(
            err(GenerateParameters {
                presence_penalty: Some(-2.5),
                ..params()
            })
            .await,
            "`presence_penalty` must be >= -2.0 and <= 2.0, got -2.5"
        );
        assert!(check(GenerateParameters {
            frequency_penalty: Some(-2.0),
            presence_penalty: Some(2.0),
            ..params()
        })
        .await
        .is_ok());
    }

    #[tokio::test]
    async fn max_new_tokens() {
        assert_eq!(
            err(GenerateParameters {
                max_new_tokens: Some(0),
                ..params()
            })
            .await,
            "`max_new_tokens` must be strictly positive, got 0"
        );
        assert_eq!(
            err(GenerateParameters {
                max_new_tokens: Some(11),
                ..params()
            })
            .await,
            "`max_new_tokens` must be <= 10, got 11"
        );
    }

    #[tokio::test]
    async fn total_length_names_both() {
        assert_eq!(
            err(GenerateParameters { max_new_tokens: Some(10), ..params() }).await,
            "`inputs` tokens + `max_new_tokens` must be <= 12, got 3 input tokens and 10 `max_new_tokens`"
        );
    }

    #[tokio::test]
    async fn input_too_long_and_truncate() {
        let long = "hello world hello world hello world hello world".to_string();
        let e = validation()
            .validate(long.clone(), params())
            .await
            .unwrap_err();
        assert!(
            matches!(e, ValidationError::InputLength { given: 9, max: 8 }),
            "{e}"
        );
        assert!(e
            .to_string()
            .starts_with("`inputs` tokens must be <= 8, got 9"));
        let r = validation()
            .validate(
                long,
                GenerateParameters {
                    truncate: Some(4),
                    ..params()
                },
            )
            .await
            .unwrap();
        assert_eq!(r.input_ids, vec![274, 279, 274, 279]);
    }

    #[tokio::test]
    async fn truncate_range() {
        assert_eq!(
            err(GenerateParameters {
                truncate: Some(9),
                ..params()
            })
            .await,
            "`truncate` must be strictly positive and <= 8, got 9"
        );
        assert!(err(GenerateParameters {
            truncate: Some(0),
            ..params()
        })
        .await
        .contains("`truncate`"));
    }

    #[tokio::test]
    async fn stop_sequences() {
        let stop = vec!["a".into(), "b".into(), "c".into()];
        assert_eq!(
            err(GenerateParameters { stop, ..params() }).await,
            "`stop` must have at most 2 sequences, got 3"
        );
    }

    #[tokio::test]
    async fn top_n_tokens() {
        assert_eq!(
            err(GenerateParameters {
                top_n_tokens: Some(4),
                ..params()
            })
            .await,
            "`top_n_tokens` must be <= 3, got 4"
        );
    }

    #[tokio::test]
    async fn min_tokens() {
        assert_eq!(
            err(GenerateParameters {
                max_new_tokens: Some(3),
                min_new_tokens: Some(4),
                ..params()
            })
            .await,
            "`min_tokens` must be <= `max_new_tokens` (3), got 4"
        );
    }

    #[test]
    fn best_of() {
        let v = validation();
        let sampling = GenerateParameters {
            do_sample: true,
            ..params()
        };
        assert_eq!(v.validate_best_of(None, &params(), false), Ok(1));
        assert_eq!(v.validate_best_of(Some(2), &sampling, false), Ok(2));
        assert_eq!(
            v.validate_best_of(Some(3), &sampling, false)
                .unwrap_err()
                .to_string(),
            "`best_of` must be >= 1 and <= 2, got 3"
        );
        assert!(v.validate_best_of(Some(0), &sampling, false).is_err());
        assert_eq!(
            v.validate_best_of(Some(2), &params(), false),
            Err(ValidationError::BestOfSampling)
        );
        assert_eq!(
            v.validate_best_of(Some(2), &sampling, true),
            Err(ValidationError::BestOfStream)
        );
        let seeded = GenerateParameters {
            seed: Some(1),
            ..sampling
        };
        assert_eq!(
            v.validate_best_of(Some(2), &seeded, false),
            Err(ValidationError::BestOfSeed)
        );
        assert_eq!(
            v.check_count("n", Some(5)).unwrap_err().to_string(),
            "`n` must be >= 1 and <= 2, got 5"
        );
    }

    #[test]
    fn template_bos_is_not_doubled() {
        let v = validation();
        assert_eq!(v.strip_template_bos("<s>hi".into()), "hi");
        assert_eq!(v.strip_template_bos("hi<s>".into()), "hi<s>");
    }

    #[tokio::test]
    async fn chat_template_needs_one_and_messages() {
        let v = validation();
        assert_eq!(
            v.apply_chat_template(vec![]).await,
            Err(ValidationError::EmptyMessages)
        );
        let e = v
            .apply_chat_template(vec![ChatMessage::new("user", "hi")])
            .await
            .unwrap_err();
        assert_eq!(e, ValidationError::NoChatTemplate);
    }
}
