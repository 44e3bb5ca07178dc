//! Conversions between the gRPC messages and the engine's types.

use tessera_proto as pb;

use crate::engine::{GenerateRequest, Generation, TopToken};
use crate::sampling::SamplingParams;
use crate::stopping::{FinishReason, StoppingCriteria};

use super::worker::CachedBatch;

/// An engine request from a gRPC one; `eos_token_ids` are the model's.
pub fn request(r: pb::Request, eos_token_ids: &[u32]) -> GenerateRequest {
    let sampling = r.sampling.unwrap_or_default();
    let stopping = r.stopping.unwrap_or_default();
    GenerateRequest {
        id: r.id,
        prompt: r.input_ids,
        cached_tokens: r.cached_tokens as usize,
        prompt_logprobs: r.prompt_logprobs,
        prefill_only: r.prefill_only,
        sampling: SamplingParams {
            temperature: sampling.temperature,
            do_sample: sampling.do_sample,
            top_k: sampling.top_k,
            top_p: sampling.top_p,
            typical_p: sampling.typical_p,
            min_p: sampling.min_p,
            repetition_penalty: sampling.repetition_penalty,
            frequency_penalty: sampling.frequency_penalty,
            presence_penalty: sampling.presence_penalty,
            seed: Some(sampling.seed),
            top_n_tokens: sampling.top_n_tokens,
            logit_bias: sampling.logit_bias.into_iter().collect(),
            json_object: sampling.json_object,
        },
        stopping: StoppingCriteria {
            max_new_tokens: stopping.max_new_tokens,
            eos_token_ids: eos_token_ids.to_vec(),
            stop_sequences: stopping.stop_sequences,
            ignore_eos: stopping.ignore_eos,
            min_new_tokens: stopping.min_new_tokens,
        },
        block_table: r.blocks,
    }
}

pub fn finish_reason(reason: Option<FinishReason>) -> pb::FinishReason {
    match reason {
        None => pb::FinishReason::Unspecified,
        Some(FinishReason::Length) => pb::FinishReason::Length,
        Some(FinishReason::EosToken) => pb::FinishReason::EosToken,
        Some(FinishReason::StopSequence) => pb::FinishReason::StopSequence,
    }
}

fn top_token(t: TopToken) -> pb::Token {
    pb::Token {
        id: t.id,
        logprob: t.logprob,
        text: t.text,
        special: t.special,
    }
}

pub fn generation(g: Generation) -> pb::Generation {
    pb::Generation {
        request_id: g.request_id,
        token: Some(pb::Token {
            id: g.token_id,
            logprob: g.logprob,
            text: g.text,
            special: g.special,
        }),
        top_tokens: g.top_tokens.into_iter().map(top_token).collect(),
        finish_reason: finish_reason(g.finish_reason) as i32,
        prompt_logprobs: g.prompt_logprobs.map(|p| pb::PromptLogprobs {
            logprobs: p.logprobs,
            top: p
                .top
                .into_iter()
                .map(|tokens| pb::TopTokens {
                    tokens: tokens.into_iter().map(top_token).collect(),
                })
                .collect(),
        }),
    }
}

pub fn cached_batch(b: CachedBatch) -> pb::CachedBatch {
    pb::CachedBatch {
        id: b.id,
        request_ids: b.request_ids,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_keeps_every_parameter() {
        let r = pb::Request {
            id: 7,
            input_ids: vec![1, 2, 3],
            sampling: Some(pb::SamplingParameters {
                temperature: 0.5,
                do_sample: true,
                top_k: 4,
                top_p: 0.9,
                typical_p: 0.8,
                min_p: 0.1,
                repetition_penalty: 1.1,
                frequency_penalty: 0.2,
                presence_penalty: 0.3,
                seed: 42,
                top_n_tokens: 2,
                logit_bias: [(9, -100.0)].into_iter().collect(),
                json_object: true,
            }),
            stopping: Some(pb::StoppingParameters {
                max_new_tokens: 9,
                stop_sequences: vec!["x".into()],
                ignore_eos: true,
                min_new_tokens: 2,
            }),
            blocks: vec![5, 6],
            cached_tokens: 2,
            prompt_logprobs: true,
            prefill_only: true,
        };
        let g = request(r, &[0, 2]);
        assert_eq!(g.id, 7);
        assert_eq!(g.prompt, vec![1, 2, 3]);
        assert_eq!(g.block_table, vec![5, 6]);
        assert_eq!(g.cached_tokens, 2);
        assert!(g.prompt_logprobs);
        assert!(g.prefill_only);
        assert_eq!(g.sampling.seed, Some(42));
        assert_eq!(g.sampling.top_k, 4);
        assert_eq!(g.sampling.top_n_tokens, 2);
        assert_eq!(g.sampling.logit_bias, vec![(9, -100.0)]);
        assert!(g.sampling.json_object);
        assert!(g.sampling.do_sample);
        assert_eq!(g.stopping.eos_token_ids, vec![0, 2]);
        assert_eq!(g.stopping.min_new_tokens, 2);
        assert!(g.stopping.ignore_eos);
        assert_eq!(g.stopping.stop_sequences, vec!["x".to_string()]);
    }

    #[test]
    fn finish_reasons_map_one_to_one() {
        assert_eq!(finish_reason(None), pb::FinishReason::Unspecified);
        assert_eq!(
            finish_reason(Some(FinishReason::EosToken)),
            pb::FinishReason::EosToken
        );
        assert_eq!(
            finish_reason(Some(FinishReason::StopSequence)),
            pb::FinishReason::StopSequence
        );
        assert_eq!(
            finish_reason(Some(FinishReason::Length)),
            pb::FinishReason::Length
        );
    }
}
