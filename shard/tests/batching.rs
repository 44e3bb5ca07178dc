//! Batch invariance and seeded sampling on the default model.

mod common;

use std::collections::BTreeMap;

use common::*;
use tessera_shard::sampling::SamplingParams;

const PROMPTS: [&str; 8] = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea,",
    "List three primary colors:\n1.",
    "La capitale de l'Italie est",
    "Water boils at",
    "The quick brown fox jumps over the lazy dog. The quick brown fox",
    "Q: What is 12 times 12?\nA:",
];

#[test]
fn batched_decoding_with_joins_equals_each_prompt_alone() {
    joins_equal_each_prompt_alone(load(&default_model(), tch::Kind::Float), false);
}

/// Newcomers prefilled in the same forward pass as the running batch's decode step
/// (`prefill_and_decode`), with the in-place CPU attention and with the grouped
/// attention CUDA uses (forced here on the CPU): every request still gets exactly its
/// solo tokens.
#[test]
fn joins_sharing_the_decode_step_equal_each_prompt_alone() {
    for grouped in [false, true] {
        joins_equal_each_prompt_alone(f32_engine(grouped), true);
    }
}

/// The default model in f32; with `grouped`, decode attention gathers into padded
/// groups and runs batched matmuls (CUDA's path) instead of the in-place CPU kernel.
fn f32_engine(grouped: bool) -> tessera_shard::Engine {
    tessera_shard::Engine::load(
        &default_model(),
        &tessera_shard::EngineConfig {
            kind: tch::Kind::Float,
            max_kv_tokens: 8192,
            grouped_decode_attention: grouped,
            ..tessera_shard::EngineConfig::default()
        },
    )
    .expect("loading the default model")
}

/// Two prompts start; two more join after 1 step, three after 3 steps, the last after
/// 5; with `fused`, a join's prefill also takes the running batch's step.
fn joins_equal_each_prompt_alone(mut engine: tessera_shard::Engine, fused: bool) {
    let mut blocks = allocator(&engine);
    let new_tokens = 12u32;
    let prompts: Vec<Vec<u32>> = PROMPTS.iter().map(|p| engine.encode(p).unwrap()).collect();

    let mut alone = BTreeMap::new();
    for (i, p) in prompts.iter().enumerate() {
        let r = greedy_request(&engine, &mut blocks, i as u64, p.clone(), new_tokens);
        let table = r.block_table.clone();
        alone.insert(i as u64, run_alone(&mut engine, r));
        blocks.release(table);
    }

    let joins: [(usize, &[usize]); 4] = [(0, &[0, 1]), (1, &[2, 3]), (3, &[4, 5, 6]), (5, &[7])];
    let mut together: BTreeMap<u64, Vec<u32>> = BTreeMap::new();
    let mut batch = tessera_shard::Batch::default();
    let mut step = 0;
    loop {
        let mut stepped = false;
        for (at, ids) in joins {
            if at == step {
                let requests = ids
                    .iter()
                    .map(|&i| {
                        greedy_request(
                            &engine,
                            &mut blocks,
                            i as u64,
                            prompts[i].clone(),
                            new_tokens,
                        )
                    })
                    .collect();
                let (joined, generations) = if fused && !batch.is_empty() {
                    stepped = true;
                    let (joined, first, advanced) =
                        engine.prefill_and_decode(requests, &mut batch).unwrap();
                    assert_eq!(
                        advanced.len(),
                        batch.len(),
                        "every running sequence advanced"
                    );
                    (joined, advanced.into_iter().chain(first).collect())
                } else {
                    engine.prefill(requests).unwrap()
                };
                for g in generations {
                    together.entry(g.request_id).or_default().push(g.token_id);
                }
                batch.merge(joined);
            }
        }
        if !stepped {
            for g in engine.decode(&mut batch).unwrap() {
                together.entry(g.request_id).or_default().push(g.token_id);
            }
        }
        for (_, table) in batch.remove_finished() {
            blocks.release(table);
        }
        step += 1;
        if batch.is_empty() && step > 5 {
            break;
        }
    }
    assert_eq!(together.len(), 8);
    for (id, tokens) in &together {
        assert_eq!(tokens.len(), new_tokens as usize, "request {id}");
        assert_eq!(
            tokens, &alone[id],
            "request {id} ({:?}) differs when batched",
            PROMPTS[*id as usize]
        );
    }
}

