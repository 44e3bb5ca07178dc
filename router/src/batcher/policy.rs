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
}

/// How many of the waiting requests (a prefix, first come first served) the
/// next prefill takes: within the prefill-token budget (the first request is
/// always taken when it fits the KV pool), the free KV blocks and the batch size.
pub fn admit(
    config: &BatchingConfig,
    waiting: impl IntoIterator<Item = Need>,
    running: usize,
    free_blocks: u64,
) -> usize {
    let mut taken = 0usize;
    let (mut tokens, mut blocks) = (0u64, 0u64);
    for need in waiting {
        if running + taken >= config.max_batch_size as usize {
            break;
        }
        if taken > 0 && tokens + need.input_tokens > config.max_batch_prefill_tokens as u64 {
            break;
        }
        if blocks + need.blocks > free_blocks {
            break;
        }
        tokens += need.input_tokens;
        blocks += need.blocks;
        taken += 1;
    }
    taken
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
        }
    }

    fn need(input_tokens: u64, blocks: u64) -> Need {
        Need {
            input_tokens,
            blocks,
        }
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
        // Prefill tokens: 60 + 30 fits 100, + 20 does not.
        assert_eq!(admit(&c, [need(60, 1), need(30, 1), need(20, 1)], 0, 10), 2);
        // A first request larger than the prefill budget still goes alone.
        assert_eq!(admit(&c, [need(150, 1), need(1, 1)], 0, 10), 1);
        // KV blocks: 3 + 3 > 5, and first come first served (no skipping ahead).
        assert_eq!(admit(&c, [need(1, 3), need(1, 3), need(1, 1)], 0, 5), 1);
        assert_eq!(admit(&c, [need(1, 6)], 0, 5), 0);
        // Batch size: 3 running + 1.
        assert_eq!(admit(&c, [need(1, 1), need(1, 1)], 3, 10), 1);
    }
}
