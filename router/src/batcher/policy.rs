//! When to prefill waiting requests and which ones: pure decisions, tested
//! without shards.

use crate::config::BatchingConfig;

/// Whether to interrupt decoding to prefill the waiting requests now.
///
/// Always when nothing runs. Otherwise when the waiting requests are at least
/// `waiting_served_ratio` of the running ones (many waiting: prefill them
/// together), or when the oldest has waited `max_waiting_tokens` decode steps
/// (few waiting: do not let them starve).
pub fn should_prefill(
    config: &BatchingConfig,
    waiting: usize,
    running: usize,
    steps_since_prefill: u32,
) -> bool {
    if waiting == 0 || running >= config.max_batch_size as usize {
        return false;
    }
    if running == 0 {
        return true;
    }
    waiting as f32 >= config.waiting_served_ratio * running as f32
        || steps_since_prefill >= config.max_waiting_tokens
}

/// What a waiting request needs to be admitted.
#[derive(Debug, Clone, Copy)]
pub struct Need {
    pub input_tokens: u64,
    pub blocks: u64,
    /// Its prompt may be prefilled in chunks (not when it asks for the prompt's
    /// log-probabilities, which come from one pass over the whole prompt).
    pub chunkable: bool,
}

/// What the next prefill takes from the head of the queue.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Admission {
    /// Requests prefilled whole (a prefix of the queue).
    pub whole: usize,
    /// The request after them starts a chunked prefill with a first chunk of this
    /// many prompt tokens.
    pub chunk: Option<u64>,
}

/// What the next prefill takes of the waiting requests (first come, first served,
/// no skipping ahead): within the prefill-token budget, of which `used` tokens
/// already go to a chunk of an earlier prompt, the free KV blocks and the batch
/// size (`running` counts every request already in the batch or being prefilled).
///
/// With `can_chunk` (chunked prefill on and no other prompt in chunks), a request
/// larger than the whole budget starts a chunked prefill with the rest of the budget
/// when it comes up; one that fits the budget but not its rest waits for the next
/// step, where it goes whole (splitting it would only add forward passes, and on a
/// CPU a pass of fewer rows runs its matmuls less efficiently). Without `can_chunk`
/// a request larger than the whole budget goes alone, so that every prompt that fits
/// the KV pool is served.
pub fn admit(
    config: &BatchingConfig,
    waiting: impl IntoIterator<Item = Need>,
    running: usize,
    free_blocks: u64,
    used: u64,
    can_chunk: bool,
) -> Admission {
    let budget = u64::from(config.max_batch_prefill_tokens);
    let mut admission = Admission::default();
    let (mut tokens, mut blocks) = (used, 0u64);
    for need in waiting {
        if running + admission.whole >= config.max_batch_size as usize {
            break;
        }
        if blocks + need.blocks > free_blocks {
            break;
        }
        if tokens + need.input_tokens <= budget || tokens == 0 && !(can_chunk && need.chunkable) {
            tokens += need.input_tokens;
            blocks += need.blocks;
            admission.whole += 1;
            if tokens > budget {
                // A prompt larger than the budget, alone.
                break;
            }
            continue;
        }
        if can_chunk && need.chunkable && need.input_tokens > budget && tokens < budget {
            admission.chunk = Some(budget - tokens);
        }
        break;
    }
    admission
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> BatchingConfig {
        BatchingConfig {
            max_batch_prefill_tokens: 100,
            max_batch_total_tokens: 0,
            max_batch_size: 4,
            max_waiting_tokens: 5,
            waiting_served_ratio: 0.5,
            decode_in_prefill: true,
            prefix_caching: true,
            chunked_prefill: true,
        }
    }

    fn need(input_tokens: u64, blocks: u64) -> Need {
        Need {
            input_tokens,
            blocks,
            chunkable: true,
        }
    }

    fn whole(whole: usize) -> Admission {
        Admission { whole, chunk: None }
    }

    #[test]
    fn prefills_when_idle_many_waiting_or_waited_long() {
        let c = config();
        assert!(!should_prefill(&c, 0, 0, 0));
        assert!(should_prefill(&c, 1, 0, 0));
        assert!(!should_prefill(&c, 1, 3, 0), "1 < 0.5 * 3 and no wait yet");
        assert!(should_prefill(&c, 2, 3, 0));
        assert!(
            should_prefill(&c, 1, 3, 5),
            "waited max_waiting_tokens steps"
        );
        assert!(!should_prefill(&c, 3, 4, 9), "batch full");
    }

    #[test]
    fn admits_a_prefix_within_every_budget() {
        let c = config();
        let admit =
            |waiting: &[Need], running, free| admit(&c, waiting.to_vec(), running, free, 0, false);
        // Prefill tokens: 60 + 30 fits 100, + 20 does not.
        assert_eq!(
            admit(&[need(60, 1), need(30, 1), need(20, 1)], 0, 10),
            whole(2)
        );
        // A first request larger than the prefill budget still goes alone.
        assert_eq!(admit(&[need(150, 1), need(1, 1)], 0, 10), whole(1));
        // KV blocks: 3 + 3 > 5, and first come first served (no skipping ahead).
        assert_eq!(admit(&[need(1, 3), need(1, 3), need(1, 1)], 0, 5), whole(1));
        assert_eq!(admit(&[need(1, 6)], 0, 5), whole(0));
        // Batch size: 3 running + 1.
        assert_eq!(admit(&[need(1, 1), need(1, 1)], 3, 10), whole(1));
    }

    #[test]
    fn the_first_prompt_past_the_budget_starts_a_chunked_prefill() {
        let c = config();
        let chunked = |whole, chunk| Admission {
            whole,
            chunk: Some(chunk),
        };
        // 60 fits; 170 more would not, nor ever whole: its first chunk takes the
        // remaining 40.
        assert_eq!(
            admit(&c, [need(60, 1), need(170, 1), need(1, 1)], 0, 10, 0, true),
            chunked(1, 40)
        );
        // 70 would fit a step of its own: it waits for the next one, whole.
        assert_eq!(
            admit(&c, [need(60, 1), need(70, 1), need(1, 1)], 0, 10, 0, true),
            whole(1)
        );
        // Larger than the whole budget: chunked from the start.
        assert_eq!(admit(&c, [need(150, 1)], 0, 10, 0, true), chunked(0, 100));
        // 30 tokens of this step already go to another prompt's last piece.
        assert_eq!(
            admit(&c, [need(50, 1), need(150, 1)], 0, 10, 30, true),
            chunked(1, 20)
        );
        assert_eq!(
            admit(&c, [need(50, 1), need(50, 1)], 0, 10, 30, true),
            whole(1)
        );
        // The budget is spent: nothing more this step.
        assert_eq!(admit(&c, [need(5, 1)], 0, 10, 100, true), whole(0));
        // Another prompt is in chunks: no second one; a whole one that fits still goes.
        assert_eq!(
            admit(&c, [need(20, 1), need(90, 1)], 0, 10, 30, false),
            whole(1)
        );
        // Blocks are checked for the chunked prompt too (it holds all its blocks).
        assert_eq!(admit(&c, [need(150, 6)], 0, 5, 0, true), whole(0));
        // A prompt whose log-probabilities were asked for is not chunked: it waits
        // for a step of its own, and then goes alone.
        let scored = Need {
            chunkable: false,
            ..need(150, 1)
        };
        assert_eq!(admit(&c, [need(10, 1), scored], 0, 10, 0, true), whole(1));
        assert_eq!(admit(&c, [scored, need(10, 1)], 0, 10, 0, true), whole(1));
    }
}