#[test]
fn seeds_make_sampling_reproducible_and_distinct() {
    let mut engine = load(&default_model(), tch::Kind::Float);
    let mut blocks = allocator(&engine);
    let prompt = engine.encode("Write a short poem about the sea:").unwrap();
    let mut sample = |seed: u64| {
        let params = SamplingParams {
            temperature: 1.0,
            do_sample: true,
            top_p: 0.95,
            seed: Some(seed),
            ..SamplingParams::default()
        };
        let r = sampled_request(&engine, &mut blocks, seed, prompt.clone(), 24, params);
        let table = r.block_table.clone();
        let tokens = run_alone(&mut engine, r);
        blocks.release(table);
        tokens
    };
    let a = sample(7);
    let b = sample(7);
    let c = sample(8);
    assert_eq!(a, b, "the same seed must give the same tokens");
    assert_ne!(a, c, "different seeds should give different tokens");
}

#[test]
fn stop_sequences_and_eos_end_generation_with_their_reason() {
    use tessera_shard::stopping::FinishReason;
    let mut engine = load(&default_model(), tch::Kind::Float);
    let mut blocks = allocator(&engine);
    let prompt = engine.encode("The capital of France is").unwrap();

    // The reference continuation is " Paris.\n\nThe answer is: ..." and reaches <|im_end|> at step 29.
    let mut stop = greedy_request(&engine, &mut blocks, 1, prompt.clone(), 32);
    stop.stopping.stop_sequences = vec!["\n\nThe".into()];
    let mut eos = greedy_request(&engine, &mut blocks, 2, prompt, 40);
    eos.stopping.ignore_eos = false;

    let (mut batch, mut gens) = engine.prefill(vec![stop, eos]).unwrap();
    let mut finished = std::collections::HashMap::new();
    let mut counts = std::collections::HashMap::new();
    loop {
        for g in &gens {
            *counts.entry(g.request_id).or_insert(0) += 1;
            if let Some(reason) = g.finish_reason {
                finished.insert(
                    g.request_id,
                    (
                        reason,
                        batch.generated_text(g.request_id).unwrap().to_string(),
                    ),
                );
            }
        }
        batch.remove_finished();
        if batch.is_empty() {
            break;
        }
        gens = engine.decode(&mut batch).unwrap();
    }
    let (reason, text) = &finished[&1];
    assert_eq!(*reason, FinishReason::StopSequence);
    assert_eq!(text, " Paris.", "text before the stop sequence");
    let (reason, _) = &finished[&2];
    assert_eq!(*reason, FinishReason::EosToken);
    assert_eq!(counts[&2], 30, "EOS is the 30th generated token");
}

#[test]
fn half_precisions_run_on_safetensors_models() {
    for kind in [tch::Kind::Half, tch::Kind::BFloat16] {
        let mut engine = load(&repo_root().join("fixtures/reference/tiny-qwen2"), kind);
        let mut blocks = allocator(&engine);
        let r = greedy_request(&engine, &mut blocks, 0, vec![5, 17, 42, 99], 16);
        let tokens = run_alone(&mut engine, r);
        assert_eq!(tokens.len(), 16);
        assert!(tokens
            .iter()
            .all(|&t| (t as usize) < engine.model_config().vocab_size));
    }
}

/// Contexts of very different lengths in one decode step: each sequence still gets
/// exactly its solo tokens, with the in-place CPU kernel and with the grouped
/// gather-and-matmul attention (CUDA's path, forced here on the CPU).
#[test]
fn decoding_contexts_of_very_different_lengths_equals_each_alone() {
    for grouped in [false, true] {
        mixed_lengths_equal_each_alone(f32_engine(grouped));
    }
}

