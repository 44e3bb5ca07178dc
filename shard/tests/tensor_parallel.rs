//! Tensor parallelism over c10d/Gloo: the ranks of a group, run as threads of this
//! process (each with its own engine and its own place in the group), must produce
//! the same last-position logits as one rank with the whole model.

mod common;

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use tch::Kind;
use tessera_shard::collectives::GroupConfig;
use tessera_shard::kv_cache::BlockAllocator;
use tessera_shard::{Engine, EngineConfig};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// One group at a time: every rank is a thread of this process with its own OpenMP
/// team, so two groups at once put up to 14 busy threads on a 2-core CI machine, and
/// one test's rendezvous port, picked free and released, is open to the others' Gloo
/// listeners until its rank 0 binds it.
fn one_group_at_a_time() -> MutexGuard<'static, ()> {
    static GROUPS: Mutex<()> = Mutex::new(());
    GROUPS
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn engine_config(group: Option<GroupConfig>) -> EngineConfig {
    engine_config_of(Kind::Float, group)
}

fn engine_config_of(kind: Kind, group: Option<GroupConfig>) -> EngineConfig {
    EngineConfig {
        kind,
        max_kv_tokens: 1024,
        group,
        ..EngineConfig::default()
    }
}

fn last_logits(engine: &mut Engine, prompts: &[Vec<u32>]) -> Vec<Vec<f32>> {
    prompts
        .iter()
        .map(|p| {
            let mut blocks =
                BlockAllocator::new(engine.cache().num_blocks(), engine.cache().block_size());
            let table = blocks.allocate(p.len()).expect("blocks");
            engine.last_logits(p, &table).expect("logits")
        })
        .collect()
}

/// Logits of every prompt from each of `world` ranks.
fn group_logits(path: &Path, world: usize, prompts: &[Vec<u32>]) -> Vec<Vec<Vec<f32>>> {
    group_logits_of(Kind::Float, path, world, prompts)
}

fn group_logits_of(
    kind: Kind,
    path: &Path,
    world: usize,
    prompts: &[Vec<u32>],
) -> Vec<Vec<Vec<f32>>> {
    let _serial = one_group_at_a_time();
    let port = free_port();
    let handles: Vec<_> = (0..world)
        .map(|rank| {
            let path = path.to_path_buf();
            let prompts = prompts.to_vec();
            std::thread::spawn(move || {
                let mut engine = Engine::load(
                    &path,
                    &engine_config_of(
                        kind,
                        Some(GroupConfig {
                            rank,
                            world_size: world,
                            master_addr: "127.0.0.1".into(),
                            master_port: port,
                            timeout: Duration::from_secs(120),
                            nccl: false,
                        }),
                    ),
                )
                .unwrap_or_else(|e| panic!("rank {rank}: {e}"));
                let logits = last_logits(&mut engine, &prompts);
                // The group is left alive until the test process exits, as a shard's
                // group lives until its process exits: tearing c10d/Gloo groups down
                // in a process that goes on to build others is not something the
                // shard does, and both failures of this binary in CI (a collective
                // stuck for 120 s, and a SIGSEGV) came in the test that builds a
                // group after tearing one down.
                std::mem::forget(engine);
                logits
            })
        })
        .collect();
    handles
        .into_iter()
        .map(|h| h.join().expect("rank thread"))
        .collect()
}

fn check(path: PathBuf, worlds: &[usize], prompts: &[Vec<u32>]) {
    let mut single = Engine::load(&path, &engine_config(None)).expect("single rank");
    let want = last_logits(&mut single, prompts);
    drop(single);
    for &world in worlds {
        let ranks = group_logits(&path, world, prompts);
        for (rank, got) in ranks.iter().enumerate() {
            for (p, (g, w)) in got.iter().zip(&want).enumerate() {
                assert_eq!(g.len(), w.len(), "vocabulary size");
                let diff = g
                    .iter()
                    .zip(w)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(
                    diff < 1e-4,
                    "{}: {world} ranks, rank {rank}, prompt {p}: max logit difference {diff}",
                    path.display()
                );
            }
            // Every rank holds the same (all-gathered) logits, so all sample alike.
            assert_eq!(got, &ranks[0], "rank {rank} differs from rank 0");
        }
    }
}

#[test]
fn default_model_over_three_ranks_matches_one() {
    let prompts = vec![
        vec![1, 504, 3458, 282, 4649, 314],
        (0..40).map(|i| 100 + i * 37).collect(),
    ];
    check(common::default_model(), &[3], &prompts);
}

/// bf16 on the CPU runs the int4 copies of the Q4_1 weights, sliced per rank: the
/// split model must still agree with the whole one (bf16 rounding aside: the ranks'
/// partial sums are rounded to bf16 before the all-reduce, and 30 layers amplify that;
/// the largest logit difference measured 0.54 with the single-pass norm, under 0.5 with
/// libtorch's, which sums the squares in another order; logits span
/// about ±30).
#[test]
fn default_model_in_bf16_over_three_ranks_agrees_with_one() {
    let prompts = vec![vec![1, 504, 3458, 282, 4649, 314, 2114, 30]];
    let path = common::default_model();
    let mut single =
        Engine::load(&path, &engine_config_of(Kind::BFloat16, None)).expect("one rank");
    let want = last_logits(&mut single, &prompts);
    drop(single);
    let ranks = group_logits_of(Kind::BFloat16, &path, 3, &prompts);
    let argmax = |v: &[f32]| {
        v.iter()
            .enumerate()
            .fold(
                (0, f32::MIN),
                |best, (i, &x)| if x > best.1 { (i, x) } else { best },
            )
            .0
    };
    for got in &ranks {
        let diff = got[0]
            .iter()
            .zip(&want[0])
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(diff < 1.0, "max logit difference {diff}");
        assert_eq!(argmax(&got[0]), argmax(&want[0]));
    }
}

#[test]
fn tiny_models_over_two_and_four_ranks_match_one() {
    let prompts = vec![
        vec![3, 17, 250, 9, 511],
        (0..23).map(|i| i * 21 % 512).collect(),
    ];
    for model in ["tiny-llama", "tiny-qwen2"] {
        let path = common::repo_root().join("fixtures/reference").join(model);
        check(path, &[2, 4], &prompts);
    }
}

#[test]
fn impossible_splits_are_refused_before_loading() {
    let err = Engine::load(
        &common::default_model(),
        &engine_config(Some(GroupConfig {
            rank: 0,
            world_size: 2,
            master_addr: "127.0.0.1".into(),
            master_port: free_port(),
            timeout: Duration::from_secs(5),
            nccl: false,
        })),
    )
    .err()
    .expect("9 heads cannot split over 2 ranks");
    let message = err.to_string();
    assert!(
        message.contains("cannot be split over 2 shards"),
        "{message}"
    );
}
