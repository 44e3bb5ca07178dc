//! Runs validated requests to the end (the non-streaming routes), several
//! at once for `best_of` and `n`.

use std::time::Instant;

use futures::StreamExt;

use crate::infer::{
    Infer, InferError, InferResponse, InferStream, InferStreamResponse, ValidGenerateRequest,
};

use super::request_metrics::GenerationStats;

/// A whole generation and when its first token arrived.
#[derive(Debug, Clone)]
pub struct Collected {
    pub response: InferResponse,
    pub first_token: Instant,
}

/// `request` once per seed `seed, seed + 1, ...` (`count` copies).
pub fn with_seeds(request: ValidGenerateRequest, count: u32) -> Vec<ValidGenerateRequest> {
    let seed = request.parameters.seed;
    (0..count)
        .map(|i| {
            let mut r = request.clone();
            r.parameters.seed = seed.wrapping_add(u64::from(i));
            r
        })
        .collect()
}

/// Queues every request (failing at once when one is refused) and waits for
/// all of them; the first error cancels the others.
pub async fn generate_all(
    infer: &Infer,
    requests: Vec<ValidGenerateRequest>,
) -> Result<Vec<Collected>, InferError> {
    let mut streams = Vec::with_capacity(requests.len());
    for request in requests {
        let input_length = request.input_ids.len() as u32;
        streams.push((input_length, infer.generate_stream(request)?));
    }
    futures::future::try_join_all(
        streams
            .into_iter()
            .map(|(input_length, stream)| collect(input_length, stream)),
    )
    .await
}

/// Reads a stream to its end.
pub async fn collect(input_length: u32, mut stream: InferStream) -> Result<Collected, InferError> {
    let mut tokens = Vec::new();
    let mut top_tokens = Vec::new();
    let mut first_token = None;
    let mut prompt_logprobs = None;
    while let Some(event) = stream.next().await {
        let event = event?;
        if let InferStreamResponse::Prompt(prompt) = event {
            prompt_logprobs = Some(prompt);
            continue;
        }
        first_token.get_or_insert_with(Instant::now);
        match event {
            InferStreamResponse::Prompt(_) => {}
            InferStreamResponse::Intermediate {
                token,
                top_tokens: top,
            } => {
                tokens.push(token);
                top_tokens.push(top);
            }
            InferStreamResponse::End {
                token,
                top_tokens: top,
                generated_text,
                queued,
                start,
            } => {
                tokens.push(token);
                top_tokens.push(top);
                return Ok(Collected {
                    response: InferResponse {
                        input_length,
                        tokens,
                        top_tokens,
                        generated_text,
                        prompt_logprobs,
                        queued,
                        start,
                    },
                    first_token: first_token.unwrap_or_else(Instant::now),
                });
            }
        }
    }
    Err(InferError::IncompleteGeneration)
}

/// Metrics of several sequences of one request: tokens summed, the earliest
/// queue and prefill times.
pub fn combined_stats(input_tokens: u32, collected: &[Collected]) -> Option<GenerationStats> {
    let queued = collected.iter().map(|c| c.response.queued).min()?;
    let start = collected.iter().map(|c| c.response.start).min()?;
    Some(GenerationStats {
        input_tokens,
        generated_tokens: collected
            .iter()
            .map(|c| c.response.generated_text.generated_tokens)
            .sum(),
        queued,
        start,
    })
}

/// The earliest first token of several sequences.
pub fn first_token(collected: &[Collected]) -> Option<Instant> {
    collected.iter().map(|c| c.first_token).min()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::infer::{ValidParameters, ValidStopping};

    #[test]
    fn seeds_count_up() {
        let request = ValidGenerateRequest {
            inputs: "x".into(),
            input_ids: vec![1],
            parameters: ValidParameters {
                seed: u64::MAX,
                ..Default::default()
            },
            stopping: ValidStopping::default(),
            prompt_logprobs: false,
        };
        let seeds: Vec<u64> = with_seeds(request, 3)
            .iter()
            .map(|r| r.parameters.seed)
            .collect();
        assert_eq!(seeds, vec![u64::MAX, 0, 1]);
    }
}