fn mixed_lengths_equal_each_alone(mut engine: tessera_shard::Engine) {
    let mut blocks = allocator(&engine);
    let new_tokens = 8u32;
    let long = "The history of the city is long and full of events. ".repeat(60);
    let medium = "A short story about a cat who liked to sit by the window. ".repeat(12);
    let texts = [
        "The capital of France is".to_string(),
        "Water boils at".to_string(),
        medium.clone(),
        format!("{medium} And then"),
        long.clone(),
        format!("{long} Finally,"),
    ];
    let prompts: Vec<Vec<u32>> = texts.iter().map(|p| engine.encode(p).unwrap()).collect();
    assert!(
        prompts[4].len() > 500 && prompts[0].len() < 10,
        "lengths far apart"
    );

    let mut alone = BTreeMap::new();
    for (i, p) in prompts.iter().enumerate() {
        let r = greedy_request(&engine, &mut blocks, i as u64, p.clone(), new_tokens);
        let table = r.block_table.clone();
        alone.insert(i as u64, run_alone(&mut engine, r));
        blocks.release(table);
    }
    let requests = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| greedy_request(&engine, &mut blocks, i as u64, p.clone(), new_tokens))
        .collect();
    let (mut batch, first) = engine.prefill(requests).unwrap();
    let mut together: BTreeMap<u64, Vec<u32>> = BTreeMap::new();
    for g in first {
        together.entry(g.request_id).or_default().push(g.token_id);
    }
    while !batch.is_empty() {
        for g in engine.decode(&mut batch).unwrap() {
            together.entry(g.request_id).or_default().push(g.token_id);
        }
        batch.remove_finished();
    }
    for (id, tokens) in &together {
        assert_eq!(tokens, &alone[id], "request {id} differs when batched");
    }
    assert_eq!(together.len(), prompts.len());
}

/// Prefix caching: a request whose first blocks already hold another request's keys
/// and values for the same prefix (`cached_tokens`) computes only the rest of its
/// prompt and still gets exactly its solo tokens, alone, batched with a fresh prompt,
/// and inside a running batch's decode step; down to a single uncached token.
#[test]
fn prompts_after_a_cached_prefix_equal_each_prompt_alone() {
    let mut engine = load(&default_model(), tch::Kind::Float);
    let mut blocks = allocator(&engine);
    let block = engine.cache().block_size();
    let new_tokens = 10u32;
    let system = "You are a helpful assistant who answers in one short sentence. ".repeat(3);
    let first = engine
        .encode(&format!("{system}Q: What is the capital of France?\nA:"))
        .unwrap();
    let cached_blocks = (first.len() - 1) / block;
    assert!(cached_blocks >= 2, "the prefix spans blocks");
    let prefix = &first[..cached_blocks * block];
    // Prompts that share the first request's cached blocks: a new question, the same
    // prompt again, and the prefix plus one token.
    let mut second = prefix.to_vec();
    second.extend(engine.encode(" Q: Name a primary color.\nA:").unwrap());
    let mut exact = prefix.to_vec();
    exact.push(first[prefix.len()]);
    let followers = [second, first.clone(), exact];

    let alone: Vec<Vec<u32>> = followers
        .iter()
        .map(|p| {
            let r = greedy_request(&engine, &mut blocks, 100, p.clone(), new_tokens);
            let table = r.block_table.clone();
            let tokens = run_alone(&mut engine, r);
            blocks.release(table);
            tokens
        })
        .collect();

    // The first request fills the prefix's blocks and keeps them.
    let owner = greedy_request(&engine, &mut blocks, 0, first.clone(), new_tokens);
    let shared: Vec<u32> = owner.block_table[..cached_blocks].to_vec();
    let (mut running, _) = engine.prefill(vec![owner]).unwrap();
    engine.decode(&mut running).unwrap();

    let follower = |engine: &tessera_shard::Engine,
                    blocks: &mut tessera_shard::kv_cache::BlockAllocator,
                    id: u64,
                    prompt: &Vec<u32>| {
        let mut r = greedy_request(engine, blocks, id, prompt.clone(), new_tokens);
        // Its own blocks for the rest; the shared ones for the prefix.
        let own = r.block_table.split_off(cached_blocks);
        blocks.release(r.block_table.clone());
        r.block_table = shared.iter().copied().chain(own).collect();
        r.cached_tokens = cached_blocks * block;
        r
    };
    for (i, prompt) in followers.iter().enumerate() {
        // Alone, and batched with a fresh prompt of its own.
        let r = follower(&engine, &mut blocks, 1, prompt);
        let fresh = greedy_request(&engine, &mut blocks, 2, followers[0].clone(), new_tokens);
        for (batched, requests) in [(false, vec![r.clone()]), (true, vec![fresh, r])] {
            let (mut batch, first_tokens) = engine.prefill(requests).unwrap();
            let mut tokens: Vec<u32> = first_tokens
                .iter()
                .filter(|g| g.request_id == 1)
                .map(|g| g.token_id)
                .collect();
            while !batch.is_empty() {
                for g in engine.decode(&mut batch).unwrap() {
                    if g.request_id == 1 {
                        tokens.push(g.token_id);
                    }
                }
                batch.remove_finished();
            }
            assert_eq!(tokens, alone[i], "follower {i}, batched {batched}");
        }
        // Inside the running batch's decode step.
        let r = follower(&engine, &mut blocks, 3, prompt);
        let (mut joined, first_tokens, _) =
            engine.prefill_and_decode(vec![r], &mut running).unwrap();
        let mut tokens: Vec<u32> = first_tokens.iter().map(|g| g.token_id).collect();
        while !joined.is_empty() {
            tokens.extend(
                engine
                    .decode(&mut joined)
                    .unwrap()
                    .iter()
                    .map(|g| g.token_id),
            );
            joined.remove_finished();
        }
        assert_eq!(tokens, alone[i], "follower {i} inside a decode step");
    }
}

