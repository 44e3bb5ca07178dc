//! The engine thread: owns the engine and every cached batch, and executes one
//! command at a time from the gRPC handlers. libtorch calls block, so they run
//! on this dedicated OS thread, never on the async runtime.

use std::collections::HashMap;
use std::time::Instant;

use tokio::sync::{mpsc, oneshot};
use tracing::{info_span, warn, Span};

use crate::engine::{Batch, Engine, GenerateRequest, Generation};
use crate::error::{EngineError, Result};
use crate::sampling::SamplingParams;
use crate::stopping::StoppingCriteria;

/// A batch left on the shard after a step: its id and its unfinished requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedBatch {
    pub id: u64,
    pub request_ids: Vec<u64>,
}

#[derive(Debug)]
pub struct StepOutput {
    pub generations: Vec<Generation>,
    pub batch: Option<CachedBatch>,
    pub forward_ns: u64,
    pub total_ns: u64,
}

#[derive(Debug, Clone, Copy)]
pub struct Capacity {
    pub num_blocks: u32,
    pub block_size: u32,
}

/// A command for the engine thread. `span` (on steps and warmup) is the
/// gRPC handler's span: the engine thread's span of the command is its child.
pub enum Command {
    Prefill {
        batch_id: u64,
        requests: Vec<GenerateRequest>,
        span: Span,
        reply: oneshot::Sender<Result<StepOutput>>,
    },
    Decode {
        batch_ids: Vec<u64>,
        span: Span,
        reply: oneshot::Sender<Result<StepOutput>>,
    },
    Filter {
        batch_id: u64,
        keep: Vec<u64>,
        reply: oneshot::Sender<Result<Option<CachedBatch>>>,
    },
    Clear {
        batch_id: Option<u64>,
        reply: oneshot::Sender<()>,
    },
    Warmup {
        max_prefill_tokens: u32,
        max_batch_size: u32,
        span: Span,
        reply: oneshot::Sender<Result<Capacity>>,
    },
    Health {
        reply: oneshot::Sender<Result<()>>,
    },
}

/// Runs until every sender is dropped.
pub fn run(mut engine: Engine, mut commands: mpsc::Receiver<Command>) {
    // Gradient tracking is per thread in libtorch.
    let _no_grad = tch::no_grad_guard();
    let mut worker = Worker {
        batches: HashMap::new(),
    };
    while let Some(command) = commands.blocking_recv() {
        // A reply nobody waits for any more (the router hung up) is not an error here.
        match command {
            Command::Prefill {
                batch_id,
                requests,
                span,
                reply,
            } => {
                let _span = info_span!(
                    parent: &span,
                    "worker_prefill",
                    batch_id,
                    requests = requests.len()
                )
                .entered();
                let _ = reply.send(worker.prefill(&mut engine, batch_id, requests));
            }
            Command::Decode {
                batch_ids,
                span,
                reply,
            } => {
                let _span =
                    info_span!(parent: &span, "worker_decode", batches = batch_ids.len()).entered();
                let _ = reply.send(worker.decode(&mut engine, &batch_ids));
            }
            Command::Filter {
                batch_id,
                keep,
                reply,
            } => {
                let _ = reply.send(worker.filter(batch_id, &keep));
            }
            Command::Clear { batch_id, reply } => {
                match batch_id {
                    Some(id) => {
                        worker.batches.remove(&id);
                    }
                    None => worker.batches.clear(),
                }
                let _ = reply.send(());
            }
            Command::Warmup {
                max_prefill_tokens,
                max_batch_size,
                span,
                reply,
            } => {
                let _span = info_span!(
                    parent: &span,
                    "worker_warmup",
                    max_prefill_tokens,
                    max_batch_size
                )
                .entered();
                let _ = reply.send(warmup(&mut engine, max_prefill_tokens, max_batch_size));
            }
            Command::Health { reply } => {
                let _ = reply.send(Ok(()));
            }
        }
    }
}

struct Worker {
    batches: HashMap<u64, Batch>,
}

