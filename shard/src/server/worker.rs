//! The engine thread: owns the engine and every cached batch, and executes one
//! command at a time from the gRPC handlers. libtorch calls block, so they run
//! on this dedicated OS thread, never on the async runtime.
//!
//! Run-ahead: right after answering a decode step, the thread already computes the
//! next step of the batch it just returned, while the answer travels to the router
//! and the router's next `Decode` travels back. That `Decode` then finds its tokens
//! ready, so the round trip (gRPC, the router's batching task, task wake-ups) no
//! longer adds to the time per token. The step is the one the router would ask for
//! anyway (every sequence advances by exactly one token per `Decode`, sampled with
//! the same random stream), so outputs do not change:
//! - batches that join in that `Decode` (fresh from a prefill) are merged without a
//!   step of their own and advance with the others in the next run-ahead step, so
//!   they cost no extra forward pass; their first decoded token comes one `Decode`
//!   later;
//! - a sequence that finishes during a run-ahead step stays in the batch until the
//!   `Decode` that delivers its last token;
//! - `FilterBatch` drops the run-ahead tokens of the requests it removes, and
//!   `ClearCache` drops them with their batch.
//!
//! The router turns run-ahead off for one step (`prefill_follows`) when it will prefill
//! next: that `Prefill` carries the running batches (`decode_batch_ids`), and their
//! decode step shares the prefill's forward pass, which reads the weights once for
//! both instead of twice. A `Prefill` that finds its running batch already stepped
//! ahead returns that step and prefills on its own.
//!
//! The decision to run ahead depends only on the commands received, never on timing,
//! so all ranks of a tensor-parallel group take the same steps in the same order.

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
        /// Cached batches to advance by one step in the same forward pass.
        decode_batch_ids: Vec<u64>,
        /// Do not step the returned batch ahead.
        prefill_follows: bool,
        span: Span,
        reply: oneshot::Sender<Result<StepOutput>>,
    },
    Decode {
        batch_ids: Vec<u64>,
        /// Do not step the returned batch ahead.
        prefill_follows: bool,
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

/// Runs until every sender is dropped. With `run_ahead`, each decode step is
/// followed at once by the next one (see the module documentation).
pub fn run(mut engine: Engine, mut commands: mpsc::Receiver<Command>, run_ahead: bool) {
    // Gradient tracking is per thread in libtorch.
    let _no_grad = tch::no_grad_guard();
    let mut worker = Worker {
        batches: HashMap::new(),
        ahead: None,
        timed_steps: 0,
    };
    while let Some(command) = commands.blocking_recv() {
        // A reply nobody waits for any more (the router hung up) is not an error here.
        match command {
            Command::Prefill {
                batch_id,
                requests,
                decode_batch_ids,
                prefill_follows,
                span,
                reply,
            } => {
                let result = {
                    let _span = info_span!(
                        parent: &span,
                        "worker_prefill",
                        batch_id,
                        requests = requests.len(),
                        running_batches = decode_batch_ids.len()
                    )
                    .entered();
                    if decode_batch_ids.is_empty() {
                        worker.prefill(&mut engine, batch_id, requests)
                    } else {
                        worker.prefill_and_decode(
                            &mut engine,
                            batch_id,
                            requests,
                            &decode_batch_ids,
                        )
                    }
                };
                // After a plain prefill the router decodes the new batch with the
                // running ones (see `Worker::decode`); only a step of the running batch
                // is taken ahead.
                let stepped = !decode_batch_ids.is_empty();
                worker.answer(
                    &mut engine,
                    result,
                    reply,
                    stepped && run_ahead && !prefill_follows,
                    &span,
                );
            }
            Command::Decode {
                batch_ids,
                prefill_follows,
                span,
                reply,
            } => {
                let result = {
                    let _span =
                        info_span!(parent: &span, "worker_decode", batches = batch_ids.len())
                            .entered();
                    worker.decode(&mut engine, &batch_ids)
                };
                worker.answer(
                    &mut engine,
                    result,
                    reply,
                    run_ahead && !prefill_follows,
                    &span,
                );
                worker.report_stages();
            }
            Command::Filter {
                batch_id,
                keep,
                reply,
            } => {
                let _ = reply.send(worker.filter(batch_id, &keep));
            }
            Command::Clear { batch_id, reply } => {
                worker.clear(batch_id);
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

/// A decode step taken ahead of the router's request for it.
struct Ahead {
    batch_id: u64,
    /// Its generations and forward time, or the error it failed with (reported to
    /// the `Decode` that asks for the batch).
    result: Result<(Vec<Generation>, u64)>,
}

struct Worker {
    batches: HashMap<u64, Batch>,
    ahead: Option<Ahead>,
    /// Decode steps since the last stage report (`TESSERA_STAGE_TIMING=1`).
    timed_steps: u32,
}

/// Decode steps per stage report in the log.
const STAGE_REPORT_STEPS: u32 = 200;

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
        let (first, fresh, ready) = self.take_for_step(batch_ids)?;
        // On an error the merged batch is dropped: its requests fail in the router.
        let (stepped, generations, forward_ns) = match ready {
            Some((mut stepped, ahead)) => {
                let (generations, forward_ns) = ahead?;
                // The newcomers advance with the others in the next step.
                stepped.merge(fresh);
                (stepped, generations, forward_ns)
            }
            None => {
                let mut fresh = fresh;
                let forward_start = Instant::now();
                let generations = engine.decode(&mut fresh)?;
                (
                    fresh,
                    generations,
                    forward_start.elapsed().as_nanos() as u64,
                )
            }
        };
        Ok(StepOutput {
            generations,
            batch: self.keep_unfinished(first, stepped),
            forward_ns,
            total_ns: start.elapsed().as_nanos() as u64,
        })
    }

    /// Sends a step's result; with `ahead`, then takes the next decode step of the
    /// batch it returned.
    fn answer(
        &mut self,
        engine: &mut Engine,
        result: Result<StepOutput>,
        reply: oneshot::Sender<Result<StepOutput>>,
        ahead: bool,
        span: &Span,
    ) {
        let next = match &result {
            Ok(StepOutput {
                batch: Some(batch), ..
            }) if ahead => Some(batch.id),
            _ => None,
        };
        // A reply nobody waits for any more (the router hung up) is not an error here.
        let _ = reply.send(result);
        if let Some(batch_id) = next {
            let _span = info_span!(parent: span, "worker_decode_ahead", batch_id).entered();
            self.run_ahead(engine, batch_id);
        }
    }

    /// Prefills `requests` as batch `batch_id` and advances the cached batches
    /// `decode_ids` by one step, in one forward pass (unless one of them was stepped
    /// ahead: then that step is returned and the prompts are prefilled alone). Returns
    /// everything merged under the first of `decode_ids`; on an error the running
    /// batches are dropped, as in [`Worker::decode`].
    fn prefill_and_decode(
        &mut self,
        engine: &mut Engine,
        batch_id: u64,
        requests: Vec<GenerateRequest>,
        decode_ids: &[u64],
    ) -> Result<StepOutput> {
        let start = Instant::now();
        if self.batches.contains_key(&batch_id) {
            return Err(EngineError::Batch(format!(
                "batch {batch_id} already exists"
            )));
        }
        let (first, running, ready) = self.take_for_step(decode_ids)?;
        let forward_start = Instant::now();
        let (mut stepped, generations, fresh) = match ready {
            Some((stepped, ahead)) => {
                let (mut generations, _) = ahead?;
                let (fresh, new) = engine.prefill(requests)?;
                let mut stepped = stepped;
                // Batches that were not part of the step taken ahead join without one.
                stepped.merge(running);
                generations.extend(new);
                (stepped, generations, fresh)
            }
            None => {
                let mut running = running;
                let (fresh, new, mut generations) =
                    engine.prefill_and_decode(requests, &mut running)?;
                generations.extend(new);
                (running, generations, fresh)
            }
        };
        let forward_ns = forward_start.elapsed().as_nanos() as u64;
        stepped.merge(fresh);
        Ok(StepOutput {
            generations,
            batch: self.keep_unfinished(first, stepped),
            forward_ns,
            total_ns: start.elapsed().as_nanos() as u64,
        })
    }

    /// Removes the cached batches `batch_ids` for a step: returns the first id (the
    /// merged batch's), the ones that still need the step, merged, and the one stepped
    /// ahead with that step's result, if any.
    #[allow(clippy::type_complexity)]
    fn take_for_step(
        &mut self,
        batch_ids: &[u64],
    ) -> Result<(u64, Batch, Option<(Batch, Result<(Vec<Generation>, u64)>)>)> {
        let Some(&first) = batch_ids.first() else {
            return Err(EngineError::Batch(
                "a step needs at least one batch id".into(),
            ));
        };
        if let Some(missing) = batch_ids.iter().find(|id| !self.batches.contains_key(id)) {
            return Err(EngineError::Batch(format!(
                "batch {missing} is not cached on this shard"
            )));
        }
        let ready = match &self.ahead {
            Some(a) if batch_ids.contains(&a.batch_id) => self.ahead.take(),
            _ => None,
        };
        let mut stepped = Batch::default();
        let mut fresh = Batch::default();
        for id in batch_ids {
            if let Some(b) = self.batches.remove(id) {
                if ready.as_ref().is_some_and(|a| a.batch_id == *id) {
                    stepped.merge(b);
                } else {
                    fresh.merge(b);
                }
            }
        }
        Ok((first, fresh, ready.map(|a| (stepped, a.result))))
    }

    /// Takes the next decode step of cached batch `batch_id` now, for the `Decode`
    /// that will ask for it.
    fn run_ahead(&mut self, engine: &mut Engine, batch_id: u64) {
        let Some(batch) = self.batches.get_mut(&batch_id) else {
            return;
        };
        let start = Instant::now();
        let result = engine
            .decode(batch)
            .map(|generations| (generations, start.elapsed().as_nanos() as u64));
        self.ahead = Some(Ahead { batch_id, result });
    }

    /// With `TESSERA_STAGE_TIMING=1`, logs the mean time per decode step of each stage
    /// (see `stage_timing`) every [`STAGE_REPORT_STEPS`] `Decode` commands.
    fn report_stages(&mut self) {
        if !crate::stage_timing::enabled() {
            return;
        }
        self.timed_steps += 1;
        if self.timed_steps < STAGE_REPORT_STEPS {
            return;
        }
        let steps = f64::from(std::mem::take(&mut self.timed_steps));
        let stages = crate::stage_timing::take();
        let total: f64 = stages.iter().map(|s| s.1).sum::<f64>() / steps;
        let breakdown: Vec<String> = stages
            .iter()
            .map(|(name, seconds)| format!("{name} {:.3}", seconds / steps * 1e3))
            .collect();
        tracing::info!(
            "decode stages, ms per step over {steps} steps ({:.2} ms timed): {}",
            total * 1e3,
            breakdown.join(", ")
        );
    }

    /// Forgets cached batch `batch_id` (all of them with `None`) and its run-ahead step.
    fn clear(&mut self, batch_id: Option<u64>) {
        match batch_id {
            Some(id) => {
                self.batches.remove(&id);
                if self.ahead.as_ref().is_some_and(|a| a.batch_id == id) {
                    self.ahead = None;
                }
            }
            None => {
                self.batches.clear();
                self.ahead = None;
            }
        }
    }

    fn keep_unfinished(&mut self, id: u64, mut batch: Batch) -> Option<CachedBatch> {
        batch.remove_finished();
        self.cache(id, batch)
    }

    /// Caches `batch` under `id` unless it is empty.
    fn cache(&mut self, id: u64, batch: Batch) -> Option<CachedBatch> {
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
        match self.ahead.as_mut() {
            Some(ahead) if ahead.batch_id == batch_id => {
                if let Ok((generations, _)) = &mut ahead.result {
                    generations.retain(|g| keep.contains(&g.request_id));
                }
                // Sequences that finished in the run-ahead step stay until the next
                // `Decode` delivers their last token.
                let cached = self.cache(batch_id, batch);
                if cached.is_none() {
                    self.ahead = None;
                }
                Ok(cached)
            }
            _ => Ok(self.keep_unfinished(batch_id, batch)),
        }
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
            cached_tokens: 0,
            prompt_logprobs: false,
            prefill_only: false,
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::PathBuf;

    use super::*;
    use crate::engine::EngineConfig;

    fn tiny_engine() -> Engine {
        let path =
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/reference/tiny-llama");
        Engine::load(
            &path,
            &EngineConfig {
                kind: tch::Kind::Float,
                max_kv_tokens: 2048,
                ..EngineConfig::default()
            },
        )
        .unwrap()
    }

    /// Request `id`: a prompt of its own, `new_tokens` tokens, sampled with a seed
    /// (so that a changed random stream would show), in blocks of its own.
    fn request(id: u64, new_tokens: u32) -> GenerateRequest {
        let prompt: Vec<u32> = (0..3 + id as u32)
            .map(|p| 5 + (id as u32 * 13 + p * 7) % 50)
            .collect();
        GenerateRequest {
            id,
            prompt,
            sampling: SamplingParams {
                do_sample: true,
                temperature: 0.8,
                seed: Some(id),
                ..SamplingParams::default()
            },
            stopping: StoppingCriteria {
                max_new_tokens: new_tokens,
                ignore_eos: true,
                ..StoppingCriteria::default()
            },
            block_table: (id as u32 * 4..id as u32 * 4 + 4).collect(),
            cached_tokens: 0,
            prompt_logprobs: false,
            prefill_only: false,
        }
    }

    struct Driver {
        tx: mpsc::Sender<Command>,
        tokens: BTreeMap<u64, Vec<u32>>,
        finished: Vec<u64>,
        batch_ids: Vec<u64>,
    }

    impl Driver {
        fn absorb(&mut self, out: StepOutput) {
            for g in out.generations {
                self.tokens
                    .entry(g.request_id)
                    .or_default()
                    .push(g.token_id);
                if g.finish_reason.is_some() {
                    self.finished.push(g.request_id);
                }
            }
            self.batch_ids = out.batch.map(|b| vec![b.id]).unwrap_or_default();
        }

        /// Prefills `requests`; with `fused`, the running batches take their step in
        /// the same call. Returns whether they did.
        fn prefill(&mut self, batch_id: u64, requests: Vec<GenerateRequest>, fused: bool) -> bool {
            let decode_batch_ids = if fused {
                self.batch_ids.clone()
            } else {
                Vec::new()
            };
            let stepped = !decode_batch_ids.is_empty();
            let (reply, rx) = oneshot::channel();
            self.tx
                .blocking_send(Command::Prefill {
                    batch_id,
                    requests,
                    decode_batch_ids,
                    prefill_follows: false,
                    span: Span::none(),
                    reply,
                })
                .unwrap();
            let out = rx.blocking_recv().unwrap().unwrap();
            if stepped {
                self.absorb(out);
                return true;
            }
            let joined = out.batch.as_ref().map(|b| b.id);
            let before = std::mem::take(&mut self.batch_ids);
            self.absorb(out);
            self.batch_ids = before.into_iter().chain(joined).collect();
            false
        }

        fn decode(&mut self, prefill_follows: bool) {
            let (reply, rx) = oneshot::channel();
            self.tx
                .blocking_send(Command::Decode {
                    batch_ids: self.batch_ids.clone(),
                    prefill_follows,
                    span: Span::none(),
                    reply,
                })
                .unwrap();
            let out = rx.blocking_recv().unwrap().unwrap();
            self.absorb(out);
        }

        fn filter(&mut self, keep: Vec<u64>) {
            let (reply, rx) = oneshot::channel();
            self.tx
                .blocking_send(Command::Filter {
                    batch_id: self.batch_ids[0],
                    keep,
                    reply,
                })
                .unwrap();
            self.batch_ids = rx
                .blocking_recv()
                .unwrap()
                .unwrap()
                .map(|b| vec![b.id])
                .unwrap_or_default();
        }
    }

    /// How the driver steps: run-ahead on the shard, running batches stepped inside
    /// the prefills that admit newcomers, and the router's hint before those prefills.
    #[derive(Clone, Copy)]
    struct Mode {
        run_ahead: bool,
        fused: bool,
        hint: bool,
    }

    const PLAIN: Mode = Mode {
        run_ahead: false,
        fused: false,
        hint: false,
    };

    /// What a router sees: request 0 and 1 start, 2 joins after two steps, 1 is
    /// cancelled after four, 3 joins after five; every request finishes (1 excepted).
    fn serve(mode: Mode) -> (BTreeMap<u64, Vec<u32>>, Vec<u64>) {
        let (tx, rx) = mpsc::channel(8);
        let run_ahead = mode.run_ahead;
        let thread = std::thread::spawn(move || run(tiny_engine(), rx, run_ahead));
        let mut d = Driver {
            tx,
            tokens: BTreeMap::new(),
            finished: Vec::new(),
            batch_ids: Vec::new(),
        };
        let joins = |step: usize| match step {
            2 => Some((11, vec![request(2, 4)])),
            5 => Some((12, vec![request(3, 6)])),
            _ => None,
        };
        d.prefill(10, vec![request(0, 9), request(1, 12)], mode.fused);
        for step in 0..40 {
            if step == 4 {
                d.filter(vec![0, 2]);
            }
            let mut stepped = false;
            if let Some((id, requests)) = joins(step) {
                stepped = d.prefill(id, requests, mode.fused);
            }
            if d.batch_ids.is_empty() {
                break;
            }
            if !stepped {
                d.decode(mode.hint && joins(step + 1).is_some());
            }
        }
        drop(d.tx);
        thread.join().unwrap();
        d.finished.sort_unstable();
        (d.tokens, d.finished)
    }

    #[test]
    fn running_ahead_changes_no_token_and_loses_no_request() {
        let (plain, plain_finished) = serve(PLAIN);
        let (ahead, ahead_finished) = serve(Mode {
            run_ahead: true,
            ..PLAIN
        });
        assert_eq!(plain_finished, vec![0, 2, 3]);
        assert_eq!(ahead_finished, plain_finished);
        assert_eq!(plain[&0].len(), 9);
        assert_eq!(plain[&2].len(), 4);
        assert_eq!(plain[&3].len(), 6);
        // Request 1 was cancelled: with run-ahead it may have been one token further
        // on the shard, but that token is never delivered.
        assert_eq!(ahead[&1], plain[&1]);
        assert_eq!(ahead, plain);
    }

    /// A prefill that also steps the running batch gives every request the tokens it
    /// gets from a prefill and a decode apart: with the router's hint (one forward
    /// pass for both), without it (the running batch was stepped ahead; its step is
    /// returned), and with run-ahead off.
    #[test]
    fn decoding_inside_a_prefill_changes_no_token_and_loses_no_request() {
        let (plain, plain_finished) = serve(PLAIN);
        for (run_ahead, hint) in [(true, true), (true, false), (false, false)] {
            let (fused, finished) = serve(Mode {
                run_ahead,
                fused: true,
                hint,
            });
            assert_eq!(
                finished, plain_finished,
                "run-ahead {run_ahead}, hint {hint}"
            );
            assert_eq!(fused, plain, "run-ahead {run_ahead}, hint {hint}");
        }
    }
}