/// Prompt log-probabilities (`prompt_logprobs`) equal the log-softmax of the logits
/// after each prefix of the prompt, computed alone; asking for them changes no
/// sampled token, alone, beside a request that does not ask, or inside a decode step.
#[test]
fn prompt_logprobs_equal_each_prefix_scored_alone() {
    let mut engine = f32_engine(false);
    let mut blocks = allocator(&engine);
    let prompt = engine.encode(PROMPTS[2]).unwrap();
    let other = engine.encode(PROMPTS[0]).unwrap();
    let new_tokens = 6u32;

    // The reference: each prefix's last logits, through a fresh prefill each.
    let mut expected = Vec::new();
    for end in 1..prompt.len() {
        let table = blocks.allocate(end + 1).unwrap();
        let logits = engine.last_logits(&prompt[..end], &table).unwrap();
        blocks.release(table);
        let max = logits.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
        let sum: f64 = logits.iter().map(|&x| (x as f64 - max).exp()).sum();
        let target = prompt[end] as usize;
        expected.push((logits[target] as f64 - max - sum.ln()) as f32);
    }

    let solo = {
        let r = greedy_request(&engine, &mut blocks, 1, prompt.clone(), new_tokens);
        run_alone(&mut engine, r)
    };
    let with_top = |engine: &tessera_shard::Engine,
                    blocks: &mut tessera_shard::kv_cache::BlockAllocator,
                    id: u64| {
        let mut r = greedy_request(engine, blocks, id, prompt.clone(), new_tokens);
        r.prompt_logprobs = true;
        r.sampling.top_n_tokens = 3;
        r
    };
    let check = |g: &tessera_shard::Generation, how: &str| {
        let p = g
            .prompt_logprobs
            .as_ref()
            .unwrap_or_else(|| panic!("{how}: none"));
        assert_eq!(p.logprobs.len(), prompt.len() - 1, "{how}");
        for (i, (got, want)) in p.logprobs.iter().zip(&expected).enumerate() {
            assert!(
                (got - want).abs() < 1e-4,
                "{how}: token {}: {got} vs {want}",
                i + 1
            );
        }
        assert_eq!(p.top.len(), prompt.len() - 1, "{how}");
        for (top, got) in p.top.iter().zip(&p.logprobs) {
            assert_eq!(top.len(), 3, "{how}");
            assert!(top[0].logprob >= top[1].logprob && top[1].logprob >= top[2].logprob);
            assert!(
                top[0].logprob >= *got - 1e-6,
                "{how}: the best is at least the chosen"
            );
        }
    };

    // Alone.
    let r = with_top(&engine, &mut blocks, 2);
    let (mut batch, first) = engine.prefill(vec![r]).unwrap();
    check(&first[0], "alone");
    let mut tokens = vec![first[0].token_id];
    while tokens.len() < new_tokens as usize {
        let g = engine.decode(&mut batch).unwrap();
        assert!(g[0].prompt_logprobs.is_none(), "only on the first token");
        tokens.push(g[0].token_id);
    }
    assert_eq!(tokens, solo, "asking for prompt logprobs changes no token");

    // Beside a request that does not ask, and inside a running batch's decode step.
    let plain = greedy_request(&engine, &mut blocks, 3, other.clone(), new_tokens);
    let plain_solo = {
        let r = greedy_request(&engine, &mut blocks, 4, other.clone(), new_tokens);
        run_alone(&mut engine, r)
    };
    let (mut running, started) = engine.prefill(vec![plain]).unwrap();
    assert!(started[0].prompt_logprobs.is_none());
    let joining = vec![
        with_top(&engine, &mut blocks, 5),
        greedy_request(&engine, &mut blocks, 6, other.clone(), new_tokens),
    ];
    let (mut joined, fresh, stepped) = engine.prefill_and_decode(joining, &mut running).unwrap();
    check(&fresh[0], "joining a running batch");
    assert!(fresh[1].prompt_logprobs.is_none());
    assert_eq!(fresh[0].token_id, solo[0]);
    assert_eq!(fresh[1].token_id, plain_solo[0]);
    assert_eq!(
        stepped[0].token_id, plain_solo[1],
        "the running request's step"
    );
    let g: BTreeMap<u64, u32> = engine
        .decode(&mut joined)
        .unwrap()
        .iter()
        .map(|g| (g.request_id, g.token_id))
        .collect();
    assert_eq!((g[&5], g[&6]), (solo[1], plain_solo[1]));
}

