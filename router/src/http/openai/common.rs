//! What the chat and text completion routes share: parameter translation,
//! response metadata and logprob shapes.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use super::schema::{ChatTokenLogprob, CompletionLogprobs, SamplingFields, StopSpec, TopLogprob};
use crate::http::info::ServerInfo;
use crate::infer::{PromptLogprobs, Token};
use crate::validation::GenerateParameters;
use tessera_model::prompt::PromptEncoder;

/// OpenAI semantics on top of the generic parameters: sampling by default,
/// `temperature: 0` is greedy (and turns the other warpers off), `top_k` <= 0
/// means "no top-k" as in vLLM.
pub fn generate_parameters(
    sampling: &SamplingFields,
    max_tokens: Option<u32>,
    top_n_tokens: Option<u32>,
) -> GenerateParameters {
    let greedy = sampling.temperature == Some(0.0);
    let unless_greedy = |v: Option<f32>| if greedy { None } else { v };
    GenerateParameters {
        do_sample: !greedy,
        temperature: unless_greedy(sampling.temperature),
        top_k: if greedy {
            None
        } else {
            sampling.top_k.filter(|&k| k > 0)
        },
        top_p: unless_greedy(sampling.top_p),
        typical_p: None,
        min_p: unless_greedy(sampling.min_p),
        repetition_penalty: sampling.repetition_penalty,
        frequency_penalty: sampling.frequency_penalty,
        presence_penalty: sampling.presence_penalty,
        max_new_tokens: max_tokens,
        min_new_tokens: sampling.min_tokens,
        stop: sampling
            .stop
            .clone()
            .map(StopSpec::into_vec)
            .unwrap_or_default(),
        seed: sampling.seed,
        top_n_tokens,
        truncate: None,
        ignore_eos: sampling.ignore_eos.unwrap_or(false),
        logit_bias: sampling
            .logit_bias
            .iter()
            .flatten()
            .map(|(k, v)| (k.clone(), *v))
            .collect(),
        json_object: false,
    }
}

/// `id`, `created`, `model` and `system_fingerprint` of one response.
#[derive(Debug, Clone)]
pub struct ResponseMeta {
    pub id: String,
    pub created: u64,
    pub model: String,
    pub system_fingerprint: String,
}

