//! Bad model files and bad requests give typed errors that name the problem; no panics.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use tessera_shard::{Engine, EngineConfig, EngineError};

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tessera-errors-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn load_err(path: &Path) -> String {
    match Engine::load(path, &EngineConfig::default()) {
        Ok(_) => panic!("{} loaded but should not", path.display()),
        Err(e) => e.to_string(),
    }
}

/// A copy of the tiny Llama folder with `edit` applied to its config.json.
fn tiny_with_config(name: &str, edit: impl FnOnce(&mut serde_json::Value)) -> PathBuf {
    let src = repo_root().join("fixtures/reference/tiny-llama");
    let dir = scratch(name);
    for entry in std::fs::read_dir(&src).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
    }
    let config_path = dir.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    edit(&mut config);
    std::fs::write(&config_path, config.to_string()).unwrap();
    dir
}

#[test]
fn missing_model_names_the_path() {
    let err = load_err(Path::new("/nonexistent/model.gguf"));
    assert!(err.contains("/nonexistent/model.gguf"), "{err}");
}

#[test]
fn truncated_gguf_is_an_error_naming_the_file() {
    let dir = scratch("truncated");
    let path = dir.join("cut.gguf");
    let bytes = std::fs::read(default_model()).unwrap();
    for cut in [100usize, 200_000, bytes.len() / 2] {
        std::fs::write(&path, &bytes[..cut]).unwrap();
        let err = load_err(&path);
        assert!(err.contains("cut.gguf"), "cut at {cut}: {err}");
    }
}

#[test]
fn unknown_architecture_is_named() {
    let dir = tiny_with_config("arch", |c| c["model_type"] = "gpt_neox".into());
    let err = load_err(&dir);
    assert!(err.contains("gpt_neox"), "{err}");
}

#[test]
fn wrong_tensor_shape_names_the_tensor_and_shapes() {
    let dir = tiny_with_config("shape", |c| c["intermediate_size"] = 96.into());
    let err = load_err(&dir);
    assert!(err.contains("mlp.gate_proj.weight"), "{err}");
    assert!(err.contains("96") && err.contains("128"), "{err}");
}

#[test]
fn folder_without_weights_is_an_error() {
    let dir = scratch("noweights");
    std::fs::copy(
        repo_root().join("fixtures/reference/tiny-llama/config.json"),
        dir.join("config.json"),
    )
    .unwrap();
    let err = load_err(&dir);
    assert!(err.contains("safetensors"), "{err}");
}

#[test]
fn bad_requests_are_rejected_before_running() {
    let mut engine = load(
        &repo_root().join("fixtures/reference/tiny-llama"),
        tch::Kind::Float,
    );
    let mut blocks = allocator(&engine);
    let vocab = engine.model_config().vocab_size as u32;

    let empty = greedy_request(&engine, &mut blocks, 1, vec![], 4);
    let out_of_vocab = greedy_request(&engine, &mut blocks, 2, vec![3, vocab + 5], 4);
    let mut too_few_blocks = greedy_request(&engine, &mut blocks, 3, vec![3; 20], 4);
    too_few_blocks.block_table.truncate(1);
    let mut bad_sampling = greedy_request(&engine, &mut blocks, 4, vec![3], 4);
    bad_sampling.sampling.top_p = 1.5;
    let mut all_cached = greedy_request(&engine, &mut blocks, 5, vec![3; 16], 4);
    all_cached.cached_tokens = 16;
    let mut scored_after_cache = greedy_request(&engine, &mut blocks, 6, vec![3; 20], 4);
    scored_after_cache.cached_tokens = 16;
    scored_after_cache.prompt_logprobs = true;
    let mut bad_bias = greedy_request(&engine, &mut blocks, 7, vec![3], 4);
    bad_bias.sampling.logit_bias = vec![(3, 250.0)];
    // greedy_request sets ignore_eos.
    let mut endless_json = greedy_request(&engine, &mut blocks, 8, vec![3], 4);
    endless_json.sampling.json_object = true;

    for (request, needle) in [
        (empty, "no tokens"),
        (out_of_vocab, "outside the vocabulary"),
        (too_few_blocks, "block table"),
        (bad_sampling, "top_p"),
        (all_cached, "leave nothing to compute"),
        (scored_after_cache, "prompt log-probabilities"),
        (bad_bias, "logit_bias"),
        (endless_json, "JSON mode"),
    ] {
        let id = request.id;
        match engine.prefill(vec![request]) {
            Err(EngineError::Request { id: got, message }) => {
                assert_eq!(got, id);
                assert!(message.contains(needle), "{message}");
            }
            Err(other) => panic!("request {id}: unexpected error {other}"),
            Ok(_) => panic!("request {id} should have been rejected"),
        }
    }
    // The engine still works afterwards.
    let ok = greedy_request(&engine, &mut blocks, 9, vec![3, 4, 5], 2);
    assert_eq!(run_alone(&mut engine, ok).len(), 2);
}