/// Chunked prefill: a prompt whose keys and values are written by prefill-only chunks
/// (alone, beside a prompt that starts a sequence, and inside a running batch's decode
/// step, at boundaries that do not fall on KV blocks), then finished by an ordinary
/// request that continues from the last chunk, gets exactly the tokens of the prompt
/// prefilled whole; the requests around the chunks get their own solo tokens.
#[test]
fn a_prompt_prefilled_in_chunks_equals_the_prompt_whole() {
    for grouped in [false, true] {
        let mut engine = f32_engine(grouped);
        let mut blocks = allocator(&engine);
        let new_tokens = 10u32;
        let prompt = engine.encode(&PROMPTS.join(" ")).unwrap();
        let other = engine.encode(PROMPTS[3]).unwrap();
        let ends = [7usize, 23, 41];
        assert!(prompt.len() > ends[2] + 1, "{} prompt tokens", prompt.len());

        let r = greedy_request(&engine, &mut blocks, 100, prompt.clone(), new_tokens);
        let table = r.block_table.clone();
        let alone = run_alone(&mut engine, r);
        blocks.release(table);
        let r = greedy_request(&engine, &mut blocks, 101, other.clone(), new_tokens);
        let table = r.block_table.clone();
        let other_alone = run_alone(&mut engine, r);
        blocks.release(table);

        let whole = greedy_request(&engine, &mut blocks, 1, prompt.clone(), new_tokens);
        let chunk = |start: usize, end: usize| {
            let mut c = whole.clone();
            c.prompt.truncate(end);
            c.cached_tokens = start;
            c.prefill_only = true;
            c
        };
        // The first chunk alone: nothing comes back and nothing is kept.
        let (batch, generations) = engine.prefill(vec![chunk(0, ends[0])]).unwrap();
        assert!(batch.is_empty() && generations.is_empty());
        // The second beside a prompt that starts its sequence.
        let starter = greedy_request(&engine, &mut blocks, 2, other.clone(), new_tokens);
        let (mut running, generations) = engine
            .prefill(vec![chunk(ends[0], ends[1]), starter])
            .unwrap();
        assert_eq!(running.ids(), vec![2]);
        let mut other_tokens: Vec<u32> = generations.iter().map(|g| g.token_id).collect();
        // The third inside that sequence's decode step.
        let (fresh, generations, advanced) = engine
            .prefill_and_decode(vec![chunk(ends[1], ends[2])], &mut running)
            .unwrap();
        assert!(fresh.is_empty() && generations.is_empty());
        other_tokens.extend(advanced.iter().map(|g| g.token_id));
        // The rest as an ordinary request that continues from the chunks.
        let mut last = whole.clone();
        last.cached_tokens = ends[2];
        let (mut batch, first) = engine.prefill(vec![last]).unwrap();
        let mut tokens: Vec<u32> = first.iter().map(|g| g.token_id).collect();
        batch.merge(running);
        while !batch.is_empty() {
            for g in engine.decode(&mut batch).unwrap() {
                match g.request_id {
                    1 => tokens.push(g.token_id),
                    _ => other_tokens.push(g.token_id),
                }
            }
            batch.remove_finished();
        }
        assert_eq!(tokens, alone, "chunked prompt, grouped {grouped}");
        assert_eq!(
            other_tokens, other_alone,
            "its neighbour, grouped {grouped}"
        );

        // A chunk cannot return prompt log-probabilities.
        let mut scored = chunk(0, ends[0]);
        scored.prompt_logprobs = true;
        let Err(error) = engine.prefill(vec![scored]) else {
            panic!("a chunk asking for prompt log-probabilities was accepted");
        };
        let error = error.to_string();
        assert!(error.contains("prefill-only"), "{error}");
    }
}