impl ResponseMeta {
    pub fn new(id_prefix: &str, info: &ServerInfo) -> Self {
        Self {
            id: format!("{id_prefix}-{:032x}", rand::random::<u128>()),
            created: unix_now(),
            model: info.model_id.clone(),
            system_fingerprint: format!("tessera-{}-{}", info.version, info.model_dtype),
        }
    }
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A generated token with its alternatives.
pub type TokenWithTop = (Token, Vec<Token>);

pub fn chat_logprob((token, top): &TokenWithTop) -> ChatTokenLogprob {
    ChatTokenLogprob {
        token: token.text.clone(),
        logprob: token.logprob,
        bytes: token.text.as_bytes().to_vec(),
        top_logprobs: top
            .iter()
            .map(|t| TopLogprob {
                token: t.text.clone(),
                logprob: t.logprob,
                bytes: t.text.as_bytes().to_vec(),
            })
            .collect(),
    }
}

/// Alternatives as completion logprobs show them: text -> logprob.
fn top_map(top: &[Token]) -> BTreeMap<String, f32> {
    top.iter().map(|t| (t.text.clone(), t.logprob)).collect()
}

/// Appends tokens to completion logprobs; `offset` is the byte offset of the
/// first one in the choice's text and is advanced past them.
pub fn extend_completion_logprobs(
    logprobs: &mut CompletionLogprobs,
    tokens: &[TokenWithTop],
    offset: &mut usize,
) {
    for (token, top) in tokens {
        logprobs.tokens.push(token.text.clone());
        logprobs.token_logprobs.push(Some(token.logprob));
        logprobs.top_logprobs.push(Some(top_map(top)));
        logprobs.text_offset.push(*offset);
        *offset += token.text.len();
    }
}

/// Completion logprobs of an echoed prompt: its tokens with the model's
/// log-probabilities (null for the first, which nothing predicts) and
/// alternatives, `text_offset` counted from the start of the text.
pub fn prompt_completion_logprobs(
    encoder: &PromptEncoder,
    ids: &[u32],
    prompt: &PromptLogprobs,
) -> CompletionLogprobs {
    let mut lp = CompletionLogprobs::default();
    let mut offset = 0usize;
    for (i, &id) in ids.iter().enumerate() {
        let text = encoder.token_text(id);
        let at = i.checked_sub(1);
        lp.token_logprobs
            .push(at.and_then(|j| prompt.logprobs.get(j).copied()));
        lp.top_logprobs
            .push(at.map(|j| prompt.top.get(j).map(|t| top_map(t)).unwrap_or_default()));
        lp.text_offset.push(offset);
        offset += text.len();
        lp.tokens.push(text);
    }
    lp
}

/// The non-special tokens whose text starts before byte `visible_len` of
/// the output (the rest belong to a trimmed stop sequence).
pub fn visible_tokens(
    tokens: &[Token],
    top_tokens: &[Vec<Token>],
    visible_len: usize,
) -> Vec<TokenWithTop> {
    let mut offset = 0;
    let mut out = Vec::new();
    for (i, token) in tokens.iter().enumerate() {
        if token.special {
            continue;
        }
        if offset >= visible_len {
            break;
        }
        offset += token.text.len();
        out.push((
            token.clone(),
            top_tokens.get(i).cloned().unwrap_or_default(),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(text: &str, special: bool) -> Token {
        Token {
            id: 1,
            text: text.into(),
            logprob: -1.0,
            special,
        }
    }

    #[test]
    fn temperature_zero_is_greedy() {
        let s = SamplingFields {
            temperature: Some(0.0),
            top_p: Some(0.5),
            top_k: Some(3),
            ..Default::default()
        };
        let p = generate_parameters(&s, Some(3), None);
        assert!(!p.do_sample);
        assert_eq!((p.temperature, p.top_p, p.top_k), (None, None, None));
        assert_eq!(p.max_new_tokens, Some(3));
        let p = generate_parameters(&SamplingFields::default(), None, None);
        assert!(p.do_sample);
        assert_eq!(p.temperature, None);
        let s = SamplingFields {
            temperature: Some(0.7),
            top_k: Some(-1),
            stop: Some(StopSpec::One("x".into())),
            ..Default::default()
        };
        let p = generate_parameters(&s, None, Some(2));
        assert_eq!(
            (p.temperature, p.top_k, p.top_n_tokens),
            (Some(0.7), None, Some(2))
        );
        assert_eq!(p.stop, vec!["x".to_string()]);
    }

    #[test]
    fn visible_tokens_stop_at_trim() {
        let tokens = vec![
            token("Hi", false),
            token(" there", false),
            token("##", false),
            token("</s>", true),
        ];
        let top = vec![vec![]; 4];
        assert_eq!(visible_tokens(&tokens, &top, 8).len(), 2);
        assert_eq!(visible_tokens(&tokens, &top, 100).len(), 3);
    }

    #[test]
    fn completion_logprobs_offsets() {
        let mut lp = CompletionLogprobs::default();
        let mut offset = 3;
        extend_completion_logprobs(
            &mut lp,
            &[(token("ab", false), vec![token("x", false)])],
            &mut offset,
        );
        extend_completion_logprobs(&mut lp, &[(token("c", false), vec![])], &mut offset);
        assert_eq!(lp.text_offset, vec![3, 5]);
        assert_eq!(offset, 6);
        assert_eq!(lp.top_logprobs[0].as_ref().unwrap().get("x"), Some(&-1.0));
    }
}
