//! Helpers shared by the engine's integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

use tessera_shard::kv_cache::BlockAllocator;
use tessera_shard::sampling::SamplingParams;
use tessera_shard::stopping::StoppingCriteria;
use tessera_shard::{Engine, EngineConfig, GenerateRequest};

pub fn default_model() -> PathBuf {
    PathBuf::from(env!("TESSERA_BUILTIN_MODEL"))
}

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

pub fn load(path: &std::path::Path, kind: tch::Kind) -> Engine {
    Engine::load(
        path,
        &EngineConfig {
            kind,
            max_kv_tokens: 8192,
            ..EngineConfig::default()
        },
    )
    .unwrap_or_else(|e| panic!("loading {}: {e}", path.display()))
}

pub fn allocator(engine: &Engine) -> BlockAllocator {
    BlockAllocator::new(engine.cache().num_blocks(), engine.cache().block_size())
}

pub fn greedy_request(
    engine: &Engine,
    blocks: &mut BlockAllocator,
    id: u64,
    prompt: Vec<u32>,
    new_tokens: u32,
) -> GenerateRequest {
    sampled_request(
        engine,
        blocks,
        id,
        prompt,
        new_tokens,
        SamplingParams::default(),
    )
}

pub fn sampled_request(
    engine: &Engine,
    blocks: &mut BlockAllocator,
    id: u64,
    prompt: Vec<u32>,
    new_tokens: u32,
    sampling: SamplingParams,
) -> GenerateRequest {
    let block_table = blocks.allocate(prompt.len() + new_tokens as usize).unwrap();
    GenerateRequest {
        id,
        prompt,
        sampling,
        stopping: StoppingCriteria {
            max_new_tokens: new_tokens,
            eos_token_ids: engine.eos_ids().to_vec(),
            stop_sequences: Vec::new(),
            ignore_eos: true,
            min_new_tokens: 0,
        },
        block_table,
        cached_tokens: 0,
        prompt_logprobs: false,
        prefill_only: false,
    }
}

/// Runs `requests` to completion in one batch; returns each request's tokens, by id order given.
pub fn run_alone(engine: &mut Engine, request: GenerateRequest) -> Vec<u32> {
    let id = request.id;
    let (mut batch, first) = engine.prefill(vec![request]).unwrap();
    let mut tokens: Vec<u32> = first.iter().map(|g| g.token_id).collect();
    let mut done = first.iter().any(|g| g.finish_reason.is_some());
    while !done {
        let gens = engine.decode(&mut batch).unwrap();
        for g in gens {
            assert_eq!(g.request_id, id);
            tokens.push(g.token_id);
            done |= g.finish_reason.is_some();
        }
    }
    batch.filter(&[]);
    tokens
}
