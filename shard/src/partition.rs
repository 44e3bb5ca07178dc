//! How a model's weights are split over the ranks of a tensor-parallel group (the
//! "model parallelism by vectors" of Megatron-LM):
//!
//! - attention: each rank owns `heads / world` query heads and their KV heads (q, k, v
//!   are column-parallel); when there are fewer KV heads than ranks, each KV head is
//!   replicated on the ranks whose query heads use it. `o_proj` is row-parallel: each
//!   rank multiplies its heads' slice and the partial sums are all-reduced.
//! - MLP: gate and up are column-parallel over the intermediate size, down is
//!   row-parallel (all-reduce).
//! - vocabulary: the embedding and the output head are split by rows (token ids); the
//!   embedding's partial lookups are all-reduced and the logits all-gathered.
//!
//! The plan is made from the configuration alone, so an impossible split is refused
//! before any weight is read.

use std::ops::Range;

use tessera_model::config::ModelConfig;

use crate::error::{EngineError, Result};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    pub rank: usize,
    pub world: usize,
    /// This rank's query heads.
    pub heads: Range<usize>,
    /// Its KV heads (shared with other ranks when replicated).
    pub kv_heads: Range<usize>,
    /// Its slice of the MLP's intermediate size.
    pub intermediate: Range<usize>,
    /// Its token ids.
    pub vocab: Range<usize>,
    /// Rows of every rank's vocabulary slice before padding: the all-gathered logits
    /// have `world * vocab_chunk` columns, of which the first `vocab_size` are real.
    pub vocab_chunk: usize,
}

impl Partition {
    /// The whole model on one rank.
    pub fn single(config: &ModelConfig) -> Self {
        Self {
            rank: 0,
            world: 1,
            heads: 0..config.num_heads,
            kv_heads: 0..config.num_kv_heads,
            intermediate: 0..config.intermediate_size,
            vocab: 0..config.vocab_size,
            vocab_chunk: config.vocab_size,
        }
    }

    /// Rank `rank`'s part of `config` over `world` ranks, or why it cannot be split.
    pub fn plan(config: &ModelConfig, rank: usize, world: usize) -> Result<Self> {
        let refuse = |why: String| {
            EngineError::Partition(format!(
                "the model cannot be split over {world} shards: {why}"
            ))
        };
        if world == 0 || rank >= world {
            return Err(refuse(format!("rank {rank} is outside 0..{world}")));
        }
        let (heads, kv_heads) = (config.num_heads, config.num_kv_heads);
        if !heads.is_multiple_of(world) {
            return Err(refuse(format!(
                "its {heads} attention heads do not divide by {world}"
            )));
        }
        if !config.intermediate_size.is_multiple_of(world) {
            return Err(refuse(format!(
                "its MLP size {} does not divide by {world}",
                config.intermediate_size
            )));
        }
        if kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
            return Err(refuse(format!(
                "{heads} query heads cannot share {kv_heads} KV heads"
            )));
        }
        let per_rank = heads / world;
        let group = heads / kv_heads;
        let kv = if kv_heads.is_multiple_of(world) {
            let n = kv_heads / world;
            rank * n..(rank + 1) * n
        } else if world.is_multiple_of(kv_heads) {
            // Fewer KV heads than ranks: each rank's query heads fall within one KV
            // head's group (per_rank divides group), whose KV head it keeps a copy of.
            let kv = rank * per_rank / group;
            kv..kv + 1
        } else {
            return Err(refuse(format!(
                "its {kv_heads} KV heads neither divide by {world} nor divide {world}"
            )));
        };
        let vocab_chunk = config.vocab_size.div_ceil(world);
        let vocab_start = (rank * vocab_chunk).min(config.vocab_size);
        let vocab_end = ((rank + 1) * vocab_chunk).min(config.vocab_size);
        if vocab_start == vocab_end {
            return Err(refuse(format!(
                "its vocabulary of {} is too small",
                config.vocab_size
            )));
        }
        let inter = config.intermediate_size / world;
        Ok(Self {
            rank,
            world,
            heads: rank * per_rank..(rank + 1) * per_rank,
            kv_heads: kv,
            intermediate: rank * inter..(rank + 1) * inter,
            vocab: vocab_start..vocab_end,
            vocab_chunk,
        })
    }

    pub fn is_single(&self) -> bool {
        self.world == 1
    }

    pub fn num_heads(&self) -> usize {
        self.heads.len()
    }

    pub fn num_kv_heads(&self) -> usize {
        self.kv_heads.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_model::config::Architecture;

    fn config(heads: usize, kv: usize, inter: usize, vocab: usize) -> ModelConfig {
        ModelConfig {
            architecture: Architecture::Llama,
            vocab_size: vocab,
            hidden_size: heads * 64,
            intermediate_size: inter,
            num_layers: 2,
            num_heads: heads,
            num_kv_heads: kv,
            head_dim: 64,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            rope_scaling: None,
            max_position_embeddings: 2048,
            tie_word_embeddings: true,
            attention_bias: false,
        }
    }

    #[test]
    fn smollm2_over_three_ranks_gives_one_kv_head_each() {
        let c = config(9, 3, 1536, 49152);
        let parts: Vec<_> = (0..3).map(|r| Partition::plan(&c, r, 3).unwrap()).collect();
        assert_eq!(parts[1].heads, 3..6);
        assert_eq!(parts[1].kv_heads, 1..2);
        assert_eq!(parts[2].intermediate, 1024..1536);
        assert_eq!(parts[2].vocab, 32768..49152);
        assert_eq!(parts[0].vocab_chunk, 16384);
    }

    #[test]
    fn fewer_kv_heads_than_ranks_are_replicated() {
        // 8 query heads, 2 KV heads (groups of 4), 4 ranks of 2 query heads each.
        let c = config(8, 2, 64, 100);
        let kv: Vec<_> = (0..4)
            .map(|r| Partition::plan(&c, r, 4).unwrap().kv_heads)
            .collect();
        assert_eq!(kv, vec![0..1, 0..1, 1..2, 1..2]);
        // An uneven vocabulary: the last rank holds the remainder.
        let last = Partition::plan(&c, 3, 4).unwrap();
        assert_eq!(last.vocab, 75..100);
    }

    #[test]
    fn impossible_splits_are_refused_with_the_reason() {
        let c = config(9, 3, 1536, 49152);
        let err = Partition::plan(&c, 0, 2).unwrap_err().to_string();
        assert!(err.contains("9 attention heads"), "{err}");
        let c = config(8, 8, 100, 1000);
        let err = Partition::plan(&c, 0, 8).unwrap_err().to_string();
        assert!(err.contains("MLP size 100"), "{err}");
        let c = config(12, 3, 120, 1000);
        let err = Partition::plan(&c, 0, 4).unwrap_err().to_string();
        assert!(err.contains("3 KV heads"), "{err}");
        assert!(Partition::plan(&c, 5, 4).is_err());
    }

    #[test]
    fn one_rank_is_the_whole_model() {
        let c = config(9, 3, 1536, 49152);
        assert_eq!(Partition::plan(&c, 0, 1).unwrap(), Partition::single(&c));
    }
}