impl Worker {
    fn prefill(
        &mut self,
        engine: &mut Engine,
        batch_id: u64,
        requests: Vec<GenerateRequest>,
    ) -> Result<StepOutput> {
        if self.batches.contains_key(&batch_id) {
            return Err(EngineError::Batch(format!(
                "batch {batch_id} already exists"
            )));
        }
        let start = Instant::now();
        let (batch, generations) = engine.prefill(requests)?;
        let forward_ns = start.elapsed().as_nanos() as u64;
        Ok(StepOutput {
            generations,
            batch: self.keep_unfinished(batch_id, batch),
            forward_ns,
            total_ns: start.elapsed().as_nanos() as u64,
        })
    }

    fn decode(&mut self, engine: &mut Engine, batch_ids: &[u64]) -> Result<StepOutput> {
        let start = Instant::now();
        let Some(&first) = batch_ids.first() else {
            return Err(EngineError::Batch(
                "decode needs at least one batch id".into(),
            ));
        };
        if let Some(missing) = batch_ids.iter().find(|id| !self.batches.contains_key(id)) {
            return Err(EngineError::Batch(format!(
                "batch {missing} is not cached on this shard"
            )));
        }
        let mut batch = Batch::default();
        for id in batch_ids {
            if let Some(b) = self.batches.remove(id) {
                batch.merge(b);
            }
        }
        let forward_start = Instant::now();
        // On an error the merged batch is dropped: its requests fail in the router.
        let generations = engine.decode(&mut batch)?;
        let forward_ns = forward_start.elapsed().as_nanos() as u64;
        Ok(StepOutput {
            generations,
            batch: self.keep_unfinished(first, batch),
            forward_ns,
            total_ns: start.elapsed().as_nanos() as u64,
        })
    }

    fn keep_unfinished(&mut self, id: u64, mut batch: Batch) -> Option<CachedBatch> {
        batch.remove_finished();
        if batch.is_empty() {
            return None;
        }
        let cached = CachedBatch {
            id,
            request_ids: batch.ids(),
        };
        self.batches.insert(id, batch);
        Some(cached)
    }

    fn filter(&mut self, batch_id: u64, keep: &[u64]) -> Result<Option<CachedBatch>> {
        let mut batch = self.batches.remove(&batch_id).ok_or_else(|| {
            EngineError::Batch(format!("batch {batch_id} is not cached on this shard"))
        })?;
        batch.filter(keep);
        Ok(self.keep_unfinished(batch_id, batch))
    }
}

/// Runs the largest batch the router may send: one prefill of
/// `max_prefill_tokens` prompt tokens spread over up to `max_batch_size`
/// prompts, then two decode steps; then frees everything.
fn warmup(engine: &mut Engine, max_prefill_tokens: u32, max_batch_size: u32) -> Result<Capacity> {
    let (num_blocks, block_size) = (engine.cache().num_blocks(), engine.cache().block_size());
    let capacity = Capacity {
        num_blocks: num_blocks as u32,
        block_size: block_size as u32,
    };
    let vocab = engine.model_config().vocab_size.max(2) as u32;
    let total = (max_prefill_tokens as usize).max(1);
    let prompts = (max_batch_size as usize).clamp(1, total);
    let per_prompt = total / prompts;
    let new_tokens = 3usize;
    let blocks_per_seq = (per_prompt + new_tokens).div_ceil(block_size);
    if blocks_per_seq * prompts > num_blocks {
        return Err(EngineError::KvCache(format!(
            "warmup needs {} blocks of {block_size} tokens for {prompts} prompts of {per_prompt} tokens but the pool has {num_blocks}; give the shard more KV tokens or lower --max-batch-prefill-tokens",
            blocks_per_seq * prompts
        )));
    }
    let requests = (0..prompts)
        .map(|i| GenerateRequest {
            id: i as u64,
            prompt: (0..per_prompt)
                .map(|p| 1 + ((i * 7919 + p * 104_729) as u32) % (vocab - 1))
                .collect(),
            sampling: SamplingParams::default(),
            stopping: StoppingCriteria {
                max_new_tokens: new_tokens as u32,
                ignore_eos: true,
                ..StoppingCriteria::default()
            },
            block_table: (i * blocks_per_seq..(i + 1) * blocks_per_seq)
                .map(|b| b as u32)
                .collect(),
        })
        .collect();
    let (mut batch, _) = engine.prefill(requests)?;
    for _ in 1..new_tokens {
        engine.decode(&mut batch)?;
    }
    if batch.ids().len() != prompts {
        warn!("warmup batch lost sequences");
    }
    Ok(capacity)
}
